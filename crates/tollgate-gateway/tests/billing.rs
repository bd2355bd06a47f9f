//! What passthrough forwards (SPEC section 4: tollgate keys never leave tollgate). A real SQLite
//! store, the gateway on a real socket, the testkit's mock upstream behind it, reqwest as the
//! client.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tollgate_core::PriceTable;
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{KeyPool, NewAccount, NewKey, Store, hash_secret};
use tollgate_testkit::MockUpstream;

const SECRET: &str = "tg-test-secret";

struct Harness {
    url: String,
    mock: MockUpstream,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().expect("a real time")
}

/// An account "acme" on team-standard, one key (pool `auto`), the gateway in front of the
/// mock, at a fixed time.
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
    let routes = tollgate_gateway::routes(gateway);
    tokio::spawn(async move { axum::serve(listener, routes).await.expect("serve") });
    Harness { url, mock, client: reqwest::Client::new(), _dir: dir }
}

impl Harness {
    fn messages_url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

fn sonnet(stream: bool) -> Value {
    json!({"model":"claude-sonnet-4-5","max_tokens":1000,"stream":stream,"messages":[{"role":"user","content":"hi"}]})
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
                .post(h.messages_url(path))
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
