//! The rollups on PostgreSQL are summed after the commit by a background task (`report`): an
//! event is added once its transaction is over, never twice and never skipped, even when a
//! transaction that took a lower seq commits after later ones; and reports read the rollups plus
//! the events not rolled up yet, so they are exact at every moment. Needs `TOLLGATE_PG_URL`:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate-postgres
//! --test rollups`.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tollgate_core::{Nanos, PoolKind, Usage};
use tollgate_postgres::PgStore;
use tollgate_store::report::{Dims, ReportStore};
use tollgate_store::{NewAccount, NewEvent, Store};

use common::TestDb;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-10T12:00:00Z").expect("a time").with_timezone(&Utc)
}

fn cycle_start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").expect("a time").with_timezone(&Utc)
}

fn event(id: &str, cost: i64) -> NewEvent {
    NewEvent {
        id: id.to_string(),
        account: "acme".to_string(),
        pool: PoolKind::Programmatic,
        model: "claude-sonnet-4-5".to_string(),
        usage: Usage { input_tokens: 100, output_tokens: 10, ..Usage::default() },
        cost: Nanos(cost),
        service_tier: None,
        inference_geo: None,
        speed: None,
        source: Some("ci".to_string()),
        key: None,
        labels: BTreeMap::new(),
        timestamp: now(),
        latency_ms: Some(200),
        ttft_ms: None,
        partial: false,
        estimated: false,
        fingerprint: id.to_string(),
    }
}

/// (calls, cost, input tokens) of acme's programmatic pool, as a report reads them.
async fn reported(store: &PgStore) -> (u64, Nanos, u64) {
    let rows = store.rollups("acme", cycle_start(), Dims::NONE).await.expect("rollups");
    let pool: Vec<_> = rows.into_iter().filter(|r| r.pool == PoolKind::Programmatic).collect();
    assert!(pool.len() <= 1, "one row per pool: {pool:?}");
    pool.first().map_or((0, Nanos::ZERO, 0), |r| (r.calls, r.cost, r.usage.input_tokens))
}

/// (calls, cost) in the rollups table itself, and the progress mark.
async fn stored(db: &tokio_postgres::Client) -> (i64, i64, i64) {
    let row = db
        .query_one(
            "SELECT COALESCE(SUM(calls), 0)::BIGINT, COALESCE(SUM(cost), 0)::BIGINT,
                 (SELECT rolled_seq FROM rollup_progress)
             FROM rollups WHERE account = 'acme'",
            &[],
        )
        .await
        .expect("rollups table");
    (row.get(0), row.get(1), row.get(2))
}

/// A store on `db` with the account acme, and a plain connection to look at its tables.
async fn acme(db: &TestDb) -> (PgStore, tokio_postgres::Client) {
    let store = db.open().await;
    let account = NewAccount {
        id: "acme".to_string(),
        tier: "team-standard".to_string(),
        anchor: Some(cycle_start()),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, now()).await.expect("create_account");
    let (sql, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    (store, sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_rolled_up_once_their_transactions_are_over() {
    let Some(db) = TestDb::create().await else { return };
    let (store, sql) = acme(&db).await;

    let first: Vec<NewEvent> = (0..5).map(|i| event(&format!("e-{i}"), 1_000)).collect();
    store.record_events(first, now()).await.expect("record_events");
    assert_eq!(reported(&store).await, (5, Nanos(5_000), 500), "exact before any rolling up");
    store.roll_up().await.expect("roll_up");
    let (calls, cost, rolled) = stored(&sql).await;
    assert_eq!((calls, cost), (5, 5_000), "the five events are in the rollups table");
    assert_eq!(reported(&store).await, (5, Nanos(5_000), 500), "and read once, not twice");

    // Another transaction takes a seq and stays open while later events commit.
    let (late, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    late.batch_execute("BEGIN").await.expect("begin");
    late.execute("SELECT pg_current_xact_id()", &[]).await.expect("an id");
    let late_seq: i64 = late
        .query_one(
            "INSERT INTO events (account, id, pool, model, input_tokens, cache_creation_5m_input_tokens,
                 cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
                 grant_part, overage_part, overshoot, labels, ts_us, cycle_start_us, partial, unsettled,
                 recorded_us, fingerprint)
             SELECT 'acme', 'late', 'programmatic', 'claude-sonnet-4-5', 7, 0, 0, 0, 1, 0, 300, 300, 0, 0, '{}',
                 $1, $2, false, false, $1, 'late'
             RETURNING seq",
            &[&now().timestamp_micros(), &cycle_start().timestamp_micros()],
        )
        .await
        .expect("insert")
        .get(0);
    assert!(late_seq > rolled);
    let more: Vec<NewEvent> = (5..8).map(|i| event(&format!("e-{i}"), 1_000)).collect();
    store.record_events(more, now()).await.expect("record_events");
    // Several steps of the background task pass; none may move the mark past the open seq.
    tokio::time::sleep(tollgate_postgres::ROLL_EVERY * 4).await;
    let (_, _, rolled) = stored(&sql).await;
    assert!(rolled < late_seq, "the mark ({rolled}) passed seq {late_seq} of a transaction still open");
    assert_eq!(reported(&store).await, (8, Nanos(8_000), 800), "the open event is not seen, the others are");

    late.batch_execute("COMMIT").await.expect("commit");
    store.roll_up().await.expect("roll_up");
    let (calls, cost, rolled) = stored(&sql).await;
    assert!(rolled >= late_seq);
    assert_eq!((calls, cost), (9, 8_300), "every event is in the rollups table once, the late one too");
    assert_eq!(reported(&store).await, (9, Nanos(8_300), 807));
}

/// A mark restored from another server (a dump) names a transaction id this server has not
/// reached: no transaction here can hold the seqs it covers, so rolling up goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_from_another_server_does_not_stall_rolling_up() {
    let Some(db) = TestDb::create().await else { return };
    let (store, sql) = acme(&db).await;
    sql.batch_execute("UPDATE rollup_progress SET pending_xid = '900000000000'::xid8").await.expect("restored mark");
    let events: Vec<NewEvent> = (0..3).map(|i| event(&format!("e-{i}"), 1_000)).collect();
    store.record_events(events, now()).await.expect("record_events");
    tokio::time::timeout(std::time::Duration::from_secs(30), store.roll_up())
        .await
        .expect("rolling up goes on")
        .expect("roll_up");
    assert_eq!(stored(&sql).await.0, 3, "the three events are in the rollups table");
    assert_eq!(reported(&store).await, (3, Nanos(3_000), 300));
}
