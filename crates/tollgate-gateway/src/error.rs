//! Errors of the gateway routes, in the format of the API the caller speaks, so SDKs raise
//! their own exception types with tollgate's message.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::upstream::Kind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// 401: no or unknown tollgate key.
    Unauthenticated(String),
    /// 400: malformed request, unknown model, no upstream for the model.
    BadRequest(String),
    /// 413: body over the limit.
    TooLarge(String),
    /// 429: the pool cannot cover the call even after fitting it.
    Refused { message: String, retry_after_s: i64 },
    /// 502: the upstream is unreachable or broke the connection.
    Unreachable(String),
    /// 504: the upstream did not answer in time.
    Timeout(String),
    /// 500: tollgate's own failure.
    Internal(String),
    /// 503: the ledger's store is away for a while (restarting, connection lost, disk full); the
    /// call was not forwarded and nothing was charged. Retrying is safe.
    Unavailable(String),
}

/// The `retry-after` of a 503: a store that is restarting is usually back within seconds.
const STORE_RETRY_AFTER_S: &str = "1";

impl GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Refused { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn message(&self) -> &str {
        match self {
            GatewayError::Unauthenticated(m)
            | GatewayError::BadRequest(m)
            | GatewayError::TooLarge(m)
            | GatewayError::Unreachable(m)
            | GatewayError::Timeout(m)
            | GatewayError::Internal(m)
            | GatewayError::Unavailable(m) => m,
            GatewayError::Refused { message, .. } => message,
        }
    }

    /// The response in the caller's API format.
    pub fn into_response_for(self, kind: Kind) -> Response {
        let status = self.status();
        let message = self.message().to_string();
        let body = match kind {
            Kind::Anthropic => {
                let kind = match &self {
                    GatewayError::Unauthenticated(_) => "authentication_error",
                    GatewayError::BadRequest(_) => "invalid_request_error",
                    GatewayError::TooLarge(_) => "request_too_large",
                    GatewayError::Refused { .. } => "billing_error",
                    GatewayError::Timeout(_) => "timeout_error",
                    GatewayError::Unreachable(_) | GatewayError::Internal(_) | GatewayError::Unavailable(_) => {
                        "api_error"
                    }
                };
                serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
            }
            Kind::OpenAi => {
                let (kind, code) = match &self {
                    GatewayError::Unauthenticated(_) => ("invalid_request_error", "invalid_api_key"),
                    GatewayError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
                    GatewayError::TooLarge(_) => ("invalid_request_error", "request_too_large"),
                    GatewayError::Refused { .. } => ("insufficient_quota", "insufficient_quota"),
                    GatewayError::Timeout(_) => ("server_error", "timeout"),
                    GatewayError::Unreachable(_) | GatewayError::Internal(_) | GatewayError::Unavailable(_) => {
                        ("server_error", "server_error")
                    }
                };
                serde_json::json!({"error": {"type": kind, "code": code, "message": message, "param": null}})
            }
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let GatewayError::Unavailable(_) = self {
            response.headers_mut().insert("retry-after", HeaderValue::from_static(STORE_RETRY_AFTER_S));
        }
        if let GatewayError::Refused { retry_after_s, .. } = self {
            let headers = response.headers_mut();
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.max(0).to_string()) {
                headers.insert("retry-after", v);
            }
        }
        response
    }
}
