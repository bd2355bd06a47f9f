//! Durable holds + settles through the SQLite store from many concurrent tasks, at the default
//! durability (WAL, synchronous=FULL: every acknowledged write is fsync'd; group commit).
//! One call is one hold followed by one settle that records its usage event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Usage};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{HoldOutcome, HoldRequest, NewAccount, NewEvent, NewGrant, SettleRequest, Store};

const ACCOUNT: &str = "bench";
const MODEL: &str = "claude-sonnet-4-5";

pub fn run(args: &[String]) -> Result<(), String> {
    let tasks = crate::flag(args, "--tasks", 64)?;
    let calls = crate::flag(args, "--calls", 200_000)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(measure(tasks, calls))
}

async fn measure(tasks: u64, calls: u64) -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("tollgate-bench").tempdir_in(".").map_err(|e| e.to_string())?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("bench.db")).map_err(|e| e.to_string())?);
    let now = Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().ok_or("bad date")?;
    setup(store.as_ref(), now).await?;

    let per_task = calls / tasks;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move { task(store, t, per_task, now).await }));
    }
    let mut latencies = Vec::with_capacity(calls as usize);
    for h in handles {
        latencies.extend(h.await.map_err(|e| e.to_string())??);
    }
    let secs = start.elapsed().as_secs_f64();
    let done = latencies.len() as f64;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];

    let balance = store.balance(ACCOUNT, now).await.map_err(|e| e.to_string())?;
    let audit = store.audit().await.map_err(|e| e.to_string())?;
    println!(
        "sqlite: {done} calls (durable hold + settle with its event) from {tasks} tasks in {secs:.2} s: \
         {:.0} calls/s; per call p50 {:.2} ms, p99 {:.2} ms",
        done / secs,
        ms(pct(0.50)),
        ms(pct(0.99)),
    );
    if let Some(cpu) = thread_cpu_seconds("tg-sqlite-write") {
        println!(
            "sqlite: writer thread CPU {:.2} s = {:.1} us per call ({:.0} % of the run)",
            cpu,
            cpu / done * 1e6,
            cpu / secs * 100.0
        );
    }
    let programmatic = balance.pools.iter().find(|p| p.pool == PoolKind::Programmatic).ok_or("no programmatic pool")?;
    println!("sqlite: charged {} over {done} calls, held {}", programmatic.used, programmatic.held);
    if !audit.breaches.is_empty() {
        return Err(format!("ledger invariants broken after the run: {:?}", audit.breaches));
    }
    Ok(())
}

/// CPU seconds (user + system) of this process's threads whose name starts with `prefix`, from
/// /proc (Linux); None elsewhere.
fn thread_cpu_seconds(prefix: &str) -> Option<f64> {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        if !head.split_once('(')?.1.starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3, utime 14 and stime 15 (man 5 proc).
        ticks += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(ticks as f64 / 100.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn setup(store: &dyn Store, now: DateTime<Utc>) -> Result<(), String> {
    let account = NewAccount {
        id: ACCOUNT.to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().ok_or("bad date")?),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, now).await.map_err(|e| e.to_string())?;
    let policy = PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None };
    store.set_policy(ACCOUNT, PoolKind::Programmatic, policy).await.map_err(|e| e.to_string())?;
    let grant = NewGrant {
        account: ACCOUNT.to_string(),
        pool: PoolKind::Programmatic,
        amount: Nanos::from_usd(1_000_000),
        note: None,
    };
    store.add_grant(grant, now).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn task(store: Arc<dyn Store>, t: u64, calls: u64, now: DateTime<Utc>) -> Result<Vec<Duration>, String> {
    let mut latencies = Vec::with_capacity(calls as usize);
    for i in 0..calls {
        let id = format!("call-{t}-{i}");
        let started = Instant::now();
        let request = HoldRequest {
            account: ACCOUNT.to_string(),
            id: id.clone(),
            pool: PoolKind::Programmatic,
            key: None,
            amount: Nanos(100_000_000),
            ttl_s: 600,
            model: Some(MODEL.to_string()),
            source: Some("bench".to_string()),
            fingerprint: id.clone(),
            made_by: tollgate_store::Maker::Admin,
        };
        let hold = match store.hold(request, now).await.map_err(|e| e.to_string())? {
            HoldOutcome::Held(h) => h,
            other => return Err(format!("hold {id} not admitted: {other:?}")),
        };
        let event = NewEvent {
            id: id.clone(),
            account: ACCOUNT.to_string(),
            pool: PoolKind::Programmatic,
            model: MODEL.to_string(),
            usage: Usage { input_tokens: 1_200, output_tokens: 300, ..Usage::default() },
            cost: Nanos(8_100_000),
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: Some("bench".to_string()),
            key: None,
            labels: BTreeMap::new(),
            timestamp: now,
            latency_ms: Some(800),
            ttft_ms: Some(120),
            partial: false,
            estimated: false,
            fingerprint: id.clone(),
        };
        let settle = SettleRequest { account: ACCOUNT.to_string(), hold_id: hold.id, event };
        store.settle(settle, now).await.map_err(|e| e.to_string())?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}
