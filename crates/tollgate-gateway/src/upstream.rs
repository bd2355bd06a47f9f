//! Upstreams: where calls go, which models each serves, how tollgate authenticates to it, the
//! pooled HTTP(S) client that carries the calls, and the bound on an upstream body's silence.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
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

/// An upstream's response body whose silence is bounded: when the upstream sends nothing for
/// `idle` while the body waits for it, the body ends in [`BodyError::Silent`] (a cut), and
/// dropping it closes the connection. The time counts from the first wait after a frame, so a
/// client that reads slowly (and so polls late) never makes the upstream look silent.
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The timer runs: the body is waiting for the upstream's next frame.
    waiting: bool,
}

impl UpstreamBody {
    /// Needs a tokio runtime (the timer).
    pub fn new(inner: Incoming, idle: Duration) -> UpstreamBody {
        UpstreamBody { inner, idle, timer: Box::pin(tokio::time::sleep(idle)), waiting: false }
    }
}

/// How an upstream body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed or the upstream cut the body.
    Upstream(hyper::Error),
    /// The upstream sent nothing for this long.
    Silent(Duration),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Upstream(e) => write!(f, "the upstream's body failed: {e}"),
            BodyError::Silent(idle) => write!(f, "the upstream sent nothing for {} s", idle.as_secs_f64()),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Upstream(e) => Some(e),
            BodyError::Silent(_) => None,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        // The upstream first: what it already sent is never taken for silence.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::Upstream)));
        }
        if !this.waiting {
            this.waiting = true;
            let now = tokio::time::Instant::now();
            // A bound too far to be a time is none (a year is far enough).
            let deadline = now.checked_add(this.idle).unwrap_or(now + Duration::from_secs(365 * 86_400));
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                tracing::warn!(
                    idle_s = this.idle.as_secs_f64(),
                    "the upstream sent nothing within the idle bound; its body ends as a cut"
                );
                this.waiting = false;
                Poll::Ready(Some(Err(BodyError::Silent(this.idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
