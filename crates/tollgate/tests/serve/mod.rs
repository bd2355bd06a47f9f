//! A `tollgate serve` child process for end-to-end tests: the real binary on a port of its own,
//! in a working directory of its own (its `tollgate.toml`, token file and SQLite database live
//! there), SIGKILLed and reaped when dropped, so a failing test leaves no server behind; and a
//! client of its API and gateway. Each test file uses a part of it.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_testkit::MockUpstream;

pub struct Server {
    child: Option<Child>,
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `tollgate serve` in `dir` with the admin token `token` and the extra environment
    /// `env`, and waits for /healthz.
    pub async fn start(dir: &Path, token: &str, env: &[(&str, &str)]) -> Server {
        Server::start_under(&[], dir, token, env).await
    }

    /// As [`Server::start`], the binary run by the command `wrapper` (e.g. `prlimit --nofile=…
    /// --`) when it is not empty.
    pub async fn start_under(wrapper: &[&str], dir: &Path, token: &str, env: &[(&str, &str)]) -> Server {
        let mut last_log = String::new();
        // A free port can be taken between our probe and the server's bind: try a few.
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = dir.join(format!("serve-{port}-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let binary = env!("CARGO_BIN_EXE_tollgate");
            let mut command = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(binary);
                    c
                }
                None => Command::new(binary),
            };
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

    /// `tollgate serve` in `dir` on the SQLite database `dir/tollgate.db`, with a `tollgate.toml`
    /// whose Anthropic upstream is `mock`.
    pub async fn with_mock(dir: &Path, token: &str, mock: &MockUpstream) -> Server {
        Server::with_mock_config(dir, token, mock, "").await
    }

    /// As [`Server::with_mock`], `config` (TOML) written at the top of its `tollgate.toml`.
    pub async fn with_mock_config(dir: &Path, token: &str, mock: &MockUpstream, config: &str) -> Server {
        Server::with_mock_under(&[], dir, token, mock, config).await
    }

    /// As [`Server::with_mock_config`], run by the command `wrapper` (see [`Server::start_under`]).
    pub async fn with_mock_under(
        wrapper: &[&str],
        dir: &Path,
        token: &str,
        mock: &MockUpstream,
        config: &str,
    ) -> Server {
        let upstream = format!(
            "[[upstream]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
             api_key_env = \"MOCK_UPSTREAM_KEY\"\nmodels = [\"claude-*\"]\n",
            mock.base_url()
        );
        std::fs::write(dir.join("tollgate.toml"), format!("{config}\n{upstream}")).unwrap();
        let db = dir.join("tollgate.db");
        let env = [("TOLLGATE_DB", db.to_str().unwrap()), ("MOCK_UPSTREAM_KEY", "upstream-secret")];
        Server::start_under(wrapper, dir, token, &env).await
    }

    /// `tollgate serve` in `dir` on the database `db` (a SQLite path or a PostgreSQL url), with
    /// a `tollgate.toml` of `server_section` (TOML, may be empty) and an Anthropic upstream `mock`.
    pub async fn with_mock_on(dir: &Path, token: &str, mock: &MockUpstream, db: &str, server_section: &str) -> Server {
        let config = format!(
            "{server_section}\n[[upstream]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
             api_key_env = \"MOCK_UPSTREAM_KEY\"\nmodels = [\"claude-*\"]\n",
            mock.base_url()
        );
        std::fs::write(dir.join("tollgate.toml"), config).unwrap();
        let env = [("TOLLGATE_DB", db), ("MOCK_UPSTREAM_KEY", "upstream-secret")];
        Server::start(dir, token, &env).await
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

    /// SIGTERM, then the time the process took to exit, or None if it still ran after `limit`
    /// (it is then SIGKILLed).
    pub async fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let child = self.child.as_mut()?;
        let sent = Instant::now();
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
        while sent.elapsed() < limit {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return Some(sent.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        None
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

/// A client of a server's API and gateway, acting as the admin (`token`) or with a key.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    token: String,
}

impl Client {
    pub fn new(server: &Server, token: &str) -> Client {
        Client { http: reqwest::Client::new(), base: server.base.clone(), token: token.to_string() }
    }

    /// A call to the management API with `auth`; (status, JSON body).
    pub async fn api(&self, auth: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(auth);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.api(&self.token.clone(), method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// Account acme (team-standard) and a programmatic key of it; (key id, secret).
    pub async fn key(&self, name: &str, cap_usd: Option<&str>) -> (String, String) {
        let mut body = json!({"pool": "programmatic", "name": name});
        if let Some(cap) = cap_usd {
            body["cap_usd"] = json!(cap);
        }
        let k = self.admin(reqwest::Method::POST, "/api/v1/accounts/acme/keys", Some(body)).await;
        (k["id"].as_str().unwrap().to_string(), k["key"].as_str().unwrap().to_string())
    }

    pub fn message(&self, secret: &str, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/messages", self.base))
            .header("x-api-key", secret)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
    }

    /// The programmatic pool's (charged, held) in nano-USD.
    pub async fn programmatic(&self) -> (i64, i64) {
        let b = self.admin(reqwest::Method::GET, "/api/v1/accounts/acme/balance", None).await;
        let p = &b["pools"]["programmatic"];
        let nanos = |f: &str| usd_nanos(p[f].as_str().unwrap());
        (nanos("used_usd") + nanos("overage_usd"), nanos("held_usd"))
    }

    /// (charged, held) once nothing is held, or after 10 s.
    pub async fn settled(&self) -> (i64, i64) {
        for _ in 0..200 {
            let (charged, held) = self.programmatic().await;
            if held == 0 {
                return (charged, held);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.programmatic().await
    }

    pub async fn events(&self, auth: &str) -> Vec<Value> {
        let (status, v) = self.api(auth, reqwest::Method::GET, "/api/v1/accounts/acme/events?limit=1000", None).await;
        assert_eq!(status, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }
}

/// "0.42" → 420,000,000.
pub fn usd_nanos(s: &str) -> i64 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let nanos = whole.trim_start_matches('-').parse::<i64>().unwrap() * 1_000_000_000
        + format!("{frac:0<9}").parse::<i64>().unwrap();
    if s.starts_with('-') { -nanos } else { nanos }
}
