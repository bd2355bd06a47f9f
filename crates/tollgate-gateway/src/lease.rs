//! ScopeLeases: budget held durably in chunks, so that a call's hold does not wait for a disk write
//! of its own (SPEC section 3: holds are durable before the call is forwarded; here the lease is).
//!
//! A lease is an ordinary store hold of `lease_usd`, made for one (account, pool, key). A call
//! whose worst case fits the unused part of a lease takes that part in memory and is forwarded at
//! once; its settle charges its event against the lease (`Store::settle_part`), and a call that
//! ends unbilled gives its part back without a write. A call that fits no lease is held on its own,
//! as without leases, and asks for a lease in the background for the calls after it.
//!
//! Exactness is unchanged: the store counts a lease as held, so charged + held never passes a
//! `block` limit. What changes is a crash: a lease left open is expired like any hold, charged its
//! held amount (its unused part too) and flagged `unsettled` for reconciliation. ScopeLeases are only
//! taken while the pool has at least `LEASES_MAX_SHARE` leases' worth left, so the last credit of
//! a pool is always held call by call; an idle lease is voided after `IDLE`, and all of them when
//! the gateway closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::{Nanos, PoolKind};
use tollgate_store::{HoldOutcome, HoldRequest, Key, Store, StoreError};

use crate::metrics::{LeaseLabels, Metrics};
use crate::retry::{until_stored, void_unknown_hold};
use crate::{Clock, Monotonic};

/// A lease unused for this long is voided.
const IDLE: Duration = Duration::from_secs(2);
/// How often idle leases are voided and busy ones extended.
const TICK: Duration = Duration::from_millis(500);
/// A new lease is taken only while the pool's remaining covers this many leases.
const LEASES_MAX_SHARE: i64 = 8;
/// How long a refused call waits for the calls on draining leases to end.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How long closing waits for the last calls on leases to settle.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After a lease was refused or not taken, wait this long before asking again.
const BACKOFF: Duration = Duration::from_secs(1);
/// Most leases open at once per (account, pool, key), counting one being taken: the one in use
/// and the next (SPEC section 3, "ScopeLeases stay bounded"). What a crash can charge as `unsettled`
/// for work not in flight is at most this many × `lease_usd` per key and pool.
pub const LEASES_PER_SCOPE_MAX: usize = 2;

/// What a lease is for: one key's calls in one pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Scope {
    account: String,
    pool: PoolKind,
    key: String,
}

#[derive(Debug)]
struct Lease {
    id: String,
    /// The part no call has taken.
    free: Nanos,
    calls: u32,
    used: Instant,
    extended: Instant,
    /// No new calls: voided once its calls are done.
    draining: bool,
}

#[derive(Debug, Default)]
struct ScopeLeases {
    open: Vec<Lease>,
    /// A lease is being taken (at most one at a time per scope).
    taking: bool,
    /// No new lease before this instant.
    not_before: Option<Instant>,
    /// The pool's remaining after the last store hold of the scope (None: unlimited).
    remaining: Option<Nanos>,
}

/// (account, lease id).
type LeaseRef = (String, String);

/// A call's part of a lease.
#[derive(Clone, Debug)]
pub struct Part {
    pub lease_id: String,
    pub amount: Nanos,
    /// Less than a quarter of the lease is left unused: time to take the next one.
    pub low: bool,
}

/// The gateway's leases, per (account, pool, key).
pub struct LeaseBook {
    scopes: Mutex<HashMap<Scope, ScopeLeases>>,
    ticking: AtomicBool,
    /// The gateway is stopping: a lease that arrives now is voided at once.
    closed: AtomicBool,
    /// What lease timing reads: when a lease was last used or extended, back-off.
    now: Monotonic,
}

impl LeaseBook {
    pub fn new(now: Monotonic) -> LeaseBook {
        LeaseBook { scopes: Mutex::default(), ticking: AtomicBool::new(false), closed: AtomicBool::new(false), now }
    }
}

pub fn scope(key: &Key, pool: PoolKind) -> Scope {
    Scope { account: key.account.clone(), pool, key: key.id.clone() }
}

impl LeaseBook {
    /// Takes `amount` from an open lease of the scope, if one has that much unused. ScopeLeases are
    /// used oldest first; a lease too low for the call (under a quarter left) is retired: it
    /// takes no new call and is voided, giving its rest back, once its last call is done. So at
    /// most one lease is in use and one is next.
    pub fn take(&self, key: &Key, pool: PoolKind, amount: Nanos, size: Nanos) -> Option<Part> {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let leases = scopes.get_mut(&scope(key, pool))?;
        let quarter = size.0 / 4;
        let mut found = None;
        for (i, lease) in leases.open.iter_mut().enumerate().filter(|(_, l)| !l.draining) {
            if lease.free >= amount {
                found = Some(i);
                break;
            }
            if lease.free.0 < quarter {
                lease.draining = true;
            }
        }
        let lease = &mut leases.open[found?];
        lease.free = Nanos(lease.free.0 - amount.0);
        lease.calls += 1;
        lease.used = (self.now)();
        let low = lease.free.0 < quarter;
        Some(Part { lease_id: lease.id.clone(), amount, low })
    }

    /// The pool's remaining after the scope's last store hold, leases not counted.
    #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
    fn last_remaining(&self, scope: &Scope) -> Option<Nanos> {
        self.scopes.lock().expect("leases").get(scope).and_then(|l| l.remaining)
    }

    /// A call's part is done: `charged` when its event was charged against the lease (the store
    /// released the part), otherwise the call gives the part back unused. The lease counts as
    /// used until then (its idle time starts when its last call ends). Returns the lease's id
    /// when it was draining and this was its last call: it leaves the book, to be voided now.
    fn done(&self, scope: &Scope, part: &Part, charged: bool) -> Option<String> {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let leases = scopes.get_mut(scope)?;
        let i = leases.open.iter().position(|l| l.id == part.lease_id)?;
        let lease = &mut leases.open[i];
        lease.calls = lease.calls.saturating_sub(1);
        lease.used = (self.now)();
        if !charged {
            lease.free = lease.free.saturating_add(part.amount);
        }
        (lease.draining && lease.calls == 0).then(|| leases.open.remove(i).id)
    }

    /// Whether a lease on an account's pool is draining with calls still on it.
    fn draining(&self, account: &str, pool: PoolKind) -> bool {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let scopes = self.scopes.lock().expect("leases");
        scopes
            .iter()
            .filter(|(s, _)| s.account == account && s.pool == pool)
            .flat_map(|(_, l)| l.open.iter())
            .any(|l| l.draining)
    }

    /// A part's settle failed: the lease leaves the book without being voided, so the sweeper
    /// expires it at what it still holds (flagged `unsettled`), as a hold whose settle failed.
    pub fn abandon(&self, scope: &Scope, part: &Part) {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        if let Some(leases) = scopes.get_mut(scope) {
            leases.open.retain(|l| l.id != part.lease_id);
        }
    }

    /// The unused part of this gateway's leases on an account's pool (all keys): held in the
    /// store, but not spent by any call.
    pub fn unused(&self, account: &str, pool: PoolKind) -> Nanos {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let scopes = self.scopes.lock().expect("leases");
        scopes
            .iter()
            .filter(|(s, _)| s.account == account && s.pool == pool)
            .flat_map(|(_, l)| l.open.iter())
            .fold(Nanos::ZERO, |sum, l| sum.saturating_add(l.free))
    }

    /// The pool's remaining as of the last store write for the scope, plus its leases' unused
    /// part (None: unlimited or not known).
    pub fn remaining(&self, scope: &Scope) -> Option<Nanos> {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let scopes = self.scopes.lock().expect("leases");
        let leases = scopes.get(scope)?;
        let unused = leases.open.iter().fold(Nanos::ZERO, |s, l| s.saturating_add(l.free));
        leases.remaining.map(|r| r.saturating_add(unused))
    }

    /// Marks the leases on an account's pool (every key's) draining, so no new call takes
    /// them, and returns those with no call left, to void: a call was refused, so their unused
    /// credit goes back to the pool.
    fn drain(&self, account: &str, pool: PoolKind) -> Vec<String> {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let mut idle = Vec::new();
        for (_, leases) in scopes.iter_mut().filter(|(s, _)| s.account == account && s.pool == pool) {
            leases.not_before = Some((self.now)() + BACKOFF);
            leases.open.iter_mut().for_each(|l| l.draining = true);
            let (done, busy): (Vec<Lease>, Vec<Lease>) = leases.open.drain(..).partition(|l| l.calls == 0);
            leases.open = busy;
            idle.extend(done.into_iter().map(|l| l.id));
        }
        idle
    }

    /// Whether to take a new lease for the scope now; if so, marks it being taken. Never while
    /// `LEASES_PER_SCOPE_MAX` are open or being taken, draining ones included (they still hold).
    fn should_take(&self, scope: &Scope) -> bool {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let leases = scopes.entry(scope.clone()).or_default();
        if leases.taking
            || leases.open.len() + usize::from(leases.taking) >= LEASES_PER_SCOPE_MAX
            || leases.not_before.is_some_and(|t| (self.now)() < t)
        {
            return false;
        }
        leases.taking = true;
        true
    }

    /// Files a lease just taken; returns it instead when the gateway closed meanwhile, to void.
    fn taken(&self, scope: &Scope, lease: Option<Lease>, remaining: Option<Nanos>) -> Option<Lease> {
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let leases = scopes.entry(scope.clone()).or_default();
        leases.taking = false;
        leases.remaining = remaining;
        match lease {
            Some(l) if self.closed.load(Ordering::Relaxed) => Some(l),
            Some(l) => {
                leases.open.push(l);
                None
            }
            None => {
                leases.not_before = Some((self.now)() + BACKOFF);
                None
            }
        }
    }

    /// How many leases are open (filed, ready for calls).
    #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
    pub fn open(&self) -> usize {
        self.scopes.lock().expect("leases").values().map(|l| l.open.len()).sum()
    }

    /// Whether any lease is open or being taken.
    #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
    fn any(&self) -> bool {
        self.scopes.lock().expect("leases").values().any(|l| l.taking || !l.open.is_empty())
    }

    /// ScopeLeases to void (idle, or draining with no call left) and leases to extend (half their
    /// time to live gone), as (account, lease id) pairs.
    fn tick(&self, ttl: Duration, closing: bool) -> (Vec<LeaseRef>, Vec<LeaseRef>) {
        let now = (self.now)();
        #[allow(clippy::expect_used, reason = "never poisoned: nothing done under the lease book's lock can panic")]
        let mut scopes = self.scopes.lock().expect("leases");
        let (mut void, mut extend) = (Vec::new(), Vec::new());
        for (scope, leases) in scopes.iter_mut() {
            leases.open.retain_mut(|l| {
                let done = l.calls == 0 && (closing || l.draining || now - l.used >= IDLE);
                if done {
                    void.push((scope.account.clone(), l.id.clone()));
                } else if now - l.extended >= ttl / 2 {
                    l.extended = now;
                    extend.push((scope.account.clone(), l.id.clone()));
                }
                !done
            });
        }
        (void, extend)
    }
}

/// The gateway's leases, and what taking, extending and giving them back needs.
pub struct Leases {
    pub book: LeaseBook,
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Metrics,
    /// `lease_usd`; zero: every call is held on its own.
    size: Nanos,
    ttl_s: u64,
}

impl Leases {
    pub fn new(store: Arc<dyn Store>, clocks: (Clock, Monotonic), metrics: Metrics, size: Nanos, ttl_s: u64) -> Leases {
        let (clock, monotonic) = clocks;
        Leases { book: LeaseBook::new(monotonic), store, clock, metrics, size, ttl_s }
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.clock)()
    }

    /// Asks for a lease for the scope in the background, unless one is being taken or was refused
    /// lately. `remaining` is the pool's remaining after the call's own hold (None: unlimited).
    pub fn top_up(self: &Arc<Self>, key: &Key, pool: PoolKind, remaining: Option<Nanos>) {
        let size = self.size;
        if size.0 <= 0 || self.book.closed.load(Ordering::Relaxed) {
            return;
        }
        let scope = scope(key, pool);
        if remaining.is_some_and(|r| r.0 / LEASES_MAX_SHARE < size.0) {
            self.book.taken(&scope, None, remaining);
            return;
        }
        if !self.book.should_take(&scope) {
            return;
        }
        self.start_ticking();
        let (this, key_id) = (self.clone(), key.id.clone());
        tokio::spawn(async move {
            let id = match crate::id::request_id() {
                Ok(id) => format!("lease_{id}"),
                Err(e) => {
                    tracing::warn!(error = ?e, "could not take a lease; calls are held one by one");
                    this.book.taken(&scope, None, remaining);
                    return;
                }
            };
            let request = HoldRequest {
                account: scope.account.clone(),
                id,
                pool,
                key: Some(key_id),
                amount: size,
                ttl_s: this.ttl_s,
                model: None,
                source: Some("lease".into()),
                fingerprint: String::new(),
                made_by: tollgate_store::Maker::Gateway,
            };
            let (account, id) = (request.account.clone(), request.id.clone());
            let held = this.store.hold(request, this.now()).await;
            if let Err(StoreError::Unavailable(_)) = &held {
                // Whether the lease was taken is not known (a lost connection can hide a commit):
                // give it back, so that it is not left to expire at its whole amount.
                void_unknown_hold(this.store.clone(), this.now(), this.ttl_s, account, id);
            }
            // A hold whose first answer was lost with its connection comes back `Replayed` when the
            // store runs it again: it is the lease all the same (before, it was left open until it
            // expired, charged whole as `unsettled`).
            let held = held.map(|outcome| match outcome {
                HoldOutcome::Replayed(h) => HoldOutcome::Held(h),
                other => other,
            });
            if let Ok(HoldOutcome::Held(_)) = &held {
                this.metrics.leases.get_or_create(&LeaseLabels { outcome: "taken" }).inc();
            }
            let (lease, remaining) = match held {
                Ok(HoldOutcome::Held(h)) if this.book.closed.load(Ordering::Relaxed) => {
                    this.void(&scope.account, &h.id).await;
                    (None, remaining)
                }
                Ok(HoldOutcome::Held(h)) if h.remaining_after.is_none_or(|r| r.0 / LEASES_MAX_SHARE >= size.0) => {
                    let now = (this.book.now)();
                    let lease = Lease { id: h.id, free: size, calls: 0, used: now, extended: now, draining: false };
                    (Some(lease), h.remaining_after)
                }
                Ok(HoldOutcome::Held(h)) => {
                    // The pool is near its end: give the lease back at once.
                    this.void(&scope.account, &h.id).await;
                    (None, h.remaining_after.map(|r| r.saturating_add(size)))
                }
                Ok(_) => (None, remaining),
                Err(e) => {
                    tracing::warn!(error = %e, "could not take a lease; calls are held one by one");
                    (None, remaining)
                }
            };
            if let Some(late) = this.book.taken(&scope, lease, remaining) {
                this.void(&scope.account, &late.id).await;
            }
        });
    }

    /// A call took a part of a lease that is running low: takes the next one in the background.
    pub fn next(self: &Arc<Self>, key: &Key, pool: PoolKind) {
        let remaining = self.book.last_remaining(&scope(key, pool));
        self.top_up(key, pool, remaining);
    }

    /// A call did not fit: gives the unused leases on its pool back, waiting (up to `DRAIN_WAIT`)
    /// for the calls still on them to end, since each busy lease is voided with its last call.
    /// Returns whether any credit was given back (then the call is worth holding again).
    pub async fn give_back(&self, key: &Key, pool: PoolKind) -> bool {
        let idle = self.book.drain(&key.account, pool);
        for id in &idle {
            self.void(&key.account, id).await;
        }
        let mut waited = false;
        let deadline = Instant::now() + DRAIN_WAIT;
        while self.book.draining(&key.account, pool) && Instant::now() < deadline {
            waited = true;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waited || !idle.is_empty()
    }

    /// A call's part is done (see [`LeaseBook::done`]); voids the lease if it was draining and this
    /// was its last call.
    pub async fn done(&self, scope: &Scope, part: &Part, charged: bool) {
        if let Some(id) = self.book.done(scope, part, charged) {
            self.void(&scope.account, &id).await;
        }
    }

    /// Voids every lease once its calls are done (waiting up to `CLOSE_WAIT` for the settles of the
    /// last calls); the gateway calls it when it stops. A lease still busy after that is left to
    /// expire.
    pub async fn close(&self) {
        self.book.closed.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            let (idle, _) = self.book.tick(Duration::from_secs(self.ttl_s), true);
            for (account, id) in idle {
                self.void(&account, &id).await;
            }
            if !self.book.any() || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn void(&self, account: &str, id: &str) {
        self.metrics.leases.get_or_create(&LeaseLabels { outcome: "voided" }).inc();
        let now = self.now();
        if let Err(e) = until_stored(self.ttl_s, "void", || self.store.void(account, id, now)).await {
            tracing::error!(error = %e, lease = %id, "could not void a lease; the sweeper will expire it");
        }
    }

    /// Starts, once, the task that voids idle leases and extends busy ones.
    fn start_ticking(self: &Arc<Self>) {
        if self.book.ticking.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        // Often enough to extend a lease before it expires, however short the time to live.
        let period = TICK.min(Duration::from_secs(self.ttl_s.max(1)) / 4);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            loop {
                every.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let ttl = Duration::from_secs(this.ttl_s);
                let (idle, busy) = this.book.tick(ttl, false);
                for (account, id) in idle {
                    this.void(&account, &id).await;
                }
                for (account, id) in busy {
                    if let Err(e) = this.store.extend_hold(&account, &id, this.ttl_s, this.now()).await {
                        tracing::warn!(error = %e, lease = %id, "could not extend a lease");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::Utc;
    use tollgate_store::KeyPool;

    use super::*;

    /// A monotonic clock the test moves by hand.
    fn manual() -> (Monotonic, Arc<Mutex<Instant>>) {
        let at = Arc::new(Mutex::new(Instant::now()));
        let read = at.clone();
        (Arc::new(move || *read.lock().expect("clock")), at)
    }

    fn key() -> Key {
        Key {
            id: "k-1".into(),
            account: "acme".into(),
            name: None,
            pool: KeyPool::Fixed(PoolKind::Programmatic),
            labels: Default::default(),
            cap: None,
            created_at: Utc::now(),
            revoked_at: None,
        }
    }

    fn lease(id: &str, free: i64, at: Instant) -> Lease {
        Lease { id: id.into(), free: Nanos(free), calls: 0, used: at, extended: at, draining: false }
    }

    /// A lease unused for `IDLE` is voided by the next tick, not before; one in use is extended
    /// once half its time to live has passed, and again half a time to live later.
    #[test]
    fn idle_and_extension_follow_the_injected_clock() {
        let (clock, at) = manual();
        let book = LeaseBook::new(clock);
        let (k, pool, ttl) = (key(), PoolKind::Programmatic, IDLE * 10);
        let s = scope(&k, pool);
        assert!(book.should_take(&s), "the first lease of a scope is taken");
        let start = *at.lock().expect("clock");
        assert!(book.taken(&s, Some(lease("L1", 1_000, start)), None).is_none(), "filed");
        let part = book.take(&k, pool, Nanos(100), Nanos(1_000)).expect("the lease covers the call");

        *at.lock().expect("clock") = start + IDLE * 10;
        let (void, extend) = book.tick(ttl, false);
        assert!(void.is_empty(), "a lease with a call in flight is never voided: {void:?}");
        assert_eq!(extend, [("acme".to_string(), "L1".to_string())], "half its ttl gone: extended");
        assert!(book.tick(ttl, false).1.is_empty(), "extended once, not again at the same instant");

        book.done(&s, &part, true);
        *at.lock().expect("clock") = start + IDLE * 10 + IDLE - Duration::from_millis(1);
        assert!(book.tick(ttl, false).0.is_empty(), "its call ended less than IDLE ago: kept");
        *at.lock().expect("clock") = start + IDLE * 10 + IDLE;
        assert_eq!(book.tick(ttl, false).0, [("acme".to_string(), "L1".to_string())], "idle: voided");
        assert_eq!(book.open(), 0, "no lease left");
    }

    /// After a refusal, no lease is asked for during `BACKOFF`, by the injected clock.
    #[test]
    fn back_off_follows_the_injected_clock() {
        let (clock, at) = manual();
        let book = LeaseBook::new(clock);
        let s = scope(&key(), PoolKind::Programmatic);
        assert!(book.should_take(&s));
        assert!(book.taken(&s, None, None).is_none(), "refused: nothing filed");
        assert!(!book.should_take(&s), "backing off");
        let start = *at.lock().expect("clock");
        *at.lock().expect("clock") = start + BACKOFF - Duration::from_millis(1);
        assert!(!book.should_take(&s), "still backing off just before BACKOFF");
        *at.lock().expect("clock") = start + BACKOFF;
        assert!(book.should_take(&s), "asks again once BACKOFF has passed");
    }
}
