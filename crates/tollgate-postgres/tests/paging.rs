//! Paging through an account's events by `seq` (`after_seq`, as `GET /api/v1/events` does)
//! while other processes write them must never skip a committed event. Event seqs come from an
//! identity column; a transaction that has taken its seq may commit after one that took a later
//! seq. The store orders the transactions that insert events of one account (see
//! `ledger::lock_event_order`); this test would catch a skip. Needs `TOLLGATE_PG_URL` like the
//! other tests: `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p
//! tollgate-postgres --test paging`.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_postgres::PgStore;
use tollgate_store::{EventQuery, HoldOutcome, HoldRequest, NewAccount, NewEvent, SettleRequest, Store};

use common::TestDb;

const STORES: usize = 4;
const WRITERS: usize = 8;
const EVENTS_PER_WRITER: usize = 40;
/// Every this many events of a writer is slow: its transaction stays open after taking its seq.
const SLOW_EVERY: usize = 16;
const SLOW_MS: u64 = 200;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-10T12:00:00Z").expect("a time").with_timezone(&Utc)
}

fn event(id: &str, pool: PoolKind) -> NewEvent {
    NewEvent {
        id: id.to_string(),
        account: "acme".to_string(),
        pool,
        model: "claude-sonnet-4-5".to_string(),
        usage: Usage { input_tokens: 10, output_tokens: 1, ..Usage::default() },
        cost: Nanos(45_000),
        service_tier: None,
        inference_geo: None,
        speed: None,
        source: Some("paging".to_string()),
        key: None,
        labels: BTreeMap::new(),
        timestamp: now(),
        latency_ms: None,
        ttft_ms: None,
        partial: false,
        estimated: false,
        fingerprint: format!("fp-{id}"),
    }
}

/// Writer `w`'s events: posted events in the interactive pool and holds settled in the
/// programmatic pool, in turn, so that no pool row lock orders the two kinds.
async fn write(store: Arc<PgStore>, w: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..EVENTS_PER_WRITER {
        let slow = if i % SLOW_EVERY == SLOW_EVERY / 2 { "slow-" } else { "" };
        let id = format!("{slow}w{w}-e{i}");
        if i % 2 == 0 {
            store.record_events(vec![event(&id, PoolKind::Interactive)], now()).await.expect("record_events");
        } else {
            let hold = HoldRequest {
                account: "acme".to_string(),
                id: id.clone(),
                pool: PoolKind::Programmatic,
                key: None,
                amount: Nanos(100_000),
                ttl_s: 600,
                model: Some("claude-sonnet-4-5".to_string()),
                source: Some("paging".to_string()),
                fingerprint: format!("hold-{id}"),
                made_by: tollgate_store::Maker::Admin,
            };
            let outcome = store.hold(hold, now()).await.expect("hold");
            assert!(matches!(outcome, HoldOutcome::Held(_)), "{id}: {outcome:?}");
            let settle = SettleRequest {
                account: "acme".into(),
                hold_id: id.clone(),
                event: event(&id, PoolKind::Programmatic),
            };
            store.settle(settle, now()).await.expect("settle");
        }
        ids.push(id);
    }
    ids
}

/// Follows the account's events with `after_seq` in small pages until told to stop and a last
/// page comes back empty; every event id it saw, asserting it never sees one twice.
async fn page(store: Arc<PgStore>, stop: Arc<AtomicBool>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut cursor = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let query = EventQuery { account: "acme".into(), after_seq: cursor, limit: 5, ..EventQuery::default() };
        let page = store.events(query).await.expect("events");
        for e in &page {
            assert!(seen.insert(e.id.clone()), "event {} (seq {}) was paged twice", e.id, e.seq);
            assert!(cursor.is_none_or(|c| e.seq > c), "seq {} after the cursor {cursor:?}", e.seq);
        }
        match page.last() {
            Some(last) => cursor = Some(last.seq),
            None if stopping => return seen,
            None => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_by_seq_sees_every_event_exactly_once() {
    let Some(db) = TestDb::create().await else { return };
    let mut stores = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(db.open().await));
    }
    let account = NewAccount {
        id: "acme".to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").expect("a time").with_timezone(&Utc)),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    stores[0].create_account(account, now()).await.expect("create_account");
    // A slow event's transaction stays open for SLOW_MS after inserting its row (it has its seq):
    // what a busy server or a slow fsync does now and then, made certain.
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE FUNCTION slow_event() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$;
             CREATE TRIGGER slow_event AFTER INSERT ON events FOR EACH ROW
                 WHEN (NEW.id LIKE 'slow-%') EXECUTE FUNCTION slow_event();",
            SLOW_MS as f64 / 1000.0
        ))
        .await
        .expect("the slow-event trigger");

    let stop = Arc::new(AtomicBool::new(false));
    let pager = tokio::spawn(page(stores[0].clone(), stop.clone()));
    let writers: Vec<_> = (0..WRITERS).map(|w| tokio::spawn(write(stores[w % STORES].clone(), w))).collect();
    let mut written = BTreeSet::new();
    for writer in writers {
        written.extend(writer.await.expect("writer"));
    }
    stop.store(true, Ordering::SeqCst);
    let seen = pager.await.expect("pager");

    assert_eq!(written.len(), WRITERS * EVENTS_PER_WRITER);
    let missed: Vec<&String> = written.difference(&seen).collect();
    assert!(missed.is_empty(), "the pager skipped {} committed events: {missed:?}", missed.len());
    assert_eq!(seen, written, "the pager saw exactly the events written");
    let audit = stores[1].audit().await.expect("audit");
    assert!(audit.breaches.is_empty(), "breaches: {:#?}", audit.breaches);
}
