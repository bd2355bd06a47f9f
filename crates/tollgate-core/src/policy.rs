//! Pools and their policies: what happens when a pool is exhausted, and the pool's limit.

use std::fmt;

use crate::money::Nanos;

/// One of an account's two credit pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolKind {
    /// Interactive use: a person at a client (Claude Code's CLI, IDE or desktop app).
    Interactive,
    /// Programmatic use: SDKs, agents, CI and apps built on the API.
    Programmatic,
}

impl PoolKind {
    /// Both pools, interactive first.
    pub const ALL: [PoolKind; 2] = [PoolKind::Interactive, PoolKind::Programmatic];

    /// The pool's name: `interactive` or `programmatic`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Interactive => "interactive",
            PoolKind::Programmatic => "programmatic",
        }
    }

    /// The pool named `s` as [`PoolKind::as_str`] writes it; None for any other text.
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

/// What a pool does with a call beyond its grants.
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
    /// The policy's name: `block`, `payg` or `alert`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnExhausted::Block => "block",
            OnExhausted::Payg => "payg",
            OnExhausted::Alert => "alert",
        }
    }

    /// The policy named `s` as [`OnExhausted::as_str`] writes it; None for any other text.
    pub fn parse(s: &str) -> Option<OnExhausted> {
        match s {
            "block" => Some(OnExhausted::Block),
            "payg" => Some(OnExhausted::Payg),
            "alert" => Some(OnExhausted::Alert),
            _ => None,
        }
    }
}

/// A pool's policy: what it does beyond its grants, and its caps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolPolicy {
    /// What the pool does with a call beyond its grants.
    pub on_exhausted: OnExhausted,
    /// Most overage a `payg` pool may run up in a cycle. None: no overage cap.
    pub overage_cap: Option<Nanos>,
    /// Most a pool may spend in a cycle, grants and overage together. None: no spend cap.
    pub spend_cap: Option<Nanos>,
}

/// Which bound of a pool's policy sets its limit, to name it in a refusal or an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitScope {
    /// `block`: the cycle's grants.
    Grant,
    /// `payg`: the grants plus the overage cap.
    OverageCap,
    /// The spend cap, lower than what the policy alone allows.
    SpendCap,
}

impl LimitScope {
    /// The scope's stable code: `grant`, `overage_cap` or `spend_cap`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Grant => "grant",
            LimitScope::OverageCap => "overage_cap",
            LimitScope::SpendCap => "spend_cap",
        }
    }
}

impl PoolPolicy {
    /// The pool's limit for a cycle whose grants total `grants` (SPEC section 1). None: unlimited.
    pub fn limit(&self, grants: Nanos) -> Option<Nanos> {
        self.limit_scope(grants).map(|(limit, _)| limit)
    }

    /// The pool's limit and the bound that sets it (the spend cap when it is the lower).
    pub fn limit_scope(&self, grants: Nanos) -> Option<(Nanos, LimitScope)> {
        let by_policy = match self.on_exhausted {
            OnExhausted::Block => Some((grants, LimitScope::Grant)),
            OnExhausted::Payg => self.overage_cap.map(|cap| (grants.saturating_add(cap), LimitScope::OverageCap)),
            OnExhausted::Alert => None,
        };
        let by_cap = self.spend_cap.map(|cap| (cap, LimitScope::SpendCap));
        match (by_policy, by_cap) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Whether a charge can go beyond the grants (and so be priced at the PAYG multiplier): never
    /// under `block`, whose limit is at most the grants.
    pub fn allows_overage(&self) -> bool {
        self.on_exhausted != OnExhausted::Block
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

    #[test]
    fn limit_scope_names_the_bound_that_sets_the_limit() {
        let g = Nanos::from_usd(50);
        let p = |on_exhausted, overage_cap: Option<i64>, spend_cap: Option<i64>| PoolPolicy {
            on_exhausted,
            overage_cap: overage_cap.map(Nanos::from_usd),
            spend_cap: spend_cap.map(Nanos::from_usd),
        };
        let scope = |p: PoolPolicy| p.limit_scope(g).map(|(_, s)| s);
        assert_eq!(scope(p(OnExhausted::Block, None, None)), Some(LimitScope::Grant));
        assert_eq!(scope(p(OnExhausted::Block, None, Some(30))), Some(LimitScope::SpendCap));
        assert_eq!(scope(p(OnExhausted::Block, None, Some(80))), Some(LimitScope::Grant));
        assert_eq!(scope(p(OnExhausted::Payg, Some(20), None)), Some(LimitScope::OverageCap));
        assert_eq!(scope(p(OnExhausted::Payg, Some(20), Some(60))), Some(LimitScope::SpendCap));
        assert_eq!(scope(p(OnExhausted::Payg, None, None)), None);
        assert_eq!(scope(p(OnExhausted::Alert, None, Some(10))), Some(LimitScope::SpendCap));
        assert!(!p(OnExhausted::Block, None, None).allows_overage());
        assert!(p(OnExhausted::Payg, None, None).allows_overage());
    }
}
