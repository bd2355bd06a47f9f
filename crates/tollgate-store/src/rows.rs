//! The records as both backends store them: the columns each table's reads select, in order,
//! and the one mapper per record from those columns, over [`Cells`] (a row of either database).
//! A backend keeps only its SQL and its [`Cells`] for its row type.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Tier, Usage};

use crate::{Account, Event, Grant, GrantKind, Hold, HoldState, Key, KeyPool, Maker, StoreError, StoreResult};

/// A row of a query's result, read by column number. A value of the wrong type or out of its
/// range is `StoreError::Corrupt`.
pub trait Cells {
    fn text(&self, i: usize) -> StoreResult<String>;
    fn text_opt(&self, i: usize) -> StoreResult<Option<String>>;
    fn int(&self, i: usize) -> StoreResult<i64>;
    fn int_opt(&self, i: usize) -> StoreResult<Option<i64>>;
    fn boolean(&self, i: usize) -> StoreResult<bool>;
}

/// Microseconds since the epoch: how both backends store a time.
pub fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time (microseconds since the epoch).
pub fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A stored value this code cannot read: the database was changed by something else.
pub fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} {value:?}"))
}

pub fn pool_of(s: &str) -> StoreResult<PoolKind> {
    PoolKind::parse(s).ok_or_else(|| corrupt("pool", s))
}

/// Labels as stored: a JSON object of strings.
#[allow(clippy::expect_used, reason = "a map of strings to strings always serializes to JSON")]
pub fn labels_to_text(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).expect("a string map serializes")
}

pub fn labels_of(text: &str) -> StoreResult<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(|_| corrupt("labels", text))
}

fn nanos(r: &impl Cells, i: usize) -> StoreResult<Nanos> {
    r.int(i).map(Nanos)
}

fn nanos_opt(r: &impl Cells, i: usize) -> StoreResult<Option<Nanos>> {
    Ok(r.int_opt(i)?.map(Nanos))
}

fn at(r: &impl Cells, i: usize) -> StoreResult<DateTime<Utc>> {
    let us = r.int(i)?;
    DateTime::from_timestamp_micros(us).ok_or_else(|| corrupt("time", &us.to_string()))
}

/// A column that holds a `u64` (tokens, milliseconds, a multiplier): stored in a signed 64-bit
/// integer bit for bit (`as i64`), so every value round-trips exactly.
fn count(r: &impl Cells, i: usize) -> StoreResult<u64> {
    Ok(r.int(i)? as u64)
}

pub const TIER_COLUMNS: &str = "id, interactive, programmatic, monthly_price, payg_multiplier_ppm";

/// A tier from the five `TIER_COLUMNS` starting at column `at`.
pub fn tier_at(r: &impl Cells, at: usize) -> StoreResult<Tier> {
    Ok(Tier {
        id: r.text(at)?,
        interactive: nanos(r, at + 1)?,
        programmatic: nanos(r, at + 2)?,
        monthly_price: nanos_opt(r, at + 3)?,
        payg_multiplier_ppm: count(r, at + 4)?,
    })
}

pub const ACCOUNT_COLUMNS: &str = "id, tier, anchor_us, timezone, interactive_grant, programmatic_grant, created_us";

pub fn account(r: &impl Cells) -> StoreResult<Account> {
    let tz = r.text(3)?;
    Ok(Account {
        id: r.text(0)?,
        tier: r.text(1)?,
        anchor: at(r, 2)?,
        timezone: tz.parse::<Tz>().map_err(|_| corrupt("timezone", &tz))?,
        interactive_grant: nanos_opt(r, 4)?,
        programmatic_grant: nanos_opt(r, 5)?,
        created_at: at(r, 6)?,
    })
}

/// A policy from three columns starting at `at`: on_exhausted, overage_cap, spend_cap.
pub fn policy(r: &impl Cells, at: usize) -> StoreResult<PoolPolicy> {
    let on = r.text(at)?;
    Ok(PoolPolicy {
        on_exhausted: OnExhausted::parse(&on).ok_or_else(|| corrupt("on_exhausted", &on))?,
        overage_cap: nanos_opt(r, at + 1)?,
        spend_cap: nanos_opt(r, at + 2)?,
    })
}

pub const KEY_COLUMNS: &str = "id, account, name, pool, labels, cap, created_us, revoked_us";

pub fn key(r: &impl Cells) -> StoreResult<Key> {
    let pool = r.text(3)?;
    Ok(Key {
        id: r.text(0)?,
        account: r.text(1)?,
        name: r.text_opt(2)?,
        pool: KeyPool::parse(&pool).ok_or_else(|| corrupt("key pool", &pool))?,
        labels: labels_of(&r.text(4)?)?,
        cap: nanos_opt(r, 5)?,
        created_at: at(r, 6)?,
        revoked_at: match r.int_opt(7)? {
            Some(_) => Some(at(r, 7)?),
            None => None,
        },
    })
}

pub const GRANT_COLUMNS: &str = "id, account, pool, kind, amount, cycle_start_us, expires_us, note, created_us";

pub fn grant(r: &impl Cells) -> StoreResult<Grant> {
    Ok(Grant {
        id: r.int(0)?,
        account: r.text(1)?,
        pool: pool_of(&r.text(2)?)?,
        kind: if r.text(3)? == "tier" { GrantKind::Tier } else { GrantKind::TopUp },
        amount: nanos(r, 4)?,
        cycle_start: at(r, 5)?,
        expires_at: at(r, 6)?,
        note: r.text_opt(7)?,
        created_at: at(r, 8)?,
    })
}

pub const HOLD_COLUMNS: &str = "id, account, pool, key_id, amount, model, source, state, cycle_start_us, \
     cycle_end_us, created_us, expires_us, remaining_after, fingerprint, event_seq, made_by";

/// A hold as stored, with what only the ledger reads.
pub struct HoldRow {
    pub hold: Hold,
    pub fingerprint: String,
    pub event_seq: Option<i64>,
}

pub fn hold(r: &impl Cells) -> StoreResult<HoldRow> {
    let state = r.text(7)?;
    let maker = r.text(15)?;
    Ok(HoldRow {
        hold: Hold {
            id: r.text(0)?,
            account: r.text(1)?,
            pool: pool_of(&r.text(2)?)?,
            key: r.text_opt(3)?,
            amount: nanos(r, 4)?,
            model: r.text_opt(5)?,
            source: r.text_opt(6)?,
            state: HoldState::parse(&state).ok_or_else(|| corrupt("hold state", &state))?,
            cycle_start: at(r, 8)?,
            cycle_end: at(r, 9)?,
            created_at: at(r, 10)?,
            expires_at: at(r, 11)?,
            remaining_after: nanos_opt(r, 12)?,
            made_by: Maker::parse(&maker).ok_or_else(|| corrupt("hold maker", &maker))?,
        },
        fingerprint: r.text(13)?,
        event_seq: r.int_opt(14)?,
    })
}

pub const EVENT_COLUMNS: &str = "seq, id, account, pool, model, input_tokens, cache_creation_5m_input_tokens, \
     cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost, grant_part, \
     overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us, cycle_start_us, \
     hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated";

/// An event as stored, with the fingerprint its repeats are checked against.
pub struct EventRow {
    pub event: Event,
    pub fingerprint: String,
}

pub fn event(r: &impl Cells) -> StoreResult<EventRow> {
    Ok(EventRow {
        event: Event {
            seq: r.int(0)?,
            id: r.text(1)?,
            account: r.text(2)?,
            pool: pool_of(&r.text(3)?)?,
            model: r.text(4)?,
            usage: Usage {
                input_tokens: count(r, 5)?,
                cache_creation_5m_input_tokens: count(r, 6)?,
                cache_creation_1h_input_tokens: count(r, 7)?,
                cache_read_input_tokens: count(r, 8)?,
                output_tokens: count(r, 9)?,
                web_search_requests: count(r, 10)?,
            },
            cost: nanos(r, 11)?,
            grant_part: nanos(r, 12)?,
            overage_part: nanos(r, 13)?,
            overshoot: nanos(r, 14)?,
            service_tier: r.text_opt(15)?,
            inference_geo: r.text_opt(16)?,
            speed: r.text_opt(17)?,
            source: r.text_opt(18)?,
            key: r.text_opt(19)?,
            labels: labels_of(&r.text(20)?)?,
            timestamp: at(r, 21)?,
            cycle_start: at(r, 22)?,
            hold_id: r.text_opt(23)?,
            latency_ms: r.int_opt(24)?.map(|v| v as u64),
            ttft_ms: r.int_opt(25)?.map(|v| v as u64),
            partial: r.boolean(26)?,
            estimated: r.boolean(30)?,
            unsettled: r.boolean(27)?,
            recorded_at: at(r, 28)?,
        },
        fingerprint: r.text(29)?,
    })
}

/// A usage total that cannot be negative: a negative stored sum reads as zero.
fn total(r: &impl Cells, i: usize) -> StoreResult<u64> {
    Ok(r.int(i)?.max(0) as u64)
}

/// A rollup row as both backends' report reads select it: pool, hour, model, source, key,
/// labels, then calls, the six usage counts, cost, charged, latency sum and timed calls.
pub fn rollup(r: &impl Cells) -> StoreResult<crate::report::Rollup> {
    Ok(crate::report::Rollup {
        pool: pool_of(&r.text(0)?)?,
        hour: at(r, 1)?,
        model: r.text(2)?,
        source: r.text(3)?,
        key: r.text(4)?,
        labels: r.text(5)?,
        calls: total(r, 6)?,
        usage: Usage {
            input_tokens: total(r, 7)?,
            cache_creation_5m_input_tokens: total(r, 8)?,
            cache_creation_1h_input_tokens: total(r, 9)?,
            cache_read_input_tokens: total(r, 10)?,
            output_tokens: total(r, 11)?,
            web_search_requests: total(r, 12)?,
        },
        cost: nanos(r, 13)?,
        charged: nanos(r, 14)?,
        latency_ms_sum: total(r, 15)?,
        timed: total(r, 16)?,
    })
}

/// A pool cycle's sums as both backends' audits select them: account, pool, cycle start, the
/// stored totals and the sums of columns 3 to 11, and from `overshoot_at` the overshoot and the
/// number of events with some.
pub fn pool_sums(
    r: &impl Cells,
    overshoot_at: usize,
    policy: Option<PoolPolicy>,
) -> StoreResult<crate::audit::PoolSums> {
    Ok(crate::audit::PoolSums {
        account: r.text(0)?,
        pool: r.text(1)?,
        cycle_start: at(r, 2)?,
        policy,
        grants: nanos(r, 3)?,
        used: nanos(r, 4)?,
        overage: nanos(r, 5)?,
        held: nanos(r, 6)?,
        events_grant: nanos(r, 7)?,
        events_overage: nanos(r, 8)?,
        through_holds: nanos(r, 9)?,
        open_holds: nanos(r, 10)?,
        grant_rows: nanos(r, 11)?,
        overshoot: nanos(r, overshoot_at)?,
        overshot_events: count(r, overshoot_at + 1)?,
    })
}
