//! Issue 13, finding 1: clients that open connections and never finish a request cannot starve
//! the others. The real `tollgate serve` runs under `prlimit --nofile=256:256` (so its
//! connection limit, from the file limit, is (256 − 64) / 2 = 96) with the testkit's mock
//! upstream; an attacker holds 300 sockets that sent half a request head.
//!
//! Before the fix the server accepted until it ran out of files, and `/healthz` and the gateway
//! timed out for every client until the attacker left.

mod serve;

use std::time::Duration;

use serde_json::json;
use serve::{Client, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_hostile-clients-admin-token";
const ATTACKERS: usize = 300;
const CONNECTIONS_MAX: usize = (256 - 64) / 2;

/// Opens a connection and sends half a request head, never the rest.
async fn half_open(base: &str) -> TcpStream {
    let mut socket = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    socket.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: tollgate\r\ncontent-type: app").await.unwrap();
    socket
}

/// True when the server has closed `socket` (end of stream or a reset), false when it is open.
async fn closed_by_server(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(20), socket.read(&mut buf)).await {
        Err(_) => false,
        Ok(Ok(n)) => n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        Ok(Err(_)) => true,
    }
}

/// A metric's value from the OpenMetrics text, 0 when absent.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test]
async fn half_open_sockets_past_the_file_limit_starve_no_one_and_cut_no_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    // A long header timeout, so only the connection limit can save the server here.
    let config = "[server]\nheader_read_timeout_s = 600\n";
    let prlimit = ["prlimit", "--nofile=256:256", "--"];
    let server = Server::with_mock_under(&prlimit, dir.path(), TOKEN, &mock, config).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, key) = c.key("ci-bot", None).await;

    // A stream in progress: about seven events, 400 ms apart.
    let streaming = json!({"model": "claude-haiku-4-5", "max_tokens": 1000, "stream": true,
                           "messages": [{"role": "user", "content": "hi"}]});
    let stream = c.message(&key, streaming).header("x-mock-delay-ms", "400").send().await.unwrap();
    assert_eq!(stream.status(), 200);

    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        attackers.push(half_open(&server.base).await);
    }

    // Everyone else is still served, at once.
    let quick = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let health = quick.get(format!("{}/healthz", server.base)).send().await.expect("/healthz answers");
    assert_eq!(health.status(), 200);
    let call = json!({"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let r = quick
        .post(format!("{}/v1/messages", server.base))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&call)
        .send()
        .await
        .expect("a gateway call answers");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // The stream that was in progress is not cut to make room.
    let body = stream.text().await.expect("the stream runs to its end");
    assert!(body.contains("message_stop"), "the stream was cut: {body}");

    // The attacker's oldest sockets were closed to make room; at most the limit stay open.
    let mut open = 0;
    for socket in &mut attackers {
        if !closed_by_server(socket).await {
            open += 1;
        }
    }
    assert!(open <= CONNECTIONS_MAX, "{open} half-open sockets still open; the limit is {CONNECTIONS_MAX}");
    assert!(open > 0, "the newest half-open sockets wait within the limit and the header timeout");

    let metrics = c.http.get(format!("{}/metrics", server.base)).bearer_auth(TOKEN).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    let evicted = metric(&text, "tollgate_connections_closed_total{reason=\"evicted\"}");
    assert!(evicted >= (ATTACKERS - CONNECTIONS_MAX) as f64, "evicted {evicted}:\n{text}");
    assert!(!server.log_text().contains("panicked"), "{}", server.log_text());
}

#[tokio::test]
async fn a_request_head_or_body_that_does_not_arrive_in_time_ends_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let config = "[server]\nheader_read_timeout_s = 1\nbody_read_timeout_s = 1\n";
    let server = Server::with_mock_config(dir.path(), TOKEN, &mock, config).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, key) = c.key("ci-bot", None).await;

    // Half a head: closed after the header timeout.
    let mut head = half_open(&server.base).await;
    // An idle keep-alive connection after one request: closed by the same clock.
    let mut idle = TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A whole head, then a body that never comes: answered with an error after the body timeout.
    let mut slow = TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    let head_only = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: tollgate\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\""
    );
    slow.write_all(head_only.as_bytes()).await.unwrap();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(closed_by_server(&mut head).await, "a half-sent head outlived the header timeout");
    assert!(closed_by_server(&mut idle).await, "an idle connection outlived the header timeout");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "a slow body held its connection: {answer}");
    assert!(answer.starts_with("HTTP/1.1 4"), "a slow body is answered with a client error: {answer}");

    let metrics = c.http.get(format!("{}/metrics", server.base)).bearer_auth(TOKEN).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(metric(&text, "tollgate_connections_closed_total{reason=\"header_timeout\"}") >= 2.0, "{text}");
    assert!(metric(&text, "tollgate_connections_closed_total{reason=\"body_timeout\"}") >= 1.0, "{text}");
    // Nothing was held for the call whose body never came.
    let (charged, held) = c.settled().await;
    assert_eq!((charged, held), (0, 0));
}

/// Sends a whole head of a gateway call with `key` and the start of its body, never the rest.
async fn slow_body(base: &str, key: &str) -> TcpStream {
    let mut socket = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: tollgate\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\""
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

/// A request whose body is still arriving waits on its client, as a half-sent head does: any
/// key holder could otherwise fill every connection with bodies sent slowly and lock everyone
/// out for `body_read_timeout_s`, again and again.
#[tokio::test]
async fn bodies_sent_slowly_on_every_connection_starve_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let config = "[server]\nconnections_max = 8\nbody_read_timeout_s = 600\n";
    let server = Server::with_mock_config(dir.path(), TOKEN, &mock, config).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, key) = c.key("ci-bot", None).await;

    let mut attackers = Vec::new();
    for _ in 0..8 {
        attackers.push(slow_body(&server.base, &key).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let quick = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let health = quick.get(format!("{}/healthz", server.base)).send().await.expect("/healthz answers");
    assert_eq!(health.status(), 200);
    // The oldest body waiting made room (its task closes the socket soon after).
    let mut made_room = false;
    for _ in 0..100 {
        if closed_by_server(&mut attackers[0]).await {
            made_room = true;
            break;
        }
    }
    assert!(made_room, "the body that waited longest made room");
    let (charged, held) = c.settled().await;
    assert_eq!((charged, held), (0, 0), "nothing is held for a body that never arrived");
}

const OPENAI_UPSTREAM: &str = "[[upstream]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"MOCK\"\n\
                               api_key_env = \"MOCK_UPSTREAM_KEY\"\nmodels = [\"gpt-*\"]\n";

/// A client that stops reading a response holds neither its connection nor its call's hold
/// for ever: after `response_stall_timeout_s` without taking a byte it is closed, and the call
/// is settled from what the upstream reported, not left to expire at its worst case.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_is_closed_and_its_call_settled() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let config = format!(
        "[server]\nconnections_max = 4\nresponse_stall_timeout_s = 1\n{}",
        OPENAI_UPSTREAM.replace("MOCK", &mock.base_url())
    );
    let server = Server::with_mock_config(dir.path(), TOKEN, &mock, &config).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, key) = c.key("ci-bot", None).await;

    // Three streams of more than 8 MB each to clients with a small receive buffer that read
    // nothing after the first bytes.
    let body = json!({"model": "gpt-4.1-mini", "stream": true, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(server.base.trim_start_matches("http://").parse().unwrap()).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\nx-mock-big-event-bytes: 8388608\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 64];
        let n = stream.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        readers.push(stream);
    }
    // Their connections are freed and their calls settled, while the clients still hold the
    // sockets open.
    let mut answer = (0.0, 0.0, (0, 0));
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let metrics = c.http.get(format!("{}/metrics", server.base)).bearer_auth(TOKEN).send().await.unwrap();
        let text = metrics.text().await.unwrap();
        answer = (
            metric(&text, "tollgate_connections_closed_total{reason=\"response_stall\"}"),
            metric(&text, "tollgate_connections_open"),
            c.programmatic().await,
        );
        if answer.0 >= 3.0 && answer.2.1 == 0 {
            break;
        }
    }
    let (stalled, open, (charged, held)) = answer;
    assert!(stalled >= 3.0 && open <= 1.0, "{stalled} closed for a stall, {open} open");
    assert_eq!(held, 0, "the calls' holds are still open");
    assert!(charged > 0, "the calls were settled from the upstream's usage");
    assert!(!server.log_text().contains("expired"), "{}", server.log_text());
    drop(readers);
}

/// SIGTERM: connections without a request in progress close at once (a fresh one, a half-sent
/// head, an idle keep-alive), a stream in progress runs to its end and is settled before the
/// process exits.
#[tokio::test]
async fn sigterm_closes_waiting_connections_at_once_and_settles_the_streams_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let config = "[server]\nheader_read_timeout_s = 600\n";
    let mut server = Server::with_mock_config(dir.path(), TOKEN, &mock, config).await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, key) = c.key("ci-bot", Some("5")).await;

    let streaming = json!({"model": "claude-haiku-4-5", "max_tokens": 1000, "stream": true,
                           "messages": [{"role": "user", "content": "hi"}]});
    let stream = c.message(&key, streaming).header("x-mock-delay-ms", "300").send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let _fresh = TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    let _head = half_open(&server.base).await;
    let mut idle = TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let _ = idle.read(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let reading = tokio::spawn(stream.text());
    let took = server.terminate(Duration::from_secs(20)).await;
    let body = reading.await.unwrap().expect("the stream runs to its end");
    assert!(body.contains("message_stop"), "the stream was cut: {body}");
    // Well before the 600 s a half-sent head may take.
    assert!(took.is_some(), "tollgate serve still ran 20 s after SIGTERM");

    // The next run finds nothing left open.
    let server = Server::with_mock_config(dir.path(), TOKEN, &mock, config).await;
    assert!(!server.log_text().contains("left open"), "{}", server.log_text());
    let c = Client::new(&server, TOKEN);
    let (charged, held) = c.programmatic().await;
    assert_eq!(held, 0);
    assert!(charged > 0);
}

/// hyper buffers up to about 400 KiB of a request's head by default: 400 connections that each
/// sent 400 KB of a head that never ends grew the server by 158 MB, so the connection limit
/// from the file limit (524,256 with a hard limit of 1,048,576) did not bound its memory. A
/// head is now refused once it passes hyper's buffer of `HEAD_SIZE_BYTES_MAX` (64 KiB): a read
/// can land up to twice that, so heads of 100 KiB still passed against the binary, 120 KiB
/// did not.
#[tokio::test]
async fn a_request_head_past_its_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let server = Server::with_mock_config(dir.path(), TOKEN, &mock, "").await;
    for (padding, status) in [(60 * 1024, "200"), (128 * 1024, "431")] {
        let mut socket = TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
        let head = format!("GET /healthz HTTP/1.1\r\nhost: tollgate\r\nx-pad: {}\r\n\r\n", "a".repeat(padding));
        let _ = socket.write_all(head.as_bytes()).await;
        let mut answer = vec![0u8; 64];
        let n = socket.read(&mut answer).await.unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "a head of {padding} bytes: {answer}");
    }
}
