//! The metered proxy (SPEC section 4): what a call asks for, which pool pays, the hold for its
//! worst case, the upstream call, the usage it reports (JSON or SSE) and the settle.
//!
//! Architecture invariant: the wire formats of the upstream APIs live here and nowhere else;
//! the ledger's decisions come from `tollgate-core` and its writes go through `tollgate-store`.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod error;
mod id;
mod lease;
mod meter;
pub mod metrics;
mod outbound;
mod proxy;
mod retry;
mod state;
pub mod upstream;
pub mod wire;

pub use error::GatewayError;
pub use proxy::routes;
pub use state::{Gateway, LEASE_DEFAULT, PoolRule, Settings, UNBOUNDED_TOOL_ALLOWANCE_DEFAULT};

/// The clock, injected so tests control time.
pub type Clock = std::sync::Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>;

/// The monotonic clock lease timing reads (idle, extension, back-off), injected so tests
/// control it; [`monotonic`] is the system's.
pub type Monotonic = std::sync::Arc<dyn Fn() -> std::time::Instant + Send + Sync>;

/// The system's monotonic clock.
pub fn monotonic() -> Monotonic {
    std::sync::Arc::new(std::time::Instant::now)
}
pub use tollgate_core::price::SERVER_TOOL_MAX_USES_DEFAULT;
pub use upstream::{Auth, Kind, Upstream};
