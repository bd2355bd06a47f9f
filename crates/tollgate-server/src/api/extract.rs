//! Query-string and path extractors whose errors are the API's `{"error":{…}}` (axum's own
//! answer in plain text). Handlers take these, never `axum::extract::{Query, Path}`; the
//! rejections map to [`ApiError`] in one place (`error.rs`).

#![allow(clippy::disallowed_types, reason = "the one module that wraps axum's Query and Path")]

use std::num::IntErrorKind;
use std::str::FromStr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

use crate::error::ApiError;

/// `axum::extract::Query` with JSON errors that name the parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(value) = axum::extract::Query::from_request_parts(parts, state).await?;
        Ok(Query(value))
    }
}

/// `axum::extract::Path` with JSON errors that name the segment.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(value) = axum::extract::Path::from_request_parts(parts, state).await?;
        Ok(Path(value))
    }
}

/// An optional whole-number query parameter (`#[serde(default, deserialize_with = "whole_number")]`):
/// the error says what a value must be, not only that the text did not parse.
pub fn whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = std::num::ParseIntError>,
{
    let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
    match text.parse::<T>() {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), IntErrorKind::PosOverflow | IntErrorKind::NegOverflow) => {
            Err(D::Error::custom(format!("{text:?} is out of range")))
        }
        Err(_) => Err(D::Error::custom(format!("{text:?} is not a whole number; give digits such as 100"))),
    }
}
