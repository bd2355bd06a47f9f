//! The storage boundary of tollgate: the [`Store`] trait and the records it keeps. The test
//! suite every backend must pass is the dev-only `tollgate-conformance` crate.
//!
//! Architecture invariant: a backend makes each ledger write atomic *in the store*: the limit
//! check of a hold happens inside the same transaction (or single-writer step) that records the
//! hold, using the decisions of `tollgate-core`. No backend may rely on one process's memory to
//! keep a cap exact, so several processes can share one database. A write is acknowledged only
//! once it is durable (fsync'd). This crate knows no SQL and no wire format.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

pub mod alerts;
pub mod audit;
pub mod feed;
pub mod ownership;
pub mod report;
pub mod rows;
pub mod step;
mod types;

pub use types::*;

/// `Store::settle_part` before its hold is read: the event id it needs, and a repeat of it
/// (`first`: the event already recorded under that id, with its fingerprint) answered with the
/// first result or refused as a conflict. `Ok(None)`: a new part, to settle.
pub fn replay_part(req: &SettleRequest, first: Option<(String, Event)>) -> StoreResult<Option<Event>> {
    if req.event.id.is_empty() {
        return Err(StoreError::Invalid("a part settle needs an event id of its own".into()));
    }
    match tollgate_core::ledger::replay(first, &req.event.fingerprint) {
        tollgate_core::ledger::Replay::New => Ok(None),
        tollgate_core::ledger::Replay::Same(event) => Ok(Some(event)),
        tollgate_core::ledger::Replay::Conflict => Err(StoreError::Conflict(format!(
            "event id {:?} is already recorded with different content; use another event id",
            req.event.id
        ))),
    }
}

/// `Store::settle_part` once its hold is read (and locked): refuses a hold that is not open or a
/// part it does not hold, and returns the event to charge, with the hold's account, pool and key.
pub fn part_event(req: &SettleRequest, hold: &Hold, release: Nanos) -> StoreResult<NewEvent> {
    if hold.state != HoldState::Open {
        return Err(StoreError::Conflict(format!(
            "hold {:?} is {} and can no longer be settled",
            req.hold_id,
            hold.state.as_str()
        )));
    }
    if release.0 < 0 || release > hold.amount {
        return Err(StoreError::Invalid(format!(
            "cannot release {release} of hold {:?}, which holds {}",
            req.hold_id, hold.amount
        )));
    }
    let mut event = req.event.clone();
    event.account = hold.account.clone();
    event.pool = hold.pool;
    event.key = hold.key.clone();
    Ok(event)
}

/// Hex SHA-256 of a secret: how key secrets (and the admin token) are kept and looked up.
pub fn hash_secret(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::{Nanos, PoolKind, PoolPolicy, Tier};

/// Errors of the store, by kind; the API maps them to statuses in one place
/// (`tollgate-server` `error.rs`). `Invalid`, `NotFound`, `Conflict` and `Refused` are the
/// caller's to fix; `Corrupt` and `Backend` are ours (a row the store cannot read, a bug);
/// `Unavailable` is the store being away for a while (its database server restarting or its
/// connection lost, its disk full): the write did not happen or its outcome is unknown, and the
/// same write later (every write has an idempotency id) is safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The ledger refused an amount: negative, or past the range of its integers.
    #[error("amount out of range ({})", .0.code())]
    Refused(tollgate_core::Refusal),
    /// A stored row that breaks the ledger's rules or cannot be read.
    #[error("corrupt database: {0}")]
    Corrupt(String),
    #[error("storage error: {0}")]
    Backend(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything tollgate keeps. Every method that takes `now` uses it as the clock; none reads the
/// system clock, so tests drive time.
#[async_trait]
pub trait Store: alerts::AlertStore + report::ReportStore + Send + Sync + 'static {
    /// Creates or replaces a tier.
    async fn put_tier(&self, tier: Tier) -> StoreResult<()>;
    async fn tiers(&self) -> StoreResult<Vec<Tier>>;

    /// Creates an account; `Conflict` if the id exists, `Invalid` if its tier does not.
    async fn create_account(&self, account: NewAccount, now: DateTime<Utc>) -> StoreResult<Account>;
    /// Changes tier, grants, anchor or timezone. Anchor and timezone can change only while the
    /// account has no ledger state (the cycles it was billed in must not move).
    async fn update_account(&self, id: &str, update: AccountUpdate) -> StoreResult<Account>;
    async fn account(&self, id: &str) -> StoreResult<Option<Account>>;
    async fn accounts(&self) -> StoreResult<Vec<Account>>;

    async fn set_policy(&self, account: &str, pool: PoolKind, policy: PoolPolicy) -> StoreResult<()>;
    async fn policy(&self, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy>;

    /// Adds a grant (top-up) to the pool's cycle that contains `now`.
    async fn add_grant(&self, grant: NewGrant, now: DateTime<Utc>) -> StoreResult<Grant>;
    /// The grants of the cycle containing `now` (the tier's grant included).
    async fn grants(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Vec<Grant>>;

    async fn create_key(&self, key: NewKey, now: DateTime<Utc>) -> StoreResult<Key>;
    async fn keys(&self, account: &str) -> StoreResult<Vec<Key>>;
    /// The key whose secret hashes to `secret_hash`, revoked or not.
    async fn key_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Key>>;
    async fn revoke_key(&self, account: &str, key_id: &str, now: DateTime<Utc>) -> StoreResult<Key>;

    /// The account's balance in the cycle containing `now`.
    async fn balance(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Balance>;

    /// Reserves an amount against every scope of the call, atomically, or refuses it.
    async fn hold(&self, request: HoldRequest, now: DateTime<Utc>) -> StoreResult<HoldOutcome>;
    /// Charges the real cost of a held call and releases the hold; records its event.
    async fn settle(&self, request: SettleRequest, now: DateTime<Utc>) -> StoreResult<Event>;
    /// Charges one call's event against `release` of an open hold's amount and keeps the hold
    /// open with the rest: a gateway's lease, one durable hold that covers many calls (see
    /// ARCHITECTURE.md). The hold is marked a lease, whose several events `audit` accepts; its
    /// rest is voided, settled or expired like any hold. The event needs an id of its own; a
    /// repeat of it returns the first result.
    async fn settle_part(&self, request: SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Event>;
    /// Releases a hold without charge.
    async fn void(&self, account: &str, hold_id: &str, now: DateTime<Utc>) -> StoreResult<Hold>;
    /// Pushes an open hold's expiry to `now + ttl` (a gateway stream still alive).
    async fn extend_hold(&self, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold>;
    async fn hold_by_id(&self, account: &str, hold_id: &str) -> StoreResult<Option<Hold>>;

    /// Records usage that already happened. All or nothing: a conflicting id fails the batch.
    async fn record_events(&self, events: Vec<NewEvent>, now: DateTime<Utc>) -> StoreResult<Vec<EventOutcome>>;
    async fn events(&self, query: EventQuery) -> StoreResult<Vec<Event>>;

    /// Settles every open hold whose time to live has passed at its held amount, flagged
    /// `unsettled`. Returns the events written.
    async fn expire_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>>;
    /// At start: settles the open holds this process can no longer finish (for a single-process
    /// backend, all of them) like expired ones.
    async fn recover_open_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>>;

    /// Verifies the ledger invariants (SPEC section 3) over the whole database.
    async fn audit(&self) -> StoreResult<Audit>;
}
