//! `GET /api/v1/stream` through the real router: an account key sees its own account's items
//! only, the admin sees all, and a recorded event is tallied for the stream.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate_config::UnknownModel;
use tollgate_core::{Nanos, PoolKind, PriceTable};
use tollgate_server::{AdminToken, AppState, router};
use tollgate_sqlite::SqliteStore;
use tollgate_store::feed::{Feed, FeedItem, Tally};
use tower::ServiceExt;

const ADMIN: &str = "stream-admin";

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().unwrap()
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> axum::response::Response {
    let mut r = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        r = r.header("content-type", "application/json");
    }
    let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
    app.clone().oneshot(r.body(body).unwrap()).await.unwrap()
}

async fn json(r: axum::response::Response) -> Value {
    serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// The next SSE event's (name, data) within 2 s, skipping comments (keep-alives).
async fn next_event(body: &mut Body) -> Option<(String, Value)> {
    let mut text = String::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame()).await.ok()??.ok()?;
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        if let Some(end) = text.find("\n\n") {
            let block = &text[..end];
            let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message").to_string();
            let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
            return Some((name, serde_json::from_str(data).unwrap()));
        }
    }
}

fn calls(account: &str, n: u64) -> FeedItem {
    let tally = Tally { calls: n, refused: 0, charged: Nanos(600_000 * n as i64), tokens: 120 * n };
    FeedItem::Calls { account: account.into(), pool: PoolKind::Programmatic, window_end: now(), window_s: 1, tally }
}

#[tokio::test]
async fn each_caller_sees_only_what_it_may_and_events_are_tallied() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    let feed = Arc::new(Feed::default());
    let state = AppState {
        store: Arc::new(store),
        prices: Arc::new(PriceTable::builtin()),
        unknown_model: UnknownModel::Reject,
        admin: AdminToken::from_secret(ADMIN),
        clock: Arc::new(now),
        hold_ttl_s: 600,
        api_body_size_bytes_max: 1 << 20,
        feed: feed.clone(),
        alerter: None,
    };
    let app = router(state);
    for id in ["acme", "globex"] {
        let r = call(&app, "POST", "/api/v1/accounts", ADMIN, Some(json!({"id": id, "tier": "team-standard"}))).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let key = json(call(&app, "POST", "/api/v1/accounts/acme/keys", ADMIN, Some(json!({}))).await).await;
    let acme_key = key["key"].as_str().unwrap().to_string();

    let r = call(&app, "GET", "/api/v1/stream", &acme_key, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut acme_stream = r.into_body();
    let mut admin_stream = call(&app, "GET", "/api/v1/stream", ADMIN, None).await.into_body();

    feed.publish(calls("globex", 3));
    feed.publish(calls("acme", 2));
    let (name, data) = next_event(&mut acme_stream).await.expect("acme's item");
    assert_eq!(name, "calls");
    assert_eq!(data["account"], "acme", "globex's item is not shown to acme's key");
    assert_eq!((data["calls"].as_u64(), data["charged_usd"].as_str()), (Some(2), Some("0.0012")));
    let (_, first) = next_event(&mut admin_stream).await.unwrap();
    let (_, second) = next_event(&mut admin_stream).await.unwrap();
    assert_eq!((first["account"].as_str(), second["account"].as_str()), (Some("globex"), Some("acme")));

    // A recorded event is tallied for the next window.
    let event = json!({"id": "e1", "account": "acme", "pool": "programmatic", "model": "claude-sonnet-4-5",
                       "usage": {"input_tokens": 100, "output_tokens": 20}});
    assert_eq!(call(&app, "POST", "/api/v1/events", ADMIN, Some(event)).await.status(), StatusCode::CREATED);
    let tallies = feed.take_tallies();
    assert_eq!(tallies.len(), 1);
    assert_eq!(tallies[0].0, ("acme".to_string(), PoolKind::Programmatic));
    assert_eq!(tallies[0].1, Tally { calls: 1, refused: 0, charged: Nanos(600_000), tokens: 120 });

    // Without a credential: 401.
    let r = app.clone().oneshot(Request::get("/api/v1/stream").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
