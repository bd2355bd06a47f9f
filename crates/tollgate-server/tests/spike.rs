//! Spike alerts with an injected clock: the engine sees a pool's spend second by second; a burst
//! fires one alert however long it lasts, and a later burst, after the spend calmed down, fires
//! again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate_core::{Nanos, PoolKind};
use tollgate_server::alerts::engine::Alerter;
use tollgate_sqlite::SqliteStore;
use tollgate_store::alerts::{AlertKind, AlertQuery, AlertRule};
use tollgate_store::feed::Tally;
use tollgate_store::{NewAccount, Store};

const P: PoolKind = PoolKind::Programmatic;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().unwrap()
}

#[tokio::test]
async fn a_burst_fires_once_and_the_rule_rearms_after_it_subsides() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    let account = NewAccount {
        id: "acme".into(),
        tier: "team-standard".into(),
        anchor: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single(),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, start()).await.unwrap();
    // Spend in a minute above 3 × the minutes before, and above $1.
    let rule = AlertRule {
        id: "spikes".into(),
        kind: AlertKind::Spike,
        account: None,
        pool: Some(P),
        percents: vec![],
        window_s: Some(60),
        factor_ppm: Some(3_000_000),
        floor: Some(Nanos::from_usd(1)),
        days: None,
        channels: vec![],
        from_config: false,
    };
    store.put_alert_rule(rule).await.unwrap();
    let feed = Arc::new(tollgate_store::feed::Feed::default());
    let mut live = feed.subscribe();
    let alerter = Alerter::new(
        store.clone(),
        tollgate_gateway::upstream::http_client(Duration::from_secs(1)),
        HashMap::new(),
        Default::default(),
    )
    .with_feed(feed.clone());

    let cents = |c: i64| Nanos(c * 10_000_000);
    // (seconds, spend per second): calm at 1¢/s ($0.60 a minute, under the floor), a burst at
    // 10¢/s ($6 a minute) for three minutes, calm for ten, a second burst.
    let phases = [(420, cents(1)), (180, cents(10)), (600, cents(1)), (120, cents(10))];
    let mut t = start();
    let mut fired_at = Vec::new();
    for (seconds, per_second) in phases {
        for _ in 0..seconds {
            t += chrono::Duration::seconds(1);
            let tally = Tally { calls: 1, refused: 0, charged: per_second, tokens: 100 };
            let mut balances = BTreeMap::new();
            balances.insert("acme".to_string(), store.balance("acme", t).await.unwrap());
            alerter.after_activity(t, &[(("acme".to_string(), P), tally)], &balances).await.unwrap();
            if t.timestamp() % 5 == 0 {
                for a in alerter.check_spikes(t).await.unwrap() {
                    fired_at.push((t - start()).num_seconds());
                    assert_eq!(a.kind, AlertKind::Spike);
                    assert!(a.message.contains("spend spiked"), "{}", a.message);
                }
            }
        }
    }
    assert_eq!(fired_at.len(), 2, "one alert per burst: {fired_at:?}");
    // The first burst starts at 420 s: it fires within its first minute.
    assert!((420..480).contains(&fired_at[0]), "{fired_at:?}");
    // The second burst starts at 1200 s.
    assert!((1200..1260).contains(&fired_at[1]), "{fired_at:?}");
    let history =
        store.alerts(AlertQuery { kind: Some(AlertKind::Spike), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(history.len(), 2);
    // Each alert also went to the live stream.
    let mut streamed = 0;
    while let Ok(item) = live.try_recv() {
        if let tollgate_store::feed::FeedItem::Alert(a) = item {
            assert_eq!(a.kind, AlertKind::Spike);
            streamed += 1;
        }
    }
    assert_eq!(streamed, 2);
}
