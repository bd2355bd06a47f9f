//! Health probes, the OpenAPI document, tiers and prices.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_config::{UsdInput, parse_multiplier_ppm};
use tollgate_core::Tier;
use tollgate_core::tier::PPM;

use super::extract::{Path, Query};
use crate::AppState;
use crate::auth::Caller;
use crate::dto::{self, parse_usd};
use crate::error::{ApiError, ApiResult};
use crate::json::Json;

pub const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when the store answers.
pub async fn readyz(State(s): State<AppState>) -> ApiResult<axum::Json<Value>> {
    s.store.tiers().await?;
    Ok(axum::Json(json!({"status": "ready"})))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub async fn tiers(State(s): State<AppState>, _caller: Caller) -> ApiResult<axum::Json<Value>> {
    let tiers = s.store.tiers().await?;
    Ok(axum::Json(json!({"tiers": tiers.iter().map(dto::tier).collect::<Vec<_>>()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierIn {
    interactive_usd: UsdInput,
    programmatic_usd: UsdInput,
    monthly_price_usd: Option<UsdInput>,
    payg_multiplier: Option<UsdInput>,
}

pub async fn put_tier(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<TierIn>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    super::check_id(&id, "tier id")?;
    let tier = Tier {
        id,
        interactive: parse_usd(&body.interactive_usd, "interactive_usd")?,
        programmatic: parse_usd(&body.programmatic_usd, "programmatic_usd")?,
        monthly_price: body.monthly_price_usd.as_ref().map(|p| parse_usd(p, "monthly_price_usd")).transpose()?,
        payg_multiplier_ppm: match &body.payg_multiplier {
            Some(m) => parse_multiplier_ppm(&m.text()).map_err(|e| ApiError::bad(format!("payg_multiplier: {e}")))?,
            None => PPM,
        },
    };
    s.store.put_tier(tier.clone()).await?;
    Ok(axum::Json(dto::tier(&tier)))
}

/// Prices are public facts, but the API is not anonymous: any valid credential may read them.
pub async fn prices(State(s): State<AppState>, _caller: Caller) -> axum::Json<Value> {
    let aliases: serde_json::Map<String, Value> = s.prices.aliases().map(|(a, m)| (a.to_string(), m.into())).collect();
    axum::Json(json!({
        "prices": s.prices.entries().map(dto::price).collect::<Vec<_>>(),
        "aliases": aliases,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceParams {
    date: Option<String>,
}

pub async fn price(
    State(s): State<AppState>,
    _caller: Caller,
    Path(model): Path<String>,
    Query(p): Query<PriceParams>,
) -> ApiResult<axum::Json<Value>> {
    let date = match &p.date {
        Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|_| ApiError::bad(format!("date {d:?} must be YYYY-MM-DD")))?,
        None => s.now().date_naive(),
    };
    let entry = s.prices.price_at(&model, date).map_err(|e| ApiError::NotFound(e.to_string()))?;
    Ok(axum::Json(dto::price(entry)))
}
