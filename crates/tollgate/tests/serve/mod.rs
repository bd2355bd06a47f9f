//! A `tollgate serve` child process for end-to-end tests: the real binary on a port of its own,
//! in a working directory of its own (its `tollgate.toml`, token file and SQLite database live
//! there), SIGKILLed and reaped when dropped, so a failing test leaves no server behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Option<Child>,
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `tollgate serve` in `dir` with the admin token `token` and the extra environment
    /// `env`, and waits for /healthz.
    pub async fn start(dir: &Path, token: &str, env: &[(&str, &str)]) -> Server {
        let mut last_log = String::new();
        // A free port can be taken between our probe and the server's bind: try a few.
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = dir.join(format!("serve-{port}-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
            command
                .arg("serve")
                .current_dir(dir)
                .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOLLGATE_ADMIN_TOKEN", token)
                .env("TOLLGATE_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            for (name, value) in env {
                command.env(name, value);
            }
            let child = command.spawn().expect("start tollgate serve");
            let mut server = Server { child: Some(child), base: format!("http://127.0.0.1:{port}"), log };
            if server.wait_healthy().await {
                return server;
            }
            last_log = server.log_text();
        }
        panic!("tollgate serve did not become healthy; last log:\n{last_log}");
    }

    async fn wait_healthy(&mut self) -> bool {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("tollgate serve exited early ({status}):\n{}", self.log_text());
                self.child = None;
                return false;
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
