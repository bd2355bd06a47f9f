//! What a plan decides on: the rows a backend reads ([`Snapshot`]), their keys and totals.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hashbrown::Equivalent;
use tollgate_core::ledger::Refusal;
use tollgate_core::{Cycle, Nanos, PoolKind, PoolPolicy, Tier};

use super::op::Op;
use crate::{Account, Event, Hold, HoldState, StoreError, StoreResult};

/// The maps of a snapshot and a plan: hashbrown's, with its fast hasher, and looked up by
/// borrowed keys ([`Ids`], [`AccountPool`]) without allocating.
pub type Map<K, V> = hashbrown::HashMap<K, V>;

/// The sets of a plan, as [`Map`].
pub type Set<T> = hashbrown::HashSet<T>;

/// An (account, id) key, borrowed: finds a `(String, String)` entry without allocating.
#[derive(Hash)]
pub struct Ids<'a>(pub &'a str, pub &'a str);

impl Equivalent<(String, String)> for Ids<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// An (account, pool) key, borrowed: finds a `(String, PoolKind)` entry without allocating.
#[derive(Hash)]
pub struct AccountPool<'a>(pub &'a str, pub PoolKind);

impl Equivalent<(String, PoolKind)> for AccountPool<'_> {
    fn equivalent(&self, key: &(String, PoolKind)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// A pool's cycle: (account, pool, cycle start in µs).
pub type PoolId = (String, PoolKind, i64);
/// A key's cycle: (key id, cycle start in µs).
pub type KeyId = (String, i64);

/// A pool's running totals in one cycle: its `pool_cycles` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolTotals {
    pub grants: Nanos,
    pub used: Nanos,
    pub overage: Nanos,
    pub held: Nanos,
}

impl PoolTotals {
    /// These totals plus `add`; `Invalid` when a sum leaves the ledger's range.
    pub fn plus(self, add: PoolTotals) -> StoreResult<PoolTotals> {
        Ok(PoolTotals {
            grants: sum(self.grants, add.grants)?,
            used: sum(self.used, add.used)?,
            overage: sum(self.overage, add.overage)?,
            held: sum(self.held, add.held)?,
        })
    }
}

/// A key's running totals in one cycle: its `key_cycles` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyTotals {
    pub charged: Nanos,
    pub held: Nanos,
}

impl KeyTotals {
    /// These totals plus `add`; `Invalid` when a sum leaves the ledger's range.
    pub fn plus(self, add: KeyTotals) -> StoreResult<KeyTotals> {
        Ok(KeyTotals { charged: sum(self.charged, add.charged)?, held: sum(self.held, add.held)? })
    }
}

fn sum(a: Nanos, b: Nanos) -> StoreResult<Nanos> {
    a.checked_add(b).ok_or(StoreError::Refused(Refusal::Overflow))
}

/// Where a settled hold's event is: committed before (its seq), or made by this plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventRef {
    Seq(i64),
    New(usize),
}

/// A hold the writes name, as read, then as the plan changes it.
#[derive(Clone, Debug)]
pub struct HoldEntry {
    pub hold: Hold,
    pub fingerprint: String,
    pub event: Option<EventRef>,
    /// Whether the plan extended it.
    pub expires_changed: bool,
    /// Whether the plan charged parts of it (a lease: its amount changed).
    pub parted: bool,
}

impl HoldEntry {
    /// A hold read from the store.
    pub fn read(hold: Hold, fingerprint: String, event_seq: Option<i64>) -> HoldEntry {
        HoldEntry { hold, fingerprint, event: event_seq.map(EventRef::Seq), expires_changed: false, parted: false }
    }
}

/// An account as a snapshot holds it: with its tier (None: the tier is unknown) and the policies
/// of its two pools. Shared, so a backend that caches them hands them over without a copy.
#[derive(Clone, Debug)]
pub struct Terms {
    pub account: Arc<Account>,
    pub tier: Option<Arc<Tier>>,
    /// By pool, in [`PoolKind::ALL`]'s order.
    pub policies: [PoolPolicy; 2],
}

impl Terms {
    /// The policy of one of the account's pools.
    pub fn policy(&self, pool: PoolKind) -> PoolPolicy {
        self.policies[usize::from(pool == PoolKind::Programmatic)]
    }

    /// The tier grant and PAYG multiplier of a pool; None when the tier is unknown.
    pub fn tier_grant(&self, pool: PoolKind) -> Option<(Nanos, u64)> {
        let tier = self.tier.as_ref()?;
        Some((self.account.grant_override(pool).unwrap_or(tier.grant(pool)), tier.payg_multiplier_ppm))
    }
}

/// The rows a batch of writes needs, read by the backend in its transaction.
#[derive(Default)]
pub struct Snapshot {
    /// The accounts the writes name, each with its tier and policies.
    pub accounts: Map<String, Terms>,
    /// Key id → (its account, its cap).
    pub keys: Map<String, (String, Option<Nanos>)>,
    /// The existing holds the writes name, by (account, id).
    pub holds: Map<(String, String), HoldEntry>,
    /// Whether `taken` holds every committed event whose id a write takes ([`Op::event_key`]).
    /// A backend may leave them unread and rely on its insert's uniqueness check instead; a
    /// decision that needs them then sets [`Plan::needs_taken`] and the backend reads again.
    pub knows_taken: bool,
    /// Committed events among the ids the writes take, by (account, event id), with their
    /// fingerprints.
    pub taken: Map<(String, String), (String, Event)>,
    /// Committed events of settled holds that settles name again, by seq, with fingerprints.
    pub settled_events: Map<i64, (String, Event)>,
    /// The pool rows of the cycles the writes touch (see [`Snapshot::needs`]).
    pub pools: Map<PoolId, PoolTotals>,
    /// The key rows of the cycles the writes touch (a row the database does not have yet is read
    /// as zero).
    pub key_totals: Map<KeyId, KeyTotals>,
}

/// The pool and key rows a write needs, once the snapshot has its accounts, keys and holds.
#[derive(Debug, Default)]
pub struct Needs {
    /// The pool row, with the tier grant and cycle to create it with when the write may create
    /// it (a new hold or event, a settle: the first write of a cycle).
    pub pool: Option<(PoolId, Option<(Nanos, Cycle)>)>,
    pub key: Option<KeyId>,
}

impl Snapshot {
    /// Whether a new hold or event gets past the checks before its pool: its account exists and
    /// its key is the account's (and, for a hold, its id is new).
    fn reaches_pool(&self, account: &str, key: Option<&str>) -> bool {
        self.accounts.contains_key(account) && key.is_none_or(|k| self.keys.get(k).is_some_and(|(a, _)| a == account))
    }

    fn open_hold(&self, account: &str, hold_id: &str) -> Option<&Hold> {
        let entry = self.holds.get(&Ids(account, hold_id))?;
        (entry.hold.state == HoldState::Open).then_some(&entry.hold)
    }

    /// The pool and key rows `op` needs (at `now`), given the accounts, keys and holds read.
    pub fn needs(&self, op: &Op, now: DateTime<Utc>) -> Needs {
        let creating = |terms: &Terms, pool: PoolKind, cycle: Cycle| {
            let create = terms.tier_grant(pool).map(|(grant, _)| (grant, cycle));
            ((terms.account.id.clone(), pool, us(cycle.start)), create)
        };
        match op {
            Op::Hold(r)
                if self.reaches_pool(&r.account, r.key.as_deref())
                    && !self.holds.contains_key(&Ids(&r.account, &r.id)) =>
            {
                let cycle = self.accounts[&r.account].account.cycle_anchor().cycle_at(now);
                let key = r.key.as_ref().map(|k| (k.clone(), us(cycle.start)));
                Needs { pool: Some(creating(&self.accounts[&r.account], r.pool, cycle)), key }
            }
            Op::Record(e)
                if self.reaches_pool(&e.account, e.key.as_deref())
                    && !self.taken.contains_key(&Ids(&e.account, &e.id)) =>
            {
                let cycle = self.accounts[&e.account].account.cycle_anchor().cycle_at(e.timestamp);
                let key = e.key.as_ref().map(|k| (k.clone(), us(cycle.start)));
                Needs { pool: Some(creating(&self.accounts[&e.account], e.pool, cycle)), key }
            }
            Op::Hold(_) | Op::Record(_) | Op::Extend { .. } => Needs::default(),
            Op::Settle(_) | Op::SettlePart(..) | Op::Void { .. } | Op::Expire { .. } => {
                let Some((account, hold_id)) = op.hold_key() else { return Needs::default() };
                let Some(h) = self.open_hold(account, hold_id) else { return Needs::default() };
                let key = h.key.as_ref().map(|k| (k.clone(), us(h.cycle_start)));
                let pool = match (matches!(op, Op::Void { .. }), self.accounts.get(account)) {
                    (false, Some(a)) => creating(a, h.pool, Cycle { index: 0, start: h.cycle_start, end: h.cycle_end }),
                    _ => ((h.account.clone(), h.pool, us(h.cycle_start)), None),
                };
                Needs { pool: Some(pool), key }
            }
        }
    }
}

/// Microseconds since the epoch: how both backends key a cycle.
pub fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}
