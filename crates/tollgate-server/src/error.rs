//! The one error type of the management API and its single mapping to HTTP:
//! `{"error":{"code":…,"message":…}}`. Internal details go to the log, never to the client.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate_store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed or invalid; the message says what to fix.
    BadRequest(String),
    /// 401: no credential, or one tollgate does not know.
    Unauthorized(String),
    /// 403: a valid credential that may not do this.
    Forbidden(String),
    /// 404: no such thing, or not the caller's to see.
    NotFound(String),
    /// 405: a known route asked with a method it does not serve; the message names the allowed ones.
    MethodNotAllowed(String),
    /// 409: an idempotency id reused with different content, or a state that forbids the change.
    Conflict(String),
    /// 413.
    TooLarge(String),
    /// A refusal with a status and a stable code of its own (`hold_owned_by_gateway`).
    Denied { status: StatusCode, code: &'static str, message: String },
    /// 429: the credit does not cover the hold. `details` are extra fields of the error object.
    Refused { code: &'static str, message: String, retry_after_s: u64, details: Value },
    /// 500: ours; logged, not shown.
    Internal(String),
    /// 503: the store is away for a while (restarting, connection lost, disk full); logged, not
    /// shown. Retrying later is safe: every write has an idempotency id.
    Unavailable(String),
}

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(msg.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            StoreError::Refused(_) => ApiError::BadRequest(e.to_string()),
            StoreError::Corrupt(_) => ApiError::Internal(e.to_string()),
            StoreError::Backend(m) => ApiError::Internal(m),
            StoreError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// A query string that does not fit the handler's parameters. The inner error names the
/// parameter (`limit: "abc" is not a whole number`) or lists the known ones (unknown field).
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        let detail = std::error::Error::source(&rejection).map_or_else(|| rejection.body_text(), ToString::to_string);
        ApiError::BadRequest(format!("invalid query string: {detail}"))
    }
}

/// A path segment that does not fit the handler's parameters (all of ours are text, so in
/// practice: not UTF-8 once percent-decoded). A route and handler that disagree are our bug.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        let PathRejection::FailedToDeserializePathParams(e) = rejection else {
            return ApiError::Internal(format!("path parameters: {rejection}"));
        };
        match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => {
                ApiError::bad(format!("path parameter {key} is not valid UTF-8 once percent-decoded"))
            }
            ErrorKind::ParseErrorAtKey { key, value, expected_type } => {
                ApiError::bad(format!("path parameter {key} {value:?} must be a {expected_type}"))
            }
            ErrorKind::DeserializeError { key, value, message } => {
                ApiError::bad(format!("path parameter {key} {value:?}: {message}"))
            }
            _ if e.status().is_server_error() => ApiError::Internal(format!("path parameters: {}", e.body_text())),
            kind => ApiError::bad(format!("invalid path: {kind}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, extra) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m, None),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m, None),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m, None),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m, None),
            ApiError::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", m, None),
            ApiError::Denied { status, code, message } => (status, code, message, None),
            ApiError::Refused { code, message, retry_after_s, details } => {
                (StatusCode::TOO_MANY_REQUESTS, code, message, Some((retry_after_s, details)))
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log".to_string(), None)
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "the store is unavailable");
                let message = "the ledger's store is unavailable for now; retry the same request in a moment";
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message.to_string(), None)
            }
        };
        let mut error = json!({"code": code, "message": message});
        let mut response = match extra {
            Some((retry_after_s, details)) => {
                if let (Value::Object(e), Value::Object(d)) = (&mut error, details) {
                    e.extend(d);
                }
                let mut r = (status, axum::Json(json!({"error": error}))).into_response();
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                r.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
                r
            }
            None => (status, axum::Json(json!({"error": error}))).into_response(),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(STORE_RETRY_AFTER_S));
        }
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The `retry-after` of a 503: a store that is restarting is usually back within seconds.
const STORE_RETRY_AFTER_S: u64 = 1;

pub type ApiResult<T> = Result<T, ApiError>;
