//! Prometheus metrics of the gateway and the pools (`GET /metrics`, OpenMetrics text).
//!
//! Label values come from tollgate's own vocabulary (pools, outcomes, refusal codes, token
//! types), from the price table (canonical model ids: only priced models get this far) and from
//! admin-created account ids — never from free text a caller sends. Money is counted in whole
//! nano-USD, so the counters are exact.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tollgate_core::{PoolKind, Usage};
use tollgate_store::{Store, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub pool: &'static str,
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub pool: &'static str,
    pub model: String,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub pool: &'static str,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub pool: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// `taken` (held in the store) or `voided` (its unused rest given back).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// Why tollgate closed a client connection: `evicted` (at the limit, to make room),
    /// `refused` (at the limit, every connection busy), `header_timeout`, `body_timeout`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub account: String,
    pub pool: &'static str,
}

type Histograms = Family<KindLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to ~27 minutes, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 25))
}

/// The gateway's counters; cheap to update from any task.
#[derive(Clone)]
pub struct Metrics {
    pub calls: Family<CallLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub spend_nano_usd: Family<ModelLabels, Counter>,
    pub overshoot_nano_usd: Family<ModelLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub holds_open: Gauge,
    pub leases: Family<LeaseLabels, Counter>,
    pub upstream_latency: Histograms,
    pub overhead: Histograms,
    pub alert_deliveries: Family<DeliveryLabels, Counter>,
    pub connections_open: Gauge,
    pub connections_closed: Family<ConnectionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub channel: String,
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: Family::default(),
            tokens: Family::default(),
            spend_nano_usd: Family::default(),
            overshoot_nano_usd: Family::default(),
            refusals: Family::default(),
            holds_open: Gauge::default(),
            leases: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            overhead: Family::new_with_constructor(latency_histogram),
            alert_deliveries: Family::default(),
            connections_open: Gauge::default(),
            connections_closed: Family::default(),
        }
    }
}

impl Metrics {
    /// How many leases this process took (`taken`) or gave back (`voided`).
    pub fn lease_count(&self, outcome: &'static str) -> u64 {
        self.leases.get_or_create(&LeaseLabels { outcome }).get()
    }

    /// Counts a client connection tollgate closed for `reason` (see [`ConnectionLabels`]).
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&ConnectionLabels { reason }).inc();
    }

    /// Counts one alert delivery to the channel named `channel` (a configured name).
    pub fn alert_delivery(&self, channel: &str, delivered: bool) {
        let outcome = if delivered { "delivered" } else { "failed" };
        self.alert_deliveries.get_or_create(&DeliveryLabels { channel: channel.to_string(), outcome }).inc();
    }

    pub fn usage(&self, pool: PoolKind, model: &str, usage: &Usage) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("cache_creation_5m", usage.cache_creation_5m_input_tokens),
            ("cache_creation_1h", usage.cache_creation_1h_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("output", usage.output_tokens),
        ] {
            if n > 0 {
                let labels = TokenLabels { pool: pool.as_str(), model: model.to_string(), r#type: kind };
                self.tokens.get_or_create(&labels).inc_by(n);
            }
        }
    }

    /// The OpenMetrics text of every metric, with the pools' gauges read from the store now.
    pub async fn render(&self, store: &dyn Store, now: chrono::DateTime<chrono::Utc>) -> Result<String, StoreError> {
        let mut registry = Registry::with_prefix("tollgate");
        registry.register("gateway_calls", "Gateway calls by pool, model and how they ended", self.calls.clone());
        registry.register("gateway_tokens", "Tokens billed through the gateway, by type", self.tokens.clone());
        registry.register(
            "gateway_spend_nano_usd",
            "What gateway calls were charged (grant and overage), in nano-USD",
            self.spend_nano_usd.clone(),
        );
        registry.register(
            "gateway_overshoot_nano_usd",
            "Charges above their hold (should stay 0), in nano-USD",
            self.overshoot_nano_usd.clone(),
        );
        registry.register("gateway_refusals", "Calls refused for credit, by pool and reason", self.refusals.clone());
        registry.register("gateway_holds_open", "Holds of calls in flight in this process", self.holds_open.clone());
        registry.register("gateway_leases", "Leases taken and voided by this process", self.leases.clone());
        registry.register(
            "gateway_upstream_latency_seconds",
            "Time from forwarding a call to the upstream's response headers",
            self.upstream_latency.clone(),
        );
        registry.register(
            "gateway_overhead_seconds",
            "Time tollgate spends before forwarding a call (auth, pricing, the hold)",
            self.overhead.clone(),
        );
        registry.register(
            "alert_deliveries",
            "Alert deliveries by channel and outcome (delivered, failed)",
            self.alert_deliveries.clone(),
        );
        registry.register("connections_open", "Client connections open", self.connections_open.clone());
        registry.register(
            "connections_closed",
            "Client connections tollgate closed, by reason (evicted, refused, header_timeout, body_timeout)",
            self.connections_closed.clone(),
        );
        let remaining = Family::<PoolLabels, Gauge>::default();
        let charged = Family::<PoolLabels, Gauge>::default();
        let held = Family::<PoolLabels, Gauge>::default();
        let used_ratio = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        for account in store.accounts().await? {
            let balance = store.balance(&account.id, now).await?;
            for p in balance.pools {
                let labels = PoolLabels { account: account.id.clone(), pool: p.pool.as_str() };
                let spent = p.used.saturating_add(p.overage);
                charged.get_or_create(&labels).set(spent.0);
                held.get_or_create(&labels).set(p.held.0);
                if let Some(limit) = p.limit {
                    remaining.get_or_create(&labels).set(limit.0.saturating_sub(spent.0).saturating_sub(p.held.0));
                    if limit.0 > 0 {
                        // A ratio for dashboards, not an amount: the amounts above stay integers.
                        used_ratio.get_or_create(&labels).set(spent.0 as f64 / limit.0 as f64);
                    }
                }
            }
        }
        registry.register("pool_charged_nano_usd", "Charged this cycle (grant use + overage), in nano-USD", charged);
        registry.register("pool_held_nano_usd", "Held by open holds, in nano-USD", held);
        registry.register("pool_remaining_nano_usd", "Limit − charged − held, in nano-USD (limited pools)", remaining);
        registry.register("pool_used_ratio", "Charged / limit this cycle (limited pools)", used_ratio);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .map_err(|e| StoreError::Backend(format!("encoding the metrics: {e}")))?;
        Ok(out)
    }
}
