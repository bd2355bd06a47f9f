//! Usage rolled up per hour (SPEC section 7): what reports, forecasts and advice read, so that
//! they stay fast however many events a cycle has.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

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

/// The dimensions of a rollup a reader needs. The store sums the others away, so a report by
/// model reads one row per (pool, model) however many hours, sources, keys and labels there are;
/// a dimension left out comes back as the cycle's start (`hour`), an empty string, or `{}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dims {
    pub hour: bool,
    pub model: bool,
    pub source: bool,
    pub key: bool,
    pub labels: bool,
}

impl Dims {
    /// Every dimension: the rollups as stored.
    pub const ALL: Dims = Dims { hour: true, model: true, source: true, key: true, labels: true };
    /// None: one row per pool.
    pub const NONE: Dims = Dims { hour: false, model: false, source: false, key: false, labels: false };
}

impl Dims {
    /// Sums rollups whose dimensions were blanked (read without grouping) into one per
    /// distinct key, in a hash table.
    pub fn sum(rows: impl IntoIterator<Item = Rollup>) -> Vec<Rollup> {
        type Key = (PoolKind, DateTime<Utc>, String, String, String, String);
        let mut sums: HashMap<Key, Rollup> = HashMap::new();
        for mut r in rows {
            // The key's strings move out of the row (no copies); the stored row gets them back.
            let take = |s: &mut String| std::mem::take(s);
            let key = (r.pool, r.hour, take(&mut r.model), take(&mut r.source), take(&mut r.key), take(&mut r.labels));
            match sums.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(r);
                }
                Entry::Occupied(mut o) => {
                    let s = o.get_mut();
                    s.calls += r.calls;
                    s.usage.add(&r.usage);
                    s.cost = s.cost.saturating_add(r.cost);
                    s.charged = s.charged.saturating_add(r.charged);
                    s.latency_ms_sum += r.latency_ms_sum;
                    s.timed += r.timed;
                }
            }
        }
        sums.into_iter()
            .map(|((_, _, model, source, key, labels), r)| Rollup { model, source, key, labels, ..r })
            .collect()
    }
}

#[async_trait]
pub trait ReportStore: Send + Sync {
    /// The rollups of an account's cycle (the one starting at `cycle_start`), summed over the
    /// dimensions `dims` leaves out, in no order.
    async fn rollups(&self, account: &str, cycle_start: DateTime<Utc>, dims: Dims) -> StoreResult<Vec<Rollup>>;
}
