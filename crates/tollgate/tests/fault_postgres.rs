//! Fault injection on PostgreSQL (issue 13): the real `tollgate serve` on a PostgreSQL database
//! under a mixed load (gateway calls through the mock upstream, API events, API holds settled
//! through the API) while its database goes away.
//!
//! - `killed_connections_under_load_lose_nothing`: every connection of the server to its test
//!   database is killed (`pg_terminate_backend`, only backends of that database) again and
//!   again on the shared server of `TOLLGATE_PG_URL`.
//! - `a_postgresql_restart_under_load_answers_503_then_recovers`: a private, throwaway cluster
//!   (`initdb` into a temporary directory, run as the `postgres` user on a port of its own) is
//!   stopped (`-m fast`, then `-m immediate`: a crash) and started again under the load. It needs
//!   the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`), a `postgres` user and root.
//!
//! In both: every answer is 2xx or a clear 503 (never a 500, another status, a cut or a hang),
//! service comes back by itself, every acknowledged write is in the ledger at its exact cost,
//! no hold is left open, and `tollgate check` passes. While the restarted server is down,
//! `/readyz` answers 503.
//!
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate --test
//! fault_postgres`; without the variable the first test says it did not run, and passes.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod load;
mod pg;
mod serve;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use serve::{Client, Server};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_fault-postgres-admin-token";

/// The account, a programmatic key; the key's secret.
async fn account_and_key(c: &Client) -> String {
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    c.key("load", None).await.1
}

/// One gateway call and one event, answered 2xx within 30 s of trying: service is back.
async fn service_comes_back(c: &Client, secret: &str) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let call = c
            .message(secret, json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .map(|r| r.status().as_u16());
        let event = json!({"id": format!("evt-back-{}", started.elapsed().as_nanos()), "account": "acme",
            "pool": "programmatic", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 1}});
        let (status, _) = c.api(TOKEN, reqwest::Method::POST, "/api/v1/events", Some(event)).await;
        if call.as_ref().is_ok_and(|s| *s == 200) && status == 201 {
            return started.elapsed();
        }
        assert!(Instant::now() < deadline, "service did not come back: call {call:?}, event {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until nothing is held (settles run after a response ends; idle leases are voided after
/// 2 s), at most 30 s; what is held then, in nano-USD.
async fn held_after_settles(c: &Client) -> i64 {
    for _ in 0..300 {
        let (_, held) = c.programmatic().await;
        if held == 0 {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.programmatic().await.1
}

/// `tollgate check` on `db`: its exit code and output.
fn check(db: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["check", "--db", db]).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Everything the tests assert once the fault is over and the load stopped.
async fn assert_nothing_lost(c: &Client, seen: &load::Seen, db_url: &str, server: &Server) {
    let held = held_after_settles(c).await;
    let events = load::events_by_id(&c.http, &c.base, TOKEN).await;
    let wrong = load::acked_not_in_ledger(seen, &events);
    let open = pg::connect(db_url)
        .await
        .query_one("SELECT COUNT(*) FROM holds WHERE state = 'open'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    let (code, report) = check(db_url);
    let others = [&seen.calls, &seen.events, &seen.holds].iter().map(|t| t.other_count).sum::<usize>();
    assert!(
        others == 0,
        "every answer is 2xx or 503: calls {:?}, events {:?}, holds {:?}\n{}",
        seen.calls.other,
        seen.events.other,
        seen.holds.other,
        server.log_text()
    );
    assert!(wrong.is_empty(), "{} acknowledged writes missing or wrong:\n{}", wrong.len(), wrong.join("\n"));
    assert!(seen.holds_abandoned.is_empty(), "holds the load gave up on: {:?}", seen.holds_abandoned);
    assert_eq!((held, open), (0, 0), "no hold is left open; the server's log:\n{}", server.log_text());
    assert_eq!(code, Some(0), "tollgate check:\n{report}");
}

fn report(what: &str, seen: &load::Seen) {
    eprintln!(
        "{what}\n  {}\n  {}\n  {}\n  acknowledged: {} calls, {} events, {} settles",
        load::summary("gateway calls", &seen.calls),
        load::summary("API events", &seen.events),
        load::summary("API holds and settles", &seen.holds),
        seen.calls_acked.len(),
        seen.events_acked.len(),
        seen.settles_acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_under_load_lose_nothing() {
    let Some(db) = pg::TestDb::create("fault_postgres").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let server = Server::with_mock_on(dir.path(), TOKEN, &mock, &db.url, "").await;
    let c = Client::new(&server, TOKEN);
    let secret = account_and_key(&c).await;

    let load = load::Load::start(&server.base, TOKEN, &secret, 6, 4, 2);
    // The killer's own connection is to the admin database, and it kills only backends of the
    // test's database: other tests on the shared server are not touched.
    let killer = pg::connect(&std::env::var(pg::URL_ENV).unwrap()).await;
    let mut killed = 0i64;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let row = killer
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .await
            .unwrap();
        killed += row.get::<_, i64>(0);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.stop().await;
    report(&format!("{killed} connections killed in 12 rounds, 400 ms apart"), &seen);
    let back = service_comes_back(&c, &secret).await;
    eprintln!("  service answered again {back:?} after the load stopped");
    assert!(killed >= 12, "the server's connections were killed: {killed}");
    assert!(seen.calls_acked.len() > 20 && seen.events_acked.len() > 20, "the load ran: {seen:?}");
    assert_nothing_lost(&c, &seen, &db.url, &server).await;
}

/// A throwaway PostgreSQL cluster of its own: stopped (immediately) and removed when dropped.
struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn bin_dir() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).collect()
            })
            .unwrap_or_default();
        found.sort();
        found.pop().expect(
            "the PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are needed: apt-get install postgresql",
        )
    }

    /// Runs a PostgreSQL program as the `postgres` user (initdb and the server refuse root).
    fn run(&self, program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("runuser -u postgres {program}: {e} (the test needs root and a postgres user)"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_str().unwrap().to_string()
    }

    fn create() -> Cluster {
        let bin = Cluster::bin_dir();
        let dir = tempfile::Builder::new().prefix("tollgate-pg-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let chown = Command::new("chown").args(["postgres:postgres", dir.path().to_str().unwrap()]).status().unwrap();
        assert!(chown.success(), "chown of the cluster's directory to postgres");
        let cluster = Cluster { bin, dir, port };
        cluster.run("initdb", &["-D", &cluster.data(), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        cluster.start();
        cluster
    }

    fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &["start", "-w", "-t", "30", "-D", &self.data(), "-l", log.to_str().unwrap(), "-o", &options],
        );
    }

    /// `mode`: `fast` (a clean shutdown that ends every session) or `immediate` (a crash:
    /// recovery from the WAL at the next start).
    fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["stop", "-w", "-m", mode, "-D", &self.data()]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D", &self.data()])
            .output();
    }
}

fn pg_server_binaries_present() -> bool {
    Path::new("/usr/lib/postgresql").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgresql_restart_under_load_answers_503_then_recovers() {
    assert!(
        pg_server_binaries_present(),
        "this test starts a private PostgreSQL cluster: install the server (apt-get install postgresql)"
    );
    let cluster = Cluster::create();
    let db = cluster.url();
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let server = Server::with_mock_on(dir.path(), TOKEN, &mock, &db, "").await;
    let c = Client::new(&server, TOKEN);
    let secret = account_and_key(&c).await;

    let load = load::Load::start(&server.base, TOKEN, &secret, 6, 4, 2);
    let mut down = Duration::ZERO;
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let acked_before = load.acked();
        let stopped = Instant::now();
        cluster.stop(mode);
        let ready = c.http.get(format!("{}/readyz", c.base)).send().await.unwrap().status().as_u16();
        assert_eq!(ready, 503, "/readyz while PostgreSQL is down");
        let metrics = c.http.get(format!("{}/metrics", c.base)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(metrics.status().as_u16(), 503, "/metrics while PostgreSQL is down");
        assert!(metrics.headers().contains_key("retry-after"), "/metrics says when to try again");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.start();
        down += stopped.elapsed();
        eprintln!(
            "stopped ({mode}) and started again in {:?}; {acked_before} writes acknowledged before",
            stopped.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = load.stop().await;
    report(&format!("PostgreSQL stopped (fast, then immediate) and started twice, down {down:?} in all"), &seen);
    let back = service_comes_back(&c, &secret).await;
    eprintln!("  service answered again {back:?} after the load stopped");
    let ready = c.http.get(format!("{}/readyz", c.base)).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 200, "/readyz once PostgreSQL is back");
    assert!(
        seen.calls.unavailable + seen.events.unavailable + seen.holds.unavailable > 0,
        "503s while PostgreSQL was down"
    );
    assert!(seen.calls_acked.len() > 20 && seen.events_acked.len() > 20, "the load ran: {seen:?}");
    assert_nothing_lost(&c, &seen, &db, &server).await;
    drop(server);
}
