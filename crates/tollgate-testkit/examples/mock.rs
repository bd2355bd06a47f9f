//! Runs the mock upstream on 127.0.0.1:<port> (default 9099) until killed; for benchmarks.

#![allow(clippy::expect_used, reason = "a benchmark tool: a port in use or a failed serve aborts it, as it should")]

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(9099);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("the port is free");
    println!("mock upstream on http://127.0.0.1:{port}");
    axum::serve(listener, tollgate_testkit::router(Default::default())).await.expect("serves");
}
