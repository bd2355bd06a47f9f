//! Upstreams: where calls go, which models each serves, how tollgate authenticates to it, and
//! the pooled HTTP(S) client that carries the calls.

use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Anthropic,
    OpenAi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Replace the caller's credential with the upstream key; tollgate keys never leave.
    Gateway,
    /// Forward the caller's own credential; the tollgate key comes in `x-tollgate-key`.
    Passthrough,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    pub kind: Kind,
    /// Without a trailing slash; a path prefix is kept.
    pub base_url: String,
    /// The key sent upstream in `gateway` mode (read from the environment by the caller).
    pub api_key: Option<String>,
    /// Glob patterns (`*` matches any run of characters) of the models it serves.
    pub models: Vec<String>,
    pub auth: Auth,
}

impl Upstream {
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|p| glob_match(p, model))
    }
}

/// `*` matches any run of characters, everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// One pooled client for every upstream: HTTPS through rustls (webpki roots) and plain HTTP.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(tls)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("claude-*", "claude-opus-5-5"));
        assert!(glob_match("*", "gpt-5"));
        assert!(glob_match("gpt-5*", "gpt-5"));
        assert!(glob_match("gpt-*-mini", "gpt-4.1-mini"));
        assert!(!glob_match("gpt-*-mini", "gpt-5"));
        assert!(!glob_match("claude-*", "gpt-5"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("a*a", "a"));
    }
}
