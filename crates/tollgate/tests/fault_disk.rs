//! Fault injection on SQLite (issue 13): the real `tollgate serve` with its database on a small
//! tmpfs, under a mixed load (gateway calls through the mock upstream, API events, API holds
//! settled through the API), while a filler file takes every byte left on the tmpfs.
//!
//! While the disk is full, writes are answered with a clear 503 (never a 500, another status, a
//! cut or a hang); when the filler is deleted, service comes back by itself; every acknowledged
//! write is in the ledger at its exact cost, no hold is left open, `PRAGMA integrity_check` says
//! `ok` and `tollgate check` passes.
//!
//! The test mounts a tmpfs, so it needs root (as CI runs): where `mount` fails it fails, saying
//! why. The tmpfs is unmounted however the test ends.

mod load;
mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use serve::{Client, Server};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_fault-disk-admin-token";
/// The tmpfs's size: room for the database and its WAL under a few seconds of load.
const TMPFS_SIZE: &str = "16m";

/// A tmpfs mounted for one test, unmounted (and its mount point removed) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("tollgate-tmpfs-").tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tollgate-fault",
                dir.path().to_str().unwrap(),
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs at {} and needs root (CI runs as root): mount said: {}{}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process holds a file open): detach it now, gone once released.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// Writes zeros into `path` until the file system refuses (ENOSPC); the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return written,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

fn free_bytes(path: &Path) -> String {
    let out = Command::new("df").args(["-B1", "--output=avail"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("?").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_under_load_answers_503_and_resumes_when_space_returns() {
    let tmpfs = Tmpfs::mount(TMPFS_SIZE);
    let db: PathBuf = tmpfs.path().join("tollgate.db");
    // The server's own directory (its config and log) is not on the tmpfs.
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let mut server = Server::with_mock_on(dir.path(), TOKEN, &mock, db.to_str().unwrap(), "").await;
    let c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "team-standard"}))).await;
    let (_, secret) = c.key("load", None).await;

    let load = load::Load::start(&server.base, TOKEN, &secret, 6, 4, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let filler = tmpfs.path().join("filler");
    let filled = fill(&filler);
    let full_at = Instant::now();
    let acked_at_full = load.acked();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_while_full = load.acked() - acked_at_full;
    std::fs::remove_file(&filler).unwrap();
    let full_for = full_at.elapsed();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let seen = load.stop().await;
    eprintln!(
        "a {TMPFS_SIZE} tmpfs filled with {filled} bytes for {full_for:?} ({acked_while_full} writes acknowledged \
         meanwhile), then emptied ({} bytes free)\n  {}\n  {}\n  {}\n  acknowledged: {} calls, {} events, {} settles",
        free_bytes(tmpfs.path()),
        load::summary("gateway calls", &seen.calls),
        load::summary("API events", &seen.events),
        load::summary("API holds and settles", &seen.holds),
        seen.calls_acked.len(),
        seen.events_acked.len(),
        seen.settles_acked.len()
    );

    // Service is back: a call and an event are answered.
    let started = Instant::now();
    loop {
        let call = c
            .message(&secret, json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status();
        let event = json!({"id": format!("evt-back-{}", started.elapsed().as_nanos()), "account": "acme",
            "pool": "programmatic", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 1}});
        let (status, _) = c.api(TOKEN, reqwest::Method::POST, "/api/v1/events", Some(event)).await;
        if call == 200 && status == 201 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "service did not come back: {call} {status}\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("  service answered again {:?} after the load stopped", started.elapsed());

    let others = [&seen.calls, &seen.events, &seen.holds].iter().map(|t| t.other_count).sum::<usize>();
    assert!(
        others == 0,
        "every answer is 2xx or 503: calls {:?}, events {:?}, holds {:?}\n{}",
        seen.calls.other,
        seen.events.other,
        seen.holds.other,
        server.log_text()
    );
    let unavailable = seen.calls.unavailable + seen.events.unavailable + seen.holds.unavailable;
    assert!(unavailable > 0, "writes were refused with 503 while the disk was full");
    assert!(seen.calls_acked.len() > 20 && seen.events_acked.len() > 20, "the load ran: {seen:?}");
    let mut held = c.programmatic().await.1;
    for _ in 0..300 {
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = c.programmatic().await.1;
    }
    let events = load::events_by_id(&c.http, &c.base, TOKEN).await;
    let wrong = load::acked_not_in_ledger(&seen, &events);
    assert!(wrong.is_empty(), "{} acknowledged writes missing or wrong:\n{}", wrong.len(), wrong.join("\n"));
    assert!(seen.holds_abandoned.is_empty(), "holds the load gave up on: {:?}", seen.holds_abandoned);
    assert_eq!(held, 0, "no hold is left open; the server's log:\n{}", server.log_text());

    // The database file, with the server gone: intact, and its ledger consistent.
    server.kill();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok", "PRAGMA integrity_check");
    let open: i64 = conn.query_row("SELECT COUNT(*) FROM holds WHERE state = 'open'", [], |r| r.get(0)).unwrap();
    drop(conn);
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["check", "--db"]).arg(&db).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "tollgate check:\n{report}");
    eprintln!("  integrity_check ok, tollgate check exit 0, {open} holds open after the kill (leases in use)");
}
