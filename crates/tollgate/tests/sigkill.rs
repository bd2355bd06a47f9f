//! SPEC section 3, durability: "a 2xx answer means the write is on disk … it survives `kill -9`".
//!
//! Starts the real `tollgate serve` binary on a fresh database, has 16 writers post events as
//! fast as they can, SIGKILLs the server in the middle of the burst, restarts it on the same
//! database, and checks that every acknowledged event is there and that the balance is exactly
//! the sum of the events that are there.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "tga_sigkill-test-admin-token";
const ACCOUNT: &str = "acme";
const WRITERS: usize = 16;
const ACKED_MIN: usize = 300;

/// A `tollgate serve` child process, killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves no server behind.
struct Server {
    child: Option<Child>,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `tollgate serve` in `dir` on the database `dir/tollgate.db` and waits for /healthz.
    async fn start(dir: &Path) -> Server {
        let mut last_log = String::new();
        // A free port can be taken between our probe and the server's bind: try a few.
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = dir.join(format!("serve-{port}-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .arg("serve")
                .current_dir(dir)
                .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOLLGATE_DB", dir.join("tollgate.db"))
                .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
                .env("TOLLGATE_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start tollgate serve");
            let mut server = Server { child: Some(child), base: format!("http://127.0.0.1:{port}"), log };
            if server.wait_healthy().await {
                return server;
            }
            last_log = server.log_text();
        }
        panic!("tollgate serve did not become healthy; last log:\n{last_log}");
    }

    async fn wait_healthy(&mut self) -> bool {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("tollgate serve exited early ({status}):\n{}", self.log_text());
                self.child = None;
                return false;
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap the process.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn event(id: &str) -> Value {
    json!({
        "id": id,
        "account": ACCOUNT,
        "pool": "programmatic",
        "model": "claude-sonnet-4-5",
        "usage": {"input_tokens": 100, "output_tokens": 10},
        "source": "sigkill-test",
    })
}

/// Exact nano-USD from a decimal USD string such as "12.345".
fn nanos(usd: &str) -> i64 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
    assert!(frac.len() <= 9 && !usd.starts_with('-'), "unexpected amount {usd:?}");
    let frac: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().unwrap() };
    whole.parse::<i64>().unwrap() * 1_000_000_000 + frac
}

async fn api(
    http: &reqwest::Client,
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut req = http.request(method.clone(), format!("{}{path}", server.base)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// Every event of the account, paging through the list API.
async fn all_events(http: &reqwest::Client, server: &Server) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(seq) => format!("/api/v1/accounts/{ACCOUNT}/events?limit=1000&after={seq}"),
            None => format!("/api/v1/accounts/{ACCOUNT}/events?limit=1000"),
        };
        let page = api(http, server, reqwest::Method::GET, &path, None).await;
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next"].as_i64() {
            Some(seq) => after = Some(seq),
            None => return events,
        }
    }
}

/// What one writer saw.
#[derive(Default)]
struct Tally {
    /// Ids whose POST got a 2xx response.
    acked: Vec<String>,
    /// How many ids it tried (ids are `w{writer}-{0..attempted}`).
    attempted: usize,
    /// HTTP responses that were not 2xx (none expected: every event is valid).
    bad_statuses: Vec<String>,
    /// Requests that got no response (the kill).
    transport_errors: usize,
}

async fn writer(http: reqwest::Client, url: String, w: usize, stop: Arc<AtomicBool>, acks: Arc<AtomicUsize>) -> Tally {
    let mut tally = Tally::default();
    while !stop.load(Ordering::SeqCst) {
        let id = format!("w{w}-{}", tally.attempted);
        tally.attempted += 1;
        match http.post(&url).bearer_auth(TOKEN).json(&event(&id)).send().await {
            Ok(resp) if resp.status().is_success() => {
                tally.acked.push(id);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                tally.bad_statuses.push(format!("{id}: {status} {text}"));
            }
            Err(_) => tally.transport_errors += 1,
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

    let mut server = Server::start(dir.path()).await;
    api(
        &http,
        &server,
        reqwest::Method::POST,
        "/api/v1/accounts",
        Some(json!({"id": ACCOUNT, "tier": "team-standard"})),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/api/v1/events", server.base);
    let acks = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(writer(http.clone(), url.clone(), w, stop.clone(), acks.clone()))).collect();

    // About a second of burst; longer on a slow machine until enough writes were acknowledged.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    while acks.load(Ordering::SeqCst) < 2 * ACKED_MIN && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill();
    let killed_after = started.elapsed();
    stop.store(true, Ordering::SeqCst);

    let mut acked = BTreeSet::new();
    let mut attempted = BTreeMap::new();
    let mut bad_statuses = Vec::new();
    let mut transport_errors = 0;
    for (w, handle) in writers.into_iter().enumerate() {
        let t = handle.await.unwrap();
        acked.extend(t.acked);
        attempted.insert(w, t.attempted);
        bad_statuses.extend(t.bad_statuses);
        transport_errors += t.transport_errors;
    }
    eprintln!(
        "killed after {killed_after:?}: {} events acknowledged, {} attempted, {transport_errors} requests cut",
        acked.len(),
        attempted.values().sum::<usize>()
    );
    assert!(
        bad_statuses.is_empty(),
        "valid events were refused before the kill: {:?}",
        &bad_statuses[..bad_statuses.len().min(5)]
    );
    assert!(
        acked.len() >= ACKED_MIN,
        "only {} events acknowledged before the kill; the test means little",
        acked.len()
    );
    assert!(transport_errors > 0, "no request was cut by the kill: the server was not killed mid-burst");

    // Restart on the same database: the lock of the killed process is gone, open state recovered.
    let server = Server::start(dir.path()).await;
    let events = all_events(&http, &server).await;
    let mut present = BTreeSet::new();
    let mut sum = 0i64;
    for e in &events {
        let id = e["id"].as_str().unwrap().to_string();
        // Every stored event is one a writer sent, and appears once.
        let (w, n) = id.strip_prefix('w').and_then(|r| r.split_once('-')).unwrap_or_else(|| panic!("stray event {id}"));
        let (w, n): (usize, usize) = (w.parse().unwrap(), n.parse().unwrap());
        assert!(n < attempted[&w], "event {id} was never sent");
        assert!(present.insert(id.clone()), "event {id} listed twice");
        sum += nanos(e["cost_usd"].as_str().unwrap());
    }
    let lost: Vec<&String> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events are gone after kill -9, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "{} events present after restart ({} beyond the acknowledged ones)",
        present.len(),
        present.len() - acked.len()
    );

    let balance = api(&http, &server, reqwest::Method::GET, &format!("/api/v1/accounts/{ACCOUNT}/balance"), None).await;
    let pool = &balance["pools"]["programmatic"];
    let charged = nanos(pool["used_usd"].as_str().unwrap()) + nanos(pool["overage_usd"].as_str().unwrap());
    assert_eq!(charged, sum, "balance used + overage != Σ cost of the {} events present: {balance}", events.len());
    assert_eq!(pool["held_usd"], "0", "{balance}");
    let one = nanos(events[0]["cost_usd"].as_str().unwrap());
    assert!(one > 0);
    assert_eq!(sum, one * events.len() as i64, "every event has the same usage, so the same cost");
    let interactive = &balance["pools"]["interactive"];
    assert_eq!((interactive["used_usd"].as_str(), interactive["overage_usd"].as_str()), (Some("0"), Some("0")));
    drop(server);

    // And the ledger invariants hold on the database the crash left behind.
    let check = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--db"])
        .arg(dir.path().join("tollgate.db"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(0),
        "tollgate check after the crash: {stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(stdout.contains(&format!("{} events", events.len())), "{stdout}");
}
