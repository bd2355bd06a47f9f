//! The hourly rollups on PostgreSQL, kept by a statement-level trigger on `events` (migration 4
//! in `schema`), so every way an event is inserted adds to them in the same transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::IsolationLevel;
use tollgate_core::{Nanos, Usage};
use tollgate_store::report::{Dims, ReportStore, Rollup};
use tollgate_store::{StoreError, StoreResult};

use crate::rows::{pool_of, query, time, us};
use crate::{PgStore, Result};

#[async_trait]
impl ReportStore for PgStore {
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>, dims: Dims) -> StoreResult<Vec<Rollup>> {
        read_tx!(self, |tx| {
            async {
                let found = query(&tx, &dims.select_sql("$1", "$2", true), &[&account, &us(cycle_start)]).await?;
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
