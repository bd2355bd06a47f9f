//! `tollgate top` against a real `tollgate serve`: an event posted while it watches shows up as a
//! `calls` update and the account's balance.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "tga_top-test-admin-token";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn top_shows_calls_and_balances_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let _server = Kill(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .current_dir(dir.path())
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOLLGATE_DB", dir.path().join("t.db"))
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::blocking_get_ok(&format!("{base}/healthz"));
    assert!(http, "tollgate serve did not come up");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("TOLLGATE_SERVER", &base)
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    cli(&["account", "create", "acme", "--tier", "team-standard"]);

    let mut top = Kill(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["top", "acme", "--count", "2", "--json"])
            .env("TOLLGATE_SERVER", &base)
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let events = dir.path().join("e.json");
    let event = json!({"id": "e1", "account": "acme", "pool": "programmatic", "model": "claude-sonnet-4-5",
                       "usage": {"input_tokens": 100, "output_tokens": 20}});
    std::fs::write(&events, event.to_string()).unwrap();
    cli(&["events", "post", events.to_str().unwrap()]);

    let stdout = top.0.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<Value> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|_| Instant::now() < deadline)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert_eq!(top.0.wait().unwrap().code(), Some(0), "top stops by itself after --count updates");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["event"], "calls");
    assert_eq!(lines[0]["data"]["calls"], 1);
    assert_eq!(lines[0]["data"]["charged_usd"], "0.0006");
    assert_eq!(lines[1]["event"], "balance");
    assert_eq!(lines[1]["data"]["pools"]["programmatic"]["used_usd"], "0.0006");
}

mod reqwest {
    /// Polls `url` for up to 20 s until it answers 2xx.
    pub fn blocking_get_ok(url: &str) -> bool {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = ::reqwest::Client::new();
            for _ in 0..400 {
                if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            false
        })
    }
}
