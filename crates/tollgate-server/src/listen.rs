//! Accepting client connections so that no client can starve the others (docs/gateway.md,
//! "Connections").
//!
//! - At most [`Limits::connections_max`] connections are open at once.
//! - A request's head must arrive within [`Limits::header_read_timeout`]; the same clock bounds
//!   how long a kept-alive connection waits for its next request. Its body must arrive within
//!   [`Limits::body_read_timeout`] of its head. A client that takes none of a response's bytes
//!   for [`Limits::response_stall_timeout`] is closed.
//! - At the limit, a new connection closes the one that has waited longest on its client (a
//!   half-sent head, a body still arriving, or an idle keep-alive). A connection serving a
//!   request, from its head until its response is flushed, a stream included, is never closed
//!   for another; when every connection is serving one, the new connection is closed at once.
//!
//! On shutdown, listening stops, connections without a request close at once, and requests in
//! progress finish.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tollgate_gateway::metrics::Metrics;
use tower_service::Service;

/// How many connections, and how long a client may take to send a request or take a response.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub response_stall_timeout: Duration,
}

/// The largest request head, and the most hyper buffers for a connection. hyper's default
/// (about 400 KiB) let each half-sent head hold that much memory, so the connection limit did
/// not bound the server's memory; SDKs send heads of a few KiB.
const HEAD_SIZE_BYTES_MAX: usize = 64 * 1024;

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
        // Leaves the table however this task ends, a handler's panic included.
        let _entry = Entry { table: table.clone(), id };
        let counts = Arc::new(Counts { evict: evict.clone(), ..Counts::default() });
        let unflushed: Unflushed = Arc::new(Mutex::new(None));
        let service = {
            let (table, metrics, counts, unflushed) =
                (table.clone(), metrics.clone(), counts.clone(), unflushed.clone());
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let busy = Busy::start(table.clone(), id, counts.clone());
                let body = Deadline::apply(request.into_parts(), limits.body_read_timeout, &busy, metrics.clone());
                let response = app.clone().call(body);
                let unflushed = unflushed.clone();
                async move {
                    let response = match response.await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    // Answering: whatever became of its body, the request is served now.
                    busy.serve();
                    Ok::<_, Infallible>(response.map(|body| Body::new(Tracked { body, busy: Some(busy), unflushed })))
                }
            })
        };
        let socket = Socket {
            stream,
            stall: None,
            stall_timeout: limits.response_stall_timeout,
            unflushed: unflushed.clone(),
            metrics: metrics.clone(),
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(HEAD_SIZE_BYTES_MAX);
        let connection = builder.serve_connection(TokioIo::new(socket), service);
        tokio::pin!(connection);
        if *closing.borrow() {
            return;
        }
        let mut shutting_down = false;
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
                // Closed to make room for a new connection. It waits on its client (dropping
                // it closes the socket) unless a request started after it was chosen: that
                // one is served, then the connection closes — at once if the request comes
                // to wait for its body, which notifies again.
                () = evict.notified() => {
                    counts.evicted.store(true, Ordering::SeqCst);
                    if counts.serving.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    connection.as_mut().graceful_shutdown();
                }
                // hyper's graceful shutdown waits for a first request's head (up to the header
                // timeout): a connection without a request is closed here instead.
                changed = closing.changed(), if !shutting_down => {
                    shutting_down = true;
                    if changed.is_err() || counts.requests.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A connection's place in the [`Table`], given up when its task ends.
struct Entry {
    table: Arc<Table>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}

/// What one connection is doing, as its own task sees it: requests from head until their
/// response is flushed, and of those, the ones not waiting on their client.
#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    serving: AtomicUsize,
    /// Chosen to make room while it served: it no longer counts in the table, so it closes as
    /// soon as it serves nothing (told through `evict`).
    evicted: std::sync::atomic::AtomicBool,
    evict: Arc<Notify>,
}

impl Counts {
    fn served_one(&self) {
        if self.serving.fetch_sub(1, Ordering::SeqCst) == 1 && self.evicted.load(Ordering::SeqCst) {
            self.evict.notify_one();
        }
    }
}

/// The open connections, and those of them waiting on their client, oldest first.
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
    /// Since when it has waited on its client; None while it serves a request.
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
            let open = inner.open.remove(&oldest);
            debug_assert!(open.is_some(), "every waiting connection is open");
            if let Some(open) = open {
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

    /// A request on `id` is served: it cannot be closed for another connection.
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

    /// A request on `id` ended, or waits on its client (for its body) since `since`.
    fn request_ended(&self, id: u64, since: Instant) {
        let mut inner = self.lock();
        let Inner { open, waiting, .. } = &mut *inner;
        if let Some(open) = open.get_mut(&id) {
            // Called from drops too, where a panic would abort: debug builds check.
            debug_assert!(open.in_progress > 0, "a request ends only once it started");
            open.in_progress = open.in_progress.saturating_sub(1);
            if open.in_progress == 0 {
                debug_assert!(open.waiting_since.is_none());
                open.waiting_since = Some(since);
                waiting.insert((since, id));
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

/// A request on a connection, from its head until its response is flushed (or dropped). While
/// it serves, the connection cannot be closed to make room; while it waits for its body, the
/// connection waits on its client, as one sending a head does, since the head's arrival.
struct Busy {
    table: Arc<Table>,
    id: u64,
    counts: Arc<Counts>,
    head_at: Instant,
    /// Whether it serves (rather than waits for its body); changed with the table under this lock.
    serving: Mutex<bool>,
}

impl Busy {
    /// A request whose head just arrived: it serves until it waits for its body.
    fn start(table: Arc<Table>, id: u64, counts: Arc<Counts>) -> Arc<Busy> {
        counts.requests.fetch_add(1, Ordering::SeqCst);
        let busy = Busy { table, id, counts, head_at: Instant::now(), serving: Mutex::new(false) };
        busy.serve();
        Arc::new(busy)
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.serving.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn serve(&self) {
        let mut serving = self.lock();
        if !*serving {
            *serving = true;
            self.counts.serving.fetch_add(1, Ordering::SeqCst);
            self.table.request_started(self.id);
        }
    }

    fn wait_for_body(&self) {
        let mut serving = self.lock();
        if *serving {
            *serving = false;
            self.table.request_ended(self.id, self.head_at);
            self.counts.served_one();
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let serving = *self.lock();
        if serving {
            self.table.request_ended(self.id, Instant::now());
            self.counts.served_one();
        }
        self.counts.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The request whose response body has ended but may still sit in hyper's buffer; the socket
/// ends it once a flush completes.
type Unflushed = Arc<Mutex<Option<Arc<Busy>>>>;

/// A response body that keeps its connection busy until it is sent.
struct Tracked {
    body: Body,
    busy: Option<Arc<Busy>>,
    unflushed: Unflushed,
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

impl Drop for Tracked {
    /// hyper drops a body once it has taken its last frame, before that frame is written: the
    /// request stays busy until the socket has taken it.
    fn drop(&mut self) {
        let busy = self.busy.take();
        *self.unflushed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = busy;
    }
}

/// The client socket: a write the client takes no byte of for `stall_timeout` fails, and a
/// completed flush ends the request whose response it carried.
struct Socket {
    stream: TcpStream,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_timeout: Duration,
    unflushed: Unflushed,
    metrics: Metrics,
}

impl Socket {
    fn written<T>(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.stall = None;
            return written;
        }
        let timeout = self.stall_timeout;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.connection_closed("response_stall");
                let message = format!("the client took no byte of the response for {} s", timeout.as_secs());
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if flushed.is_ready() {
            let busy = self.unflushed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            drop(busy);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that fails once its time is up, so a client cannot hold a connection busy by
/// sending its body slowly; while it waits for the client, so does its connection.
struct Deadline {
    body: Incoming,
    expires: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    busy: Weak<Busy>,
    metrics: Metrics,
}

impl Deadline {
    /// `request` with its body under a deadline of `timeout` from now.
    fn apply(
        (parts, body): (axum::http::request::Parts, Incoming),
        timeout: Duration,
        busy: &Arc<Busy>,
        metrics: Metrics,
    ) -> axum::http::Request<Body> {
        let expires = Box::pin(tokio::time::sleep(timeout));
        let deadline = Deadline { body, expires, timeout, busy: Arc::downgrade(busy), metrics };
        axum::http::Request::from_parts(parts, Body::new(deadline))
    }

    fn busy(&self, serving: bool) {
        if let Some(busy) = self.busy.upgrade() {
            if serving { busy.serve() } else { busy.wait_for_body() }
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.busy(true);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.expires.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.busy(true);
                    this.metrics.connection_closed("body_timeout");
                    let message = format!(
                        "the request body did not arrive within {} s of its head (server.body_read_timeout_s)",
                        this.timeout.as_secs()
                    );
                    Poll::Ready(Some(Err(message.into())))
                }
                Poll::Pending => {
                    this.busy(false);
                    Poll::Pending
                }
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

    /// `serve` on a free port of 127.0.0.1 with `app`; its address, metrics and the sender
    /// that stops it.
    async fn serving(app: Router, limits: Limits) -> (std::net::SocketAddr, Metrics, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Metrics::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, limits, metrics.clone(), async move {
            let _ = stopped.await;
        }));
        (address, metrics, stop)
    }

    fn limits(connections_max: usize) -> Limits {
        Limits {
            connections_max,
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            response_stall_timeout: Duration::from_secs(60),
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen within 5 s");
    }

    #[tokio::test]
    async fn a_handler_that_panics_leaves_no_connection_behind() {
        async fn panics() -> &'static str {
            panic!("a handler panics")
        }
        let app = Router::new().route("/panic", axum::routing::get(panics));
        let (address, metrics, _stop) = serving(app, limits(4)).await;
        for _ in 0..3 {
            let mut socket = TcpStream::connect(address).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut socket, b"GET /panic HTTP/1.1\r\nhost: t\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut answer).await;
        }
        until("the panicked connections leave the table", || metrics.connections_open.get() == 0).await;
    }

    #[test]
    fn a_request_waiting_for_its_body_waits_on_its_client_since_its_head() {
        let t = Arc::new(table(2));
        let counts = Arc::new(Counts::default());
        let (a, _) = t.admit(Instant::now()).unwrap();
        let busy = Busy::start(t.clone(), a, counts.clone());
        assert!(t.lock().waiting.is_empty(), "a head makes its connection serve");
        busy.wait_for_body();
        assert_eq!(t.lock().waiting.first(), Some(&(busy.head_at, a)));
        assert_eq!((counts.requests.load(Ordering::SeqCst), counts.serving.load(Ordering::SeqCst)), (1, 0));
        busy.serve();
        drop(busy);
        assert_eq!((counts.requests.load(Ordering::SeqCst), counts.serving.load(Ordering::SeqCst)), (0, 0));
        assert_eq!(t.lock().waiting.len(), 1);
    }

    #[test]
    fn a_connection_evicted_while_serving_is_told_again_once_it_serves_nothing() {
        let t = Arc::new(table(1));
        let (a, evict) = t.admit(Instant::now()).unwrap();
        let counts = Arc::new(Counts { evict: evict.clone(), ..Counts::default() });
        // The head arrived as the table chose the connection: the request is served...
        let busy = Busy::start(t.clone(), a, counts.clone());
        counts.evicted.store(true, Ordering::SeqCst);
        assert!(futures_util::FutureExt::now_or_never(evict.notified()).is_none());
        // ...but once it waits for its body, the connection is told to close.
        busy.wait_for_body();
        assert!(futures_util::FutureExt::now_or_never(evict.notified()).is_some());
    }
}
