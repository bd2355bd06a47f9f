//! Reports and forecasts on a big account: `--events` usage events (default 10 million) in one
//! cycle, spread over its hours, 5 models, 3 sources and 10 keys; then the time of a report by
//! model and of a forecast, each as the API computes it (the pool figures plus the hourly
//! rollups), median of 20 runs.
//!
//! SQLite loads every event through `Store::record_events`. On PostgreSQL the first `--recorded`
//! events (default 20,000) go through it, timed, and the rest are written by `INSERT … SELECT`
//! from `generate_series`, one statement per million (the same rows, faster than any client). The store's rollups are then
//! brought up to date (`PgStore::roll_up`, what its background task does every half second), timed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_server::report::{self, GroupBy};
use tollgate_store::{NewAccount, NewEvent, Store};

pub fn run(args: &[String]) -> Result<(), String> {
    let events = crate::flag(args, "--events", 10_000_000)?;
    let recorded = crate::flag(args, "--recorded", 20_000)?;
    let pg = args.iter().position(|a| a == "--postgres").and_then(|i| args.get(i + 1)).cloned();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(measure(events, recorded, pg))
}

async fn measure(events: u64, recorded: u64, pg: Option<String>) -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("tollgate-bench").tempdir_in(".").map_err(|e| e.to_string())?;
    let pg_store = match &pg {
        Some(url) => Some(Arc::new(tollgate_postgres::PgStore::open(url).await.map_err(|e| e.to_string())?)),
        None => None,
    };
    let (store, backend): (Arc<dyn Store>, &str) = match &pg_store {
        Some(store) => (store.clone(), "postgres"),
        None => (
            Arc::new(tollgate_sqlite::SqliteStore::open(&dir.path().join("bench.db")).map_err(|e| e.to_string())?),
            "sqlite",
        ),
    };
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().ok_or("bad date")?;
    let now = Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).single().ok_or("bad date")?;
    let account_id = format!("big-{}", now.timestamp_micros() % 1_000_000);
    let account = NewAccount {
        id: account_id.clone(),
        tier: "enterprise".into(),
        anchor: Some(start),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    let models = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-5-5", "claude-opus-5-5", "claude-sonnet-5-5"];
    let sources = ["ci", "bot", "sdk"];
    // A PostgreSQL database keeps the account between runs: measure it again without reloading.
    if store.account(&account_id).await.map_err(|e| e.to_string())?.is_some() {
        println!("reports ({backend}): account {account_id} exists; timing its events as loaded by an earlier run");
    } else {
        store.create_account(account, start).await.map_err(|e| e.to_string())?;
        let loaded = Instant::now();
        let batch = 5_000u64;
        let span_s = (now - start).num_seconds() as u64;
        // At least the first four events go through the store: they make both pools' cycle rows.
        let through_store = if pg.is_some() { recorded.max(4).min(events) } else { events };
        let series = Series { account: &account_id, models: &models, sources: &sources, start, span_s, events, now };
        let mut i = 0u64;
        while i < through_store {
            let n = batch.min(through_store - i);
            let list: Vec<NewEvent> = (i..i + n).map(|k| series.event(k)).collect();
            store.record_events(list, now).await.map_err(|e| e.to_string())?;
            i += n;
        }
        let load_s = loaded.elapsed().as_secs_f64();
        println!(
            "reports ({backend}): recorded {through_store} events through record_events in {load_s:.1} s ({:.0} events/s)",
            through_store as f64 / load_s
        );
        if let Some(url) = &pg
            && through_store < events
        {
            let bulk = Instant::now();
            bulk_load(url, &series, through_store).await?;
            let s = bulk.elapsed().as_secs_f64();
            println!("reports ({backend}): bulk-loaded {} more events in {s:.0} s", events - through_store);
        }
    }
    if let (Some(store), Some(url)) = (&pg_store, &pg) {
        let t = Instant::now();
        store.roll_up().await.map_err(|e| e.to_string())?;
        println!("reports ({backend}): rolled up in {:.1} s", t.elapsed().as_secs_f64());
        let (client, connection) =
            tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        client.execute("ANALYZE events, rollups", &[]).await.map_err(|e| e.to_string())?;
    }

    time_reports(store.as_ref(), &account_id, now, backend).await
}

/// Times a report by model and a forecast on the account, 20 times each, and prints the medians.
async fn time_reports(
    store: &dyn Store,
    account_id: &str,
    now: chrono::DateTime<Utc>,
    backend: &str,
) -> Result<(), String> {
    let acct = store.account(account_id).await.map_err(|e| e.to_string())?.ok_or("no account")?;
    let mut report_times = Vec::new();
    let mut forecast_times = Vec::new();
    let mut groups = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let cycle = report::cycle_of(&acct, "current", now)?;
        let balance = store.balance(account_id, cycle.start).await.map_err(|e| e.to_string())?;
        let rollups = store
            .rollups(account_id, cycle.start, GroupBy::dims(Some(&GroupBy::Model)))
            .await
            .map_err(|e| e.to_string())?;
        let r = report::build(&acct, &balance, &rollups, Some(&GroupBy::Model));
        let json = report::to_json(&r);
        groups = json["groups"].as_array().map(Vec::len).unwrap_or(0);
        report_times.push(t.elapsed());

        let t = Instant::now();
        let balance = store.balance(account_id, now).await.map_err(|e| e.to_string())?;
        let rollups =
            store.rollups(account_id, balance.cycle.start, report::FORECAST_DIMS).await.map_err(|e| e.to_string())?;
        for p in &balance.pools {
            std::hint::black_box(report::forecast_pool(p, balance.cycle, &rollups, now));
        }
        forecast_times.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "reports ({backend}): report by model ({groups} groups) median {:.2} ms; forecast median {:.2} ms (20 runs each)",
        median(&mut report_times),
        median(&mut forecast_times)
    );
    Ok(())
}

/// The benchmark's events: `e0` … `e{events - 1}` of one account, spread evenly over `span_s`
/// seconds from `start`, recorded at `now`.
struct Series<'a> {
    account: &'a str,
    models: &'a [&'a str],
    sources: &'a [&'a str],
    start: chrono::DateTime<Utc>,
    span_s: u64,
    events: u64,
    now: chrono::DateTime<Utc>,
}

impl Series<'_> {
    /// Event `k` of the series, as the store records it.
    fn event(&self, k: u64) -> NewEvent {
        NewEvent {
            id: format!("e{k}"),
            account: self.account.to_string(),
            pool: if k.is_multiple_of(4) { PoolKind::Interactive } else { PoolKind::Programmatic },
            model: self.models[(k % 5) as usize].to_string(),
            usage: Usage { input_tokens: 1_000 + k % 500, output_tokens: 200, ..Usage::default() },
            cost: Nanos(6_000_000),
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: Some(self.sources[(k % 3) as usize].to_string()),
            key: None,
            labels: BTreeMap::new(),
            timestamp: self.start + chrono::Duration::seconds((k * self.span_s / self.events) as i64),
            latency_ms: Some(500 + k % 1000),
            ttft_ms: None,
            partial: false,
            estimated: false,
            fingerprint: format!("e{k}"),
        }
    }
}

/// Writes the events from `from` to the end of `series` with SQL, a million per statement, and
/// adds their charges to the pools' totals, as `record_events` would have.
async fn bulk_load(url: &str, series: &Series<'_>, from: u64) -> Result<(), String> {
    let Series { account, models, sources, start, span_s, events: to, now } = *series;
    let (mut client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    // One transaction, with its id taken before its first seq, as the store's own event inserts
    // do (the rollups rely on it: tollgate-postgres `report`).
    let client = client.transaction().await.map_err(|e| e.to_string())?;
    client.execute("SELECT pg_current_xact_id()", &[]).await.map_err(|e| e.to_string())?;
    let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
    let sources: Vec<String> = sources.iter().map(|m| m.to_string()).collect();
    let (start_us, now_us) = (start.timestamp_micros(), now.timestamp_micros());
    let mut lo = from as i64;
    while lo < to as i64 {
        let hi = (lo + 1_000_000).min(to as i64);
        client
            .execute(
                "INSERT INTO events (account, id, pool, model, input_tokens, cache_creation_5m_input_tokens,
                     cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
                     grant_part, overage_part, overshoot, source, labels, ts_us, cycle_start_us, latency_ms, partial,
                     unsettled, recorded_us, fingerprint)
                 SELECT $1, 'e' || k, CASE WHEN k % 4 = 0 THEN 'interactive' ELSE 'programmatic' END,
                     ($2::text[])[k % 5 + 1], 1000 + k % 500, 0, 0, 0, 200, 0, 6000000, 6000000, 0, 0,
                     ($3::text[])[k % 3 + 1], '{}', $4 + (k * $5 / $6) * 1000000, $4, 500 + k % 1000, false, false,
                     $7, 'e' || k
                 FROM generate_series($8::int8, $9::int8 - 1) AS k",
                &[&account, &models, &sources, &start_us, &(span_s as i64), &(to as i64), &now_us, &lo, &hi],
            )
            .await
            .map_err(|e| e.to_string())?;
        lo = hi;
    }
    client
        .execute(
            "UPDATE pool_cycles p SET used = p.used + s.charged
             FROM (SELECT pool, SUM(grant_part) AS charged FROM events
                   WHERE account = $1 AND cycle_start_us = $2 AND seq > (SELECT MAX(seq) FROM events WHERE account = $1 AND id = $3)
                   GROUP BY pool) AS s
             WHERE p.account = $1 AND p.cycle_start_us = $2 AND p.pool = s.pool",
            &[&account, &start_us, &format!("e{}", from - 1)],
        )
        .await
        .map_err(|e| e.to_string())?;
    client.commit().await.map_err(|e| e.to_string())
}
