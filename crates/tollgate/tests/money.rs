//! Issue 12 end to end, as an attacker and a crash would try it: the real `tollgate serve` on a
//! fresh SQLite database, the testkit's mock upstream in this test, raw HTTP as the client.
//!
//! - An account key cannot end its own gateway call's hold (void, or settle at $0) while the call
//!   streams, nor can the admin: the call is charged what the upstream reported. A key attributes
//!   holds and events only to itself, and never sees a lease's id.
//! - Leases stay bounded: after hundreds of small calls one after another, what is held never
//!   passes two leases plus a call's worst case, and after `kill -9` and a restart what is charged
//!   as `unsettled` for work not in flight is at most two leases.

mod serve;

use std::path::Path;

use serde_json::{Value, json};
use serve::{Client, Server, usd_nanos};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_money-test-admin-token";
/// The default `lease_usd`.
const LEASE_NANOS: i64 = 1_000_000_000;

async fn setup(dir: &Path, mock: &MockUpstream) -> (Server, Client) {
    let server = Server::with_mock(dir, TOKEN, mock).await;
    let client = Client::new(&server, TOKEN);
    client.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    (server, client)
}

#[tokio::test]
async fn an_account_key_cannot_end_a_gateway_hold_or_speak_for_a_sibling_key() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let (_server, c) = setup(dir.path(), &mock).await;
    let (alice_id, alice) = c.key("alice", None).await;
    let (_bot_id, bot) = c.key("ci-bot", Some("0.01")).await;

    // A streaming call the upstream serves slowly: 100k in, 8k out of Sonnet 4.5 = $0.42.
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10000, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = c
        .message(&alice, body)
        .header("x-mock-usage", "100000,8000")
        .header("x-mock-delay-ms", "200")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let hold = format!("/api/v1/accounts/acme/holds/{id}");
    // While it streams, the caller's own key, and the admin, try to end its hold.
    for auth in [alice.as_str(), TOKEN] {
        let (status, v) = c.api(auth, reqwest::Method::POST, &format!("{hold}/void"), None).await;
        assert_eq!((status, v["error"]["code"].as_str()), (409, Some("hold_owned_by_gateway")), "void: {v}");
        let zero = json!({"cost_usd": "0"});
        let (status, v) = c.api(auth, reqwest::Method::POST, &format!("{hold}/settle"), Some(zero)).await;
        assert_eq!((status, v["error"]["code"].as_str()), (409, Some("hold_owned_by_gateway")), "settle: {v}");
    }
    r.text().await.unwrap();
    let (charged, held) = c.settled().await;
    assert_eq!((charged, held), (420_000_000, 0), "the served call is charged what the upstream reported");
    let events = c.events(TOKEN).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0]["id"].as_str(), events[0]["cost_usd"].as_str()), (Some(id.as_str()), Some("0.42")));

    // A key capped at $0.01 speaks only for itself.
    let sibling_event = json!({"id": "evt-sibling", "account": "acme", "pool": "programmatic",
        "model": "claude-sonnet-4-5", "usage": {"input_tokens": 100000}, "key": alice_id});
    let (status, v) = c.api(&bot, reqwest::Method::POST, "/api/v1/events", Some(sibling_event)).await;
    assert_eq!(status, 403, "an event in a sibling key's name: {v}");
    let sibling_hold = json!({"pool": "programmatic", "amount_usd": "0.5", "key": alice_id, "ttl_s": 3600});
    let (status, v) =
        c.api(&bot, reqwest::Method::POST, "/api/v1/accounts/acme/holds", Some(sibling_hold.clone())).await;
    assert_eq!(status, 403, "a hold in a sibling key's name: {v}");
    let own_hold = json!({"pool": "programmatic", "amount_usd": "0.5", "ttl_s": 3600});
    let (status, v) = c.api(&bot, reqwest::Method::POST, "/api/v1/accounts/acme/holds", Some(own_hold)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str(), v["error"]["scope"].as_str()),
        (429, Some("key_cap_reached"), Some("key_cap")),
        "{v}"
    );
    let own_event = json!({"id": "evt-own", "account": "acme", "pool": "programmatic",
        "model": "claude-sonnet-4-5", "usage": {"input_tokens": 1000}});
    let (status, v) = c.api(&bot, reqwest::Method::POST, "/api/v1/events", Some(own_event)).await;
    assert_eq!((status, v["event"]["key"].as_str()), (201, Some(_bot_id.as_str())), "an event is the key's own: {v}");
    let gateway_id = json!({"id": "tgr_0000", "pool": "programmatic", "amount_usd": "0.001"});
    let (status, v) = c.api(&bot, reqwest::Method::POST, "/api/v1/accounts/acme/holds", Some(gateway_id)).await;
    assert_eq!(status, 400, "the gateway's ids are reserved: {v}");
    assert_eq!(c.settled().await, (420_000_000 + 3_000_000, 0), "nothing else moved");

    // Small calls go on a lease; its id is shown to the admin, never to the key.
    for _ in 0..5 {
        let small =
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
        let r = c.message(&alice, small).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    c.settled().await;
    let leased = |events: &[Value]| {
        events.iter().filter(|e| e["hold"].as_str().is_some_and(|h| h.starts_with("lease_"))).count()
    };
    assert!(leased(&c.events(TOKEN).await) > 0, "some calls went on a lease");
    assert_eq!(leased(&c.events(&alice).await), 0, "no lease id is shown to a key");
}

#[tokio::test]
async fn leases_stay_bounded_through_many_small_calls_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let (mut server, c) = setup(dir.path(), &mock).await;
    let (_, secret) = c.key("bot", None).await;
    // Sonnet 4.5, max_tokens 1000: a worst case of about $0.0156 each, $0.0006 charged each.
    let body =
        json!({"model": "claude-sonnet-4-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let worst_case_max = 16_000_000;
    let mut held_max = 0;
    for _ in 0..300 {
        let r = c.message(&secret, body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
        let (_, held) = c.programmatic().await;
        held_max = held_max.max(held);
    }
    assert!(
        held_max <= 2 * LEASE_NANOS + worst_case_max,
        "held at most two leases and a call in flight, not {held_max} nano-USD"
    );
    // Every call's settle has landed (they run after the response ends): only leases are open.
    for _ in 0..200 {
        if c.events(TOKEN).await.len() >= 300 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (charged_before, held_at_kill) = c.programmatic().await;
    assert_eq!(charged_before, 300 * 600_000, "300 calls of 100 in + 20 out of Sonnet 4.5");
    server.kill();
    let server = Server::with_mock(dir.path(), TOKEN, &mock).await;
    let c = Client::new(&server, TOKEN);
    let (charged_after, held_after) = c.programmatic().await;
    assert_eq!(held_after, 0, "the holds left open are settled at start");
    let unsettled: i64 = c
        .events(TOKEN)
        .await
        .iter()
        .filter(|e| e["unsettled"] == true)
        .map(|e| usd_nanos(e["grant_usd"].as_str().unwrap()) + usd_nanos(e["overage_usd"].as_str().unwrap()))
        .sum();
    assert_eq!(charged_after - charged_before, unsettled, "the restart charged only the unsettled holds");
    assert!(
        unsettled <= held_at_kill && unsettled <= 2 * LEASE_NANOS,
        "charged {unsettled} nano-USD for work not in flight"
    );
}
