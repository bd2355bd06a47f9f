//! Hourly usage on PostgreSQL, grouped from the events of the cycle at read time (an index on
//! (account, pool, cycle start) bounds the scan to the cycle). Kept rollup rows like SQLite's
//! are the next step for very large cycles.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::IsolationLevel;
use tollgate_core::{Nanos, Usage};
use tollgate_store::report::{ReportStore, Rollup};
use tollgate_store::{StoreError, StoreResult};

use crate::rows::{pool_of, query, time, us};
use crate::{PgStore, Result};

#[async_trait]
impl ReportStore for PgStore {
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>) -> StoreResult<Vec<Rollup>> {
        read_tx!(self, |tx| {
            async {
            let found = query(
                &tx,
                "SELECT pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''), COALESCE(key_id, ''), labels,
                        COUNT(*)::BIGINT, SUM(input_tokens)::BIGINT, SUM(cache_creation_5m_input_tokens)::BIGINT,
                        SUM(cache_creation_1h_input_tokens)::BIGINT, SUM(cache_read_input_tokens)::BIGINT,
                        SUM(output_tokens)::BIGINT, SUM(web_search_requests)::BIGINT, SUM(cost)::BIGINT,
                        SUM(grant_part + overage_part)::BIGINT, COALESCE(SUM(latency_ms), 0)::BIGINT,
                        COUNT(latency_ms)::BIGINT
                 FROM events WHERE account = $1 AND cycle_start_us = $2
                 GROUP BY 1, 2, 3, 4, 5, 6",
                &[&account, &us(cycle_start)],
            )
            .await?;
            found
                .iter()
                .map(|r| {
                    let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
                    Ok(Rollup {
                        pool: pool_of(r.get(0))?,
                        hour: time(r.get(1)),
                        model: r.get(2),
                        source: r.get(3),
                        key: r.get(4),
                        labels: r.get(5),
                        calls: n(6),
                        usage: Usage {
                            input_tokens: n(7),
                            cache_creation_5m_input_tokens: n(8),
                            cache_creation_1h_input_tokens: n(9),
                            cache_read_input_tokens: n(10),
                            output_tokens: n(11),
                            web_search_requests: n(12),
                        },
                        cost: Nanos(r.get(13)),
                        charged: Nanos(r.get(14)),
                        latency_ms_sum: n(15),
                        timed: n(16),
                    })
                })
                .collect::<Result<Vec<_>>>()
        }
        .await
        })
    }
}
