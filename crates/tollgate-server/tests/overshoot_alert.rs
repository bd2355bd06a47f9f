//! The `overshoot` alert (SPEC section 3: a charge above its hold "raises an `overshoot`
//! alert"): found by the scan of every account (at start and every minute) from the events of
//! the cycle, so an overshoot settled just before a crash, or by another process, is raised;
//! once per rule, pool and cycle; a pool that no `overshoot` rule watches is covered by the
//! built-in rule `overshoot-default`, which sends to the log channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_server::alerts::engine::{Alerter, OVERSHOOT_DEFAULT_RULE};
use tollgate_sqlite::SqliteStore;
use tollgate_store::alerts::{AlertKind, AlertQuery, AlertRule};
use tollgate_store::{HoldOutcome, HoldRequest, Maker, NewAccount, NewEvent, SettleRequest, Store};

const P: PoolKind = PoolKind::Programmatic;
const I: PoolKind = PoolKind::Interactive;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().unwrap()
}

fn account(id: &str) -> NewAccount {
    NewAccount {
        id: id.into(),
        tier: "team-standard".into(),
        anchor: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single(),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    }
}

fn event(account: &str, id: &str, pool: PoolKind, cost: Nanos) -> NewEvent {
    NewEvent {
        id: id.into(),
        account: account.into(),
        pool,
        model: "claude-sonnet-4-6".into(),
        usage: Usage { input_tokens: 1_000, ..Usage::default() },
        cost,
        service_tier: None,
        inference_geo: None,
        speed: None,
        source: None,
        key: None,
        labels: Default::default(),
        timestamp: now(),
        latency_ms: None,
        ttft_ms: None,
        partial: false,
        estimated: false,
        fingerprint: id.into(),
    }
}

/// A call held at `held` and settled at `cost` (overshoot: whatever `cost` passes `held`).
async fn call(store: &Arc<dyn Store>, account: &str, id: &str, pool: PoolKind, held: Nanos, cost: Nanos) {
    let hold = HoldRequest {
        account: account.into(),
        id: id.into(),
        pool,
        key: None,
        amount: held,
        ttl_s: 600,
        model: Some("claude-sonnet-4-6".into()),
        source: None,
        fingerprint: id.into(),
        made_by: Maker::Gateway,
    };
    assert!(matches!(store.hold(hold, now()).await.unwrap(), HoldOutcome::Held(_)), "{account} {id} held");
    let settle = SettleRequest { account: account.into(), hold_id: id.into(), event: event(account, id, pool, cost) };
    store.settle(settle, now()).await.unwrap();
}

fn rule(id: &str, kind: AlertKind, account: Option<&str>) -> AlertRule {
    AlertRule {
        id: id.into(),
        kind,
        account: account.map(str::to_string),
        pool: Some(P),
        percents: vec![],
        window_s: None,
        factor_ppm: None,
        floor: None,
        days: None,
        channels: vec![],
        from_config: false,
    }
}

fn alerter(store: &Arc<dyn Store>) -> Alerter {
    Alerter::new(
        store.clone(),
        tollgate_gateway::upstream::http_client(Duration::from_secs(1)),
        HashMap::new(),
        Default::default(),
    )
}

fn usd(x: i64) -> Nanos {
    Nanos::from_usd(x)
}

fn cents(x: i64) -> Nanos {
    Nanos(x * 10_000_000)
}

#[tokio::test]
async fn a_scan_raises_overshoot_once_per_pool_and_cycle_by_rule_or_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    for id in ["acme", "beta", "gamma"] {
        store.create_account(account(id), now()).await.unwrap();
    }
    // gamma's programmatic pool has a rule of its own; no rule watches acme's or beta's.
    store.put_alert_rule(rule("gamma-overshoot", AlertKind::Overshoot, Some("gamma"))).await.unwrap();
    // acme: $2 and $0.50 above two holds; a call within its hold; none in its interactive pool.
    call(&store, "acme", "a-1", P, usd(1), usd(3)).await;
    call(&store, "acme", "a-2", P, usd(1), cents(150)).await;
    call(&store, "acme", "a-3", P, usd(1), cents(40)).await;
    call(&store, "acme", "a-4", I, usd(1), cents(90)).await;
    // beta: every call within its hold, and many direct events (more than one page of them).
    call(&store, "beta", "b-1", P, usd(1), cents(99)).await;
    for chunk in 0..11 {
        let events = (0..1_000).map(|i| event("beta", &format!("e-{chunk}-{i}"), P, Nanos(1))).collect();
        store.record_events(events, now()).await.unwrap();
    }
    // gamma: $1 above its hold.
    call(&store, "gamma", "g-1", P, usd(1), usd(2)).await;

    let engine = alerter(&store);
    let mut fired: Vec<(String, AlertKind, String, PoolKind, String)> = engine
        .scan(now())
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.rule_id, a.kind, a.account, a.pool, a.message))
        .collect();
    fired.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(fired.len(), 2, "acme's and gamma's programmatic pools, once each: {fired:#?}");
    let (rule_id, kind, account, pool, message) = &fired[0];
    assert_eq!(
        (rule_id.as_str(), *kind, account.as_str(), *pool),
        (OVERSHOOT_DEFAULT_RULE, AlertKind::Overshoot, "acme", P)
    );
    assert!(message.contains("$2.50") && message.contains("2 events"), "{message}");
    let (rule_id, kind, account, pool, message) = &fired[1];
    assert_eq!(
        (rule_id.as_str(), *kind, account.as_str(), *pool),
        ("gamma-overshoot", AlertKind::Overshoot, "gamma", P)
    );
    assert!(message.contains("$1.00") && message.contains("1 event"), "{message}");
    // Both go to the log channel (neither rule names a channel).
    let deliveries = store.claim_deliveries(now(), 60, 10).await.unwrap();
    let channels: Vec<&str> = deliveries.iter().map(|d| d.channel.as_str()).collect();
    assert_eq!(channels, ["log", "log"]);

    // Scanning again, or from a new engine as after a restart, raises nothing more; a later
    // overshoot in the same pool and cycle neither (once per rule, pool and cycle).
    assert!(engine.scan(now()).await.unwrap().is_empty());
    call(&store, "acme", "a-5", P, usd(1), usd(5)).await;
    let restarted = alerter(&store);
    assert!(restarted.scan(now() + chrono::Duration::minutes(1)).await.unwrap().is_empty());
    assert!(engine.scan(now() + chrono::Duration::minutes(1)).await.unwrap().is_empty());

    // An overshoot written after the engine has read a pool's events is found by its next scan.
    call(&store, "beta", "b-2", P, cents(10), cents(25)).await;
    let fired = engine.scan(now() + chrono::Duration::minutes(2)).await.unwrap();
    let fired: Vec<_> = fired.iter().map(|a| (a.rule_id.as_str(), a.account.as_str(), a.message.as_str())).collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!((fired[0].0, fired[0].1), (OVERSHOOT_DEFAULT_RULE, "beta"));
    assert!(fired[0].2.contains("$0.15") && fired[0].2.contains("1 event"), "{}", fired[0].2);

    let history = store.alerts(AlertQuery { kind: Some(AlertKind::Overshoot), limit: 100, ..Default::default() });
    assert_eq!(history.await.unwrap().len(), 3);
}
