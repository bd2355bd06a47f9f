//! Balance, usage events and holds: the ledger through the API.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_config::{UnknownModel, UsdInput};
use tollgate_core::ledger::{self, HOLD_TTL_S_MAX};
use tollgate_core::{Modifiers, Nanos, PriceTable, Refusal, Usage};
use tollgate_store::ownership::{self, Denied, EndError};
use tollgate_store::{EventOutcome, EventQuery, HoldOutcome, HoldRequest, Maker, NewEvent, SettleRequest};

use super::extract::{Path, Query, whole_number};
use super::{check_id, check_labels, check_text, parse_pool};
use crate::AppState;
use crate::auth::Caller;
use crate::dto::{self, EventIn, UsageIn, parse_time, parse_usd};
use crate::error::{ApiError, ApiResult};
use crate::json::{Json, from_value};

/// Events may be stamped a little ahead of our clock (clock skew), not more.
const FUTURE_SKEW_S_MAX: i64 = 300;
const EVENTS_PER_BATCH_MAX: usize = 1_000;

#[allow(clippy::expect_used, reason = "EventIn, HoldIn, SettleIn (strings, numbers, string maps) always serialize")]
fn fingerprint<T: Serialize>(value: &T) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(value).expect("request shapes serialize")))
}

pub async fn balance(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    let b = s.store.balance(&id, s.now()).await?;
    Ok(axum::Json(dto::balance(&b)))
}

fn modifiers(service_tier: Option<&str>, inference_geo: Option<&str>, speed: Option<&str>) -> ApiResult<Modifiers> {
    for (field, v) in [("service_tier", service_tier), ("inference_geo", inference_geo), ("speed", speed)] {
        if let Some(v) = v {
            check_text(v, field, 32)?;
        }
    }
    Ok(Modifiers {
        batch: service_tier == Some("batch"),
        geo_us: inference_geo == Some("us"),
        fast: speed == Some("fast"),
    })
}

/// The list-price cost of a usage: priced by tollgate when the model has a price, else the
/// given `cost_usd`, else as the configured stand-in model, else refused.
fn price(
    prices: &PriceTable,
    unknown_model: &UnknownModel,
    model: &str,
    usage: &Usage,
    m: &Modifiers,
    at: DateTime<Utc>,
    cost_usd: Option<&UsdInput>,
) -> ApiResult<Nanos> {
    match prices.price_at(model, at.date_naive()) {
        Ok(entry) => {
            if cost_usd.is_some() {
                return Err(ApiError::bad(format!(
                    "cost_usd is only for a model with no price; tollgate prices {model:?} itself"
                )));
            }
            entry.cost(usage, m).map_err(|e| ApiError::bad(e.to_string()))
        }
        Err(unknown) => match (cost_usd, unknown_model) {
            (Some(c), _) => parse_usd(c, "cost_usd"),
            (None, UnknownModel::PriceAs(stand_in)) => prices
                .price_at(stand_in, at.date_naive())
                .and_then(|e| e.cost(usage, m))
                .map_err(|e| ApiError::bad(e.to_string())),
            (None, UnknownModel::Reject) => Err(ApiError::bad(format!("{unknown}, or give cost_usd"))),
        },
    }
}

/// A model name as stored: 1 to 200 characters, no control characters.
fn check_model(model: &str) -> ApiResult<()> {
    check_text(model, "model", 200)?;
    if model.is_empty() {
        return Err(ApiError::bad("model must not be empty"));
    }
    Ok(())
}

/// Validates a posted event and turns it into a record for the store.
fn new_event(rules: &EventRules, caller: &Caller, e: EventIn) -> ApiResult<NewEvent> {
    caller.require_account(&e.account)?;
    check_id(&e.id, "event id")?;
    let pool = parse_pool(&e.pool)?;
    check_model(&e.model)?;
    let usage = e.usage.usage()?;
    let now = rules.now;
    let timestamp = match &e.timestamp {
        Some(t) => parse_time(t, "timestamp")?,
        None => now,
    };
    if timestamp > now + Duration::seconds(FUTURE_SKEW_S_MAX) {
        return Err(ApiError::bad(format!(
            "timestamp {} is in the future (more than {FUTURE_SKEW_S_MAX} s ahead of the server)",
            dto::time(timestamp)
        )));
    }
    if let Some(src) = &e.source {
        check_text(src, "source", 128)?;
    }
    if let Some(key) = &e.key {
        check_id(key, "key")?;
    }
    check_not_reserved(&e.id, "event id")?;
    let key = attributed_key(caller, e.key.as_deref())?;
    let labels = e.labels.clone().unwrap_or_default();
    check_labels(&labels)?;
    let m = modifiers(e.service_tier.as_deref(), e.inference_geo.as_deref(), e.speed.as_deref())?;
    let cost = price(rules.prices, rules.unknown_model, &e.model, &usage, &m, timestamp, e.cost_usd.as_ref())?;
    Ok(NewEvent {
        fingerprint: fingerprint(&e),
        id: e.id,
        account: e.account,
        pool,
        model: e.model,
        usage,
        cost,
        service_tier: e.service_tier,
        inference_geo: e.inference_geo,
        speed: e.speed,
        source: e.source,
        key,
        labels,
        timestamp,
        latency_ms: e.latency_ms,
        ttft_ms: e.ttft_ms,
        partial: false,
        estimated: false,
    })
}

/// Id prefixes the gateway gives its holds and events (`tgr_…`, `lease_…`): refused from API
/// callers, so no one can take a gateway call's id before the gateway records it.
const GATEWAY_ID_PREFIXES: [&str; 2] = ["tgr_", "lease_"];

fn check_not_reserved(id: &str, what: &str) -> ApiResult<()> {
    match GATEWAY_ID_PREFIXES.iter().find(|p| id.starts_with(**p)) {
        Some(p) => {
            Err(ApiError::bad(format!("{what} {id:?}: ids starting with {p:?} are the gateway's; choose another")))
        }
        None => Ok(()),
    }
}

/// The key a hold or an event is attributed to: an account key attributes only to itself (none
/// named: itself); the admin names any key, or none.
fn attributed_key(caller: &Caller, named: Option<&str>) -> ApiResult<Option<String>> {
    match (caller, named) {
        (Caller::Admin, named) => Ok(named.map(str::to_string)),
        (Caller::Account { key_id, .. }, None) => Ok(Some(key_id.clone())),
        (Caller::Account { key_id, .. }, Some(k)) if k == key_id => Ok(Some(key_id.clone())),
        (Caller::Account { key_id, .. }, Some(k)) => Err(ApiError::Forbidden(format!(
            "key {key_id} may attribute holds and events only to itself, not to key {k:?}; leave key out or use the admin token"
        ))),
    }
}

/// Who the caller is as a hold's maker.
fn maker(caller: &Caller) -> Maker {
    match caller {
        Caller::Admin => Maker::Admin,
        Caller::Account { key_id, .. } => Maker::Key(key_id.clone()),
    }
}

fn denied(e: EndError) -> ApiError {
    match e {
        EndError::Store(e) => e.into(),
        EndError::Denied(d @ Denied::OwnedByGateway(_)) => {
            ApiError::Denied { status: StatusCode::CONFLICT, code: d.code(), message: d.to_string() }
        }
        EndError::Denied(d) => {
            ApiError::Denied { status: StatusCode::FORBIDDEN, code: d.code(), message: d.to_string() }
        }
    }
}

/// An event as a caller may see it: lease ids are never shown to account keys.
fn event_json(e: &tollgate_store::Event, caller: &Caller) -> Value {
    let mut v = dto::event(e);
    if matches!(caller, Caller::Account { .. }) && e.hold_id.as_deref().is_some_and(|h| h.starts_with("lease_")) {
        v["hold"] = Value::Null;
    }
    v
}

fn outcome_json(o: &EventOutcome, caller: &Caller) -> Value {
    let status = match o {
        EventOutcome::Recorded(_) => "recorded",
        EventOutcome::Duplicate(_) => "duplicate",
    };
    json!({"status": status, "event": event_json(o.event(), caller)})
}

/// What checking a posted event needs besides the event: prices, the rule for models without
/// one, and the server's time.
pub struct EventRules<'a> {
    pub prices: &'a PriceTable,
    pub unknown_model: &'a UnknownModel,
    pub now: DateTime<Utc>,
}

/// A `POST /events` body, one event or `{"events": […]}`, checked whole into the records to
/// store (all or none), and whether it was a batch. It touches no store, so the fuzz target
/// `events` and its corpus replay call it as the route does.
pub fn validate_events(body: Value, caller: &Caller, rules: &EventRules) -> ApiResult<(Vec<NewEvent>, bool)> {
    let batch = match &body {
        Value::Object(m) if m.contains_key("events") => {
            if m.len() != 1 {
                return Err(ApiError::bad("a batch is {\"events\": [...]} with no other fields"));
            }
            true
        }
        Value::Object(_) => false,
        _ => return Err(ApiError::bad("send one event object or {\"events\": [...]}")),
    };
    let inputs: Vec<EventIn> = if batch {
        let Value::Object(mut m) = body else { unreachable!("checked above") };
        let events: Vec<EventIn> = from_value(m.remove("events").unwrap_or_default(), "events")?;
        if events.is_empty() || events.len() > EVENTS_PER_BATCH_MAX {
            return Err(ApiError::bad(format!(
                "a batch holds 1 to {EVENTS_PER_BATCH_MAX} events, not {}",
                events.len()
            )));
        }
        events
    } else {
        vec![from_value(body, "event")?]
    };
    let mut events = Vec::with_capacity(inputs.len());
    for (i, e) in inputs.into_iter().enumerate() {
        let id = e.id.clone();
        events.push(new_event(rules, caller, e).map_err(|err| match err {
            ApiError::BadRequest(m) if batch => ApiError::BadRequest(format!("events[{i}] (id {id:?}): {m}")),
            other => other,
        })?);
    }
    Ok((events, batch))
}

/// POST one event, or `{"events": […]}`: all validated first, then recorded all or nothing.
pub async fn post_events(State(s): State<AppState>, caller: Caller, Json(body): Json<Value>) -> ApiResult<Response> {
    let rules = EventRules { prices: &s.prices, unknown_model: &s.unknown_model, now: s.now() };
    let (events, batch) = validate_events(body, &caller, &rules)?;
    let outcomes = s.store.record_events(events, s.now()).await?;
    for outcome in &outcomes {
        if let EventOutcome::Recorded(e) = outcome {
            feed_event(&s, e);
        }
    }
    let any_new = outcomes.iter().any(|o| matches!(o, EventOutcome::Recorded(_)));
    let status = if any_new { StatusCode::CREATED } else { StatusCode::OK };
    let body = if batch {
        json!({"results": outcomes.iter().map(|o| outcome_json(o, &caller)).collect::<Vec<_>>()})
    } else {
        outcome_json(&outcomes[0], &caller)
    };
    Ok((status, axum::Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    pool: Option<String>,
    model: Option<String>,
    since: Option<String>,
    until: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    after: Option<i64>,
    #[serde(default, deserialize_with = "whole_number")]
    limit: Option<i64>,
}

pub async fn list_events(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<EventsParams>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&id)?;
    if s.store.account(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("account {id:?} not found")));
    }
    let limit = match p.limit.unwrap_or(100) {
        n @ 1..=1000 => n as usize,
        n => return Err(ApiError::bad(format!("limit must be between 1 and 1000, not {n}"))),
    };
    let query = EventQuery {
        account: id,
        pool: p.pool.as_deref().map(parse_pool).transpose()?,
        model: p.model,
        since: p.since.as_deref().map(|t| parse_time(t, "since")).transpose()?,
        until: p.until.as_deref().map(|t| parse_time(t, "until")).transpose()?,
        after_seq: p.after,
        limit,
    };
    let events = s.store.events(query).await?;
    let next = if events.len() == limit { events.last().map(|e| e.seq) } else { None };
    Ok(axum::Json(json!({"events": events.iter().map(|e| event_json(e, &caller)).collect::<Vec<_>>(), "next": next})))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateIn {
    model: String,
    usage: UsageIn,
    service_tier: Option<String>,
    inference_geo: Option<String>,
    speed: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoldIn {
    id: Option<String>,
    pool: String,
    key: Option<String>,
    amount_usd: Option<UsdInput>,
    estimate: Option<EstimateIn>,
    ttl_s: Option<u64>,
    model: Option<String>,
    source: Option<String>,
}

pub async fn create_hold(
    State(s): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    Json(body): Json<HoldIn>,
) -> ApiResult<Response> {
    caller.require_account(&account)?;
    let fp = fingerprint(&body);
    let pool = parse_pool(&body.pool)?;
    let now = s.now();
    let amount = match (&body.amount_usd, &body.estimate) {
        (Some(a), None) => parse_usd(a, "amount_usd")?,
        (None, Some(e)) => {
            let usage = e.usage.usage()?;
            let m = modifiers(e.service_tier.as_deref(), e.inference_geo.as_deref(), e.speed.as_deref())?;
            price(&s.prices, &s.unknown_model, &e.model, &usage, &m, now, None)?
        }
        _ => return Err(ApiError::bad("give exactly one of amount_usd or estimate {model, usage}")),
    };
    let ttl_s = body.ttl_s.unwrap_or(s.hold_ttl_s);
    if ttl_s == 0 || ttl_s > HOLD_TTL_S_MAX {
        return Err(ApiError::bad(format!("ttl_s must be between 1 and {HOLD_TTL_S_MAX}")));
    }
    let id = match &body.id {
        Some(id) => {
            check_id(id, "hold id")?;
            check_not_reserved(id, "hold id")?;
            id.clone()
        }
        None => format!("hold_{}", uuid_like()?),
    };
    if let Some(k) = &body.key {
        check_id(k, "key")?;
    }
    let key = attributed_key(&caller, body.key.as_deref())?;
    for (field, v) in [("model", &body.model), ("source", &body.source)] {
        if let Some(v) = v {
            check_text(v, field, 200)?;
        }
    }
    let model = body.model.clone().or_else(|| body.estimate.as_ref().map(|e| e.model.clone()));
    let request = HoldRequest {
        account: account.clone(),
        id,
        pool,
        key: key.clone(),
        amount,
        ttl_s,
        model,
        source: body.source,
        fingerprint: fp,
        made_by: maker(&caller),
    };
    match s.store.hold(request, now).await? {
        HoldOutcome::Held(h) => Ok((StatusCode::CREATED, axum::Json(dto::hold(&h))).into_response()),
        HoldOutcome::Replayed(h) => Ok((StatusCode::OK, axum::Json(dto::hold(&h))).into_response()),
        HoldOutcome::Refused { refusal, resets_at } => {
            let (limit, remaining) = match refusal {
                Refusal::PoolExhausted { limit, remaining } | Refusal::KeyCapReached { cap: limit, remaining } => {
                    (Some(limit), Some(remaining))
                }
                _ => (None, None),
            };
            // Which bound of the pool's policy refused, to name it.
            let balance = s.store.balance(&account, now).await?;
            let p = balance.pool(pool);
            let scope = p.policy.limit_scope(p.grants).map(|(_, scope)| scope);
            let resets = dto::time(resets_at);
            let context = ledger::RefusalContext {
                account: &account,
                pool,
                key: key.as_deref(),
                requested: amount,
                scope,
                resets: &resets,
            };
            Err(ApiError::Refused {
                code: refusal.code(),
                message: ledger::refusal_message(&refusal, &context),
                retry_after_s: (resets_at - now).num_seconds().max(1) as u64,
                details: json!({
                    "scope": ledger::refusal_scope(&refusal, scope),
                    "limit_usd": limit.map(dto::usd),
                    "remaining_usd": remaining.map(dto::usd),
                    "requested_usd": dto::usd(amount),
                    "resets_at": dto::time(resets_at),
                }),
            })
        }
    }
}

fn uuid_like() -> ApiResult<String> {
    let mut buf = [0u8; 12];
    getrandom::fill(&mut buf).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

pub async fn get_hold(
    State(s): State<AppState>,
    caller: Caller,
    Path((account, hold)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&account)?;
    let h = s
        .store
        .hold_by_id(&account, &hold)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("hold {hold:?} not found")))?;
    Ok(axum::Json(dto::hold(&h)))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SettleIn {
    event_id: Option<String>,
    model: Option<String>,
    usage: Option<UsageIn>,
    cost_usd: Option<UsdInput>,
    service_tier: Option<String>,
    inference_geo: Option<String>,
    speed: Option<String>,
    source: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    timestamp: Option<String>,
    latency_ms: Option<u64>,
    ttft_ms: Option<u64>,
    #[serde(default)]
    partial: bool,
}

/// Settles a hold with its real usage (priced by tollgate) or its cost.
pub async fn settle_hold(
    State(s): State<AppState>,
    caller: Caller,
    Path((account, hold_id)): Path<(String, String)>,
    Json(body): Json<SettleIn>,
) -> ApiResult<impl IntoResponse> {
    caller.require_account(&account)?;
    let by = maker(&caller);
    let hold = ownership::hold_for(s.store.as_ref(), &by, &account, &hold_id).await.map_err(denied)?;
    let fp = fingerprint(&body);
    let now = s.now();
    let timestamp = body.timestamp.as_deref().map(|t| parse_time(t, "timestamp")).transpose()?.unwrap_or(now);
    let event_id = body.event_id.clone().unwrap_or_else(|| hold_id.clone());
    check_id(&event_id, "event_id")?;
    check_labels(&body.labels)?;
    // Every string a settle stores is checked as `POST /events` checks it, in both forms.
    if let Some(model) = &body.model {
        check_model(model)?;
    }
    if let Some(source) = &body.source {
        check_text(source, "source", 128)?;
    }
    let model = body.model.clone().or(hold.model.clone());
    let m = modifiers(body.service_tier.as_deref(), body.inference_geo.as_deref(), body.speed.as_deref())?;
    let (model, usage, cost) = match (&body.usage, model) {
        (Some(u), Some(model)) => {
            let usage = u.usage()?;
            let cost = price(&s.prices, &s.unknown_model, &model, &usage, &m, timestamp, body.cost_usd.as_ref())?;
            (model, usage, cost)
        }
        (Some(_), None) => return Err(ApiError::bad("settling with usage needs the model (in the hold or here)")),
        (None, model) => {
            let c = body.cost_usd.as_ref().ok_or_else(|| ApiError::bad("give usage (with model) or cost_usd"))?;
            (model.unwrap_or_else(|| "unknown".into()), Usage::default(), parse_usd(c, "cost_usd")?)
        }
    };
    let event = NewEvent {
        id: event_id,
        account: account.clone(),
        pool: hold.pool,
        model,
        usage,
        cost,
        service_tier: body.service_tier,
        inference_geo: body.inference_geo,
        speed: body.speed,
        source: body.source.or(hold.source),
        key: hold.key,
        labels: body.labels,
        timestamp,
        latency_ms: body.latency_ms,
        ttft_ms: body.ttft_ms,
        partial: body.partial,
        estimated: false,
        fingerprint: fp,
    };
    let request = SettleRequest { account, hold_id, event };
    let settled = ownership::settle_as(s.store.as_ref(), &by, request, now).await.map_err(denied)?;
    feed_event(&s, &settled);
    Ok(axum::Json(event_json(&settled, &caller)))
}

/// Tallies a recorded event for the live stream.
fn feed_event(s: &AppState, e: &tollgate_store::Event) {
    s.feed.charged(&e.account, e.pool, e.grant_part.saturating_add(e.overage_part), e.usage.tokens());
}

pub async fn void_hold(
    State(s): State<AppState>,
    caller: Caller,
    Path((account, hold)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    caller.require_account(&account)?;
    let h = ownership::void_as(s.store.as_ref(), &maker(&caller), &account, &hold, s.now()).await.map_err(denied)?;
    Ok(axum::Json(dto::hold(&h)))
}
