//! Budget answers (SPEC section 7) as pure functions: a pool's forecast from its burn rates,
//! whether a job fits, and what past cycles would have cost on each tier.

use chrono::{DateTime, Duration, Utc};

use crate::cycle::Cycle;
use crate::ledger::{PoolScope, split_charge};
use crate::money::Nanos;
use crate::tier::Tier;

/// What a forecast is made from: the pool's figures now and what it spent recently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForecastInput {
    /// The instant the forecast is made at.
    pub now: DateTime<Utc>,
    /// The pool's current cycle.
    pub cycle: Cycle,
    /// The pool's figures in that cycle.
    pub scope: PoolScope,
    /// Charged in the last `recent_window`.
    pub recent: Nanos,
    /// The span `recent` was charged over.
    pub recent_window: Duration,
    /// Calls (events) of the cycle so far.
    pub calls: u64,
}

/// A pool's forecast for the rest of its cycle, from its cycle-to-date and recent burn rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forecast {
    /// Charged per day over the cycle so far.
    pub cycle_rate_per_day: Nanos,
    /// Charged per day over the recent window.
    pub recent_rate_per_day: Nanos,
    /// Charged at the cycle's end if the cycle-to-date rate holds.
    pub projected_cycle_end: Nanos,
    /// When the limit is reached at the higher of the two rates, if before the reset.
    pub exhaustion: Option<DateTime<Utc>>,
    /// Grant credit that the projection leaves unused at the reset (it expires).
    pub expiring_unused: Nanos,
    /// From now to the cycle's end (zero once past it).
    pub time_to_reset: Duration,
    /// False when the cycle is too young or too quiet to extrapolate: under a day old or under
    /// `CALLS_FOR_CONFIDENCE` calls. The figures are still given; callers must say so.
    pub confident: bool,
}

/// Calls a cycle needs before its rate is extrapolated with confidence.
pub const CALLS_FOR_CONFIDENCE: u64 = 10;

/// `amount` per `span`, scaled to per day (rounded down); zero for an empty span.
fn per_day(amount: Nanos, span: Duration) -> Nanos {
    let us = span.num_microseconds().unwrap_or(0);
    if us <= 0 {
        return Nanos::ZERO;
    }
    let day_us = i128::from(Duration::days(1).num_microseconds().unwrap_or(86_400_000_000));
    Nanos(i64::try_from(i128::from(amount.0) * day_us / i128::from(us)).unwrap_or(i64::MAX))
}

/// `rate` (per day) over `span`, rounded down.
fn over(rate: Nanos, span: Duration) -> Nanos {
    let us = i128::from(span.num_microseconds().unwrap_or(0).max(0));
    let day_us = i128::from(Duration::days(1).num_microseconds().unwrap_or(86_400_000_000));
    Nanos(i64::try_from(i128::from(rate.0) * us / day_us).unwrap_or(i64::MAX))
}

/// Forecasts a pool to its reset from its cycle-to-date rate and its recent rate (both per day).
pub fn forecast(input: &ForecastInput) -> Forecast {
    let s = &input.scope;
    let charged = s.charged();
    let elapsed = input.now - input.cycle.start;
    let time_to_reset = (input.cycle.end - input.now).max(Duration::zero());
    let cycle_rate_per_day = per_day(charged, elapsed);
    let recent_rate_per_day = per_day(input.recent, input.recent_window);
    let projected_cycle_end = charged.saturating_add(over(cycle_rate_per_day, time_to_reset));
    let exhaustion = s.limit.and_then(|limit| {
        let rate = cycle_rate_per_day.max(recent_rate_per_day);
        let left = Nanos(limit.0.saturating_sub(charged.0).saturating_sub(s.held.0));
        if left.0 <= 0 {
            return Some(input.now);
        }
        crate::alert::projected_exhaustion(input.now, left, rate, Duration::days(1)).filter(|t| *t < input.cycle.end)
    });
    let used_at_end = projected_cycle_end.min(s.grants);
    let expiring_unused = s.grants.saturating_sub_floor(used_at_end);
    let confident = elapsed >= Duration::days(1) && input.calls >= CALLS_FOR_CONFIDENCE;
    Forecast {
        cycle_rate_per_day,
        recent_rate_per_day,
        projected_cycle_end,
        exhaustion,
        expiring_unused,
        time_to_reset,
        confident,
    }
}

/// Whether a job of list-price `cost` fits a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// It fits now: what is left after it, and the part of its charge that is overage.
    FitsNow {
        /// The pool's remaining after the job; None when unlimited.
        remaining_after: Option<Nanos>,
        /// The part of the job's charge beyond the grants, at the PAYG multiplier.
        overage: Nanos,
    },
    /// Not now, but in a fresh cycle after the reset.
    FitsAfterReset {
        /// When the pool resets.
        at: DateTime<Utc>,
        /// The part of the job's charge beyond a fresh cycle's grants, at the PAYG multiplier.
        overage: Nanos,
    },
    /// Not even a whole fresh cycle can pay for it.
    NeverFits {
        /// A fresh cycle's limit.
        limit: Nanos,
        /// The job's charge in a fresh cycle, grants and overage together.
        charge: Nanos,
    },
}

/// `now`: the pool as it is; `fresh`: the same pool at the start of the next cycle (its grants,
/// its limit, nothing used). Overage is charged at list × `payg_multiplier_ppm`.
pub fn plan(
    cost: Nanos,
    now: &PoolScope,
    fresh: &PoolScope,
    payg_multiplier_ppm: u64,
    reset: DateTime<Utc>,
) -> Option<Plan> {
    let split = split_charge(cost, now, payg_multiplier_ppm).ok()?;
    let fits = |scope: &PoolScope, charge: Nanos| match scope.remaining() {
        None => Some(None),
        Some(r) if charge <= r => Some(Some(Nanos(r.0 - charge.0))),
        Some(_) => None,
    };
    if let Some(remaining_after) = fits(now, split.total()) {
        return Some(Plan::FitsNow { remaining_after, overage: split.overage });
    }
    let later = split_charge(cost, fresh, payg_multiplier_ppm).ok()?;
    match fits(fresh, later.total()) {
        Some(_) => Some(Plan::FitsAfterReset { at: reset, overage: later.overage }),
        None => Some(Plan::NeverFits { limit: fresh.limit.unwrap_or(Nanos::MAX), charge: later.total() }),
    }
}

/// What one past cycle spent per pool, at list price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CycleSpend {
    /// Spent by the interactive pool.
    pub interactive: Nanos,
    /// Spent by the programmatic pool.
    pub programmatic: Nanos,
}

/// Past cycles replayed on one tier, as if every pool were `payg` (so nothing is refused):
/// the overage at the tier's multiplier, and the total with the tier's price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierReplay {
    /// The tier's id.
    pub tier: String,
    /// Σ overage over the cycles, at the tier's PAYG multiplier.
    pub overage: Nanos,
    /// Σ monthly price + overage; None when the tier has no configured price.
    pub total: Option<Nanos>,
}

/// Replays past cycles on `tier`; None when a figure overflows.
pub fn replay_tier(tier: &Tier, cycles: &[CycleSpend]) -> Option<TierReplay> {
    let mut overage = Nanos::ZERO;
    let mut price = Some(Nanos::ZERO);
    for c in cycles {
        for (spend, grant) in [(c.interactive, tier.interactive), (c.programmatic, tier.programmatic)] {
            let beyond = spend.saturating_sub_floor(grant);
            overage = overage.checked_add(beyond.mul_ratio_round(tier.payg_multiplier_ppm, crate::tier::PPM)?)?;
        }
        price = match (price, tier.monthly_price) {
            (Some(p), Some(m)) => p.checked_add(m),
            _ => None,
        };
    }
    let total = price.and_then(|p| p.checked_add(overage));
    Some(TierReplay { tier: tier.id.clone(), overage, total })
}

/// The tier with the lowest total among those with a price (ties: the first given).
pub fn cheapest(replays: &[TierReplay]) -> Option<&TierReplay> {
    replays.iter().filter(|r| r.total.is_some()).min_by_key(|r| r.total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::PPM;
    use chrono::TimeZone;

    fn usd(x: i64) -> Nanos {
        Nanos::from_usd(x)
    }

    fn t(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap()
    }

    fn cycle() -> Cycle {
        Cycle { index: 0, start: t(1, 0), end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap() }
    }

    fn pool(limit: i64, grants: i64, used: i64) -> PoolScope {
        PoolScope {
            limit: Some(usd(limit)),
            grants: usd(grants),
            used: usd(used),
            overage: Nanos::ZERO,
            held: Nanos::ZERO,
        }
    }

    #[test]
    fn forecast_from_the_cycle_rate_and_the_recent_rate() {
        // Day 11 of a 30-day cycle: $20 of $50 used in 10 days ($2/day); $6 in the last day.
        let input = ForecastInput {
            now: t(11, 0),
            cycle: cycle(),
            scope: pool(50, 50, 20),
            recent: usd(6),
            recent_window: Duration::days(1),
            calls: 400,
        };
        let f = forecast(&input);
        assert_eq!(f.cycle_rate_per_day, usd(2));
        assert_eq!(f.recent_rate_per_day, usd(6));
        // 20 days left at $2/day: $20 + $40 = $60 projected.
        assert_eq!(f.projected_cycle_end, usd(60));
        // $30 left at the higher rate, $6/day: 5 days → Nov 16.
        assert_eq!(f.exhaustion, Some(t(16, 0)));
        assert_eq!(f.expiring_unused, Nanos::ZERO);
        assert_eq!(f.time_to_reset, Duration::days(20));
        assert!(f.confident);
    }

    #[test]
    fn a_slow_pool_leaves_credit_to_expire_and_a_young_cycle_is_not_confident() {
        // Day 11: $5 used in 10 days ($0.50/day) → $15 by the reset: $35 of the $50 grant expires.
        let input = ForecastInput {
            now: t(11, 0),
            cycle: cycle(),
            scope: pool(50, 50, 5),
            recent: Nanos(500_000_000),
            recent_window: Duration::days(1),
            calls: 40,
        };
        let f = forecast(&input);
        assert_eq!(f.projected_cycle_end, usd(15));
        assert_eq!(f.expiring_unused, usd(35));
        assert_eq!(f.exhaustion, None);
        // Six hours into a cycle with one call: figures given, but not confident.
        let young = ForecastInput { now: t(1, 6), calls: 1, scope: pool(50, 50, 1), ..input };
        assert!(!forecast(&young).confident);
    }

    #[test]
    fn plans_fit_now_after_the_reset_or_never() {
        let reset = cycle().end;
        let fresh = pool(50, 50, 0);
        // $30 left: a $10 job fits, $20 left after, no overage.
        assert_eq!(
            plan(usd(10), &pool(50, 50, 20), &fresh, PPM, reset),
            Some(Plan::FitsNow { remaining_after: Some(usd(20)), overage: Nanos::ZERO })
        );
        // $5 left: a $10 job waits for the reset.
        assert_eq!(
            plan(usd(10), &pool(50, 50, 45), &fresh, PPM, reset),
            Some(Plan::FitsAfterReset { at: reset, overage: Nanos::ZERO })
        );
        // $80 never fits a $50 block pool.
        assert_eq!(
            plan(usd(80), &pool(50, 50, 0), &fresh, PPM, reset),
            Some(Plan::NeverFits { limit: usd(50), charge: usd(80) })
        );
        // payg with a $100 spend cap and ×1.5 overage: $45 used of a $50 grant; a $10 job takes
        // $5 of grant and $5 of overage ×1.5 = $7.50; $100 − $45 − $12.50 = $42.50 left.
        let payg = PoolScope { limit: Some(usd(100)), ..pool(50, 50, 45) };
        assert_eq!(
            plan(usd(10), &payg, &fresh, 1_500_000, reset),
            Some(Plan::FitsNow { remaining_after: Some(Nanos(42_500_000_000)), overage: Nanos(7_500_000_000) })
        );
    }

    #[test]
    fn tiers_replayed_and_the_cheapest_recommended() {
        let cycles = [
            CycleSpend { interactive: usd(80), programmatic: usd(70) },
            CycleSpend { interactive: usd(120), programmatic: usd(10) },
        ];
        let tier = |id: &str, i: i64, p: i64, price: Option<i64>, ppm: u64| Tier {
            id: id.into(),
            interactive: usd(i),
            programmatic: usd(p),
            monthly_price: price.map(usd),
            payg_multiplier_ppm: ppm,
        };
        // standard ($100/$50, $150/month, ×1): overage 20 (cycle 1 programmatic) + 20 (cycle 2
        // interactive) = $40; total 2 × 150 + 40 = $340.
        let standard = replay_tier(&tier("standard", 100, 50, Some(150), PPM), &cycles).unwrap();
        assert_eq!((standard.overage, standard.total), (usd(40), Some(usd(340))));
        // premium ($200/$100, $300/month): no overage; total $600.
        let premium = replay_tier(&tier("premium", 200, 100, Some(300), PPM), &cycles).unwrap();
        assert_eq!((premium.overage, premium.total), (Nanos::ZERO, Some(usd(600))));
        // pro ($20/$20, $20/month, ×1.1): overage (60+50) + (100+0) = $210 × 1.1 = $231;
        // total 40 + 231 = $271.
        let pro = replay_tier(&tier("pro", 20, 20, Some(20), 1_100_000), &cycles).unwrap();
        assert_eq!((pro.overage, pro.total), (usd(231), Some(usd(271))));
        let unpriced = replay_tier(&tier("custom", 0, 0, None, PPM), &cycles).unwrap();
        assert_eq!(unpriced.total, None);
        let all = [standard, premium, pro.clone(), unpriced];
        assert_eq!(cheapest(&all), Some(&pro));
    }
}
