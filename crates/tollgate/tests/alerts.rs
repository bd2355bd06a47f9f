//! Alerts end to end: `tollgate serve` with a webhook channel and threshold rules in its
//! config, a real local HTTP receiver, events pushing a pool past its thresholds. Each alert
//! arrives once, signed; an alert whose delivery failed before a SIGKILL arrives after the
//! restart.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
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
percent = [50, 80]
channels = ["ops"]
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
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
    assert_eq!(code, Some(1));
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
