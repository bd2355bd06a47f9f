//! The command line (SPEC sections 9 and 11), kept apart from what the commands do.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Split billing for Claude and OpenAI-compatible models: gateway, credit ledger, reports"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: Global,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The tollgate server to talk to.
    #[arg(long, global = true, env = "TOLLGATE_SERVER", default_value = "http://127.0.0.1:8787")]
    pub server: String,
    /// Admin token (else TOLLGATE_ADMIN_TOKEN, else ./.tollgate-admin-token).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway and management API.
    Serve {
        /// Config file (default: ./tollgate.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a commented tollgate.toml.
    Init {
        #[arg(default_value = "tollgate.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Accounts (subscriptions).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Pool policies.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Grants (top-ups) for the current cycle.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Keys that callers use.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Tiers (plans).
    #[command(subcommand)]
    Tier(TierCmd),
    /// An account's balance in its current cycle.
    Status { account: String },
    /// Usage events.
    #[command(subcommand)]
    Events(EventsCmd),
    /// The price table, or one model's price.
    Prices {
        model: Option<String>,
        /// The day to price on (YYYY-MM-DD), default today.
        #[arg(long)]
        date: Option<String>,
    },
    /// A cycle's report per pool (and grouped with --by): table, JSON or CSV.
    Report {
        /// The account (default: every account).
        account: Option<String>,
        /// current, previous, or the month a cycle starts in as YYYY-MM.
        #[arg(long, default_value = "current")]
        cycle: String,
        /// pool, model, source, key, label:NAME or day.
        #[arg(long)]
        by: Option<String>,
        /// table, json or csv.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Burn rates and projections per pool: when does it run out, what will expire.
    Forecast {
        /// The account (default: every account).
        account: Option<String>,
    },
    /// Does a job fit now, or when? Give its cost, or a model with tokens per call.
    Plan {
        account: String,
        #[arg(long)]
        pool: String,
        #[arg(long)]
        cost_usd: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        input_tokens: Option<u64>,
        #[arg(long)]
        output_tokens: Option<u64>,
        #[arg(long)]
        calls: Option<u64>,
    },
    /// Advice: which tier, which models.
    #[command(subcommand)]
    Advise(AdviseCmd),
    /// Alerts: history, rules, a test delivery.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Follow live activity: calls per second per pool, and balances (Ctrl-C to stop).
    Top {
        /// Only this account (an account key sees only its own anyway).
        account: Option<String>,
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Verify the ledger invariants on a database (no server needed). Exit 1 on any breach.
    Check {
        /// Database URL or path (else TOLLGATE_DB, else the config's store.url).
        #[arg(long, env = "TOLLGATE_DB")]
        db: Option<String>,
        /// Config file whose store.url names the database.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    Create {
        id: String,
        #[arg(long)]
        tier: String,
        /// Billing anchor (RFC 3339); default: today 00:00 in the timezone.
        #[arg(long)]
        anchor: Option<String>,
        /// IANA timezone, default UTC.
        #[arg(long)]
        timezone: Option<String>,
        /// Per-account monthly interactive grant (replaces the tier's), e.g. for enterprise.
        #[arg(long)]
        interactive_grant_usd: Option<String>,
        #[arg(long)]
        programmatic_grant_usd: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    Update {
        id: String,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        anchor: Option<String>,
        #[arg(long)]
        timezone: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Change a pool's policy; `none` clears a cap.
    Set {
        account: String,
        pool: String,
        #[arg(long)]
        on_exhausted: Option<String>,
        #[arg(long)]
        overage_cap_usd: Option<String>,
        #[arg(long)]
        spend_cap_usd: Option<String>,
    },
    Show {
        account: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GrantCmd {
    Add {
        account: String,
        pool: String,
        amount_usd: String,
        #[arg(long)]
        note: Option<String>,
    },
    List {
        account: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a key; prints the secret alone (shown only once).
    Create {
        account: String,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// k=v, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        cap_usd: Option<String>,
    },
    List {
        account: String,
    },
    Revoke {
        account: String,
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TierCmd {
    List,
    Set {
        id: String,
        #[arg(long)]
        interactive_usd: String,
        #[arg(long)]
        programmatic_usd: String,
        #[arg(long)]
        monthly_price_usd: Option<String>,
        #[arg(long)]
        payg_multiplier: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum EventsCmd {
    /// List an account's events, newest first.
    List {
        account: String,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Post events from a JSON or JSONL file (`-` for stdin), in batches.
    Post { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum AlertsCmd {
    /// The alert history, newest first.
    List {
        /// Only this account.
        account: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// threshold, overage_started, cap_hit, spike, forecast or overshoot.
        #[arg(long)]
        kind: Option<String>,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The alert rules (from tollgate.toml and the API).
    Rules,
    /// Send a test alert through a channel now.
    Test { channel: String },
}

#[derive(Subcommand, Debug)]
pub enum AdviseCmd {
    /// Replay past cycles on every tier; recommend the cheapest.
    Tier {
        account: String,
        #[arg(long, default_value_t = 3)]
        cycles: u32,
    },
    /// What this cycle's calls would have cost on other models; latency per model.
    Model {
        account: String,
        #[arg(long)]
        pool: Option<String>,
    },
}
