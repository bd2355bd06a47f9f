//! The JSON body extractor: parse errors name the field at fault and what was expected.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// Parses a request body as JSON, with errors that point at the field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| error("JSON body", e))?;
    de.end().map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Converts an already-parsed JSON value, with the same error messages.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| error(what, e))
}

/// `invalid {what} at usage.input_tokens: …`, or without `at` when the error has no known
/// place (a body cut short reports its unknown next key as `?`).
fn error(what: &str, e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let mut known = path.as_str();
    while let Some(parent) = known.strip_suffix(".?") {
        known = parent;
    }
    let inner = e.into_inner();
    if known.is_empty() || known == "." || known == "?" {
        ApiError::bad(format!("invalid {what}: {inner}"))
    } else {
        ApiError::bad(format!("invalid {what} at {known}: {inner}"))
    }
}

pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.starts_with("application/json") || ct.is_empty());
        if !is_json {
            return Err(ApiError::bad("send the body as JSON with Content-Type: application/json"));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!(
                    "request body is larger than {} bytes; send smaller batches",
                    state.api_body_size_bytes_max
                ))
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            }
        })?;
        parse(&bytes).map(Json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dto::EventIn;

    fn message(body: &str) -> String {
        match parse::<EventIn>(body.as_bytes()) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{body:?} parsed: {other:?}"),
        }
    }

    #[test]
    fn errors_without_a_known_place_say_no_place() {
        for (body, want) in [
            ("", "invalid JSON body: EOF while parsing a value"),
            ("{", "invalid JSON body: EOF while parsing an object"),
            (r#"{"id":"evt-x","account":"acme","#, "invalid JSON body: EOF while parsing a value"),
            (r#"{"usage":{"input_tokens":1"#, "invalid JSON body at usage: EOF while parsing an object"),
            (r#"{"usage":{"input_tokens":"#, "invalid JSON body at usage.input_tokens: EOF"),
            (r#"{"labels":{"a":"#, "invalid JSON body at labels.a: EOF"),
        ] {
            let m = message(body);
            assert!(m.starts_with(want), "{body:?}: {m}");
            assert!(!m.contains('?'), "{body:?}: {m}");
        }
    }
}
