//! A mock upstream for tests and benchmarks. It speaks both APIs (JSON and SSE) and reports the
//! usage the test asks for; it knows no prices. Each request is steered by headers, which the
//! gateway forwards like any other:
//!
//! - `x-mock-usage: input,output[,cache_5m,cache_1h,cache_read,web_search]` (default `100,20`)
//! - `x-mock-status: 529` — answer this error status in the API's error format
//! - `x-mock-delay-ms: 200` — wait this long before each SSE event (and before a JSON answer, an
//!   error status or a `count_tokens` answer)
//! - `x-mock-cut-after: 3` — break the connection after this many SSE events
//! - `x-mock-input-tokens: 5000` — what `count_tokens` answers
//! - `x-mock-usage-raw: -5` — every usage count is reported as this JSON text verbatim (Anthropic
//!   route): `"lots"`, `-5`, `12.5`, `18446744073709551616` (2^64, one past `u64::MAX`)
//! - `x-mock-no-message-start: 1` — the stream has no `message_start` event
//! - `x-mock-delta-usage: output` — `message_delta` reports only `output_tokens` (no input counts)
//! - `x-mock-output-steps: 500,30` — `message_delta` events reporting these `output_tokens` come
//!   before the final one (whose count is the usage's): cumulative usage that goes down
//! - `x-mock-split-events: 1` — each SSE event is sent in two writes, its first line and the rest
//!   (`x-mock-delay-ms` before each; `x-mock-cut-after` then counts writes)
//! - `x-mock-json-chunks: 2` — a JSON answer is sent in this many pieces, `x-mock-delay-ms`
//!   apart (the first at once, with the headers)
//! - `x-mock-write-bytes: 1024` — every SSE write is cut into writes of at most this many bytes
//!   (`x-mock-delay-ms` and `x-mock-cut-after` still count events, or halves of events)
//! - `x-mock-big-event-bytes: 8388608` — the OpenAI stream carries one more text chunk, an SSE
//!   event of this many bytes (its `content` padded with `a`), before the final one
//! - `x-mock-stall-after: 2` — after this many SSE events (or JSON pieces, or, for `count_tokens`,
//!   its first piece) the body stays open and sends nothing more, ever
//! - `x-mock-hang: 1` — never answer, not even the headers (the connection stays open)
//! - `x-mock-trickle-ms: 5` — wait this long before each write of an SSE body (with
//!   `x-mock-write-bytes: 1`, a byte at a time)
//! - `x-mock-error-after: 3` — the Anthropic stream sends this many events, then an `error`
//!   event (`overloaded_error`, as the API sends when it fails mid-stream), and ends
//! - `x-mock-count-tokens-pad-bytes: 67108864` — `count_tokens` answers
//!   `{"input_tokens":N,"pad":"xx…"}` with this many bytes of padding, made as the client reads
//!   them; [`MockUpstream::padding_sent`] tells how many bytes were made
//!
//! Every request received is kept (method, path and query, headers, body) for assertions.

#![allow(clippy::expect_used, reason = "test and benchmark machinery: a failed expectation aborts the run")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Received {
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct Mock {
    received: Arc<Mutex<Vec<Received>>>,
    /// Bytes of `count_tokens` padding made so far (`x-mock-count-tokens-pad-bytes`).
    padding_sent: Arc<AtomicU64>,
}

/// A running mock upstream.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub mock: Mock,
}

impl MockUpstream {
    /// Starts on 127.0.0.1 on a free port, in the current tokio runtime.
    pub async fn start() -> MockUpstream {
        let mock = Mock::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let app = router(mock.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the mock serves");
        });
        MockUpstream { addr, mock }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.mock.received.lock().expect("mock log").clone()
    }

    /// Bytes of `count_tokens` padding made so far: hyper makes them only as fast as the client
    /// reads them (and the socket buffers take them), so a client that stops reading stops it.
    pub fn padding_sent(&self) -> u64 {
        self.mock.padding_sent.load(Ordering::Relaxed)
    }
}

pub fn router(mock: Mock) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(mock)
}

struct Steer {
    usage: [u64; 6],
    status: Option<u16>,
    delay: Duration,
    cut_after: Option<usize>,
    /// JSON text that replaces every usage count.
    usage_raw: Option<String>,
    no_message_start: bool,
    delta_usage_output_only: bool,
    output_steps: Vec<u64>,
    json_chunks: Option<usize>,
    split_events: bool,
    write_bytes: Option<usize>,
    big_event_bytes: Option<usize>,
    stall_after: Option<usize>,
    count_tokens_pad_bytes: Option<u64>,
    hang: bool,
    trickle: Duration,
    error_after: Option<usize>,
}

/// Stands for a usage count in the JSON text until `x-mock-usage-raw` replaces it.
const RAW: &str = "__mock_raw_count__";

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn steer(headers: &HeaderMap) -> Steer {
    let mut usage = [100, 20, 0, 0, 0, 0];
    if let Some(v) = headers.get("x-mock-usage").and_then(|v| v.to_str().ok()) {
        let parts: Vec<u64> = v.split(',').filter_map(|p| p.trim().parse().ok()).collect();
        let order = [0, 1, 2, 3, 4, 5];
        for (i, p) in parts.iter().enumerate().take(6) {
            usage[order[i]] = *p;
        }
    }
    Steer {
        usage,
        status: header_u64(headers, "x-mock-status").map(|s| s as u16),
        delay: Duration::from_millis(header_u64(headers, "x-mock-delay-ms").unwrap_or(0)),
        cut_after: header_u64(headers, "x-mock-cut-after").map(|n| n as usize),
        usage_raw: header_str(headers, "x-mock-usage-raw"),
        no_message_start: headers.contains_key("x-mock-no-message-start"),
        delta_usage_output_only: header_str(headers, "x-mock-delta-usage").as_deref() == Some("output"),
        output_steps: header_str(headers, "x-mock-output-steps")
            .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_default(),
        json_chunks: header_u64(headers, "x-mock-json-chunks").map(|n| n.max(1) as usize),
        split_events: headers.contains_key("x-mock-split-events"),
        write_bytes: header_u64(headers, "x-mock-write-bytes").map(|n| n.max(1) as usize),
        big_event_bytes: header_u64(headers, "x-mock-big-event-bytes").map(|n| n as usize),
        stall_after: header_u64(headers, "x-mock-stall-after").map(|n| n as usize),
        count_tokens_pad_bytes: header_u64(headers, "x-mock-count-tokens-pad-bytes"),
        hang: headers.contains_key("x-mock-hang"),
        trickle: Duration::from_millis(header_u64(headers, "x-mock-trickle-ms").unwrap_or(0)),
        error_after: header_u64(headers, "x-mock-error-after").map(|n| n as usize),
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    Some(headers.get(name)?.to_str().ok()?.trim().to_string())
}

impl Steer {
    /// A usage count: the number, or the placeholder `x-mock-usage-raw` replaces.
    fn count(&self, n: u64) -> Value {
        if self.usage_raw.is_some() { json!(RAW) } else { json!(n) }
    }

    /// JSON text with the placeholder counts replaced by `x-mock-usage-raw`.
    fn text(&self, v: &Value) -> String {
        let text = v.to_string();
        match &self.usage_raw {
            Some(raw) => text.replace(&format!("\"{RAW}\""), raw),
            None => text,
        }
    }
}

async fn record(mock: &Mock, request: Request) -> (HeaderMap, Value) {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let path_and_query = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    mock.received.lock().expect("mock log").push(Received {
        path_and_query,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    (parts.headers, body)
}

fn anthropic_error(status: u16) -> Response {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({"type":"error","error":{"type":kind,"message":format!("mock {status}")},"request_id":"req_mock"});
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

fn openai_error(status: u16) -> Response {
    let body = json!({"error":{"type":"server_error","code":null,"message":format!("mock {status}"),"param":null}});
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

/// An SSE response of `events`, `delay` before each, cut after `cut_after` events or stalled
/// (open, sending nothing) after `stall_after` events if set; each event written in pieces of at
/// most `write_bytes`.
fn sse(events: Vec<String>, s: &Steer) -> Response {
    let (delay, cut_after, stall_after, write_bytes, trickle) =
        (s.delay, s.cut_after, s.stall_after, s.write_bytes, s.trickle);
    let stream = futures_util::stream::unfold((events.into_iter(), 0usize), move |(mut it, n)| async move {
        if cut_after.is_some_and(|c| n >= c) {
            // Let the events before the cut reach the wire first, as a real cut would.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Some((Err(std::io::Error::other("mock cut the stream")), (it, n)));
        }
        if stall_after.is_some_and(|c| n >= c) {
            std::future::pending::<()>().await;
        }
        let event = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(event)), (it, n + 1)))
    });
    let stream = futures_util::StreamExt::flat_map(stream, move |event| {
        let pieces: Vec<Result<Bytes, std::io::Error>> = match (event, write_bytes) {
            (Ok(bytes), Some(size)) => pieces(bytes, size).into_iter().map(Ok).collect(),
            (event, _) => vec![event],
        };
        futures_util::stream::iter(pieces)
    });
    let stream = futures_util::StreamExt::then(stream, move |piece| async move {
        if !trickle.is_zero() {
            tokio::time::sleep(trickle).await;
        }
        piece
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// `bytes` in pieces of at most `size` bytes (the pieces share its memory).
fn pieces(bytes: Bytes, size: usize) -> Vec<Bytes> {
    (0..bytes.len()).step_by(size.max(1)).map(|i| bytes.slice(i..(i + size).min(bytes.len()))).collect()
}

const TEXT: &str = "Hello from the mock upstream.";

async fn messages(State(mock): State<Mock>, request: Request) -> Response {
    let (headers, body) = record(&mock, request).await;
    let s = steer(&headers);
    if s.hang {
        std::future::pending::<()>().await;
    }
    if let Some(status) = s.status {
        tokio::time::sleep(s.delay).await;
        return anthropic_error(status);
    }
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let [input, output, w5, w1, read, search] = s.usage;
    let n = |v: u64| s.count(v);
    let full_usage = json!({
        "input_tokens": n(input), "cache_creation_input_tokens": n(w5 + w1), "cache_read_input_tokens": n(read),
        "cache_creation": {"ephemeral_5m_input_tokens": n(w5), "ephemeral_1h_input_tokens": n(w1)},
        "output_tokens": n(output), "server_tool_use": {"web_search_requests": n(search)}, "service_tier": "standard"
    });
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let reply = json!({"id":"msg_mock","type":"message","role":"assistant","model":model,
            "content":[{"type":"text","text":TEXT}],"stop_reason":"end_turn","stop_sequence":null,"usage":full_usage});
        return json_reply(s.text(&reply), &s).await;
    }
    let start_usage = json!({"input_tokens": n(input), "cache_creation_input_tokens": n(w5 + w1), "cache_read_input_tokens": n(read),
        "cache_creation": {"ephemeral_5m_input_tokens": n(w5), "ephemeral_1h_input_tokens": n(w1)}, "output_tokens": n(1)});
    let delta_usage = if s.delta_usage_output_only { json!({"output_tokens": n(output)}) } else { full_usage };
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {}\n\n", s.text(&data));
    let mut events = Vec::new();
    if !s.no_message_start {
        events.push(event(
            "message_start",
            json!({"type":"message_start","message":{"id":"msg_mock","type":"message","role":"assistant","model":model,"content":[],"stop_reason":null,"stop_sequence":null,"usage":start_usage}}),
        ));
    }
    events.extend([
        event(
            "content_block_start",
            json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
        ),
        event("ping", json!({"type":"ping"})),
        event(
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello from "}}),
        ),
        event(
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"the mock upstream."}}),
        ),
        event("content_block_stop", json!({"type":"content_block_stop","index":0})),
    ]);
    for step in &s.output_steps {
        events.push(event(
            "message_delta",
            json!({"type":"message_delta","delta":{},"usage":{"output_tokens": n(*step)}}),
        ));
    }
    events.extend([
        event(
            "message_delta",
            json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":delta_usage}),
        ),
        event("message_stop", json!({"type":"message_stop"})),
    ]);
    if let Some(n) = s.error_after {
        events.truncate(n);
        events.push(event("error", json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})));
    }
    if s.split_events {
        events = events.iter().flat_map(|e| split_after_first_line(e)).collect();
    }
    sse(events, &s)
}

/// An SSE event as two writes: its first line, then the rest.
fn split_after_first_line(event: &str) -> Vec<String> {
    match event.find('\n') {
        Some(i) if i + 1 < event.len() => vec![event[..=i].to_string(), event[i + 1..].to_string()],
        _ => vec![event.to_string()],
    }
}

/// A JSON answer: whole after `delay`, or in `x-mock-json-chunks` pieces `delay` apart (the first
/// at once), stalled after `x-mock-stall-after` pieces if set.
async fn json_reply(text: String, s: &Steer) -> Response {
    let (delay, stall_after) = (s.delay, s.stall_after);
    let Some(chunks) = s.json_chunks else {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return ([("content-type", "application/json")], text).into_response();
    };
    let bytes = Bytes::from(text);
    let pieces = pieces(bytes.clone(), bytes.len().div_ceil(chunks).max(1));
    let stream = futures_util::stream::unfold((pieces.into_iter(), 0usize), move |(mut it, n)| async move {
        if stall_after.is_some_and(|c| n >= c) {
            std::future::pending::<()>().await;
        }
        let piece = it.next()?;
        if n > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, std::io::Error>(piece), (it, n + 1)))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// `{"input_tokens":N}`; with `x-mock-count-tokens-pad-bytes`, padded and made piece by piece as
/// the client reads it (counted in `padding_sent`); with `x-mock-stall-after`, its first piece
/// only, then nothing.
async fn count_tokens(State(mock): State<Mock>, request: Request) -> Response {
    let (headers, body) = record(&mock, request).await;
    let s = steer(&headers);
    tokio::time::sleep(s.delay).await;
    let n = header_u64(&headers, "x-mock-input-tokens").unwrap_or_else(|| body.to_string().len() as u64 / 4);
    if s.count_tokens_pad_bytes.unwrap_or(0) == 0 && s.stall_after.is_none() {
        return axum::Json(json!({"input_tokens": n})).into_response();
    }
    const PIECE: usize = 64 * 1024;
    let pad = Bytes::from(vec![b'x'; PIECE]);
    let stall = s.stall_after.is_some();
    let first = Bytes::from(format!("{{\"input_tokens\":{n},\"pad\":\""));
    // State: the first piece (until sent), the padding left to make.
    let state = (Some(first), s.count_tokens_pad_bytes.unwrap_or(0));
    let stream = futures_util::stream::unfold(state, move |(first, left)| {
        let (pad, sent) = (pad.clone(), mock.padding_sent.clone());
        async move {
            if let Some(first) = first {
                return Some((Ok::<Bytes, std::io::Error>(first), (None, left)));
            }
            if stall {
                std::future::pending::<()>().await;
            }
            if left == 0 {
                return None;
            }
            let piece = pad.slice(..(PIECE as u64).min(left) as usize);
            let left = left - piece.len() as u64;
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            let piece = if left == 0 { Bytes::from([&piece[..], b"\"}"].concat()) } else { piece };
            Some((Ok(piece), (None, left)))
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

async fn models(State(mock): State<Mock>, request: Request) -> Response {
    record(&mock, request).await;
    axum::Json(json!({"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}],
        "has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-sonnet-4-5"}))
    .into_response()
}

async fn chat_completions(State(mock): State<Mock>, request: Request) -> Result<Response, Infallible> {
    let (headers, body) = record(&mock, request).await;
    let s = steer(&headers);
    if let Some(status) = s.status {
        tokio::time::sleep(s.delay).await;
        return Ok(openai_error(status));
    }
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let [input, output, _, _, read, _] = s.usage;
    let usage = json!({"prompt_tokens": input + read, "completion_tokens": output, "total_tokens": input + read + output,
        "prompt_tokens_details": {"cached_tokens": read}});
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        if !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        return Ok(axum::Json(json!({"id":"chatcmpl-mock","object":"chat.completion","created":0,"model":model,
            "choices":[{"index":0,"message":{"role":"assistant","content":TEXT},"finish_reason":"stop"}],"usage":usage}))
        .into_response());
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,
            "choices":[{"index":0,"delta":delta,"finish_reason":finish}],"usage":null})
        )
    };
    let mut events = vec![
        chunk(json!({"role":"assistant","content":""}), Value::Null),
        chunk(json!({"content":"Hello from "}), Value::Null),
        chunk(json!({"content":"the mock upstream."}), Value::Null),
    ];
    if let Some(size) = s.big_event_bytes {
        // Padded so that the whole event (`data: …\n\n`) is `size` bytes.
        let bare = chunk(json!({"content":""}), Value::Null).len();
        events.push(chunk(json!({"content":"a".repeat(size.saturating_sub(bare))}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true) {
        events.push(format!("data: {}\n\n", json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,"choices":[],"usage":usage})));
    }
    events.push("data: [DONE]\n\n".to_string());
    Ok(sse(events, &s))
}
