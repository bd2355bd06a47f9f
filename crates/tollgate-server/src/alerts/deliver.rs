//! One delivery of one alert to one channel: `webhook` (JSON POST signed with HMAC-SHA256),
//! `slack` (an incoming-webhook message), `log` (a warning in tollgate's log). A failed delivery
//! says whether trying again can help; the outbox retries with [`backoff`].

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::Sha256;
use tollgate_gateway::upstream::HttpClient;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Channel {
    /// POST the alert JSON; signed when a secret is set.
    Webhook { url: String, secret: Option<String> },
    /// POST `{"text": message}` to a Slack incoming webhook.
    Slack { url: String },
    /// Write the alert to tollgate's log.
    Log,
}

/// An alert as delivered: its id (the de-duplication key), the webhook body of SPEC section 11,
/// and a sentence for people.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub id: String,
    pub body: Value,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failed {
    pub message: String,
    /// False when the receiver refused the alert itself (a 4xx other than 408/429): retrying
    /// the same request cannot succeed.
    pub retry: bool,
}

/// How long a delivery waits before its `attempt`-th retry (attempt 1 is the first retry):
/// 1 s doubling, at most 10 minutes.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64.checked_shl(attempt.saturating_sub(1)).unwrap_or(u64::MAX).min(600))
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`: the `x-tollgate-signature` header.
pub fn signature(secret: &str, body: &[u8]) -> String {
    #[allow(clippy::expect_used, reason = "HMAC takes keys of any length: new_from_slice cannot fail")]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Time allowed for one delivery in all: connecting, sending, and the answer's headers and body.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes one delivery, within [`DELIVERY_TIMEOUT`] in all: a receiver that accepts the request
/// and then stalls (before its headers or in its body) fails it at the bound, to be retried.
pub async fn send(client: &HttpClient, channel: &Channel, delivery: &Delivery) -> Result<(), Failed> {
    let (url, body, headers) = match channel {
        Channel::Log => {
            tracing::warn!(alert = %delivery.id, body = %delivery.body, "{}", delivery.message);
            return Ok(());
        }
        Channel::Webhook { url, secret } => {
            #[allow(clippy::expect_used, reason = "a JSON Value always serializes into a Vec")]
            let body = serde_json::to_vec(&delivery.body).expect("JSON values serialize");
            let mut headers = vec![("x-tollgate-event-id", delivery.id.clone())];
            if let Some(secret) = secret {
                headers.push(("x-tollgate-signature", signature(secret, &body)));
            }
            (url, body, headers)
        }
        Channel::Slack { url } => {
            #[allow(clippy::expect_used, reason = "a JSON object of one string always serializes into a Vec")]
            let body = serde_json::to_vec(&json!({ "text": delivery.message })).expect("JSON values serialize");
            (url, body, Vec::new())
        }
    };
    let mut request = Request::post(url.as_str()).header("content-type", "application/json");
    for (name, value) in headers {
        let value = HeaderValue::from_str(&value).map_err(|_| Failed { message: "bad header".into(), retry: false })?;
        request = request.header(name, value);
    }
    let request = request
        .body(Body::from(body))
        .map_err(|e| Failed { message: format!("{url} is not a valid URL: {e}"), retry: false })?;
    match tokio::time::timeout(DELIVERY_TIMEOUT, exchange(client, url, request)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failed {
            message: format!("{url} did not answer in full within {} s", DELIVERY_TIMEOUT.as_secs()),
            retry: true,
        }),
    }
}

/// Sends the request and reads the whole answer: its status decides the outcome.
async fn exchange(client: &HttpClient, url: &str, request: Request<Body>) -> Result<(), Failed> {
    let response = client
        .request(request)
        .await
        .map_err(|e| Failed { message: format!("{url} is unreachable: {e}"), retry: true })?;
    let status = response.status();
    // Read the answer so the connection can be reused; the bound of `send` covers this too.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        return Ok(());
    }
    let retry =
        status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS;
    Err(Failed { message: format!("{url} answered {status}"), retry })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_ten_minutes() {
        let secs: Vec<u64> = (1..=12).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(200).as_secs(), 600);
    }

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
