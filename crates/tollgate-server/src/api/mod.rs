//! The management API router (SPEC section 5) and the checks its handlers share.

mod accounts;
mod alerts;
mod extract;
mod ledger;
mod meta;
mod planning;
mod reports;
mod stream;

pub use ledger::{EventRules, validate_events};

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::AppState;
use crate::error::ApiError;

/// The whole HTTP surface, without a socket.
pub fn router(state: AppState) -> Router {
    let body_limit = state.api_body_size_bytes_max;
    let routes = Router::new()
        .route("/healthz", get(meta::healthz))
        .route("/readyz", get(meta::readyz))
        .route("/api/v1/openapi.json", get(meta::openapi))
        .route("/api/v1/tiers", get(meta::tiers))
        .route("/api/v1/tiers/{id}", put(meta::put_tier))
        .route("/api/v1/prices", get(meta::prices))
        .route("/api/v1/prices/{model}", get(meta::price))
        .route("/api/v1/accounts", get(accounts::list).post(accounts::create))
        .route("/api/v1/accounts/{id}", get(accounts::get).patch(accounts::update))
        .route("/api/v1/accounts/{id}/balance", get(ledger::balance))
        .route("/api/v1/accounts/{id}/pools", get(accounts::pools))
        .route("/api/v1/accounts/{id}/pools/{pool}", put(accounts::set_pool))
        .route("/api/v1/accounts/{id}/grants", get(accounts::grants).post(accounts::add_grant))
        .route("/api/v1/accounts/{id}/keys", get(accounts::keys).post(accounts::create_key))
        .route("/api/v1/accounts/{id}/keys/{key}", axum::routing::delete(accounts::revoke_key))
        .route("/api/v1/accounts/{id}/events", get(ledger::list_events))
        .route("/api/v1/accounts/{id}/report", get(reports::report))
        .route("/api/v1/accounts/{id}/forecast", get(planning::forecast))
        .route("/api/v1/accounts/{id}/plan", post(planning::plan_job))
        .route("/api/v1/accounts/{id}/advice/tier", get(planning::advise_tier))
        .route("/api/v1/accounts/{id}/advice/model", get(planning::advise_model))
        .route("/api/v1/events", post(ledger::post_events))
        .route("/api/v1/accounts/{id}/holds", post(ledger::create_hold))
        .route("/api/v1/accounts/{id}/holds/{hold}", get(ledger::get_hold))
        .route("/api/v1/accounts/{id}/holds/{hold}/settle", post(ledger::settle_hold))
        .route("/api/v1/accounts/{id}/holds/{hold}/void", post(ledger::void_hold))
        .route("/api/v1/stream", get(stream::stream))
        .route("/api/v1/alerts", get(alerts::list))
        .route("/api/v1/alerts/test", post(alerts::test))
        .route("/api/v1/alert-rules", get(alerts::rules).post(alerts::put_rule))
        .route("/api/v1/alert-rules/{id}", axum::routing::delete(alerts::delete_rule))
        .fallback(|| async { ApiError::NotFound("no such route; see /api/v1/openapi.json".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    // axum adds a 405's `Allow` header outside every layer of `routes`, so the JSON error that
    // names the allowed methods is made one router up.
    Router::new().fallback_service(routes).layer(middleware::from_fn(method_not_allowed))
}

/// A known route asked with a method it does not serve: the API's JSON error, naming the method
/// and the allowed ones (axum's own answer is an empty body with an `Allow` header, kept).
async fn method_not_allowed(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let allowed: Vec<&str> = allow
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    let message = if allowed.is_empty() {
        format!("{method} is not allowed on {path}")
    } else {
        format!("{method} is not allowed on {path}; allowed: {}", allowed.join(", "))
    };
    let mut response = ApiError::MethodNotAllowed(message).into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// One log line per request: method, path (no query, no headers: no secrets), status, time.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// An id of ours or of another system: 1–128 characters of `A-Z a-z 0-9 . _ : @ / -`.
pub fn check_id(id: &str, what: &str) -> Result<(), ApiError> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!("{what} {id:?} must be 1–128 characters of letters, digits and . _ : @ / -")))
    }
}

/// Labels: at most 32, keys 1–64 characters of `A-Z a-z 0-9 . _ -`, values at most 256
/// characters without control characters.
pub fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 32 {
        return Err(ApiError::bad(format!("{} labels: at most 32 allowed", labels.len())));
    }
    for (k, v) in labels {
        let key_ok =
            !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !key_ok {
            return Err(ApiError::bad(format!("label name {k:?} must be 1–64 letters, digits, . _ or -")));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(ApiError::bad(format!(
                "label {k:?} must be at most 256 characters without control characters"
            )));
        }
    }
    Ok(())
}

/// A short free-text field (source, name, note, model…): at most `max` characters, no control
/// characters.
pub fn check_text(text: &str, what: &str, max: usize) -> Result<(), ApiError> {
    if text.len() > max || text.chars().any(char::is_control) {
        return Err(ApiError::bad(format!("{what} must be at most {max} characters without control characters")));
    }
    Ok(())
}

pub fn parse_pool(pool: &str) -> Result<tollgate_core::PoolKind, ApiError> {
    tollgate_core::PoolKind::parse(pool)
        .ok_or_else(|| ApiError::bad(format!("unknown pool {pool:?}: use interactive or programmatic")))
}
