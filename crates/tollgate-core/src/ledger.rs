//! The ledger's decisions: grant, hold, settle, void and expire, as pure functions of state read
//! beforehand. The storage backends read the state inside their atomic operation, call these, and
//! write what they return; that is what makes a hold atomic against the pool's limit.

use chrono::{DateTime, Utc};

use crate::money::Nanos;
use crate::tier::PPM;

/// A pool in one cycle, as read by the store before deciding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolScope {
    /// None: unlimited.
    pub limit: Option<Nanos>,
    /// Σ grants of the cycle.
    pub grants: Nanos,
    /// What the grants paid.
    pub used: Nanos,
    /// What went beyond the grants.
    pub overage: Nanos,
    /// Σ open holds.
    pub held: Nanos,
}

impl PoolScope {
    /// What the cycle charged: used grants plus overage, holds not included.
    pub fn charged(&self) -> Nanos {
        self.used.saturating_add(self.overage)
    }

    /// limit − charged − held; None when unlimited. Negative when direct events overran it.
    pub fn remaining(&self) -> Option<Nanos> {
        self.limit.map(|l| Nanos(l.0.saturating_sub(self.charged().0).saturating_sub(self.held.0)))
    }
}

/// A key's own monthly cap in one cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyScope {
    /// The key's monthly cap. None: no cap of its own.
    pub cap: Option<Nanos>,
    /// What the key's calls were charged this cycle.
    pub charged: Nanos,
    /// Σ the key's open holds.
    pub held: Nanos,
}

impl KeyScope {
    /// cap − charged − held; None when the key has no cap. Negative when direct events overran it.
    pub fn remaining(&self) -> Option<Nanos> {
        self.cap.map(|c| Nanos(c.0.saturating_sub(self.charged.0).saturating_sub(self.held.0)))
    }
}

/// Why a hold was refused. The order is the order of the checks; the codes are stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The amount is negative.
    AmountNegative,
    /// The pool cannot cover the amount.
    PoolExhausted {
        /// The pool's limit for the cycle.
        limit: Nanos,
        /// What the pool had left, never below zero.
        remaining: Nanos,
    },
    /// The key's own cap cannot cover the amount.
    KeyCapReached {
        /// The key's cap.
        cap: Nanos,
        /// What the key had left under it, never below zero.
        remaining: Nanos,
    },
    /// The figures overflow the ledger's integers.
    Overflow,
}

impl Refusal {
    /// The refusal's stable code, such as `pool_exhausted`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::AmountNegative => "amount_negative",
            Refusal::PoolExhausted { .. } => "pool_exhausted",
            Refusal::KeyCapReached { .. } => "key_cap_reached",
            Refusal::Overflow => "overflow",
        }
    }
}

/// What a refusal's sentence needs besides the refusal: whose call, what it asked for, and
/// which bound of the pool's policy sets its limit.
#[derive(Clone, Copy, Debug)]
pub struct RefusalContext<'a> {
    /// The account's id.
    pub account: &'a str,
    /// The pool the hold was asked of.
    pub pool: crate::PoolKind,
    /// The key's id, when the call came with one.
    pub key: Option<&'a str>,
    /// What the hold asked for.
    pub requested: Nanos,
    /// None when not known (the pool's policy could not be read).
    pub scope: Option<crate::LimitScope>,
    /// When the pool resets, as the caller prints times.
    pub resets: &'a str,
}

/// A refusal in words a person can act on: the scope that refused (the pool's grant, overage
/// cap or spend cap, or the key's own cap) and its figures.
pub fn refusal_message(refusal: &Refusal, c: &RefusalContext) -> String {
    let (pool, account, resets) = (c.pool, c.account, c.resets);
    let requested = c.requested.to_dollars();
    match refusal {
        Refusal::PoolExhausted { limit, remaining } => {
            let scope = match c.scope {
                Some(crate::LimitScope::Grant) => "limit (the cycle's grants)",
                Some(crate::LimitScope::OverageCap) => "limit (grants plus the overage cap)",
                Some(crate::LimitScope::SpendCap) => "spend cap",
                None => "limit",
            };
            format!(
                "{pool} credits of account {account} exhausted: {} left of the pool's {} {scope}, {requested} needed; resets {resets}",
                remaining.to_dollars(),
                limit.to_dollars()
            )
        }
        Refusal::KeyCapReached { cap, remaining } => format!(
            "key {} of account {account} reached its own cap: {} left of its {} cap, {requested} needed ({pool} pool not exhausted); resets {resets}",
            c.key.unwrap_or("?"),
            remaining.to_dollars(),
            cap.to_dollars()
        ),
        Refusal::AmountNegative => "the amount must not be negative".to_string(),
        Refusal::Overflow => "the amount is out of range".to_string(),
    }
}

/// The scope a refusal names, as a stable code: `grant`, `overage_cap`, `spend_cap` (the pool's
/// limit) or `key_cap`.
pub fn refusal_scope(refusal: &Refusal, scope: Option<crate::LimitScope>) -> Option<&'static str> {
    match refusal {
        Refusal::PoolExhausted { .. } => Some(scope.map_or("limit", crate::LimitScope::as_str)),
        Refusal::KeyCapReached { .. } => Some("key_cap"),
        _ => None,
    }
}

/// What an admitted hold does: the new held totals, and the pool's remaining after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldDecision {
    /// The pool's Σ open holds, this one included.
    pub pool_held: Nanos,
    /// The key's Σ open holds, this one included; None without a key.
    pub key_held: Option<Nanos>,
    /// The pool's remaining after this hold; None when unlimited.
    pub pool_remaining: Option<Nanos>,
}

/// A hold fits when it fits every scope that applies; it then debits all of them.
pub fn decide_hold(pool: &PoolScope, key: Option<&KeyScope>, amount: Nanos) -> Result<HoldDecision, Refusal> {
    if amount.is_negative() {
        return Err(Refusal::AmountNegative);
    }
    if let (Some(limit), Some(remaining)) = (pool.limit, pool.remaining())
        && amount > remaining
    {
        return Err(Refusal::PoolExhausted { limit, remaining: remaining.max(Nanos::ZERO) });
    }
    if let Some(k) = key
        && let (Some(cap), Some(remaining)) = (k.cap, k.remaining())
        && amount > remaining
    {
        return Err(Refusal::KeyCapReached { cap, remaining: remaining.max(Nanos::ZERO) });
    }
    let pool_held = pool.held.checked_add(amount).ok_or(Refusal::Overflow)?;
    let key_held = match key {
        Some(k) => Some(k.held.checked_add(amount).ok_or(Refusal::Overflow)?),
        None => None,
    };
    let pool_remaining = pool.remaining().map(|r| Nanos(r.0.saturating_sub(amount.0)));
    Ok(HoldDecision { pool_held, key_held, pool_remaining })
}

/// The amount to hold for a call whose worst case at list price is `list_worst_case`: overage
/// is charged at list × the PAYG multiplier, so a multiplier above 1 raises the hold (rounded up).
pub fn hold_amount(list_worst_case: Nanos, payg_multiplier_ppm: u64) -> Option<Nanos> {
    if payg_multiplier_ppm <= PPM {
        return Some(list_worst_case);
    }
    let n = i128::from(list_worst_case.0) * i128::from(payg_multiplier_ppm);
    let d = i128::from(PPM);
    i64::try_from((n + d - 1) / d).ok().map(Nanos)
}

/// How a charge divides between the cycle's grants and overage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// The part the cycle's grants pay, at list price.
    pub grant: Nanos,
    /// The part beyond the grants, at list × the PAYG multiplier.
    pub overage: Nanos,
}

impl Split {
    /// grant + overage: what the pool is charged.
    pub fn total(&self) -> Nanos {
        self.grant.saturating_add(self.overage)
    }
}

/// Splits a call's list-price cost: first what the grants still hold, then overage at list ×
/// the PAYG multiplier (rounded half-up).
pub fn split_charge(list_cost: Nanos, pool: &PoolScope, payg_multiplier_ppm: u64) -> Result<Split, Refusal> {
    if list_cost.is_negative() {
        return Err(Refusal::AmountNegative);
    }
    let grant_left = pool.grants.saturating_sub_floor(pool.used);
    let grant = list_cost.min(grant_left);
    let rest = list_cost.checked_sub(grant).ok_or(Refusal::Overflow)?;
    let overage = rest.mul_ratio_round(payg_multiplier_ppm, PPM).ok_or(Refusal::Overflow)?;
    Ok(Split { grant, overage })
}

/// What settling a hold does: the charge split, the hold released, and any overshoot (charge
/// above the hold), which is recorded and alerted on, never dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// How the charge divides between grants and overage.
    pub split: Split,
    /// The hold released: all of it, whatever the charge.
    pub released: Nanos,
    /// How far the charge exceeds the hold; zero when it fits.
    pub overshoot: Nanos,
}

/// Settles a hold of `hold` for a call whose list-price cost is `list_cost`: the charge split as
/// [`split_charge`] splits it, the whole hold released, and the charge above the hold as overshoot.
pub fn settle(
    hold: Nanos,
    list_cost: Nanos,
    pool: &PoolScope,
    payg_multiplier_ppm: u64,
) -> Result<Settlement, Refusal> {
    let split = split_charge(list_cost, pool, payg_multiplier_ppm)?;
    let overshoot = split.total().saturating_sub_floor(hold);
    Ok(Settlement { split, released: hold, overshoot })
}

/// A hold past its time to live is expired: settled at its held amount, flagged `unsettled`.
pub fn is_expired(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    now >= expires_at
}

/// The default `hold_ttl_s`: a hold's time to live when none is given, in seconds.
pub const HOLD_TTL_S_DEFAULT: u64 = 600;
/// The longest time to live a hold may have, in seconds.
pub const HOLD_TTL_S_MAX: u64 = 3_600;

/// One grant, for burn order: earliest-expiring first, then in the order they were added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantRef {
    /// When the grant expires.
    pub expires_at: DateTime<Utc>,
    /// The order grants were added in (lower: earlier).
    pub added_seq: i64,
    /// The grant's amount.
    pub amount: Nanos,
}

/// How much of each grant `used` consumed, in the burn order. Returns (index into `grants`,
/// consumed) pairs for every grant.
pub fn burn(grants: &[GrantRef], used: Nanos) -> Vec<(usize, Nanos)> {
    let mut order: Vec<usize> = (0..grants.len()).collect();
    order.sort_by_key(|&i| (grants[i].expires_at, grants[i].added_seq));
    let mut left = used.max(Nanos::ZERO);
    order
        .into_iter()
        .map(|i| {
            let take = left.min(grants[i].amount.max(Nanos::ZERO));
            left = left.saturating_sub_floor(take);
            (i, take)
        })
        .collect()
}

/// The outcome of repeating an idempotency id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay<T> {
    /// The id is new: do the operation.
    New,
    /// Same id, same content: return the first result.
    Same(T),
    /// Same id, different content: 409 conflict.
    Conflict,
}

/// Decides a repeated idempotency id: `existing` is the id's first fingerprint and result, if
/// any; `fingerprint` is the repeat's.
pub fn replay<F: PartialEq, T>(existing: Option<(F, T)>, fingerprint: &F) -> Replay<T> {
    match existing {
        None => Replay::New,
        Some((f, first)) if &f == fingerprint => Replay::Same(first),
        Some(_) => Replay::Conflict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(x: i64) -> Nanos {
        Nanos::from_usd(x)
    }

    #[test]
    fn hold_fits_every_scope_or_none() {
        let pool = PoolScope { limit: Some(usd(50)), grants: usd(50), used: usd(40), overage: usd(0), held: usd(5) };
        assert_eq!(decide_hold(&pool, None, usd(5)).unwrap().pool_remaining, Some(usd(0)));
        assert_eq!(
            decide_hold(&pool, None, Nanos(usd(5).0 + 1)),
            Err(Refusal::PoolExhausted { limit: usd(50), remaining: usd(5) })
        );
        let key = KeyScope { cap: Some(usd(3)), charged: usd(1), held: usd(1) };
        assert_eq!(
            decide_hold(&pool, Some(&key), usd(2)),
            Err(Refusal::KeyCapReached { cap: usd(3), remaining: usd(1) })
        );
        let unlimited = PoolScope { limit: None, ..pool };
        assert!(decide_hold(&unlimited, None, usd(1_000)).is_ok());
        assert_eq!(decide_hold(&pool, None, Nanos(-1)), Err(Refusal::AmountNegative));
    }

    #[test]
    fn split_burns_grants_then_overage_at_multiplier() {
        let pool = PoolScope { limit: None, grants: usd(50), used: usd(49), overage: usd(0), held: usd(0) };
        let s = split_charge(usd(3), &pool, 1_500_000).unwrap();
        assert_eq!(s, Split { grant: usd(1), overage: usd(3) });
        let over = PoolScope { used: usd(55), ..pool };
        assert_eq!(split_charge(usd(2), &over, PPM).unwrap(), Split { grant: usd(0), overage: usd(2) });
    }

    #[test]
    fn settle_records_overshoot() {
        let pool = PoolScope { limit: Some(usd(50)), grants: usd(50), ..PoolScope::default() };
        let s = settle(usd(1), usd(3), &pool, PPM).unwrap();
        assert_eq!(s.overshoot, usd(2));
        assert_eq!(settle(usd(3), usd(1), &pool, PPM).unwrap().overshoot, usd(0));
    }

    #[test]
    fn burn_order_is_earliest_expiry_then_added_order() {
        let t = |d: i64| DateTime::<Utc>::from_timestamp(d * 86_400, 0).unwrap();
        let grants = [
            GrantRef { expires_at: t(30), added_seq: 2, amount: usd(10) },
            GrantRef { expires_at: t(30), added_seq: 1, amount: usd(10) },
            GrantRef { expires_at: t(10), added_seq: 3, amount: usd(5) },
        ];
        assert_eq!(burn(&grants, usd(12)), vec![(2, usd(5)), (1, usd(7)), (0, usd(0))]);
    }

    #[test]
    fn replay_outcomes() {
        assert_eq!(replay::<u64, u8>(None, &1), Replay::New);
        assert_eq!(replay(Some((1u64, 'a')), &1), Replay::Same('a'));
        assert_eq!(replay(Some((1u64, 'a')), &2), Replay::Conflict);
    }

    #[test]
    fn refusals_name_the_scope_that_refused_and_its_figures() {
        let c = RefusalContext {
            account: "acme",
            pool: crate::PoolKind::Programmatic,
            key: Some("ci-bot"),
            requested: usd(500),
            scope: Some(crate::LimitScope::Grant),
            resets: "2026-12-01T00:00:00Z",
        };
        let pool = Refusal::PoolExhausted { limit: usd(50), remaining: Nanos(35_540_000_000) };
        assert_eq!(
            refusal_message(&pool, &c),
            "programmatic credits of account acme exhausted: $35.54 left of the pool's $50.00 limit (the cycle's grants), \
             $500.00 needed; resets 2026-12-01T00:00:00Z"
        );
        let spend = RefusalContext { scope: Some(crate::LimitScope::SpendCap), ..c };
        assert!(refusal_message(&pool, &spend).contains("of the pool's $50.00 spend cap"));
        let key = Refusal::KeyCapReached { cap: Nanos(10_000_000), remaining: Nanos(10_000_000) };
        let m = refusal_message(&key, &RefusalContext { requested: Nanos(300_000_000), ..c });
        assert_eq!(
            m,
            "key ci-bot of account acme reached its own cap: $0.01 left of its $0.01 cap, $0.30 needed \
             (programmatic pool not exhausted); resets 2026-12-01T00:00:00Z"
        );
        assert_eq!(refusal_scope(&key, None), Some("key_cap"));
        assert_eq!(refusal_scope(&pool, Some(crate::LimitScope::OverageCap)), Some("overage_cap"));
    }

    #[test]
    fn hold_amount_covers_payg_multiplier() {
        assert_eq!(hold_amount(Nanos(3), 1_500_000), Some(Nanos(5)));
        assert_eq!(hold_amount(Nanos(3), PPM), Some(Nanos(3)));
    }
}
