//! Usage rolled up per hour (SPEC section 7): what reports, forecasts and advice read, so that
//! they stay fast however many events a cycle has.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::{Nanos, PoolKind, Usage};

use crate::StoreResult;

/// The usage of one hour of one pool, for one (model, source, key, labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollup {
    pub pool: PoolKind,
    pub hour: DateTime<Utc>,
    pub model: String,
    /// Empty when the events had none.
    pub source: String,
    pub key: String,
    /// The events' labels, as JSON text (`{}` when none).
    pub labels: String,
    pub calls: u64,
    pub usage: Usage,
    /// List-price cost.
    pub cost: Nanos,
    /// What the ledger charged (grant part + overage part).
    pub charged: Nanos,
    /// Σ latency (ms) over `timed` calls, for mean latency per model.
    pub latency_ms_sum: u64,
    pub timed: u64,
}

#[async_trait]
pub trait ReportStore: Send + Sync {
    /// The rollups of an account's cycle (the one starting at `cycle_start`), in no order.
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>) -> StoreResult<Vec<Rollup>>;
}
