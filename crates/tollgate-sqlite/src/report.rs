//! The hourly rollups on SQLite, kept by the writer with each batch (see `writer::Db`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_store::StoreResult;
use tollgate_store::report::{Dims, ReportStore, Rollup};

use crate::SqliteStore;
use crate::rows::{self, backend, us};

/// The rollups of account `?1` and cycle `?2`, one row per stored rollup, the dimensions `dims`
/// leaves out blank (the cycle's start, `''` or `{}`) for [`Dims::sum`] to add up. Columns: pool,
/// hour_us, model, source, key_id, labels, then the sums in `Rollup`'s order.
fn select(dims: Dims) -> String {
    let keep = |on: bool, column: &'static str, blank: &'static str| if on { column } else { blank };
    format!(
        "SELECT pool, {}, {}, {}, {}, {}, calls, input_tokens, cache_creation_5m_input_tokens,
            cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests,
            cost, charged, latency_ms_sum, timed
         FROM rollups WHERE account = ?1 AND cycle_start_us = ?2",
        keep(dims.hour, "hour_us", "?2"),
        keep(dims.model, "model", "''"),
        keep(dims.source, "source", "''"),
        keep(dims.key, "key_id", "''"),
        keep(dims.labels, "labels", "'{}'"),
    )
}

#[async_trait]
impl ReportStore for SqliteStore {
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>, dims: Dims) -> StoreResult<Vec<Rollup>> {
        let account = account.to_string();
        self.read(move |conn| {
            // SQLite groups by sorting; summing in a hash table here is faster.
            let mut s = conn.prepare_cached(&select(dims)).map_err(backend)?;
            s.query_map(rusqlite::params![account, us(cycle_start)], rows::rollup)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Rollup>>>())
                .map(Dims::sum)
                .map_err(backend)
        })
        .await
    }
}
