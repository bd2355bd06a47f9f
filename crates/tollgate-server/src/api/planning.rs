//! Forecasts, job plans and tier/model advice (SPEC section 7), from the pools' figures, the
//! hourly rollups and the decisions of `tollgate_core::plan`.

use std::collections::BTreeMap;

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_config::UsdInput;
use tollgate_core::plan::{self, CycleSpend, Plan};
use tollgate_core::{Modifiers, Nanos, PoolKind, PoolScope, Usage};
use tollgate_store::report::Dims;
use tollgate_store::{Account, EventQuery};

use super::extract::{Path, Query, whole_number};
use super::parse_pool;
use crate::AppState;
use crate::auth::Caller;
use crate::dto::{self, parse_usd};
use crate::error::{ApiError, ApiResult};
use crate::json::Json;

async fn account(s: &AppState, caller: &Caller, id: &str) -> ApiResult<Account> {
    caller.require_account(id)?;
    s.store.account(id).await?.ok_or_else(|| ApiError::NotFound(format!("account {id:?} not found")))
}

/// `GET /api/v1/accounts/{id}/forecast`: per pool, burn rates (last 24 h and cycle to date),
/// the projected cycle-end spend, exhaustion if before the reset, credit that will expire.
pub async fn forecast(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let a = account(&s, &caller, &id).await?;
    let now = s.now();
    let balance = s.store.balance(&id, now).await?;
    let rollups = s.store.rollups(&id, balance.cycle.start, crate::report::FORECAST_DIMS).await?;
    let mut pools = serde_json::Map::new();
    for p in &balance.pools {
        let (f, calls) = crate::report::forecast_pool(p, balance.cycle, &rollups, now);
        pools.insert(
            p.pool.as_str().to_string(),
            json!({
                "charged_usd": dto::usd(p.scope().charged()),
                "limit_usd": p.limit.map(dto::usd),
                "burn_per_day_recent_usd": dto::usd(f.recent_rate_per_day),
                "burn_per_day_cycle_usd": dto::usd(f.cycle_rate_per_day),
                "projected_cycle_end_usd": dto::usd(f.projected_cycle_end),
                "exhaustion": f.exhaustion.map(dto::time),
                "expiring_unused_usd": dto::usd(f.expiring_unused),
                "days_to_reset": f.time_to_reset.num_days(),
                "calls": calls,
                "confident": f.confident,
                "note": (!f.confident).then_some(
                    "too little data to extrapolate (under a day into the cycle or under 10 calls): the projection is uncertain"
                ),
            }),
        );
    }
    Ok(axum::Json(json!({
        "account": a.id,
        "cycle": {"start": dto::time(balance.cycle.start), "end": dto::time(balance.cycle.end)},
        "pools": pools,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanIn {
    pool: String,
    cost_usd: Option<UsdInput>,
    model: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    calls: Option<u64>,
}

/// `POST /api/v1/accounts/{id}/plan`: does a job fit now, or when?
pub async fn plan_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(j): Json<PlanIn>,
) -> ApiResult<axum::Json<Value>> {
    let a = account(&s, &caller, &id).await?;
    let pool = parse_pool(&j.pool)?;
    let now = s.now();
    let cost = match (&j.cost_usd, &j.model) {
        (Some(c), None) => parse_usd(c, "cost_usd")?,
        (None, Some(model)) => {
            let entry = s.prices.price_at(model, now.date_naive()).map_err(|e| ApiError::bad(e.to_string()))?;
            let calls = j.calls.unwrap_or(1);
            if calls == 0 {
                return Err(ApiError::bad("calls must be at least 1"));
            }
            let usage = Usage {
                input_tokens: j.input_tokens.ok_or_else(|| ApiError::bad("input_tokens is required with model"))?,
                output_tokens: j.output_tokens.ok_or_else(|| ApiError::bad("output_tokens is required with model"))?,
                ..Usage::default()
            };
            usage.validate().map_err(|e| ApiError::bad(e.to_string()))?;
            let one = entry.cost(&usage, &Modifiers::default()).map_err(|e| ApiError::bad(e.to_string()))?;
            Nanos(one.0.checked_mul(calls as i64).ok_or_else(|| ApiError::bad("the job's cost overflows the ledger"))?)
        }
        _ => {
            return Err(ApiError::bad(
                "give either cost_usd, or model with input_tokens and output_tokens (and calls)",
            ));
        }
    };
    let balance = s.store.balance(&id, now).await?;
    #[allow(clippy::expect_used, reason = "a Balance has one PoolBalance of each pool kind, as both stores build it")]
    let p = balance.pools.iter().find(|p| p.pool == pool).expect("both pools are in a balance");
    let next = s.store.balance(&id, balance.cycle.end).await?;
    #[allow(clippy::expect_used, reason = "a Balance has one PoolBalance of each pool kind, as both stores build it")]
    let n = next.pools.iter().find(|p| p.pool == pool).expect("both pools are in a balance");
    let fresh = PoolScope { limit: n.limit, grants: n.grants, ..PoolScope::default() };
    let tier = s.store.tiers().await?.into_iter().find(|t| t.id == a.tier);
    let ppm = tier.map(|t| t.payg_multiplier_ppm).unwrap_or(tollgate_core::tier::PPM);
    let outcome = plan::plan(cost, &p.scope(), &fresh, ppm, balance.cycle.end)
        .ok_or_else(|| ApiError::bad("the job's cost is out of range"))?;
    let advice = "schedule large batches early in a cycle, when its credits are fresh: credits expire at the reset";
    let body = match outcome {
        Plan::FitsNow { remaining_after, overage } => json!({
            "fits": "now", "cost_usd": dto::usd(cost), "remaining_after_usd": remaining_after.map(dto::usd),
            "overage_usd": dto::usd(overage), "advice": advice,
        }),
        Plan::FitsAfterReset { at, overage } => json!({
            "fits": "after_reset", "cost_usd": dto::usd(cost), "earliest": dto::time(at), "overage_usd": dto::usd(overage),
            "remaining_now_usd": p.scope().remaining().map(dto::usd), "advice": advice,
        }),
        Plan::NeverFits { limit, charge } => json!({
            "fits": "never", "cost_usd": dto::usd(cost), "charge_usd": dto::usd(charge), "limit_usd": dto::usd(limit),
            "advice": "split the job across cycles or raise the pool's limit",
        }),
    };
    Ok(axum::Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierParams {
    #[serde(default, deserialize_with = "whole_number")]
    cycles: Option<i64>,
}

/// `GET /api/v1/accounts/{id}/advice/tier?cycles=N`: the last N finished cycles replayed on
/// every tier (as if `payg`: nothing refused), and the cheapest priced tier.
pub async fn advise_tier(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TierParams>,
) -> ApiResult<axum::Json<Value>> {
    let a = account(&s, &caller, &id).await?;
    let n = match q.cycles.unwrap_or(3) {
        n @ 1..=24 => n,
        n => return Err(ApiError::bad(format!("cycles must be between 1 and 24, not {n}"))),
    };
    let anchor = a.cycle_anchor();
    let current = anchor.cycle_at(s.now());
    let mut cycles = Vec::new();
    for k in (current.index - n)..current.index {
        let start = anchor.start(k);
        let rollups = s.store.rollups(&id, start, Dims::NONE).await?;
        let spend = |pool: PoolKind| {
            rollups.iter().filter(|r| r.pool == pool).fold(Nanos::ZERO, |s, r| s.saturating_add(r.cost))
        };
        cycles.push((
            start,
            CycleSpend { interactive: spend(PoolKind::Interactive), programmatic: spend(PoolKind::Programmatic) },
        ));
    }
    let spends: Vec<CycleSpend> = cycles.iter().map(|(_, c)| *c).collect();
    let replays: Vec<_> = s.store.tiers().await?.iter().filter_map(|t| plan::replay_tier(t, &spends)).collect();
    let best = plan::cheapest(&replays).map(|r| r.tier.clone());
    Ok(axum::Json(json!({
        "account": a.id,
        "current_tier": a.tier,
        "cycles": cycles.iter().map(|(start, c)| json!({"start": dto::time(*start),
            "interactive_usd": dto::usd(c.interactive), "programmatic_usd": dto::usd(c.programmatic)})).collect::<Vec<_>>(),
        "tiers": replays.iter().map(|r| json!({"tier": r.tier, "overage_usd": dto::usd(r.overage),
            "total_usd": r.total.map(dto::usd)})).collect::<Vec<_>>(),
        "recommended": best,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    pool: Option<String>,
}

/// `GET /api/v1/accounts/{id}/advice/model?pool=P`: the current cycle's calls of a pool priced
/// on every priced model of the same provider, and the median latency per model used.
pub async fn advise_model(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ModelParams>,
) -> ApiResult<axum::Json<Value>> {
    let a = account(&s, &caller, &id).await?;
    let pool = q.pool.as_deref().map(parse_pool).transpose()?;
    let now = s.now();
    let cycle = a.cycle_anchor().cycle_at(now);
    let rollups = s.store.rollups(&id, cycle.start, Dims { model: true, ..Dims::NONE }).await?;
    // Token sums per model used.
    let mut used: BTreeMap<String, Usage> = BTreeMap::new();
    for r in rollups.iter().filter(|r| pool.is_none_or(|p| p == r.pool)) {
        used.entry(r.model.clone()).or_default().add(&r.usage);
    }
    let day = now.date_naive();
    let mut out = Vec::new();
    for (model, usage) in &used {
        let Ok(entry) = s.prices.price_at(model, day) else { continue };
        let actual = entry.cost(usage, &Modifiers::default()).unwrap_or(Nanos::MAX);
        let mut alternatives: Vec<(String, Nanos)> = s
            .prices
            .entries()
            .filter(|e| e.provider == entry.provider && e.effective_from <= day)
            .filter_map(|e| e.cost(usage, &Modifiers::default()).ok().map(|c| (e.model.clone(), c)))
            .collect();
        alternatives.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        alternatives.dedup_by(|a, b| a.0 == b.0);
        let latencies = {
            let query = EventQuery {
                account: id.clone(),
                pool,
                model: Some(model.clone()),
                since: Some(cycle.start),
                until: None,
                after_seq: None,
                limit: 1_000,
            };
            let mut l: Vec<u64> = s.store.events(query).await?.iter().filter_map(|e| e.latency_ms).collect();
            l.sort_unstable();
            l
        };
        out.push(json!({
            "model": model,
            "cost_usd": dto::usd(actual),
            "median_latency_ms": latencies.get(latencies.len() / 2).copied().filter(|_| !latencies.is_empty()),
            "on_other_models": alternatives.iter().map(|(m, c)| json!({"model": m, "cost_usd": dto::usd(*c)})).collect::<Vec<_>>(),
        }));
    }
    Ok(axum::Json(json!({
        "account": a.id,
        "pool": pool.map(PoolKind::as_str),
        "cycle": {"start": dto::time(cycle.start), "end": dto::time(cycle.end)},
        "models": out,
        "note": "each model's token totals priced at list price on each model of the same provider; prompt caching and output length may differ on another model",
    })))
}
