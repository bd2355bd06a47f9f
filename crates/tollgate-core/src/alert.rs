//! Alert predicates (SPEC section 6), as pure functions of figures read beforehand: which
//! thresholds a change crossed, whether overage started, whether a spike is on, when a pool runs
//! out at its current burn rate. Firing "once per rule, pool and cycle" and delivery are the
//! store's and the server's business; these only decide.

use chrono::{DateTime, Duration, Utc};

use crate::money::Nanos;
use crate::tier::PPM;

/// The default threshold percentages.
pub const THRESHOLD_PERCENTS_DEFAULT: [u8; 3] = [50, 80, 100];

/// The percentages `p` crossed when a pool's charged total moved from `before` to `after`
/// against `limit`: `before < p % of limit ≤ after`, in exact integers. Several may be crossed
/// by one call; none when the limit is zero or negative.
pub fn thresholds_crossed(percents: &[u8], limit: Nanos, before: Nanos, after: Nanos) -> Vec<u8> {
    if limit.0 <= 0 {
        return Vec::new();
    }
    let limit = i128::from(limit.0);
    let (before, after) = (i128::from(before.0) * 100, i128::from(after.0) * 100);
    let mut crossed: Vec<u8> = percents
        .iter()
        .copied()
        .filter(|&p| before < i128::from(p) * limit && i128::from(p) * limit <= after)
        .collect();
    crossed.sort_unstable();
    crossed.dedup();
    crossed
}

/// Overage started: the pool had none before the change and has some after.
pub fn overage_started(overage_before: Nanos, overage_after: Nanos) -> bool {
    overage_before.0 <= 0 && overage_after.0 > 0
}

/// A spike rule: the amount (spend in nano-USD, or calls) in the last window is above `factor`
/// × the trailing baseline (the mean per window over the trailing windows) and above `floor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spike {
    /// k, in millionths (3× = 3,000,000).
    pub factor_ppm: u64,
    /// The absolute floor the window must pass, in the same unit as the amounts.
    pub floor: i64,
}

impl Spike {
    /// Whether `window` (the last window's amount) is a spike over `trailing` (the amounts of
    /// the windows before it). With no trailing history, only the floor applies.
    pub fn is_on(&self, window: i64, trailing: &[i64]) -> bool {
        if window <= self.floor {
            return false;
        }
        if trailing.is_empty() {
            return true;
        }
        let sum: i128 = trailing.iter().map(|&a| i128::from(a.max(0))).sum();
        // window > factor × sum / n  ⇔  window × n × PPM > factor_ppm × sum
        let n = trailing.len() as i128;
        i128::from(window) * n * i128::from(PPM) > i128::from(self.factor_ppm) * sum
    }
}

/// The state of a spike rule for one pool: it fires when a spike starts, and re-arms only once
/// the spike has subsided, so one long burst fires once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpikeState {
    /// Ready: the next spike fires. The start state, and the state once a spike has subsided.
    #[default]
    Armed,
    /// A spike fired and has not yet subsided.
    Fired,
}

impl SpikeState {
    /// The next state and whether to fire now.
    pub fn step(self, on: bool) -> (SpikeState, bool) {
        match (self, on) {
            (SpikeState::Armed, true) => (SpikeState::Fired, true),
            (SpikeState::Fired, false) => (SpikeState::Armed, false),
            (state, _) => (state, false),
        }
    }
}

/// When a pool with `remaining` left runs out if it keeps spending `spent` per `window`; None
/// when it spends nothing or has nothing left to lose.
pub fn projected_exhaustion(
    now: DateTime<Utc>,
    remaining: Nanos,
    spent: Nanos,
    window: Duration,
) -> Option<DateTime<Utc>> {
    if spent.0 <= 0 || window <= Duration::zero() {
        return None;
    }
    let remaining = i128::from(remaining.0.max(0));
    let window_us = i128::from(window.num_microseconds()?);
    // Round up: the pool still has credit until the last microsecond it can pay for.
    let us = (remaining * window_us + i128::from(spent.0) - 1) / i128::from(spent.0);
    now.checked_add_signed(Duration::microseconds(i64::try_from(us).ok()?))
}

/// The forecast rule fires when the projected exhaustion comes more than `days` before the reset.
pub fn forecast_fires(exhaustion: Option<DateTime<Utc>>, reset: DateTime<Utc>, days: u32) -> bool {
    exhaustion.is_some_and(|t| t + Duration::days(i64::from(days)) < reset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn usd(x: i64) -> Nanos {
        Nanos::from_usd(x)
    }

    #[test]
    fn thresholds_crossed_by_one_change_each_fire() {
        let limit = usd(50);
        // $24 → $26 crosses 50 % ($25) only.
        assert_eq!(thresholds_crossed(&[50, 80, 100], limit, usd(24), usd(26)), vec![50]);
        // $24 → $50 crosses all three; exactly at the limit counts as 100 %.
        assert_eq!(thresholds_crossed(&[100, 50, 80], limit, usd(24), usd(50)), vec![50, 80, 100]);
        // Already past 50 % before: not again.
        assert_eq!(thresholds_crossed(&[50, 80, 100], limit, usd(25), usd(30)), Vec::<u8>::new());
        // One nano-USD short of 80 % ($40) does not cross it; the next one does.
        assert_eq!(thresholds_crossed(&[80], limit, usd(39), Nanos(39_999_999_999)), Vec::<u8>::new());
        assert_eq!(thresholds_crossed(&[80], limit, Nanos(39_999_999_999), usd(40)), vec![80]);
        // A zero limit (a pool with nothing) has no thresholds.
        assert!(thresholds_crossed(&[50], Nanos::ZERO, Nanos::ZERO, usd(1)).is_empty());
    }

    #[test]
    fn overage_starts_once() {
        assert!(overage_started(Nanos::ZERO, Nanos(1)));
        assert!(!overage_started(Nanos(1), Nanos(2)));
        assert!(!overage_started(Nanos::ZERO, Nanos::ZERO));
    }

    #[test]
    fn spikes_need_factor_and_floor_and_fire_once_per_burst() {
        let rule = Spike { factor_ppm: 3 * PPM, floor: 100 };
        // Baseline 50 per window: 151 is above 3 × 50 and above the floor.
        assert!(rule.is_on(151, &[40, 50, 60]));
        // Exactly 3 × the baseline is not above it.
        assert!(!rule.is_on(150, &[40, 50, 60]));
        // Above 3 × a tiny baseline but under the floor: no spike.
        assert!(!rule.is_on(90, &[1, 1, 1]));
        // No history: the floor alone decides.
        assert!(rule.is_on(101, &[]));
        let mut state = SpikeState::default();
        let mut fired = Vec::new();
        for on in [false, true, true, true, false, true] {
            let (next, fire) = state.step(on);
            state = next;
            fired.push(fire);
        }
        assert_eq!(fired, vec![false, true, false, false, false, true]);
    }

    #[test]
    fn exhaustion_at_the_current_burn_rate() {
        let now = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
        // $30 left, $10 per day → 3 days.
        let t = projected_exhaustion(now, usd(30), usd(10), Duration::days(1));
        assert_eq!(t, Some(now + Duration::days(3)));
        // $1 left, $3 per hour → 20 minutes.
        assert_eq!(projected_exhaustion(now, usd(1), usd(3), Duration::hours(1)), Some(now + Duration::minutes(20)));
        assert_eq!(projected_exhaustion(now, usd(1), Nanos::ZERO, Duration::hours(1)), None);
        let reset = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        // Out on Nov 13, reset Dec 1: 18 days early; a 7-day rule fires, a 20-day rule does not.
        assert!(forecast_fires(t, reset, 7));
        assert!(!forecast_fires(t, reset, 20));
        assert!(!forecast_fires(None, reset, 0));
    }
}
