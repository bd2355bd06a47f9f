//! Durable holds + settles through the PostgreSQL store, at PostgreSQL's default durability
//! (`synchronous_commit = on`: every acknowledged write is in the WAL on disk). One call is one
//! hold followed by one settle that records its usage event, as in `sqlite_ledger`.
//!
//! Several store instances, each with its own connection pool, stand in for several tollgate
//! processes on one database: the tasks are spread over them. `--pools 1` puts every call on one
//! account's programmatic pool (one hot row); `--pools 1000` spreads them over 1,000 accounts.
//! The database is created fresh (a random name) on the server named by `--url` (default
//! `TOLLGATE_PG_URL`, else postgres://postgres@127.0.0.1:5432/postgres) and dropped at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use tokio_postgres::NoTls;
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Usage};
use tollgate_postgres::PgStore;
use tollgate_store::{HoldOutcome, HoldRequest, NewAccount, NewEvent, NewGrant, SettleRequest, Store};

const MODEL: &str = "claude-sonnet-4-5";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

struct Options {
    url: String,
    stores: u64,
    tasks: u64,
    calls: u64,
    pools: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let url = match args.iter().position(|a| a == "--url") {
        Some(i) => args.get(i + 1).cloned().ok_or("--url needs a postgres:// url")?,
        None => std::env::var("TOLLGATE_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_string()),
    };
    let options = Options {
        url,
        stores: crate::flag(args, "--stores", 4)?.max(1),
        tasks: crate::flag(args, "--tasks", 256)?.max(1),
        calls: crate::flag(args, "--calls", 100_000)?,
        pools: crate::flag(args, "--pools", 1)?.max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let db = BenchDb::create(&options.url).await?;
        let result = measure(&options, &db.url).await;
        if std::env::var_os("TOLLGATE_BENCH_KEEP").is_some() {
            println!("postgres: TOLLGATE_BENCH_KEEP is set: kept the database {}", db.name);
        } else {
            db.drop_database().await;
        }
        result
    })
}

/// A database of its own for one run.
pub struct BenchDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl BenchDb {
    pub async fn create(admin_url: &str) -> Result<BenchDb, String> {
        let name = format!("tollgate_bench_{:016x}", getrandom::u64().map_err(|e| e.to_string())?);
        connect(admin_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| format!("create database {name}: {e}"))?;
        let (scheme, rest) = admin_url.split_once("://").ok_or("--url is not a postgres:// url")?;
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let query = path.find('?').map_or("", |i| &path[i..]);
        let url = format!("{scheme}://{authority}/{name}{query}");
        Ok(BenchDb { admin_url: admin_url.to_string(), name, url })
    }

    pub async fn drop_database(&self) {
        if let Ok(client) = connect(&self.admin_url).await
            && let Err(e) = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await
        {
            eprintln!("could not drop the benchmark database {}: {e}", self.name);
        }
    }
}

fn account_id(pool: u64) -> String {
    format!("bench-{pool:04}")
}

async fn measure(o: &Options, url: &str) -> Result<(), String> {
    let mut stores = Vec::new();
    for _ in 0..o.stores {
        stores.push(Arc::new(PgStore::open(url).await.map_err(|e| e.to_string())?));
    }
    let now = Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().ok_or("bad date")?;
    for p in 0..o.pools {
        setup(stores[0].as_ref(), &account_id(p), now).await?;
    }
    // One warm-up call per task, so that connections are open and statements prepared.
    run_tasks(o, &stores, 1, now, "warm").await?;

    let per_task = o.calls / o.tasks;
    let stats = connect(url).await?;
    let commits_before = commits(&stats).await?;
    let (cpu_before, pg_before) = (process_cpu_seconds(), postgres_cpu_seconds());
    let start = Instant::now();
    let mut latencies = run_tasks(o, &stores, per_task, now, "call").await?;
    let secs = start.elapsed().as_secs_f64();
    let (cpu_after, pg_after) = (process_cpu_seconds(), postgres_cpu_seconds());
    let commits = commits(&stats).await? - commits_before;
    let done = latencies.len() as f64;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "postgres: {done} calls (durable hold + settle with its event) on {} pool(s) from {} tasks over {} stores \
         in {secs:.2} s: {:.0} calls/s; per call p50 {:.2} ms, p99 {:.2} ms",
        o.pools,
        o.tasks,
        o.stores,
        done / secs,
        ms(pct(0.50)),
        ms(pct(0.99)),
    );
    println!(
        "postgres: {commits} commits ({:.0}/s), {:.1} writes (holds + settles) per commit",
        commits as f64 / secs,
        2.0 * done / commits.max(1) as f64
    );
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        println!("postgres: this process CPU {:.2} s = {:.1} us per call", b - a, (b - a) / done * 1e6);
    }
    if let (Some(a), Some(b)) = (pg_before, pg_after) {
        println!("postgres: PostgreSQL server CPU {:.2} s = {:.1} us per call", b - a, (b - a) / done * 1e6);
    }
    let audit = stores[0].audit().await.map_err(|e| e.to_string())?;
    if !audit.breaches.is_empty() {
        return Err(format!("ledger invariants broken after the run: {:?}", audit.breaches));
    }
    let mut charged = Nanos::ZERO;
    for p in 0..o.pools.min(1000) {
        let balance = stores[0].balance(&account_id(p), now).await.map_err(|e| e.to_string())?;
        let pool = balance.pool(PoolKind::Programmatic);
        if pool.held != Nanos::ZERO {
            return Err(format!("{} still holds {}", account_id(p), pool.held));
        }
        charged = charged.saturating_add(pool.used);
    }
    println!("postgres: charged {charged} in all, nothing held; audit clean ({} events)", audit.events_checked);
    Ok(())
}

async fn run_tasks(
    o: &Options,
    stores: &[Arc<PgStore>],
    calls: u64,
    now: DateTime<Utc>,
    prefix: &'static str,
) -> Result<Vec<Duration>, String> {
    let mut handles = Vec::new();
    for t in 0..o.tasks {
        let store = stores[(t % o.stores) as usize].clone();
        let pools = o.pools;
        handles.push(tokio::spawn(async move { task(store, t, calls, pools, now, prefix).await }));
    }
    let mut latencies = Vec::with_capacity((calls * o.tasks) as usize);
    for h in handles {
        latencies.extend(h.await.map_err(|e| e.to_string())??);
    }
    Ok(latencies)
}

/// Transactions committed in the database so far (the statistics collector's count, which
/// lags by up to a second: taken after a pause).
async fn commits(client: &tokio_postgres::Client) -> Result<i64, String> {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.batch_execute("SELECT pg_stat_clear_snapshot()").await.map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// CPU seconds (user + system) of this process, from /proc (Linux); None elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// CPU seconds of every process named `postgres` (the server and its backends), from /proc;
/// None when /proc is not readable. Backends that exit during the run are not counted.
fn postgres_cpu_seconds() -> Option<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if stat.split_once('(').and_then(|(_, r)| r.split_once(')')).is_some_and(|(name, _)| name == "postgres") {
            total += stat_cpu_seconds(&stat).unwrap_or(0.0);
        }
    }
    Some(total)
}

fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (man 5 proc).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn setup(store: &PgStore, account: &str, now: DateTime<Utc>) -> Result<(), String> {
    let new = NewAccount {
        id: account.to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().ok_or("bad date")?),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(new, now).await.map_err(|e| e.to_string())?;
    let policy = PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None };
    store.set_policy(account, PoolKind::Programmatic, policy).await.map_err(|e| e.to_string())?;
    let grant = NewGrant {
        account: account.to_string(),
        pool: PoolKind::Programmatic,
        amount: Nanos::from_usd(1_000_000),
        note: None,
    };
    store.add_grant(grant, now).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn task(
    store: Arc<PgStore>,
    t: u64,
    calls: u64,
    pools: u64,
    now: DateTime<Utc>,
    prefix: &str,
) -> Result<Vec<Duration>, String> {
    let mut latencies = Vec::with_capacity(calls as usize);
    for i in 0..calls {
        let account = account_id((t + i * 7919) % pools);
        let id = format!("{prefix}-{t}-{i}");
        let started = Instant::now();
        let request = HoldRequest {
            account: account.clone(),
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
            account: account.clone(),
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
        let settle = SettleRequest { account, hold_id: hold.id, event };
        store.settle(settle, now).await.map_err(|e| e.to_string())?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}
