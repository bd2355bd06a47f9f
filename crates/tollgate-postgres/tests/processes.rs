//! Several stores on one database, each with its own connections, as several tollgate processes
//! would be (SPEC section 10): migrations when all start at once, a `block` limit that holds
//! across them, sweeps that settle each hold exactly once, and a recovery at start that leaves
//! the holds of the other live stores alone. Needs `TOLLGATE_PG_URL` like the other tests:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate-postgres
//! --test processes`.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use tokio::sync::Barrier;
use tollgate_core::{Nanos, PoolKind, Tier};
use tollgate_postgres::PgStore;
use tollgate_store::{HoldOutcome, HoldRequest, HoldState, NewAccount, Store};

use common::TestDb;

const STORES: usize = 4;
const P: PoolKind = PoolKind::Programmatic;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-10T12:00:00Z").expect("a time").with_timezone(&Utc)
}

/// `STORES` stores opened at the same moment on one fresh database.
async fn open_at_once(db: &TestDb) -> Vec<Arc<PgStore>> {
    let barrier = Arc::new(Barrier::new(STORES));
    let tasks: Vec<_> = (0..STORES)
        .map(|_| {
            let (url, barrier) = (db.url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                PgStore::open(&url).await
            })
        })
        .collect();
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(Arc::new(task.await.expect("open task").expect("each store opens while the others migrate")));
    }
    stores
}

/// A `team-standard` account ($50 programmatic, `block`) anchored on 2026-11-01.
async fn account(store: &PgStore, id: &str) {
    let anchor = DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").expect("a time").with_timezone(&Utc);
    let account = NewAccount {
        id: id.to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(anchor),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, now()).await.expect("create_account");
}

fn hold_request(account: &str, id: &str, amount: Nanos, ttl_s: u64) -> HoldRequest {
    HoldRequest {
        account: account.to_string(),
        id: id.to_string(),
        pool: P,
        key: None,
        amount,
        ttl_s,
        model: Some("claude-sonnet-4-5".to_string()),
        source: Some("processes".to_string()),
        fingerprint: format!("fp-{id}-{}-{ttl_s}", amount.0),
        made_by: tollgate_store::Maker::Admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_started_at_once_migrate_once() {
    let Some(db) = TestDb::create().await else { return };
    let stores = open_at_once(&db).await;
    let tiers = stores[0].tiers().await.expect("tiers");
    let builtins: BTreeSet<String> = Tier::builtins().into_iter().map(|t| t.id).collect();
    let ids: BTreeSet<String> = tiers.iter().map(|t| t.id.clone()).collect();
    assert_eq!(ids, builtins, "the built-in tiers, once each");
    assert_eq!(tiers.len(), builtins.len(), "no tier twice");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .expect("schema_version")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let each_once: Vec<i32> = (1..=versions.len() as i32).collect();
    assert!(!versions.is_empty() && versions == each_once, "each migration recorded once: {versions:?}");
}

/// 200 holds of $1 on a $50 `block` pool, from four stores at once: exactly 50 admitted, each
/// seeing a distinct remaining, and the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_block_limit_holds_across_stores() {
    let Some(db) = TestDb::create().await else { return };
    let stores = open_at_once(&db).await;
    account(&stores[0], "acme").await;
    let calls = 200;
    let barrier = Arc::new(Barrier::new(calls));
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let (store, barrier) = (stores[i % STORES].clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.hold(hold_request("acme", &format!("h-{i}"), Nanos::from_usd(1), 600), now()).await
            })
        })
        .collect();
    let mut remaining = BTreeSet::new();
    let (mut held, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("hold task").expect("hold") {
            HoldOutcome::Held(h) => {
                held += 1;
                assert!(
                    remaining.insert(h.remaining_after),
                    "two holds saw the same remaining {:?}",
                    h.remaining_after
                );
            }
            HoldOutcome::Refused { .. } => refused += 1,
            HoldOutcome::Replayed(h) => panic!("no id was repeated, yet {h:?} was replayed"),
        }
    }
    assert_eq!((held, refused), (50, 150), "exactly what fits is admitted");
    let balance = stores[1].balance("acme", now()).await.expect("balance");
    assert_eq!(balance.pool(P).held, Nanos::from_usd(50), "held = the limit, never more");
    let audit = stores[2].audit().await.expect("audit");
    assert!(audit.breaches.is_empty(), "breaches: {:#?}", audit.breaches);
}

/// Four stores sweep at the same instant: every expired hold is settled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_settle_each_hold_once() {
    let Some(db) = TestDb::create().await else { return };
    let stores = open_at_once(&db).await;
    account(&stores[0], "acme").await;
    account(&stores[0], "beta").await;
    let holds = 40;
    for i in 0..holds {
        let account = if i % 2 == 0 { "acme" } else { "beta" };
        let request = hold_request(account, &format!("h-{i}"), Nanos::from_usd(1), 60);
        let outcome = stores[i % STORES].hold(request, now()).await.expect("hold");
        assert!(matches!(outcome, HoldOutcome::Held(_)), "hold {i}: {outcome:?}");
    }
    let barrier = Arc::new(Barrier::new(STORES));
    let tasks: Vec<_> = stores
        .iter()
        .map(|store| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.expire_holds(now() + Duration::seconds(61)).await
            })
        })
        .collect();
    let mut expired = Vec::new();
    for task in tasks {
        expired.extend(task.await.expect("sweep task").expect("expire_holds"));
    }
    let ids: BTreeSet<(String, String)> =
        expired.iter().map(|e| (e.account.clone(), e.hold_id.clone().expect("a hold's event"))).collect();
    assert_eq!((expired.len(), ids.len()), (holds, holds), "each hold expired once, by one of the sweeps");
    for account in ["acme", "beta"] {
        let pool = stores[3].balance(account, now()).await.expect("balance").pool(P).clone();
        assert_eq!((pool.used, pool.held), (Nanos::from_usd(20), Nanos::ZERO), "{account}: charged once each");
    }
    assert!(stores[0].expire_holds(now() + Duration::seconds(62)).await.expect("sweep").is_empty(), "nothing left");
    let audit = stores[1].audit().await.expect("audit");
    assert!(audit.breaches.is_empty(), "breaches: {:#?}", audit.breaches);
}

/// A store starting up settles the holds past their time to live and its own, never the open
/// holds of another live store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_leaves_the_holds_of_other_stores_open() {
    let Some(db) = TestDb::create().await else { return };
    let stores = open_at_once(&db).await;
    let (a, b) = (&stores[0], &stores[1]);
    account(a, "acme").await;
    for (store, id, ttl_s) in [(a, "h-a", 600), (b, "h-b", 600), (b, "h-old", 60)] {
        let outcome = store.hold(hold_request("acme", id, Nanos::from_usd(2), ttl_s), now()).await.expect("hold");
        assert!(matches!(outcome, HoldOutcome::Held(_)), "{id}: {outcome:?}");
    }
    let later = now() + Duration::seconds(120);
    let starting = db.open().await;
    let recovered: Vec<String> =
        starting.recover_open_holds(later).await.expect("recover").into_iter().filter_map(|e| e.hold_id).collect();
    assert_eq!(recovered, ["h-old"], "a new store settles only what is past its time to live");
    let recovered: Vec<String> =
        a.recover_open_holds(later).await.expect("recover").into_iter().filter_map(|e| e.hold_id).collect();
    assert_eq!(recovered, ["h-a"], "a store's recovery settles its own open holds");
    let state = |id: &'static str| async move { b.hold_by_id("acme", id).await.expect("hold_by_id").expect(id).state };
    assert_eq!(state("h-b").await, HoldState::Open, "another live store's hold stays open");
    assert_eq!(state("h-a").await, HoldState::Expired, "h-a");
    assert_eq!(state("h-old").await, HoldState::Expired, "h-old");
}
