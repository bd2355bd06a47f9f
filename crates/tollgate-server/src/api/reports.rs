//! `GET /api/v1/accounts/{id}/report?cycle=…&by=…` (SPEC section 7; the shape of section 11).

use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use super::extract::{Path, Query};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::report::{self, GroupBy};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    cycle: Option<String>,
    by: Option<String>,
}

pub async fn report(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<ReportParams>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    let account = s.store.account(&id).await?.ok_or_else(|| ApiError::NotFound(format!("account {id:?} not found")))?;
    let by = p.by.as_deref().map(GroupBy::parse).transpose().map_err(ApiError::bad)?;
    let cycle = report::cycle_of(&account, p.cycle.as_deref().unwrap_or("current"), s.now()).map_err(ApiError::bad)?;
    // The balance at the cycle's start carries that cycle's pool figures.
    let balance = s.store.balance(&id, cycle.start).await?;
    let rollups = s.store.rollups(&id, cycle.start, GroupBy::dims(by.as_ref())).await?;
    Ok(axum::Json(report::to_json(&report::build(&account, &balance, &rollups, by.as_ref()))))
}
