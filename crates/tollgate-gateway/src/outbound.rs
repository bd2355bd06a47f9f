//! The request tollgate sends upstream: which upstream serves a call, the headers copied and
//! the credential it carries, and the send itself with its time bounds.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::error::GatewayError;
use crate::state::Gateway;
use crate::upstream::{Auth, Kind, Upstream, UpstreamBody};

pub(crate) fn no_upstream(kind: Kind, model: Option<&str>) -> GatewayError {
    let api = match kind {
        Kind::Anthropic => "anthropic",
        Kind::OpenAi => "openai",
    };
    match model {
        Some(m) => GatewayError::BadRequest(format!(
            "no upstream serves model {m:?} on the {api} route: add its name to the models of an [[upstream]] of kind \"{api}\" in tollgate.toml"
        )),
        None => GatewayError::BadRequest(format!("no upstream of kind \"{api}\" is configured in tollgate.toml")),
    }
}

pub(crate) fn pick_upstream<'a>(gw: &'a Gateway, kind: Kind, model: &str) -> Result<&'a Upstream, GatewayError> {
    gw.settings
        .upstreams
        .iter()
        .find(|u| u.kind == kind && u.serves(model))
        .ok_or_else(|| no_upstream(kind, Some(model)))
}

/// Headers never copied to the upstream: hop-by-hop ones, the length (recomputed), and every
/// `x-tollgate-*` header (tollgate's own: the key, the pool, and any other a client adds).
/// Credentials are handled apart.
fn copied(name: &HeaderName) -> bool {
    !name.as_str().starts_with("x-tollgate-")
        && !matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "x-api-key"
                | "authorization"
        )
}

/// Whether a credential header carries the tollgate key: `x-api-key: <key>` or
/// `Authorization: Bearer <key>` (any case of the scheme, spaces around the key ignored).
fn carries_tollgate_key(value: &HeaderValue, tollgate_key: &str) -> bool {
    let Ok(value) = value.to_str() else { return false };
    let value = value.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => value,
    };
    token == tollgate_key
}

pub(crate) fn upstream_request(
    upstream: &Upstream,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: bytes::Bytes,
    separate_tollgate_key: bool,
) -> Result<axum::http::Request<Body>, GatewayError> {
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("{}{}", upstream.base_url, path_and_query);
    let mut builder = axum::http::Request::builder().method(method).uri(&url);
    // A request builder has no headers only when it holds an error: here, the URI's.
    let out = builder.headers_mut().ok_or_else(|| {
        GatewayError::Internal(format!(
            "cannot build the upstream request: the URL made from upstream {:?}'s base_url is not a valid URI",
            upstream.name
        ))
    })?;
    for (name, value) in headers.iter().filter(|(n, _)| copied(n)) {
        out.append(name.clone(), value.clone());
    }
    match upstream.auth {
        Auth::Gateway => {
            if let Some(key) = &upstream.api_key {
                let value = HeaderValue::from_str(key)
                    .map_err(|_| GatewayError::Internal("the upstream key is not a valid header value".into()))?;
                match upstream.kind {
                    Kind::Anthropic => out.insert("x-api-key", value),
                    Kind::OpenAi => out.insert(
                        axum::http::header::AUTHORIZATION,
                        HeaderValue::from_str(&format!("Bearer {key}"))
                            .map_err(|_| GatewayError::Internal("bad upstream key".into()))?,
                    ),
                };
            }
        }
        Auth::Passthrough => {
            if !separate_tollgate_key {
                return Err(GatewayError::Unauthenticated(format!(
                    "upstream {} is in passthrough mode: send the tollgate key in x-tollgate-key and your own credential as usual",
                    upstream.name
                )));
            }
            // A client may send its tollgate key as its credential too (an SDK that sets
            // x-api-key from the same variable): that copy never leaves either.
            let tollgate_key = headers.get("x-tollgate-key").and_then(|v| v.to_str().ok()).map(str::trim);
            for name in ["x-api-key", "authorization"] {
                for v in headers.get_all(name) {
                    if !tollgate_key.is_some_and(|key| carries_tollgate_key(v, key)) {
                        out.append(name, v.clone());
                    }
                }
            }
        }
    }
    builder
        .body(Body::from(body))
        .map_err(|e| GatewayError::BadRequest(format!("cannot build the upstream request: {e}")))
}

/// Sends a request upstream: its answer's headers within `upstream_timeout`, its body with a
/// bound on silence ([`Settings::upstream_idle`]).
pub(crate) async fn send(
    gw: &Gateway,
    request: axum::http::Request<Body>,
) -> Result<axum::http::Response<UpstreamBody>, GatewayError> {
    match tokio::time::timeout(gw.settings.upstream_timeout, gw.client.request(request)).await {
        Err(_) => Err(GatewayError::Timeout(format!(
            "the upstream did not answer within {} s",
            gw.settings.upstream_timeout.as_secs()
        ))),
        Ok(Err(e)) => Err(GatewayError::Unreachable(format!("the upstream is unreachable: {e}"))),
        Ok(Ok(r)) => Ok(r.map(|body| UpstreamBody::new(body, gw.settings.upstream_idle()))),
    }
}
