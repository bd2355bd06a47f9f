//! Pools and their policies: what happens when a pool is exhausted, and the pool's limit.

use std::fmt;

use crate::money::Nanos;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolKind {
    Interactive,
    Programmatic,
}

impl PoolKind {
    pub const ALL: [PoolKind; 2] = [PoolKind::Interactive, PoolKind::Programmatic];

    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Interactive => "interactive",
            PoolKind::Programmatic => "programmatic",
        }
    }

    pub fn parse(s: &str) -> Option<PoolKind> {
        match s {
            "interactive" => Some(PoolKind::Interactive),
            "programmatic" => Some(PoolKind::Programmatic),
            _ => None,
        }
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OnExhausted {
    /// Hard cap: refuse a call the pool cannot cover.
    #[default]
    Block,
    /// Continue at pay-as-you-go rates up to `overage_cap`.
    Payg,
    /// Never refuse; only alert.
    Alert,
}

impl OnExhausted {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExhausted::Block => "block",
            OnExhausted::Payg => "payg",
            OnExhausted::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<OnExhausted> {
        match s {
            "block" => Some(OnExhausted::Block),
            "payg" => Some(OnExhausted::Payg),
            "alert" => Some(OnExhausted::Alert),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolPolicy {
    pub on_exhausted: OnExhausted,
    /// Most overage a `payg` pool may run up in a cycle. None: no overage cap.
    pub overage_cap: Option<Nanos>,
    /// Most a pool may spend in a cycle, grants and overage together. None: no spend cap.
    pub spend_cap: Option<Nanos>,
}

impl PoolPolicy {
    /// The pool's limit for a cycle whose grants total `grants` (SPEC section 1). None: unlimited.
    pub fn limit(&self, grants: Nanos) -> Option<Nanos> {
        let by_policy = match self.on_exhausted {
            OnExhausted::Block => Some(grants),
            OnExhausted::Payg => self.overage_cap.map(|cap| grants.saturating_add(cap)),
            OnExhausted::Alert => None,
        };
        match (by_policy, self.spend_cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_spec_table() {
        let g = Nanos::from_usd(50);
        let p = |on_exhausted, overage_cap: Option<i64>, spend_cap: Option<i64>| PoolPolicy {
            on_exhausted,
            overage_cap: overage_cap.map(Nanos::from_usd),
            spend_cap: spend_cap.map(Nanos::from_usd),
        };
        assert_eq!(p(OnExhausted::Block, None, None).limit(g), Some(Nanos::from_usd(50)));
        assert_eq!(p(OnExhausted::Block, None, Some(30)).limit(g), Some(Nanos::from_usd(30)));
        assert_eq!(p(OnExhausted::Block, None, Some(80)).limit(g), Some(Nanos::from_usd(50)));
        assert_eq!(p(OnExhausted::Payg, None, None).limit(g), None);
        assert_eq!(p(OnExhausted::Payg, Some(20), None).limit(g), Some(Nanos::from_usd(70)));
        assert_eq!(p(OnExhausted::Payg, Some(20), Some(60)).limit(g), Some(Nanos::from_usd(60)));
        assert_eq!(p(OnExhausted::Payg, None, Some(60)).limit(g), Some(Nanos::from_usd(60)));
        assert_eq!(p(OnExhausted::Alert, Some(20), None).limit(g), None);
        assert_eq!(p(OnExhausted::Alert, None, Some(10)).limit(g), Some(Nanos::from_usd(10)));
    }
}
