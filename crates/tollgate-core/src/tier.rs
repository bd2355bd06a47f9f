//! Tiers: named plans with monthly grants per pool, an optional monthly price and the PAYG
//! multiplier for overage.

use crate::money::Nanos;
use crate::policy::PoolKind;

/// One part per million: the unit of multipliers (1.0 = 1_000_000).
pub const PPM: u64 = 1_000_000;

/// A plan: monthly grants per pool, an optional monthly price and the PAYG multiplier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    /// The tier's name, such as `pro`.
    pub id: String,
    /// The interactive pool's monthly grant.
    pub interactive: Nanos,
    /// The programmatic pool's monthly grant.
    pub programmatic: Nanos,
    /// What the plan costs per month, for tier advice. None: not configured.
    pub monthly_price: Option<Nanos>,
    /// Overage is charged at list price × this, in millionths.
    pub payg_multiplier_ppm: u64,
}

impl Tier {
    /// The monthly grant of `pool`.
    pub fn grant(&self, pool: PoolKind) -> Nanos {
        match pool {
            PoolKind::Interactive => self.interactive,
            PoolKind::Programmatic => self.programmatic,
        }
    }

    /// The plan table (SPEC section 1). `enterprise` grants are set per account.
    pub fn builtins() -> Vec<Tier> {
        let tier = |id: &str, interactive: i64, programmatic: i64| Tier {
            id: id.to_string(),
            interactive: Nanos::from_usd(interactive),
            programmatic: Nanos::from_usd(programmatic),
            monthly_price: None,
            payg_multiplier_ppm: PPM,
        };
        vec![tier("pro", 40, 20), tier("team-standard", 100, 50), tier("max-20x", 500, 200), tier("enterprise", 0, 0)]
    }
}
