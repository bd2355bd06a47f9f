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
use std::sync::Arc;
use tollgate_core::{Cycle, Nanos, PoolKind};

use tollgate_store::step::{
    self, EventRef, HoldEntry, KeyId, KeyTotals, Op, Plan, PoolId, PoolTotals, Snapshot, Terms,
};
use tollgate_store::{Account, Event, EventOutcome, Grant, NewEvent, NewGrant, StoreError, StoreResult};

use crate::events;
use crate::rows::{self, execute, query, query_one, query_opt, us};
use crate::{Error, Result};

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

/// Locks the pool's cycle row, creating it with the tier's grant when its time has come.
pub async fn pool_cycle(tx: &Transaction<'_>, account: &Account, pool: PoolKind, cycle: &Cycle) -> Result<PoolTotals> {
    let tier = rows::load_tier(tx, &account.tier)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("account {} has unknown tier {}", account.id, account.tier)))?;
    let id = (account.id.clone(), pool, us(cycle.start));
    match lock_pool(tx, &account.id, pool, id.2).await? {
        Some(totals) => Ok(totals),
        None => create_pool(tx, &id, account.grant_override(pool).unwrap_or(tier.grant(pool)), cycle).await,
    }
}

/// Creates a pool's cycle row with its tier grant (and that grant's row), and locks it. Two
/// transactions that create it at once: the second waits for the first and finds its row.
async fn create_pool(tx: &Transaction<'_>, id: &PoolId, grant: Nanos, cycle: &Cycle) -> Result<PoolTotals> {
    let (account, pool, start) = (&id.0, id.1, id.2);
    let created = execute(
        tx,
        "INSERT INTO pool_cycles (account, pool, cycle_start_us, cycle_end_us, grants, used, overage, held)
         VALUES ($1, $2, $3, $4, $5, 0, 0, 0) ON CONFLICT DO NOTHING",
        &[account, &pool.as_str(), &start, &us(cycle.end), &grant.0],
    )
    .await?;
    if created == 1 {
        insert_grant(tx, &Grant::from_tier(account, pool, grant, cycle)).await?;
    }
    lock_pool(tx, account, pool, start)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("pool {account} {} has no row for its cycle", pool.as_str())).into())
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
async fn add_to_pool(tx: &Transaction<'_>, id: &PoolId, current: PoolTotals, add: PoolTotals) -> Result<()> {
    write_pool(tx, id, current.plus(add)?).await
}

/// Writes a pool's totals; the caller holds the row's lock.
async fn write_pool(tx: &Transaction<'_>, id: &PoolId, totals: PoolTotals) -> Result<()> {
    let PoolTotals { grants, used, overage, held } = totals;
    execute(
        tx,
        "UPDATE pool_cycles SET grants = $4, used = $5, overage = $6, held = $7
         WHERE account = $1 AND pool = $2 AND cycle_start_us = $3",
        &[&id.0, &id.1.as_str(), &id.2, &grants.0, &used.0, &overage.0, &held.0],
    )
    .await?;
    Ok(())
}

/// Locks a key's row for a cycle (creating it at zero) and reads its totals.
async fn lock_key(tx: &Transaction<'_>, key_id: &str, start: i64) -> Result<KeyTotals> {
    const LOCK: &str = "SELECT charged, held FROM key_cycles WHERE key_id = $1 AND cycle_start_us = $2 FOR UPDATE";
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

/// Writes a key's totals; the caller holds the row's lock.
async fn write_key(tx: &Transaction<'_>, id: &KeyId, totals: KeyTotals) -> Result<()> {
    execute(
        tx,
        "UPDATE key_cycles SET charged = $3, held = $4 WHERE key_id = $1 AND cycle_start_us = $2",
        &[&id.0, &id.1, &totals.charged.0, &totals.held.0],
    )
    .await?;
    Ok(())
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
    add_to_pool(tx, &(g.account.clone(), g.pool, us(cycle.start)), pool, top_up).await?;
    Ok(Grant { id, ..grant })
}

/// Records a batch of events, all or nothing (the caller's transaction), with a few round trips
/// per distinct account, key and pool and one insert for all the events, not a few round trips
/// per event. The events are decided in order by [`Plan`], as if recorded one after the other;
/// the first that fails fails the batch. A batch of repeats locks nothing.
pub async fn record_events(tx: &Transaction<'_>, events: &[NewEvent], now: DateTime<Utc>) -> Result<Vec<EventOutcome>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ops: Vec<(Op, DateTime<Utc>)> = events.iter().map(|e| (Op::Record(Box::new(e.clone())), now)).collect();
    let mut plan = Plan::default();
    read_snapshot(tx, &mut plan.snapshot, &ops).await?;
    lock_needs(tx, &mut plan.snapshot, &ops).await?;
    let outcomes = ops.iter().map(|(op, now)| plan.decide(op, *now)).collect::<StoreResult<Vec<_>>>()?;
    let seqs = write_plan(tx, &plan).await?;
    Ok(outcomes.into_iter().map(|o| o.answer(&plan, &seqs).into_event_outcome()).collect::<StoreResult<_>>()?)
}

/// Reads what `ops` need before their pools: each account with its tier and policies, the keys
/// they name, and the committed events whose ids they take.
async fn read_snapshot(tx: &Transaction<'_>, snap: &mut Snapshot, ops: &[(Op, DateTime<Utc>)]) -> Result<()> {
    snap.knows_taken = true;
    let ids: Vec<(&str, &str)> = ops.iter().filter_map(|(op, _)| op.event_key()).collect();
    for (id, row) in load_events(tx, &ids).await? {
        snap.taken.insert(id, (row.fingerprint, row.event));
    }
    let accounts: BTreeSet<&str> = ops.iter().map(|(op, _)| op.account()).collect();
    for id in accounts {
        let Some(account) = rows::load_account(tx, id).await? else { continue };
        let tier = rows::load_tier(tx, &account.tier).await?.map(Arc::new);
        let policies = [
            rows::load_policy(tx, &account.id, PoolKind::Interactive).await?,
            rows::load_policy(tx, &account.id, PoolKind::Programmatic).await?,
        ];
        snap.accounts.insert(account.id.clone(), Terms { account: Arc::new(account), tier, policies });
    }
    let keys: Vec<&str> = ops.iter().filter_map(|(op, _)| op.key()).collect::<BTreeSet<_>>().into_iter().collect();
    if !keys.is_empty() {
        for r in query(tx, "SELECT id, account, cap FROM keys WHERE id = ANY($1)", &[&keys]).await? {
            snap.keys.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get::<_, Option<i64>>(2)?.map(Nanos)));
        }
    }
    Ok(())
}

/// Locks the pool rows and then the key rows `ops` need, each in the lock order, creating the
/// missing ones (a pool with its tier grant, a key at zero).
async fn lock_needs(tx: &Transaction<'_>, snap: &mut Snapshot, ops: &[(Op, DateTime<Utc>)]) -> Result<()> {
    let mut pools: BTreeMap<PoolId, Option<(Nanos, Cycle)>> = BTreeMap::new();
    let mut keys: BTreeSet<KeyId> = BTreeSet::new();
    for (op, now) in ops {
        let needs = snap.needs(op, *now);
        if let Some((id, create)) = needs.pool {
            let entry = pools.entry(id).or_default();
            if entry.is_none() {
                *entry = create;
            }
        }
        keys.extend(needs.key);
    }
    for (id, create) in pools {
        let totals = match (lock_pool(tx, &id.0, id.1, id.2).await?, create) {
            (Some(totals), _) => totals,
            (None, None) => continue,
            (None, Some((grant, cycle))) => create_pool(tx, &id, grant, &cycle).await?,
        };
        snap.pools.insert(id, totals);
    }
    for id in keys {
        let totals = lock_key(tx, &id.0, id.1).await?;
        snap.key_totals.insert(id, totals);
    }
    Ok(())
}

/// Writes what `plan` decided: the changed totals, then its events under their accounts'
/// event-order locks; the events' seqs, in order.
async fn write_plan(tx: &Transaction<'_>, plan: &Plan) -> Result<Vec<i64>> {
    for id in &plan.changed_pools {
        write_pool(tx, id, plan.snapshot.pools[id]).await?;
    }
    for id in &plan.changed_keys {
        write_key(tx, id, plan.snapshot.key_totals[id]).await?;
    }
    let new_rows = &plan.new_events;
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
    let (extra, owner) = match sweep {
        Sweep::Expired => ("", None),
        Sweep::ExpiredAndOwnedBy(owner) => (" OR owner = $2", Some(owner)),
    };
    let sql = format!(
        "SELECT {} FROM holds WHERE state = 'open' AND (expires_us <= $1{extra})
         ORDER BY account COLLATE \"C\", id COLLATE \"C\" FOR UPDATE",
        rows::HOLD_COLUMNS
    );
    let found = match owner {
        None => query(tx, &sql, &[&us(now)]).await?,
        Some(owner) => query(tx, &sql, &[&us(now), &owner]).await?,
    };
    let mut plan = Plan::default();
    let mut ops = Vec::with_capacity(found.len());
    for r in &found {
        let row = rows::hold(r)?;
        let (account, hold_id) = (row.hold.account.clone(), row.hold.id.clone());
        plan.snapshot
            .holds
            .insert((account.clone(), hold_id.clone()), HoldEntry::read(row.hold, row.fingerprint, row.event_seq));
        ops.push((Op::Expire { account, hold_id }, now));
    }
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    read_snapshot(tx, &mut plan.snapshot, &ops).await?;
    lock_needs(tx, &mut plan.snapshot, &ops).await?;
    let outcomes = ops.iter().map(|(op, now)| plan.decide(op, *now)).collect::<StoreResult<Vec<_>>>()?;
    let seqs = write_plan(tx, &plan).await?;
    for key in &plan.changed_holds {
        let entry = &plan.snapshot.holds[key];
        let seq = match entry.event {
            Some(EventRef::New(i)) => seqs[i],
            _ => return Err(StoreError::Backend(format!("expired hold {:?} has no event", key.1)).into()),
        };
        execute(
            tx,
            "UPDATE holds SET state = $3, event_seq = $4 WHERE account = $1 AND id = $2",
            &[&key.0, &key.1, &entry.hold.state.as_str(), &seq],
        )
        .await?;
    }
    let mut events = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        if let step::Outcome::Recorded(_) = o {
            events.push(o.answer(&plan, &seqs).into_event()?);
        }
    }
    Ok(events)
}

/// True when the account has any ledger state (so its cycles must not move).
pub async fn has_ledger_state(tx: &Transaction<'_>, account: &str) -> Result<bool> {
    let row = query_one(tx, "SELECT EXISTS (SELECT 1 FROM pool_cycles WHERE account = $1)", &[&account]).await?;
    Ok(row.try_get(0)?)
}
