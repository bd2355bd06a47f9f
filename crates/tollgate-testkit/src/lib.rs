//! A mock upstream for tests and benchmarks. It speaks both APIs (JSON and SSE) and reports the
//! usage the test asks for; it knows no prices. Each request is steered by headers, which the
//! gateway forwards like any other:
//!
//! - `x-mock-usage: input,output[,cache_5m,cache_1h,cache_read,web_search]` (default `100,20`)
//! - `x-mock-status: 529` — answer this error status in the API's error format
//! - `x-mock-delay-ms: 200` — wait this long before each SSE event (and before a JSON answer)
//! - `x-mock-cut-after: 3` — break the connection after this many SSE events
//! - `x-mock-input-tokens: 5000` — what `count_tokens` answers
//!
//! Every request received is kept (method, path and query, headers, body) for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
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
}

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

/// An SSE response of `events`, `delay` before each, cut after `cut_after` events if set.
fn sse(events: Vec<String>, delay: Duration, cut_after: Option<usize>) -> Response {
    let stream = futures_util::stream::unfold((events.into_iter(), 0usize), move |(mut it, n)| async move {
        if cut_after.is_some_and(|c| n >= c) {
            // Let the events before the cut reach the wire first, as a real cut would.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Some((Err(std::io::Error::other("mock cut the stream")), (it, n)));
        }
        let event = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(event)), (it, n + 1)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

const TEXT: &str = "Hello from the mock upstream.";

async fn messages(State(mock): State<Mock>, request: Request) -> Response {
    let (headers, body) = record(&mock, request).await;
    let s = steer(&headers);
    if let Some(status) = s.status {
        return anthropic_error(status);
    }
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let [input, output, w5, w1, read, search] = s.usage;
    let full_usage = json!({
        "input_tokens": input, "cache_creation_input_tokens": w5 + w1, "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
        "output_tokens": output, "server_tool_use": {"web_search_requests": search}, "service_tier": "standard"
    });
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        if !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        let reply = json!({"id":"msg_mock","type":"message","role":"assistant","model":model,
            "content":[{"type":"text","text":TEXT}],"stop_reason":"end_turn","stop_sequence":null,"usage":full_usage});
        return axum::Json(reply).into_response();
    }
    let start_usage = json!({"input_tokens": input, "cache_creation_input_tokens": w5 + w1, "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}, "output_tokens": 1});
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let events = vec![
        event(
            "message_start",
            json!({"type":"message_start","message":{"id":"msg_mock","type":"message","role":"assistant","model":model,"content":[],"stop_reason":null,"stop_sequence":null,"usage":start_usage}}),
        ),
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
        event(
            "message_delta",
            json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":full_usage}),
        ),
        event("message_stop", json!({"type":"message_stop"})),
    ];
    sse(events, s.delay, s.cut_after)
}

async fn count_tokens(State(mock): State<Mock>, request: Request) -> Response {
    let (headers, body) = record(&mock, request).await;
    let n = header_u64(&headers, "x-mock-input-tokens").unwrap_or_else(|| body.to_string().len() as u64 / 4);
    axum::Json(json!({"input_tokens": n})).into_response()
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
        chunk(json!({}), json!("stop")),
    ];
    if body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true) {
        events.push(format!("data: {}\n\n", json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,"choices":[],"usage":usage})));
    }
    events.push("data: [DONE]\n\n".to_string());
    Ok(sse(events, s.delay, s.cut_after))
}
