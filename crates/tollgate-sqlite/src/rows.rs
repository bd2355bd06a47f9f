//! Conversions between the store's records and SQLite rows: the records' columns and mappers
//! are `tollgate_store::rows`, read here through [`Cols`].

use std::sync::LazyLock;

use rusqlite::{Connection, OptionalExtension, Row, params};
use tollgate_core::{PoolKind, PoolPolicy, Tier};
use tollgate_store::rows::{self as records, Cells};
pub use tollgate_store::rows::{
    ACCOUNT_COLUMNS, EVENT_COLUMNS, EventRow, HOLD_COLUMNS, HoldRow, KEY_COLUMNS, TIER_COLUMNS, labels_to_text, time,
    us,
};
use tollgate_store::{Account, Grant, Key, StoreError, StoreResult};

/// An SQLite row as the records' mappers read it.
pub struct Cols<'a, 'r>(pub &'a Row<'r>);

impl Cells for Cols<'_, '_> {
    fn text(&self, i: usize) -> StoreResult<String> {
        self.0.get(i).map_err(backend)
    }

    fn text_opt(&self, i: usize) -> StoreResult<Option<String>> {
        self.0.get(i).map_err(backend)
    }

    fn int(&self, i: usize) -> StoreResult<i64> {
        self.0.get(i).map_err(backend)
    }

    fn int_opt(&self, i: usize) -> StoreResult<Option<i64>> {
        self.0.get(i).map_err(backend)
    }

    fn boolean(&self, i: usize) -> StoreResult<bool> {
        self.0.get(i).map_err(backend)
    }
}

/// A store error carried through rusqlite's row callbacks; [`backend`] gives it back.
fn carried(e: StoreError) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Null, Box::new(e))
}

/// A stored value this code cannot read, inside a row callback.
pub fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    carried(records::corrupt(what, value))
}

pub fn pool_of(s: &str) -> rusqlite::Result<PoolKind> {
    records::pool_of(s).map_err(carried)
}

/// The store's error for an SQLite error: a full disk or an I/O error is the store away for a
/// while; a file that is not a database, a damaged one, or a row the store cannot read is
/// corrupt; the rest is ours.
pub fn backend(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = &e
        && let Some(carried) = inner.downcast_ref::<StoreError>()
    {
        return carried.clone();
    }
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

pub fn tier(r: &Row) -> rusqlite::Result<Tier> {
    records::tier_at(&Cols(r), 0).map_err(carried)
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

pub fn account(r: &Row) -> rusqlite::Result<Account> {
    records::account(&Cols(r)).map_err(carried)
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
            s.query_row(params![account, pool.as_str()], |r| records::policy(&Cols(r), 0).map_err(carried)).optional()
        })
        .map_err(backend)?;
    Ok(row.unwrap_or_default())
}

pub fn key(r: &Row) -> rusqlite::Result<Key> {
    records::key(&Cols(r)).map_err(carried)
}

pub fn hold(r: &Row) -> rusqlite::Result<HoldRow> {
    records::hold(&Cols(r)).map_err(carried)
}

pub fn load_hold(conn: &Connection, account: &str, id: &str) -> StoreResult<Option<HoldRow>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {HOLD_COLUMNS} FROM holds WHERE account = ?1 AND id = ?2"));
    conn.prepare_cached(&SQL).and_then(|mut s| s.query_row([account, id], hold).optional()).map_err(backend)
}

pub fn event(r: &Row) -> rusqlite::Result<EventRow> {
    records::event(&Cols(r)).map_err(carried)
}

pub fn rollup(r: &Row) -> rusqlite::Result<tollgate_store::report::Rollup> {
    records::rollup(&Cols(r)).map_err(carried)
}

pub fn grant(r: &Row) -> rusqlite::Result<Grant> {
    records::grant(&Cols(r)).map_err(carried)
}

pub fn load_event(conn: &Connection, account: &str, id: &str) -> StoreResult<Option<EventRow>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {EVENT_COLUMNS} FROM events WHERE account = ?1 AND id = ?2"));
    conn.prepare_cached(&SQL).and_then(|mut s| s.query_row([account, id], event).optional()).map_err(backend)
}

pub fn load_event_by_seq(conn: &Connection, seq: i64) -> StoreResult<EventRow> {
    static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?1"));
    conn.prepare_cached(&SQL).and_then(|mut s| s.query_row([seq], event)).map_err(backend)
}
