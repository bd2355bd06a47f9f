//! Alert history (`GET /api/v1/alerts`), alert rules (admin: list, create or replace, delete)
//! and a test delivery through a channel (`POST /api/v1/alerts/test`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_config::UsdInput;
use tollgate_store::alerts::{Alert, AlertKind, AlertQuery, AlertRule};

use super::extract::{Path, Query, whole_number};
use super::parse_pool;
use crate::AppState;
use crate::alerts::deliver;
use crate::alerts::engine::{self, validate_rule};
use crate::auth::Caller;
use crate::dto::{self, parse_time, parse_usd};
use crate::error::{ApiError, ApiResult};
use crate::json::Json;

pub fn alert_json(a: &Alert) -> Value {
    engine::delivery(a).body.as_object().cloned().map(Value::Object).unwrap_or(Value::Null)
}

fn rule_json(r: &AlertRule) -> Value {
    json!({
        "id": r.id,
        "kind": r.kind.as_str(),
        "account": r.account.clone().unwrap_or_else(|| "*".into()),
        "pool": r.pool.map(|p| p.as_str()).unwrap_or("*"),
        "percent": r.percents,
        "window_s": r.window_s,
        "factor": r.factor_ppm.map(|f| dto::usd(tollgate_core::Nanos(f as i64 * 1000))),
        "floor_usd": r.floor.map(dto::usd),
        "days": r.days,
        "channels": r.channels,
        "from_config": r.from_config,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsParams {
    account: Option<String>,
    pool: Option<String>,
    kind: Option<String>,
    since: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    limit: Option<i64>,
}

fn parse_kind(kind: &str) -> Result<AlertKind, ApiError> {
    AlertKind::parse(kind).ok_or_else(|| {
        ApiError::bad(format!(
            "unknown alert kind {kind:?}: use threshold, overage_started, cap_hit, spike, forecast or overshoot"
        ))
    })
}

/// The history, newest first. An account key sees its own account's alerts only.
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(p): Query<AlertsParams>,
) -> ApiResult<axum::Json<Value>> {
    let account = match (&caller, p.account) {
        (Caller::Admin, account) => account,
        (Caller::Account { account: own, .. }, None) => Some(own.clone()),
        (Caller::Account { .. }, Some(a)) => {
            caller.require_account(&a)?;
            Some(a)
        }
    };
    let limit = match p.limit.unwrap_or(100) {
        n @ 1..=1000 => n as usize,
        n => return Err(ApiError::bad(format!("limit must be between 1 and 1000, not {n}"))),
    };
    let query = AlertQuery {
        account,
        pool: p.pool.as_deref().map(parse_pool).transpose()?,
        kind: p.kind.as_deref().map(parse_kind).transpose()?,
        since: p.since.as_deref().map(|t| parse_time(t, "since")).transpose()?,
        limit,
    };
    let alerts = s.store.alerts(query).await?;
    Ok(axum::Json(json!({"alerts": alerts.iter().map(alert_json).collect::<Vec<_>>()})))
}

pub async fn rules(State(s): State<AppState>, caller: Caller) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    let rules = s.store.alert_rules().await?;
    Ok(axum::Json(json!({"rules": rules.iter().map(rule_json).collect::<Vec<_>>()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleIn {
    id: String,
    kind: String,
    #[serde(default = "star")]
    account: String,
    #[serde(default = "star")]
    pool: String,
    percent: Option<Vec<i64>>,
    window_s: Option<i64>,
    factor: Option<UsdInput>,
    floor_usd: Option<UsdInput>,
    days: Option<i64>,
    #[serde(default)]
    channels: Vec<String>,
}

fn star() -> String {
    "*".into()
}

/// Creates or replaces a rule (not one from tollgate.toml).
pub async fn put_rule(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<RuleIn>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    caller.require_admin()?;
    let kind = parse_kind(&r.kind)?;
    let pool = match r.pool.as_str() {
        "*" => None,
        p => Some(parse_pool(p)?),
    };
    let mut percents = Vec::new();
    for p in r.percent.unwrap_or_default() {
        if !(1..=100).contains(&p) {
            return Err(ApiError::bad(format!("percent {p} must be between 1 and 100")));
        }
        percents.push(p as u8);
    }
    let window_s = match r.window_s {
        Some(w) if w <= 0 => return Err(ApiError::bad(format!("window_s {w} must be a positive number of seconds"))),
        w => w.map(|w| w as u64),
    };
    let days = match r.days {
        Some(d) if !(0..=366).contains(&d) => return Err(ApiError::bad(format!("days {d} must be between 0 and 366"))),
        d => d.map(|d| d as u32),
    };
    let factor_ppm = r
        .factor
        .map(|f| tollgate_config::parse_multiplier_ppm(&f.text()).map_err(|e| ApiError::bad(format!("factor: {e}"))))
        .transpose()?;
    let floor = r.floor_usd.map(|f| parse_usd(&f, "floor_usd")).transpose()?;
    if r.account != "*" && s.store.account(&r.account).await?.is_none() {
        return Err(ApiError::bad(format!("unknown account {:?}: create it first or use \"*\"", r.account)));
    }
    if let Some(alerter) = &s.alerter {
        let known = alerter.channel_names();
        if let Some(c) = r.channels.iter().find(|c| !known.contains(c)) {
            return Err(ApiError::bad(format!(
                "unknown channel {c:?}: define it as a [[channel]] in tollgate.toml (known: {})",
                known.join(", ")
            )));
        }
    }
    let rule = AlertRule {
        id: r.id,
        kind,
        account: (r.account != "*").then_some(r.account),
        pool,
        percents,
        window_s,
        factor_ppm,
        floor,
        days,
        channels: r.channels,
        from_config: false,
    };
    validate_rule(&rule).map_err(ApiError::bad)?;
    let saved = s.store.put_alert_rule(rule).await?;
    Ok((StatusCode::OK, axum::Json(rule_json(&saved))))
}

pub async fn delete_rule(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    s.store.delete_alert_rule(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestIn {
    channel: String,
}

/// Sends a test alert through a channel now, and says whether it arrived: within the 10 s every
/// delivery is bounded by, so a channel that stalls fails the test at that bound.
pub async fn test(State(s): State<AppState>, caller: Caller, Json(t): Json<TestIn>) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    let alerter = s.alerter.as_ref().ok_or_else(|| ApiError::bad("alerts are not running on this server"))?;
    let now = s.now();
    let alert = Alert {
        id: format!("alr_test_{}", now.timestamp_micros()),
        rule_id: "test".into(),
        kind: AlertKind::Threshold,
        account: "test".into(),
        pool: tollgate_core::PoolKind::Programmatic,
        cycle_start: now,
        cycle_end: now,
        percent: None,
        used: tollgate_core::Nanos::ZERO,
        limit: None,
        message: format!("tollgate test alert through channel {}", t.channel),
        fired_at: now,
    };
    match alerter.send_now(&t.channel, &engine::delivery(&alert)).await {
        Ok(()) => Ok(axum::Json(json!({"channel": t.channel, "delivered": true}))),
        Err(e) => Err(match e {
            deliver::Failed { message, .. } if message.starts_with("unknown channel") => ApiError::bad(message),
            deliver::Failed { message, .. } => {
                ApiError::Conflict(format!("the test alert was not delivered: {message}"))
            }
        }),
    }
}
