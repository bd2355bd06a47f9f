//! Fault injection on the upstream (issue 13): the real `tollgate serve` in front of the
//! testkit's mock upstream, which misbehaves as a test asks (`x-mock-*` headers). For each fault
//! the client gets a clear answer or a cut stream, every hold ends (nothing held once the calls
//! are over), and what was served is billed by docs/gateway.md's table (docs/RELIABILITY.md §2).
//!
//! Faults covered elsewhere, not repeated here: a body that goes silent mid-stream (Anthropic
//! stream, OpenAI stream, JSON answer: `tollgate-gateway/tests/hostile_upstream.rs`), a stream
//! cut before or after `message_start` and an upstream error status (`billing.rs`,
//! `gateway.rs`). Here: an upstream that never sends its headers, a stream that trickles for
//! longer than a hold's time to live, and an `error` event in the middle of a 2xx stream
//! (what the Anthropic API sends when it fails mid-stream, e.g. `overloaded_error`).

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod serve;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serve::{Client, Server, usd_nanos};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_fault-upstream-admin-token";
/// Short bounds, so the faults end within seconds: the upstream's headers within 2 s, a hold's
/// time to live 2 s (so a body's silence is bounded to 1 s, and a stream is extended past 1 s),
/// the sweeper every second. No leases: each call has a hold of its own, the one that must end.
const SERVER_SECTION: &str = "[server]\nhold_ttl_s = 2\nsweep_interval_s = 1\n\
     [gateway]\nupstream_timeout_s = 2\nlease_usd = \"0\"\n";
/// How long a call may take before it counts as a hang (the gateway's bounds are 2 s).
const PATIENCE: Duration = Duration::from_secs(30);

fn streaming() -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

/// What the client saw: status, request id, whether the body arrived whole, the body's text.
async fn call(c: &Client, secret: &str, headers: &[(&str, &str)]) -> (u16, String, bool, String, Duration) {
    let started = Instant::now();
    let mut request = c.message(secret, streaming());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answered = tokio::time::timeout(PATIENCE, async {
        let r = request.send().await.expect("an answer's headers");
        let status = r.status().as_u16();
        let id = r.headers().get("x-tollgate-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = r.bytes().await;
        let whole = body.is_ok();
        (status, id, whole, String::from_utf8_lossy(&body.unwrap_or_default()).into_owned())
    })
    .await;
    let (status, id, whole, text) = answered.unwrap_or_else(|_| panic!("{headers:?}: no end within {PATIENCE:?}"));
    (status, id, whole, text, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_hold_ends_whatever_the_upstream_does() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let db = dir.path().join("tollgate.db");
    let server = Server::with_mock_on(dir.path(), TOKEN, &mock, db.to_str().unwrap(), SERVER_SECTION).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, secret) = c.key("faults", None).await;

    let (hang, trickle, error_event) = tokio::join!(
        call(&c, &secret, &[("x-mock-hang", "1")]),
        // About 1.3 kB, 4 bytes every 10 ms: several seconds, longer than the hold's 2 s to live.
        call(&c, &secret, &[("x-mock-write-bytes", "4"), ("x-mock-trickle-ms", "10")]),
        call(&c, &secret, &[("x-mock-error-after", "4")]),
    );
    eprintln!("hang before headers: {} after {:?}", hang.0, hang.4);
    eprintln!("trickle: {} whole={} after {:?}", trickle.0, trickle.2, trickle.4);
    eprintln!("error event: {} whole={} after {:?}", error_event.0, error_event.2, error_event.4);

    // Nothing is held once the calls are over (the hang's void and the settles run after the
    // answers; the sweeper would take 2 s more).
    let (charged, held) = c.settled().await;
    assert_eq!(held, 0, "every hold ended; the server's log:\n{}", server.log_text());
    let events = c.events(TOKEN).await;
    let event = |id: &str| events.iter().find(|e| e["id"] == id).cloned();
    let mut failures = Vec::new();

    // Hang before the headers: 504 after the bound, the hold voided, nothing charged.
    if hang.0 != 504 || !hang.3.contains("timeout_error") {
        failures.push(format!("hang: {} {}", hang.0, hang.3));
    }
    if event(&hang.1).is_some() {
        failures.push(format!("hang: charged {:?}", event(&hang.1)));
    }

    // A trickle: served whole, charged exactly what it reported, never expired by the sweeper
    // while it ran (its hold was extended), never cut for silence.
    match event(&trickle.1) {
        Some(e) if trickle.0 == 200 && trickle.2 && trickle.3.contains("message_stop") => {
            let flags = (e["partial"].as_bool(), e["estimated"].as_bool(), e["unsettled"].as_bool());
            if usd_nanos(e["cost_usd"].as_str().unwrap()) != 600_000 || flags != (Some(false), Some(false), Some(false))
            {
                failures.push(format!("trickle: charged {e}"));
            }
        }
        other => failures.push(format!("trickle: {} whole={} event {other:?}", trickle.0, trickle.2)),
    }
    if trickle.4 < Duration::from_secs(2) {
        failures.push(format!("trickle: it took {:?}, not longer than the hold's time to live", trickle.4));
    }

    // An `error` event mid-stream: forwarded to the client in a 200 stream, the call settled
    // (served: never voided) at the input `message_start` reported, flagged partial.
    match event(&error_event.1) {
        Some(e) if error_event.0 == 200 && error_event.3.contains("overloaded_error") => {
            let cost = usd_nanos(e["cost_usd"].as_str().unwrap());
            let read = (e["usage"]["input_tokens"].as_u64(), e["partial"].as_bool(), e["unsettled"].as_bool());
            if read != (Some(100), Some(true), Some(false)) || cost < 300_000 {
                failures.push(format!("error event: charged {e}"));
            }
        }
        other => failures.push(format!("error event: {} {} event {other:?}", error_event.0, error_event.3)),
    }
    assert!(failures.is_empty(), "{}\nevents: {events:?}", failures.join("\n"));
    assert_eq!(charged, events.iter().map(|e| usd_nanos(e["cost_usd"].as_str().unwrap())).sum::<i64>());

    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["check", "--db"]).arg(&db).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "tollgate check: {}", String::from_utf8_lossy(&out.stdout));
}
