//! Reports (SPEC section 7 and the report shape of section 11): a cycle of one account, per
//! pool, optionally grouped by pool, model, source, key, a label or day, from the store's hourly
//! rollups and the pool figures of that cycle.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde_json::{Value, json};
use tollgate_core::{Cycle, Nanos, PoolKind, Usage};
use tollgate_store::report::{Dims, Rollup};
use tollgate_store::{Account, Balance};

use crate::dto;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Pool,
    Model,
    Source,
    Key,
    Label(String),
    Day,
}

impl GroupBy {
    /// The rollup dimensions a report grouped this way (or not at all) reads.
    pub fn dims(by: Option<&GroupBy>) -> Dims {
        let mut dims = Dims::NONE;
        match by {
            None | Some(GroupBy::Pool) => {}
            Some(GroupBy::Model) => dims.model = true,
            Some(GroupBy::Source) => dims.source = true,
            Some(GroupBy::Key) => dims.key = true,
            Some(GroupBy::Label(_)) => dims.labels = true,
            Some(GroupBy::Day) => dims.hour = true,
        }
        dims
    }

    pub fn parse(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "pool" => GroupBy::Pool,
            "model" => GroupBy::Model,
            "source" => GroupBy::Source,
            "key" => GroupBy::Key,
            "day" => GroupBy::Day,
            other => match other.strip_prefix("label:") {
                Some(name) if !name.is_empty() => GroupBy::Label(name.to_string()),
                _ => return Err(format!("by {other:?}: use pool, model, source, key, label:NAME or day")),
            },
        })
    }
}

/// Which cycle: `current`, `previous`, or `YYYY-MM` (the cycle that starts in that month, in the
/// account's timezone).
pub fn cycle_of(account: &Account, which: &str, now: DateTime<Utc>) -> Result<Cycle, String> {
    let anchor = account.cycle_anchor();
    let current = anchor.cycle_at(now);
    match which {
        "current" => Ok(current),
        "previous" => Ok(anchor.cycle_at(current.start - chrono::Duration::seconds(1))),
        month => {
            let first = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
                .map_err(|_| format!("cycle {month:?}: use current, previous or a month as YYYY-MM"))?;
            #[allow(clippy::expect_used, reason = "midnight exists on every date: and_hms_opt(0, 0, 0) is Some")]
            let local_first = account
                .timezone
                .from_local_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight exists"))
                .earliest()
                .ok_or_else(|| format!("cycle {month:?}: that month does not exist in {}", account.timezone))?
                .with_timezone(&Utc);
            let k = anchor.cycle_at(local_first).index;
            (k..=k + 1)
                .map(|k| Cycle { index: k, start: anchor.start(k), end: anchor.start(k + 1) })
                .find(|c| {
                    let local = c.start.with_timezone(&account.timezone);
                    (local.year(), local.month()) == (first.year(), first.month())
                })
                .ok_or_else(|| format!("no cycle of account {} starts in {month}", account.id))
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Line {
    pub calls: u64,
    pub usage: Usage,
    pub cost: Nanos,
    pub charged: Nanos,
}

impl Line {
    fn add(&mut self, r: &Rollup) {
        self.calls += r.calls;
        self.usage.add(&r.usage);
        self.cost = self.cost.saturating_add(r.cost);
        self.charged = self.charged.saturating_add(r.charged);
    }
}

fn group_key(by: &GroupBy, r: &Rollup, account: &Account) -> String {
    let or_none = |s: &str| if s.is_empty() { "(none)".to_string() } else { s.to_string() };
    match by {
        GroupBy::Pool => r.pool.as_str().to_string(),
        GroupBy::Model => r.model.clone(),
        GroupBy::Source => or_none(&r.source),
        GroupBy::Key => or_none(&r.key),
        GroupBy::Day => r.hour.with_timezone(&account.timezone).date_naive().to_string(),
        GroupBy::Label(name) => serde_json::from_str::<BTreeMap<String, String>>(&r.labels)
            .ok()
            .and_then(|labels| labels.get(name).cloned())
            .unwrap_or_else(|| "(none)".to_string()),
    }
}

pub struct Report {
    pub account: String,
    pub cycle: Cycle,
    pub pools: Vec<(PoolKind, Nanos, Nanos, Nanos, Line)>,
    pub groups: Option<Vec<(String, Line)>>,
}

/// `balance` is the account's balance in the reported cycle (its pool figures).
pub fn build(account: &Account, balance: &Balance, rollups: &[Rollup], by: Option<&GroupBy>) -> Report {
    let pools = balance
        .pools
        .iter()
        .map(|p| {
            let mut line = Line::default();
            rollups.iter().filter(|r| r.pool == p.pool).for_each(|r| line.add(r));
            (p.pool, p.grants, p.used, p.overage, line)
        })
        .collect();
    let groups = by.map(|by| {
        let mut groups: BTreeMap<String, Line> = BTreeMap::new();
        for r in rollups {
            groups.entry(group_key(by, r, account)).or_default().add(r);
        }
        let mut groups: Vec<(String, Line)> = groups.into_iter().collect();
        // Biggest first, then by key; days in calendar order.
        if *by != GroupBy::Day {
            groups.sort_by(|a, b| b.1.charged.cmp(&a.1.charged).then_with(|| a.0.cmp(&b.0)));
        }
        groups
    });
    Report { account: account.id.clone(), cycle: balance.cycle, pools, groups }
}

fn tokens_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "cache_creation_5m_input_tokens": u.cache_creation_5m_input_tokens,
        "cache_creation_1h_input_tokens": u.cache_creation_1h_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "output_tokens": u.output_tokens,
        "web_search_requests": u.web_search_requests,
    })
}

/// The rollup dimensions a forecast reads.
pub const FORECAST_DIMS: Dims = Dims { hour: true, ..Dims::NONE };

/// A pool's forecast (SPEC section 7) from its figures and the cycle's rollups (at least
/// [`FORECAST_DIMS`]): the recent burn is what the last 24 hours' rollups charged. Returns it with the cycle's call count.
pub fn forecast_pool(
    p: &tollgate_store::PoolBalance,
    cycle: Cycle,
    rollups: &[Rollup],
    now: DateTime<Utc>,
) -> (tollgate_core::plan::Forecast, u64) {
    let mine = rollups.iter().filter(|r| r.pool == p.pool);
    let calls: u64 = mine.clone().map(|r| r.calls).sum();
    let recent = mine
        .filter(|r| r.hour + chrono::Duration::hours(1) > now - chrono::Duration::days(1))
        .fold(Nanos::ZERO, |s, r| s.saturating_add(r.charged));
    let scope = p.scope();
    let input = tollgate_core::plan::ForecastInput {
        now,
        cycle,
        scope,
        recent,
        recent_window: chrono::Duration::days(1),
        calls,
    };
    (tollgate_core::plan::forecast(&input), calls)
}

/// The report JSON of SPEC section 11.
pub fn to_json(r: &Report) -> Value {
    let mut pools = serde_json::Map::new();
    let mut total = Nanos::ZERO;
    for (pool, grants, used, overage, line) in &r.pools {
        let pool_total = used.saturating_add(*overage);
        total = total.saturating_add(pool_total);
        pools.insert(
            pool.as_str().to_string(),
            json!({
                "grant_usd": dto::usd(*grants),
                "used_usd": dto::usd(*used),
                "overage_usd": dto::usd(*overage),
                "total_usd": dto::usd(pool_total),
                "calls": line.calls,
                "list_cost_usd": dto::usd(line.cost),
                "tokens": tokens_json(&line.usage),
            }),
        );
    }
    let mut out = json!({
        "account": r.account,
        "cycle": {"start": dto::time(r.cycle.start), "end": dto::time(r.cycle.end)},
        "pools": pools,
        "total_usd": dto::usd(total),
    });
    if let Some(groups) = &r.groups {
        out["groups"] = groups
            .iter()
            .map(|(key, line)| {
                json!({"key": key, "total_usd": dto::usd(line.charged), "calls": line.calls,
                       "list_cost_usd": dto::usd(line.cost), "tokens": tokens_json(&line.usage)})
            })
            .collect();
    }
    out
}
