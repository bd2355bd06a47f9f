//! The gateway's state: its settings, the store and prices it uses, its caches of keys and pool
//! terms, its leases and metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderName;
use chrono::{DateTime, Utc};
use tollgate_core::price::{Allowances, SERVER_TOOL_MAX_USES_DEFAULT};
use tollgate_core::{Nanos, OnExhausted, PoolKind, PriceTable};
use tollgate_store::feed::Feed;
use tollgate_store::{Key, Store, StoreError, hash_secret};

use crate::error::GatewayError;
use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::upstream::{HttpClient, Upstream};
use crate::{Clock, Monotonic};

/// What the gateway is told by configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub upstreams: Vec<Upstream>,
    /// The pool of calls no rule classifies.
    pub default_pool: PoolKind,
    /// Price unknown models as this model; None: refuse them.
    pub unknown_model_as: Option<String>,
    pub hold_ttl_s: u64,
    /// The size of a lease (`lease.rs`); zero holds every call on its own.
    pub lease: Nanos,
    pub body_size_bytes_max: usize,
    /// "Make the call fit" never lowers `max_tokens` below this.
    pub min_output_tokens: u64,
    /// Time allowed until the upstream's response headers arrive (then 504), and the longest
    /// silence of an upstream's body (capped at half `hold_ttl_s`, [`Settings::upstream_idle`]),
    /// after which it ends as a cut.
    pub upstream_timeout: Duration,
    /// Input allowances for what a request body does not bound (per server-tool use, per
    /// document or image by URL or file id); its `unbounded_tools` is set per call from
    /// `unbounded_tool_allowance`.
    pub allowances: Allowances,
    /// The `max_uses` given to web search and web fetch tools that have none, so their cost is
    /// bounded.
    pub server_tool_max_uses: u64,
    /// Held once for a call with tools the gateway cannot bound (the MCP connector, code
    /// execution, container uploads). None: such calls are refused on `block` pools and held at
    /// [`UNBOUNDED_TOOL_ALLOWANCE_DEFAULT`] on `payg` and `alert` pools.
    pub unbounded_tool_allowance: Option<Nanos>,
    /// How long a key or a pool's policy and multiplier are trusted before they are read again.
    pub cache_ttl: Duration,
    /// Configured pool rules on headers, in order.
    pub rules: Vec<PoolRule>,
    /// Send Claude Code's warning headers once a pool passes 75 % of its limit.
    pub claude_code_warnings: bool,
    /// SHA-256 (hex) of the token `GET /metrics` requires as `Authorization: Bearer`; None: open.
    pub metrics_token_digest: Option<String>,
}

/// A configured pool rule: calls whose `header` matches the glob `value` go to `pool`.
#[derive(Clone, Debug)]
pub struct PoolRule {
    pub name: String,
    pub header: HeaderName,
    pub value: String,
    pub pool: PoolKind,
}

/// The default lease: $1, so calls whose worst case is a few cents skip the disk write of their
/// own hold, while Claude Code's large `max_tokens` calls are held one by one.
pub const LEASE_DEFAULT: Nanos = Nanos(1_000_000_000);

/// What a call with tools the gateway cannot bound is held with on a `payg` or `alert` pool when
/// no allowance is configured: $1.
pub const UNBOUNDED_TOOL_ALLOWANCE_DEFAULT: Nanos = Nanos(1_000_000_000);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            upstreams: Vec::new(),
            default_pool: PoolKind::Programmatic,
            unknown_model_as: None,
            hold_ttl_s: tollgate_core::ledger::HOLD_TTL_S_DEFAULT,
            lease: LEASE_DEFAULT,
            body_size_bytes_max: 32 * 1024 * 1024,
            min_output_tokens: 1_024,
            upstream_timeout: Duration::from_secs(600),
            allowances: Allowances::default(),
            server_tool_max_uses: SERVER_TOOL_MAX_USES_DEFAULT,
            unbounded_tool_allowance: None,
            cache_ttl: Duration::from_secs(5),
            rules: Vec::new(),
            claude_code_warnings: false,
            metrics_token_digest: None,
        }
    }
}

impl Settings {
    /// The longest an upstream's body may send nothing before it ends as a cut:
    /// `upstream_timeout`, and at most half `hold_ttl_s`: a running stream's hold lives more
    /// than that past its last frame (the meter extends it past half its time to live), so a
    /// silent call ends, and is settled, by the time its hold could first expire (to within the
    /// moment between that frame and the gateway's next wait).
    pub fn upstream_idle(&self) -> Duration {
        self.upstream_timeout.min(Duration::from_millis(self.hold_ttl_s.saturating_mul(500)))
    }
}

/// How long a stopping gateway waits for its calls to end: a call whose client left may be read
/// on for up to 10 s (the meter's `READ_ON_MAX`), then settled.
const CALLS_CLOSE_WAIT: Duration = Duration::from_secs(15);

pub struct Gateway {
    pub store: Arc<dyn Store>,
    pub prices: Arc<PriceTable>,
    pub clock: Clock,
    pub settings: Settings,
    pub metrics: Metrics,
    /// Where settled and refused calls are tallied for the live stream.
    pub feed: Arc<Feed>,
    pub(crate) leases: Arc<Leases>,
    /// One clone per call held and not yet settled or voided (in `meter::Finish`):
    /// [`Gateway::close`] waits for them, so a call served before a shutdown is not left open
    /// for the next run to settle at its held amount.
    pub(crate) calls_open: Arc<()>,
    pub(crate) client: HttpClient,
    keys: Mutex<HashMap<String, (Key, Instant)>>,
    pool_terms: Mutex<HashMap<(String, PoolKind), (PoolTerms, Instant)>>,
}

impl Gateway {
    pub fn new(store: Arc<dyn Store>, prices: Arc<PriceTable>, clock: Clock, settings: Settings) -> Gateway {
        Gateway::with_clocks(store, prices, (clock, crate::monotonic()), settings)
    }

    /// A gateway whose lease timing reads `clocks.1` (the wall clock, `clocks.0`, dates the
    /// ledger's writes).
    pub fn with_clocks(
        store: Arc<dyn Store>,
        prices: Arc<PriceTable>,
        clocks: (Clock, Monotonic),
        settings: Settings,
    ) -> Gateway {
        let (clock, monotonic) = clocks;
        let metrics = Metrics::default();
        let leases = Arc::new(Leases::new(
            store.clone(),
            (clock.clone(), monotonic),
            metrics.clone(),
            settings.lease,
            settings.hold_ttl_s,
        ));
        Gateway {
            store,
            prices,
            clock,
            client: crate::upstream::http_client(Duration::from_secs(10)),
            settings,
            metrics,
            feed: Arc::default(),
            leases,
            calls_open: Arc::new(()),
            keys: Mutex::default(),
            pool_terms: Mutex::default(),
        }
    }

    /// How many leases this gateway has open, ready for calls.
    pub fn leases_open(&self) -> usize {
        self.leases.book.open()
    }

    /// Voids the leases no call is using; call it when the gateway stops.
    pub async fn close(&self) {
        self.wait_for_calls().await;
        self.leases.close().await;
    }

    /// Waits, up to [`CALLS_CLOSE_WAIT`], until every call held is settled or voided; `close`
    /// runs it after the last client connection ended. A call still open after that is left for
    /// the next run to settle.
    async fn wait_for_calls(&self) {
        let deadline = Instant::now() + CALLS_CLOSE_WAIT;
        while Arc::strong_count(&self.calls_open) > 1 {
            if Instant::now() >= deadline {
                tracing::warn!(calls = Arc::strong_count(&self.calls_open) - 1, "stopping with calls not yet settled");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shares the server's live feed instead of a private one.
    pub fn with_feed(mut self, feed: Arc<Feed>) -> Gateway {
        self.feed = feed;
        self
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// The key of a secret, from a short-lived cache (a revocation takes effect within `cache_ttl`).
    #[allow(clippy::expect_used, reason = "never poisoned: the key cache is only locked to get-and-clone or insert")]
    pub(crate) async fn key(&self, secret: &str) -> Result<Key, GatewayError> {
        let digest = hash_secret(secret);
        let cached = self
            .keys
            .lock()
            .expect("key cache")
            .get(&digest)
            .filter(|(_, at)| at.elapsed() < self.settings.cache_ttl)
            .map(|(k, _)| k.clone());
        let key = match cached {
            Some(k) => k,
            None => {
                let key = self.store.key_by_hash(&digest).await.map_err(internal)?.ok_or_else(|| {
                    GatewayError::Unauthenticated("unknown tollgate key: send a key made with `tollgate key create` in x-api-key or Authorization: Bearer".into())
                })?;
                self.keys.lock().expect("key cache").insert(digest, (key.clone(), Instant::now()));
                key
            }
        };
        if key.revoked_at.is_some() {
            return Err(GatewayError::Unauthenticated(format!("tollgate key {} is revoked", key.id)));
        }
        Ok(key)
    }

    /// What a call's hold depends on in its pool: the policy's `on_exhausted`, and the multiplier
    /// the hold is raised by — the PAYG multiplier of the account's tier (overage is charged at
    /// list × it) when the policy allows overage, else 1 (a `block` pool never goes past its
    /// grants, so its calls are charged at list price).
    #[allow(clippy::expect_used, reason = "never poisoned: the pool terms cache is only locked to read or insert")]
    pub(crate) async fn pool_terms(&self, account: &str, pool: PoolKind) -> Result<PoolTerms, GatewayError> {
        let cache_key = (account.to_string(), pool);
        if let Some((t, at)) = self.pool_terms.lock().expect("pool terms cache").get(&cache_key)
            && at.elapsed() < self.settings.cache_ttl
        {
            return Ok(*t);
        }
        let a = self
            .store
            .account(account)
            .await
            .map_err(internal)?
            .ok_or_else(|| internal(StoreError::NotFound(account.into())))?;
        let policy = self.store.policy(account, pool).await.map_err(internal)?;
        let multiplier_ppm = if policy.allows_overage() {
            let tier = self.store.tiers().await.map_err(internal)?.into_iter().find(|t| t.id == a.tier);
            tier.map(|t| t.payg_multiplier_ppm).unwrap_or(tollgate_core::tier::PPM)
        } else {
            tollgate_core::tier::PPM
        };
        let terms = PoolTerms { on_exhausted: policy.on_exhausted, multiplier_ppm };
        self.pool_terms.lock().expect("pool terms cache").insert(cache_key, (terms, Instant::now()));
        Ok(terms)
    }
}

/// A pool's policy as far as a call's hold needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolTerms {
    pub(crate) on_exhausted: OnExhausted,
    pub(crate) multiplier_ppm: u64,
}

pub(crate) fn internal(e: StoreError) -> GatewayError {
    if let StoreError::Unavailable(m) = e {
        tracing::warn!(error = %m, "the store is unavailable during a gateway call");
        return GatewayError::Unavailable(
            "tollgate's ledger is unavailable for now; the call was not forwarded and nothing was charged: retry in a moment"
                .into(),
        );
    }
    tracing::error!(error = %e, "store failed during a gateway call");
    GatewayError::Internal("tollgate could not reach its ledger; the call was not forwarded".into())
}
