//! The ledger's writes, run by the single writer inside its transaction, in the three steps of
//! `tollgate_store::step`: read the snapshot the writes need (from the writer's caches and the
//! file), decide them with [`Plan`], write the plan's rows.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tollgate_core::{Cycle, Nanos, PoolKind};
use tollgate_store::step::{Done, EventRef, HoldEntry, Op, Outcome, Plan, Snapshot};
use tollgate_store::{
    Account, ChargedEvent, Event, EventOutcome, Grant, HoldOutcome, HoldState, StoreError, StoreResult,
};

use crate::rows::{self, backend, us};
use crate::writer::Db;

/// Why an attempt at a write did not finish.
enum Fail {
    Store(StoreError),
    /// A first attempt met what it did not read (a taken hold or event id), or would create a
    /// cycle's pool row: run it again, reading everything. A first attempt changes nothing
    /// before it can meet one.
    Again,
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

/// Decides `ops` in order on one snapshot and writes what they decided; the first that fails
/// fails them all (the caller's savepoint, if any, undoes the rest).
pub fn run(db: &Db, ops: &[(Op, DateTime<Utc>)]) -> StoreResult<Vec<Done>> {
    attempt(db, ops, false).map_err(|f| match f {
        Fail::Store(e) => e,
        Fail::Again => StoreError::Backend("a write read everything and still met an unread id".into()),
    })
}

/// One write, decided and written. A first attempt reads neither a new hold's id nor the event
/// id a settle takes: the inserts' own uniqueness checks find a taken one (rare), and then the
/// write runs again reading them. One read less per hold and per settle.
pub fn run_one(db: &Db, op: Op, now: DateTime<Utc>) -> StoreResult<Done> {
    let ops = [(op, now)];
    let mut done = match attempt(db, &ops, true) {
        Err(Fail::Again) => run(db, &ops)?,
        Err(Fail::Store(e)) => return Err(e),
        Ok(done) => done,
    };
    done.pop().ok_or_else(|| StoreError::Backend("a write went unanswered".into()))
}

fn attempt(db: &Db, ops: &[(Op, DateTime<Utc>)], first: bool) -> Result<Vec<Done>, Fail> {
    // The writer's one plan, reused from write to write (its memory kept) and put back after
    // a single write; a batch's, larger, is dropped.
    let mut plan = db.take_plan();
    plan.reset();
    let done = decide_and_write(db, &mut plan, ops, first);
    if ops.len() == 1 {
        db.put_plan(plan);
    }
    done
}

fn decide_and_write(db: &Db, plan: &mut Plan, ops: &[(Op, DateTime<Utc>)], first: bool) -> Result<Vec<Done>, Fail> {
    read(db, &mut plan.snapshot, ops, first)?;
    let outcomes = ops.iter().map(|(op, now)| plan.decide(op, *now)).collect::<StoreResult<Vec<_>>>();
    if plan.needs_taken {
        return Err(Fail::Again);
    }
    let outcomes = outcomes?;
    // A refused hold whose id was not read may repeat an earlier hold: answered with it.
    if first && outcomes.iter().any(|o| matches!(o, Outcome::Ready(Done::Hold(HoldOutcome::Refused { .. })))) {
        return Err(Fail::Again);
    }
    let seqs = write(db, plan, first)?;
    Ok(outcomes.into_iter().map(|o| o.answer(plan, &seqs)).collect())
}

/// Reads everything `ops` need: accounts with their tiers and policies, keys, holds, the events
/// whose ids they take, then the pool rows (created with their tier grant when a cycle's first
/// write comes) and key rows of the cycles they touch.
/// `first`: a first attempt, which reads neither a new hold's id nor the events' ids.
fn read(db: &Db, snap: &mut Snapshot, ops: &[(Op, DateTime<Utc>)], first: bool) -> Result<(), Fail> {
    let conn: &Connection = db;
    snap.knows_taken = !first;
    for (op, _) in ops {
        read_account(db, snap, op.account())?;
        if let Some(key) = op.key() {
            read_key(conn, snap, key)?;
        }
        if let Some((account, id)) = op.hold_key()
            && !(first && matches!(op, Op::Hold(_)))
        {
            read_hold(conn, snap, account, id, matches!(op, Op::Settle(_)))?;
        }
        if let Some((account, id)) = op.event_key()
            && !first
            && let Some(row) = rows::load_event(conn, account, id)?
        {
            snap.taken.insert((account.to_string(), id.to_string()), (row.fingerprint, row.event));
        }
    }
    for (op, now) in ops {
        let needs = snap.needs(op, *now);
        if let Some((id, create)) = needs.pool
            && !snap.pools.contains_key(&id)
        {
            let totals = match (db.pool_totals(&id)?, create) {
                (Some(totals), _) => totals,
                (None, None) => continue,
                // A first attempt did not read a new hold's id: a repeated hold creates no
                // cycle, so the write that would create one reads everything first.
                (None, Some(_)) if first => return Err(Fail::Again),
                (None, Some((grant, cycle))) => create_pool(db, &id.0, id.1, grant, &cycle)?,
            };
            snap.pools.insert(id, totals);
        }
        if let Some(id) = needs.key {
            let totals = db.key_totals(&id)?;
            snap.key_totals.insert(id, totals);
        }
    }
    Ok(())
}

fn read_account(db: &Db, snap: &mut Snapshot, id: &str) -> StoreResult<()> {
    if !snap.accounts.contains_key(id)
        && let Some(terms) = db.terms(id)?
    {
        snap.accounts.insert(id.to_string(), terms);
    }
    Ok(())
}

fn read_key(conn: &Connection, snap: &mut Snapshot, key: &str) -> StoreResult<()> {
    let row = conn
        .prepare_cached("SELECT account, cap FROM keys WHERE id = ?1")
        .and_then(|mut s| s.query_row([key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))).optional())
        .map_err(backend)?;
    if let Some((account, cap)) = row {
        snap.keys.insert(key.to_string(), (account, cap.map(Nanos)));
    }
    Ok(())
}

/// Reads a hold the writes name; with `settling`, the event of a settled one too (a settle
/// repeated).
fn read_hold(conn: &Connection, snap: &mut Snapshot, account: &str, id: &str, settling: bool) -> StoreResult<()> {
    let key = (account.to_string(), id.to_string());
    if snap.holds.contains_key(&key) {
        return Ok(());
    }
    let Some(row) = rows::load_hold(conn, account, id)? else { return Ok(()) };
    if settling && let Some(seq) = row.event_seq {
        let first = rows::load_event_by_seq(conn, seq)?;
        snap.settled_events.insert(seq, (first.fingerprint, first.event));
    }
    snap.holds.insert(key, HoldEntry::read(row.hold, row.fingerprint, row.event_seq));
    Ok(())
}

/// Creates a pool's cycle row with its tier grant, and that grant's row.
fn create_pool(
    db: &Db,
    account: &str,
    pool: PoolKind,
    grant: Nanos,
    cycle: &Cycle,
) -> StoreResult<tollgate_store::step::PoolTotals> {
    let totals = db.create_pool(&(account.to_string(), pool, us(cycle.start)), us(cycle.end), grant)?;
    insert_grant(db, &Grant::from_tier(account, pool, grant, cycle))?;
    Ok(totals)
}

/// The pool's cycle row, created with its tier grant when its time has come (a top-up's pool).
pub fn pool_cycle(db: &Db, account: &Account, pool: PoolKind, cycle: &Cycle) -> StoreResult<()> {
    if db.pool_totals(&(account.id.clone(), pool, us(cycle.start)))?.is_none() {
        let tier = db
            .tier(&account.tier)?
            .ok_or_else(|| StoreError::Corrupt(format!("account {} has unknown tier {}", account.id, account.tier)))?;
        create_pool(db, &account.id, pool, account.grant_override(pool).unwrap_or(tier.grant(pool)), cycle)?;
    }
    Ok(())
}

/// Writes what `plan` decided: new holds, new events (their seqs, in order), changed holds, and
/// the pool and key totals (kept by the writer, written with the batch).
/// On a `first` attempt a taken hold or event id is `Fail::Again` (nothing was written yet: a
/// first attempt has one write, whose insert comes first).
fn write(db: &Db, plan: &Plan, first: bool) -> Result<Vec<i64>, Fail> {
    let conn: &Connection = db;
    let taken =
        |e: rusqlite::Error| if first && is_unique_violation(&e) { Fail::Again } else { Fail::Store(backend(e)) };
    for (hold, fingerprint) in plan.new_holds() {
        insert_hold(conn, hold, fingerprint).map_err(taken)?;
    }
    let mut seqs = Vec::with_capacity(plan.new_events.len());
    for row in &plan.new_events {
        seqs.push(insert_event(db, row).map_err(|e| match e {
            StoreError::Conflict(_) if first => Fail::Again,
            other => Fail::Store(other),
        })?);
    }
    for key in &plan.changed_holds {
        update_hold(conn, &plan.snapshot.holds[key], &seqs)?;
    }
    for id in &plan.changed_pools {
        db.set_pool(id, plan.snapshot.pools[id]);
    }
    for id in &plan.changed_keys {
        db.set_key(id, plan.snapshot.key_totals[id]);
    }
    Ok(seqs)
}

/// Writes what a plan changed of a hold, and only that (an unchanged indexed column is not
/// rewritten): closed (settled, expired, voided) with its event, extended, charged in part.
fn update_hold(conn: &Connection, entry: &HoldEntry, seqs: &[i64]) -> StoreResult<()> {
    let h = &entry.hold;
    let run = |sql: &str, params: &[&dyn rusqlite::ToSql]| {
        conn.prepare_cached(sql).and_then(|mut s| s.execute(params)).map(drop).map_err(backend)
    };
    if h.state != HoldState::Open {
        let seq = match entry.event {
            Some(EventRef::New(i)) => Some(seqs[i]),
            Some(EventRef::Seq(seq)) => Some(seq),
            None => None,
        };
        run(
            "UPDATE holds SET state = ?3, event_seq = COALESCE(?4, event_seq) WHERE account = ?1 AND id = ?2",
            &[&h.account, &h.id, &h.state.as_str(), &seq],
        )?;
    }
    if entry.expires_changed {
        run(
            "UPDATE holds SET expires_us = ?3 WHERE account = ?1 AND id = ?2",
            &[&h.account, &h.id, &us(h.expires_at)],
        )?;
    }
    if entry.parted {
        run(
            "UPDATE holds SET amount = ?3, lease = 1 WHERE account = ?1 AND id = ?2",
            &[&h.account, &h.id, &h.amount.0],
        )?;
    }
    Ok(())
}

fn insert_hold(conn: &Connection, hold: &tollgate_store::Hold, fingerprint: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO holds (account, id, pool, key_id, amount, model, source, state, cycle_start_us, cycle_end_us,
                            created_us, expires_us, remaining_after, fingerprint, made_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .and_then(|mut s| {
        s.execute(params![
            hold.account,
            hold.id,
            hold.pool.as_str(),
            hold.key,
            hold.amount.0,
            hold.model,
            hold.source,
            us(hold.cycle_start),
            us(hold.cycle_end),
            us(hold.created_at),
            us(hold.expires_at),
            hold.remaining_after.map(|n| n.0),
            fingerprint,
            hold.made_by.to_text()
        ])
    })?;
    Ok(())
}

/// The open holds an expiry settles at their held amount: those expired by `now`, or all.
pub fn expire(db: &Db, now: DateTime<Utc>, all: bool) -> StoreResult<Vec<Event>> {
    let conn: &Connection = db;
    let sql = if all {
        "SELECT account, id FROM holds WHERE state = 'open'"
    } else {
        "SELECT account, id FROM holds WHERE state = 'open' AND expires_us <= ?1"
    };
    let ops: Vec<(Op, DateTime<Utc>)> = {
        let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
        let op = |r: &rusqlite::Row<'_>| Ok((Op::Expire { account: r.get(0)?, hold_id: r.get(1)? }, now));
        let mapped = if all { stmt.query_map([], op) } else { stmt.query_map([us(now)], op) };
        mapped.and_then(Iterator::collect).map_err(backend)?
    };
    run(db, &ops)?.into_iter().filter(|d| matches!(d, Done::Event(_))).map(Done::into_event).collect()
}

/// Records events that already happened, in order, all or nothing (the caller's savepoint).
pub fn record_events(
    db: &Db,
    events: Vec<tollgate_store::NewEvent>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<EventOutcome>> {
    let ops: Vec<(Op, DateTime<Utc>)> = events.into_iter().map(|e| (Op::Record(Box::new(e)), now)).collect();
    run(db, &ops)?.into_iter().map(Done::into_event_outcome).collect()
}

/// Inserts `g` (its id aside); the id it was given.
pub fn insert_grant(conn: &Connection, g: &Grant) -> StoreResult<i64> {
    conn.prepare_cached(
        "INSERT INTO grants (account, pool, kind, amount, cycle_start_us, expires_us, note, created_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            g.account,
            g.pool.as_str(),
            g.kind.as_str(),
            g.amount.0,
            us(g.cycle_start),
            us(g.expires_at),
            g.note,
            us(g.created_at)
        ])
    })
    .map_err(backend)?;
    Ok(conn.last_insert_rowid())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Inserts `row` and adds it to its hour's rollup; its seq.
fn insert_event(db: &Db, row: &ChargedEvent) -> StoreResult<i64> {
    let ChargedEvent { event: e, cycle_start, split, overshoot, hold_id, unsettled, recorded: now } = row;
    let (cycle_start, now) = (*cycle_start, *now);
    let conn: &Connection = db;
    let labels = rows::labels_to_text(&e.labels);
    let event_id = &e.id;
    conn.prepare_cached(
        "INSERT INTO events (account, id, pool, model, input_tokens, cache_creation_5m_input_tokens,
             cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
             grant_part, overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us,
             cycle_start_us, hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22,
             ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.account,
            e.id,
            e.pool.as_str(),
            e.model,
            e.usage.input_tokens as i64,
            e.usage.cache_creation_5m_input_tokens as i64,
            e.usage.cache_creation_1h_input_tokens as i64,
            e.usage.cache_read_input_tokens as i64,
            e.usage.output_tokens as i64,
            e.usage.web_search_requests as i64,
            e.cost.0,
            split.grant.0,
            split.overage.0,
            overshoot.0,
            e.service_tier,
            e.inference_geo,
            e.speed,
            e.source,
            e.key,
            labels,
            us(e.timestamp),
            us(cycle_start),
            hold_id,
            e.latency_ms.map(|v| v as i64),
            e.ttft_ms.map(|v| v as i64),
            e.partial,
            unsettled,
            us(now),
            e.fingerprint,
            e.estimated
        ])
    })
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!("event id {:?} is already recorded; use another event id", event_id))
        } else {
            backend(e)
        }
    })?;
    add_to_rollup(db, row, labels);
    Ok(conn.last_insert_rowid())
}

/// Adds `row` to its hour's rollup (the writer writes the rollups with the batch).
fn add_to_rollup(db: &Db, row: &ChargedEvent, labels: String) {
    let (e, split) = (&row.event, row.split);
    let u = &e.usage;
    let hour = us(e.timestamp).div_euclid(3_600_000_000) * 3_600_000_000;
    let key = (
        e.account.clone(),
        us(row.cycle_start),
        e.pool,
        hour,
        e.model.clone(),
        e.source.clone().unwrap_or_default(),
        e.key.clone().unwrap_or_default(),
        labels,
    );
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    db.add_rollup(
        key,
        [
            1,
            n(u.input_tokens),
            n(u.cache_creation_5m_input_tokens),
            n(u.cache_creation_1h_input_tokens),
            n(u.cache_read_input_tokens),
            n(u.output_tokens),
            n(u.web_search_requests),
            e.cost.0,
            split.grant.0.saturating_add(split.overage.0),
            e.latency_ms.map(n).unwrap_or(0),
            i64::from(e.latency_ms.is_some()),
        ],
    );
}

/// True when the account has any ledger state (so its cycles must not move).
pub fn has_ledger_state(conn: &Connection, account: &str) -> StoreResult<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM pool_cycles WHERE account = ?1)")
        .and_then(|mut s| s.query_row([account], |r| r.get(0)))
        .map_err(backend)
}
