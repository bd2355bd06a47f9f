//! Conversions between the store's records and PostgreSQL rows, and the reads every part shares.
//! Every statement is prepared once per connection (`prepare_cached`).

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};
use tollgate_core::{PoolKind, PoolPolicy, Tier};
use tollgate_store::rows::{self as records, Cells};
pub use tollgate_store::rows::{
    ACCOUNT_COLUMNS, EVENT_COLUMNS, EventRow, HOLD_COLUMNS, HoldRow, KEY_COLUMNS, TIER_COLUMNS, corrupt,
    labels_to_text, pool_of, time, us,
};
use tollgate_store::{Account, Grant, Key, StoreError, StoreResult};

use crate::{Result, describe};

/// A PostgreSQL row as the records' mappers read it.
pub struct Cols<'a>(pub &'a Row);

impl Cols<'_> {
    fn get<'r, T: FromSql<'r>>(&'r self, i: usize) -> StoreResult<T> {
        self.0.try_get(i).map_err(|e| StoreError::Corrupt(format!("column {i}: {}", describe(&e))))
    }
}

impl Cells for Cols<'_> {
    fn text(&self, i: usize) -> StoreResult<String> {
        self.get(i)
    }

    fn text_opt(&self, i: usize) -> StoreResult<Option<String>> {
        self.get(i)
    }

    fn int(&self, i: usize) -> StoreResult<i64> {
        self.get(i)
    }

    fn int_opt(&self, i: usize) -> StoreResult<Option<i64>> {
        self.get(i)
    }

    fn boolean(&self, i: usize) -> StoreResult<bool> {
        self.get(i)
    }
}

pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

pub async fn query(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query(&statement, params).await?)
}

pub async fn query_opt(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&statement, params).await?)
}

pub async fn query_one(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Row> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_one(&statement, params).await?)
}

pub async fn execute(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<u64> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, params).await?)
}

pub fn tier(r: &Row) -> Result<Tier> {
    tier_at(r, 0)
}

/// A tier from the five `TIER_COLUMNS` starting at column `at`.
pub fn tier_at(r: &Row, at: usize) -> Result<Tier> {
    Ok(records::tier_at(&Cols(r), at)?)
}

/// Inserts a tier; an existing tier of that id is replaced when `replace`, else kept.
pub async fn write_tier(c: &impl GenericClient, tier: &Tier, replace: bool) -> Result<()> {
    let sql = if replace {
        "INSERT INTO tiers (id, interactive, programmatic, monthly_price, payg_multiplier_ppm)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET interactive = $2, programmatic = $3, monthly_price = $4,
             payg_multiplier_ppm = $5"
    } else {
        "INSERT INTO tiers (id, interactive, programmatic, monthly_price, payg_multiplier_ppm)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING"
    };
    let ppm = tier.payg_multiplier_ppm as i64;
    execute(c, sql, &[&tier.id, &tier.interactive.0, &tier.programmatic.0, &tier.monthly_price.map(|n| n.0), &ppm])
        .await?;
    Ok(())
}

pub async fn load_tier(c: &impl GenericClient, id: &str) -> Result<Option<Tier>> {
    let row = query_opt(c, &format!("SELECT {TIER_COLUMNS} FROM tiers WHERE id = $1"), &[&id]).await?;
    row.as_ref().map(tier).transpose()
}

pub fn account(r: &Row) -> Result<Account> {
    Ok(records::account(&Cols(r))?)
}

pub async fn load_account(c: &impl GenericClient, id: &str) -> Result<Option<Account>> {
    let row = query_opt(c, &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"), &[&id]).await?;
    row.as_ref().map(account).transpose()
}

pub async fn require_account(c: &impl GenericClient, id: &str) -> Result<Account> {
    load_account(c, id).await?.ok_or_else(|| StoreError::NotFound(format!("account {id:?}")).into())
}

pub async fn load_policy(c: &impl GenericClient, account: &str, pool: PoolKind) -> Result<PoolPolicy> {
    let row = query_opt(
        c,
        "SELECT on_exhausted, overage_cap, spend_cap FROM policies WHERE account = $1 AND pool = $2",
        &[&account, &pool.as_str()],
    )
    .await?;
    match row {
        None => Ok(PoolPolicy::default()),
        Some(r) => policy(&r, 0),
    }
}

/// A policy from three columns starting at `at`: on_exhausted, overage_cap, spend_cap.
pub fn policy(r: &Row, at: usize) -> Result<PoolPolicy> {
    Ok(records::policy(&Cols(r), at)?)
}

pub fn key(r: &Row) -> Result<Key> {
    Ok(records::key(&Cols(r))?)
}

pub fn hold(r: &Row) -> Result<HoldRow> {
    Ok(records::hold(&Cols(r))?)
}

pub async fn load_hold(c: &impl GenericClient, account: &str, id: &str) -> Result<Option<HoldRow>> {
    let row =
        query_opt(c, &format!("SELECT {HOLD_COLUMNS} FROM holds WHERE account = $1 AND id = $2"), &[&account, &id])
            .await?;
    row.as_ref().map(hold).transpose()
}

pub fn event(r: &Row) -> Result<EventRow> {
    Ok(records::event(&Cols(r))?)
}

pub fn grant(r: &Row) -> Result<Grant> {
    Ok(records::grant(&Cols(r))?)
}
