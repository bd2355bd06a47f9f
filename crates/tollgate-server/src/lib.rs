//! tollgate's HTTP surface: the management API under `/api/v1` (SPEC section 5), health probes,
//! the OpenAPI document, caller authentication, and the background sweeper of expired holds.
//!
//! Architecture invariant: handlers translate between JSON and the store's records and decide
//! nothing about money themselves: prices come from `tollgate-core`, ledger decisions happen in
//! the store. The router is built by [`router`] so tests drive it without a socket.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

pub mod alerts;
mod api;
mod auth;
pub mod dto;
mod error;
mod json;
mod listen;
pub mod report;
mod run;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tollgate_config::UnknownModel;
use tollgate_core::PriceTable;
use tollgate_store::Store;

pub use api::{EventRules, router, validate_events};
pub use auth::{AdminToken, Caller, hash_secret};
pub use error::ApiError;
pub use run::{ADMIN_TOKEN_FILE, ServeOptions, serve};

/// The clock, injected so tests control time.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub prices: Arc<PriceTable>,
    pub unknown_model: UnknownModel,
    pub admin: AdminToken,
    pub clock: Clock,
    /// Default time to live of holds made through the API.
    pub hold_ttl_s: u64,
    pub api_body_size_bytes_max: usize,
    /// The live feed behind `GET /api/v1/stream`, shared with the gateway.
    pub feed: Arc<tollgate_store::feed::Feed>,
    /// The alert engine, for rule checks and test deliveries; None where alerts do not run.
    pub alerter: Option<Arc<alerts::engine::Alerter>>,
}

impl AppState {
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }
}
