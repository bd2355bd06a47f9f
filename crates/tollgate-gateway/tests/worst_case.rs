//! The worst case covers every billable the request can trigger (SPEC section 3): server tools
//! without `max_uses` get one injected and their uses are held; tools whose cost the gateway
//! cannot bound (the MCP connector, code execution, container uploads) are refused on a `block`
//! pool unless an allowance is configured, and held with it where they are admitted; an upstream
//! that reports more than the hold is charged in full and recorded as overshoot.
//!
//! A real SQLite store, the gateway on a real socket, the testkit's mock upstream behind it,
//! reqwest as the client. Leases are off, so each call's hold is its own and can be read back
//! under the call's request id.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, PriceTable};
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{Event, EventQuery, Hold, KeyPool, NewAccount, NewKey, Store, hash_secret};
use tollgate_testkit::MockUpstream;

const SECRET: &str = "tg-test-secret";

/// Sonnet 4.6 (no long-context price, so a large input bound keeps these rates), nano-USD per
/// token: $6 / MTok for a 1-hour cache write (the highest input-side price, what a hold's input
/// bound is priced at) and $15 / MTok out; $10 per 1,000 web searches.
const MODEL: &str = "claude-sonnet-4-6";
const INPUT_SIDE_MAX: i64 = 6_000;
const OUTPUT: i64 = 15_000;
const WEB_SEARCH: i64 = 10_000_000;
/// The default input allowance per server-tool use (`Allowances::default()`).
const TOOL_USE_INPUT_TOKENS: i64 = 20_000;

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

/// An account "acme" on team-standard ($50 programmatic, `block`), one key (pool `auto`), the
/// gateway in front of the mock with leases off, at a fixed time.
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
    let mut settings = Settings {
        upstreams: vec![Upstream {
            name: "anthropic".into(),
            kind: Kind::Anthropic,
            base_url: mock.base_url(),
            api_key: Some("upstream-secret".into()),
            models: vec!["claude-*".into()],
            auth: Auth::Gateway,
        }],
        lease: Nanos::ZERO,
        ..Settings::default()
    };
    configure(&mut settings);
    let gateway = Arc::new(Gateway::new(store.clone(), Arc::new(PriceTable::builtin()), Arc::new(now), settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let routes = tollgate_gateway::routes(gateway);
    tokio::spawn(async move { axum::serve(listener, routes).await.expect("serve") });
    Harness { url, store, mock, client: reqwest::Client::new(), _dir: dir }
}

impl Harness {
    fn messages(&self, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/messages", self.url))
            .header("x-api-key", SECRET)
            .header("anthropic-version", "2023-06-01")
            .header("user-agent", "Anthropic/Python 0.121.0")
            .json(body)
    }

    /// Sends a call, expects 200 and reads the whole body (so the call settles); returns its
    /// request id.
    async fn call_ok(&self, request: reqwest::RequestBuilder) -> String {
        let r = request.send().await.expect("sent");
        let status = r.status();
        let id = r.headers().get("x-tollgate-request-id").map(|v| v.to_str().expect("ascii").to_string());
        let text = r.text().await.expect("body");
        assert_eq!(status, 200, "{text}");
        id.expect("x-tollgate-request-id")
    }

    /// The call's own hold, once it is no longer open (the settle runs after the body ends).
    async fn hold(&self, id: &str) -> Hold {
        for _ in 0..100 {
            let hold = self.store.hold_by_id("acme", id).await.expect("hold_by_id").expect("the call's hold");
            if hold.state != tollgate_store::HoldState::Open {
                return hold;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("hold {id} is still open after 5 s");
    }

    async fn events(&self) -> Vec<Event> {
        let query = EventQuery { account: "acme".into(), limit: 100, ..EventQuery::default() };
        self.store.events(query).await.expect("events")
    }

    /// The programmatic pool's charged (used + overage) and held amounts.
    async fn programmatic(&self) -> (Nanos, Nanos) {
        let b = self.store.balance("acme", now()).await.expect("balance");
        let p = b.pool(PoolKind::Programmatic);
        (p.used.saturating_add(p.overage), p.held)
    }

    /// The body the mock received last, and its size as forwarded (serde_json writes a parsed
    /// body back byte for byte as the gateway does when it rewrites one).
    fn forwarded(&self) -> (Value, i64) {
        let received = self.mock.received();
        let last = received.last().expect("the mock received the call").body.clone();
        let bytes = serde_json::to_vec(&last).expect("json").len() as i64;
        (last, bytes)
    }
}

fn with_tools(tools: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "look it up"}], "tools": tools})
}

#[tokio::test]
async fn server_tools_without_max_uses_get_one_injected_and_their_uses_are_held() {
    let h = harness_with(|_| {}).await;
    let body = with_tools(json!([
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "web_search_20250305", "name": "narrow_search", "max_uses": 2},
        {"name": "get_weather", "input_schema": {"type": "object"}}
    ]));
    let id = h.call_ok(h.messages(&body)).await;

    // Forwarded with max_uses 5 (the default) where the client set none; a client's own
    // max_uses and client tools are left as they were.
    let (forwarded, bytes) = h.forwarded();
    let tools = forwarded["tools"].as_array().expect("tools");
    let max_uses: Vec<Option<u64>> = tools.iter().map(|t| t.get("max_uses").and_then(Value::as_u64)).collect();
    assert_eq!(max_uses, vec![Some(5), Some(5), Some(2), None], "{forwarded}");
    assert_eq!(tools[3], json!({"name": "get_weather", "input_schema": {"type": "object"}}));

    // The hold: the forwarded body as input, plus 20,000 input tokens per use of each server
    // tool (12 uses: web fetch brings pages in as input), at the highest input-side price;
    // max_tokens at the output price; and 7 web searches at $0.01 (web fetch has no per-use
    // price).
    let uses = 5 + 5 + 2;
    let searches = 5 + 2;
    let want = (bytes + uses * TOOL_USE_INPUT_TOKENS) * INPUT_SIDE_MAX + 1_000 * OUTPUT + searches * WEB_SEARCH;
    assert_eq!(h.hold(&id).await.amount, Nanos(want), "forwarded body of {bytes} bytes");
}

#[tokio::test]
async fn a_configured_max_uses_is_the_one_injected() {
    let h = harness_with(|s| s.server_tool_max_uses = 1).await;
    let body = with_tools(json!([{"type": "web_fetch_20250910", "name": "web_fetch"}]));
    let id = h.call_ok(h.messages(&body)).await;
    let (forwarded, bytes) = h.forwarded();
    assert_eq!(forwarded["tools"][0]["max_uses"], json!(1), "{forwarded}");
    let want = (bytes + TOOL_USE_INPUT_TOKENS) * INPUT_SIDE_MAX + 1_000 * OUTPUT;
    assert_eq!(h.hold(&id).await.amount, Nanos(want));
}

#[tokio::test]
async fn tools_the_gateway_cannot_bound_are_refused_on_a_block_pool_and_nothing_is_forwarded() {
    let h = harness_with(|_| {}).await;
    let mcp = json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}],
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]});
    let code = with_tools(json!([{"type": "code_execution_20250825", "name": "code_execution"}]));
    let upload = json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "analyse this"}, {"type": "container_upload", "file_id": "file_011"}]}]});
    for (body, names) in [(mcp, "mcp_servers"), (code, "code_execution_20250825"), (upload, "container_upload")] {
        let r = h.messages(&body).send().await.expect("sent");
        assert_eq!(r.status(), 400, "{names}");
        let error: Value = r.json().await.expect("json");
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        let message = error["error"]["message"].as_str().expect("message");
        for needed in [names, "block", "programmatic", "[gateway] unbounded_tool_allowance_usd"] {
            assert!(message.contains(needed), "the message names {needed:?}: {message}");
        }
    }
    assert!(h.mock.received().is_empty(), "nothing was forwarded");
    assert!(h.events().await.is_empty(), "nothing was charged");
    assert_eq!(h.programmatic().await, (Nanos::ZERO, Nanos::ZERO), "nothing was held");
}

#[tokio::test]
async fn with_an_allowance_configured_an_unbounded_tool_is_admitted_and_held_with_it() {
    let allowance = Nanos::from_usd(2);
    let h = harness_with(|s| s.unbounded_tool_allowance = Some(allowance)).await;
    let mcp = json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}],
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}],
        "tools": [{"type": "code_execution_20250825", "name": "code_execution"}]});
    let id = h.call_ok(h.messages(&mcp)).await;
    let (forwarded, bytes) = h.forwarded();
    assert_eq!(forwarded["mcp_servers"], mcp["mcp_servers"], "forwarded unchanged");
    // One allowance per call, whatever the number of such tools.
    let want = bytes * INPUT_SIDE_MAX + 1_000 * OUTPUT + allowance.0;
    assert_eq!(h.hold(&id).await.amount, Nanos(want));
    assert_eq!(h.events().await.len(), 1, "charged once");
}

#[tokio::test]
async fn on_a_payg_pool_an_unbounded_tool_is_held_at_the_default_allowance() {
    let h = harness_with(|_| {}).await;
    let payg = PoolPolicy { on_exhausted: OnExhausted::Payg, overage_cap: None, spend_cap: None };
    h.store.set_policy("acme", PoolKind::Programmatic, payg).await.expect("policy");
    let code = with_tools(json!([{"type": "code_execution_20250825", "name": "code_execution"}]));
    let id = h.call_ok(h.messages(&code)).await;
    let (_, bytes) = h.forwarded();
    let want = bytes * INPUT_SIDE_MAX + 1_000 * OUTPUT + tollgate_gateway::UNBOUNDED_TOOL_ALLOWANCE_DEFAULT.0;
    assert_eq!(h.hold(&id).await.amount, Nanos(want));
}

#[tokio::test]
async fn an_upstream_reporting_more_than_the_hold_is_charged_in_full_as_overshoot() {
    let h = harness_with(|_| {}).await;
    // 2,000,000 input and 100,000 output tokens: $6 + $1.50 on Sonnet 4.6, against a hold of
    // about two cents.
    let body = json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let id = h.call_ok(h.messages(&body).header("x-mock-usage", "2000000,100000")).await;
    let hold = h.hold(&id).await;
    let events = h.events().await;
    assert_eq!(events.len(), 1);
    let cost = Nanos::from_usd(6).saturating_add(Nanos(1_500_000_000));
    assert_eq!(events[0].charged(), cost, "charged what the upstream reported");
    assert_eq!(events[0].overshoot, Nanos(cost.0 - hold.amount.0), "recorded above the hold");
    assert_eq!(h.programmatic().await, (cost, Nanos::ZERO));
}
