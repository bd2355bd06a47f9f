//! Alert rules, the alert history and the delivery outbox (SPEC section 6): what every backend
//! keeps so that an alert fires once per rule, pool and cycle, is never lost on a restart, and
//! with several processes is delivered by one of them at a time.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::{Nanos, PoolKind};

use crate::StoreResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertKind {
    Threshold,
    OverageStarted,
    CapHit,
    Spike,
    Forecast,
    /// Calls of the pool were charged above their holds in the cycle: the upstream reported
    /// more than the worst case that was held.
    Overshoot,
}

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::Threshold,
        AlertKind::OverageStarted,
        AlertKind::CapHit,
        AlertKind::Spike,
        AlertKind::Forecast,
        AlertKind::Overshoot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Threshold => "threshold",
            AlertKind::OverageStarted => "overage_started",
            AlertKind::CapHit => "cap_hit",
            AlertKind::Spike => "spike",
            AlertKind::Forecast => "forecast",
            AlertKind::Overshoot => "overshoot",
        }
    }

    pub fn parse(s: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A rule: which accounts and pools it watches, what fires it, where its alerts go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRule {
    pub id: String,
    pub kind: AlertKind,
    /// None: every account.
    pub account: Option<String>,
    /// None: both pools.
    pub pool: Option<PoolKind>,
    /// Threshold: the percentages of the limit (1–100).
    pub percents: Vec<u8>,
    /// Spike: the window, in seconds.
    pub window_s: Option<u64>,
    /// Spike: k, in millionths of the trailing baseline.
    pub factor_ppm: Option<u64>,
    /// Spike: the absolute floor the window's spend must pass.
    pub floor: Option<Nanos>,
    /// Forecast: fire when the pool runs out more than this many days before the reset.
    pub days: Option<u32>,
    /// Channel names; empty: the log.
    pub channels: Vec<String>,
    /// Rules from tollgate.toml are replaced at each start; the API cannot change them.
    pub from_config: bool,
}

impl AlertRule {
    pub fn watches(&self, account: &str, pool: PoolKind) -> bool {
        self.account.as_deref().is_none_or(|a| a == account) && self.pool.is_none_or(|p| p == pool)
    }
}

/// An alert to record. `dedupe` tells apart alerts of one rule, pool and cycle that may each
/// fire once (a threshold's percent, a spike episode's start); empty when there is only one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAlert {
    pub rule_id: String,
    pub kind: AlertKind,
    pub account: String,
    pub pool: PoolKind,
    pub cycle_start: DateTime<Utc>,
    pub cycle_end: DateTime<Utc>,
    pub dedupe: String,
    pub percent: Option<u8>,
    /// The pool's charged total when the alert fired.
    pub used: Nanos,
    pub limit: Option<Nanos>,
    pub message: String,
    pub fired_at: DateTime<Utc>,
    /// Where to deliver it.
    pub channels: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// `alr_` + 20 hex digits derived from (rule, account, pool, cycle, dedupe): the same
    /// alert has the same id in every process, which receivers use to de-duplicate.
    pub id: String,
    pub rule_id: String,
    pub kind: AlertKind,
    pub account: String,
    pub pool: PoolKind,
    pub cycle_start: DateTime<Utc>,
    pub cycle_end: DateTime<Utc>,
    pub percent: Option<u8>,
    pub used: Nanos,
    pub limit: Option<Nanos>,
    pub message: String,
    pub fired_at: DateTime<Utc>,
}

impl NewAlert {
    /// Its id: the same alert has the same id in every process ([`alert_id`]).
    pub fn id(&self) -> String {
        alert_id(&self.rule_id, &self.account, self.pool, self.cycle_start, &self.dedupe)
    }

    /// The alert as stored once fired under `id`.
    pub fn fired(self, id: String) -> Alert {
        Alert {
            id,
            rule_id: self.rule_id,
            kind: self.kind,
            account: self.account,
            pool: self.pool,
            cycle_start: self.cycle_start,
            cycle_end: self.cycle_end,
            percent: self.percent,
            used: self.used,
            limit: self.limit,
            message: self.message,
            fired_at: self.fired_at,
        }
    }
}

/// The id of an alert: a digest of what makes it unique.
pub fn alert_id(rule_id: &str, account: &str, pool: PoolKind, cycle_start: DateTime<Utc>, dedupe: &str) -> String {
    use sha2::{Digest, Sha256};
    let key =
        format!("{rule_id}\u{0}{account}\u{0}{}\u{0}{}\u{0}{dedupe}", pool.as_str(), cycle_start.timestamp_micros());
    format!("alr_{}", &hex::encode(Sha256::digest(key.as_bytes()))[..20])
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertQuery {
    pub account: Option<String>,
    pub pool: Option<PoolKind>,
    pub kind: Option<AlertKind>,
    pub since: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// One delivery of one alert to one channel, leased to the caller that claimed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub id: i64,
    pub alert: Alert,
    pub channel: String,
    /// Deliveries tried before this one.
    pub attempts: u32,
}

#[async_trait]
pub trait AlertStore: Send + Sync {
    /// Creates or replaces a rule.
    async fn put_alert_rule(&self, rule: AlertRule) -> StoreResult<AlertRule>;
    async fn alert_rules(&self) -> StoreResult<Vec<AlertRule>>;
    /// Deletes a rule; its alerts stay in the history.
    async fn delete_alert_rule(&self, id: &str) -> StoreResult<()>;
    /// Replaces every rule that came from the configuration by `rules`, atomically.
    async fn replace_config_alert_rules(&self, rules: Vec<AlertRule>) -> StoreResult<()>;

    /// Records an alert and queues one delivery per channel, atomically — once: an alert with
    /// the same rule, account, pool, cycle and `dedupe` is not recorded again (None).
    async fn fire_alert(&self, alert: NewAlert) -> StoreResult<Option<Alert>>;
    /// The history, newest first.
    async fn alerts(&self, query: AlertQuery) -> StoreResult<Vec<Alert>>;

    /// Leases up to `limit` deliveries due at `now` for `lease_s` seconds. A delivery is leased
    /// to one caller at a time, whichever process it runs in; a lease that runs out (its holder
    /// died) makes the delivery due again.
    async fn claim_deliveries(&self, now: DateTime<Utc>, lease_s: u64, limit: usize) -> StoreResult<Vec<Outbound>>;
    /// The delivery succeeded.
    async fn delivery_done(&self, id: i64, now: DateTime<Utc>) -> StoreResult<()>;
    /// The delivery failed: try again at `retry_at`, or never (None), keeping `error`.
    async fn delivery_failed(&self, id: i64, retry_at: Option<DateTime<Utc>>, error: &str) -> StoreResult<()>;
}
