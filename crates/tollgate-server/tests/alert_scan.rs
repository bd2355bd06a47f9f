//! The scan of every balance (SPEC section 6, "detection is durable"): with events written to the
//! store directly and no engine running, a scan finds each threshold and overage crossing of the
//! cycle, fires each once however often it runs, leaves `cap_hit` (a refusal, not a write) to
//! the live feed, and fires nothing for accounts or pools no rule watches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_server::alerts::engine::Alerter;
use tollgate_sqlite::SqliteStore;
use tollgate_store::alerts::{AlertKind, AlertQuery, AlertRule};
use tollgate_store::{NewAccount, NewEvent, Store};

const P: PoolKind = PoolKind::Programmatic;

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

fn event(account: &str, id: &str, cost: Nanos) -> NewEvent {
    NewEvent {
        id: id.into(),
        account: account.into(),
        pool: P,
        model: "claude-opus-4-1".into(),
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

#[tokio::test]
async fn a_scan_finds_crossings_written_with_no_engine_running_and_fires_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    for id in ["acme", "quiet", "unwatched"] {
        store.create_account(account(id), now()).await.unwrap();
    }
    for r in [
        rule("limits", AlertKind::Threshold, None),
        rule("overage", AlertKind::OverageStarted, None),
        rule("refusals", AlertKind::CapHit, None),
        rule("acme-only", AlertKind::Threshold, Some("acme")),
    ] {
        store.put_alert_rule(r).await.unwrap();
    }
    // acme: $60 on its $50 programmatic limit. quiet: $10 (20 %, under every threshold).
    store.record_events(vec![event("acme", "e1", Nanos::from_usd(60))], now()).await.unwrap();
    store.record_events(vec![event("quiet", "e2", Nanos::from_usd(10))], now()).await.unwrap();
    let balance = store.balance("acme", now()).await.unwrap();
    let pool = balance.pools.iter().find(|p| p.pool == P).unwrap();
    assert!(pool.overage.0 > 0, "the test needs acme's pool in overage: {pool:?}");

    let alerter = Alerter::new(
        store.clone(),
        tollgate_gateway::upstream::http_client(Duration::from_secs(1)),
        HashMap::new(),
        Default::default(),
    );
    let mut fired: Vec<(String, AlertKind, String, Option<u8>)> =
        alerter.scan(now()).await.unwrap().into_iter().map(|a| (a.rule_id, a.kind, a.account, a.percent)).collect();
    fired.sort_by(|a, b| (&a.0, a.3).cmp(&(&b.0, b.3)));
    let want = |rule: &str, kind, percent| (rule.to_string(), kind, "acme".to_string(), percent);
    assert_eq!(
        fired,
        vec![
            want("acme-only", AlertKind::Threshold, Some(50)),
            want("acme-only", AlertKind::Threshold, Some(80)),
            want("acme-only", AlertKind::Threshold, Some(100)),
            want("limits", AlertKind::Threshold, Some(50)),
            want("limits", AlertKind::Threshold, Some(80)),
            want("limits", AlertKind::Threshold, Some(100)),
            want("overage", AlertKind::OverageStarted, None),
        ],
        "every threshold and the overage, once each; no cap_hit without a refusal"
    );

    // Scanning again, from a new engine as after a restart, fires nothing more.
    assert!(alerter.scan(now()).await.unwrap().is_empty());
    let restarted = Alerter::new(
        store.clone(),
        tollgate_gateway::upstream::http_client(Duration::from_secs(1)),
        HashMap::new(),
        Default::default(),
    );
    assert!(restarted.scan(now() + chrono::Duration::minutes(1)).await.unwrap().is_empty());
    let history = store.alerts(AlertQuery { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(history.len(), 7, "{history:?}");

    // A crossing written later, while the engine runs, is found by the next scan.
    store.record_events(vec![event("quiet", "e3", Nanos::from_usd(20))], now()).await.unwrap();
    let fired = restarted.scan(now() + chrono::Duration::minutes(2)).await.unwrap();
    let percents: Vec<_> = fired.iter().map(|a| (a.account.as_str(), a.rule_id.as_str(), a.percent)).collect();
    assert_eq!(percents, vec![("quiet", "limits", Some(50))]);
}
