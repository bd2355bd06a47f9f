//! The ledger's writes that run in a transaction of their own (events, grants, expiry; holds,
//! settles, voids and extensions run in the batches of `batch`). Each reads the state it needs,
//! asks `tollgate-core` for the decision, and writes the result; the rows that decision depends
//! on stay locked until the transaction commits, so several processes can write one database
//! and a `block` limit still holds exactly.
//!
//! Lock order. Every transaction (here and in `batch`) takes its row locks in this order, so no
//! two can wait on each other in a circle (PostgreSQL would abort one of them; the caller retries
//! it all the same):
//! 1. rows of holds that already exist, waiting for each, several only in (account, id) order,
//!    bytewise: a batch's settles, voids, extensions and repeated holds; an expiry's holds;
//! 2. `pool_cycles` rows, several only in (account, pool, cycle start) order, bytewise;
//! 3. `key_cycles` rows, several only in (key, cycle start) order;
//! 4. the event-order locks of the accounts whose events it inserts ([`lock_event_order`]),
//!    several at once in one statement, in the order of their lock keys;
//! 5. new rows (holds, events, grants). An insert whose id another open transaction is inserting
//!    waits for it; a transaction takes no lock after its first insert but on rows it already has.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tollgate_core::ledger::{self, PoolScope, Replay};
use tollgate_core::{Cycle, Nanos, PoolKind, tier::PPM};
use tollgate_store::{Account, Event, EventOutcome, Grant, Hold, HoldState, NewEvent, NewGrant, StoreError};

use crate::events;
use crate::rows::{self, execute, query, query_one, query_opt, us};
use crate::{Error, Result};
use tollgate_store::ChargedEvent;

/// A pool's running totals in one cycle: its `pool_cycles` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolTotals {
    pub grants: Nanos,
    pub used: Nanos,
    pub overage: Nanos,
    pub held: Nanos,
}

/// A key's running totals in one cycle: its `key_cycles` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyTotals {
    pub charged: Nanos,
    pub held: Nanos,
}

/// A pool's state in one cycle (its row locked), plus what settling needs from its tier.
pub struct PoolCycle {
    pub totals: PoolTotals,
    pub scope: PoolScope,
    pub payg_multiplier_ppm: u64,
}

/// The tier grant of a pool: the account's own grant if set, else its tier's.
async fn tier_grant(tx: &Transaction<'_>, account: &Account, pool: PoolKind) -> Result<(Nanos, u64)> {
    let tier = rows::load_tier(tx, &account.tier)
        .await?
        .ok_or_else(|| StoreError::Backend(format!("account {} has unknown tier {}", account.id, account.tier)))?;
    Ok((account.grant_override(pool).unwrap_or(tier.grant(pool)), tier.payg_multiplier_ppm))
}

/// Locks a pool's row for a cycle and reads its totals; None when the row does not exist.
async fn lock_pool(tx: &Transaction<'_>, account: &str, pool: PoolKind, start_us: i64) -> Result<Option<PoolTotals>> {
    let row = query_opt(
        tx,
        "SELECT grants, used, overage, held FROM pool_cycles
         WHERE account = $1 AND pool = $2 AND cycle_start_us = $3 FOR UPDATE",
        &[&account, &pool.as_str(), &start_us],
    )
    .await?;
    Ok(match row {
        None => None,
        Some(r) => Some(PoolTotals {
            grants: Nanos(r.try_get(0)?),
            used: Nanos(r.try_get(1)?),
            overage: Nanos(r.try_get(2)?),
            held: Nanos(r.try_get(3)?),
        }),
    })
}

/// Locks the pool's cycle row, creating it with the tier's grant when its time has come. Two
/// transactions that create it at once: the second waits for the first and finds its row.
pub async fn pool_cycle(tx: &Transaction<'_>, account: &Account, pool: PoolKind, cycle: &Cycle) -> Result<PoolCycle> {
    let (grant, ppm) = tier_grant(tx, account, pool).await?;
    let start = us(cycle.start);
    let totals = match lock_pool(tx, &account.id, pool, start).await? {
        Some(totals) => totals,
        None => {
            let created = execute(
                tx,
                "INSERT INTO pool_cycles (account, pool, cycle_start_us, cycle_end_us, grants, used, overage, held)
                 VALUES ($1, $2, $3, $4, $5, 0, 0, 0) ON CONFLICT DO NOTHING",
                &[&account.id, &pool.as_str(), &start, &us(cycle.end), &grant.0],
            )
            .await?;
            if created == 1 {
                insert_grant(tx, &Grant::from_tier(&account.id, pool, grant, cycle)).await?;
            }
            lock_pool(tx, &account.id, pool, start).await?.ok_or_else(|| {
                StoreError::Backend(format!("pool {} {} has no row for its cycle", account.id, pool.as_str()))
            })?
        }
    };
    let policy = rows::load_policy(tx, &account.id, pool).await?;
    let PoolTotals { grants, used, overage, held } = totals;
    Ok(PoolCycle {
        totals,
        scope: PoolScope { limit: policy.limit(grants), grants, used, overage, held },
        payg_multiplier_ppm: ppm,
    })
}

/// Inserts `g` (its id aside); the id it was given.
pub async fn insert_grant(tx: &Transaction<'_>, g: &Grant) -> Result<i64> {
    let row = query_one(
        tx,
        "INSERT INTO grants (account, pool, kind, amount, cycle_start_us, expires_us, note, created_us)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        &[
            &g.account,
            &g.pool.as_str(),
            &g.kind.as_str(),
            &g.amount.0,
            &us(g.cycle_start),
            &us(g.expires_at),
            &g.note,
            &us(g.created_at),
        ],
    )
    .await?;
    Ok(row.try_get(0)?)
}

/// Writes a pool's totals plus `add`; the caller holds the row's lock and read `current` under it.
async fn add_to_pool(
    tx: &Transaction<'_>,
    account: &str,
    pool: PoolKind,
    cycle_start: DateTime<Utc>,
    current: PoolTotals,
    add: PoolTotals,
) -> Result<()> {
    let sum = |a: Nanos, b: Nanos| {
        a.checked_add(b).ok_or_else(|| StoreError::Invalid("amount out of the ledger's range".into()))
    };
    let new = PoolTotals {
        grants: sum(current.grants, add.grants)?,
        used: sum(current.used, add.used)?,
        overage: sum(current.overage, add.overage)?,
        held: sum(current.held, add.held)?,
    };
    write_pool(tx, account, pool, cycle_start, new).await
}

/// Writes a pool's totals; the caller holds the row's lock.
async fn write_pool(
    tx: &Transaction<'_>,
    account: &str,
    pool: PoolKind,
    cycle_start: DateTime<Utc>,
    totals: PoolTotals,
) -> Result<()> {
    let PoolTotals { grants, used, overage, held } = totals;
    execute(
        tx,
        "UPDATE pool_cycles SET grants = $4, used = $5, overage = $6, held = $7
         WHERE account = $1 AND pool = $2 AND cycle_start_us = $3",
        &[&account, &pool.as_str(), &us(cycle_start), &grants.0, &used.0, &overage.0, &held.0],
    )
    .await?;
    Ok(())
}

/// Locks a key's row for a cycle (creating it at zero) and reads its totals.
async fn lock_key(tx: &Transaction<'_>, key_id: &str, cycle_start: DateTime<Utc>) -> Result<KeyTotals> {
    const LOCK: &str = "SELECT charged, held FROM key_cycles WHERE key_id = $1 AND cycle_start_us = $2 FOR UPDATE";
    let start = us(cycle_start);
    let row = match query_opt(tx, LOCK, &[&key_id, &start]).await? {
        Some(row) => row,
        None => {
            execute(
                tx,
                "INSERT INTO key_cycles (key_id, cycle_start_us, charged, held) VALUES ($1, $2, 0, 0)
                 ON CONFLICT DO NOTHING",
                &[&key_id, &start],
            )
            .await?;
            query_one(tx, LOCK, &[&key_id, &start]).await?
        }
    };
    Ok(KeyTotals { charged: Nanos(row.try_get(0)?), held: Nanos(row.try_get(1)?) })
}

/// Writes a key's totals plus `add`; the caller holds the row's lock and read `current` under it.
async fn add_to_key(
    tx: &Transaction<'_>,
    key_id: &str,
    cycle_start: DateTime<Utc>,
    current: KeyTotals,
    add: KeyTotals,
) -> Result<()> {
    let out_of_range = || StoreError::Invalid("amount out of range".into());
    let charged = current.charged.checked_add(add.charged).ok_or_else(out_of_range)?;
    let held = current.held.checked_add(add.held).ok_or_else(out_of_range)?;
    write_key(tx, key_id, cycle_start, KeyTotals { charged, held }).await
}

/// Writes a key's totals; the caller holds the row's lock.
async fn write_key(tx: &Transaction<'_>, key_id: &str, cycle_start: DateTime<Utc>, totals: KeyTotals) -> Result<()> {
    execute(
        tx,
        "UPDATE key_cycles SET charged = $3, held = $4 WHERE key_id = $1 AND cycle_start_us = $2",
        &[&key_id, &us(cycle_start), &totals.charged.0, &totals.held.0],
    )
    .await?;
    Ok(())
}

fn event_id_taken(id: &str) -> Error {
    StoreError::Conflict(format!("event id {id:?} is already recorded; use another event id")).into()
}

/// The class of the event-order locks: the first of the two integers of a PostgreSQL advisory
/// lock key (the second is the hash of the account id). Two-integer advisory locks live in a key
/// space apart from the one-integer lock of the migrations.
pub const EVENT_ORDER_LOCK: i32 = 0x7467_6576; // "tgev"

/// Takes the event-order locks of several accounts (`$2`, a text array) with the class `$1`, one
/// after the other in the order of their keys, so that two transactions that take several
/// cannot wait on each other in a circle.
///
/// It also gives the transaction its id if it has none yet (`pg_current_xact_id`): a transaction
/// that inserts events has its id before it takes their seqs, which the rollups rely on
/// (`report::roll_up`).
pub const EVENT_ORDER_LOCKS: &str = "SELECT pg_advisory_xact_lock($1, h), pg_current_xact_id()
     FROM (SELECT DISTINCT hashtext(a) AS h FROM unnest($2::text[]) AS a ORDER BY h) AS sorted
     ORDER BY h";

/// Takes the event-order locks of `accounts` until the transaction ends. Call it after the
/// transaction's row locks and before its first event insert.
///
/// Why: an event's `seq` comes from an identity column when its row is inserted, and readers
/// page an account's events by `seq` (`after_seq`). Without this lock two transactions could
/// take seqs 7 and 8 for one account and commit 8 first (e.g. one settling in the interactive
/// pool, the other in the programmatic one, so no pool row lock orders them); a reader paging at
/// that moment sees 8, moves its cursor past 7, and never sees 7. With it, the transactions
/// that insert events of one account take their seqs one after the other and commit in that same
/// order (PostgreSQL makes a commit visible before it releases the transaction's locks), so when
/// a reader sees an account's event, every event of that account with a lower seq is already
/// visible too. A transaction-level advisory lock was chosen over a counter row per account: no
/// schema change, nothing written, released by the commit itself. Two accounts whose ids hash
/// alike share a lock, which only orders them too.
pub async fn lock_event_order(tx: &Transaction<'_>, accounts: &[&str]) -> Result<()> {
    match accounts {
        [] => {}
        [account] => {
            let lock = "SELECT pg_advisory_xact_lock($1, hashtext($2)), pg_current_xact_id()";
            execute(tx, lock, &[&EVENT_ORDER_LOCK, account]).await?;
        }
        several => {
            let accounts: Vec<&str> = several.to_vec();
            execute(tx, EVENT_ORDER_LOCKS, &[&EVENT_ORDER_LOCK, &accounts]).await?;
        }
    }
    Ok(())
}

/// Charges a locked hold with an event's cost, releases the hold, records the event.
async fn settle_hold(
    tx: &Transaction<'_>,
    hold: &Hold,
    event: NewEvent,
    unsettled: bool,
    now: DateTime<Utc>,
) -> Result<Event> {
    let recorded = charge_hold(tx, hold, hold.amount, event, unsettled, now).await?;
    let state = if unsettled { HoldState::Expired } else { HoldState::Settled };
    execute(
        tx,
        "UPDATE holds SET state = $3, event_seq = $4 WHERE account = $1 AND id = $2",
        &[&hold.account, &hold.id, &state.as_str(), &recorded.seq],
    )
    .await?;
    Ok(recorded)
}

/// Charges an event's cost against `amount` of a locked hold, releases that part and records the
/// event.
async fn charge_hold(
    tx: &Transaction<'_>,
    hold: &Hold,
    amount: Nanos,
    event: NewEvent,
    unsettled: bool,
    now: DateTime<Utc>,
) -> Result<Event> {
    let account = rows::require_account(tx, &hold.account).await?;
    let cycle = Cycle { index: 0, start: hold.cycle_start, end: hold.cycle_end };
    let pool = pool_cycle(tx, &account, hold.pool, &cycle).await?;
    // An unsettled hold is charged exactly its held amount, which already includes any multiplier.
    let ppm = if unsettled { PPM } else { pool.payg_multiplier_ppm };
    let settlement = match ledger::settle(amount, event.cost, &pool.scope, ppm) {
        Ok(s) => s,
        // A taken event id is reported before a bad amount, as when it was checked first.
        Err(_) if rows::load_event(tx, &hold.account, &event.id).await?.is_some() => {
            return Err(event_id_taken(&event.id));
        }
        Err(refusal) => return Err(overflow(refusal)),
    };
    let split = settlement.split;
    let release = Nanos(-amount.0);
    let add = PoolTotals { grants: Nanos::ZERO, used: split.grant, overage: split.overage, held: release };
    add_to_pool(tx, &hold.account, hold.pool, hold.cycle_start, pool.totals, add).await?;
    if let Some(key) = &hold.key {
        let totals = lock_key(tx, key, hold.cycle_start).await?;
        add_to_key(tx, key, hold.cycle_start, totals, KeyTotals { charged: split.total(), held: release }).await?;
    }
    lock_event_order(tx, &[&hold.account]).await?;
    let id = event.id.clone();
    insert_event(tx, &ChargedEvent { unsettled, ..ChargedEvent::of_hold(event, hold, settlement, now) })
        .await?
        .ok_or_else(|| event_id_taken(&id))
}

fn overflow(refusal: tollgate_core::Refusal) -> Error {
    StoreError::Invalid(format!("amount out of range ({})", refusal.code())).into()
}

/// Inserts an event; None when its id is taken (by a committed event, or by one whose
/// transaction committed while this insert waited for it).
async fn insert_event(tx: &Transaction<'_>, row: &ChargedEvent) -> Result<Option<Event>> {
    let ChargedEvent { event: e, cycle_start, split, overshoot, hold_id, unsettled, recorded: now } = row;
    let (cycle_start, now) = (*cycle_start, *now);
    let labels = rows::labels_to_text(&e.labels);
    let inserted = query_opt(
        tx,
        "INSERT INTO events (account, id, pool, model, input_tokens, cache_creation_5m_input_tokens,
             cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
             grant_part, overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us,
             cycle_start_us, hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
             $23, $24, $25, $26, $27, $28, $29, $30)
         ON CONFLICT DO NOTHING RETURNING seq",
        &[
            &e.account,
            &e.id,
            &e.pool.as_str(),
            &e.model,
            &(e.usage.input_tokens as i64),
            &(e.usage.cache_creation_5m_input_tokens as i64),
            &(e.usage.cache_creation_1h_input_tokens as i64),
            &(e.usage.cache_read_input_tokens as i64),
            &(e.usage.output_tokens as i64),
            &(e.usage.web_search_requests as i64),
            &e.cost.0,
            &split.grant.0,
            &split.overage.0,
            &overshoot.0,
            &e.service_tier,
            &e.inference_geo,
            &e.speed,
            &e.source,
            &e.key,
            &labels,
            &us(e.timestamp),
            &us(cycle_start),
            &hold_id,
            &e.latency_ms.map(|v| v as i64),
            &e.ttft_ms.map(|v| v as i64),
            &e.partial,
            &unsettled,
            &us(now),
            &e.fingerprint,
            &e.estimated,
        ],
    )
    .await?;
    let Some(inserted) = inserted else { return Ok(None) };
    Ok(Some(row.event(inserted.try_get(0)?)))
}

/// Adds a top-up to the pool's cycle that contains `now`.
pub async fn add_grant(tx: &Transaction<'_>, g: &NewGrant, now: DateTime<Utc>) -> Result<Grant> {
    if g.amount <= Nanos::ZERO {
        return Err(StoreError::Invalid("a grant's amount must be positive".into()).into());
    }
    let account = rows::require_account(tx, &g.account).await?;
    let cycle = account.cycle_anchor().cycle_at(now);
    let pool = pool_cycle(tx, &account, g.pool, &cycle).await?;
    let grant = Grant::top_up(g, &cycle, now);
    let id = insert_grant(tx, &grant).await?;
    let top_up = PoolTotals { grants: g.amount, ..PoolTotals::default() };
    add_to_pool(tx, &g.account, g.pool, cycle.start, pool.totals, top_up).await?;
    Ok(Grant { id, ..grant })
}

/// Records a batch of events, all or nothing (the caller's transaction), with a few round trips
/// per distinct account, key and pool and one insert for all the events, not a few round trips
/// per event. The events are decided in order, as if recorded one after the other: first the
/// checks that need no lock (a repeated id, the account, the key), so that a batch of repeats
/// locks nothing; then the pools and keys of the new events are locked, in the lock order, and
/// each new event is charged on its pool's running totals. The first event that fails fails the
/// batch, with the error it would meet recorded alone: an amount out of range is reported before
/// a later event's conflict (a pool's unknown tier, a broken database, shows when its pools are
/// locked).
pub async fn record_events(tx: &Transaction<'_>, events: &[NewEvent], now: DateTime<Utc>) -> Result<Vec<EventOutcome>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let Screened { outcomes, accounts, refused } = screen_events(tx, events).await?;
    // The new events before the refused one, with their accounts and cycles.
    let new: Vec<(&NewEvent, &Account, Cycle)> = events
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, Place::New))
        .filter_map(|(e, _)| {
            accounts[e.account.as_str()].as_ref().map(|a| (e, a, a.cycle_anchor().cycle_at(e.timestamp)))
        })
        .collect();
    let (mut pool_state, mut key_state) = lock_new_events(tx, &new).await?;

    // Each new event in order, charged on the running totals.
    let out_of_range = || StoreError::Invalid("amount out of the ledger's range".into());
    let mut new_rows: Vec<ChargedEvent> = Vec::with_capacity(new.len());
    for (e, _, cycle) in &new {
        let (pool, _) =
            pool_state.get_mut(&(e.account.as_str(), e.pool.as_str(), us(cycle.start))).expect("locked above");
        let split = ledger::split_charge(e.cost, &pool.scope, pool.payg_multiplier_ppm).map_err(overflow)?;
        pool.totals.used = pool.totals.used.checked_add(split.grant).ok_or_else(out_of_range)?;
        pool.totals.overage = pool.totals.overage.checked_add(split.overage).ok_or_else(out_of_range)?;
        pool.scope.used = pool.totals.used;
        pool.scope.overage = pool.totals.overage;
        if let Some(key) = &e.key {
            let (totals, _) = key_state.get_mut(&(key.as_str(), us(cycle.start))).expect("locked above");
            totals.charged = totals.charged.checked_add(split.total()).ok_or_else(out_of_range)?;
        }
        new_rows.push(ChargedEvent::direct((*e).clone(), cycle.start, split, now));
    }
    if let Some(e) = refused {
        return Err(e.into());
    }
    let seqs = write_new_events(tx, &pool_state, &key_state, &new_rows).await?;

    // The place in `new_rows` of each new event of the batch.
    let mut row_of = HashMap::new();
    for (n, o) in outcomes.iter().enumerate() {
        if matches!(o, Place::New) {
            row_of.insert(n, row_of.len());
        }
    }
    let recorded = |n: usize| new_rows[row_of[&n]].event(seqs[row_of[&n]]);
    Ok(outcomes
        .iter()
        .enumerate()
        .map(|(n, o)| match o {
            Place::Duplicate(event) => EventOutcome::Duplicate((**event).clone()),
            Place::DuplicateOf(i) => EventOutcome::Duplicate(recorded(*i)),
            Place::New => EventOutcome::Recorded(recorded(n)),
        })
        .collect())
}

/// What an event of a batch turned out to be before any lock.
enum Place {
    Duplicate(Box<Event>),
    /// The same as the event at this place of the batch, recorded by it.
    DuplicateOf(usize),
    New,
}

/// The checks of a batch of events that need no lock, in order.
struct Screened<'a> {
    /// One per event up to the first refused (excluded).
    outcomes: Vec<Place>,
    accounts: HashMap<&'a str, Option<Account>>,
    /// The first event refused by these checks: the events before it may still fail first, when
    /// charged (an amount out of range), so its error waits until they are.
    refused: Option<StoreError>,
}

/// A repeated id, the account and the key of each event, in order, up to the first refused.
async fn screen_events<'a>(tx: &Transaction<'_>, events: &'a [NewEvent]) -> Result<Screened<'a>> {
    let ids: Vec<(&str, &str)> = events.iter().map(|e| (e.account.as_str(), e.id.as_str())).collect();
    let committed = load_events(tx, &ids).await?;
    let mut accounts: HashMap<&str, Option<Account>> = HashMap::new();
    let mut keys: HashMap<(&str, &str), bool> = HashMap::new();
    let mut first: HashMap<(&str, &str), usize> = HashMap::new();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut refused: Option<StoreError> = None;
    for (n, e) in events.iter().enumerate() {
        let id = (e.account.as_str(), e.id.as_str());
        let earlier = match (committed.get(&(e.account.clone(), e.id.clone())), first.get(&id)) {
            (Some(row), _) => Some((row.fingerprint.clone(), Place::Duplicate(Box::new(row.event.clone())))),
            (None, Some(&i)) => Some((events[i].fingerprint.clone(), Place::DuplicateOf(i))),
            (None, None) => None,
        };
        match ledger::replay(earlier, &e.fingerprint) {
            Replay::Same(outcome) => {
                outcomes.push(outcome);
                continue;
            }
            Replay::Conflict => {
                refused = Some(StoreError::Conflict(format!(
                    "event id {:?} was already recorded with different content; use a new id",
                    e.id
                )));
                break;
            }
            Replay::New => {}
        }
        if !accounts.contains_key(e.account.as_str()) {
            accounts.insert(&e.account, rows::load_account(tx, &e.account).await?);
        }
        if accounts[e.account.as_str()].is_none() {
            refused = Some(StoreError::NotFound(format!("account {:?}", e.account)));
            break;
        }
        if let Some(key) = &e.key {
            if !keys.contains_key(&(e.account.as_str(), key.as_str())) {
                let found =
                    query_opt(tx, "SELECT 1 FROM keys WHERE id = $1 AND account = $2", &[key, &e.account]).await?;
                keys.insert((&e.account, key), found.is_some());
            }
            if !keys[&(e.account.as_str(), key.as_str())] {
                refused = Some(StoreError::Invalid(format!("account {:?} has no key {key:?}", e.account)));
                break;
            }
        }
        first.insert(id, n);
        outcomes.push(Place::New);
    }
    Ok(Screened { outcomes, accounts, refused })
}

/// Pool cycles by (account, pool, cycle start): the state as locked and the totals read.
type PoolStates<'a> = BTreeMap<(&'a str, &'static str, i64), (PoolCycle, PoolTotals)>;
/// Key cycles by (key, cycle start): the running totals and the totals read.
type KeyStates<'a> = BTreeMap<(&'a str, i64), (KeyTotals, KeyTotals)>;

/// Locks the pools and then the keys of `new`, each in the lock order.
async fn lock_new_events<'a>(
    tx: &Transaction<'_>,
    new: &[(&'a NewEvent, &Account, Cycle)],
) -> Result<(PoolStates<'a>, KeyStates<'a>)> {
    let mut pools: BTreeMap<(&str, &'static str, i64), (&Account, PoolKind, &Cycle)> = BTreeMap::new();
    let mut key_cycles: BTreeSet<(&str, i64)> = BTreeSet::new();
    for (e, account, cycle) in new {
        pools.insert((&e.account, e.pool.as_str(), us(cycle.start)), (account, e.pool, cycle));
        if let Some(key) = &e.key {
            key_cycles.insert((key, us(cycle.start)));
        }
    }
    let mut pool_state = PoolStates::new();
    for (id, (account, pool, cycle)) in pools {
        let state = pool_cycle(tx, account, pool, cycle).await?;
        let before = state.totals;
        pool_state.insert(id, (state, before));
    }
    let mut key_state = KeyStates::new();
    for (key, start) in key_cycles {
        let totals = lock_key(tx, key, rows::time(start)).await?;
        key_state.insert((key, start), (totals, totals));
    }
    Ok((pool_state, key_state))
}

/// The writes: changed totals, then the events under their accounts' event-order locks; the
/// events' seqs, in order.
async fn write_new_events(
    tx: &Transaction<'_>,
    pool_state: &PoolStates<'_>,
    key_state: &KeyStates<'_>,
    new_rows: &[ChargedEvent],
) -> Result<Vec<i64>> {
    for ((account, pool, start), (state, before)) in pool_state {
        if state.totals != *before {
            write_pool(tx, account, rows::pool_of(pool)?, rows::time(*start), state.totals).await?;
        }
    }
    for ((key, start), (totals, before)) in key_state {
        if totals != before {
            write_key(tx, key, rows::time(*start), *totals).await?;
        }
    }
    if new_rows.is_empty() {
        return Ok(Vec::new());
    }
    let accounts: Vec<&str> = new_rows.iter().map(|r| r.event.account.as_str()).collect();
    lock_event_order(tx, &accounts).await?;
    let columns = events::Columns::new(new_rows);
    let sql = format!("{} ON CONFLICT DO NOTHING RETURNING account, id, seq", events::insert_sql(1));
    let inserted = query(tx, &sql, &columns.params()).await?;
    // A copy committed since it was looked up: run again, and the replay check answers.
    if inserted.len() != new_rows.len() {
        return Err(Error::Retry);
    }
    events::seqs(new_rows, &inserted)
}

/// The committed events among `ids` ((account, id) pairs), by (account, id).
async fn load_events(tx: &Transaction<'_>, ids: &[(&str, &str)]) -> Result<HashMap<(String, String), rows::EventRow>> {
    let (accounts, event_ids): (Vec<&str>, Vec<&str>) = ids.iter().copied().unzip();
    let found = query(
        tx,
        &format!(
            "SELECT {} FROM unnest($1::text[], $2::text[]) AS u(a, i)
             CROSS JOIN LATERAL (SELECT * FROM events WHERE account = u.a AND id = u.i) AS e",
            rows::EVENT_COLUMNS
        ),
        &[&accounts, &event_ids],
    )
    .await?;
    let mut by_id = HashMap::new();
    for r in &found {
        let row = rows::event(r)?;
        by_id.insert((row.event.account.clone(), row.event.id.clone()), row);
    }
    Ok(by_id)
}

/// Which open holds a sweep settles.
#[derive(Clone, Copy, Debug)]
pub enum Sweep {
    /// Those whose time to live has passed.
    Expired,
    /// Those, and every open hold made by the store `owner` (see `recover_open_holds`).
    ExpiredAndOwnedBy(i64),
}

/// Settles open holds at their held amount, flagged `unsettled`. A hold another transaction has
/// locked (being settled, voided, extended or swept right now) is waited for, and its state
/// read again once that transaction ends (`FOR UPDATE` re-checks the `WHERE` on the new row):
/// each hold is settled exactly once however many processes sweep at once.
pub async fn expire(tx: &Transaction<'_>, now: DateTime<Utc>, sweep: Sweep) -> Result<Vec<Event>> {
    let found = match sweep {
        Sweep::Expired => {
            query(
                tx,
                &format!(
                    "SELECT {} FROM holds WHERE state = 'open' AND expires_us <= $1
                     ORDER BY account COLLATE \"C\", id COLLATE \"C\" FOR UPDATE",
                    rows::HOLD_COLUMNS
                ),
                &[&us(now)],
            )
            .await?
        }
        Sweep::ExpiredAndOwnedBy(owner) => {
            query(
                tx,
                &format!(
                    "SELECT {} FROM holds WHERE state = 'open' AND (expires_us <= $1 OR owner = $2)
                     ORDER BY account COLLATE \"C\", id COLLATE \"C\" FOR UPDATE",
                    rows::HOLD_COLUMNS
                ),
                &[&us(now), &owner],
            )
            .await?
        }
    };
    let holds: Vec<Hold> = found.iter().map(|r| rows::hold(r).map(|h| h.hold)).collect::<Result<_>>()?;
    // Pools, then keys, each in the lock order, before the first change.
    let pools: BTreeSet<(&str, &str, i64)> =
        holds.iter().map(|h| (h.account.as_str(), h.pool.as_str(), us(h.cycle_start))).collect();
    for (account, pool, start) in pools {
        let pool = rows::pool_of(pool)?;
        lock_pool(tx, account, pool, start).await?;
    }
    let keys: BTreeSet<(&str, i64)> =
        holds.iter().filter_map(|h| h.key.as_deref().map(|k| (k, us(h.cycle_start)))).collect();
    for (key, start) in keys {
        lock_key(tx, key, rows::time(start)).await?;
    }
    let accounts: Vec<&str> = holds.iter().map(|h| h.account.as_str()).collect();
    lock_event_order(tx, &accounts).await?;
    let mut events = Vec::with_capacity(holds.len());
    for hold in holds {
        let event = hold.unsettled_event(rows::load_event(tx, &hold.account, &hold.id).await?.is_some());
        events.push(settle_hold(tx, &hold, event, true, now).await?);
    }
    Ok(events)
}

/// True when the account has any ledger state (so its cycles must not move).
pub async fn has_ledger_state(tx: &Transaction<'_>, account: &str) -> Result<bool> {
    let row = query_one(tx, "SELECT EXISTS (SELECT 1 FROM pool_cycles WHERE account = $1)", &[&account]).await?;
    Ok(row.try_get(0)?)
}
