//! The pure domain of tollgate: money, prices, cycles, tiers, pool policies and ledger decisions.
//!
//! Architecture invariant: this crate does no I/O, reads no clock, spawns nothing and knows no wire
//! format (no serde). Every function is a deterministic function of its arguments, so the storage
//! backends and the simulation tests can call it under their own locks and clocks.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)
#![warn(missing_docs)] // every public item says what it is (CI denies warnings)

pub mod alert;
pub mod classify;
pub mod cycle;
pub mod ledger;
pub mod money;
pub mod plan;
pub mod policy;
pub mod price;
mod price_builtin;
pub mod tier;
pub mod usage;

pub use cycle::{Cycle, CycleAnchor};
pub use ledger::{HoldDecision, KeyScope, PoolScope, Refusal, Replay, Split};
pub use money::{MoneyError, Nanos};
pub use policy::{LimitScope, OnExhausted, PoolKind, PoolPolicy};
pub use price::{Modifiers, PriceEntry, PriceTable, Provider, Rates, RequestBound};
pub use tier::Tier;
pub use usage::{Usage, UsageError};
