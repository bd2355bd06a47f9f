//! The JSON shapes of the API (SPEC section 11 for events and balances): amounts as decimal
//! USD strings, times as RFC 3339 UTC.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};
use tollgate_config::UsdInput;
use tollgate_core::usage::{TOKENS_PER_CALL_MAX, TOOL_REQUESTS_PER_CALL_MAX};
use tollgate_core::{Nanos, Tier, Usage, price::PriceEntry};
use tollgate_store::{Account, Balance, Event, Grant, Hold, Key, PoolBalance};

use crate::error::ApiError;

pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub fn usd(n: Nanos) -> String {
    n.to_string()
}

/// Parses an RFC 3339 time, naming the field when it is not one.
pub fn parse_time(text: &str, field: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::bad(format!("{field} {text:?} is not an RFC 3339 time such as 2026-11-25T10:00:00Z")))
}

/// Parses an amount, naming the field; `allow_negative` only where a negative makes sense.
pub fn parse_usd(input: &UsdInput, field: &str) -> Result<Nanos, ApiError> {
    let n = input.nanos().map_err(|e| ApiError::bad(format!("{field}: {e}")))?;
    if n.is_negative() {
        return Err(ApiError::bad(format!("{field} must not be negative")));
    }
    Ok(n)
}

pub fn balance(b: &Balance) -> Value {
    let pool = |p: &PoolBalance| {
        let mut m = Map::new();
        m.insert("grant_usd".into(), usd(p.grants).into());
        m.insert("used_usd".into(), usd(p.used).into());
        m.insert("overage_usd".into(), usd(p.overage).into());
        m.insert("held_usd".into(), usd(p.held).into());
        if let (Some(limit), Some(remaining)) = (p.limit, p.remaining()) {
            m.insert("remaining_usd".into(), usd(remaining).into());
            m.insert("limit_usd".into(), usd(limit).into());
        }
        m.insert("on_exhausted".into(), p.policy.on_exhausted.as_str().into());
        Value::Object(m)
    };
    json!({
        "account": b.account,
        "tier": b.tier,
        "cycle": {"start": time(b.cycle.start), "end": time(b.cycle.end)},
        "pools": {"interactive": pool(&b.pools[0]), "programmatic": pool(&b.pools[1])},
    })
}

pub fn account(a: &Account) -> Value {
    json!({
        "id": a.id,
        "tier": a.tier,
        "anchor": time(a.anchor),
        "timezone": a.timezone.name(),
        "interactive_grant_usd": a.interactive_grant.map(usd),
        "programmatic_grant_usd": a.programmatic_grant.map(usd),
        "created_at": time(a.created_at),
    })
}

pub fn tier(t: &Tier) -> Value {
    let ppm = t.payg_multiplier_ppm;
    json!({
        "id": t.id,
        "interactive_usd": usd(t.interactive),
        "programmatic_usd": usd(t.programmatic),
        "monthly_price_usd": t.monthly_price.map(usd),
        // A multiplier in millionths reads as a decimal with six places; reuse the USD formatter.
        "payg_multiplier": usd(Nanos(ppm as i64 * 1000)),
    })
}

pub fn grant(g: &Grant) -> Value {
    json!({
        "id": g.id,
        "account": g.account,
        "pool": g.pool.as_str(),
        "kind": g.kind.as_str(),
        "amount_usd": usd(g.amount),
        "cycle_start": time(g.cycle_start),
        "expires_at": time(g.expires_at),
        "note": g.note,
        "created_at": time(g.created_at),
    })
}

pub fn key(k: &Key) -> Value {
    json!({
        "id": k.id,
        "account": k.account,
        "name": k.name,
        "pool": k.pool.as_str(),
        "labels": k.labels,
        "cap_usd": k.cap.map(usd),
        "created_at": time(k.created_at),
        "revoked_at": k.revoked_at.map(time),
    })
}

pub fn hold(h: &Hold) -> Value {
    json!({
        "id": h.id,
        "account": h.account,
        "pool": h.pool.as_str(),
        "key": h.key,
        "amount_usd": usd(h.amount),
        "model": h.model,
        "source": h.source,
        "state": h.state.as_str(),
        "cycle": {"start": time(h.cycle_start), "end": time(h.cycle_end)},
        "created_at": time(h.created_at),
        "expires_at": time(h.expires_at),
        "remaining_usd": h.remaining_after.map(usd),
        "made_by": h.made_by.to_text(),
    })
}

pub fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_5m_input_tokens": u.cache_creation_5m_input_tokens,
        "cache_creation_1h_input_tokens": u.cache_creation_1h_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "web_search_requests": u.web_search_requests,
    })
}

pub fn event(e: &Event) -> Value {
    json!({
        "id": e.id,
        "seq": e.seq,
        "account": e.account,
        "pool": e.pool.as_str(),
        "model": e.model,
        "usage": usage(&e.usage),
        "cost_usd": usd(e.cost),
        "grant_usd": usd(e.grant_part),
        "overage_usd": usd(e.overage_part),
        "overshoot_usd": usd(e.overshoot),
        "service_tier": e.service_tier,
        "inference_geo": e.inference_geo,
        "speed": e.speed,
        "source": e.source,
        "key": e.key,
        "labels": e.labels,
        "timestamp": time(e.timestamp),
        "cycle_start": time(e.cycle_start),
        "hold": e.hold_id,
        "latency_ms": e.latency_ms,
        "ttft_ms": e.ttft_ms,
        "partial": e.partial,
        "estimated": e.estimated,
        "unsettled": e.unsettled,
        "recorded_at": time(e.recorded_at),
    })
}

pub fn price(p: &PriceEntry) -> Value {
    let r = |n: i64| usd(Nanos(n));
    json!({
        "model": p.model,
        "provider": p.provider.as_str(),
        "effective_from": p.effective_from.to_string(),
        "input_usd_per_mtok": r(p.rates.input),
        "cache_write_5m_usd_per_mtok": r(p.rates.cache_write_5m),
        "cache_write_1h_usd_per_mtok": r(p.rates.cache_write_1h),
        "cache_read_usd_per_mtok": r(p.rates.cache_read),
        "output_usd_per_mtok": r(p.rates.output),
        "long_context": p.long_context.map(|lc| json!({
            "above_input_tokens": lc.threshold_tokens,
            "input_usd_per_mtok": r(lc.rates.input),
            "output_usd_per_mtok": r(lc.rates.output),
        })),
        "fast_multiplier": p.fast_multiplier_ppm.map(|ppm| usd(Nanos(ppm as i64 * 1000))),
        "inference_geo_us_surcharge": p.geo_us_surcharge,
        "web_search_usd_per_request": usd(p.web_search_per_request),
    })
}

/// Token counts as posted; absent counts are zero. Anything but a whole number from 0 to
/// `u64::MAX` is refused by the parser with what a count is; absurd counts by validation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UsageIn {
    #[serde(default, deserialize_with = "token_count")]
    pub input_tokens: u64,
    #[serde(default, deserialize_with = "token_count")]
    pub output_tokens: u64,
    #[serde(default, deserialize_with = "token_count")]
    pub cache_creation_5m_input_tokens: u64,
    #[serde(default, deserialize_with = "token_count")]
    pub cache_creation_1h_input_tokens: u64,
    #[serde(default, deserialize_with = "token_count")]
    pub cache_read_input_tokens: u64,
    #[serde(default, deserialize_with = "request_count")]
    pub web_search_requests: u64,
}

fn token_count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    count(d, "token count", TOKENS_PER_CALL_MAX)
}

fn request_count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    count(d, "request count", TOOL_REQUESTS_PER_CALL_MAX)
}

/// A count read through a JSON value, so every shape (and a number `u64` cannot hold, which
/// serde_json's `arbitrary_precision` reports only as "invalid number") gets the same message.
fn count<'de, D: Deserializer<'de>>(d: D, what: &str, max: u64) -> Result<u64, D::Error> {
    let value = Value::deserialize(d)?;
    let shown = match &value {
        Value::Number(n) => match n.as_u64() {
            Some(count) => return Ok(count),
            None => n.to_string(),
        },
        Value::String(s) => format!("the string {s:?}"),
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    Err(D::Error::custom(format!("{shown} is not a {what}: give a whole number from 0 to {max}")))
}

impl UsageIn {
    pub fn usage(&self) -> Result<Usage, ApiError> {
        let u = Usage {
            input_tokens: self.input_tokens,
            cache_creation_5m_input_tokens: self.cache_creation_5m_input_tokens,
            cache_creation_1h_input_tokens: self.cache_creation_1h_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
            output_tokens: self.output_tokens,
            web_search_requests: self.web_search_requests,
        };
        u.validate().map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(u)
    }
}

/// A usage event as posted (SPEC section 11). Serialized back, it is the event's fingerprint.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    pub id: String,
    pub account: String,
    pub pool: String,
    pub model: String,
    pub usage: UsageIn,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub inference_geo: Option<String>,
    #[serde(default)]
    pub speed: Option<String>,
    #[serde(default)]
    pub cost_usd: Option<UsdInput>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub ttft_ms: Option<u64>,
}
