//! Reports and forecasts on a big account: `--events` usage events (default 10 million) in one
//! cycle, spread over its hours, 5 models, 3 sources and 10 keys; then the time of a report by
//! model and of a forecast, each as the API computes it (the pool figures plus the hourly
//! rollups), median of 20 runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_server::report::{self, GroupBy};
use tollgate_store::{NewAccount, NewEvent, Store};

pub fn run(args: &[String]) -> Result<(), String> {
    let events = crate::flag(args, "--events", 10_000_000)?;
    let pg = args.iter().position(|a| a == "--postgres").and_then(|i| args.get(i + 1)).cloned();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(measure(events, pg))
}

async fn measure(events: u64, pg: Option<String>) -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("tollgate-bench").tempdir_in(".").map_err(|e| e.to_string())?;
    let (store, backend): (Arc<dyn Store>, &str) = match &pg {
        Some(url) => (Arc::new(tollgate_postgres::PgStore::open(url).await.map_err(|e| e.to_string())?), "postgres"),
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
    store.create_account(account, start).await.map_err(|e| e.to_string())?;
    let models = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-5-5", "claude-opus-5-5", "claude-sonnet-5-5"];
    let sources = ["ci", "bot", "sdk"];
    let loaded = Instant::now();
    let batch = 5_000u64;
    let span_s = (now - start).num_seconds() as u64;
    let mut i = 0u64;
    while i < events {
        let n = batch.min(events - i);
        let list: Vec<NewEvent> = (i..i + n)
            .map(|k| NewEvent {
                id: format!("e{k}"),
                account: account_id.clone(),
                pool: if k % 4 == 0 { PoolKind::Interactive } else { PoolKind::Programmatic },
                model: models[(k % 5) as usize].to_string(),
                usage: Usage { input_tokens: 1_000 + k % 500, output_tokens: 200, ..Usage::default() },
                cost: Nanos(6_000_000),
                service_tier: None,
                inference_geo: None,
                speed: None,
                source: Some(sources[(k % 3) as usize].to_string()),
                key: None,
                labels: BTreeMap::new(),
                timestamp: start + chrono::Duration::seconds((k * span_s / events) as i64),
                latency_ms: Some(500 + k % 1000),
                ttft_ms: None,
                partial: false,
                fingerprint: format!("e{k}"),
            })
            .collect();
        store.record_events(list, now).await.map_err(|e| e.to_string())?;
        i += n;
    }
    let load_s = loaded.elapsed().as_secs_f64();
    println!("reports ({backend}): loaded {events} events in {load_s:.0} s ({:.0} events/s)", events as f64 / load_s);

    let acct = store.account(&account_id).await.map_err(|e| e.to_string())?.ok_or("no account")?;
    let mut report_times = Vec::new();
    let mut forecast_times = Vec::new();
    let mut groups = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let cycle = report::cycle_of(&acct, "current", now)?;
        let balance = store.balance(&account_id, cycle.start).await.map_err(|e| e.to_string())?;
        let rollups = store.rollups(&account_id, cycle.start).await.map_err(|e| e.to_string())?;
        let r = report::build(&acct, &balance, &rollups, Some(&GroupBy::Model));
        let json = report::to_json(&r);
        groups = json["groups"].as_array().map(Vec::len).unwrap_or(0);
        report_times.push(t.elapsed());

        let t = Instant::now();
        let balance = store.balance(&account_id, now).await.map_err(|e| e.to_string())?;
        let rollups = store.rollups(&account_id, balance.cycle.start).await.map_err(|e| e.to_string())?;
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
