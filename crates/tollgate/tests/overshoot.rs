//! An upstream that reports more than the worst case held (SPEC section 3, "The worst case
//! covers every billable the request can trigger"): the call is charged what the upstream
//! reported and recorded as overshoot; the `overshoot` alert is found by the alert scan (with no
//! rule configured, by the built-in one, to the log) even when the process that settled the call
//! died before looking; `tollgate check` names the overshoot as a warning and still exits 0.
//!
//! Issue 12, finding 4: a $0.10 `block` pool was charged $0.30 and `tollgate check` stayed
//! green. Here: the real `tollgate serve` in front of the testkit's mock upstream, a pool with a
//! $0.10 spend cap, and the mock reporting $0.30 of usage.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_overshoot-test-admin-token";

/// A `tollgate serve` child process, SIGKILLed and reaped when dropped.
struct Server {
    child: Option<Child>,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `tollgate serve` in `dir` (with its `tollgate.toml`) on `dir/tollgate.db`.
    async fn start(dir: &Path) -> Server {
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = dir.join(format!("serve-{port}-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .arg("serve")
                .current_dir(dir)
                .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOLLGATE_DB", dir.join("tollgate.db"))
                .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
                .env("TOLLGATE_LOG", "warn")
                .env("MOCK_UPSTREAM_KEY", "upstream-secret")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start tollgate serve");
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash: nothing after the last durable write runs.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as an operator stops it, and wait for a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("server running");
        let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(term.is_ok_and(|s| s.success()), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "tollgate serve exited with {status} on SIGTERM:\n{}", self.log_text());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tollgate serve did not exit within 20 s of SIGTERM:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new().request(method.clone(), format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn check(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("check").args(args).current_dir(dir);
    for var in ["TOLLGATE_DB", "TOLLGATE_SERVER", "TOLLGATE_ADMIN_TOKEN", "TOLLGATE_LISTEN"] {
        cmd.env_remove(var);
    }
    cmd.output().expect("run tollgate check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overshoot_is_recorded_alerted_after_a_crash_and_named_by_check() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[upstream]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
         api_key_env = \"MOCK_UPSTREAM_KEY\"\nmodels = [\"claude-*\"]\nauth = \"gateway\"\n",
        mock.base_url()
    );
    std::fs::write(dir.path().join("tollgate.toml"), config).unwrap();
    let mut first = Server::start(dir.path()).await;
    let post = reqwest::Method::POST;
    first.api(post.clone(), "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let cap = json!({"on_exhausted": "block", "spend_cap_usd": "0.1"});
    first.api(reqwest::Method::PUT, "/api/v1/accounts/acme/pools/programmatic", Some(cap)).await;
    let key = first.api(post.clone(), "/api/v1/accounts/acme/keys", Some(json!({"pool": "programmatic"}))).await;
    let key = key["key"].as_str().unwrap().to_string();

    // A call whose worst case (about $0.02) fits the $0.10 cap; the mock reports 50,000 input
    // and 10,000 output tokens: $0.15 + $0.15 on Sonnet 4.6.
    let body =
        json!({"model": "claude-sonnet-4-6", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages", first.base))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-usage", "50000,10000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The settle runs once the body has ended: wait for the event.
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let events = first.api(reqwest::Method::GET, "/api/v1/accounts/acme/events", None).await;
        if let Some(e) = events["events"].as_array().and_then(|e| e.first()) {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "the call was not settled within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(event["cost_usd"], "0.3", "{event}");
    // The cycle's $50 grant pays it: the spend cap bounds holds, not what the upstream reports.
    assert_eq!((event["grant_usd"].as_str(), event["overage_usd"].as_str()), (Some("0.3"), Some("0")), "{event}");
    let overshoot = event["overshoot_usd"].as_str().unwrap().to_string();
    assert!(overshoot.starts_with("0.2"), "charged above its hold of about $0.02: {event}");

    // The process dies before its next look (the scan runs at start and every minute); the
    // next one finds the overshoot at start and raises the alert, with no rule configured.
    first.kill();
    let mut second = Server::start(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let alerts = loop {
        let alerts = second.api(reqwest::Method::GET, "/api/v1/alerts?kind=overshoot", None).await;
        let alerts = alerts["alerts"].as_array().unwrap().clone();
        if !alerts.is_empty() {
            break alerts;
        }
        assert!(Instant::now() < deadline, "no overshoot alert within 10 s of the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!((alert["account"].as_str(), alert["pool"].as_str()), (Some("acme"), Some("programmatic")), "{alert}");
    let message = alert["message"].as_str().unwrap();
    assert!(message.contains(&format!("${overshoot}")) && message.contains("1 event"), "{message}");
    // Rules of the kind can be made through the API; the built-in rule's id is reserved.
    let http = reqwest::Client::new();
    for (body, status, want) in [
        (json!({"id": "overshoot-default", "kind": "overshoot"}), 400, "built-in"),
        (json!({"id": "ops", "kind": "overshoot", "percent": [50]}), 400, "threshold rules only"),
        (json!({"id": "ops", "kind": "overshoot", "pool": "programmatic"}), 200, "\"kind\":\"overshoot\""),
    ] {
        let r = http.post(format!("{}/api/v1/alert-rules", second.base)).bearer_auth(TOKEN).json(&body).send().await;
        let r = r.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let text = r.text().await.unwrap();
        assert!(text.contains(want), "{body}: {text}");
    }
    second.stop().await;

    // `tollgate check`: every invariant holds (the overshoot is no breach of the cap), and the
    // overshoot is named as a warning; exit 0.
    let db = dir.path().join("tollgate.db");
    let out = check(dir.path(), &["--db", db.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every invariant holds") && stdout.contains("1 warning"), "{stdout}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.starts_with("WARNING")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    for needed in ["account acme", "pool programmatic", "cycle ", &format!("${overshoot}"), "1 event"] {
        assert!(warnings[0].contains(needed), "the warning names {needed:?}: {stdout}");
    }
    let out = check(dir.path(), &["--json", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["ok"].clone(), v["breaches"].clone()), (json!(true), json!([])), "{v}");
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["warnings"][0].as_str(), Some(warnings[0].trim_start_matches("WARNING ")), "{v}");
}
