//! The alert engine: turns ledger activity into alerts (once each, through the store), and
//! delivers the store's outbox to the channels.
//!
//! - `threshold`, `overage_started` and `cap_hit` are checked once a second for every pool that
//!   had activity (the live feed's tallies), from the pool's balance. The store records each
//!   alert once per rule, pool and cycle, so every process may check and several thresholds
//!   crossed by one call each fire.
//! - `threshold` and `overage_started` are also checked by a [`scan`](Alerter::scan) of every
//!   account's balance, at start and then every minute: a crossing written just before a crash,
//!   while no server ran, or by another process on the same PostgreSQL store is found without
//!   any further activity on its pool. `cap_hit` follows a refusal, which is no ledger write; a
//!   pool whose limit is reached is found durably by the 100 % threshold.
//! - `overshoot` is checked by the same scan, from the events of each account's current cycle:
//!   the scan reads them once, then only the events recorded since (a cursor on their `seq`).
//!   A pool that no `overshoot` rule watches is covered by the built-in rule
//!   [`OVERSHOOT_DEFAULT_RULE`], to the log: a charge above its hold is never silent.
//! - `spike` compares the last window's spend with the trailing windows (six of them), from the
//!   per-second spend this process saw; it fires when a spike starts and re-arms when it ends.
//!   With several processes each watches its own calls (a limit of this design, documented).
//! - `forecast` projects the cycle-to-date burn rate, once a minute, when the projection is
//!   confident (core::plan).
//! - Deliveries run concurrently, [`DELIVERIES_IN_FLIGHT_MAX`] at most, each bounded by
//!   [`deliver::DELIVERY_TIMEOUT`] in all, so a receiver that stalls holds one of them and
//!   delays no other.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use tokio::task::JoinSet;
use tollgate_core::alert::{self, Spike, SpikeState, THRESHOLD_PERCENTS_DEFAULT};
use tollgate_core::plan::{ForecastInput, forecast};
use tollgate_core::{Nanos, PoolKind};
use tollgate_gateway::metrics::Metrics;
use tollgate_gateway::upstream::HttpClient;
use tollgate_store::alerts::{Alert, AlertKind, AlertRule, NewAlert, Outbound, alert_id};
use tollgate_store::feed::Tally;
use tollgate_store::{Balance, EventQuery, PoolBalance, Store, StoreResult};

use super::deliver::{self, Channel, Delivery};
use crate::{Clock, dto};

/// The channel every alert without channels goes to.
pub const LOG_CHANNEL: &str = "log";
/// The rule that raises overshoot on a pool no `overshoot` rule watches, to the log channel.
pub const OVERSHOOT_DEFAULT_RULE: &str = "overshoot-default";
/// Events read per page when the scan looks for overshoot (the store's largest page).
const OVERSHOOT_PAGE_EVENTS: usize = 10_000;
/// Pages of one account's events read by one scan at most; a cycle with more events is read on
/// over the next scans.
const OVERSHOOT_PAGES_PER_SCAN_MAX: usize = 100;
/// Trailing windows a spike is compared with.
const SPIKE_TRAILING_WINDOWS: usize = 6;
/// Deliveries a failing channel is retried for, with backoff capped at 10 minutes: about a day.
const DELIVERY_ATTEMPTS_MAX: u32 = 150;
/// Deliveries one process makes at once. Each is bounded by `deliver::DELIVERY_TIMEOUT`, so
/// receivers that stall hold at most this many, and only for that long.
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 16;
/// How long a claimed delivery is leased to this process: well past the delivery's bound and
/// the store write that records its outcome.
const DELIVERY_LEASE_S: u64 = 60;
/// How often the outbox is read for due deliveries when none just finished.
const DELIVERY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A pool's spend per second, oldest first: (unix second, nano-USD).
type SpendHistory = VecDeque<(i64, i64)>;

pub struct Alerter {
    store: Arc<dyn Store>,
    client: HttpClient,
    channels: HashMap<String, Channel>,
    /// Spend per second of each pool, newest last: (second, nano-USD).
    spend: Mutex<HashMap<(String, PoolKind), SpendHistory>>,
    spikes: Mutex<HashMap<(String, String, PoolKind), SpikeState>>,
    metrics: Metrics,
    /// Where fired alerts are shown live (`GET /api/v1/stream`).
    feed: Option<Arc<tollgate_store::feed::Feed>>,
    /// Ids of alerts the store is known to hold (fired by this process or found already
    /// recorded), with the end of their cycle: checking them again writes nothing. Only a
    /// cache, emptied of ended cycles by each scan: the store decides.
    recorded: Mutex<HashMap<String, DateTime<Utc>>>,
    /// What the scan has read of each account's events in its current cycle. Only a cache of
    /// reads, rebuilt from the store at start: the events decide.
    overshoot: Mutex<HashMap<String, OvershootTally>>,
}

/// The overshoot of one account's events in one cycle, as far as the scan has read them.
#[derive(Clone, Debug, Default)]
struct OvershootTally {
    cycle_start: Option<DateTime<Utc>>,
    /// The `seq` of the last event read: the next read starts after it.
    after_seq: Option<i64>,
    /// Per pool (interactive, programmatic): the total charged above holds, and the events.
    pools: [(Nanos, u64); 2],
}

impl Alerter {
    pub fn new(
        store: Arc<dyn Store>,
        client: HttpClient,
        mut channels: HashMap<String, Channel>,
        metrics: Metrics,
    ) -> Alerter {
        channels.entry(LOG_CHANNEL.to_string()).or_insert(Channel::Log);
        Alerter {
            store,
            client,
            channels,
            spend: Mutex::default(),
            spikes: Mutex::default(),
            metrics,
            feed: None,
            recorded: Mutex::default(),
            overshoot: Mutex::default(),
        }
    }

    /// Shows fired alerts on the live stream too.
    pub fn with_feed(mut self, feed: Arc<tollgate_store::feed::Feed>) -> Alerter {
        self.feed = Some(feed);
        self
    }

    pub fn channel_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.channels.keys().cloned().collect();
        names.sort();
        names
    }

    /// Checks the rules that follow a pool's balance, for pools that just had activity.
    pub async fn after_activity(
        &self,
        now: DateTime<Utc>,
        active: &[((String, PoolKind), Tally)],
        balances: &BTreeMap<String, Balance>,
    ) -> StoreResult<Vec<Alert>> {
        let rules = self.store.alert_rules().await?;
        let mut fired = Vec::new();
        for ((account, pool), tally) in active {
            self.observe(now, account, *pool, tally.charged);
            let Some(balance) = balances.get(account) else { continue };
            let Some(p) = balance.pools.iter().find(|p| p.pool == *pool) else { continue };
            for rule in rules.iter().filter(|r| r.watches(account, *pool)) {
                for candidate in candidates(rule, balance, p, tally.refused > 0) {
                    if let Some(a) = self.fire_for(rule, balance, p, candidate, now).await? {
                        fired.push(a);
                    }
                }
            }
        }
        Ok(fired)
    }

    /// Checks the rules that follow a pool's balance and need no refusal (`threshold`,
    /// `overage_started`) and the `overshoot` rules (with the built-in one) against every
    /// account's pools in the cycle containing `now`, whatever activity this process saw: run at
    /// start and then periodically, it finds a crossing or an overshoot written before a crash,
    /// while no server ran, or by another process sharing the store. Each alert is recorded once
    /// by the store, so scanning again fires nothing twice.
    #[allow(clippy::expect_used, reason = "never poisoned: both caches are locked only for get, insert and retain")]
    pub async fn scan(&self, now: DateTime<Utc>) -> StoreResult<Vec<Alert>> {
        let rules = self.store.alert_rules().await?;
        let (overshoot_rules, rules): (Vec<AlertRule>, Vec<AlertRule>) = rules
            .into_iter()
            .filter(|r| matches!(r.kind, AlertKind::Threshold | AlertKind::OverageStarted | AlertKind::Overshoot))
            .partition(|r| r.kind == AlertKind::Overshoot);
        self.recorded.lock().expect("recorded alerts").retain(|_, cycle_end| *cycle_end > now);
        let mut fired = Vec::new();
        let accounts = self.store.accounts().await?;
        {
            let known: std::collections::HashSet<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
            self.overshoot.lock().expect("overshoot tallies").retain(|account, _| known.contains(account.as_str()));
        }
        for account in accounts {
            let mut balance = None;
            if rules.iter().any(|r| r.account.as_deref().is_none_or(|a| a == account.id)) {
                let b = self.store.balance(&account.id, now).await?;
                for p in &b.pools {
                    for rule in rules.iter().filter(|r| r.watches(&account.id, p.pool)) {
                        for candidate in candidates(rule, &b, p, false) {
                            if let Some(a) = self.fire_for(rule, &b, p, candidate, now).await? {
                                fired.push(a);
                            }
                        }
                    }
                }
                balance = Some(b);
            }
            let cycle = account.cycle_anchor().cycle_at(now);
            let tally = self.overshoot_of(&account.id, cycle.start).await?;
            for pool in PoolKind::ALL {
                let (total, events) = tally.pools[pool as usize];
                if events == 0 {
                    continue;
                }
                let b = match balance.take() {
                    Some(b) => b,
                    None => self.store.balance(&account.id, now).await?,
                };
                let p = b.pool(pool).clone();
                let watching: Vec<AlertRule> =
                    overshoot_rules.iter().filter(|r| r.watches(&account.id, pool)).cloned().collect();
                let watching = if watching.is_empty() { vec![overshoot_default_rule()] } else { watching };
                for rule in &watching {
                    let candidate = overshoot_candidate(&b, &p, total, events);
                    if let Some(a) = self.fire_for(rule, &b, &p, candidate, now).await? {
                        fired.push(a);
                    }
                }
                balance = Some(b);
            }
        }
        Ok(fired)
    }

    /// The overshoot of an account's events in the cycle starting at `cycle_start`: what this
    /// process read before, plus the events recorded since (in `seq` order, which on every
    /// backend is the order an account's events commit in, so none is skipped).
    #[allow(clippy::expect_used, reason = "never poisoned: the overshoot cache is locked only for get, insert, retain")]
    async fn overshoot_of(&self, account: &str, cycle_start: DateTime<Utc>) -> StoreResult<OvershootTally> {
        let known = self.overshoot.lock().expect("overshoot tallies").get(account).cloned();
        let mut tally = known.filter(|t| t.cycle_start == Some(cycle_start)).unwrap_or_default();
        tally.cycle_start = Some(cycle_start);
        for _ in 0..OVERSHOOT_PAGES_PER_SCAN_MAX {
            let query = EventQuery {
                account: account.to_string(),
                // A settled event is stamped at its settle, after its hold's cycle started: the
                // bound lets the store read by its (account, time) index. The cycle each event
                // is booked in decides below.
                since: Some(cycle_start),
                after_seq: tally.after_seq,
                limit: OVERSHOOT_PAGE_EVENTS,
                ..EventQuery::default()
            };
            let events = self.store.events(query).await?;
            for e in events.iter().filter(|e| e.cycle_start == cycle_start && e.overshoot.0 > 0) {
                let (total, count) = &mut tally.pools[e.pool as usize];
                *total = total.saturating_add(e.overshoot);
                *count += 1;
            }
            if let Some(last) = events.last() {
                tally.after_seq = Some(last.seq);
            }
            if events.len() < OVERSHOOT_PAGE_EVENTS {
                break;
            }
        }
        self.overshoot.lock().expect("overshoot tallies").insert(account.to_string(), tally.clone());
        Ok(tally)
    }

    /// Adds a pool's spend of the second ending at `now` to its history.
    fn observe(&self, now: DateTime<Utc>, account: &str, pool: PoolKind, charged: Nanos) {
        #[allow(clippy::expect_used, reason = "never poisoned: the spend history is locked only to push, pop and sum")]
        let mut spend = self.spend.lock().expect("spend history");
        let history = spend.entry((account.to_string(), pool)).or_default();
        history.push_back((now.timestamp(), charged.0));
        // Keep a day at most; spike windows beyond that are not useful.
        while history.front().is_some_and(|(s, _)| *s < now.timestamp() - 86_400) {
            history.pop_front();
        }
    }

    /// Checks the spike rules of every pool with history, at `now`.
    pub async fn check_spikes(&self, now: DateTime<Utc>) -> StoreResult<Vec<Alert>> {
        let rules: Vec<AlertRule> =
            self.store.alert_rules().await?.into_iter().filter(|r| r.kind == AlertKind::Spike).collect();
        #[allow(clippy::expect_used, reason = "never poisoned: the spend history is locked only to push, pop and sum")]
        let pools: Vec<(String, PoolKind)> = self.spend.lock().expect("spend history").keys().cloned().collect();
        let mut fired = Vec::new();
        for rule in &rules {
            let (Some(window_s), Some(factor_ppm)) = (rule.window_s, rule.factor_ppm) else { continue };
            let spike = Spike { factor_ppm, floor: rule.floor.unwrap_or(Nanos::ZERO).0 };
            for (account, pool) in pools.iter().filter(|(a, p)| rule.watches(a, *p)) {
                let windows = self.windows(now, account, *pool, window_s as i64);
                #[allow(clippy::expect_used, reason = "windows() always keeps the newest window (k = 0)")]
                let (last, trailing) = windows.split_last().expect("at least one window");
                let on = spike.is_on(*last, trailing);
                let key = (rule.id.clone(), account.clone(), *pool);
                let fire = {
                    #[allow(clippy::expect_used, reason = "never poisoned: locked only to step one spike state")]
                    let mut states = self.spikes.lock().expect("spike states");
                    let state = states.entry(key).or_default();
                    let (next, fire) = state.step(on);
                    *state = next;
                    fire
                };
                if !fire {
                    continue;
                }
                let Ok(balance) = self.store.balance(account, now).await else { continue };
                let Some(p) = balance.pools.iter().find(|p| p.pool == *pool) else { continue };
                let baseline = trailing.iter().sum::<i64>() / trailing.len().max(1) as i64;
                let message = format!(
                    "{account} {} spend spiked: ${} in the last {}, against ${} per window before",
                    pool.as_str(),
                    Nanos(*last),
                    human_duration(window_s),
                    Nanos(baseline)
                );
                // One alert per spike episode: the episode is named by the window it started in.
                let episode = now.timestamp() / window_s as i64;
                let candidate = Candidate { dedupe: episode.to_string(), percent: None, message };
                if let Some(a) = self.fire_for(rule, &balance, p, candidate, now).await? {
                    fired.push(a);
                }
            }
        }
        Ok(fired)
    }

    /// The spend of the last `SPIKE_TRAILING_WINDOWS + 1` windows of `window_s` ending at `now`,
    /// oldest first; windows before the pool's first activity are left out.
    fn windows(&self, now: DateTime<Utc>, account: &str, pool: PoolKind, window_s: i64) -> Vec<i64> {
        #[allow(
            clippy::expect_used,
            reason = "never poisoned: the spend history is locked only to push, pop and sum (the window arithmetic here could overflow only for a spike window_s over 10^18 s, and only with overflow checks on)"
        )]
        let spend = self.spend.lock().expect("spend history");
        let history = spend.get(&(account.to_string(), pool));
        let end = now.timestamp();
        let first_seen = history.and_then(|h| h.front()).map(|(s, _)| *s).unwrap_or(end);
        let mut out = Vec::new();
        for k in (0..=SPIKE_TRAILING_WINDOWS as i64).rev() {
            let (from, to) = (end - (k + 1) * window_s, end - k * window_s);
            if to <= first_seen && k > 0 {
                continue;
            }
            let sum =
                history.map(|h| h.iter().filter(|(s, _)| *s > from && *s <= to).map(|(_, v)| *v).sum()).unwrap_or(0);
            out.push(sum);
        }
        out
    }

    /// Checks the forecast rules of every account, at `now`.
    pub async fn check_forecasts(&self, now: DateTime<Utc>) -> StoreResult<Vec<Alert>> {
        let rules: Vec<AlertRule> =
            self.store.alert_rules().await?.into_iter().filter(|r| r.kind == AlertKind::Forecast).collect();
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let mut fired = Vec::new();
        for account in self.store.accounts().await? {
            let balance = self.store.balance(&account.id, now).await?;
            for p in &balance.pools {
                let scope = p.scope();
                let elapsed = now - balance.cycle.start;
                let input = ForecastInput {
                    now,
                    cycle: balance.cycle,
                    scope,
                    recent: scope.charged(),
                    recent_window: elapsed,
                    // The balance does not count calls: for alerts, a cycle a day old with some
                    // spend is enough to extrapolate (the day-old rule of `forecast` still holds).
                    calls: if scope.charged().0 > 0 { tollgate_core::plan::CALLS_FOR_CONFIDENCE } else { 0 },
                };
                let f = forecast(&input);
                if !f.confident {
                    continue;
                }
                for rule in rules.iter().filter(|r| r.watches(&account.id, p.pool)) {
                    let days = rule.days.unwrap_or(0);
                    if !alert::forecast_fires(f.exhaustion, balance.cycle.end, days) {
                        continue;
                    }
                    #[allow(clippy::expect_used, reason = "forecast_fires is true only for Some exhaustion")]
                    let at = f.exhaustion.expect("fires only with an exhaustion time");
                    let message = format!(
                        "{} {} pool runs out around {} at its current rate, {} days before its reset on {}",
                        account.id,
                        p.pool.as_str(),
                        dto::time(at),
                        (balance.cycle.end - at).num_days(),
                        dto::time(balance.cycle.end)
                    );
                    let candidate = Candidate { dedupe: String::new(), percent: None, message };
                    if let Some(a) = self.fire_for(rule, &balance, p, candidate, now).await? {
                        fired.push(a);
                    }
                }
            }
        }
        Ok(fired)
    }

    #[allow(clippy::expect_used, reason = "never poisoned: recorded ids are locked only for get, insert and retain")]
    async fn fire_for(
        &self,
        rule: &AlertRule,
        balance: &Balance,
        p: &PoolBalance,
        c: Candidate,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Alert>> {
        let id = alert_id(&rule.id, &balance.account, p.pool, balance.cycle.start, &c.dedupe);
        if self.recorded.lock().expect("recorded alerts").contains_key(&id) {
            return Ok(None);
        }
        let channels = if rule.channels.is_empty() { vec![LOG_CHANNEL.to_string()] } else { rule.channels.clone() };
        let alert = NewAlert {
            rule_id: rule.id.clone(),
            kind: rule.kind,
            account: balance.account.clone(),
            pool: p.pool,
            cycle_start: balance.cycle.start,
            cycle_end: balance.cycle.end,
            dedupe: c.dedupe,
            percent: c.percent,
            used: p.used.saturating_add(p.overage),
            limit: p.limit,
            message: c.message,
            fired_at: now,
            channels,
        };
        let fired = self.store.fire_alert(alert).await?;
        // Recorded now, or before (None): either way the store holds it.
        self.recorded.lock().expect("recorded alerts").insert(id, balance.cycle.end);
        if let Some(a) = &fired {
            tracing::info!(alert = %a.id, kind = a.kind.as_str(), account = %a.account, "alert fired: {}", a.message);
            if let Some(feed) = &self.feed {
                feed.publish(tollgate_store::feed::FeedItem::Alert(Box::new(a.clone())));
            }
        }
        Ok(fired)
    }

    /// Sends one delivery through a channel right away (`tollgate alerts test`), within the
    /// same bound as every delivery ([`deliver::DELIVERY_TIMEOUT`]).
    pub async fn send_now(&self, channel: &str, d: &Delivery) -> Result<(), deliver::Failed> {
        let c = self.channels.get(channel).ok_or_else(|| deliver::Failed {
            message: format!("unknown channel {channel:?}: known: {}", self.channel_names().join(", ")),
            retry: false,
        })?;
        deliver::send(&self.client, c, d).await
    }

    /// Delivers the outbox until the task running it is aborted (which aborts the deliveries in
    /// flight; their leases run out and they are delivered again). Every second, and whenever a
    /// delivery ends while more may be due, it claims as many due deliveries as there are free
    /// slots of [`DELIVERIES_IN_FLIGHT_MAX`] and runs each in a task of its own: a receiver that
    /// stalls holds one slot, for at most the delivery bound, and delays no other delivery.
    pub async fn run_deliveries(self: Arc<Self>, clock: Clock) {
        let mut in_flight: JoinSet<StoreResult<()>> = JoinSet::new();
        let mut tick = tokio::time::interval(DELIVERY_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the last claim filled every free slot: more may be due right away.
        let mut more_due = false;
        loop {
            let claim = tokio::select! {
                _ = tick.tick() => true,
                Some(ended) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match ended {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "an alert delivery's outcome could not be recorded"),
                        Err(e) => tracing::error!(error = %e, "an alert delivery task failed"),
                    }
                    more_due
                }
            };
            let free = DELIVERIES_IN_FLIGHT_MAX - in_flight.len();
            if !claim || free == 0 {
                continue;
            }
            let due = match self.store.claim_deliveries(clock(), DELIVERY_LEASE_S, free).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "alert deliveries could not be read");
                    continue;
                }
            };
            more_due = due.len() == free;
            for out in due {
                let (alerter, clock) = (self.clone(), clock.clone());
                in_flight.spawn(async move { alerter.deliver(out, &clock).await });
            }
        }
    }

    /// Makes one claimed delivery and records its outcome, with the time it ended.
    async fn deliver(&self, out: Outbound, clock: &Clock) -> StoreResult<()> {
        let Some(channel) = self.channels.get(&out.channel) else {
            let error = format!("channel {:?} is no longer configured", out.channel);
            tracing::error!(alert = %out.alert.id, "{error}");
            self.metrics.alert_delivery(&out.channel, false);
            return self.store.delivery_failed(out.id, None, &error).await;
        };
        let sent = deliver::send(&self.client, channel, &delivery(&out.alert)).await;
        let now = clock();
        match sent {
            Ok(()) => {
                self.metrics.alert_delivery(&out.channel, true);
                self.store.delivery_done(out.id, now).await
            }
            Err(e) => {
                self.metrics.alert_delivery(&out.channel, false);
                let attempt = out.attempts + 1;
                let retry_at = (e.retry && attempt < DELIVERY_ATTEMPTS_MAX)
                    .then(|| now + Duration::from_std(deliver::backoff(attempt)).unwrap_or(Duration::minutes(10)));
                tracing::warn!(alert = %out.alert.id, channel = %out.channel, attempt, retry = retry_at.is_some(), "alert delivery failed: {}", e.message);
                self.store.delivery_failed(out.id, retry_at, &e.message).await
            }
        }
    }
}

struct Candidate {
    dedupe: String,
    percent: Option<u8>,
    message: String,
}

/// The alerts a balance-following rule calls for now (each is recorded once by the store).
/// `refused`: the pool refused a call since it was last checked (only `cap_hit` reads it).
fn candidates(rule: &AlertRule, balance: &Balance, p: &PoolBalance, refused: bool) -> Vec<Candidate> {
    let charged = p.used.saturating_add(p.overage);
    let (account, pool) = (&balance.account, p.pool.as_str());
    let mut out = Vec::new();
    match rule.kind {
        AlertKind::Threshold => {
            let Some(limit) = p.limit else { return out };
            let percents: &[u8] = if rule.percents.is_empty() { &THRESHOLD_PERCENTS_DEFAULT } else { &rule.percents };
            for percent in alert::thresholds_crossed(percents, limit, Nanos::ZERO, charged) {
                let message = format!("{account} {pool} pool passed {percent}% of its {} limit", limit.to_dollars());
                out.push(Candidate { dedupe: percent.to_string(), percent: Some(percent), message });
            }
        }
        AlertKind::OverageStarted if alert::overage_started(Nanos::ZERO, p.overage) => {
            let message = format!("{account} {pool} pool is in overage: ${} beyond its grants", p.overage);
            out.push(Candidate { dedupe: String::new(), percent: None, message });
        }
        // Only the pool's own refusals are tallied (a key's cap is the key's, not the pool's).
        AlertKind::CapHit if refused => {
            let (limit, scope) = match p.policy.limit_scope(p.grants) {
                Some((limit, tollgate_core::LimitScope::SpendCap)) => (limit, "spend cap"),
                Some((limit, tollgate_core::LimitScope::OverageCap)) => (limit, "limit (grants plus the overage cap)"),
                Some((limit, tollgate_core::LimitScope::Grant)) => (limit, "limit (the cycle's grants)"),
                None => return out,
            };
            let message = format!(
                "{account} {pool} pool refused calls: ${} charged and ${} held of its {} {scope}",
                charged,
                p.held,
                limit.to_dollars()
            );
            out.push(Candidate { dedupe: String::new(), percent: None, message });
        }
        _ => {}
    }
    out
}

/// The built-in rule that raises overshoot on a pool no `overshoot` rule watches: every account,
/// both pools, the log channel. It is not stored; its alerts name it as their rule.
fn overshoot_default_rule() -> AlertRule {
    AlertRule {
        id: OVERSHOOT_DEFAULT_RULE.to_string(),
        kind: AlertKind::Overshoot,
        account: None,
        pool: None,
        percents: Vec::new(),
        window_s: None,
        factor_ppm: None,
        floor: None,
        days: None,
        channels: Vec::new(),
        from_config: false,
    }
}

/// The overshoot alert of a pool whose `events` were charged `total` above their holds.
fn overshoot_candidate(balance: &Balance, p: &PoolBalance, total: Nanos, events: u64) -> Candidate {
    let (were, holds) = if events == 1 { ("event was", "its hold") } else { ("events were", "their holds") };
    let message = format!(
        "{} {} pool: {events} {were} charged {} above {holds} this cycle (overshoot: the upstream reported more \
         than the worst case held)",
        balance.account,
        p.pool.as_str(),
        total.to_dollars()
    );
    Candidate { dedupe: String::new(), percent: None, message }
}

/// Checks a rule (from the configuration or the API) and says what to fix.
pub fn validate_rule(r: &AlertRule) -> Result<(), String> {
    if r.id.is_empty() || r.id.len() > 64 || !r.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("rule id {:?} must be 1 to 64 letters, digits, '-' or '_'", r.id));
    }
    if r.id == OVERSHOOT_DEFAULT_RULE {
        return Err(format!("rule id {OVERSHOOT_DEFAULT_RULE:?} is the built-in overshoot rule's: choose another id"));
    }
    for p in &r.percents {
        if !(1..=100).contains(p) {
            return Err(format!("percent {p} must be between 1 and 100"));
        }
    }
    match r.kind {
        AlertKind::Threshold => {}
        AlertKind::Spike => {
            if r.window_s.is_none_or(|w| w == 0) {
                return Err("a spike rule needs window_s, a positive number of seconds".into());
            }
            if r.factor_ppm.is_none_or(|f| f == 0) {
                return Err("a spike rule needs factor, a multiple of the baseline above 0 (e.g. \"3\")".into());
            }
            if r.floor.is_some_and(|f| f.0 < 0) {
                return Err("floor_usd must not be negative".into());
            }
        }
        AlertKind::Forecast => {
            if r.days.is_none() {
                return Err("a forecast rule needs days: how many days before the reset is too early".into());
            }
        }
        AlertKind::OverageStarted | AlertKind::CapHit | AlertKind::Overshoot => {}
    }
    if r.kind != AlertKind::Threshold && !r.percents.is_empty() {
        return Err(format!("percent applies to threshold rules only, not {}", r.kind.as_str()));
    }
    Ok(())
}

/// The webhook body of SPEC section 11.
pub fn delivery(a: &Alert) -> Delivery {
    let body = json!({
        "id": a.id,
        "kind": a.kind.as_str(),
        "account": a.account,
        "pool": a.pool.as_str(),
        "percent": a.percent,
        "cycle": {"start": dto::time(a.cycle_start), "end": dto::time(a.cycle_end)},
        "used_usd": dto::usd(a.used),
        "limit_usd": a.limit.map(dto::usd),
        "fired_at": dto::time(a.fired_at),
        "message": a.message,
    });
    Delivery { id: a.id.clone(), body, message: a.message.clone() }
}

fn human_duration(s: u64) -> String {
    match s {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
