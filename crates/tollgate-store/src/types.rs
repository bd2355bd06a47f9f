//! The records the store keeps and the requests it takes.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use tollgate_core::{Cycle, Nanos, PoolKind, PoolPolicy, Refusal, Usage, ledger};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub tier: String,
    pub anchor: DateTime<Utc>,
    pub timezone: Tz,
    /// Per-account grants (enterprise): they replace the tier's grant of that pool.
    pub interactive_grant: Option<Nanos>,
    pub programmatic_grant: Option<Nanos>,
    pub created_at: DateTime<Utc>,
}

impl Account {
    pub fn cycle_anchor(&self) -> tollgate_core::CycleAnchor {
        tollgate_core::CycleAnchor::new(self.anchor, self.timezone)
    }

    pub fn grant_override(&self, pool: PoolKind) -> Option<Nanos> {
        match pool {
            PoolKind::Interactive => self.interactive_grant,
            PoolKind::Programmatic => self.programmatic_grant,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAccount {
    pub id: String,
    pub tier: String,
    /// None: the creation day at 00:00 in the account's timezone.
    pub anchor: Option<DateTime<Utc>>,
    pub timezone: Tz,
    pub interactive_grant: Option<Nanos>,
    pub programmatic_grant: Option<Nanos>,
}

impl NewAccount {
    /// The account as created at `now`: its anchor as given, else the creation day at 00:00 in
    /// its timezone (the earliest such instant on a day that skips midnight).
    pub fn into_account(self, now: DateTime<Utc>) -> Account {
        let anchor = self.anchor.unwrap_or_else(|| {
            let midnight = now.with_timezone(&self.timezone).date_naive().and_time(chrono::NaiveTime::MIN);
            self.timezone
                .from_local_datetime(&midnight)
                .earliest()
                .map_or_else(|| Utc.from_utc_datetime(&midnight), |t| t.with_timezone(&Utc))
        });
        Account {
            id: self.id,
            tier: self.tier,
            anchor,
            timezone: self.timezone,
            interactive_grant: self.interactive_grant,
            programmatic_grant: self.programmatic_grant,
            created_at: now,
        }
    }
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountUpdate {
    pub tier: Option<String>,
    pub anchor: Option<DateTime<Utc>>,
    pub timezone: Option<Tz>,
    pub interactive_grant: Option<Option<Nanos>>,
    pub programmatic_grant: Option<Option<Nanos>>,
}

impl AccountUpdate {
    /// Whether the update moves the account's cycles (a new anchor or timezone).
    pub fn moves_cycles(&self, account: &Account) -> bool {
        self.anchor.is_some_and(|a| a != account.anchor) || self.timezone.is_some_and(|t| t != account.timezone)
    }

    /// `account` with the update applied (a new tier checked to exist by the caller);
    /// `Conflict` when it would move the cycles of an account that `has_ledger_state` (read
    /// only when [`AccountUpdate::moves_cycles`]), as those cycles were billed.
    pub fn apply_to(&self, mut account: Account, has_ledger_state: bool) -> Result<Account, crate::StoreError> {
        if has_ledger_state && self.moves_cycles(&account) {
            return Err(crate::StoreError::Conflict(format!(
                "account {:?} already has ledger state: its anchor and timezone can no longer change, or cycles \
                 it was billed in would move",
                account.id
            )));
        }
        if let Some(tier) = &self.tier {
            account.tier = tier.clone();
        }
        account.anchor = self.anchor.unwrap_or(account.anchor);
        account.timezone = self.timezone.unwrap_or(account.timezone);
        if let Some(g) = self.interactive_grant {
            account.interactive_grant = g;
        }
        if let Some(g) = self.programmatic_grant {
            account.programmatic_grant = g;
        }
        Ok(account)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// The tier's grant, created with the cycle.
    Tier,
    /// Extra credit added by an operator.
    TopUp,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Tier => "tier",
            GrantKind::TopUp => "top_up",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: i64,
    pub account: String,
    pub pool: PoolKind,
    pub kind: GrantKind,
    pub amount: Nanos,
    pub cycle_start: DateTime<Utc>,
    /// Every grant expires at its cycle's end.
    pub expires_at: DateTime<Utc>,
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Grant {
    /// A cycle's grant from its tier, made when the cycle starts; its id is the store's to give.
    pub fn from_tier(account: &str, pool: PoolKind, amount: Nanos, cycle: &Cycle) -> Grant {
        Grant {
            id: 0,
            account: account.to_string(),
            pool,
            kind: GrantKind::Tier,
            amount,
            cycle_start: cycle.start,
            expires_at: cycle.end,
            note: None,
            created_at: cycle.start,
        }
    }

    /// A top-up `g` of the cycle `cycle`, made at `now`; its id is the store's to give.
    pub fn top_up(g: &NewGrant, cycle: &Cycle, now: DateTime<Utc>) -> Grant {
        Grant {
            id: 0,
            account: g.account.clone(),
            pool: g.pool,
            kind: GrantKind::TopUp,
            amount: g.amount,
            cycle_start: cycle.start,
            expires_at: cycle.end,
            note: g.note.clone(),
            created_at: now,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewGrant {
    pub account: String,
    pub pool: PoolKind,
    pub amount: Nanos,
    pub note: Option<String>,
}

/// Which pool a key's calls go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPool {
    Fixed(PoolKind),
    /// Classified per call (header, rules, User-Agent).
    Auto,
}

impl KeyPool {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPool::Fixed(p) => p.as_str(),
            KeyPool::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<KeyPool> {
        if s == "auto" { Some(KeyPool::Auto) } else { PoolKind::parse(s).map(KeyPool::Fixed) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub account: String,
    pub name: Option<String>,
    pub pool: KeyPool,
    pub labels: BTreeMap<String, String>,
    /// The key's own monthly cap.
    pub cap: Option<Nanos>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewKey {
    pub id: String,
    pub account: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_hash: String,
    pub name: Option<String>,
    pub pool: KeyPool,
    pub labels: BTreeMap<String, String>,
    pub cap: Option<Nanos>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolBalance {
    pub pool: PoolKind,
    pub policy: PoolPolicy,
    pub grants: Nanos,
    pub used: Nanos,
    pub overage: Nanos,
    pub held: Nanos,
    pub limit: Option<Nanos>,
}

impl PoolBalance {
    /// The pool's figures as core's ledger decisions read them.
    pub fn scope(&self) -> tollgate_core::PoolScope {
        tollgate_core::PoolScope {
            limit: self.limit,
            grants: self.grants,
            used: self.used,
            overage: self.overage,
            held: self.held,
        }
    }

    pub fn remaining(&self) -> Option<Nanos> {
        self.limit.map(|l| Nanos(l.0 - self.used.0 - self.overage.0 - self.held.0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    pub account: String,
    pub tier: String,
    pub cycle: Cycle,
    /// Interactive first, then programmatic.
    pub pools: [PoolBalance; 2],
}

impl Balance {
    pub fn pool(&self, pool: PoolKind) -> &PoolBalance {
        &self.pools[pool as usize]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    pub account: String,
    /// Idempotency id, unique per account.
    pub id: String,
    pub pool: PoolKind,
    pub key: Option<String>,
    pub amount: Nanos,
    pub ttl_s: u64,
    /// The model and source of the call, kept for the event written if the hold expires.
    pub model: Option<String>,
    pub source: Option<String>,
    /// Digest of the request's content, to tell a repeat from a conflicting reuse of the id.
    pub fingerprint: String,
    /// Who makes the hold: only they may end it (SPEC section 3, "Who may end a hold").
    pub made_by: Maker,
}

/// Who made a hold, or who asks to end one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Maker {
    /// The gateway: a call's own hold or a lease, ended only from what the upstream reported.
    Gateway,
    /// The admin token, through the API.
    Admin,
    /// An account key (its id), through the API.
    Key(String),
}

impl Maker {
    /// How the maker is stored: `gateway`, `admin` or `key:<id>`.
    pub fn to_text(&self) -> String {
        match self {
            Maker::Gateway => "gateway".into(),
            Maker::Admin => "admin".into(),
            Maker::Key(id) => format!("key:{id}"),
        }
    }

    pub fn parse(s: &str) -> Option<Maker> {
        match s {
            "gateway" => Some(Maker::Gateway),
            "admin" => Some(Maker::Admin),
            _ => s.strip_prefix("key:").map(|id| Maker::Key(id.to_string())),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldState {
    Open,
    Settled,
    Voided,
    Expired,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Open => "open",
            HoldState::Settled => "settled",
            HoldState::Voided => "voided",
            HoldState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<HoldState> {
        match s {
            "open" => Some(HoldState::Open),
            "settled" => Some(HoldState::Settled),
            "voided" => Some(HoldState::Voided),
            "expired" => Some(HoldState::Expired),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub account: String,
    pub pool: PoolKind,
    pub key: Option<String>,
    pub amount: Nanos,
    pub model: Option<String>,
    pub source: Option<String>,
    pub state: HoldState,
    pub cycle_start: DateTime<Utc>,
    pub cycle_end: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The pool's remaining right after the hold was made (None: unlimited).
    pub remaining_after: Option<Nanos>,
    pub made_by: Maker,
}

impl Hold {
    /// The event that settles this hold at its held amount when it expires, or when a restart
    /// finds it open (`unsettled`): named after the hold, or `<id>#unsettled` when `id_taken`
    /// (an event already has the hold's id, and is kept).
    pub fn unsettled_event(&self, id_taken: bool) -> NewEvent {
        NewEvent {
            id: if id_taken { format!("{}#unsettled", self.id) } else { self.id.clone() },
            account: self.account.clone(),
            pool: self.pool,
            model: self.model.clone().unwrap_or_else(|| "unknown".to_string()),
            usage: Usage::default(),
            cost: self.amount,
            service_tier: None,
            inference_geo: None,
            speed: None,
            source: self.source.clone(),
            key: self.key.clone(),
            labels: BTreeMap::default(),
            timestamp: self.created_at,
            latency_ms: None,
            ttft_ms: None,
            partial: false,
            estimated: false,
            fingerprint: format!("unsettled:{}", self.id),
        }
    }
}

/// An event to write, with what the ledger decided for it: both backends insert these and
/// answer with [`ChargedEvent::event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargedEvent {
    pub event: NewEvent,
    pub cycle_start: DateTime<Utc>,
    pub split: ledger::Split,
    pub overshoot: Nanos,
    pub hold_id: Option<String>,
    /// Settled at its held amount when its hold expired (or was found open at a restart).
    pub unsettled: bool,
    pub recorded: DateTime<Utc>,
}

impl ChargedEvent {
    /// An event recorded on its own (not against a hold): charged `split`, no overshoot.
    pub fn direct(
        event: NewEvent,
        cycle_start: DateTime<Utc>,
        split: ledger::Split,
        recorded: DateTime<Utc>,
    ) -> ChargedEvent {
        ChargedEvent { event, cycle_start, split, overshoot: Nanos::ZERO, hold_id: None, unsettled: false, recorded }
    }

    /// An event charged against a hold (whole or in part), as `settlement` decided.
    pub fn of_hold(
        event: NewEvent,
        hold: &Hold,
        settlement: ledger::Settlement,
        recorded: DateTime<Utc>,
    ) -> ChargedEvent {
        ChargedEvent {
            event,
            cycle_start: hold.cycle_start,
            split: settlement.split,
            overshoot: settlement.overshoot,
            hold_id: Some(hold.id.clone()),
            unsettled: false,
            recorded,
        }
    }

    /// The event as stored, once its insert gave it `seq`.
    pub fn event(&self, seq: i64) -> Event {
        let e = &self.event;
        Event {
            seq,
            id: e.id.clone(),
            account: e.account.clone(),
            pool: e.pool,
            model: e.model.clone(),
            usage: e.usage,
            cost: e.cost,
            grant_part: self.split.grant,
            overage_part: self.split.overage,
            overshoot: self.overshoot,
            service_tier: e.service_tier.clone(),
            inference_geo: e.inference_geo.clone(),
            speed: e.speed.clone(),
            source: e.source.clone(),
            key: e.key.clone(),
            labels: e.labels.clone(),
            timestamp: e.timestamp,
            cycle_start: self.cycle_start,
            hold_id: self.hold_id.clone(),
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            partial: e.partial,
            estimated: e.estimated,
            unsettled: self.unsettled,
            recorded_at: self.recorded,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldOutcome {
    Held(Hold),
    /// Same id and content as an earlier hold: that hold, as it is now.
    Replayed(Hold),
    Refused {
        refusal: Refusal,
        /// When the pool's cycle resets (the refusal's `retry-after`).
        resets_at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRequest {
    pub account: String,
    pub hold_id: String,
    /// The event to record; its id defaults to the hold id. Pool and key come from the hold.
    pub event: NewEvent,
}

/// One metered call to record. `cost` is the list-price cost computed by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub account: String,
    pub pool: PoolKind,
    pub model: String,
    pub usage: Usage,
    pub cost: Nanos,
    pub service_tier: Option<String>,
    pub inference_geo: Option<String>,
    pub speed: Option<String>,
    pub source: Option<String>,
    pub key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub timestamp: DateTime<Utc>,
    pub latency_ms: Option<u64>,
    pub ttft_ms: Option<u64>,
    pub partial: bool,
    /// No usage was known for served work: charged at an estimate (the hold's input part).
    pub estimated: bool,
    pub fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Store-wide order of recording, for paging.
    pub seq: i64,
    pub id: String,
    pub account: String,
    pub pool: PoolKind,
    pub model: String,
    pub usage: Usage,
    /// The list-price cost.
    pub cost: Nanos,
    /// What the cycle's grants paid.
    pub grant_part: Nanos,
    /// What went beyond the grants (at list × PAYG multiplier).
    pub overage_part: Nanos,
    /// Charge above the call's hold.
    pub overshoot: Nanos,
    pub service_tier: Option<String>,
    pub inference_geo: Option<String>,
    pub speed: Option<String>,
    pub source: Option<String>,
    pub key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub timestamp: DateTime<Utc>,
    pub cycle_start: DateTime<Utc>,
    pub hold_id: Option<String>,
    pub latency_ms: Option<u64>,
    pub ttft_ms: Option<u64>,
    pub partial: bool,
    /// Charged at an estimate: the upstream served the call but its usage was not known.
    pub estimated: bool,
    /// Charged at its held amount because it was never settled.
    pub unsettled: bool,
    pub recorded_at: DateTime<Utc>,
}

impl Event {
    pub fn charged(&self) -> Nanos {
        self.grant_part.saturating_add(self.overage_part)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    Recorded(Event),
    /// Same id and content as an earlier event: that event.
    Duplicate(Event),
}

impl EventOutcome {
    pub fn event(&self) -> &Event {
        match self {
            EventOutcome::Recorded(e) | EventOutcome::Duplicate(e) => e,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub account: String,
    pub pool: Option<PoolKind>,
    pub model: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only events recorded after this `seq` (the paging cursor).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// The result of checking the ledger invariants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    pub pools_checked: u64,
    pub events_checked: u64,
    pub holds_open: u64,
    /// One sentence per breach, naming account, pool and cycle.
    pub breaches: Vec<String>,
    /// What is no breach but needs a look, one sentence each: the pool cycles with overshoot
    /// (charges above their holds), naming account, pool, cycle, the total and the events.
    pub warnings: Vec<String>,
}
