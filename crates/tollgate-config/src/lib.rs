//! Configuration: `tollgate.toml` (SPEC section 11) with `TOLLGATE_*` environment overrides,
//! parsed and validated into typed settings, and the price files (TOML entries and LiteLLM's
//! `model_prices_and_context_window.json`) merged into one price table.
//!
//! Architecture invariant: argument parsing is not here (the binary does it), and nothing here
//! starts anything. Secrets are never read from the file: only the names of the environment
//! variables that hold them.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod litellm;
mod usd;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::Deserialize;
use tollgate_core::price::{PriceEntry, PriceTable, Provider, Rates};
use tollgate_core::tier::PPM;
use tollgate_core::{Nanos, Tier};

pub use litellm::read_litellm;
pub use usd::{UsdInput, parse_multiplier_ppm};

/// A configuration error, with what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub upstream: Vec<UpstreamSection>,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub pool_rule: Vec<PoolRuleSection>,
    #[serde(default)]
    pub tier: Vec<TierSection>,
    #[serde(default)]
    pub price: Vec<PriceSection>,
    #[serde(default)]
    pub pricing: PricingSection,
    #[serde(default)]
    pub channel: Vec<ChannelSection>,
    #[serde(default)]
    pub alert: Vec<AlertSection>,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    pub admin_token_env: String,
    /// Largest management API request body.
    pub api_body_size_bytes_max: usize,
    /// Default time to live of holds made through the API.
    pub hold_ttl_s: u64,
    /// How often the sweeper looks for expired holds.
    pub sweep_interval_s: u64,
    /// Most client connections open at once; unset: from the open-file limit (docs/gateway.md,
    /// "Connections").
    pub connections_max: Option<usize>,
    /// Time a connection has to send a request's head; it also bounds how long a kept-alive
    /// connection waits for its next request.
    pub header_read_timeout_s: u64,
    /// Time a request has to send its whole body, counted from its head.
    pub body_read_timeout_s: u64,
    /// Longest time a client may take none of a response's bytes before its connection is
    /// closed; at most a quarter of `hold_ttl_s`, so a call whose client stopped reading is settled
    /// (reading on for at most half of it) before its hold expires.
    pub response_stall_timeout_s: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8787".into(),
            admin_token_env: "TOLLGATE_ADMIN_TOKEN".into(),
            api_body_size_bytes_max: 4 * 1024 * 1024,
            hold_ttl_s: tollgate_core::ledger::HOLD_TTL_S_DEFAULT,
            sweep_interval_s: 5,
            connections_max: None,
            header_read_timeout_s: 10,
            body_read_timeout_s: 60,
            response_stall_timeout_s: 30,
        }
    }
}

/// The gateway's own settings (docs/gateway.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// The pool of calls no rule classifies.
    pub default_pool: String,
    /// "Make the call fit" never lowers `max_tokens` below this.
    pub min_output_tokens: u64,
    /// Largest gateway request body.
    pub body_size_bytes_max: usize,
    /// Time allowed for the upstream's response headers, and the longest silence of an
    /// upstream's body (at most half `hold_ttl_s`) before it ends as a cut.
    pub upstream_timeout_s: u64,
    /// Send Claude Code's own warning headers once a pool passes 75 %.
    pub claude_code_warnings: bool,
    /// The budget held at once for a key's small calls, so each does not wait for a disk write
    /// of its own (docs/gateway.md, "Leases"); "0" holds every call on its own. Unset: "1".
    pub lease_usd: Option<UsdInput>,
    /// The `max_uses` given to web search and web fetch tools that have none (at least 1).
    pub server_tool_max_uses: u64,
    /// Input tokens held per server-tool use (web search results, a fetched page).
    pub input_tokens_per_tool_use: u64,
    /// Input tokens held per document or image given by URL or file id.
    pub input_tokens_per_unbounded_input: u64,
    /// Held once for a call with tools the gateway cannot bound (the MCP connector, code
    /// execution, container uploads). Unset: such calls are refused on `block` pools, and held
    /// at $1 on `payg` and `alert` pools (docs/gateway.md).
    pub unbounded_tool_allowance_usd: Option<UsdInput>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            default_pool: "programmatic".into(),
            min_output_tokens: 1_024,
            body_size_bytes_max: 32 * 1024 * 1024,
            upstream_timeout_s: 600,
            claude_code_warnings: false,
            lease_usd: None,
            server_tool_max_uses: tollgate_core::price::SERVER_TOOL_MAX_USES_DEFAULT,
            input_tokens_per_tool_use: tollgate_core::price::Allowances::default().input_tokens_per_tool_use,
            input_tokens_per_unbounded_input: tollgate_core::price::Allowances::default()
                .input_tokens_per_unbounded_input,
            unbounded_tool_allowance_usd: None,
        }
    }
}

/// A configured pool rule on a request header; the first matching rule wins, after the key's
/// fixed pool and `x-tollgate-pool`, before the built-in User-Agent rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRuleSection {
    pub name: String,
    /// The header to look at (case-insensitive).
    pub header: String,
    /// Glob on the header's value (`*` = any run of characters); default: the header is present.
    #[serde(default = "any_value")]
    pub value: String,
    pub pool: String,
}

fn any_value() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub url: String,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { url: "sqlite://tollgate.db".into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_auth")]
    pub auth: String,
}

fn default_auth() -> String {
    "gateway".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    pub id: String,
    pub interactive_usd: Option<UsdInput>,
    pub programmatic_usd: Option<UsdInput>,
    pub monthly_price_usd: Option<UsdInput>,
    pub payg_multiplier: Option<UsdInput>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSection {
    pub model: String,
    #[serde(default)]
    pub provider: Option<String>,
    pub effective_from: Option<NaiveDate>,
    pub input_usd_per_mtok: UsdInput,
    pub output_usd_per_mtok: UsdInput,
    pub cache_write_5m_usd_per_mtok: Option<UsdInput>,
    pub cache_write_1h_usd_per_mtok: Option<UsdInput>,
    pub cache_read_usd_per_mtok: Option<UsdInput>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingSection {
    /// `reject`, or `as:<model>` to price unknown models like a known one.
    pub unknown_model: String,
    /// A LiteLLM `model_prices_and_context_window.json` to read Anthropic and OpenAI prices from.
    pub litellm_file: Option<PathBuf>,
    /// The date from which the LiteLLM prices apply; absent, they replace every version.
    pub litellm_effective_from: Option<NaiveDate>,
}

impl Default for PricingSection {
    fn default() -> Self {
        PricingSection { unknown_model: "reject".into(), litellm_file: None, litellm_effective_from: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSection {
    pub name: String,
    pub kind: String,
    pub url: Option<String>,
    pub secret_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSection {
    pub kind: String,
    #[serde(default = "star")]
    pub account: String,
    #[serde(default = "star")]
    pub pool: String,
    pub percent: Option<Vec<i64>>,
    #[serde(default)]
    pub channels: Vec<String>,
    pub window_s: Option<u64>,
    pub factor: Option<UsdInput>,
    pub floor_usd: Option<UsdInput>,
    pub days: Option<u64>,
}

fn star() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: "text".into() }
    }
}

/// How unknown models are handled at pricing time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownModel {
    Reject,
    PriceAs(String),
}

/// Where the ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, ConfigError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(err("store url \"sqlite://\" names no file: write sqlite://tollgate.db"));
            }
            Ok(StoreUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.to_string()))
        } else if url.contains("://") {
            Err(err(format!("store url {url:?}: use sqlite://PATH or postgres://USER@HOST/DB")))
        } else {
            Ok(StoreUrl::Sqlite(PathBuf::from(url)))
        }
    }
}

/// The validated settings tollgate runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub file: File,
    pub listen: String,
    pub store: StoreUrl,
    pub tiers: Vec<Tier>,
    pub prices: PriceTable,
    pub unknown_model: UnknownModel,
}

/// The environment as a function, so tests pass their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Settings {
    /// Reads `path` (or built-in defaults when None), applies environment overrides, validates.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Settings, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
                parse_file(&text).map_err(|e| err(format!("{}: {}", p.display(), e.0)))?
            }
            None => File::default(),
        };
        Settings::from_file(file, path.and_then(Path::parent), env)
    }

    pub fn from_file(file: File, base_dir: Option<&Path>, env: &dyn Env) -> Result<Settings, ConfigError> {
        let listen = env.var("TOLLGATE_LISTEN").unwrap_or_else(|| file.server.listen.clone());
        listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| err(format!("server.listen {listen:?} is not an address such as 127.0.0.1:8787")))?;
        let store = StoreUrl::parse(&env.var("TOLLGATE_DB").unwrap_or_else(|| file.store.url.clone()))?;
        if file.server.hold_ttl_s == 0 || file.server.hold_ttl_s > tollgate_core::ledger::HOLD_TTL_S_MAX {
            return Err(err(format!(
                "server.hold_ttl_s = {} must be between 1 and {}",
                file.server.hold_ttl_s,
                tollgate_core::ledger::HOLD_TTL_S_MAX
            )));
        }
        validate_connections(&file.server)?;
        validate_upstreams(&file.upstream)?;
        validate_gateway(&file)?;
        let tiers = tiers(&file.tier)?;
        let prices = prices(&file, base_dir)?;
        let unknown_model = match file.pricing.unknown_model.as_str() {
            "reject" => UnknownModel::Reject,
            other => match other.strip_prefix("as:") {
                Some(m) if prices.resolve(m).is_some() => UnknownModel::PriceAs(m.to_string()),
                Some(m) => return Err(err(format!("pricing.unknown_model = {other:?}: model {m:?} has no price"))),
                None => {
                    return Err(err(format!("pricing.unknown_model = {other:?}: use \"reject\" or \"as:<model>\"")));
                }
            },
        };
        validate_alerts(&file)?;
        if !matches!(file.log.format.as_str(), "text" | "json") {
            return Err(err(format!("log.format = {:?}: use \"text\" or \"json\"", file.log.format)));
        }
        Ok(Settings { listen, store, tiers, prices, unknown_model, file })
    }
}

fn validate_connections(server: &ServerSection) -> Result<(), ConfigError> {
    if server.connections_max == Some(0) {
        return Err(err("server.connections_max = 0 would refuse every client: leave it unset or give at least 1"));
    }
    for (name, value) in [
        ("header_read_timeout_s", server.header_read_timeout_s),
        ("body_read_timeout_s", server.body_read_timeout_s),
        ("response_stall_timeout_s", server.response_stall_timeout_s),
    ] {
        if value == 0 || value > 3600 {
            return Err(err(format!("server.{name} = {value} must be between 1 and 3600")));
        }
    }
    Ok(())
}

pub fn parse_file(text: &str) -> Result<File, ConfigError> {
    toml::from_str(text).map_err(|e| err(e.to_string()))
}

fn validate_gateway(file: &File) -> Result<(), ConfigError> {
    let g = &file.gateway;
    if tollgate_core::PoolKind::parse(&g.default_pool).is_none() {
        return Err(err(format!("gateway.default_pool = {:?}: use interactive or programmatic", g.default_pool)));
    }
    if g.body_size_bytes_max == 0 {
        return Err(err("gateway.body_size_bytes_max must be at least 1"));
    }
    if g.upstream_timeout_s == 0 {
        return Err(err("gateway.upstream_timeout_s must be at least 1"));
    }
    if g.server_tool_max_uses == 0 {
        return Err(err(
            "gateway.server_tool_max_uses must be at least 1 (the uses given to a server tool without max_uses)",
        ));
    }
    if let Some(usd) = &g.unbounded_tool_allowance_usd {
        match usd.nanos() {
            Ok(n) if n.0 >= 0 => {}
            _ => {
                return Err(err(format!(
                    "gateway.unbounded_tool_allowance_usd: {:?} is not an amount of USD ≥ 0, such as \"2\"",
                    usd.text()
                )));
            }
        }
    }
    let mut names = BTreeSet::new();
    for r in &file.pool_rule {
        if !names.insert(&r.name) {
            return Err(err(format!("pool_rule {:?} is defined twice", r.name)));
        }
        if tollgate_core::PoolKind::parse(&r.pool).is_none() {
            return Err(err(format!("pool_rule {:?}: pool {:?} must be interactive or programmatic", r.name, r.pool)));
        }
        if r.header.is_empty() || !r.header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(err(format!("pool_rule {:?}: header {:?} is not a header name", r.name, r.header)));
        }
    }
    Ok(())
}

fn validate_upstreams(upstreams: &[UpstreamSection]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for u in upstreams {
        if !names.insert(&u.name) {
            return Err(err(format!("upstream {:?} is defined twice", u.name)));
        }
        if !matches!(u.kind.as_str(), "anthropic" | "openai") {
            return Err(err(format!("upstream {:?}: kind {:?} must be anthropic or openai", u.name, u.kind)));
        }
        if !matches!(u.auth.as_str(), "gateway" | "passthrough") {
            return Err(err(format!("upstream {:?}: auth {:?} must be gateway or passthrough", u.name, u.auth)));
        }
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(err(format!(
                "upstream {:?}: base_url {:?} must start with http:// or https://",
                u.name, u.base_url
            )));
        }
    }
    Ok(())
}

fn tiers(sections: &[TierSection]) -> Result<Vec<Tier>, ConfigError> {
    let builtins = Tier::builtins();
    let mut out = Vec::new();
    for s in sections {
        if s.id.is_empty() {
            return Err(err("a [[tier]] has an empty id"));
        }
        let base = builtins.iter().find(|t| t.id == s.id).cloned();
        let amount = |v: &Option<UsdInput>, field: &str, fallback: Option<Nanos>| -> Result<Nanos, ConfigError> {
            match v {
                Some(u) => {
                    let n = u.nanos().map_err(|e| err(format!("tier {:?} {field}: {e}", s.id)))?;
                    if n.is_negative() {
                        return Err(err(format!("tier {:?} {field} must not be negative", s.id)));
                    }
                    Ok(n)
                }
                None => {
                    fallback.ok_or_else(|| err(format!("tier {:?} needs {field} (it is not a built-in tier)", s.id)))
                }
            }
        };
        let monthly_price = match &s.monthly_price_usd {
            Some(u) => Some(u.nanos().map_err(|e| err(format!("tier {:?} monthly_price_usd: {e}", s.id)))?),
            None => base.as_ref().and_then(|b| b.monthly_price),
        };
        let payg_multiplier_ppm = match &s.payg_multiplier {
            Some(u) => {
                parse_multiplier_ppm(&u.text()).map_err(|e| err(format!("tier {:?} payg_multiplier: {e}", s.id)))?
            }
            None => base.as_ref().map_or(PPM, |b| b.payg_multiplier_ppm),
        };
        out.push(Tier {
            id: s.id.clone(),
            interactive: amount(&s.interactive_usd, "interactive_usd", base.as_ref().map(|b| b.interactive))?,
            programmatic: amount(&s.programmatic_usd, "programmatic_usd", base.as_ref().map(|b| b.programmatic))?,
            monthly_price,
            payg_multiplier_ppm,
        });
    }
    Ok(out)
}

/// USD per MTok → nano-USD per MTok.
fn rate(v: &UsdInput, model: &str, field: &str) -> Result<i64, ConfigError> {
    let n = v.nanos().map_err(|e| err(format!("price {model:?} {field}: {e}")))?;
    if n.is_negative() {
        return Err(err(format!("price {model:?} {field} must not be negative")));
    }
    Ok(n.0)
}

fn prices(file: &File, base_dir: Option<&Path>) -> Result<PriceTable, ConfigError> {
    let mut table = PriceTable::builtin();
    if let Some(path) = &file.pricing.litellm_file {
        let path = match base_dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.clone(),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        let effective_from = file.pricing.litellm_effective_from;
        for entry in read_litellm(&text, effective_from.unwrap_or(NaiveDate::MIN))? {
            if effective_from.is_some() { table.insert(entry) } else { table.replace(entry) }
        }
    }
    for p in &file.price {
        let provider = match p.provider.as_deref() {
            None => Provider::Anthropic,
            Some(s) => Provider::parse(s)
                .ok_or_else(|| err(format!("price {:?}: provider {s:?} must be anthropic or openai", p.model)))?,
        };
        let input = rate(&p.input_usd_per_mtok, &p.model, "input_usd_per_mtok")?;
        let opt = |v: &Option<UsdInput>, field: &str, default: i64| -> Result<i64, ConfigError> {
            v.as_ref().map_or(Ok(default), |v| rate(v, &p.model, field))
        };
        let rates = Rates {
            input,
            cache_write_5m: opt(&p.cache_write_5m_usd_per_mtok, "cache_write_5m_usd_per_mtok", (input * 5 + 2) / 4)?,
            cache_write_1h: opt(&p.cache_write_1h_usd_per_mtok, "cache_write_1h_usd_per_mtok", input * 2)?,
            cache_read: opt(&p.cache_read_usd_per_mtok, "cache_read_usd_per_mtok", (input + 5) / 10)?,
            output: rate(&p.output_usd_per_mtok, &p.model, "output_usd_per_mtok")?,
        };
        let entry = PriceEntry {
            model: p.model.clone(),
            provider,
            effective_from: p.effective_from.unwrap_or(NaiveDate::MIN),
            rates,
            long_context: None,
            fast_multiplier_ppm: None,
            geo_us_surcharge: false,
            web_search_per_request: if provider == Provider::Anthropic { Nanos(10_000_000) } else { Nanos::ZERO },
        };
        if p.effective_from.is_some() {
            table.insert(entry)
        } else {
            table.replace(entry)
        }
        for alias in &p.aliases {
            table.alias(alias, &p.model);
        }
    }
    Ok(table)
}

fn validate_alerts(file: &File) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for c in &file.channel {
        if !names.insert(c.name.as_str()) {
            return Err(err(format!("channel {:?} is defined twice", c.name)));
        }
        match c.kind.as_str() {
            "webhook" | "slack" => {
                if c.url.is_none() {
                    return Err(err(format!("channel {:?} ({}) needs a url", c.name, c.kind)));
                }
            }
            "log" => {}
            k => return Err(err(format!("channel {:?}: kind {k:?} must be webhook, slack or log", c.name))),
        }
    }
    for (i, a) in file.alert.iter().enumerate() {
        let at = format!("alert #{} ({})", i + 1, a.kind);
        if !matches!(a.kind.as_str(), "threshold" | "overage_started" | "cap_hit" | "spike" | "forecast" | "overshoot")
        {
            return Err(err(format!(
                "{at}: kind must be threshold, overage_started, cap_hit, spike, forecast or overshoot"
            )));
        }
        if !matches!(a.pool.as_str(), "*" | "interactive" | "programmatic") {
            return Err(err(format!("{at}: pool {:?} must be interactive, programmatic or \"*\"", a.pool)));
        }
        for p in a.percent.iter().flatten() {
            if !(1..=100).contains(p) {
                return Err(err(format!("{at}: percent {p} must be between 1 and 100")));
            }
        }
        if a.window_s == Some(0) {
            return Err(err(format!("{at}: window_s must be positive")));
        }
        for ch in &a.channels {
            if !names.contains(ch.as_str()) {
                return Err(err(format!("{at}: channel {ch:?} is not defined in a [[channel]] section")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
