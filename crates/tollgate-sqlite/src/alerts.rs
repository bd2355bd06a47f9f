//! The alert rules, history and outbox on SQLite. One process owns the file, so a lease only
//! has to outlive a delivery attempt that a crash interrupted.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use rusqlite::{OptionalExtension, Row, params};
use tollgate_core::{Nanos, PoolKind};
use tollgate_store::alerts::{Alert, AlertKind, AlertQuery, AlertRule, AlertStore, NewAlert, Outbound};
use tollgate_store::{StoreError, StoreResult};

use crate::SqliteStore;
use crate::rows::{backend, corrupt, pool_of, time, us};

const RULE_COLUMNS: &str =
    "id, kind, account, pool, percents, window_s, factor_ppm, floor, days, channels, from_config";
const ALERT_COLUMNS: &str =
    "id, rule_id, kind, account, pool, cycle_start_us, cycle_end_us, percent, used, limit_amount, message, fired_us";

fn kind_of(s: &str) -> rusqlite::Result<AlertKind> {
    AlertKind::parse(s).ok_or_else(|| corrupt("alert kind", s))
}

fn list(text: &str) -> Vec<String> {
    text.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn rule(r: &Row) -> rusqlite::Result<AlertRule> {
    let kind: String = r.get(1)?;
    let pool: Option<String> = r.get(3)?;
    let percents: String = r.get(4)?;
    Ok(AlertRule {
        id: r.get(0)?,
        kind: kind_of(&kind)?,
        account: r.get(2)?,
        pool: pool.as_deref().map(pool_of).transpose()?,
        percents: list(&percents).iter().filter_map(|p| p.parse().ok()).collect(),
        window_s: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        factor_ppm: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        floor: r.get::<_, Option<i64>>(7)?.map(Nanos),
        days: r.get::<_, Option<i64>>(8)?.map(|v| v as u32),
        channels: list(&r.get::<_, String>(9)?),
        from_config: r.get(10)?,
    })
}

fn alert(r: &Row) -> rusqlite::Result<Alert> {
    let kind: String = r.get(2)?;
    let pool: String = r.get(4)?;
    Ok(Alert {
        id: r.get(0)?,
        rule_id: r.get(1)?,
        kind: kind_of(&kind)?,
        account: r.get(3)?,
        pool: pool_of(&pool)?,
        cycle_start: time(r.get(5)?),
        cycle_end: time(r.get(6)?),
        percent: r.get::<_, Option<i64>>(7)?.map(|p| p as u8),
        used: Nanos(r.get(8)?),
        limit: r.get::<_, Option<i64>>(9)?.map(Nanos),
        message: r.get(10)?,
        fired_at: time(r.get(11)?),
    })
}

fn write_rule(conn: &rusqlite::Connection, r: &AlertRule) -> StoreResult<()> {
    let percents: Vec<String> = r.percents.iter().map(u8::to_string).collect();
    conn.execute(
        &format!(
            "INSERT INTO alert_rules ({RULE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET kind = ?2, account = ?3, pool = ?4, percents = ?5, window_s = ?6,
                 factor_ppm = ?7, floor = ?8, days = ?9, channels = ?10, from_config = ?11"
        ),
        params![
            r.id,
            r.kind.as_str(),
            r.account,
            r.pool.map(PoolKind::as_str),
            percents.join(","),
            r.window_s.map(|v| v as i64),
            r.factor_ppm.map(|v| v as i64),
            r.floor.map(|n| n.0),
            r.days.map(i64::from),
            r.channels.join(","),
            r.from_config
        ],
    )
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl AlertStore for SqliteStore {
    async fn put_alert_rule(&self, r: AlertRule) -> StoreResult<AlertRule> {
        self.write(move |conn| {
            let existing: Option<bool> = conn
                .query_row("SELECT from_config FROM alert_rules WHERE id = ?1", [&r.id], |row| row.get(0))
                .optional()
                .map_err(backend)?;
            if existing == Some(true) && !r.from_config {
                return Err(StoreError::Conflict(format!(
                    "alert rule {:?} comes from tollgate.toml: change it there",
                    r.id
                )));
            }
            write_rule(conn, &r)?;
            Ok(r)
        })
        .await
    }

    async fn alert_rules(&self) -> StoreResult<Vec<AlertRule>> {
        self.read(|conn| {
            let mut s =
                conn.prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM alert_rules ORDER BY id")).map_err(backend)?;
            s.query_map([], rule).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn delete_alert_rule(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        self.write(move |conn| {
            let from_config: Option<bool> = conn
                .query_row("SELECT from_config FROM alert_rules WHERE id = ?1", [&id], |row| row.get(0))
                .optional()
                .map_err(backend)?;
            match from_config {
                None => Err(StoreError::NotFound(format!("alert rule {id:?}"))),
                Some(true) => {
                    Err(StoreError::Conflict(format!("alert rule {id:?} comes from tollgate.toml: remove it there")))
                }
                Some(false) => {
                    conn.execute("DELETE FROM alert_rules WHERE id = ?1", [&id]).map_err(backend)?;
                    Ok(())
                }
            }
        })
        .await
    }

    async fn replace_config_alert_rules(&self, rules: Vec<AlertRule>) -> StoreResult<()> {
        self.write(move |conn| {
            conn.execute("DELETE FROM alert_rules WHERE from_config = 1", []).map_err(backend)?;
            for r in &rules {
                write_rule(conn, &AlertRule { from_config: true, ..r.clone() })?;
            }
            Ok(())
        })
        .await
    }

    async fn fire_alert(&self, a: NewAlert) -> StoreResult<Option<Alert>> {
        self.write(move |conn| {
            let id = a.id();
            let inserted = conn
                .prepare_cached(&format!(
                    "INSERT INTO alerts ({ALERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (id) DO NOTHING"
                ))
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        a.rule_id,
                        a.kind.as_str(),
                        a.account,
                        a.pool.as_str(),
                        us(a.cycle_start),
                        us(a.cycle_end),
                        a.percent.map(i64::from),
                        a.used.0,
                        a.limit.map(|n| n.0),
                        a.message,
                        us(a.fired_at)
                    ])
                })
                .map_err(backend)?;
            if inserted == 0 {
                return Ok(None);
            }
            for channel in &a.channels {
                conn.prepare_cached(
                    "INSERT INTO outbox (alert_id, channel, attempts, next_us, state) VALUES (?1, ?2, 0, ?3, 'pending')",
                )
                .and_then(|mut s| s.execute(params![id, channel, us(a.fired_at)]))
                .map_err(backend)?;
            }
            Ok(Some(a.fired(id)))
        })
        .await
    }

    async fn alerts(&self, q: AlertQuery) -> StoreResult<Vec<Alert>> {
        self.read(move |conn| {
            let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(a) = &q.account {
                args.push(a.clone().into());
                sql.push_str(&format!(" AND account = ?{}", args.len()));
            }
            if let Some(p) = q.pool {
                args.push(p.as_str().to_string().into());
                sql.push_str(&format!(" AND pool = ?{}", args.len()));
            }
            if let Some(k) = q.kind {
                args.push(k.as_str().to_string().into());
                sql.push_str(&format!(" AND kind = ?{}", args.len()));
            }
            if let Some(t) = q.since {
                args.push(us(t).into());
                sql.push_str(&format!(" AND fired_us >= ?{}", args.len()));
            }
            args.push((q.limit.clamp(1, 10_000) as i64).into());
            sql.push_str(&format!(" ORDER BY fired_us DESC, seq DESC LIMIT ?{}", args.len()));
            let mut s = conn.prepare(&sql).map_err(backend)?;
            s.query_map(rusqlite::params_from_iter(args), alert).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn claim_deliveries(&self, now: DateTime<Utc>, lease_s: u64, limit: usize) -> StoreResult<Vec<Outbound>> {
        self.write(move |conn| {
            let due: Vec<(i64, String, String, i64)> = {
                let mut s = conn
                    .prepare_cached(
                        "SELECT id, alert_id, channel, attempts FROM outbox
                         WHERE state = 'pending' AND next_us <= ?1 AND (lease_until_us IS NULL OR lease_until_us <= ?1)
                         ORDER BY next_us, id LIMIT ?2",
                    )
                    .map_err(backend)?;
                s.query_map(params![us(now), limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .and_then(|r| r.collect())
                    .map_err(backend)?
            };
            let lease_until = us(now + Duration::seconds(lease_s as i64));
            let mut out = Vec::with_capacity(due.len());
            for (id, alert_id, channel, attempts) in due {
                conn.prepare_cached("UPDATE outbox SET lease_until_us = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id, lease_until]))
                    .map_err(backend)?;
                let alert = conn
                    .prepare_cached(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"))
                    .and_then(|mut s| s.query_row([&alert_id], alert))
                    .map_err(backend)?;
                out.push(Outbound { id, alert, channel, attempts: attempts as u32 });
            }
            Ok(out)
        })
        .await
    }

    async fn delivery_done(&self, id: i64, _now: DateTime<Utc>) -> StoreResult<()> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE outbox SET state = 'done', attempts = attempts + 1, lease_until_us = NULL WHERE id = ?1",
                [id],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn delivery_failed(&self, id: i64, retry_at: Option<DateTime<Utc>>, error: &str) -> StoreResult<()> {
        let error = error.to_string();
        self.write(move |conn| {
            let (state, next) = match retry_at {
                Some(t) => ("pending", Some(us(t))),
                None => ("failed", None),
            };
            conn.execute(
                "UPDATE outbox SET state = ?2, attempts = attempts + 1, next_us = COALESCE(?3, next_us),
                     lease_until_us = NULL, last_error = ?4 WHERE id = ?1",
                params![id, state, next, error],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
