//! `tollgate check` decided once (SPEC section 3): each backend reads [`AuditRows`] with its own
//! SQL, inside one snapshot, and [`judge`] finds the breaches and the warnings, so both backends
//! check the same invariants and say the same sentences.

use chrono::{DateTime, Utc};
use tollgate_core::{Nanos, OnExhausted, PoolPolicy};

use crate::Audit;

/// One pool cycle's stored totals beside the sums of the rows they stand for.
#[derive(Clone, Debug)]
pub struct PoolSums {
    pub account: String,
    pub pool: String,
    pub cycle_start: DateTime<Utc>,
    /// The pool's policy; None when the stored pool name is no pool.
    pub policy: Option<PoolPolicy>,
    /// The stored totals.
    pub grants: Nanos,
    pub used: Nanos,
    pub overage: Nanos,
    pub held: Nanos,
    /// Σ events' grant part, and overage part.
    pub events_grant: Nanos,
    pub events_overage: Nanos,
    /// Σ charges of events that ended a hold, less their overshoot.
    pub through_holds: Nanos,
    /// Σ open holds.
    pub open_holds: Nanos,
    /// Σ grant rows.
    pub grant_rows: Nanos,
    /// Σ overshoot, and how many events had some.
    pub overshoot: Nanos,
    pub overshot_events: u64,
}

/// One key cycle's stored totals beside the sums of its events and open holds.
#[derive(Clone, Debug)]
pub struct KeySums {
    pub key: String,
    pub cycle_start: DateTime<Utc>,
    pub charged: Nanos,
    pub held: Nanos,
    pub events: Nanos,
    pub open_holds: Nanos,
}

/// What a backend reads for the audit.
#[derive(Clone, Debug, Default)]
pub struct AuditRows {
    /// Every pool cycle, ordered by account, pool and cycle.
    pub pools: Vec<PoolSums>,
    /// Every key cycle, ordered by key and cycle.
    pub keys: Vec<KeySums>,
    pub events: u64,
    pub holds_open: u64,
    /// Holds of calls (not leases) that more than one event charged.
    pub charged_twice: u64,
}

/// The audit of `rows`.
pub fn judge(rows: &AuditRows) -> Audit {
    let mut audit = Audit {
        pools_checked: rows.pools.len() as u64,
        events_checked: rows.events,
        holds_open: rows.holds_open,
        ..Audit::default()
    };
    for p in &rows.pools {
        if p.overshot_events > 0 {
            audit.warnings.push(overshoot_warning(p));
        }
        let at = format!("account {} pool {} cycle {}", p.account, p.pool, p.cycle_start.to_rfc3339());
        let mut breach = |text: String| audit.breaches.push(format!("{at}: {text}"));
        if p.used != p.events_grant {
            breach(format!("used {} != Σ events' grant part {}", p.used, p.events_grant));
        }
        if p.overage != p.events_overage {
            breach(format!("overage {} != Σ events' overage part {}", p.overage, p.events_overage));
        }
        if p.held != p.open_holds {
            breach(format!("held {} != Σ open holds {}", p.held, p.open_holds));
        }
        if p.grants != p.grant_rows {
            breach(format!("grants {} != Σ grant rows {}", p.grants, p.grant_rows));
        }
        if let Some(policy) = &p.policy
            && policy.on_exhausted == OnExhausted::Block
            && let Some(limit) = policy.limit(p.grants)
            && p.through_holds.saturating_add(p.held) > limit
        {
            breach(format!(
                "charged through holds {} + held {} exceeds the block limit {limit} \
                 (a lowered cap after the charges also shows here)",
                p.through_holds, p.held
            ));
        }
    }
    if rows.charged_twice > 0 {
        audit.breaches.push(format!("{} holds were charged by more than one event", rows.charged_twice));
    }
    for k in &rows.keys {
        if k.charged != k.events || k.held != k.open_holds {
            audit.breaches.push(format!(
                "key {} cycle {}: charged {} held {} but events say {} and open holds {}",
                k.key,
                k.cycle_start.to_rfc3339(),
                k.charged,
                k.held,
                k.events,
                k.open_holds
            ));
        }
    }
    audit
}

/// The warning for a pool cycle whose events were charged above their holds.
fn overshoot_warning(p: &PoolSums) -> String {
    let (were, holds) = if p.overshot_events == 1 { ("event was", "its hold") } else { ("events were", "their holds") };
    format!(
        "account {} pool {} cycle {}: {} {were} charged {} above {holds} (overshoot)",
        p.account,
        p.pool,
        p.cycle_start.to_rfc3339(),
        p.overshot_events,
        p.overshoot.to_dollars()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(dollars: i64) -> Nanos {
        Nanos::from_usd(dollars)
    }

    fn pool() -> PoolSums {
        let n = usd;
        PoolSums {
            account: "acme".into(),
            pool: "programmatic".into(),
            cycle_start: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            policy: Some(PoolPolicy { on_exhausted: OnExhausted::Block, overage_cap: None, spend_cap: None }),
            grants: n(100),
            used: n(60),
            overage: n(0),
            held: n(30),
            events_grant: n(60),
            events_overage: n(0),
            through_holds: n(60),
            open_holds: n(30),
            grant_rows: n(100),
            overshoot: n(0),
            overshot_events: 0,
        }
    }

    #[test]
    fn a_consistent_ledger_has_no_breach() {
        let rows = AuditRows { pools: vec![pool()], events: 3, holds_open: 1, ..AuditRows::default() };
        let audit = judge(&rows);
        assert_eq!((audit.pools_checked, audit.events_checked, audit.holds_open), (1, 3, 1));
        assert!(audit.breaches.is_empty() && audit.warnings.is_empty(), "{audit:?}");
    }

    #[test]
    fn every_broken_invariant_is_named() {
        let broken = PoolSums {
            used: usd(61),
            overage: usd(1),
            held: usd(50),
            grant_rows: usd(90),
            overshoot: usd(7),
            overshot_events: 1,
            ..pool()
        };
        let key = KeySums {
            key: "k-1".into(),
            cycle_start: broken.cycle_start,
            charged: usd(5),
            held: usd(0),
            events: usd(4),
            open_holds: usd(0),
        };
        let rows = AuditRows { pools: vec![broken], keys: vec![key], charged_twice: 2, ..AuditRows::default() };
        let audit = judge(&rows);
        let all = audit.breaches.join("\n");
        for needle in [
            "used 61 != Σ events' grant part 60",
            "overage 1 != Σ events' overage part 0",
            "held 50 != Σ open holds 30",
            "grants 100 != Σ grant rows 90",
            "exceeds the block limit",
            "2 holds were charged by more than one event",
            "key k-1 cycle",
        ] {
            assert!(all.contains(needle), "{needle:?} missing from:\n{all}");
        }
        assert_eq!(audit.warnings.len(), 1);
        assert!(audit.warnings[0].contains("1 event was charged"), "{:?}", audit.warnings);
    }
}
