//! The hourly rollups on PostgreSQL, summed after the commit instead of inside the ledger's
//! transactions.
//!
//! A trigger that added every inserted event to its hour in the same transaction cost about a
//! tenth of the ledger's throughput, on the hot path and under its row locks. Now a background
//! task of each store ([`Roller`]) adds the committed events to the rollups a few times a second,
//! one process at a time (an advisory lock: the others skip their turn), and a reader adds the
//! events not rolled up yet to what it reads from the rollups, in the same snapshot: reports stay
//! exact to the last committed event.
//!
//! Which events are rolled up is one number, `rollup_progress.rolled_seq`: every event with a seq
//! at most that is in the rollups, and no other. The difficulty is a seq taken by a transaction
//! that has not committed yet: a seq lower than one already visible may still appear, so "the
//! highest seq seen" cannot move the mark. Each step therefore moves it to a bound read at the
//! step before (`pending_seq`, the sequence's last value then), once every transaction that could
//! hold a seq up to that bound is over: every transaction that inserts events has its id before
//! it takes a seq (the event-order lock gives it one, `ledger::EVENT_ORDER_LOCKS`), so those
//! transactions have ids below the id the rolling transaction took just after reading the bound
//! (`pending_xid`), and they are over when the oldest transaction still running (the snapshot's
//! xmin) is not older than it. Under steady load a step waits for one step's transactions to end:
//! events are rolled up within about two steps.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::oneshot;
use tokio_postgres::IsolationLevel;
use tollgate_store::report::{Dims, ReportStore, Rollup};
use tollgate_store::{StoreError, StoreResult};

use crate::rows::{query, query_one, us};
use crate::{PgStore, Result, pool_error};

/// How often each store tries to roll events up.
pub const ROLL_EVERY: Duration = Duration::from_millis(500);

/// The last seq an event took, 0 before the first (committed or not: the sequence does not roll
/// back).
pub const LAST_SEQ: &str = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_seq_seq";

/// The advisory lock that lets one rolling transaction run at a time across processes.
const ROLLUP_LOCK: i64 = 0x7467_726f_6c6c; // "tgroll"

/// Adds the events of `(rolled_seq, pending_seq]` to their hours, grouped (the same sums as the
/// readers' tail below).
const ROLL: &str = "INSERT INTO rollups AS r
    SELECT account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
           COALESCE(key_id, ''), labels, COUNT(*), SUM(input_tokens), SUM(cache_creation_5m_input_tokens),
           SUM(cache_creation_1h_input_tokens), SUM(cache_read_input_tokens), SUM(output_tokens),
           SUM(web_search_requests), SUM(cost), SUM(grant_part + overage_part), COALESCE(SUM(latency_ms), 0),
           COUNT(latency_ms)
    FROM events WHERE seq > $1 AND seq <= $2
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (account, cycle_start_us, pool, hour_us, model, source, key_id, labels) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        cache_creation_5m_input_tokens = r.cache_creation_5m_input_tokens + EXCLUDED.cache_creation_5m_input_tokens,
        cache_creation_1h_input_tokens = r.cache_creation_1h_input_tokens + EXCLUDED.cache_creation_1h_input_tokens,
        cache_read_input_tokens = r.cache_read_input_tokens + EXCLUDED.cache_read_input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        web_search_requests = r.web_search_requests + EXCLUDED.web_search_requests,
        cost = r.cost + EXCLUDED.cost,
        charged = r.charged + EXCLUDED.charged,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,
        timed = r.timed + EXCLUDED.timed";

/// What a reader reads: the rollups and, as rollups of one call each, the events after
/// `rolled_seq` (`$3`), with the columns [`select`] needs.
const ROLLUPS_AND_TAIL: &str = "(SELECT account, cycle_start_us, pool, hour_us, model, source, key_id, labels, calls,
        input_tokens, cache_creation_5m_input_tokens, cache_creation_1h_input_tokens, cache_read_input_tokens,
        output_tokens, web_search_requests, cost, charged, latency_ms_sum, timed
     FROM rollups
     UNION ALL
     SELECT account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
        COALESCE(key_id, ''), labels, 1, input_tokens, cache_creation_5m_input_tokens,
        cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
        grant_part + overage_part, COALESCE(latency_ms, 0), CAST(latency_ms IS NOT NULL AS INTEGER)
     FROM events WHERE seq > $3) AS rollups";

/// What one step of rolling up did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Another process is rolling up.
    Skipped,
    /// A transaction that may still insert events up to the bound is running.
    Waiting,
    /// The mark moved to the last bound (or stayed, with nothing new) and the next bound is set.
    Moved,
}

/// One step of rolling up: moves `rolled_seq` to the bound read at the step before, when every
/// transaction that could hold a seq up to it is over, and reads the next bound.
pub async fn roll_up(pool: &Pool) -> StoreResult<Step> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let result: Result<Step> = async {
        let tx = client.transaction().await?;
        let locked: bool = query_one(&tx, "SELECT pg_try_advisory_xact_lock($1)", &[&ROLLUP_LOCK]).await?.try_get(0)?;
        if !locked {
            return Ok(Step::Skipped);
        }
        // In this order, each its own statement: the bound, then whether the last step's
        // transaction and every older one are over, then this transaction's id (it has none
        // before: neither the lock nor reading a sequence gives one). A last step's id at or
        // above every id this server has finished comes from another server (a restored dump):
        // no transaction here can hold its seqs.
        let bound: i64 = query_one(&tx, LAST_SEQ, &[]).await?.try_get(0)?;
        let progress = query_one(
            &tx,
            "SELECT rolled_seq, pending_seq,
                 pg_snapshot_xmin(pg_current_snapshot()) >= pending_xid
                 OR pending_xid >= pg_snapshot_xmax(pg_current_snapshot())
             FROM rollup_progress",
            &[],
        )
        .await?;
        let (rolled, pending, over): (i64, i64, bool) =
            (progress.try_get(0)?, progress.try_get(1)?, progress.try_get(2)?);
        if !over {
            return Ok(Step::Waiting);
        }
        let xid: String = query_one(&tx, "SELECT pg_current_xact_id()::text", &[]).await?.try_get(0)?;
        if pending > rolled {
            tx.execute(ROLL, &[&rolled, &pending]).await?;
        }
        tx.execute(
            "UPDATE rollup_progress SET rolled_seq = $1::int8, pending_seq = GREATEST($2::int8, $1::int8),
                 pending_xid = $3::text::xid8",
            &[&pending, &bound, &xid],
        )
        .await?;
        tx.commit().await?;
        Ok(Step::Moved)
    }
    .await;
    result.map_err(StoreError::from)
}

/// Steps in a row that waited before the roller says so in the log (a minute), and again each
/// as many steps after.
const WAITING_WARN_STEPS: u32 = 120;

/// A store's background task that rolls events up every [`ROLL_EVERY`]; it stops when dropped.
pub struct Roller {
    _stop: oneshot::Sender<()>,
}

impl Roller {
    pub fn start(pool: Pool) -> Roller {
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ROLL_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut waiting = 0u32;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = every.tick() => match roll_up(&pool).await {
                        Ok(Step::Waiting) => {
                            waiting += 1;
                            if waiting.is_multiple_of(WAITING_WARN_STEPS) {
                                tracing::warn!(
                                    seconds = (ROLL_EVERY * waiting).as_secs(),
                                    "usage rollups are waiting for a long transaction on the PostgreSQL server; \
                                     reports stay exact but read more events until it ends"
                                );
                            }
                        }
                        Ok(_) => waiting = 0,
                        Err(e) => tracing::warn!(error = %e, "rolling up usage failed; the next step tries again"),
                    },
                }
            }
        });
        Roller { _stop: stop }
    }
}

/// The rollups of account `$1` and cycle `$2` summed over the dimensions `dims` leaves out (they
/// come back as the cycle's start, `''` or `{}`). Columns: pool, hour_us, model, source, key_id,
/// labels, then the sums in `Rollup`'s order.
fn select(dims: Dims) -> String {
    let keep = |on: bool, column: &'static str, blank: &'static str| if on { column } else { blank };
    let sums = [
        "calls",
        "input_tokens",
        "cache_creation_5m_input_tokens",
        "cache_creation_1h_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
        "web_search_requests",
        "cost",
        "charged",
        "latency_ms_sum",
        "timed",
    ]
    .map(|c| format!("CAST(SUM({c}) AS BIGINT)"))
    .join(", ");
    format!(
        "SELECT pool, {}, {}, {}, {}, {}, {sums}
         FROM {ROLLUPS_AND_TAIL} WHERE account = $1 AND cycle_start_us = $2 GROUP BY 1, 2, 3, 4, 5, 6",
        keep(dims.hour, "hour_us", "CAST($2 AS BIGINT)"),
        keep(dims.model, "model", "''"),
        keep(dims.source, "source", "''"),
        keep(dims.key, "key_id", "''"),
        keep(dims.labels, "labels", "'{}'"),
    )
}

#[async_trait]
impl ReportStore for PgStore {
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>, dims: Dims) -> StoreResult<Vec<Rollup>> {
        read_tx!(self, |tx| {
            async {
                // Read first, in the same snapshot: with it as a parameter the plan reads the
                // events after it by their seq (a short range), not the account's events.
                let rolled: i64 = query_one(&tx, "SELECT rolled_seq FROM rollup_progress", &[]).await?.try_get(0)?;
                let sql = select(dims);
                let found = query(&tx, &sql, &[&account, &us(cycle_start), &rolled]).await?;
                found
                    .iter()
                    .map(|r| Ok(tollgate_store::rows::rollup(&crate::rows::Cols(r))?))
                    .collect::<Result<Vec<_>>>()
            }
            .await
        })
    }
}
