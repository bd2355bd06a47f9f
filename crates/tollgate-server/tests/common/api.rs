// The management API through the real router, for the tests that include this file: two
// accounts (acme, globex) with a key, an event and an open hold each, a snapshot of both
// ledgers, and a check that a refused request answered as it should and changed nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tollgate_config::UnknownModel;
use tollgate_core::PriceTable;
use tollgate_server::{AdminToken, AppState, router};
use tollgate_sqlite::SqliteStore;
use tower::ServiceExt;

const ADMIN: &str = "tga_test-admin-token";
const A: &str = "acme";
const B: &str = "globex";
const BODY_MAX: usize = 16 * 1024;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap()
}

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    ApiKey(&'a str),
}

struct Reply {
    status: StatusCode,
    bytes: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Everything an account's ledger shows through the API, as raw bytes.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    balance_a: Vec<u8>,
    balance_b: Vec<u8>,
    events_a: Vec<u8>,
    events_b: Vec<u8>,
}

struct Api {
    router: Router,
    /// A key of account A (pool programmatic) and one of account B (auto).
    key_a: String,
    key_b: String,
    _dir: TempDir,
}

impl Api {
    async fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("tollgate.db")).unwrap();
        let clock: tollgate_server::Clock = Arc::new(now);
        let state = AppState {
            store: Arc::new(store),
            prices: Arc::new(PriceTable::builtin()),
            unknown_model: UnknownModel::Reject,
            admin: AdminToken::from_secret(ADMIN),
            clock,
            hold_ttl_s: 600,
            api_body_size_bytes_max: BODY_MAX,
            feed: Arc::default(),
            alerter: None,
        };
        let mut api = Api { router: router(state), key_a: String::new(), key_b: String::new(), _dir: dir };
        let admin = Auth::Bearer(ADMIN);
        for (id, tier) in [(A, "team-standard"), (B, "pro")] {
            let r = api.call(Method::POST, "/api/v1/accounts", admin, json!({"id": id, "tier": tier})).await;
            assert_eq!(r.status, StatusCode::CREATED, "create account {id}: {}", r.text());
        }
        let r = api
            .call(
                Method::PUT,
                &format!("/api/v1/accounts/{A}/pools/programmatic"),
                admin,
                json!({"on_exhausted": "payg", "overage_cap_usd": "10", "spend_cap_usd": "70"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "pool policy: {}", r.text());
        let r = api
            .call(
                Method::POST,
                &format!("/api/v1/accounts/{A}/keys"),
                admin,
                json!({"pool": "programmatic", "name": "ci"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "key A: {}", r.text());
        api.key_a = r.json()["key"].as_str().unwrap().to_string();
        let r = api.call(Method::POST, &format!("/api/v1/accounts/{B}/keys"), admin, json!({"name": "bot"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "key B: {}", r.text());
        api.key_b = r.json()["key"].as_str().unwrap().to_string();

        // Some ledger state in both accounts, so "unchanged" and "not leaked" mean something.
        let key_b = api.key_b.clone();
        let key_a = api.key_a.clone();
        let r = api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key_a), event("evt-a1", A)).await;
        assert_eq!(r.status, StatusCode::CREATED, "event A: {}", r.text());
        let r = api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key_b), event("evt-b1", B)).await;
        assert_eq!(r.status, StatusCode::CREATED, "event B: {}", r.text());
        for (account, key, hold) in [(A, &key_a, "hold-a1"), (B, &key_b, "hold-b1")] {
            let r = api
                .call(
                    Method::POST,
                    &format!("/api/v1/accounts/{account}/holds"),
                    Auth::Bearer(key),
                    json!({"id": hold, "pool": "programmatic", "amount_usd": "0.25", "model": "claude-sonnet-4-5"}),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "hold {hold}: {}", r.text());
        }
        api
    }

    async fn send(&self, method: Method, path: &str, auth: Auth<'_>, content_type: Option<&str>, body: Body) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        match auth {
            Auth::None => {}
            Auth::Bearer(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
            Auth::ApiKey(t) => req = req.header("x-api-key", t),
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        Reply { status, bytes }
    }

    async fn call(&self, method: Method, path: &str, auth: Auth<'_>, body: Value) -> Reply {
        self.send(method, path, auth, Some("application/json"), Body::from(body.to_string())).await
    }

    async fn raw(&self, method: Method, path: &str, auth: Auth<'_>, body: impl Into<Vec<u8>>) -> Reply {
        self.send(method, path, auth, Some("application/json"), Body::from(body.into())).await
    }

    async fn get(&self, path: &str, auth: Auth<'_>) -> Reply {
        self.send(Method::GET, path, auth, None, Body::empty()).await
    }

    async fn snapshot(&self) -> Snapshot {
        let admin = Auth::Bearer(ADMIN);
        let mut parts = Vec::new();
        for path in [
            format!("/api/v1/accounts/{A}/balance"),
            format!("/api/v1/accounts/{B}/balance"),
            format!("/api/v1/accounts/{A}/events?limit=1000"),
            format!("/api/v1/accounts/{B}/events?limit=1000"),
        ] {
            let r = self.get(&path, admin).await;
            assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.text());
            parts.push(r.bytes);
        }
        let mut parts = parts.into_iter();
        Snapshot {
            balance_a: parts.next().unwrap(),
            balance_b: parts.next().unwrap(),
            events_a: parts.next().unwrap(),
            events_b: parts.next().unwrap(),
        }
    }

    /// Sends a bad request and checks the refusal, and that no ledger moved.
    async fn refused(&self, case: &str, request: impl AsyncFnOnce(&Api) -> Reply, want: Want<'_>) -> Value {
        let before = self.snapshot().await;
        let reply = request(self).await;
        let error = check_error(case, &reply, &want);
        let after = self.snapshot().await;
        assert!(before == after, "{case}: a refused request changed the ledger\nbefore: {before:?}\nafter: {after:?}");
        error
    }
}

/// What a refusal must look like.
struct Want<'a> {
    status: StatusCode,
    code: &'a str,
    /// Substrings the message must contain: what to fix.
    message_has: &'a [&'a str],
}

fn want<'a>(status: StatusCode, code: &'a str, message_has: &'a [&'a str]) -> Want<'a> {
    Want { status, code, message_has }
}

fn check_error(case: &str, reply: &Reply, want: &Want<'_>) -> Value {
    assert_eq!(reply.status, want.status, "{case}: status; body {}", reply.text());
    let body: Value = serde_json::from_slice(&reply.bytes)
        .unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {:?}", reply.text()));
    let error = &body["error"];
    assert_eq!(error["code"].as_str(), Some(want.code), "{case}: error code in {body}");
    let message = error["message"].as_str().unwrap_or_else(|| panic!("{case}: no error.message in {body}"));
    for needle in want.message_has {
        assert!(message.contains(needle), "{case}: message {message:?} should mention {needle:?}");
    }
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{case}: only `error` at the top: {body}");
    error.clone()
}

/// A valid event: claude-sonnet-4-5, 1000 in + 200 out = $0.006.
fn event(id: &str, account: &str) -> Value {
    json!({
        "id": id,
        "account": account,
        "pool": "programmatic",
        "model": "claude-sonnet-4-5",
        "usage": {"input_tokens": 1000, "output_tokens": 200},
        "source": "ci",
    })
}

/// `v` with the field at `pointer` (`/usage/input_tokens`) set, added if absent.
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    #[allow(clippy::expect_used, reason = "test helper: a pointer to no object is a broken test, which should fail")]
    let object = v.pointer_mut(parent).and_then(Value::as_object_mut).expect("the parent is an object");
    object.insert(field.to_string(), value);
    v
}

fn plus(mut v: Value, field: &str, value: Value) -> Value {
    v.as_object_mut().unwrap().insert(field.to_string(), value);
    v
}

fn without(mut v: Value, field: &str) -> Value {
    v.as_object_mut().unwrap().remove(field);
    v
}

fn used_usd(balance: &[u8], pool: &str) -> String {
    let v: Value = serde_json::from_slice(balance).unwrap();
    v["pools"][pool]["used_usd"].as_str().unwrap().to_string()
}

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const INVALID: &str = "invalid_request";
