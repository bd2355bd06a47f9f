//! Alerts end to end: `tollgate serve` with a webhook channel and threshold rules in its
//! config, a real local HTTP receiver, events pushing a pool past its thresholds. Each alert
//! arrives once, signed; an alert whose delivery failed before a SIGKILL arrives after the
//! restart; a threshold crossed just before a SIGKILL, or while no server ran, fires at the
//! next start with no further traffic; a receiver that stalls delays no other delivery.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const TOKEN: &str = "tga_alerts-test-admin-token";
const SECRET: &str = "webhook-secret";

type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver on `port` that records every POST and answers 200.
async fn receiver(port: u16) -> Seen {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    seen.lock().unwrap().push((headers, body.to_vec()));
                    "ok"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    seen
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Serve {
    child: Child,
    base: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(dir: &Path, hook_port: u16) -> Serve {
    let config = format!(
        r#"
[[channel]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/hook"
secret_env = "ALERT_SECRET"

[[alert]]
kind = "threshold"
pool = "programmatic"
percent = [50, 80]
channels = ["ops"]
"#
    );
    serve_with(dir, &config).await
}

/// `tollgate serve` in `dir` on the database `dir/t.db`, with `config` as its tollgate.toml.
async fn serve_with(dir: &Path, config: &str) -> Serve {
    let config_path = dir.join("tollgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .current_dir(dir)
        .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_DB", dir.join("t.db"))
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .env("ALERT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Serve { child, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    for _ in 0..400 {
        if http.get(format!("{}/healthz", s.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tollgate serve did not come up");
}

async fn post(s: &Serve, path: &str, body: Value) -> Value {
    let r =
        reqwest::Client::new().post(format!("{}{path}", s.base)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// An Opus 4.1 event ($15 / MTok in): `input` million tokens cost $15 each.
fn event(id: &str, input_millions: u64) -> Value {
    json!({"id": id, "account": "acme", "pool": "programmatic", "model": "claude-opus-4-1",
           "usage": {"input_tokens": input_millions * 1_000_000, "output_tokens": 0}})
}

/// Waits until `seen` holds `n` deliveries (or 15 s), then returns them parsed.
async fn wait_for(seen: &Seen, n: usize) -> Vec<(HeaderMap, Vec<u8>, Value)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.lock().unwrap().iter().map(|(h, b)| (h.clone(), b.clone(), serde_json::from_slice(b).unwrap())).collect()
}

fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    headers["x-tollgate-signature"].to_str().unwrap() == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_crossed_by_concurrent_events_each_fire_once_signed() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let seen = receiver(hook_port).await;
    let s = serve(dir.path(), hook_port).await;
    post(&s, "/api/v1/accounts", json!({"id": "acme", "tier": "team-standard"})).await;
    // $50 programmatic limit: 16 concurrent $2.25 events (0.15 M tokens each) take it to $36
    // (72 %), crossing 50 % once; then $9 more crosses 80 %.
    let events: Vec<_> = (0..16)
        .map(|i| {
            let s = &s;
            async move {
                let mut e = event(&format!("a{i}"), 0);
                e["usage"]["input_tokens"] = json!(150_000);
                post(s, "/api/v1/events", e).await
            }
        })
        .collect();
    futures_util::future::join_all(events).await;
    let first = wait_for(&seen, 1).await;
    assert_eq!(first.len(), 1, "one alert for 50 %");
    post(&s, "/api/v1/events", event("b", 0)).await;
    let mut e = event("c", 0);
    e["usage"]["input_tokens"] = json!(600_000);
    post(&s, "/api/v1/events", e).await;
    let got = wait_for(&seen, 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_later = seen.lock().unwrap().len();
    assert_eq!(got_later, 2, "each threshold fires once, however many events cross it");
    let percents: Vec<u64> = got.iter().map(|(_, _, v)| v["percent"].as_u64().unwrap()).collect();
    assert_eq!(percents, [50, 80]);
    for (headers, body, v) in &got {
        assert!(signature_ok(headers, body), "the signature verifies with the secret");
        assert_eq!(headers["x-tollgate-event-id"].to_str().unwrap(), v["id"].as_str().unwrap());
        assert_eq!(v["kind"], "threshold");
        assert_eq!(v["account"], "acme");
        assert_eq!(v["limit_usd"], "50");
        assert_eq!(v["cycle"]["end"].as_str().map(|e| e.len() > 10), Some(true));
    }
    assert_eq!(got[1].2["message"], "acme programmatic pool passed 80% of its $50.00 limit");
    // The history through the API.
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/alerts?account=acme", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let history: Value = r.json().await.unwrap();
    assert_eq!(history["alerts"].as_array().map(Vec::len), Some(2), "{history}");

    // The CLI: history, rules, a test delivery that reaches the receiver.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("TOLLGATE_SERVER", &s.base)
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, _) = cli(&["alerts", "list", "acme", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["alerts"].as_array().map(Vec::len), Some(2));
    let (code, out, _) = cli(&["alerts", "rules"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("config-1") && out.contains("threshold") && out.contains("ops"), "{out}");
    let (code, out, err) = cli(&["alerts", "test", "ops"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("delivered"), "{out}");
    assert_eq!(seen.lock().unwrap().len(), 3, "the test alert reached the receiver");
    let (code, _, err) = cli(&["alerts", "test", "nowhere"]);
    assert_eq!(code, Some(2), "an unknown channel is a usage error");
    assert!(err.contains("unknown channel"), "{err}");

    // Bad rules through the API are refused with what to fix; nothing is saved.
    let bad = [
        (json!({"id": "r1", "kind": "threshold", "pool": "batch"}), "interactive or programmatic"),
        (json!({"id": "r1", "kind": "threshold", "percent": [120]}), "between 1 and 100"),
        (json!({"id": "r1", "kind": "threshold", "percent": [-5]}), "between 1 and 100"),
        (json!({"id": "r1", "kind": "spike", "window_s": 0, "factor": "3"}), "window_s"),
        (json!({"id": "r1", "kind": "spike", "window_s": 60}), "factor"),
        (json!({"id": "r1", "kind": "sometimes"}), "unknown alert kind"),
        (json!({"id": "r1", "kind": "cap_hit", "channels": ["nope"]}), "unknown channel"),
        (json!({"id": "config-1", "kind": "cap_hit"}), "tollgate.toml"),
    ];
    let http = reqwest::Client::new();
    for (body, want) in bad {
        let r =
            http.post(format!("{}/api/v1/alert-rules", s.base)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(want), "{body}: {message:?} should say {want:?}");
    }
    let (_, out, _) = cli(&["alerts", "rules", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["rules"].as_array().map(Vec::len), Some(1), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_not_delivered_before_a_sigkill_is_delivered_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let s = serve(dir.path(), hook_port).await;
    post(&s, "/api/v1/accounts", json!({"id": "acme", "tier": "team-standard"})).await;
    // $30: past 50 %. The receiver is down: the first delivery fails.
    post(&s, "/api/v1/events", event("a", 2)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(s); // SIGKILL
    let seen = receiver(hook_port).await;
    assert!(seen.lock().unwrap().is_empty());
    let _s = serve(dir.path(), hook_port).await;
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1, "delivered after the restart");
    assert_eq!(got[0].2["percent"], 50);
    assert!(signature_ok(&got[0].0, &got[0].1));
}

/// A config with one rule: the programmatic pool reached 100 % of its limit, to `ops`.
fn limit_reached_config(hook_port: u16) -> String {
    format!(
        r#"
[[channel]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/hook"
secret_env = "ALERT_SECRET"

[[alert]]
kind = "threshold"
pool = "programmatic"
percent = [100]
channels = ["ops"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_crossed_just_before_a_sigkill_fires_after_the_restart_with_no_more_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let seen = receiver(hook_port).await;
    let config = limit_reached_config(hook_port);
    let s = serve_with(dir.path(), &config).await;
    post(&s, "/api/v1/accounts", json!({"id": "acme", "tier": "team-standard"})).await;
    // $60 on the $50 limit, and SIGKILL at once: before the engine's next look at the pool.
    post(&s, "/api/v1/events", event("a", 4)).await;
    drop(s);
    // No event reaches the pool after the restart: only a scan at start can find the crossing.
    let _s = serve_with(dir.path(), &config).await;
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1, "the 100 % alert arrives after the restart, with no further event");
    assert_eq!(got[0].2["percent"], 100);
    assert_eq!(got[0].2["account"], "acme");
    assert!(signature_ok(&got[0].0, &got[0].1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_while_no_server_ran_fire_their_threshold_at_the_start() {
    use tollgate_store::Store;
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let seen = receiver(hook_port).await;
    {
        // The store directly, no engine: the account and $60 of events on its $50 limit.
        let store = tollgate_sqlite::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let now = chrono::Utc::now();
        let account = tollgate_store::NewAccount {
            id: "acme".into(),
            tier: "team-standard".into(),
            anchor: None,
            timezone: chrono_tz::UTC,
            interactive_grant: None,
            programmatic_grant: None,
        };
        store.create_account(account, now).await.unwrap();
        let event = tollgate_store::NewEvent {
            id: "written-offline".into(),
            account: "acme".into(),
            pool: tollgate_core::PoolKind::Programmatic,
            model: "claude-opus-4-1".into(),
            usage: tollgate_core::Usage { input_tokens: 4_000_000, ..Default::default() },
            cost: tollgate_core::Nanos::from_usd(60),
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: None,
            key: None,
            labels: Default::default(),
            timestamp: now,
            latency_ms: None,
            ttft_ms: None,
            partial: false,
            estimated: false,
            fingerprint: "written-offline".into(),
        };
        store.record_events(vec![event], now).await.unwrap();
    }
    let _s = serve_with(dir.path(), &limit_reached_config(hook_port)).await;
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1, "the 100 % alert fires at the start, with no event seen by the server");
    assert_eq!(got[0].2["percent"], 100);
    assert_eq!(got[0].2["used_usd"], "60");
}

/// A webhook receiver that reads each request whole, answers a status line and headers that
/// announce a body, and never sends that body. Counts the requests it read and the connections
/// the sender closed (gave up on).
#[derive(Default)]
struct Stall {
    requests: AtomicUsize,
    closed: AtomicUsize,
}

fn stalling_receiver() -> (u16, Arc<Stall>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stall = Arc::new(Stall::default());
    let counts = stall.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let counts = counts.clone();
            std::thread::spawn(move || {
                if !read_request(&mut conn) {
                    return;
                }
                counts.requests.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 64\r\n\r\n");
                let mut buf = [0u8; 1024];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, stall)
}

/// Reads one HTTP/1.1 request: its head, then the body its content-length announces.
fn read_request(conn: &mut std::net::TcpStream) -> bool {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return true;
            }
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// Polls `done` until it holds. The minute only keeps a build without the fix from hanging the
/// test run: it is no bound under test.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "still waiting after a minute: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_stalls_delays_no_other_delivery_and_a_test_send_to_it_stops_at_10_s() {
    let dir = tempfile::tempdir().unwrap();
    let (stall_port, stall) = stalling_receiver();
    let hook_port = free_port();
    let seen = receiver(hook_port).await;
    let config = format!(
        r#"
[[channel]]
name = "slow"
kind = "webhook"
url = "http://127.0.0.1:{stall_port}/hook"

[[channel]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/hook"
secret_env = "ALERT_SECRET"

[[alert]]
kind = "threshold"
account = "slow"
pool = "programmatic"
percent = [50]
channels = ["slow"]

[[alert]]
kind = "threshold"
account = "acme"
pool = "programmatic"
percent = [50]
channels = ["ops"]
"#
    );
    let s = serve_with(dir.path(), &config).await;
    post(&s, "/api/v1/accounts", json!({"id": "slow", "tier": "team-standard"})).await;
    post(&s, "/api/v1/accounts", json!({"id": "acme", "tier": "team-standard"})).await;
    // slow's alert first: its delivery reaches the receiver that stalls.
    let mut e = event("s", 2);
    e["account"] = json!("slow");
    post(&s, "/api/v1/events", e).await;
    until("the stalling receiver gets slow's alert", || stall.requests.load(Ordering::SeqCst) >= 1).await;
    // acme's alert, while slow's delivery hangs: it arrives before that delivery ends.
    post(&s, "/api/v1/events", event("a", 2)).await;
    until("acme's alert arrives, or slow's stalled delivery ends", || {
        !seen.lock().unwrap().is_empty() || stall.closed.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(stall.closed.load(Ordering::SeqCst), 0, "acme's alert waited for slow's stalled delivery to end");
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2["account"], "acme");

    // A test send through the stalling channel fails, naming the 10 s bound.
    let mut cli = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["alerts", "test", "slow"])
        .env("TOLLGATE_SERVER", &s.base)
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = cli.kill();
            panic!("`tollgate alerts test slow` still waits after a minute: the test send has no bound");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not delivered") && err.contains("10 s"), "{err}");
    // slow's delivery gave up at its bound too, and is tried again.
    until("slow's delivery is tried again", || stall.requests.load(Ordering::SeqCst) >= 3).await;
}
