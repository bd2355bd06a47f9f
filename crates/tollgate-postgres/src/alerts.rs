//! The alert rules, history and outbox on PostgreSQL. Several processes share them: an alert
//! is recorded once whoever fires it (its id is unique), and a delivery is leased to one
//! process at a time (`FOR UPDATE SKIP LOCKED`, then a lease that a dead holder lets run out).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tollgate_core::{Nanos, PoolKind};
use tollgate_store::alerts::{Alert, AlertKind, AlertQuery, AlertRule, AlertStore, NewAlert, Outbound};
use tollgate_store::{StoreError, StoreResult};

use crate::rows::{corrupt, execute, pool_of, query, query_opt, time, us};
use tokio_postgres::IsolationLevel;

use crate::{ATTEMPTS_MAX, PgStore, Result};

const RULE_COLUMNS: &str =
    "id, kind, account, pool, percents, window_s, factor_ppm, floor, days, channels, from_config";
const ALERT_COLUMNS: &str =
    "id, rule_id, kind, account, pool, cycle_start_us, cycle_end_us, percent, used, limit_amount, message, fired_us";

fn kind_of(s: &str) -> Result<AlertKind> {
    AlertKind::parse(s).ok_or_else(|| corrupt("alert kind", s).into())
}

fn list(text: &str) -> Vec<String> {
    text.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn rule(r: &Row) -> Result<AlertRule> {
    let pool: Option<String> = r.get(3);
    let percents: String = r.get(4);
    Ok(AlertRule {
        id: r.get(0),
        kind: kind_of(r.get(1))?,
        account: r.get(2),
        pool: pool.as_deref().map(pool_of).transpose()?,
        percents: list(&percents).iter().filter_map(|p| p.parse().ok()).collect(),
        window_s: r.get::<_, Option<i64>>(5).map(|v| v as u64),
        factor_ppm: r.get::<_, Option<i64>>(6).map(|v| v as u64),
        floor: r.get::<_, Option<i64>>(7).map(Nanos),
        days: r.get::<_, Option<i64>>(8).map(|v| v as u32),
        channels: list(r.get(9)),
        from_config: r.get(10),
    })
}

fn alert(r: &Row) -> Result<Alert> {
    Ok(Alert {
        id: r.get(0),
        rule_id: r.get(1),
        kind: kind_of(r.get(2))?,
        account: r.get(3),
        pool: pool_of(r.get(4))?,
        cycle_start: time(r.get(5)),
        cycle_end: time(r.get(6)),
        percent: r.get::<_, Option<i64>>(7).map(|p| p as u8),
        used: Nanos(r.get(8)),
        limit: r.get::<_, Option<i64>>(9).map(Nanos),
        message: r.get(10),
        fired_at: time(r.get(11)),
    })
}

async fn write_rule(c: &impl deadpool_postgres::GenericClient, r: &AlertRule) -> Result<()> {
    let percents: Vec<String> = r.percents.iter().map(u8::to_string).collect();
    execute(
        c,
        &format!(
            "INSERT INTO alert_rules ({RULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET kind = $2, account = $3, pool = $4, percents = $5, window_s = $6,
                 factor_ppm = $7, floor = $8, days = $9, channels = $10, from_config = $11"
        ),
        &[
            &r.id,
            &r.kind.as_str(),
            &r.account,
            &r.pool.map(PoolKind::as_str),
            &percents.join(","),
            &r.window_s.map(|v| v as i64),
            &r.factor_ppm.map(|v| v as i64),
            &r.floor.map(|n| n.0),
            &r.days.map(i64::from),
            &r.channels.join(","),
            &r.from_config,
        ],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl AlertStore for PgStore {
    async fn put_alert_rule(&self, r: AlertRule) -> StoreResult<AlertRule> {
        write_tx!(self, |tx| async {
            let existing =
                query_opt(&tx, "SELECT from_config FROM alert_rules WHERE id = $1 FOR UPDATE", &[&r.id]).await?;
            if existing.is_some_and(|row| row.get::<_, bool>(0)) && !r.from_config {
                return Err(StoreError::Conflict(format!(
                    "alert rule {:?} comes from tollgate.toml: change it there",
                    r.id
                ))
                .into());
            }
            write_rule(&tx, &r).await?;
            Ok(r.clone())
        }
        .await)
    }

    async fn alert_rules(&self) -> StoreResult<Vec<AlertRule>> {
        read_tx!(self, |tx| async {
            let found = query(&tx, &format!("SELECT {RULE_COLUMNS} FROM alert_rules ORDER BY id"), &[]).await?;
            found.iter().map(rule).collect::<Result<Vec<_>>>()
        }
        .await)
    }

    async fn delete_alert_rule(&self, id: &str) -> StoreResult<()> {
        write_tx!(self, |tx| async {
            match query_opt(&tx, "SELECT from_config FROM alert_rules WHERE id = $1 FOR UPDATE", &[&id]).await? {
                None => Err(StoreError::NotFound(format!("alert rule {id:?}")).into()),
                Some(row) if row.get::<_, bool>(0) => {
                    Err(StoreError::Conflict(format!("alert rule {id:?} comes from tollgate.toml: remove it there"))
                        .into())
                }
                Some(_) => {
                    execute(&tx, "DELETE FROM alert_rules WHERE id = $1", &[&id]).await?;
                    Ok(())
                }
            }
        }
        .await)
    }

    async fn replace_config_alert_rules(&self, rules: Vec<AlertRule>) -> StoreResult<()> {
        write_tx!(self, |tx| async {
            execute(&tx, "DELETE FROM alert_rules WHERE from_config", &[]).await?;
            for r in &rules {
                write_rule(&tx, &AlertRule { from_config: true, ..r.clone() }).await?;
            }
            Ok(())
        }
        .await)
    }

    async fn fire_alert(&self, a: NewAlert) -> StoreResult<Option<Alert>> {
        let id = a.id();
        write_tx!(self, |tx| {
            async {
            let inserted = execute(
                &tx,
                &format!(
                    "INSERT INTO alerts ({ALERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[
                    &id,
                    &a.rule_id,
                    &a.kind.as_str(),
                    &a.account,
                    &a.pool.as_str(),
                    &us(a.cycle_start),
                    &us(a.cycle_end),
                    &a.percent.map(i64::from),
                    &a.used.0,
                    &a.limit.map(|n| n.0),
                    &a.message,
                    &us(a.fired_at),
                ],
            )
            .await?;
            if inserted == 0 {
                return Ok(None);
            }
            for channel in &a.channels {
                execute(
                    &tx,
                    "INSERT INTO outbox (alert_id, channel, attempts, next_us, state) VALUES ($1, $2, 0, $3, 'pending')",
                    &[&id, channel, &us(a.fired_at)],
                )
                .await?;
            }
            Ok(Some(a.clone().fired(id.clone())))
        }
        .await
        })
    }

    async fn alerts(&self, q: AlertQuery) -> StoreResult<Vec<Alert>> {
        read_tx!(self, |tx| async {
            let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE true");
            let pool = q.pool.map(|p| p.as_str().to_string());
            let kind = q.kind.map(|k| k.as_str().to_string());
            let since = q.since.map(us);
            let limit = q.limit.clamp(1, 10_000) as i64;
            let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some(a) = &q.account {
                args.push(a);
                sql.push_str(&format!(" AND account = ${}", args.len()));
            }
            if let Some(p) = &pool {
                args.push(p);
                sql.push_str(&format!(" AND pool = ${}", args.len()));
            }
            if let Some(k) = &kind {
                args.push(k);
                sql.push_str(&format!(" AND kind = ${}", args.len()));
            }
            if let Some(t) = &since {
                args.push(t);
                sql.push_str(&format!(" AND fired_us >= ${}", args.len()));
            }
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY fired_us DESC, seq DESC LIMIT ${}", args.len()));
            let found = query(&tx, &sql, &args).await?;
            found.iter().map(alert).collect::<Result<Vec<_>>>()
        }
        .await)
    }

    async fn claim_deliveries(&self, now: DateTime<Utc>, lease_s: u64, limit: usize) -> StoreResult<Vec<Outbound>> {
        let lease_until = us(now + Duration::seconds(lease_s as i64));
        write_tx!(self, |tx| async {
            let due = query(
                &tx,
                "SELECT id, alert_id, channel, attempts FROM outbox
                 WHERE state = 'pending' AND next_us <= $1 AND (lease_until_us IS NULL OR lease_until_us <= $1)
                 ORDER BY next_us, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&us(now), &(limit as i64)],
            )
            .await?;
            let mut out = Vec::with_capacity(due.len());
            for row in due {
                let (id, alert_id, channel, attempts): (i64, String, String, i64) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                execute(&tx, "UPDATE outbox SET lease_until_us = $2 WHERE id = $1", &[&id, &lease_until]).await?;
                let found =
                    query(&tx, &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1"), &[&alert_id]).await?;
                let first = found.first().ok_or_else(|| corrupt("outbox alert", &alert_id))?;
                out.push(Outbound { id, alert: alert(first)?, channel, attempts: attempts as u32 });
            }
            Ok(out)
        }
        .await)
    }

    async fn delivery_done(&self, id: i64, _now: DateTime<Utc>) -> StoreResult<()> {
        write_tx!(self, |tx| async {
            execute(
                &tx,
                "UPDATE outbox SET state = 'done', attempts = attempts + 1, lease_until_us = NULL WHERE id = $1",
                &[&id],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    async fn delivery_failed(&self, id: i64, retry_at: Option<DateTime<Utc>>, error: &str) -> StoreResult<()> {
        let (state, next) = match retry_at {
            Some(t) => ("pending", Some(us(t))),
            None => ("failed", None),
        };
        write_tx!(self, |tx| async {
            execute(
                &tx,
                "UPDATE outbox SET state = $2, attempts = attempts + 1, next_us = COALESCE($3, next_us),
                     lease_until_us = NULL, last_error = $4 WHERE id = $1",
                &[&id, &state, &next, &error],
            )
            .await?;
            Ok(())
        }
        .await)
    }
}
