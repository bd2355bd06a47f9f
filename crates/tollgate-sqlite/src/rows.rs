//! Conversions between the store's records and SQLite rows.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Tier, Usage};
use tollgate_store::{Account, Event, Hold, HoldState, Key, KeyPool, Maker, StoreError, StoreResult};

pub fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).expect("stored times are in range")
}

/// An SQLite error as the store's: `Unavailable` when the disk refuses (full, or an I/O error),
/// which a later write may get past once there is room; `Backend` otherwise.
/// The store's error for an SQLite error: a full disk or an I/O error is the store away for a
/// while; a file that is not a database, a damaged one, or a row the store cannot read is
/// corrupt; the rest is ours.
pub fn backend(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure) => {
            StoreError::Unavailable(e.to_string())
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Corrupt(e.to_string())
        }
        _ if matches!(e, rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..)) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

pub fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what}: {value}"), rusqlite::types::Type::Text)
}

pub fn pool_of(s: &str) -> rusqlite::Result<PoolKind> {
    PoolKind::parse(s).ok_or_else(|| corrupt("pool", s))
}

pub fn labels_to_text(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).expect("a string map serializes")
}

pub fn labels_of(text: &str) -> rusqlite::Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(|_| corrupt("labels", text))
}

fn nanos_opt(v: Option<i64>) -> Option<Nanos> {
    v.map(Nanos)
}

pub const TIER_COLUMNS: &str = "id, interactive, programmatic, monthly_price, payg_multiplier_ppm";

pub fn tier(r: &Row) -> rusqlite::Result<Tier> {
    Ok(Tier {
        id: r.get(0)?,
        interactive: Nanos(r.get(1)?),
        programmatic: Nanos(r.get(2)?),
        monthly_price: nanos_opt(r.get(3)?),
        payg_multiplier_ppm: r.get::<_, i64>(4)? as u64,
    })
}

/// Inserts a tier; an existing tier of that id is replaced when `replace`, else kept.
pub fn write_tier(conn: &Connection, tier: &Tier, replace: bool) -> StoreResult<()> {
    let on_conflict = if replace {
        "DO UPDATE SET interactive = ?2, programmatic = ?3, monthly_price = ?4, payg_multiplier_ppm = ?5"
    } else {
        "DO NOTHING"
    };
    conn.execute(
        &format!(
            "INSERT INTO tiers (id, interactive, programmatic, monthly_price, payg_multiplier_ppm)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) {on_conflict}"
        ),
        params![
            tier.id,
            tier.interactive.0,
            tier.programmatic.0,
            tier.monthly_price.map(|n| n.0),
            tier.payg_multiplier_ppm as i64
        ],
    )
    .map_err(backend)?;
    Ok(())
}

pub fn load_tier(conn: &Connection, id: &str) -> StoreResult<Option<Tier>> {
    conn.prepare_cached(&format!("SELECT {TIER_COLUMNS} FROM tiers WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], tier).optional())
        .map_err(backend)
}

pub const ACCOUNT_COLUMNS: &str = "id, tier, anchor_us, timezone, interactive_grant, programmatic_grant, created_us";

pub fn account(r: &Row) -> rusqlite::Result<Account> {
    let tz: String = r.get(3)?;
    Ok(Account {
        id: r.get(0)?,
        tier: r.get(1)?,
        anchor: time(r.get(2)?),
        timezone: tz.parse::<Tz>().map_err(|_| corrupt("timezone", &tz))?,
        interactive_grant: nanos_opt(r.get(4)?),
        programmatic_grant: nanos_opt(r.get(5)?),
        created_at: time(r.get(6)?),
    })
}

pub fn load_account(conn: &Connection, id: &str) -> StoreResult<Option<Account>> {
    conn.prepare_cached(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], account).optional())
        .map_err(backend)
}

pub fn require_account(conn: &Connection, id: &str) -> StoreResult<Account> {
    load_account(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("account {id:?}")))
}

pub fn load_policy(conn: &Connection, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy> {
    let row = conn
        .prepare_cached("SELECT on_exhausted, overage_cap, spend_cap FROM policies WHERE account = ?1 AND pool = ?2")
        .and_then(|mut s| {
            s.query_row(params![account, pool.as_str()], |r| {
                let on: String = r.get(0)?;
                Ok(PoolPolicy {
                    on_exhausted: OnExhausted::parse(&on).ok_or_else(|| corrupt("on_exhausted", &on))?,
                    overage_cap: nanos_opt(r.get(1)?),
                    spend_cap: nanos_opt(r.get(2)?),
                })
            })
            .optional()
        })
        .map_err(backend)?;
    Ok(row.unwrap_or_default())
}

pub const KEY_COLUMNS: &str = "id, account, name, pool, labels, cap, created_us, revoked_us";

pub fn key(r: &Row) -> rusqlite::Result<Key> {
    let pool: String = r.get(3)?;
    let labels: String = r.get(4)?;
    Ok(Key {
        id: r.get(0)?,
        account: r.get(1)?,
        name: r.get(2)?,
        pool: KeyPool::parse(&pool).ok_or_else(|| corrupt("key pool", &pool))?,
        labels: labels_of(&labels)?,
        cap: nanos_opt(r.get(5)?),
        created_at: time(r.get(6)?),
        revoked_at: r.get::<_, Option<i64>>(7)?.map(time),
    })
}

pub const HOLD_COLUMNS: &str = "id, account, pool, key_id, amount, model, source, state, cycle_start_us, \
     cycle_end_us, created_us, expires_us, remaining_after, fingerprint, event_seq, made_by";

pub struct HoldRow {
    pub hold: Hold,
    pub fingerprint: String,
    pub event_seq: Option<i64>,
}

pub fn hold(r: &Row) -> rusqlite::Result<HoldRow> {
    let pool: String = r.get(2)?;
    let state: String = r.get(7)?;
    Ok(HoldRow {
        hold: Hold {
            id: r.get(0)?,
            account: r.get(1)?,
            pool: pool_of(&pool)?,
            key: r.get(3)?,
            amount: Nanos(r.get(4)?),
            model: r.get(5)?,
            source: r.get(6)?,
            state: HoldState::parse(&state).ok_or_else(|| corrupt("hold state", &state))?,
            cycle_start: time(r.get(8)?),
            cycle_end: time(r.get(9)?),
            created_at: time(r.get(10)?),
            expires_at: time(r.get(11)?),
            remaining_after: nanos_opt(r.get(12)?),
            made_by: {
                let m: String = r.get(15)?;
                Maker::parse(&m).ok_or_else(|| corrupt("hold maker", &m))?
            },
        },
        fingerprint: r.get(13)?,
        event_seq: r.get(14)?,
    })
}

pub fn load_hold(conn: &Connection, account: &str, id: &str) -> StoreResult<Option<HoldRow>> {
    conn.prepare_cached(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE account = ?1 AND id = ?2"))
        .and_then(|mut s| s.query_row([account, id], hold).optional())
        .map_err(backend)
}

pub const EVENT_COLUMNS: &str = "seq, id, account, pool, model, input_tokens, cache_creation_5m_input_tokens, \
     cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost, grant_part, \
     overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us, cycle_start_us, \
     hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated";

pub struct EventRow {
    pub event: Event,
    pub fingerprint: String,
}

pub fn event(r: &Row) -> rusqlite::Result<EventRow> {
    let pool: String = r.get(3)?;
    let labels: String = r.get(20)?;
    let u = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)? as u64) };
    Ok(EventRow {
        event: Event {
            seq: r.get(0)?,
            id: r.get(1)?,
            account: r.get(2)?,
            pool: pool_of(&pool)?,
            model: r.get(4)?,
            usage: Usage {
                input_tokens: u(5)?,
                cache_creation_5m_input_tokens: u(6)?,
                cache_creation_1h_input_tokens: u(7)?,
                cache_read_input_tokens: u(8)?,
                output_tokens: u(9)?,
                web_search_requests: u(10)?,
            },
            cost: Nanos(r.get(11)?),
            grant_part: Nanos(r.get(12)?),
            overage_part: Nanos(r.get(13)?),
            overshoot: Nanos(r.get(14)?),
            service_tier: r.get(15)?,
            inference_geo: r.get(16)?,
            speed: r.get(17)?,
            source: r.get(18)?,
            key: r.get(19)?,
            labels: labels_of(&labels)?,
            timestamp: time(r.get(21)?),
            cycle_start: time(r.get(22)?),
            hold_id: r.get(23)?,
            latency_ms: r.get::<_, Option<i64>>(24)?.map(|v| v as u64),
            ttft_ms: r.get::<_, Option<i64>>(25)?.map(|v| v as u64),
            partial: r.get(26)?,
            estimated: r.get(30)?,
            unsettled: r.get(27)?,
            recorded_at: time(r.get(28)?),
        },
        fingerprint: r.get(29)?,
    })
}

pub fn load_event(conn: &Connection, account: &str, id: &str) -> StoreResult<Option<EventRow>> {
    conn.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE account = ?1 AND id = ?2"))
        .and_then(|mut s| s.query_row([account, id], event).optional())
        .map_err(backend)
}

pub fn load_event_by_seq(conn: &Connection, seq: i64) -> StoreResult<EventRow> {
    conn.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?1"))
        .and_then(|mut s| s.query_row([seq], event))
        .map_err(backend)
}
