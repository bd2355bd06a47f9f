//! A seeded simulation of the ledger: random concurrent workload against a store, every reply
//! checked against an independent reference model.
//!
//! One `u64` seed drives everything the workload chooses (a small splitmix64 generator, one
//! stream per task), and a shared virtual clock is the only time any store call sees. The run has
//! two parts:
//!
//! - **Races** on dedicated accounts: many tasks hit one pool at the same instant. The order the
//!   store picks cannot be known, so the checks are outcome invariants: exactly as many equal holds
//!   admitted as fit, each admitted hold sees a distinct remaining, charged through holds plus held
//!   never exceeds a `block` limit, a key's cap is never passed, a repeated id wins exactly once.
//! - **The main workload**: tasks run holds, settles, voids, extensions, direct events, repeated
//!   ids, top-ups, policy changes and reads against several accounts while the clock crosses
//!   cycle boundaries. Each operation on an account runs under that account's lock, together with
//!   the model's own update, so the model knows the exact order per account and predicts every
//!   reply exactly. Expiry sweeps touch every account and run alone.
//!
//! The model is written from SPEC sections 1–3 alone: it computes cycle boundaries, limits,
//! the grant/overage split and the PAYG rounding itself and uses none of `tollgate-core`'s ledger,
//! price or limit code. At the end every pool's balance (in every cycle it touched and around
//! them), every event, every grant and the store's own audit are compared with the model.
//!
//! Interleavings across accounts come from the runtime, so two runs of one seed issue the same
//! operations per task but may order them differently across tasks; every failure names the seed
//! and the operation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use tokio::sync::{Mutex, RwLock};
use tollgate_core::{Cycle, Nanos, OnExhausted, PoolKind, PoolPolicy, Refusal, Tier, Usage};

use tollgate_store::{
    Account, Balance, Event, EventOutcome, EventQuery, Grant, GrantKind, Hold, HoldOutcome, HoldRequest, HoldState,
    Key, KeyPool, NewAccount, NewEvent, NewGrant, NewKey, PoolBalance, SettleRequest, Store, StoreError, StoreResult,
};

/// The environment variable that names an extra seed to run.
pub const SEED_ENV: &str = "TOLLGATE_SIM_SEED";

/// The seed named by `TOLLGATE_SIM_SEED` (decimal, or hex with `0x`), if set.
pub fn seed_from_env() -> Option<u64> {
    let text = std::env::var(SEED_ENV).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    match parsed {
        Ok(seed) => Some(seed),
        Err(_) => panic!("{SEED_ENV}={text:?} is not a seed: give a decimal number or 0x-prefixed hex"),
    }
}

/// A small, fast, seedable generator (splitmix64). Not for secrets: for reproducible workloads.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "range({lo}, {hi})");
        let span = (hi as i128 - lo as i128 + 1) as u128;
        let r = (u128::from(self.next_u64()) * span) >> 64;
        (lo as i128 + r as i128) as i64
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// An independent stream, for a task.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// How big a run is.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Concurrent tasks of the main workload.
    pub tasks: usize,
    /// Operations of the main workload, over all tasks.
    pub ops: usize,
    /// Concurrent tasks of each race.
    pub race_tasks: usize,
}

impl Config {
    pub fn new(seed: u64) -> Config {
        Config { seed, tasks: 24, ops: 6_000, race_tasks: 32 }
    }
}

macro_rules! stats {
    ($($name:ident),* $(,)?) => {
        #[derive(Default)]
        struct Stats {
            $($name: AtomicU64,)*
        }

        /// What one run did, counted by kind of outcome.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Report {
            pub seed: u64,
            /// Virtual time the main workload covered.
            pub virtual_days: i64,
            /// Cycle boundaries the clock crossed (for the account anchored on the 1st).
            pub cycles_crossed: i64,
            $(pub $name: u64,)*
        }

        impl Stats {
            fn report(&self, seed: u64, virtual_days: i64, cycles_crossed: i64) -> Report {
                Report { seed, virtual_days, cycles_crossed, $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Report {
            /// Every counter with its name.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

stats!(
    ops,
    holds_admitted,
    holds_refused_pool,
    holds_refused_key,
    holds_refused_negative,
    holds_replayed,
    hold_conflicts,
    settles,
    settles_replayed,
    overshoots,
    settle_conflicts,
    voids,
    extends,
    events_recorded,
    events_duplicate,
    late_events,
    event_batches_refused,
    grants_added,
    holds_expired,
    sweeps,
    recoveries,
    not_found,
    invalid,
    reads_checked,
    policy_changes,
    race_holds,
    intrusions_refused,
);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} ({:#x}): {} virtual days, {} cycle boundaries crossed",
            self.seed, self.seed, self.virtual_days, self.cycles_crossed
        )?;
        for (name, value) in self.counters() {
            write!(f, ", {name} {value}")?;
        }
        Ok(())
    }
}

/// What the workload must have exercised for a run to count.
const COVERAGE: &[&str] = &[
    "holds_admitted",
    "holds_refused_pool",
    "holds_refused_key",
    "holds_refused_negative",
    "holds_replayed",
    "hold_conflicts",
    "settles",
    "settles_replayed",
    "overshoots",
    "settle_conflicts",
    "voids",
    "extends",
    "events_recorded",
    "events_duplicate",
    "late_events",
    "event_batches_refused",
    "grants_added",
    "holds_expired",
    "not_found",
    "invalid",
    "policy_changes",
    "intrusions_refused",
];

// ---------------------------------------------------------------------------------------------
// Time and cycles, computed independently of tollgate-core.

/// The main workload's clock starts here.
fn start_time() -> DateTime<Utc> {
    utc_midnight(2026, 1, 10)
}

fn utc_midnight(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(year, month, day).expect("valid date").and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

fn time_of(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).expect("simulated time in range")
}

fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn is_leap(year: i32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 31,
    }
}

fn month_number(year: i32, month: u32) -> i64 {
    i64::from(year) * 12 + i64::from(month) - 1
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 { (year + 1, 1) } else { (year, month + 1) }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 { (year - 1, 12) } else { (year, month - 1) }
}

/// An anchor at 00:00 UTC on `day` of a month (UTC accounts only): cycle *k* starts on that day
/// *k* months later, clamped to the month's length.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    year: i32,
    month: u32,
    day: u32,
}

impl Anchor {
    /// The anchor itself (its month must have its day).
    fn instant(&self) -> DateTime<Utc> {
        utc_midnight(self.year, self.month, self.day)
    }

    fn start_in(&self, year: i32, month: u32) -> DateTime<Utc> {
        utc_midnight(year, month, self.day.min(days_in_month(year, month)))
    }

    fn cycle_at(&self, t: DateTime<Utc>) -> Cycle {
        let (mut year, mut month) = (t.year(), t.month());
        if self.start_in(year, month) > t {
            (year, month) = previous_month(year, month);
        }
        let (next_year, next_month) = next_month(year, month);
        Cycle {
            index: month_number(year, month) - month_number(self.year, self.month),
            start: self.start_in(year, month),
            end: self.start_in(next_year, next_month),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ledger rules, written from the SPEC.

/// SPEC §1: block → min(grants, spend_cap); payg → min(grants + overage_cap, spend_cap),
/// unlimited without either; alert → spend_cap, else unlimited.
fn limit_of(policy: &PoolPolicy, grants: i64) -> Option<i64> {
    let spend = policy.spend_cap.map(|n| n.0);
    match policy.on_exhausted {
        OnExhausted::Block => Some(spend.map_or(grants, |s| grants.min(s))),
        OnExhausted::Payg => match (policy.overage_cap.map(|n| n.0), spend) {
            (None, None) => None,
            (Some(o), None) => Some(grants + o),
            (None, Some(s)) => Some(s),
            (Some(o), Some(s)) => Some((grants + o).min(s)),
        },
        OnExhausted::Alert => spend,
    }
}

/// SPEC §3: the cost is paid from what the cycle's grants still hold, the rest is overage at list
/// × the tier's multiplier (millionths), rounded half-up to one nano-USD.
fn split(cost: i64, grants: i64, used: i64, multiplier_ppm: u64) -> (i64, i64) {
    assert!(cost >= 0);
    let left = (grants - used).max(0);
    let from_grants = cost.min(left);
    let rest = i128::from(cost - from_grants);
    let overage = (rest * i128::from(multiplier_ppm) + 500_000) / 1_000_000;
    (from_grants, i64::try_from(overage).expect("overage in range"))
}

fn pool_index(pool: PoolKind) -> usize {
    match pool {
        PoolKind::Interactive => 0,
        PoolKind::Programmatic => 1,
    }
}

const POOLS: [PoolKind; 2] = [PoolKind::Interactive, PoolKind::Programmatic];
const MODELS: [&str; 4] = ["claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5", "gpt-5.1"];
const USD: i64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// The reference model.

/// The kinds of error a reply can be expected to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    NotFound,
    Conflict,
    Invalid,
}

fn kind_of(e: &StoreError) -> Option<ErrKind> {
    match e {
        StoreError::NotFound(_) => Some(ErrKind::NotFound),
        StoreError::Conflict(_) => Some(ErrKind::Conflict),
        StoreError::Invalid(_) | StoreError::Refused(_) => Some(ErrKind::Invalid),
        StoreError::Backend(_) | StoreError::Corrupt(_) | StoreError::Unavailable(_) => None,
    }
}

/// One pool in one cycle, as the store keeps it once the cycle's state exists.
#[derive(Clone, Debug)]
struct PoolModel {
    cycle: Cycle,
    tier_grant: i64,
    top_ups: Vec<Grant>,
    used: i64,
    overage: i64,
    held: i64,
}

impl PoolModel {
    fn grants(&self) -> i64 {
        self.tier_grant + self.top_ups.iter().map(|g| g.amount.0).sum::<i64>()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct KeyModel {
    charged: i64,
    held: i64,
}

#[derive(Clone, Debug)]
struct HoldModel {
    request: HoldRequest,
    hold: Hold,
    /// The settle that charged the hold, and the event it wrote (settled or expired).
    settle: Option<SettleRequest>,
    event_id: Option<String>,
}

#[derive(Clone, Debug)]
struct EventModel {
    fingerprint: String,
    event: Event,
    /// The request of a directly recorded event, to repeat it.
    request: Option<NewEvent>,
}

/// One account as the store should hold it.
#[derive(Clone)]
struct AccountModel {
    id: String,
    tier: String,
    multiplier_ppm: u64,
    anchor: Anchor,
    tier_grants: [i64; 2],
    policies: [PoolPolicy; 2],
    /// By (pool index, cycle start µs); an entry exists once the store created that cycle's state.
    pools: BTreeMap<(usize, i64), PoolModel>,
    /// Own keys and their caps.
    keys: Vec<(String, Option<i64>)>,
    /// By (key, cycle start µs).
    key_cycles: BTreeMap<(String, i64), KeyModel>,
    holds: BTreeMap<String, HoldModel>,
    hold_ids: Vec<String>,
    open: BTreeSet<String>,
    events: BTreeMap<String, EventModel>,
    event_ids: Vec<String>,
    direct_ids: Vec<String>,
    last_seq: i64,
    next_id: u64,
}

impl AccountModel {
    fn fresh_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    fn key_cap(&self, key: &str) -> Option<Option<i64>> {
        self.keys.iter().find(|(id, _)| id == key).map(|(_, cap)| *cap)
    }

    /// The pool's cycle state, created with the tier's grant when its time has come.
    fn pool_entry(&mut self, pool: PoolKind, cycle: Cycle) -> &mut PoolModel {
        let i = pool_index(pool);
        let tier_grant = self.tier_grants[i];
        self.pools.entry((i, us(cycle.start))).or_insert_with(|| PoolModel {
            cycle,
            tier_grant,
            top_ups: Vec::new(),
            used: 0,
            overage: 0,
            held: 0,
        })
    }

    /// (grants, used, overage, held) of a pool in a cycle, existing or not.
    fn pool_figures(&self, pool: PoolKind, cycle: &Cycle) -> (i64, i64, i64, i64) {
        let i = pool_index(pool);
        match self.pools.get(&(i, us(cycle.start))) {
            Some(p) => (p.grants(), p.used, p.overage, p.held),
            None => (self.tier_grants[i], 0, 0, 0),
        }
    }

    /// limit − charged − held; None when unlimited.
    fn remaining(&self, pool: PoolKind, cycle: &Cycle) -> Option<i64> {
        let (grants, used, overage, held) = self.pool_figures(pool, cycle);
        limit_of(&self.policies[pool_index(pool)], grants).map(|l| l - used - overage - held)
    }

    fn key_entry(&mut self, key: &str, cycle: &Cycle) -> &mut KeyModel {
        self.key_cycles.entry((key.to_string(), us(cycle.start))).or_default()
    }

    fn balance(&self, t: DateTime<Utc>) -> Balance {
        let cycle = self.anchor.cycle_at(t);
        let pool = |kind: PoolKind| {
            let (grants, used, overage, held) = self.pool_figures(kind, &cycle);
            let policy = self.policies[pool_index(kind)];
            PoolBalance {
                pool: kind,
                policy,
                grants: Nanos(grants),
                used: Nanos(used),
                overage: Nanos(overage),
                held: Nanos(held),
                limit: limit_of(&policy, grants).map(Nanos),
            }
        };
        Balance {
            account: self.id.clone(),
            tier: self.tier.clone(),
            cycle,
            pools: [pool(PoolKind::Interactive), pool(PoolKind::Programmatic)],
        }
    }

    /// The grants of the cycle containing `t`, per pool, in the order they were added. Tier
    /// grants carry id 0 (the store's id is not predicted).
    fn grants_at(&self, t: DateTime<Utc>) -> [Vec<Grant>; 2] {
        let cycle = self.anchor.cycle_at(t);
        POOLS.map(|kind| match self.pools.get(&(pool_index(kind), us(cycle.start))) {
            None => Vec::new(),
            Some(p) => {
                let mut all = vec![Grant {
                    id: 0,
                    account: self.id.clone(),
                    pool: kind,
                    kind: GrantKind::Tier,
                    amount: Nanos(p.tier_grant),
                    cycle_start: cycle.start,
                    expires_at: cycle.end,
                    note: None,
                    created_at: cycle.start,
                }];
                all.extend(p.top_ups.iter().cloned());
                all
            }
        })
    }

    /// Runs a hold on the model: the reply the store must give.
    fn hold(&mut self, req: &HoldRequest, now: DateTime<Utc>) -> Result<HoldOutcome, ErrKind> {
        if let Some(h) = self.holds.get(&req.id) {
            return if h.request.fingerprint == req.fingerprint {
                Ok(HoldOutcome::Replayed(h.hold.clone()))
            } else {
                Err(ErrKind::Conflict)
            };
        }
        let key_cap = match &req.key {
            None => None,
            Some(k) => match self.key_cap(k) {
                Some(cap) => Some((k.clone(), cap)),
                None => return Err(ErrKind::Invalid),
            },
        };
        let cycle = self.anchor.cycle_at(now);
        let policy = self.policies[pool_index(req.pool)];
        let pool = self.pool_entry(req.pool, cycle);
        let amount = req.amount.0;
        let refused = |refusal| Ok(HoldOutcome::Refused { refusal, resets_at: cycle.end });
        if amount < 0 {
            return refused(Refusal::AmountNegative);
        }
        let limit = limit_of(&policy, pool.grants());
        let remaining = limit.map(|l| l - pool.used - pool.overage - pool.held);
        if let (Some(l), Some(r)) = (limit, remaining)
            && amount > r
        {
            return refused(Refusal::PoolExhausted { limit: Nanos(l), remaining: Nanos(r.max(0)) });
        }
        if let Some((k, Some(cap))) = &key_cap {
            let scope = self.key_entry(k, &cycle);
            let left = cap - scope.charged - scope.held;
            if amount > left {
                return refused(Refusal::KeyCapReached { cap: Nanos(*cap), remaining: Nanos(left.max(0)) });
            }
        }
        self.pool_entry(req.pool, cycle).held += amount;
        if let Some((k, _)) = &key_cap {
            self.key_entry(k, &cycle).held += amount;
        }
        let hold = Hold {
            id: req.id.clone(),
            account: self.id.clone(),
            pool: req.pool,
            key: req.key.clone(),
            amount: req.amount,
            model: req.model.clone(),
            source: req.source.clone(),
            state: HoldState::Open,
            cycle_start: cycle.start,
            cycle_end: cycle.end,
            created_at: now,
            expires_at: now + Duration::seconds(req.ttl_s as i64),
            remaining_after: remaining.map(|r| Nanos(r - amount)),
            made_by: req.made_by.clone(),
        };
        self.holds.insert(
            req.id.clone(),
            HoldModel { request: req.clone(), hold: hold.clone(), settle: None, event_id: None },
        );
        self.hold_ids.push(req.id.clone());
        self.open.insert(req.id.clone());
        Ok(HoldOutcome::Held(hold))
    }

    /// Charges a hold (settle or expiry) on the model; returns (grant part, overage part).
    fn charge_hold(&mut self, hold_id: &str, cost: i64, multiplier_ppm: u64) -> (i64, i64) {
        let hold = self.holds[hold_id].hold.clone();
        let cycle = Cycle { index: 0, start: hold.cycle_start, end: hold.cycle_end };
        let pool =
            self.pools.get_mut(&(pool_index(hold.pool), us(hold.cycle_start))).expect("a held pool's cycle exists");
        let (g, o) = split(cost, pool.grants(), pool.used, multiplier_ppm);
        pool.used += g;
        pool.overage += o;
        pool.held -= hold.amount.0;
        if let Some(k) = &hold.key {
            let scope = self.key_entry(k, &cycle);
            scope.charged += g + o;
            scope.held -= hold.amount.0;
        }
        (g, o)
    }

    /// Runs a settle on the model: the expected event (seq 0 when new) and whether it is new.
    fn settle(&mut self, req: &SettleRequest, now: DateTime<Utc>) -> Result<(Event, bool), ErrKind> {
        let Some(h) = self.holds.get(&req.hold_id) else { return Err(ErrKind::NotFound) };
        match h.hold.state {
            HoldState::Open => {}
            HoldState::Settled => {
                let first = &self.events[h.event_id.as_ref().expect("a settled hold has its event")];
                return if first.fingerprint == req.event.fingerprint {
                    Ok((first.event.clone(), false))
                } else {
                    Err(ErrKind::Conflict)
                };
            }
            HoldState::Voided | HoldState::Expired => return Err(ErrKind::Conflict),
        }
        if self.events.contains_key(&req.event.id) {
            return Err(ErrKind::Conflict);
        }
        if req.event.cost.0 < 0 {
            return Err(ErrKind::Invalid);
        }
        let hold = h.hold.clone();
        let (g, o) = self.charge_hold(&req.hold_id, req.event.cost.0, self.multiplier_ppm);
        let e = &req.event;
        let event = Event {
            seq: 0,
            id: e.id.clone(),
            account: e.account.clone(),
            pool: hold.pool,
            model: e.model.clone(),
            usage: e.usage,
            cost: e.cost,
            grant_part: Nanos(g),
            overage_part: Nanos(o),
            overshoot: Nanos((g + o - hold.amount.0).max(0)),
            service_tier: e.service_tier.clone(),
            inference_geo: e.inference_geo.clone(),
            speed: e.speed.clone(),
            source: e.source.clone(),
            key: hold.key.clone(),
            labels: e.labels.clone(),
            timestamp: e.timestamp,
            cycle_start: hold.cycle_start,
            hold_id: Some(hold.id.clone()),
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            partial: e.partial,
            estimated: false,
            unsettled: false,
            recorded_at: now,
        };
        let h = self.holds.get_mut(&req.hold_id).expect("hold exists");
        h.hold.state = HoldState::Settled;
        h.settle = Some(req.clone());
        h.event_id = Some(e.id.clone());
        self.open.remove(&req.hold_id);
        Ok((event, true))
    }

    fn void(&mut self, hold_id: &str) -> Result<Hold, ErrKind> {
        let Some(h) = self.holds.get(hold_id) else { return Err(ErrKind::NotFound) };
        match h.hold.state {
            HoldState::Open => {}
            HoldState::Voided => return Ok(h.hold.clone()),
            HoldState::Settled | HoldState::Expired => return Err(ErrKind::Conflict),
        }
        let hold = h.hold.clone();
        let cycle = Cycle { index: 0, start: hold.cycle_start, end: hold.cycle_end };
        self.pool_entry(hold.pool, cycle).held -= hold.amount.0;
        if let Some(k) = &hold.key {
            self.key_entry(k, &cycle).held -= hold.amount.0;
        }
        let h = self.holds.get_mut(hold_id).expect("hold exists");
        h.hold.state = HoldState::Voided;
        self.open.remove(hold_id);
        Ok(h.hold.clone())
    }

    fn extend(&mut self, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> Result<Hold, ErrKind> {
        let Some(h) = self.holds.get_mut(hold_id) else { return Err(ErrKind::NotFound) };
        if h.hold.state != HoldState::Open {
            return Err(ErrKind::Conflict);
        }
        h.hold.expires_at = now + Duration::seconds(ttl_s as i64);
        Ok(h.hold.clone())
    }

    /// Books a new direct event on the model; the expected event has seq 0.
    fn book_event(&mut self, e: &NewEvent, now: DateTime<Utc>) -> Event {
        let cycle = self.anchor.cycle_at(e.timestamp);
        let ppm = self.multiplier_ppm;
        let pool = self.pool_entry(e.pool, cycle);
        let (g, o) = split(e.cost.0, pool.grants(), pool.used, ppm);
        pool.used += g;
        pool.overage += o;
        if let Some(k) = &e.key {
            self.key_entry(k, &cycle).charged += g + o;
        }
        Event {
            seq: 0,
            id: e.id.clone(),
            account: e.account.clone(),
            pool: e.pool,
            model: e.model.clone(),
            usage: e.usage,
            cost: e.cost,
            grant_part: Nanos(g),
            overage_part: Nanos(o),
            overshoot: Nanos::ZERO,
            service_tier: e.service_tier.clone(),
            inference_geo: e.inference_geo.clone(),
            speed: e.speed.clone(),
            source: e.source.clone(),
            key: e.key.clone(),
            labels: e.labels.clone(),
            timestamp: e.timestamp,
            cycle_start: cycle.start,
            hold_id: None,
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            partial: e.partial,
            estimated: false,
            unsettled: false,
            recorded_at: now,
        }
    }

    fn remember_event(&mut self, fingerprint: String, event: Event, request: Option<NewEvent>) {
        let id = event.id.clone();
        if request.is_some() {
            self.direct_ids.push(id.clone());
        }
        self.last_seq = self.last_seq.max(event.seq);
        self.event_ids.push(id.clone());
        self.events.insert(id, EventModel { fingerprint, event, request });
    }
}

/// What a batch of direct events should do, planned before the store answers.
enum Planned {
    New(Box<(Event, NewEvent)>),
    /// A repeat of an event recorded before the batch.
    Repeat(Box<Event>),
    /// A repeat of an earlier event of the same batch.
    RepeatInBatch(usize),
}

fn hold_fingerprint(r: &HoldRequest) -> String {
    format!("{:?}", HoldRequest { fingerprint: String::new(), ..r.clone() })
}

fn event_fingerprint(e: &NewEvent) -> String {
    format!("{:?}", NewEvent { fingerprint: String::new(), ..e.clone() })
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// Names the seed in every failure, and remembers the first one (other tasks stop early).
struct Checker {
    seed: u64,
    failed: AtomicBool,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Checker {
    fn new(seed: u64) -> Checker {
        Checker { seed, failed: AtomicBool::new(false), first_failure: std::sync::Mutex::new(None) }
    }

    fn fail(&self, op: &str, what: String) -> ! {
        let message =
            format!("simulation seed {seed} ({seed:#x}; rerun with {SEED_ENV}={seed}): {op}: {what}", seed = self.seed);
        if !self.failed.swap(true, Ordering::SeqCst) {
            *self.first_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
        }
        panic!("{message}");
    }

    fn ensure(&self, ok: bool, op: &str, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(op, what());
        }
    }

    fn same<T: PartialEq + fmt::Debug>(&self, op: &str, what: &str, expected: &T, got: &T) {
        if expected != got {
            self.fail(op, format!("{what}: expected {expected:#?}\ngot {got:#?}"));
        }
    }

    /// An expected error kind against the store's reply; Ok(value) passes the value on.
    fn reply<T: fmt::Debug>(&self, op: &str, expected: Result<(), ErrKind>, got: StoreResult<T>) -> Option<T> {
        match (expected, got) {
            (Ok(()), Ok(v)) => Some(v),
            (Err(k), Err(e)) if kind_of(&e) == Some(k) => None,
            (expected, got) => self.fail(op, format!("expected {expected:?}, got {got:?}")),
        }
    }

    fn ok<T>(&self, op: &str, got: StoreResult<T>) -> T {
        got.unwrap_or_else(|e| self.fail(op, format!("unexpected error {e:?}")))
    }
}

/// Which operation a task runs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Hold,
    Settle,
    Void,
    Extend,
    Record,
    ReplayHold,
    ReplaySettle,
    ReplayEvent,
    TopUp,
    Read,
    Grants,
    Policy,
    Events,
    UnknownAccount,
    Advance,
    Expire,
    Recover,
    /// An account key or the admin, through the API's path, tries to end a hold it may not end.
    Intrude,
}

/// Weights per thousand operations.
const OP_WEIGHTS: &[(Op, u64)] = &[
    (Op::Hold, 270),
    (Op::Settle, 200),
    (Op::Void, 60),
    (Op::Extend, 30),
    (Op::Record, 140),
    (Op::ReplayHold, 30),
    (Op::ReplaySettle, 30),
    (Op::ReplayEvent, 20),
    (Op::TopUp, 30),
    (Op::Read, 50),
    (Op::Grants, 10),
    (Op::Policy, 10),
    (Op::Events, 20),
    (Op::UnknownAccount, 8),
    (Op::Advance, 75),
    (Op::Expire, 15),
    (Op::Recover, 2),
    (Op::Intrude, 40),
];

fn pick_op(rng: &mut Rng) -> Op {
    let total: u64 = OP_WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total);
    for (op, w) in OP_WEIGHTS {
        if r < *w {
            return *op;
        }
        r -= w;
    }
    unreachable!("weights cover the draw")
}

/// A random amount of money, mostly cents to dollars, sometimes a few nanos (rounding).
fn money(rng: &mut Rng) -> i64 {
    match rng.below(100) {
        0..=39 => rng.range(1_000_000, USD / 2),
        40..=79 => rng.range(USD / 2, 3 * USD),
        80..=94 => rng.range(3 * USD, 15 * USD),
        _ => rng.range(1, 999),
    }
}

fn pick_pool(rng: &mut Rng) -> PoolKind {
    *rng.pick(&POOLS)
}

fn random_usage(rng: &mut Rng) -> Usage {
    Usage {
        input_tokens: rng.below(50_000),
        cache_creation_5m_input_tokens: if rng.chance(20) { rng.below(10_000) } else { 0 },
        cache_creation_1h_input_tokens: if rng.chance(10) { rng.below(10_000) } else { 0 },
        cache_read_input_tokens: if rng.chance(30) { rng.below(100_000) } else { 0 },
        output_tokens: rng.below(20_000),
        web_search_requests: if rng.chance(5) { rng.below(5) } else { 0 },
    }
}

fn new_event(
    rng: &mut Rng,
    account: &str,
    id: String,
    pool: PoolKind,
    key: Option<String>,
    cost: i64,
    timestamp: DateTime<Utc>,
) -> NewEvent {
    let mut labels = BTreeMap::new();
    if rng.chance(40) {
        labels.insert("team".to_string(), rng.pick(&["search", "billing", "ci"]).to_string());
    }
    if rng.chance(10) {
        labels.insert("job".to_string(), format!("j{}", rng.below(50)));
    }
    let mut e = NewEvent {
        id,
        account: account.to_string(),
        pool,
        model: rng.pick(&MODELS).to_string(),
        usage: random_usage(rng),
        cost: Nanos(cost),
        service_tier: if rng.chance(10) { Some("batch".to_string()) } else { None },
        inference_geo: if rng.chance(10) { Some("us".to_string()) } else { None },
        speed: if rng.chance(5) { Some("fast".to_string()) } else { None },
        source: if rng.chance(50) { Some(rng.pick(&["sdk", "import", "hook"]).to_string()) } else { None },
        key,
        labels,
        timestamp,
        latency_ms: if rng.chance(70) { Some(rng.below(60_000)) } else { None },
        ttft_ms: if rng.chance(50) { Some(rng.below(5_000)) } else { None },
        partial: rng.chance(10),
        estimated: false,
        fingerprint: String::new(),
    };
    e.fingerprint = event_fingerprint(&e);
    e
}

struct Sim {
    check: Checker,
    store: Arc<dyn Store>,
    /// The virtual clock, µs since the Unix epoch.
    clock_us: AtomicI64,
    /// Per-account operations share it; a sweep over every account takes it alone.
    gate: RwLock<()>,
    accounts: Vec<Mutex<AccountModel>>,
    /// Every key id and its account.
    key_owner: BTreeMap<String, String>,
    stats: Stats,
    next_op: AtomicU64,
}

macro_rules! bump {
    ($sim:expr, $name:ident) => {
        $sim.stats.$name.fetch_add(1, Ordering::Relaxed)
    };
}

impl Sim {
    fn now(&self) -> DateTime<Utc> {
        time_of(self.clock_us.load(Ordering::SeqCst))
    }

    /// A key for a call: none, one of the account's own, or (rarely) one it does not own.
    fn pick_key(&self, rng: &mut Rng, a: &AccountModel) -> Option<String> {
        match rng.below(100) {
            0..=49 => None,
            50..=97 => Some(rng.pick(&a.keys).0.clone()),
            98 => {
                let others: Vec<&String> = self.key_owner.iter().filter(|(_, o)| **o != a.id).map(|(k, _)| k).collect();
                Some((*rng.pick(&others)).clone())
            }
            _ => Some(format!("{}-no-such-key", a.id)),
        }
    }

    /// A hold of the account: mostly open ones.
    fn pick_hold(&self, rng: &mut Rng, a: &AccountModel) -> String {
        if rng.chance(2) || a.hold_ids.is_empty() {
            return format!("h-missing-{}", rng.below(1_000));
        }
        if !a.open.is_empty() && rng.chance(85) {
            let n = rng.below(a.open.len() as u64) as usize;
            return a.open.iter().nth(n).expect("in range").clone();
        }
        rng.pick(&a.hold_ids).clone()
    }

    fn advance(&self, rng: &mut Rng) {
        let step_s = match rng.below(100) {
            0..=49 => rng.range(1, 30 * 60),
            50..=84 => rng.range(30 * 60, 12 * 3600),
            _ => rng.range(12 * 3600, 3 * 86_400),
        };
        self.clock_us.fetch_add(step_s * 1_000_000, Ordering::SeqCst);
    }

    async fn task(self: Arc<Sim>, task: usize, mut rng: Rng, ops: usize) {
        for _ in 0..ops {
            if self.check.failed.load(Ordering::SeqCst) {
                return;
            }
            let n = self.next_op.fetch_add(1, Ordering::SeqCst);
            bump!(self, ops);
            let op = pick_op(&mut rng);
            match op {
                Op::Advance => self.advance(&mut rng),
                Op::Expire | Op::Recover => {
                    self.sweep(op == Op::Recover, &format!("op {n} (task {task}) {op:?}")).await
                }
                Op::UnknownAccount => self.unknown_account(&mut rng, &format!("op {n} (task {task}) {op:?}")).await,
                _ => {
                    let _shared = self.gate.read().await;
                    let i = rng.below(self.accounts.len() as u64) as usize;
                    let mut a = self.accounts[i].lock().await;
                    let now = self.now();
                    let label = format!("op {n} (task {task}) {op:?} on account {} at {}", a.id, now.to_rfc3339());
                    self.account_op(op, &mut rng, &mut a, now, &label).await;
                }
            }
        }
    }

    async fn account_op(&self, op: Op, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        match op {
            Op::Hold => self.op_hold(rng, a, now, label).await,
            Op::Settle => self.op_settle(rng, a, now, label).await,
            Op::Void => {
                let id = self.pick_hold(rng, a);
                let label = format!("{label}: void {id}");
                let expected = a.void(&id);
                let got = self.store.void(&a.id, &id, now).await;
                self.compare(&label, &expected, &got);
                if expected.is_ok() {
                    bump!(self, voids);
                }
            }
            Op::Extend => {
                let id = self.pick_hold(rng, a);
                let ttl_s = rng.range(30, 3_600) as u64;
                let label = format!("{label}: extend {id} by {ttl_s} s");
                let expected = a.extend(&id, ttl_s, now);
                let got = self.store.extend_hold(&a.id, &id, ttl_s, now).await;
                self.compare(&label, &expected, &got);
                if expected.is_ok() {
                    bump!(self, extends);
                }
            }
            Op::Record => self.op_record(rng, a, now, label, false).await,
            Op::ReplayHold => {
                if a.hold_ids.is_empty() {
                    return self.op_hold(rng, a, now, label).await;
                }
                let id = rng.pick(&a.hold_ids).clone();
                let mut request = a.holds[&id].request.clone();
                if rng.chance(30) {
                    request.amount = Nanos(request.amount.0 + 1);
                    request.fingerprint = hold_fingerprint(&request);
                }
                self.do_hold(a, request, now, label).await;
            }
            Op::ReplaySettle => {
                let settled: Vec<&String> = a.hold_ids.iter().filter(|id| a.holds[*id].settle.is_some()).collect();
                if settled.is_empty() {
                    return self.op_settle(rng, a, now, label).await;
                }
                let id = (*rng.pick(&settled)).clone();
                let mut request = a.holds[&id].settle.clone().expect("settled");
                if rng.chance(30) {
                    request.event.cost = Nanos(request.event.cost.0 + 1);
                    request.event.fingerprint = event_fingerprint(&request.event);
                }
                self.do_settle(a, request, now, label).await;
            }
            Op::ReplayEvent => self.op_record(rng, a, now, label, true).await,
            Op::TopUp => self.op_top_up(rng, a, now, label).await,
            Op::Read => self.op_read(rng, a, now, label).await,
            Op::Grants => {
                let t = if rng.chance(70) { now } else { now - Duration::days(rng.range(1, 60)) };
                self.check_grants(a, t, &format!("{label}: grants at {}", t.to_rfc3339())).await;
            }
            Op::Policy => self.op_policy(rng, a, label).await,
            Op::Events => self.op_events(rng, a, label).await,
            Op::Intrude => self.op_intrude(rng, a, now, label).await,
            Op::Advance | Op::Expire | Op::Recover | Op::UnknownAccount => unreachable!("not an account operation"),
        }
    }

    fn compare<T: PartialEq + fmt::Debug>(&self, op: &str, expected: &Result<T, ErrKind>, got: &StoreResult<T>) {
        let same = match (expected, got) {
            (Ok(e), Ok(g)) => e == g,
            (Err(k), Err(e)) => kind_of(e) == Some(*k),
            _ => false,
        };
        if !same {
            self.check.fail(op, format!("expected {expected:#?}\ngot {got:#?}"));
        }
        if let Err(k) = expected {
            match k {
                ErrKind::NotFound => bump!(self, not_found),
                ErrKind::Invalid => bump!(self, invalid),
                ErrKind::Conflict => 0,
            };
        }
    }

    async fn op_hold(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        let pool = pick_pool(rng);
        let cycle = a.anchor.cycle_at(now);
        let key = self.pick_key(rng, a);
        let made_by = match (rng.below(10), &key) {
            (0..=3, _) => tollgate_store::Maker::Gateway,
            (4..=6, Some(k)) => tollgate_store::Maker::Key(k.clone()),
            _ => tollgate_store::Maker::Admin,
        };
        let remaining = a.remaining(pool, &cycle);
        let amount = match (rng.below(100), remaining) {
            (0..=3, Some(r)) if r >= 0 => r,
            (4..=6, Some(r)) if r >= 0 => r + 1,
            (7, _) => 0,
            (8, _) => -rng.range(1, USD),
            _ => money(rng),
        };
        let mut request = HoldRequest {
            account: a.id.clone(),
            id: a.fresh_id("h"),
            pool,
            key,
            amount: Nanos(amount),
            ttl_s: rng.range(30, 3_600) as u64,
            model: if rng.chance(80) { Some(rng.pick(&MODELS).to_string()) } else { None },
            source: if rng.chance(50) { Some("sim".to_string()) } else { None },
            fingerprint: String::new(),
            made_by,
        };
        request.fingerprint = hold_fingerprint(&request);
        self.do_hold(a, request, now, label).await;
    }

    /// An adversarial caller: an account key (or the admin) tries to void an open hold, or settle
    /// it at $0, that it may not end; the store must refuse and change nothing (the model does
    /// not change, and every later read is checked against it). Who may end what is decided
    /// here from SPEC section 3, apart from `ownership`.
    async fn op_intrude(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        use tollgate_store::Maker;
        use tollgate_store::ownership::{self, EndError};
        if a.open.is_empty() {
            return;
        }
        let n = rng.below(a.open.len() as u64) as usize;
        let id = a.open.iter().nth(n).expect("in range").clone();
        let hold = a.holds[&id].hold.clone();
        let intruder = if rng.chance(30) { Maker::Admin } else { Maker::Key(rng.pick(&a.keys).0.clone()) };
        let code = match (&hold.made_by, &intruder) {
            (Maker::Gateway, _) => "hold_owned_by_gateway",
            (_, Maker::Admin) => return,
            (Maker::Key(maker), Maker::Key(caller)) if maker == caller => return,
            _ => "hold_made_by_another",
        };
        let label = format!("{label}: {intruder:?} tries to end {id}, made by {:?}", hold.made_by);
        let got = if rng.chance(50) {
            ownership::void_as(&*self.store, &intruder, &a.id, &id, now).await.map(|_| ())
        } else {
            let event = new_event(rng, &a.id, id.clone(), hold.pool, hold.key.clone(), 0, now);
            let request = SettleRequest { account: a.id.clone(), hold_id: id.clone(), event };
            ownership::settle_as(&*self.store, &intruder, request, now).await.map(|_| ())
        };
        match got {
            Err(EndError::Denied(d)) if d.code() == code => {
                bump!(self, intrusions_refused);
            }
            other => self.check.fail(&label, format!("expected the refusal {code}, got {other:?}")),
        }
    }

    async fn do_hold(&self, a: &mut AccountModel, request: HoldRequest, now: DateTime<Utc>, label: &str) {
        let label =
            format!("{label}: hold {} of {} on {} key {:?}", request.id, request.amount.0, request.pool, request.key);
        let expected = a.hold(&request, now);
        let got = self.store.hold(request, now).await;
        self.compare(&label, &expected, &got);
        match expected {
            Ok(HoldOutcome::Held(_)) => bump!(self, holds_admitted),
            Ok(HoldOutcome::Replayed(_)) => bump!(self, holds_replayed),
            Ok(HoldOutcome::Refused { refusal: Refusal::PoolExhausted { .. }, .. }) => bump!(self, holds_refused_pool),
            Ok(HoldOutcome::Refused { refusal: Refusal::KeyCapReached { .. }, .. }) => bump!(self, holds_refused_key),
            Ok(HoldOutcome::Refused { .. }) => bump!(self, holds_refused_negative),
            Err(ErrKind::Conflict) => bump!(self, hold_conflicts),
            Err(_) => 0,
        };
    }

    async fn op_settle(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        // Most calls settle their own, still open hold; with none open, make one instead.
        if a.open.is_empty() && rng.chance(75) {
            return self.op_hold(rng, a, now, label).await;
        }
        let hold_id = self.pick_hold(rng, a);
        let amount = a.holds.get(&hold_id).map_or_else(|| money(rng), |h| h.hold.amount.0);
        let cost = match rng.below(100) {
            0..=44 if amount > 0 => rng.range(0, amount - 1),
            0..=69 => amount,
            70..=94 => amount + rng.range(1, amount.max(0) / 2 + USD),
            95..=98 => 0,
            _ => -rng.range(1, 1_000),
        };
        let event_id = match rng.below(100) {
            0..=79 => hold_id.clone(),
            80..=91 => format!("{hold_id}-s{}", rng.below(1_000)),
            92..=95 if !a.event_ids.is_empty() => rng.pick(&a.event_ids).clone(),
            _ if !a.open.is_empty() => {
                let n = rng.below(a.open.len() as u64) as usize;
                a.open.iter().nth(n).expect("in range").clone()
            }
            _ => hold_id.clone(),
        };
        // Pool and key come from the hold: the request's are ignored.
        let pool = pick_pool(rng);
        let key = if rng.chance(50) { Some(rng.pick(&a.keys).0.clone()) } else { None };
        let timestamp = now - Duration::seconds(rng.range(0, 120));
        let mut event = new_event(rng, &a.id, event_id, pool, key, cost, timestamp);
        if rng.chance(1) {
            // An event naming another account: like pool and key, the account is the hold's.
            event.account = self.key_owner.values().find(|o| **o != a.id).expect("several accounts").clone();
            event.fingerprint = event_fingerprint(&event);
        }
        let request = SettleRequest { account: a.id.clone(), hold_id, event };
        self.do_settle(a, request, now, label).await;
    }

    async fn do_settle(&self, a: &mut AccountModel, request: SettleRequest, now: DateTime<Utc>, label: &str) {
        let label = format!(
            "{label}: settle hold {} with event {} cost {}",
            request.hold_id, request.event.id, request.event.cost.0
        );
        // The event belongs to the hold's account whatever account it names; a store may
        // instead refuse a request whose event names another account.
        let foreign = request.event.account != request.account;
        let backup = foreign.then(|| a.clone());
        let mut booked = request.clone();
        booked.event.account = request.account.clone();
        let expected = a.settle(&booked, now);
        let got = self.store.settle(request.clone(), now).await;
        if let (Some(backup), Err(StoreError::Invalid(_))) = (backup, &got) {
            *a = backup;
            bump!(self, invalid);
            return;
        }
        match expected {
            Err(k) => {
                self.check.reply(&label, Err(k), got);
                match k {
                    ErrKind::Conflict => bump!(self, settle_conflicts),
                    ErrKind::NotFound => bump!(self, not_found),
                    ErrKind::Invalid => bump!(self, invalid),
                };
            }
            Ok((mut event, fresh)) => {
                let got = self.check.reply(&label, Ok(()), got).expect("ok");
                if fresh {
                    self.check.ensure(got.seq > a.last_seq, &label, || {
                        format!("event seq {} is not after the account's last {}", got.seq, a.last_seq)
                    });
                    event.seq = got.seq;
                }
                self.check.same(&label, "settled event", &event, &got);
                if fresh {
                    bump!(self, settles);
                    if event.overshoot > Nanos::ZERO {
                        bump!(self, overshoots);
                    }
                    a.holds.get_mut(&request.hold_id).expect("settled hold").settle = Some(request.clone());
                    a.remember_event(request.event.fingerprint.clone(), event, None);
                } else {
                    bump!(self, settles_replayed);
                }
            }
        }
    }

    /// A batch of direct events: new ones, repeats (same content), conflicting repeats, bad keys.
    async fn op_record(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str, repeat: bool) {
        let size = if rng.chance(80) { 1 } else { rng.range(2, 4) as usize };
        let mut batch: Vec<NewEvent> = Vec::with_capacity(size);
        for slot in 0..size {
            let roll = if repeat && slot == 0 { rng.range(0, 9) } else { rng.range(0, 99) };
            if roll < 7 && !a.direct_ids.is_empty() {
                let id = rng.pick(&a.direct_ids).clone();
                let mut e = a.events[&id].request.clone().expect("direct events keep their request");
                if roll < 2 {
                    e.cost = Nanos(e.cost.0 + 1);
                    e.fingerprint = event_fingerprint(&e);
                }
                batch.push(e);
                continue;
            }
            if roll < 9 && !batch.is_empty() {
                batch.push(batch[0].clone());
                continue;
            }
            let id = if roll < 11 && !a.open.is_empty() {
                // Takes an open hold's id: its settle must then pick another event id, and its
                // expiry names its event after the hold.
                let n = rng.below(a.open.len() as u64) as usize;
                a.open.iter().nth(n).expect("in range").clone()
            } else {
                a.fresh_id("e")
            };
            let cost = match rng.below(100) {
                0 => -rng.range(1, USD),
                1..=2 => 0,
                3..=6 => rng.range(20 * USD, 60 * USD),
                _ => money(rng),
            };
            let delay_s = match rng.below(100) {
                0..=69 => rng.range(0, 60),
                70..=89 => rng.range(0, 3 * 86_400),
                _ => rng.range(0, 40 * 86_400),
            };
            let timestamp = now - Duration::seconds(delay_s) - Duration::microseconds(rng.range(0, 999_999));
            let key = self.pick_key(rng, a);
            let pool = pick_pool(rng);
            batch.push(new_event(rng, &a.id, id, pool, key, cost, timestamp));
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        let label = format!("{label}: record events {ids:?}");
        // First pass: would the store refuse the batch? Conflicts, foreign keys and negative
        // costs fail it whole, in the order the events come.
        let mut refusal = None;
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for e in &batch {
            let earlier =
                a.events.get(&e.id).map(|m| m.fingerprint.as_str()).or_else(|| seen.get(e.id.as_str()).copied());
            match earlier {
                Some(fp) if fp == e.fingerprint => continue,
                Some(_) => {
                    refusal = Some(ErrKind::Conflict);
                    break;
                }
                None => {}
            }
            if e.key.as_ref().is_some_and(|k| a.key_cap(k).is_none()) || e.cost.0 < 0 {
                refusal = Some(ErrKind::Invalid);
                break;
            }
            seen.insert(&e.id, &e.fingerprint);
        }
        if let Some(k) = refusal {
            let got = self.store.record_events(batch.clone(), now).await;
            self.check.reply(&label, Err(k), got);
            bump!(self, event_batches_refused);
            if k == ErrKind::Invalid {
                bump!(self, invalid);
            }
            return;
        }
        let mut planned = Vec::with_capacity(batch.len());
        let mut in_batch: BTreeMap<String, usize> = BTreeMap::new();
        for (i, e) in batch.iter().enumerate() {
            if let Some(m) = a.events.get(&e.id) {
                planned.push(Planned::Repeat(Box::new(m.event.clone())));
            } else if let Some(&j) = in_batch.get(&e.id) {
                planned.push(Planned::RepeatInBatch(j));
            } else {
                let event = a.book_event(e, now);
                if event.cycle_start < a.anchor.cycle_at(now).start {
                    bump!(self, late_events);
                }
                in_batch.insert(e.id.clone(), i);
                planned.push(Planned::New(Box::new((event, e.clone()))));
            }
        }
        let got = self.check.reply(&label, Ok(()), self.store.record_events(batch, now).await).expect("ok");
        self.check.ensure(got.len() == planned.len(), &label, || {
            format!("{} outcomes for {} events", got.len(), planned.len())
        });
        let mut resolved: Vec<Event> = Vec::with_capacity(planned.len());
        for (plan, outcome) in planned.into_iter().zip(&got) {
            let expected = match plan {
                Planned::New(planned) => {
                    let (mut event, request) = *planned;
                    let fingerprint = request.fingerprint.clone();
                    self.check.ensure(outcome.event().seq > a.last_seq, &label, || {
                        format!("event seq {} is not after the account's last {}", outcome.event().seq, a.last_seq)
                    });
                    event.seq = outcome.event().seq;
                    a.remember_event(fingerprint, event.clone(), Some(request));
                    bump!(self, events_recorded);
                    EventOutcome::Recorded(event)
                }
                Planned::Repeat(event) => {
                    bump!(self, events_duplicate);
                    EventOutcome::Duplicate(*event)
                }
                Planned::RepeatInBatch(j) => {
                    bump!(self, events_duplicate);
                    EventOutcome::Duplicate(resolved[j].clone())
                }
            };
            resolved.push(expected.event().clone());
            self.check.same(&label, "event outcome", &expected, outcome);
        }
    }

    async fn op_top_up(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        let pool = pick_pool(rng);
        let amount = match rng.below(100) {
            0..=2 => 0,
            3..=4 => -rng.range(1, USD),
            _ => rng.range(USD / 2, 10 * USD),
        };
        let note = if rng.chance(50) { Some(format!("top-up {}", rng.below(1_000))) } else { None };
        let label = format!("{label}: top up {pool} by {amount}");
        let got = self
            .store
            .add_grant(NewGrant { account: a.id.clone(), pool, amount: Nanos(amount), note: note.clone() }, now)
            .await;
        if amount <= 0 {
            self.check.reply(&label, Err(ErrKind::Invalid), got);
            bump!(self, invalid);
            return;
        }
        let got = self.check.reply(&label, Ok(()), got).expect("ok");
        let cycle = a.anchor.cycle_at(now);
        let expected = Grant {
            id: got.id,
            account: a.id.clone(),
            pool,
            kind: GrantKind::TopUp,
            amount: Nanos(amount),
            cycle_start: cycle.start,
            expires_at: cycle.end,
            note,
            created_at: now,
        };
        self.check.same(&label, "grant", &expected, &got);
        a.pool_entry(pool, cycle).top_ups.push(expected);
        bump!(self, grants_added);
    }

    /// A balance at some time (now, an earlier or a later cycle) and one hold as it is now.
    async fn op_read(&self, rng: &mut Rng, a: &mut AccountModel, now: DateTime<Utc>, label: &str) {
        let t = match rng.below(10) {
            0..=6 => now,
            7..=8 => now - Duration::seconds(rng.range(0, 60 * 86_400)),
            _ => now + Duration::seconds(rng.range(0, 40 * 86_400)),
        };
        self.check_balance(a, t, &format!("{label}: balance at {}", t.to_rfc3339())).await;
        let id = self.pick_hold(rng, a);
        let expected = a.holds.get(&id).map(|h| h.hold.clone());
        let got = self.store.hold_by_id(&a.id, &id).await;
        self.compare(&format!("{label}: hold {id}"), &Ok(expected), &got);
        bump!(self, reads_checked);
    }

    async fn check_balance(&self, a: &AccountModel, t: DateTime<Utc>, label: &str) {
        let got = self.check.ok(label, self.store.balance(&a.id, t).await);
        self.check.same(label, "balance", &a.balance(t), &got);
    }

    async fn check_grants(&self, a: &AccountModel, t: DateTime<Utc>, label: &str) {
        let got = self.check.ok(label, self.store.grants(&a.id, t).await);
        self.check
            .ensure(got.windows(2).all(|w| w[0].id < w[1].id), label, || format!("grants not in id order: {got:#?}"));
        for (i, mut expected) in a.grants_at(t).into_iter().enumerate() {
            let mine: Vec<Grant> = got.iter().filter(|g| pool_index(g.pool) == i).cloned().collect();
            if let (Some(e), Some(g)) = (expected.first_mut(), mine.first()) {
                e.id = g.id;
            }
            self.check.same(label, &format!("grants of {}", POOLS[i]), &expected, &mine);
        }
        bump!(self, reads_checked);
    }

    /// Changes a policy: `block` pools only loosen (a lowered limit would break the audit's
    /// "charged through holds + held ≤ limit" for what was admitted before); other pools take any
    /// non-blocking policy, which may put them under what they already spent.
    async fn op_policy(&self, rng: &mut Rng, a: &mut AccountModel, label: &str) {
        let pool = pick_pool(rng);
        let old = a.policies[pool_index(pool)];
        let cap = |rng: &mut Rng| if rng.chance(50) { Some(Nanos(rng.range(USD, 30 * USD))) } else { None };
        let new = match old.on_exhausted {
            OnExhausted::Block => PoolPolicy {
                spend_cap: match old.spend_cap {
                    Some(c) if rng.chance(50) => Some(Nanos(c.0 + rng.range(1, 5 * USD))),
                    _ => None,
                },
                ..old
            },
            OnExhausted::Payg | OnExhausted::Alert => PoolPolicy {
                on_exhausted: if rng.chance(50) { OnExhausted::Payg } else { OnExhausted::Alert },
                overage_cap: cap(rng),
                spend_cap: cap(rng),
            },
        };
        let label = format!("{label}: policy of {pool} {old:?} -> {new:?}");
        self.check.ok(&label, self.store.set_policy(&a.id, pool, new).await);
        a.policies[pool_index(pool)] = new;
        let got = self.check.ok(&label, self.store.policy(&a.id, pool).await);
        self.check.same(&label, "policy", &new, &got);
        bump!(self, policy_changes);
    }

    /// A filtered page of events against the model's.
    async fn op_events(&self, rng: &mut Rng, a: &mut AccountModel, label: &str) {
        let mut q = EventQuery { account: a.id.clone(), limit: rng.range(1, 60) as usize, ..EventQuery::default() };
        if rng.chance(50) {
            q.pool = Some(pick_pool(rng));
        }
        if rng.chance(30) {
            q.model = Some(rng.pick(&MODELS).to_string());
        }
        let base = start_time() + Duration::seconds(rng.range(-40 * 86_400, 120 * 86_400));
        if rng.chance(50) {
            q.since = Some(base);
        }
        if rng.chance(50) {
            q.until = Some(base + Duration::seconds(rng.range(0, 60 * 86_400)));
        }
        if rng.chance(50) && a.last_seq > 0 {
            q.after_seq = Some(rng.range(0, a.last_seq));
        }
        let label = format!("{label}: events {q:?}");
        let mut expected: Vec<Event> = a
            .events
            .values()
            .map(|m| m.event.clone())
            .filter(|e| {
                q.pool.is_none_or(|p| e.pool == p)
                    && q.model.as_ref().is_none_or(|m| &e.model == m)
                    && q.since.is_none_or(|t| e.timestamp >= t)
                    && q.until.is_none_or(|t| e.timestamp < t)
                    && q.after_seq.is_none_or(|s| e.seq > s)
            })
            .collect();
        expected.sort_by_key(|e| e.seq);
        expected.truncate(q.limit);
        let got = self.check.ok(&label, self.store.events(q).await);
        self.check.same(&label, "events", &expected, &got);
        bump!(self, reads_checked);
    }

    /// Operations on an account that does not exist.
    async fn unknown_account(&self, rng: &mut Rng, label: &str) {
        let now = self.now();
        let id = format!("nobody-{}", rng.below(1_000));
        let label = format!("{label}: on {id}");
        let pool = pick_pool(rng);
        match rng.below(5) {
            0 => {
                let mut request = HoldRequest {
                    account: id.clone(),
                    id: "h1".into(),
                    pool,
                    key: None,
                    amount: Nanos(USD),
                    ttl_s: 600,
                    model: None,
                    source: None,
                    fingerprint: String::new(),
                    made_by: tollgate_store::Maker::Admin,
                };
                request.fingerprint = hold_fingerprint(&request);
                self.check.reply(&label, Err(ErrKind::NotFound), self.store.hold(request, now).await);
            }
            1 => {
                let e = NewEvent {
                    id: "e1".into(),
                    account: id.clone(),
                    pool,
                    model: MODELS[0].into(),
                    usage: Usage::default(),
                    cost: Nanos(USD),
                    service_tier: None,
                    inference_geo: None,
                    speed: None,
                    source: None,
                    key: None,
                    labels: BTreeMap::new(),
                    timestamp: now,
                    latency_ms: None,
                    ttft_ms: None,
                    partial: false,
                    estimated: false,
                    fingerprint: "f".into(),
                };
                self.check.reply(&label, Err(ErrKind::NotFound), self.store.record_events(vec![e], now).await);
            }
            2 => {
                self.check.reply(&label, Err(ErrKind::NotFound), self.store.balance(&id, now).await);
            }
            3 => {
                let grant = NewGrant { account: id.clone(), pool, amount: Nanos(USD), note: None };
                self.check.reply(&label, Err(ErrKind::NotFound), self.store.add_grant(grant, now).await);
            }
            _ => {
                self.check.reply(&label, Err(ErrKind::NotFound), self.store.void(&id, "h1", now).await);
            }
        }
        bump!(self, not_found);
    }

    /// Expires the holds past their time to live (or, `all`, every open hold, as at start after
    /// a crash). Touches every account, so it runs alone.
    async fn sweep(&self, all: bool, label: &str) {
        let _alone = self.gate.write().await;
        let mut guards = Vec::with_capacity(self.accounts.len());
        for account in &self.accounts {
            guards.push(account.lock().await);
        }
        let now = self.now();
        let label = format!("{label} at {}", now.to_rfc3339());
        let mut due: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, a) in guards.iter().enumerate() {
            for id in &a.open {
                if all || a.holds[id].hold.expires_at <= now {
                    due.insert((a.id.clone(), id.clone()), i);
                }
            }
        }
        let got = if all { self.store.recover_open_holds(now).await } else { self.store.expire_holds(now).await };
        let got = self.check.ok(&label, got);
        self.check.ensure(got.len() == due.len(), &label, || {
            format!("{} holds should expire ({:?}), the store expired {}: {got:#?}", due.len(), due.keys(), got.len())
        });
        // Within one pool the order of expiry is the store's: check what does not depend on it
        // per event, and the grant/overage totals per pool.
        let mut totals: BTreeMap<(usize, usize, i64), (i64, i64)> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for e in &got {
            let hold_id = e.hold_id.clone().unwrap_or_default();
            let Some(&i) = due.get(&(e.account.clone(), hold_id.clone())) else {
                self.check.fail(&label, format!("expired a hold that should not expire: {e:#?}"))
            };
            self.check.ensure(seen.insert((i, hold_id.clone())), &label, || format!("expired twice: {e:#?}"));
            let a = &guards[i];
            let h = &a.holds[&hold_id].hold;
            let id = if a.events.contains_key(&hold_id) { format!("{hold_id}#unsettled") } else { hold_id.clone() };
            let expected = Event {
                seq: e.seq,
                id,
                account: a.id.clone(),
                pool: h.pool,
                model: h.model.clone().unwrap_or_else(|| "unknown".to_string()),
                usage: Usage::default(),
                cost: h.amount,
                grant_part: e.grant_part,
                overage_part: e.overage_part,
                overshoot: Nanos::ZERO,
                service_tier: None,
                inference_geo: None,
                speed: None,
                source: h.source.clone(),
                key: h.key.clone(),
                labels: BTreeMap::new(),
                timestamp: h.created_at,
                cycle_start: h.cycle_start,
                hold_id: Some(hold_id.clone()),
                latency_ms: None,
                ttft_ms: None,
                partial: false,
                estimated: false,
                unsettled: true,
                recorded_at: now,
            };
            self.check.same(&label, "expired hold's event", &expected, e);
            self.check.ensure(
                e.grant_part.0 >= 0 && e.overage_part.0 >= 0 && e.grant_part.0 + e.overage_part.0 == h.amount.0,
                &label,
                || format!("an expired hold is charged exactly its amount {}: {e:#?}", h.amount.0),
            );
            self.check.ensure(e.seq > a.last_seq, &label, || format!("event seq {} not after {}", e.seq, a.last_seq));
            let t = totals.entry((i, pool_index(h.pool), us(h.cycle_start))).or_default();
            t.0 += h.amount.0;
            t.1 += e.grant_part.0;
        }
        for (&(i, p, start), &(amount, from_grants)) in &totals {
            let pool = &guards[i].pools[&(p, start)];
            let expected = amount.min((pool.grants() - pool.used).max(0));
            self.check.ensure(from_grants == expected, &label, || {
                format!(
                    "account {} pool {} cycle {}: expired holds of {amount} took {from_grants} from grants, the rest of \
                     the grants was {}",
                    guards[i].id,
                    POOLS[p],
                    time_of(start).to_rfc3339(),
                    pool.grants() - pool.used
                )
            });
        }
        for e in got {
            let i = due[&(e.account.clone(), e.hold_id.clone().unwrap_or_default())];
            let a = &mut guards[i];
            let hold_id = e.hold_id.clone().expect("an expired hold's event names it");
            // Expiry charges the held amount as it is (multiplier 1).
            let (g, o) = a.charge_hold(&hold_id, e.cost.0, 1_000_000);
            debug_assert_eq!(g + o, e.cost.0);
            let h = a.holds.get_mut(&hold_id).expect("hold exists");
            h.hold.state = HoldState::Expired;
            h.event_id = Some(e.id.clone());
            a.open.remove(&hold_id);
            a.remember_event(format!("unsettled:{hold_id}"), e, None);
            bump!(self, holds_expired);
        }
        if all {
            bump!(self, recoveries);
        } else {
            bump!(self, sweeps);
        }
    }

    /// After the workload: every balance, grant list and event against the model, then the audit.
    async fn verify(&self, label: &str) -> u64 {
        let mut events_total = 0;
        for account in &self.accounts {
            let a = account.lock().await;
            let label = format!("{label}: account {}", a.id);
            let mut cycles: BTreeMap<i64, Cycle> = a.pools.values().map(|p| (us(p.cycle.start), p.cycle)).collect();
            for t in [start_time() - Duration::days(45), self.now() + Duration::days(45)] {
                let c = a.anchor.cycle_at(t);
                cycles.insert(us(c.start), c);
            }
            for c in cycles.values() {
                let mid = c.start + (c.end - c.start) / 2;
                for t in [c.start, mid, c.end - Duration::microseconds(1)] {
                    self.check_balance(&a, t, &format!("{label}: balance at {}", t.to_rfc3339())).await;
                }
                self.check_grants(&a, mid, &format!("{label}: grants of cycle {}", c.start.to_rfc3339())).await;
            }
            // Every event, paged.
            let mut got: Vec<Event> = Vec::new();
            loop {
                let q = EventQuery {
                    account: a.id.clone(),
                    after_seq: got.last().map(|e| e.seq),
                    limit: 97,
                    ..EventQuery::default()
                };
                let page = self.check.ok(&label, self.store.events(q).await);
                let done = page.len() < 97;
                got.extend(page);
                if done {
                    break;
                }
            }
            let mut expected: Vec<Event> = a.events.values().map(|m| m.event.clone()).collect();
            expected.sort_by_key(|e| e.seq);
            self.check.same(&label, "every event", &expected, &got);
            let mut sums: BTreeMap<(usize, i64), (i64, i64)> = BTreeMap::new();
            for e in &got {
                let s = sums.entry((pool_index(e.pool), us(e.cycle_start))).or_default();
                s.0 += e.grant_part.0;
                s.1 += e.overage_part.0;
            }
            for (k, p) in &a.pools {
                let s = sums.remove(k).unwrap_or_default();
                self.check.same(
                    &label,
                    &format!("Σ events of {} cycle {}", POOLS[k.0], p.cycle.start),
                    &(p.used, p.overage),
                    &s,
                );
            }
            self.check.ensure(sums.is_empty(), &label, || format!("events booked in cycles without state: {sums:?}"));
            // Events by time window, cycle by cycle.
            for c in cycles.values() {
                let q = EventQuery {
                    account: a.id.clone(),
                    since: Some(c.start),
                    until: Some(c.end),
                    limit: 10_000,
                    ..EventQuery::default()
                };
                let got = self.check.ok(&label, self.store.events(q).await);
                let window: Vec<Event> =
                    expected.iter().filter(|e| e.timestamp >= c.start && e.timestamp < c.end).cloned().collect();
                self.check.same(&label, &format!("events with timestamps in {}", c.start), &window, &got);
            }
            events_total += got.len() as u64;
        }
        events_total
    }
}

// ---------------------------------------------------------------------------------------------
// Setup.

/// The SPEC's built-in tiers: (id, interactive USD, programmatic USD).
const BUILTIN_TIERS: [(&str, i64, i64); 4] =
    [("pro", 40, 20), ("team-standard", 100, 50), ("max-20x", 500, 200), ("enterprise", 0, 0)];

/// Tiers of our own: a PAYG multiplier of 1.5 (halves round up) and an odd one.
fn custom_tiers() -> Vec<Tier> {
    vec![
        Tier {
            id: "sim-x1.5".into(),
            interactive: Nanos(8 * USD),
            programmatic: Nanos(5 * USD),
            monthly_price: Some(Nanos(30 * USD)),
            payg_multiplier_ppm: 1_500_000,
        },
        Tier {
            id: "sim-x1.25".into(),
            interactive: Nanos(3 * USD),
            programmatic: Nanos(2 * USD),
            monthly_price: None,
            payg_multiplier_ppm: 1_250_001,
        },
    ]
}

async fn setup_tiers(store: &Arc<dyn Store>, check: &Checker) -> BTreeMap<String, (i64, i64, u64)> {
    for tier in custom_tiers() {
        check.ok("put_tier", store.put_tier(tier).await);
    }
    let got = check.ok("tiers", store.tiers().await);
    let mut tiers = BTreeMap::new();
    for (id, interactive, programmatic) in BUILTIN_TIERS {
        tiers.insert(id.to_string(), (interactive * USD, programmatic * USD, 1_000_000));
    }
    for t in custom_tiers() {
        tiers.insert(t.id.clone(), (t.interactive.0, t.programmatic.0, t.payg_multiplier_ppm));
    }
    for (id, want) in &tiers {
        let t = got.iter().find(|t| &t.id == id).unwrap_or_else(|| check.fail("tiers", format!("tier {id} missing")));
        check.same("tiers", id, want, &(t.interactive.0, t.programmatic.0, t.payg_multiplier_ppm));
    }
    tiers
}

/// One main-workload account: tier, grant overrides, anchor day, policies.
struct AccountPlan {
    id: &'static str,
    tier: &'static str,
    grants: (Option<i64>, Option<i64>),
    day: u32,
    /// None: the default policy (never set).
    policies: [Option<PoolPolicy>; 2],
}

fn policy(on_exhausted: OnExhausted, overage_cap_usd: Option<i64>, spend_cap_usd: Option<i64>) -> Option<PoolPolicy> {
    Some(PoolPolicy {
        on_exhausted,
        overage_cap: overage_cap_usd.map(|u| Nanos(u * USD)),
        spend_cap: spend_cap_usd.map(|u| Nanos(u * USD)),
    })
}

fn account_plans(rng: &mut Rng) -> Vec<AccountPlan> {
    use OnExhausted::{Alert, Block, Payg};
    let mut day = || 1 + rng.below(28) as u32;
    vec![
        AccountPlan {
            id: "pro",
            tier: "pro",
            grants: (None, None),
            day: day(),
            policies: [None, policy(Block, None, Some(15))],
        },
        AccountPlan {
            id: "team",
            tier: "team-standard",
            grants: (None, None),
            day: day(),
            policies: [policy(Payg, Some(10), None), policy(Payg, None, None)],
        },
        AccountPlan {
            id: "ent",
            tier: "enterprise",
            grants: (Some(6 * USD), Some(4 * USD)),
            day: 29 + (day() % 2),
            policies: [policy(Alert, None, Some(12)), policy(Alert, None, None)],
        },
        AccountPlan {
            id: "x15",
            tier: "sim-x1.5",
            grants: (None, None),
            day: day(),
            policies: [policy(Payg, Some(6), Some(12)), policy(Block, None, None)],
        },
        AccountPlan {
            id: "x125",
            tier: "sim-x1.25",
            grants: (None, None),
            day: day(),
            policies: [policy(Payg, Some(5), None), policy(Alert, None, Some(4))],
        },
        AccountPlan {
            id: "ent0",
            tier: "enterprise",
            grants: (Some(2 * USD), None),
            day: day(),
            policies: [policy(Payg, None, Some(3)), policy(Block, None, None)],
        },
        AccountPlan {
            id: "eom",
            tier: "pro",
            grants: (None, None),
            day: 31,
            policies: [policy(Block, None, Some(25)), policy(Payg, Some(5), Some(22))],
        },
        AccountPlan { id: "max", tier: "max-20x", grants: (None, None), day: day(), policies: [None, None] },
    ]
}

async fn setup_account(
    store: &Arc<dyn Store>,
    check: &Checker,
    tiers: &BTreeMap<String, (i64, i64, u64)>,
    plan: &AccountPlan,
    rng: &mut Rng,
    now: DateTime<Utc>,
) -> AccountModel {
    let anchor = Anchor { year: 2025, month: 12, day: plan.day };
    let op = format!("setup account {}", plan.id);
    let new = NewAccount {
        id: plan.id.to_string(),
        tier: plan.tier.to_string(),
        anchor: Some(anchor.instant()),
        timezone: chrono_tz::UTC,
        interactive_grant: plan.grants.0.map(Nanos),
        programmatic_grant: plan.grants.1.map(Nanos),
    };
    let got = check.ok(&op, store.create_account(new.clone(), now).await);
    let expected = Account {
        id: new.id.clone(),
        tier: new.tier.clone(),
        anchor: anchor.instant(),
        timezone: chrono_tz::UTC,
        interactive_grant: new.interactive_grant,
        programmatic_grant: new.programmatic_grant,
        created_at: now,
    };
    check.same(&op, "account", &expected, &got);
    check.reply(&op, Err(ErrKind::Conflict), store.create_account(new, now).await);
    let mut policies = [PoolPolicy::default(); 2];
    for (i, p) in plan.policies.iter().enumerate() {
        if let Some(p) = p {
            check.ok(&op, store.set_policy(plan.id, POOLS[i], *p).await);
            policies[i] = *p;
        }
        check.same(&op, "policy", &policies[i], &check.ok(&op, store.policy(plan.id, POOLS[i]).await));
    }
    let (interactive, programmatic, multiplier_ppm) = tiers[plan.tier];
    let caps = [None, Some(5 * USD), Some(rng.range(USD / 2, 2 * USD))];
    let mut keys = Vec::new();
    for (n, cap) in caps.into_iter().enumerate() {
        let new = NewKey {
            id: format!("{}-k{n}", plan.id),
            account: plan.id.to_string(),
            secret_hash: format!("sim-secret-{}-{n}", plan.id),
            name: Some(format!("key {n}")),
            pool: if n == 0 { KeyPool::Auto } else { KeyPool::Fixed(POOLS[n % 2]) },
            labels: BTreeMap::from([("owner".to_string(), format!("o{n}"))]),
            cap: cap.map(Nanos),
        };
        let got = check.ok(&op, store.create_key(new.clone(), now).await);
        let expected = Key {
            id: new.id.clone(),
            account: new.account.clone(),
            name: new.name.clone(),
            pool: new.pool,
            labels: new.labels.clone(),
            cap: new.cap,
            created_at: now,
            revoked_at: None,
        };
        check.same(&op, "key", &expected, &got);
        keys.push((new.id, cap));
    }
    AccountModel {
        id: plan.id.to_string(),
        tier: plan.tier.to_string(),
        multiplier_ppm,
        anchor,
        tier_grants: [plan.grants.0.unwrap_or(interactive), plan.grants.1.unwrap_or(programmatic)],
        policies,
        pools: BTreeMap::new(),
        keys,
        key_cycles: BTreeMap::new(),
        holds: BTreeMap::new(),
        hold_ids: Vec::new(),
        open: BTreeSet::new(),
        events: BTreeMap::new(),
        event_ids: Vec::new(),
        direct_ids: Vec::new(),
        last_seq: 0,
        next_id: 0,
    }
}

/// Runs the simulation for one seed on a fresh, empty store and returns what it did. Panics,
/// naming the seed and the operation, at the first reply that differs from the model.
pub async fn run(store: Arc<dyn Store>, config: Config) -> Report {
    let check = Checker::new(config.seed);
    let mut rng = Rng::new(config.seed);
    let tiers = setup_tiers(&store, &check).await;

    let races = races::run(&store, &check, &mut rng.fork(), config.race_tasks).await;

    let start = start_time();
    let mut accounts = Vec::new();
    let mut key_owner = BTreeMap::new();
    for plan in account_plans(&mut rng) {
        let a = setup_account(&store, &check, &tiers, &plan, &mut rng, start).await;
        for (k, _) in &a.keys {
            key_owner.insert(k.clone(), a.id.clone());
        }
        accounts.push(Mutex::new(a));
    }
    let sim = Arc::new(Sim {
        check,
        store: store.clone(),
        clock_us: AtomicI64::new(us(start)),
        gate: RwLock::new(()),
        accounts,
        key_owner,
        stats: Stats::default(),
        next_op: AtomicU64::new(0),
    });

    let tasks = config.tasks.max(1);
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let ops = config.ops / tasks + usize::from(t < config.ops % tasks);
        handles.push(tokio::spawn(sim.clone().task(t, rng.fork(), ops)));
    }
    let mut panicked = None;
    for h in handles {
        if let Err(e) = h.await
            && panicked.is_none()
        {
            panicked = Some(e);
        }
    }
    if let Some(e) = panicked {
        let first = sim.check.first_failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match first {
            Some(message) => panic!("{message}"),
            None => std::panic::resume_unwind(e.into_panic()),
        }
    }

    // Whatever is still open is recovered as at a restart, then everything is compared.
    sim.sweep(true, "final recovery").await;
    let events_main = sim.verify("after the workload").await;
    let audit = sim.check.ok("audit", store.audit().await);
    sim.check.ensure(audit.breaches.is_empty(), "audit", || format!("breaches: {:#?}", audit.breaches));
    sim.check.same("audit", "open holds", &0, &audit.holds_open);
    sim.check.same("audit", "events checked", &(events_main + races.events), &audit.events_checked);

    sim.stats.race_holds.store(races.holds, Ordering::Relaxed);
    let end = sim.now();
    let first = Anchor { year: 2025, month: 12, day: 1 };
    let report = sim.stats.report(
        config.seed,
        (end - start).num_days(),
        first.cycle_at(end).index - first.cycle_at(start).index,
    );
    for (name, value) in report.counters() {
        if COVERAGE.contains(&name) && value == 0 {
            sim.check.fail("coverage", format!("the workload never produced {name}: {report}"));
        }
    }
    sim.check.ensure(report.cycles_crossed >= 2, "coverage", || format!("the clock crossed too few cycles: {report}"));
    report
}

// ---------------------------------------------------------------------------------------------
// Races: many tasks at one pool at once. The store's order is unknown, so the checks are the
// outcome invariants that hold whatever the order.

mod races {
    use super::*;

    /// What the races left in the store.
    #[derive(Default)]
    pub(super) struct Totals {
        pub events: u64,
        pub holds: u64,
    }

    pub(super) async fn run(store: &Arc<dyn Store>, check: &Checker, rng: &mut Rng, tasks: usize) -> Totals {
        // The races run before the main workload's clock starts, at an odd time of day.
        let now = start_time() - Duration::days(3) + Duration::minutes(13 * 60 + 17);
        let tasks = tasks.max(2);
        let mut totals = Totals::default();
        exact_fit(store, check, rng, tasks, now, &mut totals).await;
        key_cap(store, check, rng, tasks, now, &mut totals).await;
        churn(store, check, rng, tasks, now, &mut totals).await;
        repeats(store, check, rng, tasks, now, &mut totals).await;
        reads(store, check, tasks, now).await;
        let audit = check.ok("races: audit", store.audit().await);
        check.ensure(audit.breaches.is_empty(), "races: audit", || format!("breaches: {:#?}", audit.breaches));
        check.same("races: audit", "open holds", &0, &audit.holds_open);
        check.same("races: audit", "events", &totals.events, &audit.events_checked);
        totals
    }

    /// A race account: enterprise, its programmatic pool granted `grant` under `policy`, with the
    /// default anchor (its creation day at 00:00 UTC).
    async fn account(
        store: &Arc<dyn Store>,
        check: &Checker,
        id: &str,
        grant: i64,
        policy: PoolPolicy,
        now: DateTime<Utc>,
    ) {
        let op = format!("races: create {id}");
        let new = NewAccount {
            id: id.to_string(),
            tier: "enterprise".into(),
            anchor: None,
            timezone: chrono_tz::UTC,
            interactive_grant: None,
            programmatic_grant: Some(Nanos(grant)),
        };
        let got = check.ok(&op, store.create_account(new, now).await);
        check.same(&op, "default anchor", &utc_midnight(now.year(), now.month(), now.day()), &got.anchor);
        check.ok(&op, store.set_policy(id, PoolKind::Programmatic, policy).await);
    }

    async fn add_key(
        store: &Arc<dyn Store>,
        check: &Checker,
        account: &str,
        id: &str,
        cap: Option<i64>,
        now: DateTime<Utc>,
    ) {
        let new = NewKey {
            id: id.to_string(),
            account: account.to_string(),
            secret_hash: format!("race-secret-{id}"),
            name: None,
            pool: KeyPool::Fixed(PoolKind::Programmatic),
            labels: BTreeMap::new(),
            cap: cap.map(Nanos),
        };
        check.ok(&format!("races: key {id}"), store.create_key(new, now).await);
    }

    fn hold_request(account: &str, id: String, key: Option<String>, amount: i64) -> HoldRequest {
        let mut r = HoldRequest {
            account: account.to_string(),
            id,
            pool: PoolKind::Programmatic,
            key,
            amount: Nanos(amount),
            ttl_s: 3_600,
            model: Some(MODELS[1].to_string()),
            source: None,
            fingerprint: String::new(),
            made_by: tollgate_store::Maker::Admin,
        };
        r.fingerprint = hold_fingerprint(&r);
        r
    }

    fn settle_request(account: &str, hold_id: &str, cost: i64, now: DateTime<Utc>) -> SettleRequest {
        let mut event = NewEvent {
            id: hold_id.to_string(),
            account: account.to_string(),
            pool: PoolKind::Programmatic,
            model: MODELS[1].to_string(),
            usage: Usage { input_tokens: 10, output_tokens: 20, ..Usage::default() },
            cost: Nanos(cost),
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: Some("race".into()),
            key: None,
            labels: BTreeMap::new(),
            timestamp: now,
            latency_ms: Some(5),
            ttft_ms: None,
            partial: false,
            estimated: false,
            fingerprint: String::new(),
        };
        event.fingerprint = event_fingerprint(&event);
        SettleRequest { account: account.to_string(), hold_id: hold_id.to_string(), event }
    }

    async fn programmatic(store: &Arc<dyn Store>, check: &Checker, account: &str, now: DateTime<Utc>) -> PoolBalance {
        check.ok(&format!("races: balance of {account}"), store.balance(account, now).await).pools[1].clone()
    }

    async fn all_events(store: &Arc<dyn Store>, check: &Checker, account: &str) -> Vec<Event> {
        let q = EventQuery { account: account.to_string(), limit: 10_000, ..EventQuery::default() };
        check.ok(&format!("races: events of {account}"), store.events(q).await)
    }

    /// Runs `attempts` of each task concurrently and returns every (request, reply).
    async fn concurrent_holds(
        store: &Arc<dyn Store>,
        batches: Vec<Vec<HoldRequest>>,
        now: DateTime<Utc>,
    ) -> Vec<(HoldRequest, StoreResult<HoldOutcome>)> {
        let handles: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut out = Vec::with_capacity(batch.len());
                    for r in batch {
                        let got = store.hold(r.clone(), now).await;
                        out.push((r, got));
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("a race task does not panic"));
        }
        all
    }

    /// Equal holds on one pool whose limit is exactly `k` of them, under every policy that has
    /// a limit: exactly `k` are admitted, each sees a different remaining, every refusal sees 0.
    async fn exact_fit(
        store: &Arc<dyn Store>,
        check: &Checker,
        rng: &mut Rng,
        tasks: usize,
        now: DateTime<Utc>,
        totals: &mut Totals,
    ) {
        for variant in ["block", "block-spend-cap", "payg", "alert"] {
            let a = rng.range(1_000_003, 90_000_000);
            let k = rng.range(12, 40);
            let limit = a * k;
            let (grant, policy) = match variant {
                "block" => (limit, PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None }),
                "block-spend-cap" => (
                    limit + rng.range(1, 3 * a),
                    PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: Some(Nanos(limit)) },
                ),
                "payg" => {
                    let g = limit / 3 + 17;
                    (
                        g,
                        PoolPolicy {
                            on_exhausted: OnExhausted::Payg,
                            overage_cap: Some(Nanos(limit - g)),
                            spend_cap: None,
                        },
                    )
                }
                _ => (
                    rng.range(0, limit - 1),
                    PoolPolicy { on_exhausted: OnExhausted::Alert, overage_cap: None, spend_cap: Some(Nanos(limit)) },
                ),
            };
            let id = format!("race-fit-{variant}");
            let op = format!("races: {k} holds of {a} fit {id} (grant {grant}, {policy:?})");
            account(store, check, &id, grant, policy, now).await;
            let batches: Vec<Vec<HoldRequest>> =
                (0..tasks).map(|t| (0..3).map(|j| hold_request(&id, format!("t{t}-{j}"), None, a)).collect()).collect();
            let outcomes = concurrent_holds(store, batches, now).await;
            totals.holds += outcomes.len() as u64;
            let mut admitted = Vec::new();
            for (r, got) in outcomes {
                match got {
                    Ok(HoldOutcome::Held(h)) => admitted.push(h),
                    Ok(HoldOutcome::Refused { refusal: Refusal::PoolExhausted { limit: l, remaining }, .. })
                        if l.0 == limit && remaining.0 == 0 => {}
                    other => check.fail(&op, format!("hold {} got {other:?}", r.id)),
                }
            }
            check.same(&op, "holds admitted", &(k as usize), &admitted.len());
            let mut seen: Vec<Option<i64>> = admitted.iter().map(|h| h.remaining_after.map(|n| n.0)).collect();
            seen.sort();
            let expected: Vec<Option<i64>> = (0..k).map(|i| Some(i * a)).collect();
            check.same(&op, "remaining after each admitted hold", &expected, &seen);
            let b = programmatic(store, check, &id, now).await;
            check.same(
                &op,
                "pool after the holds",
                &(grant, 0, 0, limit, Some(limit)),
                &(b.grants.0, b.used.0, b.overage.0, b.held.0, b.limit.map(|n| n.0)),
            );

            // Settle them all at once at their held amount: exactly the limit is charged.
            let handles: Vec<_> = admitted
                .iter()
                .map(|h| {
                    let (store, request) = (store.clone(), settle_request(&id, &h.id, a, now));
                    tokio::spawn(async move { store.settle(request, now).await })
                })
                .collect();
            for h in handles {
                let e = check.ok(&op, h.await.expect("a race task does not panic"));
                check.ensure(e.charged().0 == a && e.overshoot.0 == 0, &op, || format!("settled at {a}: {e:#?}"));
            }
            totals.events += admitted.len() as u64;
            let b = programmatic(store, check, &id, now).await;
            let used = grant.min(limit);
            check.same(&op, "pool after the settles", &(used, limit - used, 0), &(b.used.0, b.overage.0, b.held.0));
            let got = store.hold(hold_request(&id, "one-more".into(), None, 1), now).await;
            match got {
                Ok(HoldOutcome::Refused { refusal: Refusal::PoolExhausted { remaining, .. }, .. })
                    if remaining.0 == 0 => {}
                other => check.fail(&op, format!("a full pool took one more nano: {other:?}")),
            }
            totals.holds += 1;
        }
    }

    /// A capped key and an uncapped one race for one pool: the key's cap and the pool's limit
    /// both hold exactly.
    async fn key_cap(
        store: &Arc<dyn Store>,
        check: &Checker,
        rng: &mut Rng,
        tasks: usize,
        now: DateTime<Utc>,
        totals: &mut Totals,
    ) {
        let id = "race-key";
        let a = rng.range(1_000_003, 50_000_000);
        let (pool_k, key_k) = (20, 7);
        let op = format!("races: key cap {key_k}×{a} inside pool {pool_k}×{a}");
        account(store, check, id, pool_k * a, PoolPolicy::default(), now).await;
        add_key(store, check, id, "race-key-capped", Some(key_k * a), now).await;
        add_key(store, check, id, "race-key-open", None, now).await;
        let rounds = 40usize.div_ceil(tasks);
        let batches: Vec<Vec<HoldRequest>> = (0..tasks)
            .map(|t| {
                let mut keys = ["race-key-capped", "race-key-open"];
                if t % 2 == 1 {
                    keys.reverse();
                }
                (0..rounds)
                    .flat_map(|j| keys.map(|k| hold_request(id, format!("t{t}-{j}-{k}"), Some(k.to_string()), a)))
                    .collect()
            })
            .collect();
        let outcomes = concurrent_holds(store, batches, now).await;
        totals.holds += outcomes.len() as u64;
        let (mut admitted, mut capped_admitted) = (Vec::new(), 0);
        let (mut key_refused, mut pool_refused) = (false, false);
        for (r, got) in &outcomes {
            match got {
                Ok(HoldOutcome::Held(h)) => {
                    admitted.push(h.clone());
                    if r.key.as_deref() == Some("race-key-capped") {
                        capped_admitted += 1;
                    }
                }
                Ok(HoldOutcome::Refused { refusal: Refusal::PoolExhausted { limit, remaining }, .. })
                    if limit.0 == pool_k * a && remaining.0 == 0 =>
                {
                    pool_refused = true
                }
                Ok(HoldOutcome::Refused { refusal: Refusal::KeyCapReached { cap, remaining }, .. })
                    if cap.0 == key_k * a && remaining.0 == 0 && r.key.as_deref() == Some("race-key-capped") =>
                {
                    key_refused = true
                }
                other => check.fail(&op, format!("hold {} got {other:?}", r.id)),
            }
        }
        check.same(&op, "holds admitted", &(pool_k as usize), &admitted.len());
        check.ensure(capped_admitted <= key_k, &op, || format!("the capped key got {capped_admitted} holds"));
        check.ensure(!key_refused || capped_admitted == key_k, &op, || {
            format!("the capped key was refused with {capped_admitted} of {key_k} holds")
        });
        check.ensure(pool_refused, &op, || "the pool never filled".to_string());
        let mut seen: Vec<Option<i64>> = admitted.iter().map(|h| h.remaining_after.map(|n| n.0)).collect();
        seen.sort();
        let expected: Vec<Option<i64>> = (0..pool_k).map(|i| Some(i * a)).collect();
        check.same(&op, "remaining after each admitted hold", &expected, &seen);

        let handles: Vec<_> = admitted
            .iter()
            .map(|h| {
                let (store, hold_id) = (store.clone(), h.id.clone());
                tokio::spawn(async move { store.void(id, &hold_id, now).await })
            })
            .collect();
        for h in handles {
            let hold = check.ok(&op, h.await.expect("a race task does not panic"));
            check.same(&op, "voided hold", &HoldState::Voided, &hold.state);
        }
        let b = programmatic(store, check, id, now).await;
        check.same(&op, "pool after the voids", &(0, 0, 0), &(b.used.0, b.overage.0, b.held.0));
        // The key's whole cap is free again.
        let again = hold_request(id, "after".into(), Some("race-key-capped".into()), key_k * a);
        match check.ok(&op, store.hold(again, now).await) {
            HoldOutcome::Held(_) => {}
            other => check.fail(&op, format!("the voided key cap was not released: {other:?}")),
        }
        check.ok(&op, store.void(id, "after", now).await);
        totals.holds += 1;
    }

    /// What one churn task saw.
    #[derive(Default)]
    struct Churned {
        holds: Vec<(HoldRequest, HoldOutcome)>,
        settled: Vec<(i64, Event)>,
        direct: Vec<Event>,
        errors: Vec<String>,
    }

    /// Tasks hold, settle (below, at and above the hold), void and record events on one `block`
    /// pool with a capped key, all at once; then the invariants of SPEC §3.
    async fn churn(
        store: &Arc<dyn Store>,
        check: &Checker,
        rng: &mut Rng,
        tasks: usize,
        now: DateTime<Utc>,
        totals: &mut Totals,
    ) {
        let id = "race-churn";
        let grant = rng.range(2 * USD, 4 * USD);
        let cap = rng.range(USD / 2, 3 * USD / 2);
        let op = format!("races: churn on a block pool of {grant} with a key capped at {cap}");
        account(store, check, id, grant, PoolPolicy::default(), now).await;
        add_key(store, check, id, "race-churn-key", Some(cap), now).await;
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (store, mut rng) = (store.clone(), rng.fork());
                tokio::spawn(async move {
                    let mut seen = Churned::default();
                    let mut open: Vec<(String, i64)> = Vec::new();
                    for step in 0..40 {
                        let closing = !open.is_empty() && (open.len() >= 3 || rng.chance(45)) || step >= 36;
                        if closing && !open.is_empty() {
                            let (hold_id, amount) = open.swap_remove(rng.below(open.len() as u64) as usize);
                            if rng.chance(25) {
                                if let Err(e) = store.void(id, &hold_id, now).await {
                                    seen.errors.push(format!("void {hold_id}: {e:?}"));
                                }
                            } else {
                                let cost = match rng.below(3) {
                                    0 => rng.range(0, amount),
                                    1 => amount,
                                    _ => amount + rng.range(1, USD / 10),
                                };
                                match store.settle(settle_request(id, &hold_id, cost, now), now).await {
                                    Ok(e) => seen.settled.push((amount, e)),
                                    Err(e) => seen.errors.push(format!("settle {hold_id}: {e:?}")),
                                }
                            }
                        } else if rng.chance(10) {
                            let mut request =
                                settle_request(id, &format!("t{t}-e{step}"), rng.range(1_000_000, USD / 5), now);
                            request.event.key = None;
                            request.event.fingerprint = event_fingerprint(&request.event);
                            match store.record_events(vec![request.event], now).await.as_deref() {
                                Ok([EventOutcome::Recorded(e)]) => seen.direct.push(e.clone()),
                                other => seen.errors.push(format!("record t{t}-e{step}: {other:?}")),
                            }
                        } else if step < 36 {
                            let key = if rng.chance(30) { Some("race-churn-key".to_string()) } else { None };
                            let r = hold_request(id, format!("t{t}-h{step}"), key, rng.range(1_000_000, 400_000_000));
                            match store.hold(r.clone(), now).await {
                                Ok(outcome) => {
                                    if let HoldOutcome::Held(h) = &outcome {
                                        open.push((h.id.clone(), h.amount.0));
                                    }
                                    seen.holds.push((r, outcome));
                                }
                                Err(e) => seen.errors.push(format!("hold {}: {e:?}", r.id)),
                            }
                        }
                    }
                    for (hold_id, _) in open {
                        if let Err(e) = store.void(id, &hold_id, now).await {
                            seen.errors.push(format!("void {hold_id}: {e:?}"));
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut all = Churned::default();
        for h in handles {
            let seen = h.await.expect("a race task does not panic");
            all.holds.extend(seen.holds);
            all.settled.extend(seen.settled);
            all.direct.extend(seen.direct);
            all.errors.extend(seen.errors);
        }
        check.ensure(all.errors.is_empty(), &op, || format!("unexpected errors: {:#?}", all.errors));
        totals.holds += all.holds.len() as u64;
        for (r, outcome) in &all.holds {
            let fine = match outcome {
                HoldOutcome::Held(h) => h.remaining_after.is_some_and(|n| n.0 >= 0),
                HoldOutcome::Refused { refusal: Refusal::PoolExhausted { limit, remaining }, .. } => {
                    limit.0 == grant && remaining.0 >= 0 && remaining.0 < r.amount.0
                }
                HoldOutcome::Refused { refusal: Refusal::KeyCapReached { cap: c, remaining }, .. } => {
                    c.0 == cap && r.key.is_some() && remaining.0 >= 0 && remaining.0 < r.amount.0
                }
                _ => false,
            };
            check.ensure(fine, &op, || format!("hold {r:?} got {outcome:?}"));
        }
        for (amount, e) in &all.settled {
            check.ensure(e.charged() == e.cost && e.overshoot.0 == (e.cost.0 - amount).max(0), &op, || {
                format!("a hold of {amount} settled as {e:#?}")
            });
        }
        let mut expected: Vec<Event> =
            all.settled.iter().map(|(_, e)| e.clone()).chain(all.direct.iter().cloned()).collect();
        expected.sort_by_key(|e| e.seq);
        let events = all_events(store, check, id).await;
        check.same(&op, "the events written", &expected, &events);
        totals.events += events.len() as u64;
        let through_holds: i64 =
            events.iter().filter(|e| e.hold_id.is_some()).map(|e| e.charged().0 - e.overshoot.0).sum();
        check.ensure(through_holds <= grant, &op, || format!("charged through holds {through_holds} passes the limit"));
        let through_key: i64 = events
            .iter()
            .filter(|e| e.key.as_deref() == Some("race-churn-key"))
            .map(|e| e.charged().0 - e.overshoot.0)
            .sum();
        check.ensure(through_key <= cap, &op, || format!("charged through the key {through_key} passes its cap"));
        let b = programmatic(store, check, id, now).await;
        let grant_parts: i64 = events.iter().map(|e| e.grant_part.0).sum();
        let overage_parts: i64 = events.iter().map(|e| e.overage_part.0).sum();
        check.same(&op, "pool after the churn", &(grant_parts, overage_parts, 0), &(b.used.0, b.overage.0, b.held.0));
        // The limit is tight: exactly the remaining fits, one nano more does not.
        let remaining = grant - b.used.0 - b.overage.0;
        let fit = hold_request(id, "fit".into(), None, remaining.max(0));
        let more = hold_request(id, "more".into(), None, remaining.max(0) + 1);
        match (check.ok(&op, store.hold(more, now).await), remaining >= 0) {
            (HoldOutcome::Refused { refusal: Refusal::PoolExhausted { remaining: r, .. }, .. }, _)
                if r.0 == remaining.max(0) => {}
            other => check.fail(&op, format!("remaining + 1 with {remaining} left: {other:?}")),
        }
        match (check.ok(&op, store.hold(fit, now).await), remaining >= 0) {
            (HoldOutcome::Held(h), true) => {
                check.same(&op, "remaining after the last fit", &Some(Nanos(0)), &h.remaining_after);
                check.ok(&op, store.void(id, "fit", now).await);
            }
            (HoldOutcome::Refused { refusal: Refusal::PoolExhausted { .. }, .. }, false) => {}
            other => check.fail(&op, format!("exactly the remaining {remaining}: {other:?}")),
        }
        totals.holds += 2;
    }

    /// One id sent by many tasks at once: it takes effect exactly once.
    async fn repeats(
        store: &Arc<dyn Store>,
        check: &Checker,
        rng: &mut Rng,
        tasks: usize,
        now: DateTime<Utc>,
        totals: &mut Totals,
    ) {
        let id = "race-repeat";
        let op = "races: repeated ids";
        account(store, check, id, 10 * USD, PoolPolicy::default(), now).await;
        let a = rng.range(USD / 10, USD / 2);

        // The same hold from every task: one Held, the rest Replayed, all the same hold.
        let same = hold_request(id, "same".into(), None, a);
        let outcomes = concurrent_holds(store, (0..tasks).map(|_| vec![same.clone()]).collect(), now).await;
        let mut held = None;
        for (_, got) in &outcomes {
            match got {
                Ok(HoldOutcome::Held(h)) if held.is_none() => held = Some(h.clone()),
                Ok(HoldOutcome::Replayed(_)) => {}
                other => check.fail(op, format!("same hold from every task: {other:?}")),
            }
        }
        let held = held.unwrap_or_else(|| check.fail(op, "no task's hold was admitted".into()));
        for (_, got) in &outcomes {
            if let Ok(HoldOutcome::Replayed(h)) = got {
                check.same(op, "replayed hold", &held, h);
            }
        }

        // One id, a different amount from every task: one Held, the rest Conflict.
        let outcomes = concurrent_holds(
            store,
            (0..tasks).map(|t| vec![hold_request(id, "contested".into(), None, a + t as i64)]).collect(),
            now,
        )
        .await;
        let winners: Vec<&Hold> = outcomes
            .iter()
            .filter_map(|(_, g)| if let Ok(HoldOutcome::Held(h)) = g { Some(h) } else { None })
            .collect();
        check.same(op, "contested holds admitted", &1, &winners.len());
        let contested = winners[0].clone();
        for (_, got) in &outcomes {
            check.ensure(
                matches!(got, Ok(HoldOutcome::Held(_))) || matches!(got, Err(StoreError::Conflict(_))),
                op,
                || format!("contested hold: {got:?}"),
            );
        }
        let b = programmatic(store, check, id, now).await;
        check.same(op, "held after the repeated holds", &(a + contested.amount.0), &b.held.0);
        totals.holds += 2 * tasks as u64;

        // The same settle from every task: one event, every reply that event.
        let request = settle_request(id, "same", a + 7, now);
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (store, request) = (store.clone(), request.clone());
                tokio::spawn(async move { store.settle(request, now).await })
            })
            .collect();
        let mut first: Option<Event> = None;
        for h in handles {
            let e = check.ok(op, h.await.expect("a race task does not panic"));
            match &first {
                None => first = Some(e),
                Some(f) => check.same(op, "repeated settle", f, &e),
            }
        }
        let settled = first.expect("tasks ran");
        check.same(op, "overshoot of the repeated settle", &Nanos(7), &settled.overshoot);

        // Settles and voids of one hold at once: either every settle or every void wins.
        let request = settle_request(id, "contested", contested.amount.0 / 2, now);
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (store, request) = (store.clone(), request.clone());
                tokio::spawn(async move {
                    if t % 2 == 0 {
                        store.settle(request, now).await.map(|_| true)
                    } else {
                        store.void(id, "contested", now).await.map(|_| false)
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.expect("a race task does not panic"));
        }
        let settle_won = results.iter().any(|r| matches!(r, Ok(true)));
        let void_won = results.iter().any(|r| matches!(r, Ok(false)));
        check.ensure(settle_won != void_won, op, || format!("settle and void of one hold: {results:?}"));
        for (t, r) in results.iter().enumerate() {
            let wins = (t % 2 == 0) == settle_won;
            check.ensure(if wins { r.is_ok() } else { matches!(r, Err(StoreError::Conflict(_))) }, op, || {
                format!("settle and void of one hold: {results:?}")
            });
        }
        let state = check.ok(op, store.hold_by_id(id, "contested").await).map(|h| h.state);
        let want = if settle_won { HoldState::Settled } else { HoldState::Voided };
        check.same(op, "contested hold's state", &Some(want), &state);

        // The same direct event from every task: recorded once.
        let mut event = settle_request(id, "direct", a, now).event;
        event.fingerprint = event_fingerprint(&event);
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (store, event) = (store.clone(), event.clone());
                tokio::spawn(async move { store.record_events(vec![event], now).await })
            })
            .collect();
        let (mut recorded, mut duplicates) = (Vec::new(), Vec::new());
        for h in handles {
            match check.ok(op, h.await.expect("a race task does not panic")).as_slice() {
                [EventOutcome::Recorded(e)] => recorded.push(e.clone()),
                [EventOutcome::Duplicate(e)] => duplicates.push(e.clone()),
                other => check.fail(op, format!("one event, outcomes {other:?}")),
            }
        }
        check.same(op, "times the repeated event was recorded", &1, &recorded.len());
        for d in &duplicates {
            check.same(op, "duplicate", &recorded[0], d);
        }

        // Different settles of one hold at once: one wins, the rest conflict.
        let last = hold_request(id, "last".into(), None, a);
        check.ok(op, store.hold(last, now).await);
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (store, request) = (store.clone(), settle_request(id, "last", a - t as i64, now));
                tokio::spawn(async move { store.settle(request, now).await })
            })
            .collect();
        let mut wins = Vec::new();
        for h in handles {
            match h.await.expect("a race task does not panic") {
                Ok(e) => wins.push(e),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => check.fail(op, format!("contested settle: {e:?}")),
            }
        }
        check.same(op, "contested settles that won", &1, &wins.len());
        totals.holds += 1;

        let events = all_events(store, check, id).await;
        let mut expected = vec![settled, recorded[0].clone(), wins[0].clone()];
        if settle_won {
            let e = events.iter().find(|e| e.hold_id.as_deref() == Some("contested")).cloned();
            expected.push(e.unwrap_or_else(|| check.fail(op, "the winning settle wrote no event".into())));
        }
        expected.sort_by_key(|e| e.seq);
        check.same(op, "events", &expected, &events);
        let b = programmatic(store, check, id, now).await;
        let charged: i64 = events.iter().map(|e| e.charged().0).sum();
        check.same(op, "pool after the repeats", &(charged, 0, 0), &(b.used.0, b.overage.0, b.held.0));
        totals.events += events.len() as u64;
    }

    /// Many reads at once (a dashboard and every gateway request reading balances): each one
    /// answers, and they all agree, since nothing writes meanwhile.
    async fn reads(store: &Arc<dyn Store>, check: &Checker, tasks: usize, now: DateTime<Utc>) {
        let op = "races: concurrent reads";
        let first = check.ok(op, store.balance("race-churn", now).await);
        let handles: Vec<_> = (0..tasks * 4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.balance("race-churn", now).await })
            })
            .collect();
        let mut failures = Vec::new();
        for h in handles {
            match h.await.expect("a race task does not panic") {
                Ok(b) => check.same(op, "balance", &first, &b),
                Err(e) => failures.push(e),
            }
        }
        check.ensure(failures.is_empty(), op, || {
            format!("{} of {} concurrent balance reads failed: {:?}", failures.len(), tasks * 4, failures.first())
        });
    }
}
