//! The ledger's writes, run by the single writer inside its transaction. Each reads the state it
//! needs, asks `tollgate-core` for the decision, and writes the result.

use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tollgate_core::ledger::{self, PoolScope, Replay};
use tollgate_core::{Cycle, KeyScope, Nanos, PoolKind, tier::PPM};
use tollgate_store::{
    Account, ChargedEvent, Event, EventOutcome, Grant, Hold, HoldOutcome, HoldRequest, HoldState, NewEvent,
    SettleRequest, StoreError, StoreResult,
};

use crate::rows::{self, backend, us};
use crate::writer::{Db, KeyTotals, PoolTotals};

/// A pool's state in one cycle, plus what settling needs from its tier.
pub struct PoolCycle {
    pub scope: PoolScope,
    pub payg_multiplier_ppm: u64,
}

/// The tier grant of a pool: the account's own grant if set, else its tier's.
fn tier_grant(db: &Db, account: &Account, pool: PoolKind) -> StoreResult<(Nanos, u64)> {
    let tier = db
        .tier(&account.tier)?
        .ok_or_else(|| StoreError::Backend(format!("account {} has unknown tier {}", account.id, account.tier)))?;
    Ok((account.grant_override(pool).unwrap_or(tier.grant(pool)), tier.payg_multiplier_ppm))
}

/// Reads the pool's cycle row, creating it with the tier's grant when its time has come.
pub fn pool_cycle(db: &Db, account: &Account, pool: PoolKind, cycle: &Cycle) -> StoreResult<PoolCycle> {
    let (grant, ppm) = tier_grant(db, account, pool)?;
    let id = (account.id.clone(), pool, us(cycle.start));
    let totals = match db.pool_totals(&id)? {
        Some(totals) => totals,
        None => {
            let totals = db.create_pool(&id, us(cycle.end), grant)?;
            insert_grant(db, &Grant::from_tier(&account.id, pool, grant, cycle))?;
            totals
        }
    };
    let policy = db.policy(&account.id, pool)?;
    let PoolTotals { grants, used, overage, held } = totals;
    Ok(PoolCycle {
        scope: PoolScope { limit: policy.limit(grants), grants, used, overage, held },
        payg_multiplier_ppm: ppm,
    })
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

fn add_to_pool(
    db: &Db,
    account: &str,
    pool: PoolKind,
    cycle_start: DateTime<Utc>,
    used: Nanos,
    overage: Nanos,
    held: Nanos,
) -> StoreResult<()> {
    db.add_to_pool(
        &(account.to_string(), pool, us(cycle_start)),
        PoolTotals { grants: Nanos::ZERO, used, overage, held },
    )
}

/// Reads a key's scope in a cycle.
fn key_cycle(db: &Db, key_id: &str, cap: Option<Nanos>, cycle_start: DateTime<Utc>) -> StoreResult<KeyScope> {
    let KeyTotals { charged, held } = db.key_totals(&(key_id.to_string(), us(cycle_start)))?;
    Ok(KeyScope { cap, charged, held })
}

fn add_to_key(db: &Db, key_id: &str, cycle_start: DateTime<Utc>, charged: Nanos, held: Nanos) -> StoreResult<()> {
    db.add_to_key(&(key_id.to_string(), us(cycle_start)), KeyTotals { charged, held })
}

/// The cap of a key of `account`; `Invalid` if the account has no such key.
fn key_cap(conn: &Connection, account: &str, key_id: &str) -> StoreResult<Option<Nanos>> {
    conn.prepare_cached("SELECT cap FROM keys WHERE id = ?1 AND account = ?2")
        .and_then(|mut s| s.query_row([key_id, account], |r| r.get::<_, Option<i64>>(0)).optional())
        .map_err(backend)?
        .map(|cap| cap.map(Nanos))
        .ok_or_else(|| StoreError::Invalid(format!("account {account:?} has no key {key_id:?}")))
}

pub fn hold(db: &Db, req: &HoldRequest, now: DateTime<Utc>) -> StoreResult<HoldOutcome> {
    let conn: &Connection = db;
    // Every refusal comes before the first change: this job runs without a savepoint. A repeated
    // id is found by the insert's own uniqueness check when the pool's row already exists (the
    // usual case, one statement less); when this hold would create the row, it is looked up first.
    let account = db.account(&req.account)?;
    let cap = match &req.key {
        Some(id) => Some(key_cap(conn, &req.account, id)?),
        None => None,
    };
    let cycle = account.cycle_anchor().cycle_at(now);
    if db.pool_totals(&(account.id.clone(), req.pool, us(cycle.start)))?.is_none()
        && let Some(outcome) = replay_hold(conn, req)?
    {
        return Ok(outcome);
    }
    let pool = pool_cycle(db, &account, req.pool, &cycle)?;
    let key = match (&req.key, cap) {
        (Some(id), Some(cap)) => Some((id.as_str(), key_cycle(db, id, cap, cycle.start)?)),
        _ => None,
    };
    let decision = match ledger::decide_hold(&pool.scope, key.as_ref().map(|(_, k)| k), req.amount) {
        Ok(d) => d,
        Err(refusal) => {
            return Ok(match replay_hold(conn, req)? {
                Some(outcome) => outcome,
                None => HoldOutcome::Refused { refusal, resets_at: cycle.end },
            });
        }
    };
    let hold = Hold {
        id: req.id.clone(),
        account: req.account.clone(),
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
        remaining_after: decision.pool_remaining,
        made_by: req.made_by.clone(),
    };
    let inserted = conn
        .prepare_cached(
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
                req.fingerprint,
                hold.made_by.to_text()
            ])
        });
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            return replay_hold(conn, req)?
                .ok_or_else(|| StoreError::Backend(format!("hold {:?} is both present and absent", req.id)));
        }
        Err(e) => return Err(backend(e)),
    }
    add_to_pool(db, &hold.account, hold.pool, cycle.start, Nanos::ZERO, Nanos::ZERO, hold.amount)?;
    if let Some((id, _)) = key {
        add_to_key(db, id, cycle.start, Nanos::ZERO, hold.amount)?;
    }
    Ok(HoldOutcome::Held(hold))
}

/// The outcome of a hold request whose id was used before: the first hold if the request is the
/// same, a conflict if not; None if the id is new.
fn replay_hold(conn: &Connection, req: &HoldRequest) -> StoreResult<Option<HoldOutcome>> {
    let existing = rows::load_hold(conn, &req.account, &req.id)?;
    match ledger::replay(existing.map(|h| (h.fingerprint, h.hold)), &req.fingerprint) {
        Replay::Same(hold) => Ok(Some(HoldOutcome::Replayed(hold))),
        Replay::Conflict => Err(StoreError::Conflict(format!(
            "hold id {:?} was already used for a different request; use a new id",
            req.id
        ))),
        Replay::New => Ok(None),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Loads an open hold for settling or voiding, or explains why it cannot be.
fn open_hold(conn: &Connection, account: &str, hold_id: &str) -> StoreResult<rows::HoldRow> {
    rows::load_hold(conn, account, hold_id)?.ok_or_else(|| StoreError::NotFound(format!("hold {hold_id:?}")))
}

pub fn settle(db: &Db, req: &SettleRequest, now: DateTime<Utc>) -> StoreResult<Event> {
    let conn: &Connection = db;
    let row = open_hold(conn, &req.account, &req.hold_id)?;
    match row.hold.state {
        HoldState::Open => {}
        HoldState::Settled => {
            let first = rows::load_event_by_seq(conn, row.event_seq.expect("a settled hold has its event"))?;
            return match ledger::replay(Some((first.fingerprint, first.event)), &req.event.fingerprint) {
                Replay::Same(event) => Ok(event),
                _ => Err(StoreError::Conflict(format!(
                    "hold {:?} is already settled with a different usage",
                    req.hold_id
                ))),
            };
        }
        state => {
            return Err(StoreError::Conflict(format!(
                "hold {:?} is {} and can no longer be settled",
                req.hold_id,
                state.as_str()
            )));
        }
    }
    let mut event = req.event.clone();
    // The hold decides where the charge goes: its account, pool and key, never the event's.
    event.account = row.hold.account.clone();
    if event.id.is_empty() {
        event.id = row.hold.id.clone();
    }
    event.pool = row.hold.pool;
    event.key = row.hold.key.clone();
    settle_hold(db, &row.hold, event, false, now)
}

/// Charges one call's event against `release` of an open hold and keeps the rest held (a lease).
pub fn settle_part(db: &Db, req: &SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Event> {
    let conn: &Connection = db;
    let first = if req.event.id.is_empty() { None } else { rows::load_event(conn, &req.account, &req.event.id)? };
    if let Some(event) = tollgate_store::replay_part(req, first.map(|f| (f.fingerprint, f.event)))? {
        return Ok(event);
    }
    let row = open_hold(conn, &req.account, &req.hold_id)?;
    let event = tollgate_store::part_event(req, &row.hold, release)?;
    let recorded = charge_hold(db, &row.hold, release, event, false, now)?;
    conn.prepare_cached("UPDATE holds SET amount = amount - ?3, lease = 1 WHERE account = ?1 AND id = ?2")
        .and_then(|mut s| s.execute(params![row.hold.account, row.hold.id, release.0]))
        .map_err(backend)?;
    Ok(recorded)
}

/// Charges a hold with an event's cost, releases the hold, records the event.
fn settle_hold(db: &Db, hold: &Hold, event: NewEvent, unsettled: bool, now: DateTime<Utc>) -> StoreResult<Event> {
    let recorded = charge_hold(db, hold, hold.amount, event, unsettled, now)?;
    let state = if unsettled { HoldState::Expired } else { HoldState::Settled };
    let conn: &Connection = db;
    conn.prepare_cached("UPDATE holds SET state = ?3, event_seq = ?4 WHERE account = ?1 AND id = ?2")
        .and_then(|mut s| s.execute(params![hold.account, hold.id, state.as_str(), recorded.seq]))
        .map_err(backend)?;
    Ok(recorded)
}

/// Charges an event's cost against `release` of a hold's amount, releases that part and
/// records the event.
fn charge_hold(
    db: &Db,
    hold: &Hold,
    release: Nanos,
    event: NewEvent,
    unsettled: bool,
    now: DateTime<Utc>,
) -> StoreResult<Event> {
    let conn: &Connection = db;
    let account = db.account(&hold.account)?;
    let cycle = Cycle { index: 0, start: hold.cycle_start, end: hold.cycle_end };
    let pool = pool_cycle(db, &account, hold.pool, &cycle)?;
    // An unsettled hold is charged exactly its held amount, which already includes any multiplier.
    let ppm = if unsettled { PPM } else { pool.payg_multiplier_ppm };
    let settlement = match ledger::settle(release, event.cost, &pool.scope, ppm) {
        Ok(s) => s,
        // A taken event id is reported before a bad amount, as when it was checked first.
        Err(_) if rows::load_event(conn, &hold.account, &event.id)?.is_some() => {
            return Err(StoreError::Conflict(format!(
                "event id {:?} is already recorded; use another event id",
                event.id
            )));
        }
        Err(refusal) => return Err(overflow(refusal)),
    };
    let split = settlement.split;
    add_to_pool(db, &hold.account, hold.pool, hold.cycle_start, split.grant, split.overage, Nanos(-release.0))?;
    if let Some(key) = &hold.key {
        add_to_key(db, key, hold.cycle_start, split.total(), Nanos(-release.0))?;
    }
    insert_event(db, &ChargedEvent { unsettled, ..ChargedEvent::of_hold(event, hold, settlement, now) })
}

fn overflow(refusal: tollgate_core::Refusal) -> StoreError {
    StoreError::Invalid(format!("amount out of range ({})", refusal.code()))
}

/// Inserts `row` and adds it to its hour's rollup.
fn insert_event(db: &Db, row: &ChargedEvent) -> StoreResult<Event> {
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
    Ok(row.event(conn.last_insert_rowid()))
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

pub fn void(db: &Db, account: &str, hold_id: &str) -> StoreResult<Hold> {
    let conn: &Connection = db;
    let row = open_hold(conn, account, hold_id)?;
    match row.hold.state {
        HoldState::Open => {}
        HoldState::Voided => return Ok(row.hold),
        state => {
            return Err(StoreError::Conflict(format!(
                "hold {hold_id:?} is {} and can no longer be voided",
                state.as_str()
            )));
        }
    }
    let h = &row.hold;
    add_to_pool(db, account, h.pool, h.cycle_start, Nanos::ZERO, Nanos::ZERO, Nanos(-h.amount.0))?;
    if let Some(key) = &h.key {
        add_to_key(db, key, h.cycle_start, Nanos::ZERO, Nanos(-h.amount.0))?;
    }
    conn.prepare_cached("UPDATE holds SET state = 'voided' WHERE account = ?1 AND id = ?2")
        .and_then(|mut s| s.execute([account, hold_id]))
        .map_err(backend)?;
    Ok(Hold { state: HoldState::Voided, ..row.hold })
}

pub fn extend(conn: &Connection, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
    let row = open_hold(conn, account, hold_id)?;
    if row.hold.state != HoldState::Open {
        return Err(StoreError::Conflict(format!("hold {hold_id:?} is {}", row.hold.state.as_str())));
    }
    let expires_at = now + Duration::seconds(ttl_s as i64);
    conn.prepare_cached("UPDATE holds SET expires_us = ?3 WHERE account = ?1 AND id = ?2")
        .and_then(|mut s| s.execute(params![account, hold_id, us(expires_at)]))
        .map_err(backend)?;
    Ok(Hold { expires_at, ..row.hold })
}

/// Records one event; the caller runs a batch inside one savepoint so a conflict undoes it all.
pub fn record_event(db: &Db, e: &NewEvent, now: DateTime<Utc>) -> StoreResult<EventOutcome> {
    let conn: &Connection = db;
    let existing = rows::load_event(conn, &e.account, &e.id)?;
    match ledger::replay(existing.map(|r| (r.fingerprint, r.event)), &e.fingerprint) {
        Replay::Same(event) => return Ok(EventOutcome::Duplicate(event)),
        Replay::Conflict => {
            return Err(StoreError::Conflict(format!(
                "event id {:?} was already recorded with different content; use a new id",
                e.id
            )));
        }
        Replay::New => {}
    }
    let account = db.account(&e.account)?;
    if let Some(key) = &e.key {
        key_cap(conn, &e.account, key)?;
    }
    let cycle = account.cycle_anchor().cycle_at(e.timestamp);
    let pool = pool_cycle(db, &account, e.pool, &cycle)?;
    let split = ledger::split_charge(e.cost, &pool.scope, pool.payg_multiplier_ppm).map_err(overflow)?;
    add_to_pool(db, &e.account, e.pool, cycle.start, split.grant, split.overage, Nanos::ZERO)?;
    if let Some(key) = &e.key {
        add_to_key(db, key, cycle.start, split.total(), Nanos::ZERO)?;
    }
    insert_event(db, &ChargedEvent::direct(e.clone(), cycle.start, split, now)).map(EventOutcome::Recorded)
}

/// Settles open holds at their held amount, flagged `unsettled`: those expired by `now`, or all.
pub fn expire(db: &Db, now: DateTime<Utc>, all: bool) -> StoreResult<Vec<Event>> {
    let conn: &Connection = db;
    let sql = if all {
        format!("SELECT {} FROM holds WHERE state = 'open'", rows::HOLD_COLUMNS)
    } else {
        format!("SELECT {} FROM holds WHERE state = 'open' AND expires_us <= ?1", rows::HOLD_COLUMNS)
    };
    let holds: Vec<Hold> = {
        let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
        let mapped = if all { stmt.query_map([], rows::hold) } else { stmt.query_map([us(now)], rows::hold) };
        mapped.and_then(|rows| rows.map(|r| r.map(|h| h.hold)).collect()).map_err(backend)?
    };
    let mut events = Vec::with_capacity(holds.len());
    for hold in holds {
        let event = hold.unsettled_event(rows::load_event(conn, &hold.account, &hold.id)?.is_some());
        events.push(settle_hold(db, &hold, event, true, now)?);
    }
    Ok(events)
}

/// True when the account has any ledger state (so its cycles must not move).
pub fn has_ledger_state(conn: &Connection, account: &str) -> StoreResult<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM pool_cycles WHERE account = ?1)")
        .and_then(|mut s| s.query_row([account], |r| r.get(0)))
        .map_err(backend)
}
