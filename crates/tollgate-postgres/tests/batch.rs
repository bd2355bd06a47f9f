//! The group commit of holds, settles, voids and extensions (`batch`): writes sent at the same
//! moment to one store run in one transaction, and each must still get the answer it would get
//! alone — repeated ids, conflicts and refusals inside one batch, an event id taken before, a
//! settle racing a void. Needs `TOLLGATE_PG_URL` like the other tests:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate-postgres
//! --test batch`.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::Barrier;
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_postgres::PgStore;
use tollgate_store::{
    HoldOutcome, HoldRequest, HoldState, NewAccount, NewEvent, SettleRequest, Store, StoreError, StoreResult,
};

use common::TestDb;

const P: PoolKind = PoolKind::Programmatic;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-10T12:00:00Z").expect("a time").with_timezone(&Utc)
}

fn account(id: &str) -> NewAccount {
    NewAccount {
        id: id.to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").expect("a time").with_timezone(&Utc)),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    }
}

async fn store() -> Option<(TestDb, Arc<PgStore>)> {
    let db = TestDb::create().await?;
    let store = Arc::new(db.open().await);
    store.create_account(account("acme"), now()).await.expect("create_account");
    Some((db, store))
}

fn hold(id: &str, usd: i64, fingerprint: &str) -> HoldRequest {
    HoldRequest {
        account: "acme".to_string(),
        id: id.to_string(),
        pool: P,
        key: None,
        amount: Nanos::from_usd(usd),
        ttl_s: 600,
        model: Some("claude-sonnet-4-5".to_string()),
        source: Some("batch".to_string()),
        fingerprint: fingerprint.to_string(),
        made_by: tollgate_store::Maker::Admin,
    }
}

fn settle(hold_id: &str, event_id: &str, cost: Nanos, fingerprint: &str) -> SettleRequest {
    SettleRequest {
        account: "acme".to_string(),
        hold_id: hold_id.to_string(),
        event: NewEvent {
            id: event_id.to_string(),
            account: "acme".to_string(),
            pool: P,
            model: "claude-sonnet-4-5".to_string(),
            usage: Usage { input_tokens: 10, output_tokens: 1, ..Usage::default() },
            cost,
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: Some("batch".to_string()),
            key: None,
            labels: BTreeMap::new(),
            timestamp: now(),
            latency_ms: None,
            ttft_ms: None,
            partial: false,
            estimated: false,
            fingerprint: fingerprint.to_string(),
        },
    }
}

/// Runs the futures made by `make(i)` for i in 0..n at the same moment.
async fn at_once<T, F>(n: usize, make: impl Fn(usize) -> F) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, call) = (barrier.clone(), make(i));
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

async fn audit_clean(store: &PgStore) {
    let audit = store.audit().await.expect("audit");
    assert!(audit.breaches.is_empty(), "breaches: {:#?}", audit.breaches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hold_id_sent_many_times_at_once_is_held_once() {
    let Some((_db, store)) = store().await else { return };
    let outcomes = at_once(12, |_| {
        let store = store.clone();
        async move { store.hold(hold("h-1", 2, "fp-1"), now()).await }
    })
    .await;
    let held = outcomes.iter().filter(|o| matches!(o, Ok(HoldOutcome::Held(_)))).count();
    let replayed = outcomes.iter().filter(|o| matches!(o, Ok(HoldOutcome::Replayed(_)))).count();
    assert_eq!((held, replayed), (1, 11), "{outcomes:?}");
    // The same id with other contents: a conflict, whether in the same batch or a later one.
    let outcomes = at_once(6, |i| {
        let store = store.clone();
        async move { store.hold(hold("h-2", 1, &format!("fp-2-{i}")), now()).await }
    })
    .await;
    let held = outcomes.iter().filter(|o| matches!(o, Ok(HoldOutcome::Held(_)))).count();
    let conflicts = outcomes.iter().filter(|o| matches!(o, Err(StoreError::Conflict(_)))).count();
    assert_eq!((held, conflicts), (1, 5), "{outcomes:?}");
    let balance = store.balance("acme", now()).await.expect("balance");
    assert_eq!(balance.pool(P).held, Nanos::from_usd(3), "each hold counted once");
    audit_clean(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_and_errors_in_a_batch_are_their_own() {
    let Some((_db, store)) = store().await else { return };
    // $50 programmatic: 30 holds of $2 at once, plus writes that must fail alone.
    let outcomes = at_once(34, |i| {
        let store = store.clone();
        async move {
            match i {
                30 => store.settle(settle("nowhere", "", Nanos(1), "x"), now()).await.map(|_| None),
                31 => store.void("acme", "nowhere", now()).await.map(|_| None),
                32 => {
                    store.hold(HoldRequest { account: "nobody".into(), ..hold("h-x", 1, "x") }, now()).await.map(Some)
                }
                33 => {
                    store.hold(HoldRequest { key: Some("no-key".into()), ..hold("h-y", 1, "y") }, now()).await.map(Some)
                }
                _ => store.hold(hold(&format!("h-{i}"), 2, &format!("fp-{i}")), now()).await.map(Some),
            }
        }
    })
    .await;
    let held = outcomes.iter().filter(|o| matches!(o, Ok(Some(HoldOutcome::Held(_))))).count();
    let refused = outcomes.iter().filter(|o| matches!(o, Ok(Some(HoldOutcome::Refused { .. })))).count();
    assert_eq!((held, refused), (25, 5), "exactly what fits: {outcomes:?}");
    assert!(matches!(outcomes[30], Err(StoreError::NotFound(_))), "{:?}", outcomes[30]);
    assert!(matches!(outcomes[31], Err(StoreError::NotFound(_))), "{:?}", outcomes[31]);
    assert!(matches!(outcomes[32], Err(StoreError::NotFound(_))), "{:?}", outcomes[32]);
    assert!(matches!(outcomes[33], Err(StoreError::Invalid(_))), "{:?}", outcomes[33]);
    audit_clean(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settles_in_one_batch_repeat_conflict_and_meet_taken_event_ids() {
    let Some((_db, store)) = store().await else { return };
    for i in 0..6 {
        let outcome = store.hold(hold(&format!("h-{i}"), 1, &format!("fp-{i}")), now()).await.expect("hold");
        assert!(matches!(outcome, HoldOutcome::Held(_)));
    }
    // h-0 settled first under the event id "taken".
    store.settle(settle("h-0", "taken", Nanos(1_000), "s-0"), now()).await.expect("first settle");
    let cost = Nanos(500_000);
    let results: Vec<StoreResult<_>> = at_once(9, |i| {
        let store = store.clone();
        async move {
            let request = match i {
                // h-1 settled twice at once with the same usage: one event, both answers.
                0 | 1 => settle("h-1", "", cost, "s-1"),
                // h-2 twice with different usages: one wins, the other is a conflict.
                2 => settle("h-2", "", cost, "s-2a"),
                3 => settle("h-2", "", cost, "s-2b"),
                // h-3 under an event id already taken by h-0's event: a conflict, the hold stays open.
                4 => settle("h-3", "taken", cost, "s-3"),
                // h-4 and h-5 under one new event id: one wins.
                5 => settle("h-4", "shared", cost, "s-4"),
                6 => settle("h-5", "shared", cost, "s-5"),
                // h-0 again, as before: the first event.
                7 => settle("h-0", "taken", Nanos(1_000), "s-0"),
                _ => {
                    return store.void("acme", "h-4", now()).await.map(|h| (h.id, -1));
                }
            };
            store.settle(request, now()).await.map(|e| (e.hold_id.expect("a hold's event"), e.seq))
        }
    })
    .await;
    let ok = |i: usize| results[i].as_ref().unwrap_or_else(|e| panic!("settle {i}: {e}"));
    assert_eq!(ok(0), ok(1), "one settle repeated: the same event");
    assert_eq!(
        [&results[2], &results[3]].iter().filter(|r| matches!(r, Err(StoreError::Conflict(_)))).count(),
        1,
        "{results:?}"
    );
    assert!(matches!(results[4], Err(StoreError::Conflict(_))), "taken event id: {:?}", results[4]);
    assert_eq!(ok(7).0, "h-0");
    let h4 = store.hold_by_id("acme", "h-4").await.expect("hold_by_id").expect("h-4").state;
    let h5 = store.hold_by_id("acme", "h-5").await.expect("hold_by_id").expect("h-5").state;
    // "shared" goes to one of h-4 and h-5; h-4 is also raced by a void.
    let shared: Vec<bool> = [5, 6].iter().map(|i| results[*i].is_ok()).collect();
    assert!(shared.iter().filter(|ok| **ok).count() <= 1, "one event id, one event: {results:?}");
    match (&results[5], &results[8]) {
        (Ok(_), Err(StoreError::Conflict(_))) => assert_eq!(h4, HoldState::Settled),
        (Err(StoreError::Conflict(_)), Ok(_)) => assert_eq!(h4, HoldState::Voided),
        other => panic!("h-4 is settled or voided, once: {other:?}"),
    }
    assert!(matches!(h5, HoldState::Settled | HoldState::Open), "{h5:?}");
    let h3 = store.hold_by_id("acme", "h-3").await.expect("hold_by_id").expect("h-3");
    assert_eq!(h3.state, HoldState::Open, "a refused settle changes nothing");
    audit_clean(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extensions_and_voids_in_one_batch() {
    let Some((_db, store)) = store().await else { return };
    for i in 0..8 {
        store.hold(hold(&format!("h-{i}"), 1, &format!("fp-{i}")), now()).await.expect("hold");
    }
    let later = now() + chrono::Duration::seconds(100);
    let results = at_once(8, |i| {
        let store = store.clone();
        async move {
            let id = format!("h-{i}");
            if i % 2 == 0 {
                store.extend_hold("acme", &id, 900, later).await
            } else {
                store.void("acme", &id, later).await
            }
        }
    })
    .await;
    for (i, r) in results.iter().enumerate() {
        let h = r.as_ref().unwrap_or_else(|e| panic!("h-{i}: {e}"));
        let stored = store.hold_by_id("acme", &h.id).await.expect("hold_by_id").expect("hold");
        if i % 2 == 0 {
            assert_eq!((stored.state, stored.expires_at), (HoldState::Open, later + chrono::Duration::seconds(900)));
        } else {
            assert_eq!(stored.state, HoldState::Voided);
        }
    }
    assert_eq!(store.balance("acme", now()).await.expect("balance").pool(P).held, Nanos::from_usd(4));
    audit_clean(&store).await;
}

/// A pool row locked by another transaction (another process's batch, until its commit) does
/// not hold up the writes to other pools that share its batch: those are answered while it is
/// still locked, and the write that needs it is answered once it is free. On one thread, so
/// that the three writes are sent before the writer takes them and share one batch.
#[tokio::test]
async fn a_pool_locked_elsewhere_does_not_hold_up_other_pools() {
    let Some((db, store)) = store().await else { return };
    store.create_account(account("beta"), now()).await.expect("create_account");
    // Both pools' rows for the cycle exist (the first hold of a cycle creates them).
    for account in ["acme", "beta"] {
        let h = HoldRequest { account: account.to_string(), ..hold("warm", 1, "warm") };
        store.hold(h, now()).await.expect("hold");
        store.void(account, "warm", now()).await.expect("void");
    }
    let (other, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    other.batch_execute("BEGIN; SELECT * FROM pool_cycles WHERE account = 'acme' FOR UPDATE").await.expect("lock");

    let acme = store.hold(hold("a-1", 2, "a-1"), now());
    tokio::pin!(acme);
    let beta_hold = |id: &str| store.hold(HoldRequest { account: "beta".to_string(), ..hold(id, 3, id) }, now());
    let betas = async { tokio::join!(beta_hold("b-1"), beta_hold("b-2")) };
    let wait = std::time::Duration::from_secs(20);
    let answered = tokio::time::timeout(wait, async {
        tokio::select! {
            biased;
            a = &mut acme => panic!("acme's hold was answered while its pool row is locked: {a:?}"),
            b = betas => b,
        }
    })
    .await
    .expect("beta's holds are answered while acme's pool row is locked");
    for outcome in [answered.0, answered.1] {
        assert!(matches!(outcome, Ok(HoldOutcome::Held(_))), "{outcome:?}");
    }
    other.batch_execute("COMMIT").await.expect("unlock");
    let outcome = tokio::time::timeout(wait, acme).await.expect("acme's hold is answered once its pool is free");
    assert!(matches!(outcome, Ok(HoldOutcome::Held(_))), "{outcome:?}");
    assert_eq!(store.balance("acme", now()).await.expect("balance").pool(P).held, Nanos::from_usd(2));
    assert_eq!(store.balance("beta", now()).await.expect("balance").pool(P).held, Nanos::from_usd(6));
    audit_clean(&store).await;
}

/// Parts of one lease sent at the same moment (`settle_part`, the gateway's calls on a lease)
/// are charged in one batch: each once, the lease's rest reduced by all of them, a repeated part
/// answered with the first and a conflicting one refused alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_of_one_lease_in_one_batch() {
    let Some((_db, store)) = store().await else { return };
    let lease = match store.hold(hold("lease", 10, "lease"), now()).await.expect("hold") {
        HoldOutcome::Held(h) => h,
        other => panic!("{other:?}"),
    };
    assert!(lease.amount == Nanos::from_usd(10));
    let cent = Nanos::from_usd(1).0 / 100;
    // 20 calls of 3 cents on parts of 5 cents; call-0 and call-2 sent twice, call-1 twice with
    // another cost (4 cents) the second time.
    let results = at_once(23, |i| {
        let store = store.clone();
        async move {
            let (id, cost) = match i {
                20 => ("call-0".to_string(), 3 * cent),
                21 => ("call-1".to_string(), 4 * cent),
                22 => ("call-2".to_string(), 3 * cent),
                i => (format!("call-{i}"), 3 * cent),
            };
            let r = settle("lease", &id, Nanos(cost), &format!("{id}-{cost}"));
            store.settle_part(r, Nanos(5 * cent), now()).await
        }
    })
    .await;
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let conflicts = results.iter().filter(|r| matches!(r, Err(StoreError::Conflict(_)))).count();
    assert_eq!((ok.len(), conflicts), (22, 1), "{results:?}");
    // call-1's two versions race: whichever came first is charged, the other refused.
    let charged: BTreeMap<&str, Nanos> = ok.iter().map(|e| (e.id.as_str(), e.cost)).collect();
    assert_eq!(charged.len(), 20, "twenty distinct calls, two of them repeated");
    for e in &ok {
        assert_eq!(e.hold_id.as_deref(), Some("lease"), "{e:?}");
        assert_eq!(e.cost, charged[e.id.as_str()], "a repeat answers with the first: {e:?}");
    }
    let used = Nanos(charged.values().map(|c| c.0).sum());
    assert!(used == Nanos(60 * cent) || used == Nanos(61 * cent), "{charged:?}");
    let stored = store.hold_by_id("acme", "lease").await.expect("hold_by_id").expect("the lease");
    assert_eq!((stored.state, stored.amount), (HoldState::Open, Nanos::from_usd(9)), "$10 less 20 parts of 5 cents");
    let balance = store.balance("acme", now()).await.expect("balance");
    assert_eq!((balance.pool(P).used, balance.pool(P).held), (used, Nanos::from_usd(9)));
    audit_clean(&store).await;
    store.void("acme", "lease", now()).await.expect("void");
    assert_eq!(store.balance("acme", now()).await.expect("balance").pool(P).held, Nanos::ZERO);
    audit_clean(&store).await;
}

/// A lease charged in parts and extended, or charged and voided, in the same batch: its row is
/// written once with all of it. On one thread, so that the writes sent together share a batch.
#[tokio::test]
async fn a_lease_charged_and_extended_or_voided_in_one_batch() {
    let Some((_db, store)) = store().await else { return };
    match store.hold(hold("lease", 10, "lease"), now()).await.expect("hold") {
        HoldOutcome::Held(_) => {}
        other => panic!("{other:?}"),
    }
    let cent = Nanos::from_usd(1).0 / 100;
    let part = |id: &str| store.settle_part(settle("lease", id, Nanos(3 * cent), id), Nanos(5 * cent), now());
    let later = now() + chrono::Duration::seconds(100);
    let (a, b, extended) = tokio::join!(part("call-a"), part("call-b"), store.extend_hold("acme", "lease", 600, later));
    a.expect("call-a");
    b.expect("call-b");
    assert_eq!(extended.expect("extend").expires_at, later + chrono::Duration::seconds(600));
    let stored = store.hold_by_id("acme", "lease").await.expect("hold_by_id").expect("the lease");
    assert_eq!(
        (stored.state, stored.amount, stored.expires_at),
        (HoldState::Open, Nanos(Nanos::from_usd(10).0 - 10 * cent), later + chrono::Duration::seconds(600)),
        "both parts and the extension"
    );
    audit_clean(&store).await;

    let (c, voided) = tokio::join!(part("call-c"), store.void("acme", "lease", later));
    c.expect("call-c");
    let voided = voided.expect("void");
    assert_eq!((voided.state, voided.amount), (HoldState::Voided, Nanos(Nanos::from_usd(10).0 - 15 * cent)));
    let balance = store.balance("acme", now()).await.expect("balance").pool(P).clone();
    assert_eq!((balance.used, balance.held), (Nanos(9 * cent), Nanos::ZERO), "three calls charged, the rest freed");
    audit_clean(&store).await;
}
