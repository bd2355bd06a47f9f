//! Accounts, their pool policies, grants and keys.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_config::UsdInput;
use tollgate_core::{Nanos, OnExhausted, PoolKind};
use tollgate_store::{AccountUpdate, KeyPool, NewAccount, NewGrant, NewKey};

use super::extract::Path;
use super::{check_id, check_labels, check_text, parse_pool};
use crate::AppState;
use crate::auth::{Caller, hash_secret};
use crate::dto::{self, parse_time, parse_usd};
use crate::error::{ApiError, ApiResult};
use crate::json::{Json, from_value};

fn parse_tz(tz: &str) -> Result<Tz, ApiError> {
    tz.parse::<Tz>()
        .map_err(|_| ApiError::bad(format!("unknown timezone {tz:?}: use an IANA name such as UTC or Europe/Berlin")))
}

fn check_account_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(ApiError::bad(format!("account id {id:?} must be 1–64 letters, digits, . _ or -"))) }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountIn {
    id: String,
    tier: String,
    anchor: Option<String>,
    timezone: Option<String>,
    interactive_grant_usd: Option<UsdInput>,
    programmatic_grant_usd: Option<UsdInput>,
}

pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(body): Json<AccountIn>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    check_account_id(&body.id)?;
    let new = NewAccount {
        id: body.id,
        tier: body.tier,
        anchor: body.anchor.as_deref().map(|a| parse_time(a, "anchor")).transpose()?,
        timezone: body.timezone.as_deref().map(parse_tz).transpose()?.unwrap_or(Tz::UTC),
        interactive_grant: body
            .interactive_grant_usd
            .as_ref()
            .map(|u| parse_usd(u, "interactive_grant_usd"))
            .transpose()?,
        programmatic_grant: body
            .programmatic_grant_usd
            .as_ref()
            .map(|u| parse_usd(u, "programmatic_grant_usd"))
            .transpose()?,
    };
    let account = s.store.create_account(new, s.now()).await?;
    Ok((StatusCode::CREATED, axum::Json(dto::account(&account))))
}

pub async fn list(State(s): State<AppState>, caller: Caller) -> ApiResult<axum::Json<Value>> {
    let accounts = s.store.accounts().await?;
    let visible: Vec<Value> =
        accounts.iter().filter(|a| caller.require_account(&a.id).is_ok()).map(dto::account).collect();
    Ok(axum::Json(json!({ "accounts": visible })))
}

pub async fn get(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    let account = s.store.account(&id).await?.ok_or_else(|| ApiError::NotFound(format!("account {id:?} not found")))?;
    Ok(axum::Json(dto::account(&account)))
}

/// Reads an optional amount that `null` clears: absent → None, null → Some(None).
fn nullable_usd(body: &Map<String, Value>, field: &str) -> ApiResult<Option<Option<Nanos>>> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => {
            let input: UsdInput = from_value(v.clone(), field)?;
            Ok(Some(Some(parse_usd(&input, field)?)))
        }
    }
}

fn only_fields(body: &Map<String, Value>, allowed: &[&str]) -> ApiResult<()> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(format!("unknown field {k:?}; allowed: {}", allowed.join(", ")))),
        None => Ok(()),
    }
}

fn string_field(body: &Map<String, Value>, field: &str) -> ApiResult<Option<String>> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad(format!("{field} must be a string"))),
    }
}

pub async fn update(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    only_fields(&body, &["tier", "anchor", "timezone", "interactive_grant_usd", "programmatic_grant_usd"])?;
    let update = AccountUpdate {
        tier: string_field(&body, "tier")?,
        anchor: string_field(&body, "anchor")?.map(|a| parse_time(&a, "anchor")).transpose()?,
        timezone: string_field(&body, "timezone")?.map(|t| parse_tz(&t)).transpose()?,
        interactive_grant: nullable_usd(&body, "interactive_grant_usd")?,
        programmatic_grant: nullable_usd(&body, "programmatic_grant_usd")?,
    };
    let account = s.store.update_account(&id, update).await?;
    Ok(axum::Json(dto::account(&account)))
}

fn policy_json(p: &tollgate_core::PoolPolicy) -> Value {
    json!({
        "on_exhausted": p.on_exhausted.as_str(),
        "overage_cap_usd": p.overage_cap.map(dto::usd),
        "spend_cap_usd": p.spend_cap.map(dto::usd),
    })
}

pub async fn pools(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    let interactive = s.store.policy(&id, PoolKind::Interactive).await?;
    let programmatic = s.store.policy(&id, PoolKind::Programmatic).await?;
    Ok(axum::Json(json!({"interactive": policy_json(&interactive), "programmatic": policy_json(&programmatic)})))
}

/// Changes a pool's policy: fields given are set, `null` clears a cap, absent fields stay.
pub async fn set_pool(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, pool)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    let pool = parse_pool(&pool)?;
    only_fields(&body, &["on_exhausted", "overage_cap_usd", "spend_cap_usd"])?;
    let mut policy = s.store.policy(&id, pool).await?;
    if let Some(on) = string_field(&body, "on_exhausted")? {
        policy.on_exhausted = OnExhausted::parse(&on)
            .ok_or_else(|| ApiError::bad(format!("on_exhausted {on:?} must be block, payg or alert")))?;
    }
    if let Some(cap) = nullable_usd(&body, "overage_cap_usd")? {
        policy.overage_cap = cap;
    }
    if let Some(cap) = nullable_usd(&body, "spend_cap_usd")? {
        policy.spend_cap = cap;
    }
    s.store.set_policy(&id, pool, policy).await?;
    Ok(axum::Json(policy_json(&policy)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantIn {
    pool: String,
    amount_usd: UsdInput,
    note: Option<String>,
}

pub async fn add_grant(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<GrantIn>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    let amount = parse_usd(&body.amount_usd, "amount_usd")?;
    if amount == Nanos::ZERO {
        return Err(ApiError::bad("amount_usd must be above 0"));
    }
    if let Some(note) = &body.note {
        check_text(note, "note", 500)?;
    }
    let grant = s
        .store
        .add_grant(NewGrant { account: id, pool: parse_pool(&body.pool)?, amount, note: body.note }, s.now())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(dto::grant(&grant))))
}

pub async fn grants(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    let grants = s.store.grants(&id, s.now()).await?;
    Ok(axum::Json(json!({"grants": grants.iter().map(dto::grant).collect::<Vec<_>>()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyIn {
    pool: Option<String>,
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    cap_usd: Option<UsdInput>,
}

fn random_hex(bytes: usize) -> ApiResult<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

/// Creates a key. The secret is in this response only; tollgate keeps its SHA-256.
pub async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<KeyIn>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    let pool = match body.pool.as_deref() {
        None => KeyPool::Auto,
        Some(p) => KeyPool::parse(p)
            .ok_or_else(|| ApiError::bad(format!("key pool {p:?} must be interactive, programmatic or auto")))?,
    };
    if let Some(name) = &body.name {
        check_text(name, "name", 100)?;
    }
    check_labels(&body.labels)?;
    let cap = body.cap_usd.as_ref().map(|c| parse_usd(c, "cap_usd")).transpose()?;
    let secret = format!("tg_{}", random_hex(24)?);
    let key_id = format!("key_{}", random_hex(8)?);
    check_id(&key_id, "key id")?;
    let key = s
        .store
        .create_key(
            NewKey {
                id: key_id,
                account: id,
                secret_hash: hash_secret(&secret),
                name: body.name,
                pool,
                labels: body.labels,
                cap,
            },
            s.now(),
        )
        .await?;
    let mut out = dto::key(&key);
    out["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, axum::Json(out)))
}

pub async fn keys(State(s): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    let keys = s.store.keys(&id).await?;
    Ok(axum::Json(json!({"keys": keys.iter().map(dto::key).collect::<Vec<_>>()})))
}

pub async fn revoke_key(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_admin()?;
    let key = s.store.revoke_key(&id, &key, s.now()).await?;
    Ok(axum::Json(dto::key(&key)))
}
