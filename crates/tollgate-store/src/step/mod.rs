//! The ledger's writes, decided once for every backend: read, decide, write.
//!
//! A backend runs each write (or a batch of them) in three steps, in the style of a
//! prefetch-then-commit ledger:
//!
//! 1. **Read** a [`Snapshot`] of the rows the writes need, inside its transaction (locked, where
//!    the database has row locks): the accounts with their tiers and policies, the caps of the
//!    keys named, the holds named, then the pool and key totals of the cycles they touch
//!    ([`Snapshot::needs`] says which, and which pool rows a write may create), and the committed
//!    events whose ids the writes take.
//! 2. **Decide**: [`Plan::decide`] takes each write in order and answers it from the snapshot,
//!    with `tollgate-core`'s decisions, on running totals in memory. Every refusal and error of a
//!    write comes before its first change, so one write's refusal is its own.
//! 3. **Write** what the plan holds ([`Plan::new_holds`], [`Plan::new_events`],
//!    [`Plan::changed_holds`], the changed pool and key totals) and commit; answer each write
//!    once its rows are durable.
//!
//! So the decisions, their order and their error messages are written here once; a backend keeps
//! only its SQL, its locking and its transactions.

use chrono::{DateTime, Duration, Utc};
use tollgate_core::ledger::{self, PoolScope, Replay, Split};
use tollgate_core::tier::PPM;
use tollgate_core::{KeyScope, Nanos, PoolKind};

use crate::{
    Account, ChargedEvent, EventOutcome, Hold, HoldOutcome, HoldRequest, HoldState, NewEvent, SettleRequest,
    StoreError, StoreResult,
};

mod op;
mod snapshot;

pub use op::{Done, Op, Outcome};
pub use snapshot::{
    AccountPool, EventRef, HoldEntry, Ids, KeyId, KeyTotals, Map, Needs, PoolId, PoolTotals, Set, Snapshot, Terms, us,
};

/// A batch of writes decided on a snapshot: the running totals, and the rows to write.
#[derive(Default)]
pub struct Plan {
    pub snapshot: Snapshot,
    /// New holds, with their fingerprints, in order.
    new_holds: Vec<(String, String)>,
    /// New events, in order: the backend gives each its seq as it inserts them.
    pub new_events: Vec<ChargedEvent>,
    /// (account, event id) → place in `new_events`.
    new_event_ids: Map<(String, String), usize>,
    /// Holds read from the store that the plan changed (settled, expired, voided, extended or
    /// charged in part), by (account, id); their entries in `snapshot.holds` say how.
    pub changed_holds: Set<(String, String)>,
    pub changed_pools: Set<PoolId>,
    pub changed_keys: Set<KeyId>,
    /// Set when a decision needed the committed events the snapshot did not read
    /// ([`Snapshot::knows_taken`]): the backend reads them and decides again.
    pub needs_taken: bool,
}

/// The answer to a hold request whose id an existing hold has: that hold when the request is the
/// same, a conflict when not.
pub fn replay_hold(existing: &HoldEntry, r: &HoldRequest) -> StoreResult<HoldOutcome> {
    match ledger::replay(Some((existing.fingerprint.clone(), existing.hold.clone())), &r.fingerprint) {
        Replay::Same(hold) => Ok(HoldOutcome::Replayed(hold)),
        _ => Err(StoreError::Conflict(format!(
            "hold id {:?} was already used for a different request; use a new id",
            r.id
        ))),
    }
}

fn hold_not_found(hold_id: &str) -> StoreError {
    StoreError::NotFound(format!("hold {hold_id:?}"))
}

fn event_id_taken(id: &str) -> StoreError {
    StoreError::Conflict(format!("event id {id:?} is already recorded; use another event id"))
}

/// What an unread taken id costs: the plan must run again with the taken events read.
fn needs_taken() -> StoreError {
    StoreError::Backend("the write runs again with the taken event ids read".into())
}

/// A charge decided: its pool's and key's new totals.
struct Charge {
    pool: (PoolId, PoolTotals),
    key: Option<(KeyId, KeyTotals)>,
}

impl Plan {
    pub fn new(snapshot: Snapshot) -> Plan {
        Plan { snapshot, ..Plan::default() }
    }

    /// Empties the plan and its snapshot for the next writes, keeping the memory they took: a
    /// backend that decides one write at a time reuses one plan.
    pub fn reset(&mut self) {
        let s = &mut self.snapshot;
        s.accounts.clear();
        s.keys.clear();
        s.holds.clear();
        s.knows_taken = false;
        s.taken.clear();
        s.settled_events.clear();
        s.pools.clear();
        s.key_totals.clear();
        self.new_holds.clear();
        self.new_events.clear();
        self.new_event_ids.clear();
        self.changed_holds.clear();
        self.changed_pools.clear();
        self.changed_keys.clear();
        self.needs_taken = false;
    }

    /// The new holds, in order, with their fingerprints (as the plan left them: a hold made and
    /// changed by one plan is in `changed_holds` too).
    pub fn new_holds(&self) -> impl ExactSizeIterator<Item = (&Hold, &str)> {
        self.new_holds.iter().map(|key| {
            let entry = &self.snapshot.holds[key];
            (&entry.hold, entry.fingerprint.as_str())
        })
    }

    /// Decides one write on the running totals: its answer, and its rows added to the plan. An
    /// error changes nothing.
    pub fn decide(&mut self, op: &Op, now: DateTime<Utc>) -> StoreResult<Outcome> {
        match op {
            Op::Hold(r) => self.hold(r, now),
            Op::Settle(r) => self.settle(r, now),
            Op::SettlePart(r, release) => self.settle_part(r, *release, now),
            Op::Void { account, hold_id } => self.void(account, hold_id).map(|h| Outcome::Ready(Done::Changed(h))),
            Op::Extend { account, hold_id, ttl_s } => {
                self.extend(account, hold_id, *ttl_s, now).map(|h| Outcome::Ready(Done::Changed(h)))
            }
            Op::Record(e) => self.record(e, now),
            Op::Expire { account, hold_id } => self.expire(account, hold_id, now),
        }
    }

    /// The pool's totals and scope for core's decisions.
    fn pool_scope(&self, id: &PoolId) -> StoreResult<(PoolTotals, PoolScope)> {
        let totals =
            *self.snapshot.pools.get(id).ok_or_else(|| {
                StoreError::Corrupt(format!("pool {} {} has no row for its cycle", id.0, id.1.as_str()))
            })?;
        let policy = self.snapshot.accounts.get(id.0.as_str()).map(|t| t.policy(id.1)).unwrap_or_default();
        let PoolTotals { grants, used, overage, held } = totals;
        Ok((totals, PoolScope { limit: policy.limit(grants), grants, used, overage, held }))
    }

    /// A key's totals in a cycle, as read (a backend reads a missing row as zero); a row not
    /// read is the backend's fault, never a zero.
    fn key_totals(&self, id: &KeyId) -> StoreResult<KeyTotals> {
        self.snapshot
            .key_totals
            .get(id)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("key {} has no row read for its cycle", id.0)))
    }

    fn account(&self, id: &str) -> StoreResult<&Account> {
        self.terms(id).map(|t| t.account.as_ref())
    }

    fn terms(&self, id: &str) -> StoreResult<&Terms> {
        self.snapshot.accounts.get(id).ok_or_else(|| StoreError::NotFound(format!("account {id:?}")))
    }

    /// The tier grant and PAYG multiplier of a pool; an unknown tier is the store's fault.
    fn tier_grant(&self, id: &str, pool: PoolKind) -> StoreResult<(Nanos, u64)> {
        let terms = self.terms(id)?;
        terms.tier_grant(pool).ok_or_else(|| {
            StoreError::Corrupt(format!("account {} has unknown tier {}", terms.account.id, terms.account.tier))
        })
    }

    /// The cap of `key` when it is `account`'s; `Invalid` if the account has no such key.
    fn key_cap(&self, account: &str, key: &str) -> StoreResult<Option<Nanos>> {
        match self.snapshot.keys.get(key) {
            Some((a, cap)) if a == account => Ok(*cap),
            _ => Err(StoreError::Invalid(format!("account {account:?} has no key {key:?}"))),
        }
    }

    /// Applies decided totals.
    fn apply(&mut self, charge: Charge) {
        let (pool_id, totals) = charge.pool;
        match self.snapshot.pools.get_mut(&pool_id) {
            Some(t) => *t = totals,
            None => drop(self.snapshot.pools.insert(pool_id.clone(), totals)),
        }
        self.changed_pools.insert(pool_id);
        if let Some((id, totals)) = charge.key {
            match self.snapshot.key_totals.get_mut(&id) {
                Some(t) => *t = totals,
                None => drop(self.snapshot.key_totals.insert(id.clone(), totals)),
            }
            self.changed_keys.insert(id);
        }
    }

    /// Adds a new event; its place in `new_events`.
    fn push_event(&mut self, row: ChargedEvent) -> usize {
        let i = self.new_events.len();
        self.new_event_ids.insert((row.event.account.clone(), row.event.id.clone()), i);
        self.new_events.push(row);
        i
    }

    /// The totals once `add` is added to a pool and `add_key` to the hold's key, refused (out of
    /// range) before anything changes.
    fn charge(&self, pool: PoolId, add: PoolTotals, key: Option<(KeyId, KeyTotals)>) -> StoreResult<Charge> {
        let (totals, _) = self.pool_scope(&pool)?;
        let key = match key {
            Some((id, add_key)) => {
                let totals = self.key_totals(&id)?.plus(add_key)?;
                Some((id, totals))
            }
            None => None,
        };
        Ok(Charge { pool: (pool, totals.plus(add)?), key })
    }

    /// Reserves a call's worst case against its pool and key, or refuses it.
    fn hold(&mut self, r: &HoldRequest, now: DateTime<Utc>) -> StoreResult<Outcome> {
        let account = self.account(&r.account)?;
        let cap = match &r.key {
            Some(id) => Some(self.key_cap(&r.account, id)?),
            None => None,
        };
        let cycle = account.cycle_anchor().cycle_at(now);
        if let Some(existing) = self.snapshot.holds.get(&Ids(&r.account, &r.id)) {
            return replay_hold(existing, r).map(|outcome| Outcome::Ready(Done::Hold(outcome)));
        }
        self.tier_grant(&r.account, r.pool)?;
        let pool_id = (r.account.clone(), r.pool, us(cycle.start));
        let (_, scope) = self.pool_scope(&pool_id)?;
        let key = match (&r.key, cap) {
            (Some(id), Some(cap)) => {
                let key_id = (id.clone(), us(cycle.start));
                let t = self.key_totals(&key_id)?;
                Some((key_id, KeyScope { cap, charged: t.charged, held: t.held }))
            }
            _ => None,
        };
        let decision = match ledger::decide_hold(&scope, key.as_ref().map(|(_, k)| k), r.amount) {
            Ok(d) => d,
            Err(refusal) => {
                return Ok(Outcome::Ready(Done::Hold(HoldOutcome::Refused { refusal, resets_at: cycle.end })));
            }
        };
        let held = PoolTotals { held: r.amount, ..PoolTotals::default() };
        let key_add = key.map(|(id, _)| (id, KeyTotals { charged: Nanos::ZERO, held: r.amount }));
        let charge = self.charge(pool_id, held, key_add)?;
        let hold = Hold {
            id: r.id.clone(),
            account: r.account.clone(),
            pool: r.pool,
            key: r.key.clone(),
            amount: r.amount,
            model: r.model.clone(),
            source: r.source.clone(),
            state: HoldState::Open,
            cycle_start: cycle.start,
            cycle_end: cycle.end,
            created_at: now,
            expires_at: now + Duration::seconds(r.ttl_s as i64),
            remaining_after: decision.pool_remaining,
            made_by: r.made_by.clone(),
        };
        // No refusal after this point: the changes.
        self.apply(charge);
        let key = (r.account.clone(), r.id.clone());
        self.new_holds.push(key.clone());
        self.snapshot.holds.insert(key, HoldEntry::read(hold.clone(), r.fingerprint.clone(), None));
        Ok(Outcome::Ready(Done::Hold(HoldOutcome::Held(hold))))
    }

    /// Whether an event id is taken, by a committed event or one of this plan's; an error when
    /// the snapshot did not read the committed ones.
    fn taken(&mut self, event_key: &Ids<'_>) -> StoreResult<bool> {
        if self.new_event_ids.contains_key(event_key) || self.snapshot.taken.contains_key(event_key) {
            return Ok(true);
        }
        if !self.snapshot.knows_taken {
            self.needs_taken = true;
            return Err(needs_taken());
        }
        Ok(false)
    }

    /// The answer to a settle of a hold that is not open: the first settle's event again when
    /// this one repeats it, else a conflict.
    fn settle_again(&self, r: &SettleRequest, entry: &HoldEntry) -> StoreResult<Outcome> {
        if entry.hold.state != HoldState::Settled {
            return Err(StoreError::Conflict(format!(
                "hold {:?} is {} and can no longer be settled",
                r.hold_id,
                entry.hold.state.as_str()
            )));
        }
        let first = match entry.event {
            Some(EventRef::Seq(seq)) => self.snapshot.settled_events.get(&seq).map(|(f, e)| (f.clone(), Ok(e.clone()))),
            Some(EventRef::New(i)) => Some((self.new_events[i].event.fingerprint.clone(), Err(i))),
            None => None,
        }
        .ok_or_else(|| StoreError::Corrupt(format!("settled hold {:?} has no event", r.hold_id)))?;
        match ledger::replay(Some(first), &r.event.fingerprint) {
            Replay::Same(Ok(event)) => Ok(Outcome::Ready(Done::Event(EventOutcome::Recorded(event)))),
            Replay::Same(Err(i)) => Ok(Outcome::Recorded(i)),
            _ => Err(StoreError::Conflict(format!("hold {:?} is already settled with a different usage", r.hold_id))),
        }
    }

    /// Charges a held call's real cost, releases the hold and records its event.
    fn settle(&mut self, r: &SettleRequest, now: DateTime<Utc>) -> StoreResult<Outcome> {
        // Taken out of the snapshot while it is decided (no copy), and put back after.
        let (key, mut entry) =
            self.snapshot.holds.remove_entry(&Ids(&r.account, &r.hold_id)).ok_or_else(|| hold_not_found(&r.hold_id))?;
        let result = if entry.hold.state == HoldState::Open {
            let hold = &entry.hold;
            let mut event = r.event.clone();
            // The hold decides where the charge goes: its account, pool and key, never the event's.
            event.account = hold.account.clone();
            if event.id.is_empty() {
                event.id = hold.id.clone();
            }
            event.pool = hold.pool;
            event.key = hold.key.clone();
            self.close_hold(&key, &mut entry, event, false, now).map(Outcome::Recorded)
        } else {
            self.settle_again(r, &entry)
        };
        self.snapshot.holds.insert(key, entry);
        result
    }

    /// Charges `event` against the whole of an open hold and closes it: settled, or expired
    /// when `unsettled` (charged exactly its held amount). Its place among the new events.
    fn close_hold(
        &mut self,
        key: &(String, String),
        entry: &mut HoldEntry,
        event: NewEvent,
        unsettled: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<usize> {
        let hold = &entry.hold;
        let (_, ppm) = self.tier_grant(&hold.account, hold.pool)?;
        // An unsettled hold is charged exactly its held amount, which already includes any multiplier.
        let ppm = if unsettled { PPM } else { ppm };
        let pool_id = (hold.account.clone(), hold.pool, us(hold.cycle_start));
        let (_, scope) = self.pool_scope(&pool_id)?;
        let settlement = match ledger::settle(hold.amount, event.cost, &scope, ppm) {
            Ok(settlement) => settlement,
            // A taken event id is reported before a bad amount.
            Err(refusal) => {
                return Err(if self.taken(&Ids(&event.account, &event.id))? {
                    event_id_taken(&event.id)
                } else {
                    StoreError::Refused(refusal)
                });
            }
        };
        let charge = self.charge_hold(hold, pool_id, settlement.split, hold.amount)?;
        // An id taken by a committed event the snapshot did not read is found by the insert's
        // uniqueness check: the backend then decides again with the taken ids read.
        let event_key = Ids(&event.account, &event.id);
        if self.new_event_ids.contains_key(&event_key) || self.snapshot.taken.contains_key(&event_key) {
            return Err(event_id_taken(&event.id));
        }
        // No refusal after this point: the changes.
        self.apply(charge);
        let i = self.push_event(ChargedEvent { unsettled, ..ChargedEvent::of_hold(event, hold, settlement, now) });
        entry.hold.state = if unsettled { HoldState::Expired } else { HoldState::Settled };
        entry.event = Some(EventRef::New(i));
        self.changed_holds.insert(key.clone());
        Ok(i)
    }

    /// The totals once `split` is charged to `hold`'s pool and key and `release` of it is freed.
    fn charge_hold(&self, hold: &Hold, pool: PoolId, split: Split, release: Nanos) -> StoreResult<Charge> {
        let freed = Nanos(-release.0);
        let add = PoolTotals { grants: Nanos::ZERO, used: split.grant, overage: split.overage, held: freed };
        let key = hold
            .key
            .as_ref()
            .map(|k| ((k.clone(), us(hold.cycle_start)), KeyTotals { charged: split.total(), held: freed }));
        self.charge(pool, add, key)
    }

    /// Charges one call's event against `release` of an open hold, which stays open with the
    /// rest (a lease). A repeat of the part answers with the first.
    fn settle_part(&mut self, r: &SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Outcome> {
        let event_key = Ids(&r.account, &r.event.id);
        // A repeat of a part this plan charges already: the same answer, or a conflict.
        if let Some(&i) = self.new_event_ids.get(&event_key) {
            return match ledger::replay(Some((self.new_events[i].event.fingerprint.clone(), i)), &r.event.fingerprint) {
                Replay::Same(i) => Ok(Outcome::Recorded(i)),
                _ => Err(StoreError::Conflict(format!(
                    "event id {:?} is already recorded with different content; use another event id",
                    r.event.id
                ))),
            };
        }
        if let Some(event) = crate::replay_part(r, self.snapshot.taken.get(&event_key).cloned())? {
            return Ok(Outcome::Ready(Done::Event(EventOutcome::Recorded(event))));
        }
        let charged = self.charge_part(r, release, now);
        // A repeat of a part recorded before its lease closed is answered with that part, not
        // refused: only a snapshot that read the taken ids knows.
        if charged.is_err() && !self.snapshot.knows_taken {
            self.needs_taken = true;
            return Err(needs_taken());
        }
        charged
    }

    fn charge_part(&mut self, r: &SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Outcome> {
        // Taken out of the snapshot while it is decided (no copy), and put back after.
        let (key, mut entry) =
            self.snapshot.holds.remove_entry(&Ids(&r.account, &r.hold_id)).ok_or_else(|| hold_not_found(&r.hold_id))?;
        let result = self.charge_part_of(r, &mut entry, release, now);
        if result.is_ok() {
            self.changed_holds.insert(key.clone());
        }
        self.snapshot.holds.insert(key, entry);
        result
    }

    fn charge_part_of(
        &mut self,
        r: &SettleRequest,
        entry: &mut HoldEntry,
        release: Nanos,
        now: DateTime<Utc>,
    ) -> StoreResult<Outcome> {
        let hold = &entry.hold;
        let event = crate::part_event(r, hold, release)?;
        let (_, ppm) = self.tier_grant(&hold.account, hold.pool)?;
        let pool_id = (hold.account.clone(), hold.pool, us(hold.cycle_start));
        let (_, scope) = self.pool_scope(&pool_id)?;
        let settlement = ledger::settle(release, event.cost, &scope, ppm).map_err(StoreError::Refused)?;
        let charge = self.charge_hold(hold, pool_id, settlement.split, release)?;
        // No refusal after this point: the changes.
        self.apply(charge);
        let i = self.push_event(ChargedEvent::of_hold(event, hold, settlement, now));
        entry.hold.amount = Nanos(entry.hold.amount.0 - release.0);
        entry.parted = true;
        Ok(Outcome::Recorded(i))
    }

    /// Releases an open hold without charge; a hold voided already is answered as it is.
    fn void(&mut self, account: &str, hold_id: &str) -> StoreResult<Hold> {
        let key = (account.to_string(), hold_id.to_string());
        let entry = self.snapshot.holds.get(&key).ok_or_else(|| hold_not_found(hold_id))?;
        match entry.hold.state {
            HoldState::Open => {}
            HoldState::Voided => return Ok(entry.hold.clone()),
            state => {
                return Err(StoreError::Conflict(format!(
                    "hold {hold_id:?} is {} and can no longer be voided",
                    state.as_str()
                )));
            }
        }
        let h = entry.hold.clone();
        let charge =
            self.charge_hold(&h, (account.to_string(), h.pool, us(h.cycle_start)), Split::default(), h.amount)?;
        self.apply(charge);
        #[allow(clippy::expect_used, reason = "found under this key above; charge_hold and apply remove no hold")]
        let entry = self.snapshot.holds.get_mut(&key).expect("the hold read above");
        entry.hold.state = HoldState::Voided;
        self.changed_holds.insert(key);
        Ok(entry.hold.clone())
    }

    /// Pushes an open hold's expiry to `now + ttl`.
    fn extend(&mut self, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
        let key = (account.to_string(), hold_id.to_string());
        let entry = self.snapshot.holds.get_mut(&key).ok_or_else(|| hold_not_found(hold_id))?;
        if entry.hold.state != HoldState::Open {
            return Err(StoreError::Conflict(format!("hold {hold_id:?} is {}", entry.hold.state.as_str())));
        }
        entry.hold.expires_at = now + Duration::seconds(ttl_s as i64);
        entry.expires_changed = true;
        let hold = entry.hold.clone();
        self.changed_holds.insert(key);
        Ok(hold)
    }

    /// Records usage that already happened on its pool (no hold); a repeat answers with the
    /// first.
    fn record(&mut self, e: &NewEvent, now: DateTime<Utc>) -> StoreResult<Outcome> {
        let event_key = Ids(&e.account, &e.id);
        let earlier = match (self.new_event_ids.get(&event_key), self.snapshot.taken.get(&event_key)) {
            (Some(&i), _) => Some((self.new_events[i].event.fingerprint.clone(), Outcome::Repeat(i))),
            (None, Some((f, event))) => {
                Some((f.clone(), Outcome::Ready(Done::Event(EventOutcome::Duplicate(event.clone())))))
            }
            (None, None) if !self.snapshot.knows_taken => {
                self.needs_taken = true;
                return Err(needs_taken());
            }
            (None, None) => None,
        };
        match ledger::replay(earlier, &e.fingerprint) {
            Replay::Same(outcome) => return Ok(outcome),
            Replay::Conflict => {
                return Err(StoreError::Conflict(format!(
                    "event id {:?} was already recorded with different content; use a new id",
                    e.id
                )));
            }
            Replay::New => {}
        }
        let account = self.account(&e.account)?;
        if let Some(key) = &e.key {
            self.key_cap(&e.account, key)?;
        }
        let cycle = account.cycle_anchor().cycle_at(e.timestamp);
        let (_, ppm) = self.tier_grant(&e.account, e.pool)?;
        let pool_id = (e.account.clone(), e.pool, us(cycle.start));
        let (_, scope) = self.pool_scope(&pool_id)?;
        let split = ledger::split_charge(e.cost, &scope, ppm).map_err(StoreError::Refused)?;
        let add = PoolTotals { grants: Nanos::ZERO, used: split.grant, overage: split.overage, held: Nanos::ZERO };
        let key = e
            .key
            .as_ref()
            .map(|k| ((k.clone(), us(cycle.start)), KeyTotals { charged: split.total(), held: Nanos::ZERO }));
        let charge = self.charge(pool_id, add, key)?;
        self.apply(charge);
        Ok(Outcome::Recorded(self.push_event(ChargedEvent::direct(e.clone(), cycle.start, split, now))))
    }

    /// Settles an open hold at its held amount, flagged `unsettled`; a hold no longer open (ended
    /// meanwhile by another writer) is answered as it is, unchanged.
    fn expire(&mut self, account: &str, hold_id: &str, now: DateTime<Utc>) -> StoreResult<Outcome> {
        let (key, mut entry) =
            self.snapshot.holds.remove_entry(&Ids(account, hold_id)).ok_or_else(|| hold_not_found(hold_id))?;
        let result = if entry.hold.state == HoldState::Open {
            match self.taken(&Ids(account, hold_id)) {
                Ok(id_taken) => {
                    let event = entry.hold.unsettled_event(id_taken);
                    self.close_hold(&key, &mut entry, event, true, now).map(Outcome::Recorded)
                }
                Err(e) => Err(e),
            }
        } else {
            Ok(Outcome::Ready(Done::Changed(entry.hold.clone())))
        };
        self.snapshot.holds.insert(key, entry);
        result
    }
}
