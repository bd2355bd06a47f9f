//! How every ending of a call is billed (SPEC section 3, "never bill zero for served work"), and
//! what passthrough forwards (SPEC section 4: tollgate keys never leave tollgate). A real SQLite
//! store, the gateway on a real socket, the testkit's mock upstream behind it, reqwest as the
//! client; every test reads the ledger afterwards.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, PriceTable};
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{Event, EventQuery, KeyPool, NewAccount, NewKey, Store, hash_secret};
use tollgate_testkit::MockUpstream;

const SECRET: &str = "tg-test-secret";

/// Sonnet 4.5, nano-USD per token: $3 / MTok in, $15 / MTok out, $6 / MTok for a 1-hour cache
/// write (the highest input-side price: what a hold's input bound is priced at).
const SONNET_INPUT: i64 = 3_000;
const SONNET_OUTPUT: i64 = 15_000;
const SONNET_INPUT_SIDE_MAX: i64 = 6_000;
/// The mock's text, "Hello from the mock upstream.", is 29 bytes: ⌈29 / 3⌉ = 10 output tokens.
const MOCK_TEXT_TOKENS: i64 = 10;

struct Harness {
    url: String,
    store: Arc<dyn Store>,
    gateway: Arc<Gateway>,
    mock: MockUpstream,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().expect("a real time")
}

/// An account "acme" on team-standard ($50 programmatic), one key (pool `auto`), the gateway in
/// front of the mock, at a fixed time.
async fn harness() -> Harness {
    harness_with(|_| {}).await
}

async fn harness_with(configure: impl FnOnce(&mut Settings)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).expect("store"));
    let account = NewAccount {
        id: "acme".into(),
        tier: "team-standard".into(),
        anchor: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single(),
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
    let gateway = Arc::new(Gateway::new(store.clone(), Arc::new(PriceTable::builtin()), Arc::new(now), settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let routes = tollgate_gateway::routes(gateway.clone());
    tokio::spawn(async move { axum::serve(listener, routes).await.expect("serve") });
    Harness { url, store, gateway, mock, client: reqwest::Client::new(), _dir: dir }
}

impl Harness {
    fn messages(&self, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/messages", self.url))
            .header("x-api-key", SECRET)
            .header("anthropic-version", "2023-06-01")
            .header("user-agent", "claude-cli/2.1.332 (external, sdk-cli)")
            .json(body)
    }

    /// The programmatic pool's held amount.
    async fn held(&self) -> Nanos {
        let b = self.store.balance("acme", now()).await.expect("balance");
        b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool").held
    }

    /// The account's events, once nothing is held any more (every call settled or voided, idle
    /// leases voided) and at least `want` events are recorded, or after 10 s.
    async fn events_after_settles(&self, want: usize) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..200 {
            // Held first: a settle that lands between the two reads is then in the events.
            let held = self.held().await;
            events = self.events().await;
            if held == Nanos::ZERO && events.len() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.held().await, Nanos::ZERO, "every hold and lease ends");
        events
    }

    async fn events(&self) -> Vec<Event> {
        let query = EventQuery {
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

    /// Waits until the gateway holds a lease for the key's programmatic calls.
    async fn wait_for_lease(&self) {
        for _ in 0..100 {
            if self.held().await == Nanos::from_usd(1) && self.gateway.leases_open() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the gateway took no lease");
    }
}

/// Leaves `grant_left` of the programmatic pool's $50, under `block`: a direct event uses the
/// rest.
async fn set_block_limit(h: &Harness, grant_left: Nanos) {
    let policy = PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None };
    h.store.set_policy("acme", PoolKind::Programmatic, policy).await.expect("policy");
    let event = tollgate_store::NewEvent {
        id: "burn".into(),
        account: "acme".into(),
        pool: PoolKind::Programmatic,
        model: "claude-sonnet-4-5".into(),
        usage: Default::default(),
        cost: Nanos(Nanos::from_usd(50).0 - grant_left.0),
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
    h.store.record_events(vec![event], now()).await.expect("burn");
}

fn sonnet(stream: bool) -> Value {
    json!({"model":"claude-sonnet-4-5","max_tokens":1000,"stream":stream,"messages":[{"role":"user","content":"hi"}]})
}

/// The hold's input part for a body: its size (the input-token bound) at the highest input-side
/// price.
fn input_estimate(body: &Value) -> i64 {
    serde_json::to_vec(body).expect("json").len() as i64 * SONNET_INPUT_SIDE_MAX
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"].to_str().expect("ascii").to_string()
}

fn event<'a>(events: &'a [Event], id: &str) -> &'a Event {
    events.iter().find(|e| e.id == id).unwrap_or_else(|| panic!("no event for call {id}: it was voided"))
}

#[tokio::test]
async fn a_client_gone_after_the_first_sse_bytes_is_charged_the_input_of_message_start() {
    let h = harness().await;
    // 50,000 input tokens at $3 / MTok: what message_start reports, the least each call costs.
    let input_50k = Nanos(50_000 * SONNET_INPUT);
    let calls = (0..20).map(|_| async {
        // Each event comes in two writes 50 ms apart: the client's first bytes are
        // "event: message_start\n", and the upstream sends message_start's data 50 ms later.
        let r = h
            .messages(&sonnet(true))
            .header("x-mock-usage", "50000,20")
            .header("x-mock-split-events", "1")
            .header("x-mock-delay-ms", "50")
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let mut body = r.bytes_stream();
        let first = body.next().await.expect("a first chunk").expect("bytes");
        assert!(first.starts_with(b"event: message_start\n"), "{first:?}");
        // The client closes the connection here.
        id
    });
    let ids = futures_util::future::join_all(calls).await;
    let events = h.events_after_settles(20).await;
    let charged: Vec<&Event> = ids.iter().map(|id| event(&events, id)).collect();
    for e in &charged {
        assert!(e.charged() >= input_50k, "call {} charged {}, less than its 50k input", e.id, e.charged());
        assert_eq!(e.usage.input_tokens, 50_000, "call {}", e.id);
        assert!(e.partial && !e.estimated, "call {}: partial, from message_start's usage", e.id);
    }
    assert_eq!(charged.len(), 20, "all 20 calls charged");
}

#[tokio::test]
async fn a_client_gone_right_after_the_headers_is_charged_the_input_of_message_start() {
    let h = harness().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        // message_start comes 100 ms after the headers; the client leaves on the headers.
        let r = h
            .messages(&sonnet(true))
            .header("x-mock-usage", "50000,20")
            .header("x-mock-delay-ms", "100")
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
        ids.push(request_id(&r));
        drop(r);
    }
    let events = h.events_after_settles(ids.len()).await;
    for id in &ids {
        let e = event(&events, id);
        assert!(e.charged() >= Nanos(50_000 * SONNET_INPUT), "call {id} charged {}", e.charged());
        assert!(e.partial, "call {id}");
    }
}

#[tokio::test]
async fn a_client_gone_from_a_call_on_a_lease_is_settled_against_the_lease() {
    let h = harness().await;
    h.messages(&sonnet(false)).send().await.expect("sent").text().await.expect("body");
    h.wait_for_lease().await;
    let r = h
        .messages(&sonnet(true))
        .header("x-mock-usage", "50000,20")
        .header("x-mock-split-events", "1")
        .header("x-mock-delay-ms", "50")
        .send()
        .await
        .expect("sent");
    let id = request_id(&r);
    let mut body = r.bytes_stream();
    body.next().await.expect("a first chunk").expect("bytes");
    drop(body);
    let events = h.events_after_settles(2).await;
    let e = event(&events, &id);
    assert!(e.hold_id.as_deref().is_some_and(|h| h.starts_with("lease_")), "the call ran on the lease: {e:?}");
    assert!(e.charged() >= Nanos(50_000 * SONNET_INPUT), "charged {}", e.charged());
}

/// Sends a request, waits until the mock upstream has received a request at `path` (the
/// gateway got that far), then drops the client's request: the client leaves.
async fn leave_once_received(h: &Harness, request: reqwest::RequestBuilder, path: &str) {
    let before = h.mock.received().iter().filter(|r| r.path_and_query.starts_with(path)).count();
    let call = tokio::spawn(request.send());
    for _ in 0..500 {
        if h.mock.received().iter().filter(|r| r.path_and_query.starts_with(path)).count() > before {
            call.abort();
            assert!(call.await.is_err_and(|e| e.is_cancelled()), "the client left before the answer");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upstream never received {path}");
}

#[tokio::test]
async fn a_client_gone_before_the_upstream_answered_is_billed_by_the_answer() {
    let h = harness().await;
    // The upstream answers 300 ms after it received the call: 200 with its usage, or 529. The
    // client leaves as soon as the upstream has the call, so the gateway's handler is dropped.
    leave_once_received(&h, h.messages(&sonnet(false)).header("x-mock-delay-ms", "300"), "/v1/messages").await;
    let error = h.messages(&sonnet(false)).header("x-mock-delay-ms", "300").header("x-mock-status", "529");
    leave_once_received(&h, error, "/v1/messages").await;
    let events = h.events_after_settles(1).await;
    assert_eq!(events.len(), 1, "the 200 is charged, the 529 voided: {events:?}");
    assert_eq!(events[0].charged(), Nanos(100 * SONNET_INPUT + 20 * SONNET_OUTPUT));
    assert!(events[0].partial && !events[0].estimated);
}

#[tokio::test]
async fn a_client_gone_while_its_call_is_held_is_voided_and_not_forwarded() {
    let h = harness().await;
    // The pool's last $0.10: a Claude Code call (max_tokens 128,000) must be fitted, so the
    // gateway asks count_tokens, which answers after 300 ms; the client leaves meanwhile.
    set_block_limit(&h, Nanos(100_000_000)).await;
    let body = json!({"model":"claude-sonnet-4-5","max_tokens":128000,"messages":[{"role":"user","content":"hi"}]});
    let request = h.messages(&body).header("x-mock-delay-ms", "300").header("x-mock-input-tokens", "10");
    leave_once_received(&h, request, "/v1/messages/count_tokens").await;
    let events = h.events_after_settles(1).await;
    assert_eq!(events.len(), 1, "only the burn: {events:?}");
    assert!(
        h.mock.received().iter().all(|r| r.path_and_query != "/v1/messages"),
        "the call was not forwarded once its client had left"
    );
}

#[tokio::test]
async fn a_call_held_but_not_forwarded_is_voided() {
    // Passthrough needs the tollgate key in x-tollgate-key; sent as x-api-key, the call is held
    // (the key is known) and then refused before anything is forwarded.
    let h = harness_with(|s| s.upstreams.iter_mut().for_each(|u| u.auth = Auth::Passthrough)).await;
    let r = h.messages(&sonnet(false)).send().await.expect("sent");
    assert_eq!(r.status(), 401);
    assert!(h.mock.received().is_empty(), "nothing forwarded");
    let events = h.events_after_settles(0).await;
    assert!(events.is_empty(), "nothing charged: {events:?}");
}

#[tokio::test]
async fn a_json_answer_read_in_part_then_dropped_is_charged() {
    let h = harness().await;
    // The JSON answer comes in two pieces 300 ms apart; the client leaves after the first.
    let r = h
        .messages(&sonnet(false))
        .header("x-mock-json-chunks", "2")
        .header("x-mock-delay-ms", "300")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("a first piece").expect("bytes");
    assert!(!first.is_empty());
    drop(body);
    let events = h.events_after_settles(1).await;
    let e = event(&events, &id);
    // The upstream had done the work and sent the rest of its answer: the gateway read it on
    // after the client left, so the charge is the upstream's own usage (100 in, 20 out), flagged
    // partial because the client did not get the whole answer.
    assert_eq!(e.charged(), Nanos(100 * SONNET_INPUT + 20 * SONNET_OUTPUT), "{e:?}");
    assert!(e.partial && !e.estimated, "{e:?}");
}

#[tokio::test]
async fn unreadable_usage_is_charged_the_estimate() {
    let h = harness().await;
    // Text, a negative count, a fractional one, and 2^64 (one past u64::MAX, which must not wrap
    // to 0): each count of the usage is reported so, in message_start, message_delta and JSON.
    let mut calls = Vec::new();
    for raw in ["\"lots\"", "-5", "12.5", "18446744073709551616"] {
        for stream in [true, false] {
            let r = h.messages(&sonnet(stream)).header("x-mock-usage-raw", raw).send().await.expect("sent");
            assert_eq!(r.status(), 200);
            let id = request_id(&r);
            r.text().await.expect("the whole body");
            calls.push((raw, stream, id));
        }
    }
    let events = h.events_after_settles(calls.len()).await;
    for (raw, stream, id) in &calls {
        let e = event(&events, id);
        // The hold's input part, and the output estimated from the text forwarded.
        let want = input_estimate(&sonnet(*stream)) + MOCK_TEXT_TOKENS * SONNET_OUTPUT;
        assert_eq!(e.charged(), Nanos(want), "usage {raw}, stream {stream}");
        assert!(e.estimated && e.partial, "usage {raw}, stream {stream}: flagged estimated");
    }
}

#[tokio::test]
async fn a_stream_without_message_start_is_charged_the_estimate() {
    let h = harness().await;
    // No message_start, and message_delta reports only output_tokens (20): input is unknown.
    let r = h
        .messages(&sonnet(true))
        .header("x-mock-no-message-start", "1")
        .header("x-mock-delta-usage", "output")
        .send()
        .await
        .expect("sent");
    let estimated = request_id(&r);
    r.text().await.expect("body");
    // No message_start, but message_delta reports the input too: that usage is known.
    let r = h.messages(&sonnet(true)).header("x-mock-no-message-start", "1").send().await.expect("sent");
    let known = request_id(&r);
    r.text().await.expect("body");
    let events = h.events_after_settles(2).await;
    let e = event(&events, &estimated);
    assert_eq!(e.charged(), Nanos(input_estimate(&sonnet(true)) + 20 * SONNET_OUTPUT));
    assert!(e.estimated && e.partial);
    let e = event(&events, &known);
    assert_eq!(e.charged(), Nanos(100 * SONNET_INPUT + 20 * SONNET_OUTPUT));
    assert!(!e.estimated);
}

#[tokio::test]
async fn a_stream_cut_before_message_start_is_charged_the_estimate() {
    let h = harness().await;
    let r = h.messages(&sonnet(true)).header("x-mock-cut-after", "0").send().await.expect("sent");
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    assert!(r.text().await.is_err(), "the client sees the cut");
    let events = h.events_after_settles(1).await;
    let e = event(&events, &id);
    assert_eq!(e.charged(), Nanos(input_estimate(&sonnet(true))), "the hold's input part, no output seen");
    assert!(e.estimated && e.partial);
}

#[tokio::test]
async fn an_openai_stream_cut_before_its_usage_is_charged_the_input_estimate() {
    let h = harness().await;
    let body =
        json!({"model":"gpt-5","stream":true,"max_completion_tokens":500,"messages":[{"role":"user","content":"hi"}]});
    // Cut after the role chunk and both text chunks (29 bytes: 10 tokens at gpt-5's $10 / MTok).
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(SECRET)
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("x-mock-cut-after", "3")
        .json(&body)
        .send()
        .await
        .expect("sent");
    let id = request_id(&r);
    assert!(r.text().await.is_err(), "the client sees the cut");
    let events = h.events_after_settles(1).await;
    let e = event(&events, &id);
    assert!(e.estimated && e.partial, "{e:?}");
    assert!(e.charged() > Nanos(10 * 10_000), "more than the output alone: {}", e.charged());
}

#[tokio::test]
async fn usage_that_goes_down_is_read_as_its_largest_value() {
    let h = harness().await;
    // message_delta reports 500 output tokens, then a final (cumulative) 20.
    let r = h.messages(&sonnet(true)).header("x-mock-output-steps", "500").send().await.expect("sent");
    let id = request_id(&r);
    assert!(r.text().await.expect("body").contains("message_stop"));
    let events = h.events_after_settles(1).await;
    let e = event(&events, &id);
    assert_eq!(e.usage.output_tokens, 500);
    assert_eq!(e.charged(), Nanos(100 * SONNET_INPUT + 500 * SONNET_OUTPUT));
    assert!(!e.partial && !e.estimated);
}

#[tokio::test]
async fn an_upstream_error_status_is_voided() {
    let h = harness().await;
    for stream in [false, true] {
        let r = h.messages(&sonnet(stream)).header("x-mock-status", "529").send().await.expect("sent");
        assert_eq!(r.status(), 529);
        let body: Value = r.json().await.expect("the error, forwarded");
        assert_eq!(body["error"]["type"], "overloaded_error");
    }
    // The client leaves an error answer unread: still voided.
    drop(h.messages(&sonnet(true)).header("x-mock-status", "529").send().await.expect("sent"));
    let events = h.events_after_settles(0).await;
    assert!(events.is_empty(), "errors are not billed: {events:?}");
    let b = h.store.balance("acme", now()).await.expect("balance");
    let p = b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool");
    assert_eq!((p.used, p.overage, p.held), (Nanos::ZERO, Nanos::ZERO, Nanos::ZERO));
}

/// What the upstream received must not carry the tollgate key in any header, nor any
/// `x-tollgate-*` header.
fn assert_no_tollgate_headers(seen: &tollgate_testkit::Received, case: &str) {
    for (name, value) in &seen.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(SECRET), "{case}: the tollgate key reached the upstream in {name}");
        assert!(!name.as_str().starts_with("x-tollgate-"), "{case}: {name} reached the upstream");
    }
}

/// A passthrough call: the headers it sends besides `x-tollgate-key`, and the credential that
/// must reach the upstream.
struct PassthroughCase<'a> {
    what: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    reaches: (&'a str, &'a str),
}

#[tokio::test]
async fn passthrough_never_sends_the_tollgate_key_upstream() {
    let h = harness_with(|s| s.upstreams.iter_mut().for_each(|u| u.auth = Auth::Passthrough)).await;
    let subscription = "Bearer sk-ant-oat01-subscription";
    let own_key = "sk-ant-api03-own";
    let bearer_secret = format!("Bearer {SECRET}");
    let lower_bearer_secret = format!("bearer  {SECRET} ");
    let cases = [
        PassthroughCase {
            what: "the tollgate key in x-api-key too",
            headers: vec![("x-api-key", SECRET), ("authorization", subscription)],
            reaches: ("authorization", subscription),
        },
        PassthroughCase {
            what: "the tollgate key as Authorization: Bearer",
            headers: vec![("authorization", &bearer_secret), ("x-api-key", own_key)],
            reaches: ("x-api-key", own_key),
        },
        PassthroughCase {
            what: "a lowercase bearer scheme",
            headers: vec![("authorization", &lower_bearer_secret), ("x-api-key", own_key)],
            reaches: ("x-api-key", own_key),
        },
        PassthroughCase {
            what: "x-tollgate-* headers",
            headers: vec![("x-tollgate-trace", SECRET), ("x-tollgate-anything", "1"), ("authorization", subscription)],
            reaches: ("authorization", subscription),
        },
    ];
    for case in &cases {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let what = format!("{}, {path}", case.what);
            let before = h.mock.received().len();
            let mut request = h
                .client
                .post(format!("{}{path}", h.url))
                .header("x-tollgate-key", SECRET)
                .header("anthropic-version", "2023-06-01")
                .json(&sonnet(false));
            for (name, v) in &case.headers {
                request = request.header(*name, *v);
            }
            let r = request.send().await.expect("sent");
            assert_eq!(r.status(), 200, "{what}");
            r.text().await.expect("body");
            let received = h.mock.received();
            assert_eq!(received.len(), before + 1, "{what}: one request forwarded");
            let seen = &received[before];
            assert_no_tollgate_headers(seen, &what);
            let (credential, value) = case.reaches;
            assert_eq!(seen.headers.get(credential).map(|v| v.to_str().unwrap()), Some(value), "{what}");
        }
    }
}
