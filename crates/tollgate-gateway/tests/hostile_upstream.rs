//! Upstreams that try to exhaust the gateway (SPEC section 4: "bounded buffers and time for every
//! upstream body"; issue 13, finding 4): an SSE event of megabytes, a body that stops sending
//! without ending, a `count_tokens` answer without end. A real SQLite store, the gateway on a real
//! socket, the testkit's mock upstream behind it (steered by `x-mock-*` headers), reqwest as the
//! client. Each test bounds its own wait: a gateway that hangs fails it instead of hanging it.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, PriceTable};
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{Event, EventQuery, KeyPool, NewAccount, NewKey, Store, hash_secret};
use tollgate_testkit::MockUpstream;

const SECRET: &str = "tg-test-secret";

/// gpt-5, nano-USD per token: $1.25 / MTok in, $10 / MTok out.
const GPT5_INPUT: i64 = 1_250;
const GPT5_OUTPUT: i64 = 10_000;

/// How long a test waits for what must end; far above what the gateway needs (a few seconds in
/// a debug build), far below a hang.
const PATIENCE: Duration = Duration::from_secs(60);

struct Harness {
    url: String,
    store: Arc<dyn Store>,
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
    Harness { url, store, mock, client: reqwest::Client::new(), _dir: dir }
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

    /// A chat completion through the gateway (`base` its URL), or straight to the mock.
    fn chat(&self, base: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(SECRET)
            .header("user-agent", "OpenAI/Python 1.99.0")
            .json(body)
    }

    /// The programmatic pool's held amount.
    async fn held(&self) -> Nanos {
        let b = self.store.balance("acme", now()).await.expect("balance");
        b.pools.iter().find(|p| p.pool == PoolKind::Programmatic).expect("pool").held
    }

    /// The account's events, once nothing is held any more (every call settled or voided, idle
    /// leases voided) and at least `want` events are recorded, or after 10 s. What is held is
    /// read first: nothing held then means every settle so far is in the events read after.
    async fn events_after_settles(&self, want: usize) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..200 {
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
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"].to_str().expect("ascii").to_string()
}

fn event<'a>(events: &'a [Event], id: &str) -> &'a Event {
    events.iter().find(|e| e.id == id).unwrap_or_else(|| panic!("no event for call {id}: it was voided"))
}

/// Leaves `grant_left` of the programmatic pool's $50, under `block`: a direct event uses the
/// rest, so a large call must be fitted (which asks the upstream's `count_tokens`).
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

/// An OpenAI stream carrying one 8 MiB SSE event, sent in 1 KiB writes, to a client that did not
/// ask for usage: tollgate asks for the usage chunk and strips it. Stripping used to scan the
/// whole buffered event again on every chunk (CPU quadratic in the event's size: hours in a
/// debug build) and buffer all of it. Now the client gets the upstream's bytes unchanged, the
/// usage chunk excepted, at once; the call is settled at the usage reported.
#[tokio::test]
async fn an_8_mib_sse_event_is_forwarded_unchanged_while_the_usage_chunk_is_stripped() {
    let h = harness().await;
    let body =
        json!({"model":"gpt-5","stream":true,"max_completion_tokens":500,"messages":[{"role":"user","content":"hi"}]});
    let steer =
        |r: reqwest::RequestBuilder| r.header("x-mock-big-event-bytes", "8388608").header("x-mock-write-bytes", "1024");
    // What the upstream sends a client that did not ask for usage: the same, without the usage chunk.
    let direct = steer(h.chat(&h.mock.base_url(), &body)).send().await.expect("sent").bytes().await.expect("body");
    assert!(direct.len() > 8 << 20, "the mock sent the big event: {} bytes", direct.len());

    let started = Instant::now();
    let through = tokio::time::timeout(PATIENCE, async {
        let r = steer(h.chat(&h.url, &body)).send().await.expect("sent");
        let id = request_id(&r);
        (id, r.bytes().await.expect("the whole body"))
    })
    .await;
    let (id, got) = through.unwrap_or_else(|_| panic!("the call did not end within {PATIENCE:?}"));
    eprintln!("8 MiB event through the gateway in {:?} (debug build)", started.elapsed());
    assert!(got == direct, "the client gets the upstream's bytes unchanged ({} vs {} bytes)", got.len(), direct.len());
    let asked = h.mock.received().into_iter().filter(|r| r.path_and_query.starts_with("/v1/chat")).last().unwrap();
    assert_eq!(asked.body["stream_options"]["include_usage"], true, "tollgate asked for the usage chunk");

    let events = h.events_after_settles(1).await;
    let e = event(&events, &id);
    assert_eq!((e.usage.input_tokens, e.usage.output_tokens), (100, 20), "the usage chunk was read");
    assert!(!e.partial && !e.estimated, "{e:?}");
    assert_eq!(e.charged(), Nanos(100 * GPT5_INPUT + 20 * GPT5_OUTPUT));
}

/// An upstream that answers, sends part of its body, then stays silent with the connection open.
/// The gateway gives up after the idle bound (`upstream_timeout`, 1 s here): the client sees a
/// cut, and the call is settled as a cut (docs/gateway.md, the billing table), never voided and
/// never left open.
#[tokio::test]
async fn a_body_that_stalls_ends_as_a_cut_after_the_idle_bound() {
    let h = harness_with(|s| s.upstream_timeout = Duration::from_secs(1)).await;
    let sonnet = |stream: bool| json!({"model":"claude-sonnet-4-5","max_tokens":1000,"stream":stream,"messages":[{"role":"user","content":"hi"}]});
    let gpt =
        json!({"model":"gpt-5","stream":true,"max_completion_tokens":500,"messages":[{"role":"user","content":"hi"}]});
    struct Row {
        what: &'static str,
        request: reqwest::RequestBuilder,
        /// (partial, estimated, input tokens read)
        want: (bool, bool, u64),
    }
    let rows = vec![
        Row {
            what: "Anthropic stream, silent after message_start and one more event",
            request: h.messages(&sonnet(true)).header("x-mock-stall-after", "2"),
            want: (true, false, 100),
        },
        Row {
            what: "OpenAI stream (usage chunk stripped), silent after its text",
            request: h.chat(&h.url, &gpt).header("x-mock-stall-after", "3"),
            want: (true, true, 0),
        },
        Row {
            what: "JSON answer, silent after its first quarter",
            request: h.messages(&sonnet(false)).header("x-mock-json-chunks", "4").header("x-mock-stall-after", "1"),
            want: (true, true, 0),
        },
    ];
    let calls = rows.into_iter().map(|row| async move {
        let ended = tokio::time::timeout(PATIENCE, async {
            let r = row.request.send().await.expect("the headers arrive");
            assert_eq!(r.status(), 200, "{}", row.what);
            (request_id(&r), r.bytes().await)
        })
        .await;
        let (id, body) = ended.unwrap_or_else(|_| panic!("{}: the call did not end within {PATIENCE:?}", row.what));
        assert!(body.is_err(), "{}: the client sees a cut, not a whole answer", row.what);
        (row.what, id, row.want)
    });
    let ended = futures_util::future::join_all(calls).await;
    let events = h.events_after_settles(ended.len()).await;
    let mut failures = Vec::new();
    for (what, id, want) in ended {
        let e = event(&events, &id);
        let got = (e.partial, e.estimated, e.usage.input_tokens);
        if got != want || e.charged() <= Nanos::ZERO {
            failures.push(format!("{what}: got {got:?} charged {}, want {want:?} and a charge", e.charged()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `POST /v1/messages/count_tokens` is forwarded as it comes, unbilled; its body has the same
/// idle bound as any other.
#[tokio::test]
async fn a_forwarded_count_tokens_answer_that_stalls_ends() {
    let h = harness_with(|s| s.upstream_timeout = Duration::from_secs(1)).await;
    let body = json!({"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]});
    let ended = tokio::time::timeout(PATIENCE, async {
        let r = h
            .client
            .post(format!("{}/v1/messages/count_tokens", h.url))
            .header("x-api-key", SECRET)
            .header("x-mock-stall-after", "1")
            .json(&body)
            .send()
            .await
            .expect("the headers arrive");
        r.bytes().await
    })
    .await;
    let body = ended.unwrap_or_else(|_| panic!("the call did not end within {PATIENCE:?}"));
    assert!(body.is_err(), "the client sees a cut");
}

/// A call near the end of its pool is fitted, and fitting asks the upstream's `count_tokens`
/// (docs/gateway.md, step 5). An answer that never ends, in size or in time, must not hold the
/// call: the gateway reads a bounded part of it, for a bounded time, then fits the call without it.
#[tokio::test]
async fn a_count_tokens_answer_without_end_does_not_hold_the_call() {
    let h = harness_with(|s| s.upstream_timeout = Duration::from_secs(1)).await;
    set_block_limit(&h, Nanos(500_000_000)).await;
    let body =
        json!({"model":"claude-opus-5-5","max_tokens":128000,"messages":[{"role":"user","content":"Write a haiku."}]});
    const PAD: u64 = 64 << 20;
    let call = |header: &'static str, value: String| {
        let request = h.messages(&body).header(header, value);
        async move {
            let answered = tokio::time::timeout(PATIENCE, async {
                let r = request.send().await.expect("sent");
                (r.status(), r.headers().get("x-tollgate-max-tokens-clamped").cloned(), r.bytes().await)
            })
            .await;
            let (status, clamped, answer) =
                answered.unwrap_or_else(|_| panic!("{header}: the call did not end within {PATIENCE:?}"));
            assert_eq!(status, 200, "{header}: fitted without the count");
            assert!(clamped.is_some(), "{header}: fitted");
            answer.unwrap_or_else(|e| panic!("{header}: {e}"));
        }
    };
    call("x-mock-count-tokens-pad-bytes", PAD.to_string()).await;
    // Made as fast as read: what the gateway did not read (past its bound, and the socket
    // buffers) was never made.
    let sent = h.mock.padding_sent();
    assert!(sent < PAD / 2, "the gateway stopped reading the padding: {sent} of {PAD} bytes made");
    call("x-mock-stall-after", "1".to_string()).await;
    let events = h.events_after_settles(3).await;
    assert_eq!(events.len(), 3, "the burn and both calls");
}
