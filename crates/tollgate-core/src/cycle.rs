//! Billing cycles: cycle *k* starts at `anchor + k months` in the account's timezone, with the
//! day clamped to the month's length, computed from the original anchor every time.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// One billing month of an account: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cycle {
    /// Months since the anchor's cycle (negative before it).
    pub index: i64,
    /// The cycle's first instant (inclusive).
    pub start: DateTime<Utc>,
    /// The next cycle's first instant (exclusive).
    pub end: DateTime<Utc>,
}

/// An account's billing anchor: a local date and time of day in a timezone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CycleAnchor {
    local: NaiveDateTime,
    tz: Tz,
}

impl CycleAnchor {
    /// The anchor instant seen in the account's timezone; its local date and time are kept
    /// across DST changes.
    pub fn new(anchor: DateTime<Utc>, tz: Tz) -> CycleAnchor {
        CycleAnchor { local: anchor.with_timezone(&tz).naive_local(), tz }
    }

    /// The account's timezone, in which cycles start.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The start of cycle `k`.
    pub fn start(&self, k: i64) -> DateTime<Utc> {
        let months = i64::from(self.local.year()) * 12 + i64::from(self.local.month0()) + k;
        #[allow(
            clippy::expect_used,
            reason = "cycles are asked for near instants chrono holds (the clock, RFC 3339 times with 4-digit years, the anchor): their year is far inside i32"
        )]
        let year = i32::try_from(months.div_euclid(12)).expect("cycle year in range");
        #[allow(clippy::expect_used, reason = "rem_euclid(12) is always in 0..12, which u32 holds")]
        let month0 = u32::try_from(months.rem_euclid(12)).expect("month in 0..12");
        let day = self.local.day().min(days_in_month(year, month0 + 1));
        #[allow(
            clippy::expect_used,
            reason = "the month is in 1..=12, the day is clamped to that month's length just above, and the year is one chrono holds (see `year`)"
        )]
        let date = NaiveDate::from_ymd_opt(year, month0 + 1, day).expect("clamped day is valid");
        local_to_utc(self.tz, date.and_time(self.local.time()))
    }

    /// The cycle that contains `t`.
    pub fn cycle_at(&self, t: DateTime<Utc>) -> Cycle {
        let local = t.with_timezone(&self.tz).naive_local();
        let mut k = (i64::from(local.year()) - i64::from(self.local.year())) * 12 + i64::from(local.month0())
            - i64::from(self.local.month0());
        while self.start(k) > t {
            k -= 1;
        }
        while self.start(k + 1) <= t {
            k += 1;
        }
        Cycle { index: k, start: self.start(k), end: self.start(k + 1) }
    }
}

#[allow(
    clippy::expect_used,
    reason = "start passes a month in 1..=12 and a year chrono holds, so the next month's first day exists, and a month's first day always has a day before it"
)]
fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    let first_next = NaiveDate::from_ymd_opt(ny, nm, 1).expect("valid month");
    first_next.pred_opt().expect("has a previous day").day()
}

/// A local time to UTC: an ambiguous time (DST fall-back) takes the earlier instant; a time in
/// a DST gap (spring-forward) is read with the offset in force before the gap, which lands just
/// after the gap (02:30 in a 02:00→03:00 gap becomes 03:30).
fn local_to_utc(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => {
            let before = local - Duration::hours(6);
            let offset = match tz.from_local_datetime(&before) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.offset().fix(),
                LocalResult::None => Utc.fix(),
            };
            Utc.from_utc_datetime(&(local - Duration::seconds(i64::from(offset.local_minus_utc()))))
        }
    }
}
