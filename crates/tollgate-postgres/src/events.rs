//! Events inserted many in one statement (`INSERT … SELECT FROM unnest(…)`, one array per
//! column): by the group commit (`batch`) and by `ledger::record_events`.

use std::collections::HashMap;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tollgate_store::ChargedEvent;

use crate::Result;
use crate::rows::{self, us};

/// How many parameters [`insert_sql`] takes.
pub const PARAMS: usize = 30;

/// The insert of the rows of [`Columns::params`], whose arrays are the parameters `$first` to
/// `$first + 29`; it returns nothing (the caller adds its `RETURNING`).
pub fn insert_sql(first: usize) -> String {
    const TYPES: [&str; PARAMS] = [
        "text", "text", "text", "text", "int8", "int8", "int8", "int8", "int8", "int8", "int8", "int8", "int8", "int8",
        "text", "text", "text", "text", "text", "text", "int8", "int8", "text", "int8", "int8", "bool", "int8", "text",
        "bool", "bool",
    ];
    let arrays: Vec<String> = TYPES.iter().enumerate().map(|(i, t)| format!("${}::{t}[]", first + i)).collect();
    format!(
        "INSERT INTO events (account, id, pool, model, input_tokens, cache_creation_5m_input_tokens,
             cache_creation_1h_input_tokens, cache_read_input_tokens, output_tokens, web_search_requests, cost,
             grant_part, overage_part, overshoot, service_tier, inference_geo, speed, source, key_id, labels, ts_us,
             cycle_start_us, hold_id, latency_ms, ttft_ms, partial, unsettled, recorded_us, fingerprint, estimated)
         SELECT a, i, p, m, it, c5, c1, cr, ot, ws, cost, gp, op, os, st, ig, sp, src, k, l, ts, cs, h, lat, tt, pa,
             un, rec, fp, est
         FROM unnest({}) AS u(a, i, p, m, it, c5, c1, cr, ot, ws, cost, gp, op, os, st, ig, sp, src, k, l, ts, cs, h,
             lat, tt, pa, rec, fp, est, un)",
        arrays.join(", ")
    )
}

/// The seq of each of `rows`, in order, from the rows of their insert's `RETURNING account, id,
/// seq` (which come back in no promised order).
pub fn seqs(rows: &[ChargedEvent], returned: &[Row]) -> Result<Vec<i64>> {
    let index: HashMap<(&str, &str), usize> =
        rows.iter().enumerate().map(|(n, r)| ((r.event.account.as_str(), r.event.id.as_str()), n)).collect();
    let mut seqs = vec![0i64; rows.len()];
    for r in returned {
        let (account, id): (&str, &str) = (r.try_get(0)?, r.try_get(1)?);
        let n = index.get(&(account, id)).ok_or_else(|| rows::corrupt("event returned by its insert", id))?;
        seqs[*n] = r.try_get(2)?;
    }
    Ok(seqs)
}

/// The columns of rows to insert, one array each.
pub struct Columns<'a> {
    account: Vec<&'a str>,
    id: Vec<&'a str>,
    pool: Vec<&'a str>,
    model: Vec<&'a str>,
    input: Vec<i64>,
    cache_5m: Vec<i64>,
    cache_1h: Vec<i64>,
    cache_read: Vec<i64>,
    output: Vec<i64>,
    web_search: Vec<i64>,
    cost: Vec<i64>,
    grant_part: Vec<i64>,
    overage_part: Vec<i64>,
    overshoot: Vec<i64>,
    service_tier: Vec<Option<&'a str>>,
    inference_geo: Vec<Option<&'a str>>,
    speed: Vec<Option<&'a str>>,
    source: Vec<Option<&'a str>>,
    key: Vec<Option<&'a str>>,
    labels: Vec<String>,
    ts: Vec<i64>,
    cycle_start: Vec<i64>,
    hold_id: Vec<Option<&'a str>>,
    latency_ms: Vec<Option<i64>>,
    ttft_ms: Vec<Option<i64>>,
    partial: Vec<bool>,
    recorded: Vec<i64>,
    fingerprint: Vec<&'a str>,
    estimated: Vec<bool>,
    unsettled: Vec<bool>,
}

impl<'a> Columns<'a> {
    pub fn new(rows: &'a [ChargedEvent]) -> Columns<'a> {
        let text = |f: fn(&'a ChargedEvent) -> &'a str| rows.iter().map(f).collect::<Vec<_>>();
        let opt = |f: fn(&'a ChargedEvent) -> Option<&'a str>| rows.iter().map(f).collect::<Vec<_>>();
        let int = |f: fn(&ChargedEvent) -> i64| rows.iter().map(f).collect::<Vec<_>>();
        Columns {
            account: text(|r| &r.event.account),
            id: text(|r| &r.event.id),
            pool: text(|r| r.event.pool.as_str()),
            model: text(|r| &r.event.model),
            input: int(|r| r.event.usage.input_tokens as i64),
            cache_5m: int(|r| r.event.usage.cache_creation_5m_input_tokens as i64),
            cache_1h: int(|r| r.event.usage.cache_creation_1h_input_tokens as i64),
            cache_read: int(|r| r.event.usage.cache_read_input_tokens as i64),
            output: int(|r| r.event.usage.output_tokens as i64),
            web_search: int(|r| r.event.usage.web_search_requests as i64),
            cost: int(|r| r.event.cost.0),
            grant_part: int(|r| r.split.grant.0),
            overage_part: int(|r| r.split.overage.0),
            overshoot: int(|r| r.overshoot.0),
            service_tier: opt(|r| r.event.service_tier.as_deref()),
            inference_geo: opt(|r| r.event.inference_geo.as_deref()),
            speed: opt(|r| r.event.speed.as_deref()),
            source: opt(|r| r.event.source.as_deref()),
            key: opt(|r| r.event.key.as_deref()),
            labels: rows.iter().map(|r| rows::labels_to_text(&r.event.labels)).collect(),
            ts: int(|r| us(r.event.timestamp)),
            cycle_start: int(|r| us(r.cycle_start)),
            hold_id: opt(|r| r.hold_id.as_deref()),
            latency_ms: rows.iter().map(|r| r.event.latency_ms.map(|v| v as i64)).collect(),
            ttft_ms: rows.iter().map(|r| r.event.ttft_ms.map(|v| v as i64)).collect(),
            partial: rows.iter().map(|r| r.event.partial).collect(),
            recorded: int(|r| us(r.recorded)),
            fingerprint: text(|r| &r.event.fingerprint),
            estimated: rows.iter().map(|r| r.event.estimated).collect(),
            unsettled: rows.iter().map(|r| r.unsettled).collect(),
        }
    }

    /// The arrays, in the order of [`insert_sql`]'s parameters.
    pub fn params(&self) -> [&(dyn ToSql + Sync); PARAMS] {
        [
            &self.account,
            &self.id,
            &self.pool,
            &self.model,
            &self.input,
            &self.cache_5m,
            &self.cache_1h,
            &self.cache_read,
            &self.output,
            &self.web_search,
            &self.cost,
            &self.grant_part,
            &self.overage_part,
            &self.overshoot,
            &self.service_tier,
            &self.inference_geo,
            &self.speed,
            &self.source,
            &self.key,
            &self.labels,
            &self.ts,
            &self.cycle_start,
            &self.hold_id,
            &self.latency_ms,
            &self.ttft_ms,
            &self.partial,
            &self.recorded,
            &self.fingerprint,
            &self.estimated,
            &self.unsettled,
        ]
    }
}
