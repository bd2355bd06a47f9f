//! `tollgate check` (SPEC sections 3 and 9): reads the database directly, no server needed,
//! verifies the ledger invariants, exit 0 when they hold, 1 on a breach, and a clear non-zero
//! exit when there is no database.
//!
//! The database comes from real activity: the `tollgate serve` binary, driven over HTTP (accounts,
//! a pool policy, a top-up, a capped key, events, holds settled, voided and left open), then
//! stopped. The breach is made by hand with SQL, as a bug or a bad restore would.
//!
//! The same on PostgreSQL when `TOLLGATE_PG_URL` names a server (a fresh database per test; see
//! `pg`); without it that test says it did not run:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate --test check`.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod pg;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "tga_check-test-admin-token";

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
        Server::start_on(dir, dir.join("tollgate.db").to_str().unwrap()).await
    }

    /// Starts `tollgate serve` in `dir` on the database `db` (a path or a url) and waits for
    /// /healthz.
    async fn start_on(dir: &Path, db: &str) -> Server {
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

    /// Stops the server the way an operator does (SIGTERM) and waits for a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("server running");
        let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(term.is_ok_and(|s| s.success()), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "tollgate serve exited with {status} on SIGTERM:\n{}", self.log_text());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tollgate serve did not exit within 20 s of SIGTERM:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn call(server: &Server, auth: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    // A client per call: no idle keep-alive connection outlives the activity.
    let mut req = reqwest::Client::new().request(method.clone(), format!("{}{path}", server.base)).bearer_auth(auth);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

async fn post(server: &Server, auth: &str, path: &str, body: Value) -> Value {
    call(server, auth, reqwest::Method::POST, path, Some(body)).await
}

fn event(id: &str, account: &str, pool: &str, input: u64, output: u64) -> Value {
    json!({
        "id": id,
        "account": account,
        "pool": pool,
        "model": "claude-sonnet-4-5",
        "usage": {"input_tokens": input, "output_tokens": output},
        "source": "check-test",
    })
}

/// Events recorded by `activity`: 5 posted + 2 holds settled.
const EVENTS: usize = 7;

/// Real ledger activity through the server: two accounts, a payg pool with a cap, a top-up,
/// a capped key, events in both pools, holds settled with usage and with a cost, one voided and
/// one left open.
async fn activity(server: &Server) {
    for (id, tier) in [("acme", "team-standard"), ("globex", "pro")] {
        post(server, TOKEN, "/api/v1/accounts", json!({"id": id, "tier": tier})).await;
    }
    call(
        server,
        TOKEN,
        reqwest::Method::PUT,
        "/api/v1/accounts/acme/pools/programmatic",
        Some(json!({"on_exhausted": "payg", "overage_cap_usd": "5"})),
    )
    .await;
    post(server, TOKEN, "/api/v1/accounts/acme/grants", json!({"pool": "interactive", "amount_usd": "10"})).await;
    let key = post(
        server,
        TOKEN,
        "/api/v1/accounts/acme/keys",
        json!({"pool": "programmatic", "name": "ci", "cap_usd": "20"}),
    )
    .await;
    let key = key["key"].as_str().unwrap().to_string();

    for (i, pool) in ["programmatic", "programmatic", "interactive"].iter().enumerate() {
        post(server, &key, "/api/v1/events", event(&format!("evt-a{i}"), "acme", pool, 1000 * (i as u64 + 1), 200))
            .await;
    }
    post(
        server,
        TOKEN,
        "/api/v1/events",
        json!({"events": [
            event("evt-a3", "acme", "interactive", 5000, 1000),
            event("evt-g0", "globex", "programmatic", 2000, 300),
        ]}),
    )
    .await;

    for hold in ["hold-1", "hold-2", "hold-3", "hold-4"] {
        post(
            server,
            &key,
            "/api/v1/accounts/acme/holds",
            json!({"id": hold, "pool": "programmatic", "amount_usd": "0.5", "model": "claude-sonnet-4-5"}),
        )
        .await;
    }
    post(
        server,
        &key,
        "/api/v1/accounts/acme/holds/hold-1/settle",
        json!({"usage": {"input_tokens": 3000, "output_tokens": 500}}),
    )
    .await;
    post(server, &key, "/api/v1/accounts/acme/holds/hold-2/settle", json!({"cost_usd": "0.125"})).await;
    call(server, &key, reqwest::Method::POST, "/api/v1/accounts/acme/holds/hold-3/void", None).await;
    // hold-4 stays open.

    let balance = call(server, TOKEN, reqwest::Method::GET, "/api/v1/accounts/acme/balance", None).await;
    assert_eq!(balance["pools"]["programmatic"]["held_usd"], "0.5", "{balance}");
}

/// Runs `tollgate check` in `dir` with the given arguments and environment, and no other
/// TOLLGATE_* variables.
fn check(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("check").args(args).current_dir(dir);
    for var in ["TOLLGATE_DB", "TOLLGATE_SERVER", "TOLLGATE_ADMIN_TOKEN", "TOLLGATE_LISTEN"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tollgate check")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A database after real activity, with the server stopped.
async fn database() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    activity(&server).await;
    server.stop().await;
    let db = dir.path().join("tollgate.db");
    (dir, db)
}

fn sql(db: &Path, statement: &str) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute(statement, []).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_clean_database_and_names_a_breach() {
    let (dir, db) = database().await;
    let db_arg = db.to_str().unwrap();
    let before = std::fs::read(&db).unwrap();

    // Clean: exit 0, and it says what it checked and that every invariant holds.
    let out = check(dir.path(), &["--db", db_arg], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "clean database: {stdout}{stderr}");
    assert!(stdout.contains("every invariant holds"), "{stdout}");
    assert!(stdout.contains(&format!("{EVENTS} events")), "{stdout}");
    assert!(stdout.contains("1 open holds"), "{stdout}");
    assert!(!stdout.contains("BREACH"), "{stdout}");
    let pools: usize = stdout
        .strip_prefix("checked ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pool count in {stdout:?}"));
    assert!(pools >= 3, "acme's two pools and globex's programmatic pool at least: {stdout}");

    // The same through TOLLGATE_DB and through a sqlite:// url.
    for (args, env) in
        [(vec![], vec![("TOLLGATE_DB", db_arg)]), (vec!["--db".to_string(), format!("sqlite://{db_arg}")], vec![])]
    {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = check(dir.path(), &args, &env);
        assert_eq!(out.status.code(), Some(0), "{args:?} {env:?}: {:?}", text(&out));
        assert!(text(&out).0.contains("every invariant holds"));
    }
    // Checking does not write, and needs no server and no lock.
    assert!(std::fs::read(&db).unwrap() == before, "tollgate check changed the database file");

    // Breach: acme's programmatic `used` no longer matches its events.
    let changed = sql(&db, "UPDATE pool_cycles SET used = used + 1 WHERE account = 'acme' AND pool = 'programmatic'");
    assert_eq!(changed, 1, "one pool cycle row");
    let out = check(dir.path(), &["--db", db_arg], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "breached database: {stdout}{stderr}");
    assert!(stdout.contains("1 breaches"), "{stdout}");
    let breaches: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BREACH")).collect();
    assert_eq!(breaches.len(), 1, "{stdout}");
    assert!(breaches[0].contains("account acme pool programmatic"), "the breach names account and pool: {stdout}");
    assert!(breaches[0].contains("used"), "the breach names the total at fault: {stdout}");
    assert!(!stdout.contains("globex") && !stdout.contains("pool interactive"), "only the breached pool: {stdout}");
    assert!(stderr.contains("ledger invariants breached"), "{stderr}");

    // Put it back: clean again (the check looks at the numbers, not at a flag).
    sql(&db, "UPDATE pool_cycles SET used = used - 1 WHERE account = 'acme' AND pool = 'programmatic'");
    let out = check(dir.path(), &["--db", db_arg], &[]);
    assert_eq!(out.status.code(), Some(0), "restored: {:?}", text(&out));

    // Another invariant: held must be the sum of open holds.
    sql(&db, "UPDATE pool_cycles SET held = held + 7 WHERE account = 'acme' AND pool = 'programmatic'");
    let out = check(dir.path(), &["--db", db_arg], &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("BREACH") && l.contains("account acme pool programmatic") && l.contains("held")),
        "{stdout}"
    );
    sql(&db, "UPDATE pool_cycles SET held = held - 7 WHERE account = 'acme' AND pool = 'programmatic'");

    // And one event counted twice for a hold.
    sql(&db, "UPDATE events SET hold_id = 'hold-1' WHERE account = 'acme' AND hold_id = 'hold-2'");
    let out = check(dir.path(), &["--db", db_arg], &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("charged by more than one event"), "{stdout}");
}

#[test]
fn check_on_a_missing_database_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere").join("tollgate.db");
    let missing_arg = missing.to_str().unwrap();
    for (how, args, env) in
        [("--db", vec!["--db", missing_arg], vec![]), ("TOLLGATE_DB", vec![], vec![("TOLLGATE_DB", missing_arg)])]
    {
        let out = check(dir.path(), &args, &env);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{how}: missing database is a usage error: {stdout}{stderr}");
        assert!(stderr.contains(missing_arg), "{how}: the message names the path: {stderr}");
        assert!(stderr.contains("does not exist"), "{how}: {stderr}");
        assert!(!stdout.contains("every invariant holds"), "{how}: {stdout}");
    }
    // Checking a missing file must not create it.
    assert!(!missing.exists() && !missing.parent().unwrap().exists());
    // Missing in an existing directory: not created either.
    let here = dir.path().join("tollgate.db");
    let out = check(dir.path(), &["--db", here.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(!here.exists(), "tollgate check created {}", here.display());
    // No --db, no TOLLGATE_DB, no config: the default ./tollgate.db, which is not there.
    let out = check(dir.path(), &[], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tollgate.db") && stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn check_on_something_that_is_not_a_database_fails() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "this is not an SQLite database, just some text that is long enough to have a header")
        .unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, "").unwrap();
    let foreign = dir.path().join("foreign.db");
    sql(&foreign, "CREATE TABLE notes (body TEXT)");
    let this_dir = dir.path().to_path_buf();
    for (file, says) in
        [(&junk, "not a database"), (&empty, "empty"), (&foreign, "not tollgate's"), (&this_dir, "directory")]
    {
        let arg = file.to_str().unwrap();
        let out = check(dir.path(), &["--db", arg], &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{arg} is a usage error: {stdout}{stderr}");
        assert!(!stdout.contains("every invariant holds"), "{stdout}");
        assert!(stderr.contains(arg) && stderr.contains(says), "{arg}: the message names the path: {stderr}");
        // The same with --json: nothing on stdout that a script could mistake for a result.
        let out = check(dir.path(), &["--json", "--db", arg], &[]);
        assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
        assert!(out.stdout.is_empty(), "{:?}", text(&out));
    }
    let out = check(dir.path(), &["--db", "mysql://db.example/tollgate"], &[]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("sqlite://"), "{:?}", text(&out));
}

/// SPEC section 9: "`--json` everywhere": one JSON object on stdout, the same exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_json_output() {
    let (dir, db) = database().await;
    let db_arg = db.to_str().unwrap();
    let out = check(dir.path(), &["--json", "--db", db_arg], &[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {}", text(&out).0));
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["database"], json!(db_arg), "{v}");
    assert_eq!(v["events_checked"], json!(EVENTS), "{v}");
    assert!(v["pools_checked"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["holds_open"].as_u64().is_some(), "{v}");
    assert_eq!(v["breaches"], json!([]), "{v}");
    sql(&db, "UPDATE pool_cycles SET used = used + 1 WHERE account = 'acme' AND pool = 'programmatic'");
    let out = check(dir.path(), &["--json", "--db", db_arg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], json!(false), "{v}");
    let breach = v["breaches"][0].to_string();
    assert!(breach.contains("acme") && breach.contains("programmatic"), "{v}");
}

/// On PostgreSQL: real activity through `tollgate serve --db postgres://…`, then `tollgate check`
/// on the same database: clean, then a breach made with SQL, then clean again; and the usage
/// errors (no such database, a database that is not tollgate's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_postgres_passes_and_names_a_breach() {
    let Some(db) = pg::TestDb::create("check").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on(dir.path(), &db.url).await;
    activity(&server).await;
    server.stop().await;

    let out = check(dir.path(), &["--db", &db.url], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "clean database: {stdout}{stderr}");
    assert!(stdout.contains("every invariant holds"), "{stdout}");
    assert!(stdout.contains(&format!("{EVENTS} events")), "{stdout}");
    assert!(stdout.contains("1 open holds"), "{stdout}");
    // Through TOLLGATE_DB, with --json.
    let out = check(dir.path(), &["--json"], &[("TOLLGATE_DB", &db.url)]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["ok"].clone(), v["database"].clone()), (json!(true), json!(db.url)), "{v}");
    assert_eq!(v["events_checked"], json!(EVENTS), "{v}");

    // Breach: acme's programmatic `used` no longer matches its events.
    let corrupt = "UPDATE pool_cycles SET used = used + 1 WHERE account = 'acme' AND pool = 'programmatic'";
    assert_eq!(db.execute(corrupt).await, 1, "one pool cycle row");
    let out = check(dir.path(), &["--db", &db.url], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "breached database: {stdout}{stderr}");
    let breaches: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BREACH")).collect();
    assert_eq!(breaches.len(), 1, "{stdout}");
    assert!(breaches[0].contains("account acme pool programmatic"), "the breach names account and pool: {stdout}");
    assert!(breaches[0].contains("used"), "the breach names the total at fault: {stdout}");
    assert!(stderr.contains("ledger invariants breached"), "{stderr}");
    db.execute("UPDATE pool_cycles SET used = used - 1 WHERE account = 'acme' AND pool = 'programmatic'").await;
    let out = check(dir.path(), &["--db", &db.url], &[]);
    assert_eq!(out.status.code(), Some(0), "restored: {:?}", text(&out));

    // A database without tollgate's tables: a usage error, and nothing is created in it.
    let Some(empty) = pg::TestDb::create("check").await else { return };
    let out = check(dir.path(), &["--db", &empty.url], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains(&empty.name) && stderr.contains("not tollgate's"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let tables = empty.number("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").await;
    assert_eq!(tables, 0, "tollgate check created tables");
    // A database that does not exist.
    let missing = pg::with_database(&db.url, "tollgate_no_such_database");
    let out = check(dir.path(), &["--db", &missing], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("tollgate_no_such_database") && stderr.contains("does not exist"), "{stderr}");
}

/// A PostgreSQL server that does not answer is the caller's to fix: exit 2, naming the database,
/// with no password shown. Needs no PostgreSQL: nothing listens on port 1.
#[test]
fn check_on_an_unreachable_postgres_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres://tollgate:s3cret@127.0.0.1:1/tollgate?connect_timeout=5";
    let out = check(dir.path(), &["--db", url], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("postgres://tollgate:***@127.0.0.1:1/tollgate"), "names the database: {stderr}");
    assert!(stderr.contains("cannot open the PostgreSQL database"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the password is not shown: {stderr}");
}
