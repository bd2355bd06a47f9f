//! The gateway end to end: a real SQLite store, the gateway on a real socket, the testkit's mock
//! upstream behind it, reqwest as the client. Every test checks the ledger afterwards.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, PriceTable};
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{KeyPool, NewAccount, NewKey, Store, hash_secret};
use tollgate_testkit::MockUpstream;

const SECRET: &str = "tg-test-secret";

struct Harness {
    url: String,
    clock: tollgate_gateway::Clock,
    store: Arc<dyn Store>,
    gateway: Arc<Gateway>,
    mock: MockUpstream,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().expect("a real time")
}

/// An account "acme" on team-standard ($100 interactive, $50 programmatic, block), one key
/// (pool `auto`), the gateway in front of the mock, at a fixed time.
async fn harness() -> Harness {
    harness_with(Arc::new(now), |_| {}).await
}

async fn harness_with(clock: tollgate_gateway::Clock, configure: impl FnOnce(&mut Settings)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).expect("store"));
    let anchor = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single();
    let account = NewAccount {
        id: "acme".into(),
        tier: "team-standard".into(),
        anchor,
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, now()).await.expect("account");
    let key = NewKey {
        id: "key-1".into(),
        account: "acme".into(),
        name: None,
        secret_hash: hash_secret(SECRET),
        pool: KeyPool::Auto,
        labels: Default::default(),
        cap: None,
    };
    store.create_key(key, now()).await.expect("key");
    let mock = MockUpstream::start().await;
    let upstream = |name: &str, kind, models: &str| Upstream {
        name: name.into(),
        kind,
        base_url: mock.base_url(),
        api_key: Some("upstream-secret".into()),
        models: vec![models.into()],
        auth: Auth::Gateway,
    };
    let mut settings = Settings {
        upstreams: vec![upstream("anthropic", Kind::Anthropic, "claude-*"), upstream("openai", Kind::OpenAi, "gpt-*")],
        ..Settings::default()
    };
    configure(&mut settings);
    let gateway = Arc::new(Gateway::new(store.clone(), Arc::new(PriceTable::builtin()), clock.clone(), settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let routes = tollgate_gateway::routes(gateway.clone());
    tokio::spawn(async move { axum::serve(listener, routes).await.expect("serve") });
    Harness { url, clock, store, gateway, mock, client: reqwest::Client::new(), _dir: dir }
}

impl Harness {
    fn messages(&self, body: Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/messages?beta=true", self.url))
            .header("x-api-key", SECRET)
            .header("anthropic-version", "2023-06-01")
            .header("user-agent", "claude-cli/2.1.332 (external, sdk-cli)")
            .json(&body)
    }

    /// The programmatic pool's (used + overage, held), once no hold is open or after 5 s.
    async fn programmatic(&self) -> (Nanos, Nanos) {
        for _ in 0..100 {
            let b = self.store.balance("acme", (self.clock)()).await.expect("balance");
            let p = b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool").clone();
            if p.held == Nanos::ZERO {
                return (p.used.saturating_add(p.overage), p.held);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let b = self.store.balance("acme", (self.clock)()).await.expect("balance");
        let p = b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool").clone();
        (p.used.saturating_add(p.overage), p.held)
    }

    async fn events(&self) -> Vec<tollgate_store::Event> {
        let query = tollgate_store::EventQuery {
            account: "acme".into(),
            pool: None,
            model: None,
            since: None,
            until: None,
            after_seq: None,
            limit: 10_000,
        };
        self.store.events(query).await.expect("events")
    }
}

fn sonnet(stream: bool) -> Value {
    json!({"model":"claude-sonnet-4-5","max_tokens":1000,"stream":stream,"messages":[{"role":"user","content":"hi"}]})
}

/// Sonnet 4.5: $3 / MTok in, $15 / MTok out. 100 in + 20 out = 300,000 + 300,000 nano-USD.
const SONNET_100_20: Nanos = Nanos(600_000);

#[tokio::test]
async fn json_call_is_charged_its_exact_cost() {
    let h = harness().await;
    let r = h.messages(sonnet(false)).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-pool"], "programmatic");
    assert!(r.headers()["x-tollgate-request-id"].to_str().unwrap().starts_with("tgr_"));
    assert!(r.headers().contains_key("x-tollgate-remaining-usd"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["content"][0]["text"], "Hello from the mock upstream.");
    assert_eq!(h.programmatic().await, (SONNET_100_20, Nanos::ZERO));
    let events = h.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].usage.input_tokens, events[0].usage.output_tokens), (100, 20));
    assert_eq!(events[0].source.as_deref(), Some("ua:sdk-cli"));
    // The upstream saw its own key, never the tollgate key, and the query string.
    let seen = &h.mock.received()[0];
    assert_eq!(seen.headers["x-api-key"], "upstream-secret");
    assert_eq!(seen.path_and_query, "/v1/messages?beta=true");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
}

#[tokio::test]
async fn streamed_call_is_charged_from_the_final_cumulative_usage() {
    let h = harness().await;
    let r = h.messages(sonnet(true)).header("x-mock-usage", "1000,300,200,100,5000,1").send().await.expect("sent");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(text.contains("event: message_stop"), "{text}");
    // 1000 × 3,000 + 300 × 15,000 + 200 × 3,750 + 100 × 6,000 + 5000 × 300 + 1 search × 10,000,000
    let want = Nanos(3_000_000 + 4_500_000 + 750_000 + 600_000 + 1_500_000 + 10_000_000);
    assert_eq!(h.programmatic().await, (want, Nanos::ZERO));
    assert!(!h.events().await[0].partial);
}

#[tokio::test]
async fn upstream_errors_are_forwarded_and_not_billed() {
    let h = harness().await;
    for status in [529u16, 500, 400] {
        let r = h.messages(sonnet(false)).header("x-mock-status", status.to_string()).send().await.expect("sent");
        assert_eq!(r.status().as_u16(), status);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["message"], format!("mock {status}"));
    }
    assert_eq!(h.programmatic().await, (Nanos::ZERO, Nanos::ZERO));
    assert!(h.events().await.is_empty());
}

#[tokio::test]
async fn a_cut_stream_settles_what_was_seen_as_partial() {
    let h = harness().await;
    // Cut after message_start, content_block_start, ping and the first delta ("Hello from ", 11 bytes).
    let r = h.messages(sonnet(true)).header("x-mock-cut-after", "4").send().await.expect("sent");
    assert!(r.text().await.is_err(), "the client sees the cut");
    // input 100 from message_start; output max(1, ⌈11 / 3⌉ = 4) = 4 → 300,000 + 60,000.
    assert_eq!(h.programmatic().await, (Nanos(360_000), Nanos::ZERO));
    let events = h.events().await;
    assert!(events[0].partial);
    assert_eq!(events[0].usage.output_tokens, 4);
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_not_billed() {
    let h = harness().await;
    // A model served by no running upstream: point a fresh gateway at a closed port.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let settings = Settings {
        upstreams: vec![Upstream {
            name: "down".into(),
            kind: Kind::Anthropic,
            base_url: format!("http://{closed}"),
            api_key: None,
            models: vec!["*".into()],
            auth: Auth::Gateway,
        }],
        ..Settings::default()
    };
    let gateway = Arc::new(Gateway::new(h.store.clone(), Arc::new(PriceTable::builtin()), Arc::new(now), settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, tollgate_gateway::routes(gateway)).await.unwrap() });
    let r = h
        .client
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", SECRET)
        .json(&sonnet(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(h.programmatic().await, (Nanos::ZERO, Nanos::ZERO));
}

#[tokio::test]
async fn bad_calls_get_the_apis_error_format() {
    let h = harness().await;
    let r = h
        .client
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", "nope")
        .json(&sonnet(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    let r = h.messages(json!({"model":"claude-unknown-9","max_tokens":10,"messages":[]})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("claude-unknown-9"), "{body}");
    let r =
        h.client.post(format!("{}/v1/messages", h.url)).header("x-api-key", SECRET).body("{oops").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(h.mock.received().is_empty(), "nothing bad reached the upstream");
}

async fn set_block_limit(h: &Harness, grant_left: Nanos) {
    // Programmatic pool: grant $50, block. Use all but `grant_left` with a direct event.
    let policy = PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None };
    h.store.set_policy("acme", PoolKind::Programmatic, policy).await.unwrap();
    let used = Nanos(Nanos::from_usd(50).0 - grant_left.0);
    let event = tollgate_store::NewEvent {
        id: "burn".into(),
        account: "acme".into(),
        pool: PoolKind::Programmatic,
        model: "claude-sonnet-4-5".into(),
        usage: Default::default(),
        cost: used,
        service_tier: None,
        inference_geo: None,
        speed: None,
        source: None,
        key: None,
        labels: Default::default(),
        timestamp: now(),
        latency_ms: None,
        ttft_ms: None,
        partial: false,
        estimated: false,
        fingerprint: "burn".into(),
    };
    h.store.record_events(vec![event], now()).await.unwrap();
}

#[tokio::test]
async fn refusal_is_a_429_billing_error_that_says_when_it_resets() {
    let h = harness().await;
    set_block_limit(&h, Nanos(1_000)).await;
    let r = h.messages(sonnet(false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    // Now is 2026-11-10T12:00Z; the cycle resets 2026-12-01T00:00Z: 20.5 days.
    assert_eq!(r.headers()["retry-after"], (20 * 86_400 + 12 * 3_600).to_string());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "billing_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("programmatic credits of account acme exhausted") && message.contains("2026-12-01T00:00:00Z"),
        "{message}"
    );
    assert!(
        h.mock.received().iter().all(|r| !r.path_and_query.starts_with("/v1/messages?")),
        "a refused call is not forwarded"
    );
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(SECRET)
        .json(&json!({"model":"gpt-5","max_completion_tokens":1000,"messages":[]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
}

#[tokio::test]
async fn a_claude_code_call_near_the_end_of_a_pool_is_fitted_not_refused() {
    let h = harness().await;
    set_block_limit(&h, Nanos(500_000_000)).await;
    let body = json!({"model":"claude-opus-5-5","max_tokens":128000,"stream":true,
        "messages":[{"role":"user","content":"Write a haiku about budgets."}]});
    let r =
        h.messages(body).header("x-mock-input-tokens", "2000").header("x-mock-usage", "2000,500").send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    let clamped: u64 = r.headers()["x-tollgate-max-tokens-clamped"].to_str().unwrap().parse().unwrap();
    assert!((1_024..128_000).contains(&clamped), "{clamped}");
    r.text().await.unwrap();
    let forwarded = h.mock.received().into_iter().find(|r| r.path_and_query.starts_with("/v1/messages?")).unwrap();
    assert_eq!(forwarded.body["max_tokens"].as_u64(), Some(clamped));
    // Opus 5.5: $4 in, $20 out: 2000 × 4,000 + 500 × 20,000 = 18,000,000 nano-USD.
    let (charged, held) = h.programmatic().await;
    assert_eq!(held, Nanos::ZERO);
    assert_eq!(charged, Nanos(50_000_000_000 - 500_000_000 + 18_000_000));
    assert!(charged <= Nanos::from_usd(50));
}

#[tokio::test]
async fn openai_stream_usage_chunk_is_requested_and_hidden() {
    let h = harness().await;
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(SECRET)
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("x-mock-usage", "1000,50,0,0,600")
        .json(&json!({"model":"gpt-5","stream":true,"max_completion_tokens":500,"messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("[DONE]") && !text.contains("\"usage\":{"), "{text}");
    let seen = h.mock.received();
    assert_eq!(seen[0].body["stream_options"]["include_usage"], Value::Bool(true));
    assert_eq!(seen[0].headers["authorization"], "Bearer upstream-secret");
    // gpt-5: $1.25 in, $0.125 cached, $10 out; prompt 1600 incl. 600 cached:
    // 1000 × 1,250 + 600 × 125 + 50 × 10,000 = 1,250,000 + 75,000 + 500,000.
    assert_eq!(h.programmatic().await, (Nanos(1_825_000), Nanos::ZERO));
    assert_eq!(h.events().await[0].source.as_deref(), Some("ua:openai-sdk"));
}

#[tokio::test]
async fn streaming_is_not_buffered() {
    let h = harness().await;
    let started = std::time::Instant::now();
    let r = h.messages(sonnet(true)).header("x-mock-delay-ms", "200").send().await.unwrap();
    let mut stream = r.bytes_stream();
    let first = futures_util::StreamExt::next(&mut stream).await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    while futures_util::StreamExt::next(&mut stream).await.is_some() {}
    let all_at = started.elapsed();
    // 8 events 200 ms apart: the first arrives after one delay, the whole after eight.
    assert!(all_at >= first_at + Duration::from_millis(1_000), "first {first_at:?}, all {all_at:?}");
}

#[tokio::test]
async fn client_disconnect_mid_stream_settles_what_was_seen() {
    let h = harness().await;
    let r = h.messages(sonnet(true)).header("x-mock-delay-ms", "100").send().await.unwrap();
    let mut stream = r.bytes_stream();
    futures_util::StreamExt::next(&mut stream).await.unwrap().unwrap();
    drop(stream);
    let (charged, held) = h.programmatic().await;
    assert_eq!(held, Nanos::ZERO);
    // message_start was seen (100 in, 1 out); the rest was not: 300,000 + 15,000.
    assert_eq!(charged, Nanos(315_000));
    assert!(h.events().await[0].partial);
}

/// 1,000 concurrent calls that each use their whole output bound; every one not admitted must
/// be a 429 `billing_error` that says not to retry. Returns how many were admitted.
async fn thousand_calls_at_full_cost(h: &Harness) -> usize {
    let calls = (0..1_000).map(|_| h.messages(sonnet(false)).header("x-mock-usage", "100,1000").send());
    let results = futures_util::future::join_all(calls).await;
    let mut ok = 0;
    for r in results {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(r.headers()["x-should-retry"], "false");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["type"], "billing_error");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    ok
}

/// Once nothing is held: charged ≤ the $50 limit, charged = Σ events, and one event per admitted
/// call plus the burn. Returns the charged total and the events.
async fn assert_exact_and_released(h: &Harness, ok: usize) -> (Nanos, Vec<tollgate_store::Event>) {
    let (charged, held) = h.programmatic().await;
    assert_eq!(held, Nanos::ZERO);
    assert!(charged <= Nanos::from_usd(50), "charged {charged} passed the $50 limit");
    let events = h.events().await;
    let sum = events.iter().fold(Nanos::ZERO, |s, e| s.saturating_add(e.grant_part).saturating_add(e.overage_part));
    assert_eq!(sum, charged, "charged = Σ events");
    assert_eq!(events.len(), ok + 1, "one event per admitted call, plus the burn");
    (charged, events)
}

#[tokio::test]
async fn a_thousand_concurrent_calls_never_pass_the_limit() {
    let h = harness().await;
    // Each call's worst case: body ≈ 120 bytes × $6 (1h write) + 1000 × $15 ≈ $0.0157; room for ~10.
    set_block_limit(&h, Nanos(160_000_000)).await;
    // Each call uses its whole output bound, so it costs nearly its worst case: exactly 10 fit.
    let ok = thousand_calls_at_full_cost(&h).await;
    assert_exact_and_released(&h, ok).await;
    // Worst case ≈ $0.01566, cost $0.0153: after 10 calls $0.007 is left, less than one worst case.
    assert_eq!(ok, 10);
}

/// Waits until the gateway holds a lease (and no call): the programmatic pool holds exactly $1,
/// and the gateway has filed the lease for its calls (a moment after the store's write).
async fn wait_for_lease(h: &Harness) {
    for _ in 0..100 {
        let b = h.store.balance("acme", (h.clock)()).await.expect("balance");
        let p = b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool").clone();
        if p.held == Nanos::from_usd(1) && h.gateway.leases_open() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway took no lease");
}

#[tokio::test]
async fn small_calls_run_on_a_lease_and_every_one_is_charged_once() {
    let h = harness().await;
    let first = h.messages(sonnet(false)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.text().await.unwrap();
    wait_for_lease(&h).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let r = h.messages(sonnet(i % 3 == 0)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        ids.push(r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string());
        assert!(r.headers().contains_key("x-tollgate-remaining-usd"), "calls on a lease say what remains");
        r.text().await.unwrap();
    }
    // Unbilled ends give their part back without a write.
    for status in ["500", "529"] {
        let r = h.messages(sonnet(false)).header("x-mock-status", status).send().await.unwrap();
        assert_eq!(r.status().as_u16().to_string(), status);
        r.text().await.unwrap();
    }
    // Settles land after the bodies end, and the idle lease is voided after 2 s: once nothing is
    // held, the pool was charged exactly 31 calls.
    assert_eq!(h.programmatic().await, (Nanos(SONNET_100_20.0 * 31), Nanos::ZERO));
    let events = h.events().await;
    assert_eq!(events.len(), 31, "one event per billed call");
    for id in &ids {
        let e = events.iter().find(|e| &e.id == id).unwrap_or_else(|| panic!("no event for call {id}"));
        assert!(e.hold_id.as_deref().is_some_and(|h| h.starts_with("lease_")), "call {id} ran on the lease");
        assert_eq!(e.charged(), SONNET_100_20, "call {id} charged its own cost");
    }
    let audit = h.store.audit().await.unwrap();
    assert!(audit.breaches.is_empty(), "{:?}", audit.breaches);
}

#[tokio::test]
async fn a_closing_gateway_voids_its_leases() {
    let h = harness_with(Arc::new(now), |s| s.lease = Nanos::from_usd(2)).await;
    h.messages(sonnet(false)).send().await.unwrap().text().await.unwrap();
    let mut leased = false;
    for _ in 0..250 {
        let b = h.store.balance("acme", now()).await.unwrap();
        leased = b.pools.iter().any(|p| p.held == Nanos::from_usd(2));
        if leased {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(leased, "the gateway took a $2 lease after the first call");
    h.gateway.close().await;
    let b = h.store.balance("acme", now()).await.unwrap();
    assert!(b.pools.iter().all(|p| p.held == Nanos::ZERO), "close voids the lease at once: {:?}", b.pools);
}

#[tokio::test]
async fn a_thousand_concurrent_calls_on_leases_never_pass_the_limit() {
    let h = harness().await;
    // $10 left: room for leases (each $1, taken while ≥ $8 remains) and ~650 calls of $0.0153.
    set_block_limit(&h, Nanos::from_usd(10)).await;
    let warm = h.messages(sonnet(false)).header("x-mock-usage", "100,1000").send().await.unwrap();
    warm.text().await.unwrap();
    wait_for_lease(&h).await;
    let mut ok = 1 + thousand_calls_at_full_cost(&h).await;
    // Calls in flight hold their worst case ($0.01566, against a cost of $0.0153), so under a
    // loaded CPU the burst can refuse the last call that would fit. Then calls one at a time,
    // until the first refusal, use what is left: nothing may stay stuck in a lease.
    loop {
        let r = h.messages(sonnet(false)).header("x-mock-usage", "100,1000").send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => break,
            other => panic!("unexpected status {other}"),
        }
        r.text().await.unwrap();
    }
    let (charged, events) = assert_exact_and_released(&h, ok).await;
    assert!(events.iter().any(|e| e.hold_id.as_deref().is_some_and(|h| h.starts_with("lease_"))), "leases were used");
    // Each call costs 100 × $3/MTok + 1000 × $15/MTok = $0.0153: $10 pays for 653 of them
    // ($0.0091 left, less than a call's worst case), and no lease keeps any of it from a call.
    assert_eq!((ok, Nanos(Nanos::from_usd(50).0 - charged.0)), (653, Nanos(9_100_000)));
}

#[tokio::test]
async fn a_running_stream_keeps_its_hold_alive() {
    // Real time, holds that live 1 s, a stream of 8 events 300 ms apart (2.4 s), and a sweeper
    // expiring holds every 500 ms meanwhile: the stream's hold must never be expired.
    // Leases off: the stream's own hold is what must stay alive.
    let h = harness_with(Arc::new(Utc::now), |s| {
        s.hold_ttl_s = 1;
        s.lease = Nanos::ZERO;
    })
    .await;
    let store = h.store.clone();
    let sweeper = tokio::spawn(async move {
        let mut expired = 0;
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            expired += store.expire_holds(Utc::now()).await.expect("sweep").len();
        }
        expired
    });
    let r = h.messages(sonnet(true)).header("x-mock-delay-ms", "300").send().await.unwrap();
    assert!(r.text().await.unwrap().contains("message_stop"));
    assert_eq!(sweeper.await.unwrap(), 0, "no hold expired while its stream ran");
    assert_eq!(h.programmatic().await, (SONNET_100_20, Nanos::ZERO));
    let events = h.events().await;
    assert_eq!(events.len(), 1);
    assert!(!events[0].unsettled && !events[0].partial);
}

#[tokio::test]
async fn a_configured_header_rule_picks_the_pool_before_the_user_agent() {
    let rule = tollgate_gateway::PoolRule {
        name: "humans".into(),
        header: axum::http::HeaderName::from_static("x-team"),
        value: "design-*".into(),
        pool: PoolKind::Interactive,
    };
    let h = harness_with(Arc::new(now), |s| s.rules = vec![rule]).await;
    // The User-Agent says sdk-cli (programmatic); the rule matches first.
    let r = h.messages(sonnet(false)).header("x-team", "design-web").send().await.unwrap();
    assert_eq!(r.headers()["x-tollgate-pool"], "interactive");
    r.text().await.unwrap();
    // Not matching the glob: the User-Agent rule decides.
    let r = h.messages(sonnet(false)).header("x-team", "infra").send().await.unwrap();
    assert_eq!(r.headers()["x-tollgate-pool"], "programmatic");
    r.text().await.unwrap();
    h.programmatic().await;
    let mut sources: Vec<_> = h.events().await.into_iter().map(|e| (e.pool, e.source.unwrap_or_default())).collect();
    sources.sort_by_key(|(p, _)| p.as_str());
    assert_eq!(
        sources,
        vec![(PoolKind::Interactive, "rule:humans".to_string()), (PoolKind::Programmatic, "ua:sdk-cli".to_string())]
    );
}

#[tokio::test]
async fn bodies_over_the_gateway_limit_are_413_and_large_ones_under_it_pass() {
    let h = harness_with(Arc::new(now), |s| s.body_size_bytes_max = 3 * 1024 * 1024).await;
    let big = "x".repeat(2_500_000);
    let ok = json!({"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":big}]});
    let r = h.messages(ok).send().await.unwrap();
    assert_eq!(r.status(), 200, "a 2.5 MB body is under the 3 MiB limit");
    r.text().await.unwrap();
    let bigger = "x".repeat(3_200_000);
    let r = h
        .messages(json!({"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":bigger}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "request_too_large");
    assert!(body["error"]["message"].as_str().unwrap().contains("3145728 bytes"));
}

#[tokio::test]
async fn claude_code_warning_headers_once_a_pool_passes_75_percent() {
    let h = harness_with(Arc::new(now), |s| s.claude_code_warnings = true).await;
    let r = h.messages(sonnet(false)).send().await.unwrap();
    assert!(!r.headers().contains_key("anthropic-ratelimit-unified-status"), "nearly nothing used yet");
    r.text().await.unwrap();
    // $40 of $50 used: 80 %.
    set_block_limit(&h, Nanos::from_usd(10)).await;
    let r = h.messages(sonnet(false)).send().await.unwrap();
    assert_eq!(r.headers()["anthropic-ratelimit-unified-status"], "allowed_warning");
    assert_eq!(r.headers()["anthropic-ratelimit-unified-7d-utilization"], "0.80");
    // The cycle ends 2026-12-01T00:00:00Z.
    assert_eq!(r.headers()["anthropic-ratelimit-unified-reset"], "1796083200");
}

#[tokio::test]
async fn metrics_count_calls_tokens_spend_refusals_and_pools() {
    let h = harness_with(Arc::new(now), |s| s.metrics_token_digest = Some(hash_secret("admin-token"))).await;
    let r = h.messages(sonnet(false)).send().await.unwrap();
    r.text().await.unwrap();
    let r = h.messages(sonnet(false)).header("x-mock-status", "529").send().await.unwrap();
    r.text().await.unwrap();
    h.programmatic().await;
    set_block_limit(&h, Nanos(1_000)).await;
    assert_eq!(h.messages(sonnet(false)).send().await.unwrap().status(), 429);

    let url = format!("{}/metrics", h.url);
    assert_eq!(h.client.get(&url).send().await.unwrap().status(), 401, "the metrics name accounts: admin only");
    let r = h.client.get(&url).bearer_auth("admin-token").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    let value = |series: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
            .to_string()
    };
    let sonnet = r#"pool="programmatic",model="claude-sonnet-4-5""#;
    assert_eq!(value(&format!("tollgate_gateway_calls_total{{{sonnet},outcome=\"ok\"}}")), "1");
    assert_eq!(value(&format!("tollgate_gateway_calls_total{{{sonnet},outcome=\"upstream_error\"}}")), "1");
    assert_eq!(value(&format!("tollgate_gateway_tokens_total{{{sonnet},type=\"input\"}}")), "100");
    assert_eq!(value(&format!("tollgate_gateway_tokens_total{{{sonnet},type=\"output\"}}")), "20");
    assert_eq!(value(&format!("tollgate_gateway_spend_nano_usd_total{{{sonnet}}}")), "600000");
    assert_eq!(value(r#"tollgate_gateway_refusals_total{pool="programmatic",reason="pool_exhausted"}"#), "1");
    assert_eq!(value("tollgate_gateway_holds_open"), "0");
    assert_eq!(value(r#"tollgate_gateway_upstream_latency_seconds_count{api="anthropic"}"#), "2");
    // The burn event of $49.999999 plus the call's 600,000 nano-USD.
    let charged = 50_000_000_000i64 - 1_000 + 600_000;
    assert_eq!(value(r#"tollgate_pool_charged_nano_usd{account="acme",pool="programmatic"}"#), charged.to_string());
    // The burn (a direct event, a fact) was recorded after the call, so the pool is overrun.
    assert_eq!(value(r#"tollgate_pool_remaining_nano_usd{account="acme",pool="programmatic"}"#), "-599000");
    assert_eq!(value(r#"tollgate_pool_held_nano_usd{account="acme",pool="interactive"}"#), "0");
    assert!(text.trim_end().ends_with("# EOF"));
}

/// Issue 12, finding 5: a `block` pool never goes into overage, so a PAYG multiplier above 1 must
/// not raise its calls' holds. With $0.02 left, a × 1.5 account fits the same call a × 1 account
/// fits (Sonnet 4.5 at $15 / MTok out: about 1,333 output tokens), instead of refusing it.
#[tokio::test]
async fn a_block_pool_under_a_payg_multiplier_fits_calls_at_list_price() {
    let h = harness().await;
    let tier = tollgate_core::Tier {
        id: "team-payg-1-5".into(),
        interactive: Nanos::from_usd(100),
        programmatic: Nanos::from_usd(50),
        monthly_price: None,
        payg_multiplier_ppm: 1_500_000,
    };
    h.store.put_tier(tier).await.unwrap();
    let update = tollgate_store::AccountUpdate { tier: Some("team-payg-1-5".into()), ..Default::default() };
    h.store.update_account("acme", update).await.unwrap();
    set_block_limit(&h, Nanos(20_000_000)).await;
    let body = json!({"model":"claude-sonnet-4-5","max_tokens":4000,"messages":[{"role":"user","content":"hi"}]});
    let r =
        h.messages(body).header("x-mock-input-tokens", "10").header("x-mock-usage", "10,1000").send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    let clamped: u64 = r.headers()["x-tollgate-max-tokens-clamped"].to_str().unwrap().parse().unwrap();
    assert!((1_200..=1_333).contains(&clamped), "clamped at list price, not list × 1.5 (888): {clamped}");
    r.text().await.unwrap();
    // 10 × $3 + 1,000 × $15 per MTok = 15,030,000 nano-USD, from the grant.
    let (charged, held) = h.programmatic().await;
    assert_eq!((charged, held), (Nanos(50_000_000_000 - 20_000_000 + 15_030_000), Nanos::ZERO));
}

/// Issue 12, finding 6: a refusal names the scope that refused and its figures. A key's own cap
/// is not the pool's: the message says so, and the pool's cap alert is not tallied for it.
#[tokio::test]
async fn a_key_cap_refusal_names_the_key_and_is_not_the_pools_cap_hit() {
    let h = harness().await;
    let capped = NewKey {
        id: "ci-bot".into(),
        account: "acme".into(),
        name: None,
        secret_hash: hash_secret("tg-capped-secret"),
        pool: KeyPool::Fixed(PoolKind::Programmatic),
        labels: Default::default(),
        cap: Some(Nanos(10_000_000)),
    };
    h.store.create_key(capped, now()).await.unwrap();
    let r = h
        .client
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", "tg-capped-secret")
        .json(&sonnet(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("key ci-bot of account acme reached its own cap: $0.01 left of its $0.01 cap"),
        "{message}"
    );
    assert!(message.contains("programmatic pool not exhausted"), "{message}");
    let tallies = h.gateway.feed.take_tallies();
    assert!(tallies.iter().all(|(_, t)| t.refused == 0), "no pool refusal tallied: {tallies:?}");

    set_block_limit(&h, Nanos(1_000)).await;
    let r = h.messages(sonnet(false)).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "programmatic credits of account acme exhausted: $0.000001 left of the pool's $50.00 limit (the cycle's grants), $"
        ),
        "{message}"
    );
    let tallies = h.gateway.feed.take_tallies();
    assert_eq!(tallies.iter().map(|(_, t)| t.refused).sum::<u64>(), 1, "the pool's refusal is tallied: {tallies:?}");
}
