//! Many open streams at once: `--streams` (default 1,000) streaming calls through the gateway,
//! all open together (the mock sends each stream's 8 SSE events `--delay-ms` apart, default
//! 500 ms, so a stream stays open about 4 s), and the gateway's resident memory. The gateway
//! (with its SQLite store) runs in a child process of its own (`streams-gateway`), so that
//! `/proc/<pid>/status`, read every 50 ms, counts it alone; this process is the mock upstream
//! and the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::gateway::{Ledger, SECRET, serve_gateway};

const BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello."}]}"#;

pub fn run(args: &[String]) -> Result<(), String> {
    let streams = crate::flag(args, "--streams", 1_000)?;
    let delay_ms = crate::flag(args, "--delay-ms", 500)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(measure(streams, delay_ms))
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The child: the gateway in front of `--upstream`, until its stdin closes. Prints its URL.
pub fn serve(args: &[String]) -> Result<(), String> {
    let upstream = args.iter().position(|a| a == "--upstream").and_then(|i| args.get(i + 1)).ok_or("--upstream URL")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (_store, _now, url, _dir) = serve_gateway(upstream, &Ledger::default()).await?;
        println!("{url}");
        // Serve until the parent closes stdin.
        tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Kills the gateway's process when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn measure(streams: u64, delay_ms: u64) -> Result<(), String> {
    let mock = tollgate_testkit::MockUpstream::start().await;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Child(
        Command::new(exe)
            .args(["streams-gateway", "--upstream", &mock.base_url()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the gateway's process: {e}"))?,
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let gateway_url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line.trim().to_string())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    // Warm up: one stream, so caches, the pool's row and a lease exist.
    stream(&client, &gateway_url, 0, &AtomicU64::new(0)).await?;
    let before = rss_kib(pid)?;
    let open = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, url, open) = (client.clone(), gateway_url.clone(), open.clone());
            tokio::spawn(async move { stream(&client, &url, delay_ms, &open).await })
        })
        .collect();
    let (mut peak_rss, mut peak_open) = (before, 0);
    while tasks.iter().any(|t| !t.is_finished()) {
        peak_rss = peak_rss.max(rss_kib(pid)?);
        peak_open = peak_open.max(open.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let received = mock.received().len();
    println!(
        "streams: {streams} streaming calls through tollgate ({failed} failed), at most {peak_open} open at once, \
         done in {:.1} s; the gateway's process: resident memory {} MiB before, peak {} MiB; the mock received {received}",
        started.elapsed().as_secs_f64(),
        before / 1024,
        peak_rss / 1024,
    );
    if failed > 0 {
        return Err(format!("{failed} streams failed"));
    }
    Ok(())
}

/// One streaming call, read to its end; `open` counts the streams whose headers have arrived
/// and whose body has not ended.
async fn stream(
    client: &Client<HttpConnector, Body>,
    base: &str,
    delay_ms: u64,
    open: &AtomicU64,
) -> Result<(), String> {
    let request = axum::http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", SECRET)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-delay-ms", delay_ms.to_string())
        .body(Body::from(BODY))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&body)));
    }
    open.fetch_add(1, Ordering::Relaxed);
    let body = response.into_body().collect().await.map(|b| b.to_bytes());
    open.fetch_sub(1, Ordering::Relaxed);
    let body = body.map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&body).contains("message_stop") {
        return Err("the stream ended without message_stop".into());
    }
    Ok(())
}
