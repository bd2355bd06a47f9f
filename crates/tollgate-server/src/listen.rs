//! Accepting client connections so that no client can starve the others (docs/gateway.md,
//! "Connections").
//!
//! - At most [`Limits::connections_max`] connections are open at once.
//! - A request's head must arrive within [`Limits::header_read_timeout`]; the same clock bounds
//!   how long a kept-alive connection waits for its next request. Its body must arrive within
//!   [`Limits::body_read_timeout`] of its head.
//! - At the limit, a new connection closes the one that has waited longest without a request in
//!   progress (a half-sent head, or an idle keep-alive). A connection serving a request, a
//!   stream included, is never closed for another; when every connection is serving one, the
//!   new connection is closed at once.
//!
//! On shutdown, listening stops, idle connections close, and requests in progress finish.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tollgate_gateway::metrics::Metrics;
use tower_service::Service;

/// How many connections, and how long a client may take to send a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

/// Files the process keeps for itself besides client connections: the database, its journal,
/// the listener, logs, alert deliveries.
const FILES_RESERVED: u64 = 64;

/// The connection limit when none is configured: raises the soft open-file limit to the hard
/// one, keeps [`FILES_RESERVED`] files, and halves the rest, since every gateway call in flight
/// holds an upstream connection beside its client's.
pub fn default_connections_max() -> usize {
    let files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let max = files.saturating_sub(FILES_RESERVED) / 2;
    usize::try_from(max.max(1)).unwrap_or(usize::MAX)
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then lets requests in
/// progress finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let table = Arc::new(Table::new(limits.connections_max, metrics.clone()));
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of files or memory, or a connection reset before it was accepted:
                    // wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some((id, evict)) = table.admit(Instant::now()) else {
            metrics.connection_closed("refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection { id, table: table.clone(), app: app.clone(), limits, metrics: metrics.clone() };
        tokio::spawn(connection.run(stream, evict, closing_rx.clone()));
    }
    drop(listener);
    drop(closing_rx);
    closing.send_replace(true);
    // Every connection task holds a receiver: this waits for the last one to end.
    closing.closed().await;
}

struct Connection {
    id: u64,
    table: Arc<Table>,
    app: Router,
    limits: Limits,
    metrics: Metrics,
}

impl Connection {
    async fn run(self, stream: TcpStream, evict: Arc<Notify>, mut closing: watch::Receiver<bool>) {
        let Connection { id, table, app, limits, metrics } = self;
        let service = {
            let table = table.clone();
            let metrics = metrics.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let busy = Busy::start(table.clone(), id);
                let body = Deadline::apply(request.into_parts(), limits.body_read_timeout, metrics.clone());
                let response = app.clone().call(body);
                async move {
                    let response = match response.await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    Ok::<_, Infallible>(response.map(|body| Body::new(Tracked { body, _busy: busy })))
                }
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut shutting_down = *closing.borrow();
        if shutting_down {
            connection.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        if e.is_timeout() {
                            metrics.connection_closed("header_timeout");
                        } else {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                    }
                    break;
                }
                // Closed to make room for a new connection: dropping it closes the socket.
                () = evict.notified() => break,
                changed = closing.changed(), if !shutting_down => {
                    shutting_down = true;
                    if changed.is_ok() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        table.remove(id);
    }
}

/// The open connections, and those of them waiting for a request, oldest first.
struct Table {
    max: usize,
    metrics: Metrics,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Open>,
    waiting: BTreeSet<(Instant, u64)>,
}

struct Open {
    /// Since when it has waited for a request; None while it serves one.
    waiting_since: Option<Instant>,
    in_progress: u32,
    evict: Arc<Notify>,
}

impl Table {
    fn new(max: usize, metrics: Metrics) -> Table {
        Table { max, metrics, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The table holds no invariant a panic could break halfway: go on with it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Room for a new connection (its id and the signal that closes it), making room at the
    /// limit by closing the longest-waiting connection; None when every connection is busy.
    fn admit(&self, now: Instant) -> Option<(u64, Arc<Notify>)> {
        let mut inner = self.lock();
        if inner.open.len() >= self.max {
            let (_, oldest) = inner.waiting.pop_first()?;
            if let Some(open) = inner.open.remove(&oldest) {
                open.evict.notify_one();
                self.metrics.connection_closed("evicted");
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = Arc::new(Notify::new());
        inner.open.insert(id, Open { waiting_since: Some(now), in_progress: 0, evict: evict.clone() });
        inner.waiting.insert((now, id));
        self.metrics.connections_open.set(inner.open.len() as i64);
        Some((id, evict))
    }

    fn request_started(&self, id: u64) {
        let mut inner = self.lock();
        let Inner { open, waiting, .. } = &mut *inner;
        if let Some(open) = open.get_mut(&id) {
            open.in_progress += 1;
            if let Some(since) = open.waiting_since.take() {
                waiting.remove(&(since, id));
            }
        }
    }

    fn request_ended(&self, id: u64, now: Instant) {
        let mut inner = self.lock();
        let Inner { open, waiting, .. } = &mut *inner;
        if let Some(open) = open.get_mut(&id) {
            open.in_progress = open.in_progress.saturating_sub(1);
            if open.in_progress == 0 {
                open.waiting_since = Some(now);
                waiting.insert((now, id));
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(open) = inner.open.remove(&id)
            && let Some(since) = open.waiting_since
        {
            inner.waiting.remove(&(since, id));
        }
        self.metrics.connections_open.set(inner.open.len() as i64);
    }
}

/// A request in progress on a connection, from its head until its response's body is sent
/// (or dropped): the connection cannot be closed to make room meanwhile.
struct Busy {
    table: Arc<Table>,
    id: u64,
}

impl Busy {
    fn start(table: Arc<Table>, id: u64) -> Busy {
        table.request_started(id);
        Busy { table, id }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.table.request_ended(self.id, Instant::now());
    }
}

/// A response body that keeps its connection busy until it is sent.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails once its time is up, so a client cannot hold a connection busy by
/// sending its body slowly.
struct Deadline {
    body: Incoming,
    expires: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    metrics: Metrics,
}

impl Deadline {
    /// `request` with its body under a deadline of `timeout` from now.
    fn apply(
        (parts, body): (axum::http::request::Parts, Incoming),
        timeout: Duration,
        metrics: Metrics,
    ) -> axum::http::Request<Body> {
        let deadline = Deadline { body, expires: Box::pin(tokio::time::sleep(timeout)), timeout, metrics };
        axum::http::Request::from_parts(parts, Body::new(deadline))
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.expires.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.metrics.connection_closed("body_timeout");
                    let message = format!(
                        "the request body did not arrive within {} s of its head (server.body_read_timeout_s)",
                        this.timeout.as_secs()
                    );
                    Poll::Ready(Some(Err(message.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize) -> Table {
        Table::new(max, Metrics::default())
    }

    #[test]
    fn at_the_limit_the_longest_waiting_connection_makes_room_and_a_busy_one_never_does() {
        let t = table(3);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let (a, evict_a) = t.admit(at(0)).unwrap();
        let (b, evict_b) = t.admit(at(1)).unwrap();
        let (c, _) = t.admit(at(2)).unwrap();
        // a serves a request (a stream, say); b and c wait.
        t.request_started(a);
        let (d, _) = t.admit(at(3)).unwrap();
        assert!(!t.lock().open.contains_key(&b), "b waited longest");
        assert!(t.lock().open.contains_key(&a), "a is busy");
        // b's task is told to close.
        assert!(futures_util::FutureExt::now_or_never(evict_b.notified()).is_some());
        assert!(futures_util::FutureExt::now_or_never(evict_a.notified()).is_none());
        // c and d start requests too: nothing waits, so a fifth is refused.
        t.request_started(c);
        t.request_started(d);
        assert!(t.admit(at(4)).is_none(), "every connection is serving a request");
        // a's stream ends: it waits again, so it makes room next.
        t.request_ended(a, at(5));
        let (_e, _) = t.admit(at(6)).unwrap();
        assert!(!t.lock().open.contains_key(&a));
        assert_eq!(t.lock().open.len(), 3);
    }

    #[test]
    fn a_closed_connection_leaves_no_trace() {
        let t = table(2);
        let (a, _) = t.admit(Instant::now()).unwrap();
        t.request_started(a);
        t.request_ended(a, Instant::now());
        t.remove(a);
        let inner = t.lock();
        assert!(inner.open.is_empty() && inner.waiting.is_empty());
    }
}
