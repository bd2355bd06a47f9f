//! Starting the server: open the store, apply configured tiers, recover holds left open,
//! resolve the admin token, start the sweeper, serve until SIGTERM or Ctrl-C.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate_config::{Env, Settings, StoreUrl};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{Store, StoreResult};

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tollgate_core::PoolKind;
use tollgate_store::alerts::{Alert, AlertKind, AlertRule};
use tollgate_store::feed::{Feed, FeedItem};

use crate::alerts::deliver::Channel;
use crate::alerts::engine::Alerter;
use crate::{AdminToken, AppState, Clock, router};

/// The file `serve` writes a generated admin token to, in its working directory.
pub const ADMIN_TOKEN_FILE: &str = ".tollgate-admin-token";

pub struct ServeOptions {
    pub settings: Settings,
    pub clock: Clock,
    /// Where the admin token file goes (the working directory).
    pub work_dir: PathBuf,
}

fn generate_token() -> Result<String, String> {
    let mut buf = [0u8; 24];
    getrandom::fill(&mut buf).map_err(|e| format!("no randomness: {e}"))?;
    Ok(format!("tga_{}", hex::encode(buf)))
}

/// The configured admin token, else the one in the token file, else a new one: printed once
/// and written to the token file (mode 0600).
fn admin_token(settings: &Settings, env: &dyn Env, work_dir: &std::path::Path) -> Result<AdminToken, String> {
    if let Some(token) = env.var(&settings.file.server.admin_token_env) {
        return Ok(AdminToken::from_secret(&token));
    }
    let path = work_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path)
        && !existing.trim().is_empty()
    {
        tracing::info!(file = %path.display(), "admin token read from file");
        return Ok(AdminToken::from_secret(existing.trim()));
    }
    let token = generate_token()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // Printed once, on stdout, so the operator can copy it; never logged.
    println!("tollgate: generated admin token (also in {}):\n{token}", path.display());
    Ok(AdminToken::from_secret(&token))
}

pub async fn open_store(url: &StoreUrl) -> Result<Arc<dyn Store>, String> {
    match url {
        StoreUrl::Sqlite(path) => {
            let store = SqliteStore::open(path).map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
        StoreUrl::Postgres(url) => {
            let store = tollgate_postgres::PgStore::open(url).await.map_err(|e| format!("PostgreSQL store: {e}"))?;
            Ok(Arc::new(store))
        }
    }
}

/// Runs `tollgate serve` until a shutdown signal.
pub async fn serve(options: ServeOptions, env: &dyn Env) -> Result<(), String> {
    let ServeOptions { settings, clock, work_dir } = options;
    let store = open_store(&settings.store).await?;
    for tier in &settings.tiers {
        store.put_tier(tier.clone()).await.map_err(|e| e.to_string())?;
    }
    let recovered = store.recover_open_holds(clock()).await.map_err(|e| e.to_string())?;
    if !recovered.is_empty() {
        tracing::warn!(
            holds = recovered.len(),
            "holds left open by an earlier run settled at their held amount as unsettled"
        );
    }
    let admin = admin_token(&settings, env, &work_dir)?;
    let mut gateway_settings = gateway_settings(&settings, env)?;
    gateway_settings.metrics_token_digest = Some(admin.digest().to_string());
    let feed = Arc::new(tollgate_store::feed::Feed::default());
    let prices = Arc::new(settings.prices.clone());
    let gateway = Arc::new(
        tollgate_gateway::Gateway::new(store.clone(), prices.clone(), clock.clone(), gateway_settings)
            .with_feed(feed.clone()),
    );
    store.replace_config_alert_rules(config_alert_rules(&settings)?).await.map_err(|e| e.to_string())?;
    let alerter = Arc::new(
        Alerter::new(
            store.clone(),
            tollgate_gateway::upstream::http_client(Duration::from_secs(10)),
            alert_channels(&settings, env)?,
            gateway.metrics.clone(),
        )
        .with_feed(feed.clone()),
    );
    let state = AppState {
        store: store.clone(),
        prices,
        unknown_model: settings.unknown_model.clone(),
        admin,
        clock: clock.clone(),
        hold_ttl_s: settings.file.server.hold_ttl_s,
        api_body_size_bytes_max: settings.file.server.api_body_size_bytes_max,
        feed: feed.clone(),
        alerter: Some(alerter.clone()),
    };
    // The first scan runs at once: crossings written before a crash, or while no server ran,
    // are found without waiting for activity on their pools.
    let alerting = alert_tasks(&alerter, &clock);
    let ticker = tokio::spawn(publish_feed(store.clone(), feed, alerter, clock.clone()));
    let sweeper = tokio::spawn(sweep(store, clock, Duration::from_secs(settings.file.server.sweep_interval_s.max(1))));
    let server = &settings.file.server;
    let limits = crate::listen::Limits {
        connections_max: server.connections_max.unwrap_or_else(crate::listen::default_connections_max),
        header_read_timeout: Duration::from_secs(server.header_read_timeout_s),
        body_read_timeout: Duration::from_secs(server.body_read_timeout_s),
        // A call whose client stopped reading is settled after its connection closes, reading
        // on for at most half the hold's time to live: the stall leaves room for that.
        response_stall_timeout: Duration::from_secs(server.response_stall_timeout_s.min(server.hold_ttl_s / 4).max(1)),
    };
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    tracing::info!(listen = %settings.listen, connections_max = limits.connections_max, "tollgate serving");
    let app = router(state).merge(tollgate_gateway::routes(gateway.clone()));
    crate::listen::serve(listener, app, limits, gateway.metrics.clone(), shutdown_signal()).await;
    gateway.close().await;
    sweeper.abort();
    ticker.abort();
    for task in alerting {
        task.abort();
    }
    Ok(())
}

/// The gateway's settings from the configuration. Without any `[[upstream]]`, tollgate fronts
/// the Anthropic API (models `claude-*`, key from `ANTHROPIC_API_KEY`) and the OpenAI API (models
/// `gpt-*`, `o*`, key from `OPENAI_API_KEY`).
fn gateway_settings(settings: &Settings, env: &dyn Env) -> Result<tollgate_gateway::Settings, String> {
    use tollgate_gateway::{Auth, Kind, Upstream};
    let mut sections = settings.file.upstream.clone();
    if sections.is_empty() {
        let default =
            |name: &str, kind: &str, url: &str, key: &str, models: &[&str]| tollgate_config::UpstreamSection {
                name: name.into(),
                kind: kind.into(),
                base_url: url.into(),
                api_key_env: Some(key.into()),
                models: models.iter().map(|m| m.to_string()).collect(),
                auth: "gateway".into(),
            };
        sections.push(default(
            "anthropic",
            "anthropic",
            "https://api.anthropic.com",
            "ANTHROPIC_API_KEY",
            &["claude-*"],
        ));
        sections.push(default("openai", "openai", "https://api.openai.com", "OPENAI_API_KEY", &["gpt-*", "o*"]));
    }
    let mut upstreams = Vec::with_capacity(sections.len());
    for u in sections {
        let kind = match u.kind.as_str() {
            "anthropic" => Kind::Anthropic,
            "openai" => Kind::OpenAi,
            other => return Err(format!("upstream {}: unknown kind {other:?} (anthropic or openai)", u.name)),
        };
        let auth = if u.auth == "passthrough" { Auth::Passthrough } else { Auth::Gateway };
        let api_key = u.api_key_env.as_deref().and_then(|name| env.var(name));
        if auth == Auth::Gateway && api_key.is_none() {
            tracing::warn!(
                upstream = %u.name,
                env = u.api_key_env.as_deref().unwrap_or("(none)"),
                "no upstream key in the environment: the upstream will refuse gateway calls"
            );
        }
        upstreams.push(Upstream {
            name: u.name,
            kind,
            base_url: u.base_url.trim_end_matches('/').to_string(),
            api_key,
            models: if u.models.is_empty() { vec!["*".into()] } else { u.models },
            auth,
        });
    }
    let g = &settings.file.gateway;
    let mut rules = Vec::with_capacity(settings.file.pool_rule.len());
    for r in &settings.file.pool_rule {
        rules.push(tollgate_gateway::PoolRule {
            name: r.name.clone(),
            header: axum::http::HeaderName::from_bytes(r.header.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("pool_rule {:?}: {:?} is not a header name", r.name, r.header))?,
            value: r.value.clone(),
            pool: tollgate_core::PoolKind::parse(&r.pool).ok_or_else(|| format!("pool_rule {:?}: bad pool", r.name))?,
        });
    }
    Ok(tollgate_gateway::Settings {
        upstreams,
        default_pool: tollgate_core::PoolKind::parse(&g.default_pool).unwrap_or(tollgate_core::PoolKind::Programmatic),
        min_output_tokens: g.min_output_tokens,
        body_size_bytes_max: g.body_size_bytes_max,
        upstream_timeout: Duration::from_secs(g.upstream_timeout_s),
        claude_code_warnings: g.claude_code_warnings,
        lease: match &g.lease_usd {
            None => tollgate_gateway::LEASE_DEFAULT,
            Some(usd) => match usd.nanos() {
                Ok(n) if n.0 >= 0 => n,
                _ => {
                    return Err(format!(
                        "gateway.lease_usd: {:?} is not an amount of USD ≥ 0, such as \"1\"",
                        usd.text()
                    ));
                }
            },
        },
        rules,
        unknown_model_as: match &settings.unknown_model {
            tollgate_config::UnknownModel::Reject => None,
            tollgate_config::UnknownModel::PriceAs(m) => Some(m.clone()),
        },
        hold_ttl_s: settings.file.server.hold_ttl_s,
        server_tool_max_uses: g.server_tool_max_uses,
        allowances: tollgate_core::price::Allowances {
            input_tokens_per_tool_use: g.input_tokens_per_tool_use,
            input_tokens_per_unbounded_input: g.input_tokens_per_unbounded_input,
            ..Default::default()
        },
        // Validated by the configuration (an amount ≥ 0).
        unbounded_tool_allowance: g.unbounded_tool_allowance_usd.as_ref().and_then(|u| u.nanos().ok()),
        ..tollgate_gateway::Settings::default()
    })
}

/// Once a second: each active pool's tally, then the balances of the accounts that moved.
async fn publish_feed(store: Arc<dyn Store>, feed: Arc<Feed>, alerter: Arc<Alerter>, clock: Clock) {
    let window = Duration::from_secs(1);
    let mut tick = tokio::time::interval(window);
    loop {
        tick.tick().await;
        let tallies = feed.take_tallies();
        if tallies.is_empty() {
            continue;
        }
        let now = clock();
        for ((account, pool), tally) in &tallies {
            let item =
                FeedItem::Calls { account: account.clone(), pool: *pool, window_end: now, window_s: 1, tally: *tally };
            feed.publish(item);
        }
        let mut balances = std::collections::BTreeMap::new();
        for ((account, _), _) in &tallies {
            if balances.contains_key(account) {
                continue;
            }
            match store.balance(account, now).await {
                Ok(b) => {
                    feed.publish(FeedItem::Balance(Box::new(b.clone())));
                    balances.insert(account.clone(), b);
                }
                Err(e) => tracing::warn!(error = %e, account = %account, "cannot read a balance for the live stream"),
            }
        }
        if let Err(e) = alerter.after_activity(now, &tallies, &balances).await {
            tracing::error!(error = %e, "alert rules could not be checked");
        }
    }
}

/// Starts the alert engine's tasks, each on its own so that none waits for another (a slow
/// delivery delays no check): deliveries (`Alerter::run_deliveries`); the scan of every balance
/// at once and then every minute; spikes every 5 s; forecasts every minute.
fn alert_tasks(alerter: &Arc<Alerter>, clock: &Clock) -> Vec<tokio::task::JoinHandle<()>> {
    let (scan, spikes, forecasts) = (alerter.clone(), alerter.clone(), alerter.clone());
    vec![
        tokio::spawn(alerter.clone().run_deliveries(clock.clone())),
        tokio::spawn(periodically(60, "alert rules (the scan of every balance)", clock.clone(), move |now| {
            let a = scan.clone();
            async move { a.scan(now).await }
        })),
        tokio::spawn(periodically(5, "spike rules", clock.clone(), move |now| {
            let a = spikes.clone();
            async move { a.check_spikes(now).await }
        })),
        tokio::spawn(periodically(60, "forecast rules", clock.clone(), move |now| {
            let a = forecasts.clone();
            async move { a.check_forecasts(now).await }
        })),
    ]
}

/// Runs `check` at once and then every `period_s` seconds (a run that takes longer delays the
/// next, never doubles it up), logging its errors as `what`.
async fn periodically<F, Fut>(period_s: u64, what: &'static str, clock: Clock, check: F)
where
    F: Fn(DateTime<Utc>) -> Fut,
    Fut: Future<Output = StoreResult<Vec<Alert>>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs(period_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = check(clock()).await {
            tracing::error!(error = %e, "{what} could not be checked");
        }
    }
}

/// The alert channels of the configuration; webhook secrets come from the environment.
fn alert_channels(settings: &Settings, env: &dyn Env) -> Result<HashMap<String, Channel>, String> {
    let mut channels = HashMap::new();
    for c in &settings.file.channel {
        let url = c.url.clone().unwrap_or_default();
        let channel = match c.kind.as_str() {
            "webhook" => {
                let secret = match &c.secret_env {
                    Some(name) => Some(env.var(name).ok_or_else(|| {
                        format!("channel {:?}: the environment variable {name} (its secret_env) is not set", c.name)
                    })?),
                    None => None,
                };
                Channel::Webhook { url, secret }
            }
            "slack" => Channel::Slack { url },
            _ => Channel::Log,
        };
        channels.insert(c.name.clone(), channel);
    }
    Ok(channels)
}

/// The alert rules of the configuration, named `config-<n>` in file order.
fn config_alert_rules(settings: &Settings) -> Result<Vec<AlertRule>, String> {
    settings
        .file
        .alert
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let rule = AlertRule {
                id: format!("config-{}", i + 1),
                kind: AlertKind::parse(&a.kind)
                    .ok_or_else(|| format!("alert #{}: unknown kind {:?}", i + 1, a.kind))?,
                account: (a.account != "*").then(|| a.account.clone()),
                pool: PoolKind::parse(&a.pool),
                percents: a.percent.iter().flatten().map(|p| *p as u8).collect(),
                window_s: a.window_s,
                factor_ppm: a
                    .factor
                    .as_ref()
                    .map(|f| tollgate_config::parse_multiplier_ppm(&f.text()))
                    .transpose()
                    .map_err(|e| format!("alert #{}: factor {e}", i + 1))?,
                floor: a
                    .floor_usd
                    .as_ref()
                    .map(|f| f.nanos())
                    .transpose()
                    .map_err(|e| format!("alert #{}: floor_usd: {e}", i + 1))?,
                days: a.days.map(|d| d.min(u64::from(u32::MAX)) as u32),
                channels: a.channels.clone(),
                from_config: true,
            };
            crate::alerts::engine::validate_rule(&rule).map_err(|e| format!("alert #{}: {e}", i + 1))?;
            Ok(rule)
        })
        .collect()
}

/// Expires holds past their time to live. With the SQLite store there is one process, so this
/// one sweeper is the only one.
async fn sweep(store: Arc<dyn Store>, clock: Clock, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match store.expire_holds(clock()).await {
            Ok(events) if !events.is_empty() => {
                tracing::warn!(holds = events.len(), "expired holds settled at their held amount as unsettled")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "hold sweep failed"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEnv;

    impl Env for NoEnv {
        fn var(&self, _name: &str) -> Option<String> {
            None
        }
    }

    fn settings(toml: &str) -> Settings {
        let file = tollgate_config::parse_file(toml).expect("the test's TOML parses");
        Settings::from_file(file, None, &NoEnv).expect("the test's settings are valid")
    }

    #[test]
    fn leases_default_to_one_dollar_on_both_backends() {
        let sqlite = gateway_settings(&settings(""), &NoEnv).expect("defaults");
        assert_eq!(sqlite.lease, tollgate_gateway::LEASE_DEFAULT);
        assert_eq!(tollgate_gateway::LEASE_DEFAULT, tollgate_core::Nanos::from_usd(1));
        let pg = settings("[store]\nurl = \"postgres://localhost/tollgate\"\n");
        assert_eq!(gateway_settings(&pg, &NoEnv).expect("defaults").lease, tollgate_gateway::LEASE_DEFAULT);
        let set = settings("[gateway]\nlease_usd = \"0.25\"\n[store]\nurl = \"postgres://localhost/tollgate\"\n");
        assert_eq!(gateway_settings(&set, &NoEnv).expect("set").lease, tollgate_core::Nanos(250_000_000));
        let off = settings("[gateway]\nlease_usd = \"0\"\n");
        assert_eq!(gateway_settings(&off, &NoEnv).expect("off").lease, tollgate_core::Nanos::ZERO);
    }

    #[test]
    fn the_worst_case_settings_reach_the_gateway() {
        let defaults = gateway_settings(&settings(""), &NoEnv).expect("defaults");
        assert_eq!(defaults.server_tool_max_uses, tollgate_gateway::SERVER_TOOL_MAX_USES_DEFAULT);
        assert_eq!(defaults.allowances, tollgate_core::price::Allowances::default());
        assert_eq!(defaults.unbounded_tool_allowance, None);
        let set = settings(
            "[gateway]\nserver_tool_max_uses = 3\ninput_tokens_per_tool_use = 40000\n\
             input_tokens_per_unbounded_input = 9\nunbounded_tool_allowance_usd = \"2.5\"\n",
        );
        let set = gateway_settings(&set, &NoEnv).expect("set");
        assert_eq!(set.server_tool_max_uses, 3);
        assert_eq!(
            (set.allowances.input_tokens_per_tool_use, set.allowances.input_tokens_per_unbounded_input),
            (40_000, 9)
        );
        assert_eq!(set.unbounded_tool_allowance, Some(tollgate_core::Nanos(2_500_000_000)));
    }

    #[test]
    fn a_negative_lease_is_refused_with_what_to_write() {
        let e = gateway_settings(&settings("[gateway]\nlease_usd = \"-1\"\n"), &NoEnv).unwrap_err();
        assert!(e.contains("gateway.lease_usd") && e.contains("\"-1\"") && e.contains("such as"), "{e}");
    }
}
