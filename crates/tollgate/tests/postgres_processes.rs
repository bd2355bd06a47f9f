//! Issue 4 end to end: four `tollgate serve` processes on one PostgreSQL database form one
//! system (SPEC section 10). The testkit's mock upstream runs in this test; each process is the
//! real binary with its own port, working directory and `tollgate.toml` naming the mock.
//!
//! - 1,000 concurrent gateway calls spread over the four against a `block` pool that fits about
//!   10 of them: charged ≤ limit, every call not admitted is a 429 `billing_error`, charged = Σ
//!   events, and `tollgate check` finds the database clean.
//! - One of the four SIGKILLed while slow streams and event writers run on all four: the other
//!   three keep serving, every acknowledged event is there, the killed process's open holds are
//!   settled by the others' sweeps as `unsettled` at their held amount once their time to live
//!   (2 s here) has passed, and the pool's `held` returns to 0.
//!
//! Needs PostgreSQL: `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p
//! tollgate --test postgres_processes`; without it each test says it did not run, and passes.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_postgres-processes-admin-token";
const PROCESSES: usize = 4;
const ACCOUNT: &str = "acme";

/// The scenarios run one at a time: four processes keep up to 4 × 16 connections open, and the
/// server allows 100.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `tollgate serve` child process, SIGKILLed and reaped when dropped, so a failing test leaves
/// no process behind.
struct Server {
    child: Option<Child>,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `tollgate serve` in `dir` (which holds its `tollgate.toml`) on the database `db`
    /// and waits for /healthz.
    async fn start(dir: &Path, db: &str) -> Server {
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
                .env("TOLLGATE_DB", db)
                .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
                .env("TOLLGATE_LOG", "warn")
                .env("MOCK_UPSTREAM_KEY", "upstream-secret")
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

/// Four processes on the database `db`, started at once (so their migrations race), each in a
/// directory of its own under `dir` with a `tollgate.toml` whose upstream is the mock.
async fn start_four(dir: &Path, db: &str, mock: &MockUpstream, server_section: &str) -> Vec<Server> {
    let config = format!(
        "{server_section}\n\
         [[upstream]]\n\
         name = \"anthropic\"\n\
         kind = \"anthropic\"\n\
         base_url = \"{}\"\n\
         api_key_env = \"MOCK_UPSTREAM_KEY\"\n\
         models = [\"claude-*\"]\n\
         auth = \"gateway\"\n",
        mock.base_url()
    );
    let starts = (0..PROCESSES).map(|i| {
        let dir = dir.join(format!("process-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tollgate.toml"), &config).unwrap();
        let db = db.to_string();
        async move { Server::start(&dir, &db).await }
    });
    futures_util::future::join_all(starts).await
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

/// The account (team-standard, programmatic pool `block`, its grant set to `programmatic_usd`
/// when given) and a programmatic key; the key's secret.
async fn account_and_key(http: &reqwest::Client, server: &Server, programmatic_usd: Option<&str>) -> String {
    let mut account = json!({"id": ACCOUNT, "tier": "team-standard"});
    if let Some(usd) = programmatic_usd {
        account["programmatic_grant_usd"] = json!(usd);
    }
    api(http, server, reqwest::Method::POST, "/api/v1/accounts", Some(account)).await;
    let key = api(
        http,
        server,
        reqwest::Method::POST,
        &format!("/api/v1/accounts/{ACCOUNT}/keys"),
        Some(json!({"pool": "programmatic", "name": "load"})),
    )
    .await;
    key["key"].as_str().unwrap().to_string()
}

/// A gateway call: POST /v1/messages with the account's key.
fn message(http: &reqwest::Client, server: &Server, key: &str, stream: bool) -> reqwest::RequestBuilder {
    http.post(format!("{}/v1/messages", server.base))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": stream,
                      "messages": [{"role": "user", "content": "hi"}]}))
}

/// The programmatic pool's row in the database: (grants, used + overage, held).
async fn pool(db: &pg::TestDb) -> (i64, i64, i64) {
    let client = pg::connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT grants, used + overage, held FROM pool_cycles WHERE account = $1 AND pool = 'programmatic'",
            &[&ACCOUNT],
        )
        .await
        .expect("the programmatic pool's row");
    (row.get(0), row.get(1), row.get(2))
}

/// Waits until the programmatic pool holds nothing (settles run after a response ends), at most
/// `within`; the pool's row then.
async fn until_nothing_held(db: &pg::TestDb, within: Duration) -> (i64, i64, i64) {
    let deadline = Instant::now() + within;
    loop {
        let row = pool(db).await;
        if row.2 == 0 || Instant::now() > deadline {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Σ (grant part + overage part) and the number of the account's programmatic events.
async fn events_sum(db: &pg::TestDb) -> (i64, i64) {
    let client = pg::connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(grant_part + overage_part), 0)::BIGINT, COUNT(*) FROM events
             WHERE account = $1 AND pool = 'programmatic'",
            &[&ACCOUNT],
        )
        .await
        .expect("events");
    (row.get(0), row.get(1))
}

/// `tollgate check` on the database: exit 0 and its report, or a panic with what it said.
fn check_clean(db: &pg::TestDb) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["check", "--db", &db.url]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "tollgate check: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn logs(servers: &[Server]) -> String {
    servers.iter().map(|s| format!("--- {} ---\n{}", s.base, s.log_text())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_calls_through_four_processes_never_pass_the_limit() {
    let Some(db) = pg::TestDb::create("postgres_processes").await else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let servers = start_four(dir.path(), &db.url, &mock, "").await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    // Each call's worst case: body ≈ 120 bytes × $6/MTok (1h cache write) + 1000 × $15/MTok ≈
    // $0.0157; the pool's limit is $0.16: room for 10. Each call uses its whole output bound
    // (x-mock-usage), so it costs $0.0153, nearly its worst case.
    let key = account_and_key(&http, &servers[0], Some("0.16")).await;
    let limit = 160_000_000;
    // Warm every process's connections to the database, so that no process starts the burst
    // ahead of the others.
    let warm = (0..PROCESSES * 16)
        .map(|i| api(&http, &servers[i % PROCESSES], reqwest::Method::GET, "/api/v1/accounts/acme/balance", None));
    futures_util::future::join_all(warm).await;

    let calls = (0..1_000).map(|i| {
        let request = message(&http, &servers[i % PROCESSES], &key, false).header("x-mock-usage", "100,1000");
        async move {
            let r = request.send().await.unwrap_or_else(|e| panic!("call {i}: {e}"));
            let status = r.status().as_u16();
            let retry = r.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_string());
            let body = r.text().await.unwrap_or_else(|e| panic!("call {i}: body: {e}"));
            (i, status, retry, body)
        }
    });
    let started = Instant::now();
    let results = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    let mut admitted_by = [0usize; PROCESSES];
    for (i, status, retry, body) in results {
        match status {
            200 => {
                assert!(body.contains("Hello from the mock upstream."), "call {i}: {body}");
                admitted_by[i % PROCESSES] += 1;
            }
            429 => {
                let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("call {i}: {e}: {body}"));
                assert_eq!(v["error"]["type"], "billing_error", "call {i}: {body}");
                assert_eq!(retry.as_deref(), Some("false"), "call {i}");
            }
            other => panic!("call {i}: unexpected status {other}: {body}\n{}", logs(&servers)),
        }
    }
    let admitted: usize = admitted_by.iter().sum();
    eprintln!("1,000 calls through four processes in {took:?}: {admitted} admitted ({admitted_by:?} per process)");

    let (grants, charged, held) = until_nothing_held(&db, Duration::from_secs(30)).await;
    assert_eq!((grants, held), (limit, 0), "the limit, and nothing held once every call ended");
    assert!(charged <= limit, "charged {charged} passed the limit {limit}");
    let (sum, events) = events_sum(&db).await;
    assert_eq!(sum, charged, "charged = Σ events");
    assert_eq!(events as usize, admitted, "one event per admitted call");
    // Worst case ≈ $0.01566, cost $0.0153: 10 holds fit at once, and after 10 calls $0.007 is
    // left, less than one worst case; while fewer than 10 are held or charged, one more fits.
    assert_eq!(admitted, 10, "exactly what fits is admitted");
    let report = check_clean(&db);
    assert!(report.contains("every invariant holds"), "{report}");
}

/// What a writer posting events saw: the ids whose POST got a 2xx.
async fn writer(http: reqwest::Client, server: String, w: usize, stop: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let (mut acked, mut cut) = (Vec::new(), 0);
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{server}-w{w}-{n}");
        n += 1;
        let event = json!({"id": id, "account": ACCOUNT, "pool": "interactive", "model": "claude-sonnet-4-5",
                           "usage": {"input_tokens": 100, "output_tokens": 10}, "source": "postgres-processes"});
        match http.post(format!("{server}/api/v1/events")).bearer_auth(TOKEN).json(&event).send().await {
            Ok(r) if r.status().is_success() => acked.push(id),
            Ok(r) => panic!("event {id}: {} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(_) => {
                cut += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (acked, cut)
}

/// A slow streaming call: its request id (= hold id) once the headers came, and whether its
/// stream then ended complete.
async fn slow_stream(request: reqwest::RequestBuilder) -> (String, bool) {
    let r = request.send().await.expect("a streaming call is answered");
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let complete = matches!(r.text().await, Ok(text) if text.contains("message_stop"));
    (id, complete)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_killed_mid_run_loses_nothing_and_its_holds_expire() {
    let Some(db) = pg::TestDb::create("postgres_processes").await else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    // Holds live 2 s (running streams extend theirs), and every process sweeps each second.
    let mut servers = start_four(dir.path(), &db.url, &mock, "[server]\nhold_ttl_s = 2\nsweep_interval_s = 1\n").await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let key = account_and_key(&http, &servers[0], None).await;

    // Event writers on all four, and 8 slow streams per process: 8 SSE events 400 ms apart
    // (≈3.2 s, past the hold's time to live, so survivors must extend theirs).
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..PROCESSES * 2)
        .map(|w| tokio::spawn(writer(http.clone(), servers[w % PROCESSES].base.clone(), w, stop.clone())))
        .collect();
    let streams: Vec<_> = (0..PROCESSES * 8)
        .map(|i| {
            let request = message(&http, &servers[i % PROCESSES], &key, true)
                .header("x-mock-delay-ms", "400")
                .header("x-mock-usage", "100,500");
            (i % PROCESSES, tokio::spawn(slow_stream(request)))
        })
        .collect();
    // Kill process 0 once the streams are under way (their holds exist) and ~1.4 s in.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let open_before_kill = pool(&db).await.2;
    assert!(open_before_kill > 0, "the streams hold credit when the process is killed");
    servers[0].kill();
    let killed_at = Instant::now();

    // The other three keep serving: new calls, JSON and streaming, all complete.
    for round in 0..2 {
        for (s, server) in servers.iter().enumerate().skip(1) {
            let r = message(&http, server, &key, round == 1).send().await.expect("a survivor answers");
            assert_eq!(r.status(), 200, "process {s} after the kill");
            let text = r.text().await.unwrap();
            assert!(text.contains("Hello from ") || text.contains("message_stop"), "process {s}: {text}");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);

    let mut acked = BTreeSet::new();
    let mut cut = 0;
    for w in writers {
        let (ids, c) = w.await.unwrap();
        acked.extend(ids);
        cut += c;
    }
    let mut killed_streams = Vec::new();
    let mut all_streams = Vec::new();
    for (s, stream) in streams {
        let (id, complete) = stream.await.unwrap();
        if s == 0 {
            if !complete {
                killed_streams.push(id.clone());
            }
        } else {
            assert!(complete, "a stream on surviving process {s} was cut: {id}\n{}", logs(&servers));
        }
        all_streams.push(id);
    }
    eprintln!(
        "{} events acknowledged ({cut} requests cut by the kill); {} of 8 streams of the killed process cut",
        acked.len(),
        killed_streams.len()
    );
    assert!(cut > 0, "no writer of the killed process was cut: it was not killed mid-run");
    assert!(!killed_streams.is_empty(), "no stream of the killed process was cut mid-run");

    // Its holds expire 2 s after their last extension; the survivors' sweeps settle them.
    let (_, charged, held) = until_nothing_held(&db, Duration::from_secs(30)).await;
    let settled_after = killed_at.elapsed();
    assert_eq!(held, 0, "held returns to 0 once the killed process's holds expire\n{}", logs(&servers));
    eprintln!("the pool held nothing {settled_after:?} after the kill");

    let client = pg::connect(&db.url).await;
    // Every event acknowledged before (or after) the kill is there.
    let present: BTreeSet<String> = client
        .query("SELECT id FROM events WHERE account = $1 AND pool = 'interactive'", &[&ACCOUNT])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&String> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "{} acknowledged events are gone: {:?}", lost.len(), &lost[..lost.len().min(10)]);
    // Each stream's hold was charged by exactly one event; the killed process's cut streams as
    // `unsettled`, at their held amount, by a sweep.
    let rows = client
        .query(
            "SELECT h.id, h.state, h.amount, e.cost, e.unsettled, e.grant_part + e.overage_part,
                    e.recorded_us >= h.expires_us FROM holds h
             LEFT JOIN events e ON e.account = h.account AND e.hold_id = h.id
             WHERE h.account = $1 AND h.id = ANY($2)",
            &[&ACCOUNT, &all_streams],
        )
        .await
        .unwrap();
    let mut charged_by: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        let (id, state, amount): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let (cost, unsettled, split): (Option<i64>, Option<bool>, Option<i64>) = (r.get(3), r.get(4), r.get(5));
        *charged_by.entry(id.clone()).or_default() += usize::from(cost.is_some());
        if killed_streams.contains(&id) {
            assert_eq!(state, "expired", "hold {id} of the killed process");
            assert_eq!((unsettled, cost, split), (Some(true), Some(amount), Some(amount)), "hold {id}");
            assert_eq!(r.get::<_, Option<bool>>(6), Some(true), "hold {id} settled only once its time to live passed");
        } else {
            assert_eq!(state, "settled", "hold {id}");
            assert_eq!(unsettled, Some(false), "hold {id}");
        }
    }
    assert_eq!(charged_by.len(), all_streams.len(), "every stream has its hold");
    assert!(charged_by.values().all(|n| *n == 1), "each hold charged once: {charged_by:?}");
    let (sum, _) = events_sum(&db).await;
    assert_eq!(sum, charged, "charged = Σ events");
    let report = check_clean(&db);
    assert!(report.contains("every invariant holds"), "{report}");
}
