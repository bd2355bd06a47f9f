//! Conversions between the store's records and PostgreSQL rows, and the reads every part shares.
//! Every statement is prepared once per connection (`prepare_cached`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Tier, Usage};
use tollgate_store::{Account, Event, Hold, HoldState, Key, KeyPool, Maker, StoreError};

use crate::Result;

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

pub fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).expect("stored times are in range")
}

/// A stored value this code cannot read: the database was changed by something else.
pub fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} {value:?}"))
}

pub fn pool_of(s: &str) -> Result<PoolKind> {
    PoolKind::parse(s).ok_or_else(|| corrupt("pool", s).into())
}

pub fn labels_to_text(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).expect("a string map serializes")
}

pub fn labels_of(text: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(|_| corrupt("labels", text).into())
}

fn nanos_opt(v: Option<i64>) -> Option<Nanos> {
    v.map(Nanos)
}

/// A column that holds a `u64` (tokens, milliseconds, a multiplier): stored in a `BIGINT` bit
/// for bit (`as i64`), as the SQLite backend does, so every value round-trips exactly.
fn count(r: &Row, i: usize) -> Result<u64> {
    Ok(r.try_get::<_, i64>(i)? as u64)
}

pub const TIER_COLUMNS: &str = "id, interactive, programmatic, monthly_price, payg_multiplier_ppm";

pub fn tier(r: &Row) -> Result<Tier> {
    tier_at(r, 0)
}

/// A tier from the five `TIER_COLUMNS` starting at column `at`.
pub fn tier_at(r: &Row, at: usize) -> Result<Tier> {
    Ok(Tier {
        id: r.try_get(at)?,
        interactive: Nanos(r.try_get(at + 1)?),
        programmatic: Nanos(r.try_get(at + 2)?),
        monthly_price: nanos_opt(r.try_get(at + 3)?),
        payg_multiplier_ppm: count(r, at + 4)?,
    })
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

pub const ACCOUNT_COLUMNS: &str = "id, tier, anchor_us, timezone, interactive_grant, programmatic_grant, created_us";

pub fn account(r: &Row) -> Result<Account> {
    let tz: String = r.try_get(3)?;
    Ok(Account {
        id: r.try_get(0)?,
        tier: r.try_get(1)?,
        anchor: time(r.try_get(2)?),
        timezone: tz.parse::<Tz>().map_err(|_| corrupt("timezone", &tz))?,
        interactive_grant: nanos_opt(r.try_get(4)?),
        programmatic_grant: nanos_opt(r.try_get(5)?),
        created_at: time(r.try_get(6)?),
    })
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
    let on: String = r.try_get(at)?;
    Ok(PoolPolicy {
        on_exhausted: OnExhausted::parse(&on).ok_or_else(|| corrupt("on_exhausted", &on))?,
        overage_cap: nanos_opt(r.try_get(at + 1)?),
        spend_cap: nanos_opt(r.try_get(at + 2)?),
    })
}

pub const KEY_COLUMNS: &str = "id, account, name, pool, labels, cap, created_us, revoked_us";

pub fn key(r: &Row) -> Result<Key> {
    let pool: String = r.try_get(3)?;
    let labels: String = r.try_get(4)?;
    Ok(Key {
        id: r.try_get(0)?,
        account: r.try_get(1)?,
        name: r.try_get(2)?,
        pool: KeyPool::parse(&pool).ok_or_else(|| corrupt("key pool", &pool))?,
        labels: labels_of(&labels)?,
        cap: nanos_opt(r.try_get(5)?),
        created_at: time(r.try_get(6)?),
        revoked_at: r.try_get::<_, Option<i64>>(7)?.map(time),
    })
}

pub const HOLD_COLUMNS: &str = "id, account, pool, key_id, amount, model, source, state, cycle_start_us, \
     cycle_end_us, created_us, expires_us, remaining_after, fingerprint, event_seq, made_by";

pub struct HoldRow {
    pub hold: Hold,
    pub fingerprint: String,
    pub event_seq: Option<i64>,
}

pub fn hold(r: &Row) -> Result<HoldRow> {
    let pool: String = r.try_get(2)?;
    let state: String = r.try_get(7)?;
    Ok(HoldRow {
        hold: Hold {
            id: r.try_get(0)?,
            account: r.try_get(1)?,
            pool: pool_of(&pool)?,
            key: r.try_get(3)?,
            amount: Nanos(r.try_get(4)?),
            model: r.try_get(5)?,
            source: r.try_get(6)?,
            state: HoldState::parse(&state).ok_or_else(|| corrupt("hold state", &state))?,
            cycle_start: time(r.try_get(8)?),
            cycle_end: time(r.try_get(9)?),
            created_at: time(r.try_get(10)?),
            expires_at: time(r.try_get(11)?),
            remaining_after: nanos_opt(r.try_get(12)?),
            made_by: {
                let m: String = r.try_get(15)?;
                Maker::parse(&m).ok_or_else(|| corrupt("hold maker", &m))?
            },
        },
        fingerprint: r.try_get(13)?,
        event_seq: r.try_get(14)?,
    })
}

pub async fn load_hold(c: &impl GenericClient, account: &str, id: &str) -> Result<Option<HoldRow>> {
    let row =
        query_opt(c, &format!("SELECT {HOLD_COLUMNS} FROM holds WHERE account = $1 AND id = $2"), &[&account, &id])
            .await?;
    row.as_ref().map(hold).transpose()
}

pub const EVENT_COLUMNS: &str = "seq, id, account, pool, model, input_tokens, cache_creation_5m_input_tokens, \
     cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost, grant_part, \
     overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us, cycle_start_us, \
     hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated";

pub struct EventRow {
    pub event: Event,
    pub fingerprint: String,
}

pub fn event(r: &Row) -> Result<EventRow> {
    let pool: String = r.try_get(3)?;
    let labels: String = r.try_get(20)?;
    let count_opt = |i: usize| -> Result<Option<u64>> { Ok(r.try_get::<_, Option<i64>>(i)?.map(|v| v as u64)) };
    Ok(EventRow {
        event: Event {
            seq: r.try_get(0)?,
            id: r.try_get(1)?,
            account: r.try_get(2)?,
            pool: pool_of(&pool)?,
            model: r.try_get(4)?,
            usage: Usage {
                input_tokens: count(r, 5)?,
                cache_creation_5m_input_tokens: count(r, 6)?,
                cache_creation_1h_input_tokens: count(r, 7)?,
                cache_read_input_tokens: count(r, 8)?,
                output_tokens: count(r, 9)?,
                web_search_requests: count(r, 10)?,
            },
            cost: Nanos(r.try_get(11)?),
            grant_part: Nanos(r.try_get(12)?),
            overage_part: Nanos(r.try_get(13)?),
            overshoot: Nanos(r.try_get(14)?),
            service_tier: r.try_get(15)?,
            inference_geo: r.try_get(16)?,
            speed: r.try_get(17)?,
            source: r.try_get(18)?,
            key: r.try_get(19)?,
            labels: labels_of(&labels)?,
            timestamp: time(r.try_get(21)?),
            cycle_start: time(r.try_get(22)?),
            hold_id: r.try_get(23)?,
            latency_ms: count_opt(24)?,
            ttft_ms: count_opt(25)?,
            partial: r.try_get(26)?,
            estimated: r.try_get(30)?,
            unsettled: r.try_get(27)?,
            recorded_at: time(r.try_get(28)?),
        },
        fingerprint: r.try_get(29)?,
    })
}
