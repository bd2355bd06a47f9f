//! Alert delivery against a real local HTTP receiver: the webhook's signature verifies with the
//! secret, the event id header is set, Slack gets a readable message, and failures say whether
//! a retry can help, and a receiver that stalls fails the delivery at its 10 s bound.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tollgate_server::alerts::deliver::{Channel, Delivery, send};

type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

async fn receiver(status: StatusCode) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(|State((seen, status)): State<(Seen, StatusCode)>, headers: HeaderMap, body: axum::body::Bytes| async move {
                seen.lock().unwrap().push((headers, body.to_vec()));
                status
            }),
        )
        .with_state((seen.clone(), status));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn alert() -> Delivery {
    Delivery {
        id: "alr_0001".into(),
        body: json!({"id": "alr_0001", "kind": "threshold", "account": "acme", "pool": "programmatic", "percent": 80,
                     "used_usd": "40.1", "limit_usd": "50", "message": "acme programmatic pool passed 80% of its $50 limit"}),
        message: "acme programmatic pool passed 80% of its $50 limit".into(),
    }
}

#[tokio::test]
async fn webhook_is_signed_and_carries_the_event_id() {
    let (url, seen) = receiver(StatusCode::OK).await;
    let client = tollgate_gateway::upstream::http_client(Duration::from_secs(2));
    let channel = Channel::Webhook { url, secret: Some("s3cret".into()) };
    send(&client, &channel, &alert()).await.unwrap();
    let seen = seen.lock().unwrap();
    let (headers, body) = &seen[0];
    assert_eq!(headers["x-tollgate-event-id"], "alr_0001");
    assert_eq!(headers["content-type"], "application/json");
    // Verify as a receiver would: HMAC-SHA256 of the raw body under the shared secret.
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(headers["x-tollgate-signature"], expected.as_str());
    let parsed: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(parsed["percent"], 80);
    assert_eq!(parsed["account"], "acme");
}

#[tokio::test]
async fn slack_gets_a_readable_message() {
    let (url, seen) = receiver(StatusCode::OK).await;
    let client = tollgate_gateway::upstream::http_client(Duration::from_secs(2));
    send(&client, &Channel::Slack { url }, &alert()).await.unwrap();
    let seen = seen.lock().unwrap();
    let body: Value = serde_json::from_slice(&seen[0].1).unwrap();
    assert_eq!(body, json!({"text": "acme programmatic pool passed 80% of its $50 limit"}));
    assert!(!seen[0].0.contains_key("x-tollgate-signature"));
}

#[tokio::test]
async fn failures_say_whether_a_retry_can_help() {
    let client = tollgate_gateway::upstream::http_client(Duration::from_secs(2));
    let (down, _) = receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let e = send(&client, &Channel::Webhook { url: down, secret: None }, &alert()).await.unwrap_err();
    assert!(e.retry && e.message.contains("503"), "{e:?}");
    let (refusing, _) = receiver(StatusCode::BAD_REQUEST).await;
    let e = send(&client, &Channel::Webhook { url: refusing, secret: None }, &alert()).await.unwrap_err();
    assert!(!e.retry && e.message.contains("400"), "{e:?}");
    let (limited, _) = receiver(StatusCode::TOO_MANY_REQUESTS).await;
    assert!(send(&client, &Channel::Webhook { url: limited, secret: None }, &alert()).await.unwrap_err().retry);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let e = send(&client, &Channel::Webhook { url: format!("http://{closed}/hook"), secret: None }, &alert())
        .await
        .unwrap_err();
    assert!(e.retry && e.message.contains("unreachable"), "{e:?}");
    send(&client, &Channel::Log, &alert()).await.unwrap();
}

/// How a receiver that accepted a request fails to answer it.
#[derive(Clone, Copy)]
enum Stall {
    /// Reads the request and never answers.
    Silent,
    /// Answers the status line and headers, announcing a body it never sends.
    Body,
}

/// A receiver that reads each request whole and then stalls as `how` says, until the sender
/// closes the connection.
fn stalling_receiver(how: Stall) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if data.len() >= end + 4 + length {
                            break;
                        }
                    }
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                }
                if let Stall::Body = how {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\n");
                }
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    url
}

#[tokio::test]
async fn a_receiver_that_stalls_fails_the_delivery_at_the_10_s_bound() {
    let client = tollgate_gateway::upstream::http_client(Duration::from_secs(2));
    let silent = Channel::Webhook { url: stalling_receiver(Stall::Silent), secret: None };
    let body = Channel::Webhook { url: stalling_receiver(Stall::Body), secret: None };
    let alert = alert();
    // The minute only keeps a build without the bound from hanging the test run.
    let sent = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send(&client, &silent, &alert), send(&client, &body, &alert))
    })
    .await
    .expect("a delivery to a stalling receiver was not given up");
    for e in [sent.0.unwrap_err(), sent.1.unwrap_err()] {
        assert!(e.retry && e.message.contains("within 10 s"), "{e:?}");
    }
}
