//! What each command does. Every command returns `Ok(())` or a failure kind with a message;
//! `main` turns the kind into the exit code (see docs/cli.md).

/// `println!` for the command's output: when the reader went away (`tollgate … | head`), the
/// program ends quietly with success instead of panicking on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::commands::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod manage;

/// Writes the command's output to stdout (see `outln!`).
pub fn write_out(text: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("tollgate: cannot write the output: {e}");
            std::process::exit(4);
        }
        std::process::exit(0);
    }
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate_config::{ProcessEnv, Settings, StoreUrl};

use crate::cli::{Cli, Command};
use crate::client::Client;

/// Why a command failed; each kind has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 1: the server or the check said no (error response, ledger breach).
    Refused,
    /// 2: bad arguments or configuration.
    Usage,
    /// 3: the server could not be reached.
    Unreachable,
    /// 4: something broke on our side.
    Internal,
}

impl From<Failure> for ExitCode {
    fn from(f: Failure) -> ExitCode {
        ExitCode::from(match f {
            Failure::Refused => 1,
            Failure::Usage => 2,
            Failure::Unreachable => 3,
            Failure::Internal => 4,
        })
    }
}

pub type Outcome<T> = Result<T, (Failure, String)>;

/// `tollgate top`: prints the live stream, one line per update (`--json`: the events as JSON lines).
async fn top(client: &Client, account: Option<String>, count: Option<u64>, json: bool) -> Outcome<()> {
    let mut seen = 0u64;
    client
        .follow("/api/v1/stream", |name, data| {
            if account.as_deref().is_some_and(|a| data["account"].as_str() != Some(a)) {
                return true;
            }
            if json {
                outln!("{}", serde_json::json!({"event": name, "data": data}));
            } else {
                match name {
                    "calls" => outln!(
                        "{}  {:<16} {:<13} calls {:>6}  refused {:>4}  charged ${:<12} tokens {}",
                        data["window_end"].as_str().unwrap_or(""),
                        data["account"].as_str().unwrap_or(""),
                        data["pool"].as_str().unwrap_or(""),
                        data["calls"],
                        data["refused"],
                        data["charged_usd"].as_str().unwrap_or("0"),
                        data["tokens"]
                    ),
                    "balance" => {
                        for pool in ["interactive", "programmatic"] {
                            let p = &data["pools"][pool];
                            outln!(
                                "{:>22}{:<16} {:<13} used ${} + overage ${}, held ${}, remaining ${}",
                                "",
                                data["account"].as_str().unwrap_or(""),
                                pool,
                                p["used_usd"].as_str().unwrap_or("0"),
                                p["overage_usd"].as_str().unwrap_or("0"),
                                p["held_usd"].as_str().unwrap_or("0"),
                                p["remaining_usd"].as_str().unwrap_or("unlimited")
                            );
                        }
                    }
                    other => outln!("{other}: {data}"),
                }
            }
            seen += 1;
            count.is_none_or(|c| seen < c)
        })
        .await
}

pub fn usage(msg: impl Into<String>) -> (Failure, String) {
    (Failure::Usage, msg.into())
}

pub async fn run(cli: Cli) -> Outcome<()> {
    let client = || Client::new(&cli.global.server, cli.global.token.clone());
    let json = cli.global.json;
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::Init { path, force } => init(&path, force),
        Command::Check { db, config } => check(db, config, json).await,
        Command::Account(c) => manage::account(&client(), c, json).await,
        Command::Pool(c) => manage::pool(&client(), c, json).await,
        Command::Grant(c) => manage::grant(&client(), c, json).await,
        Command::Key(c) => manage::key(&client(), c, json).await,
        Command::Tier(c) => manage::tier(&client(), c, json).await,
        Command::Status { account } => manage::status(&client(), &account, json).await,
        Command::Events(c) => manage::events(&client(), c, json).await,
        Command::Prices { model, date } => manage::prices(&client(), model, date, json).await,
        Command::Alerts(c) => manage::alerts(&client(), c, json).await,
        Command::Forecast { account } => manage::forecast(&client(), account, json).await,
        Command::Plan { account, pool, cost_usd, model, input_tokens, output_tokens, calls } => {
            let mut body = serde_json::json!({ "pool": pool });
            for (k, v) in [
                ("cost_usd", cost_usd.map(serde_json::Value::from)),
                ("model", model.map(serde_json::Value::from)),
                ("input_tokens", input_tokens.map(serde_json::Value::from)),
                ("output_tokens", output_tokens.map(serde_json::Value::from)),
                ("calls", calls.map(serde_json::Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            manage::plan(&client(), &account, body, json).await
        }
        Command::Advise(c) => manage::advise(&client(), c, json).await,
        Command::Report { account, cycle, by, format } => {
            let format = if json { "json".to_string() } else { format };
            manage::report(&client(), account, &cycle, by.as_deref(), &format).await
        }
        Command::Top { account, count } => top(&client(), account, count, json).await,
    }
}

fn config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| Some(PathBuf::from("tollgate.toml")).filter(|p| p.exists()))
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Option<PathBuf>) -> Outcome<()> {
    let settings = Settings::load(config_path(config).as_deref(), &ProcessEnv).map_err(|e| usage(e.to_string()))?;
    init_logging(&settings.file.log.format);
    let work_dir = std::env::current_dir().map_err(|e| (Failure::Internal, format!("no working directory: {e}")))?;
    let options = tollgate_server::ServeOptions { settings, clock: tollgate_server::system_clock(), work_dir };
    tollgate_server::serve(options, &ProcessEnv).await.map_err(|e| (Failure::Internal, e))
}

const INIT_TEMPLATE: &str = include_str!("../../tollgate.example.toml");

fn init(path: &Path, force: bool) -> Outcome<()> {
    if path.exists() && !force {
        return Err(usage(format!("{} exists; pass --force to overwrite it", path.display())));
    }
    std::fs::write(path, INIT_TEMPLATE)
        .map_err(|e| (Failure::Internal, format!("cannot write {}: {e}", path.display())))?;
    outln!("wrote {}", path.display());
    Ok(())
}

async fn check(db: Option<String>, config: Option<PathBuf>, json: bool) -> Outcome<()> {
    let url = match db {
        Some(url) => StoreUrl::parse(&url).map_err(|e| usage(e.to_string()))?,
        None => Settings::load(config_path(config).as_deref(), &ProcessEnv).map_err(|e| usage(e.to_string()))?.store,
    };
    let (database, audit) = match &url {
        StoreUrl::Sqlite(path) => {
            not_a_sqlite_file(path)?;
            let audit = tollgate_sqlite::SqliteStore::audit_file(path).map_err(|e| match e {
                tollgate_store::StoreError::NotFound(what) => usage(format!("{what} does not exist")),
                tollgate_store::StoreError::Invalid(m) => usage(m),
                other => (Failure::Internal, format!("cannot check {}: {other}", path.display())),
            })?;
            (path.display().to_string(), audit)
        }
        StoreUrl::Postgres(url) => {
            let shown = without_password(url);
            (shown.clone(), check_postgres(url, &shown).await?)
        }
    };
    if json {
        let v = serde_json::json!({
                "ok": audit.breaches.is_empty(),
                "database": database,
                "pools_checked": audit.pools_checked,
                "events_checked": audit.events_checked,
                "holds_open": audit.holds_open,
                "breaches": audit.breaches,
                "warnings": audit.warnings,
        });
        #[allow(clippy::expect_used, reason = "a serde_json Value always prints: its map keys are strings")]
        let text = serde_json::to_string_pretty(&v).expect("JSON prints");
        outln!("{text}");
    } else {
        let warnings = match audit.warnings.len() {
            0 => String::new(),
            1 => "; 1 warning".to_string(),
            n => format!("; {n} warnings"),
        };
        outln!(
            "checked {} pool cycles, {} events, {} open holds: {}{warnings}",
            audit.pools_checked,
            audit.events_checked,
            audit.holds_open,
            if audit.breaches.is_empty() {
                "every invariant holds".to_string()
            } else {
                format!("{} breaches", audit.breaches.len())
            }
        );
        for b in &audit.breaches {
            outln!("BREACH {b}");
        }
        // Warnings are no breach: they do not change the exit code.
        for w in &audit.warnings {
            outln!("WARNING {w}");
        }
    }
    if audit.breaches.is_empty() { Ok(()) } else { Err((Failure::Refused, "ledger invariants breached".into())) }
}

/// Audits a PostgreSQL database read-only (no migration, nothing written). A database that does
/// not exist, has no tollgate tables or cannot be reached is the caller's to fix (exit 2), with
/// a message naming it (`shown`: the url without its password).
async fn check_postgres(url: &str, shown: &str) -> Outcome<tollgate_store::Audit> {
    use tollgate_store::{Store, StoreError};
    let store = tollgate_postgres::PgStore::open_read_only(url).await.map_err(|e| match e {
        StoreError::NotFound(_) => usage(format!("{shown}: the PostgreSQL database does not exist")),
        StoreError::Invalid(m) | StoreError::Conflict(m) => usage(format!("{shown}: {m}")),
        e @ StoreError::Refused(_) => usage(format!("{shown}: {e}")),
        StoreError::Backend(m) | StoreError::Corrupt(m) | StoreError::Unavailable(m) => {
            usage(format!("{shown}: cannot open the PostgreSQL database: {m}"))
        }
    })?;
    store.audit().await.map_err(|e| (Failure::Internal, format!("cannot check {shown}: {e}")))
}

/// A database url as it may be printed: its password, if any, replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            format!("{user}:***@{host}")
        }
        _ => authority.to_string(),
    };
    // A password can also come as a query parameter.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<&str> =
                query.split('&').map(|p| if p.starts_with("password=") { "password=***" } else { p }).collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// A path given for the database that is no SQLite database at all is the caller's mistake
/// (exit 2), not ours: say so and name it. A missing file is left to `audit_file`.
fn not_a_sqlite_file(path: &Path) -> Outcome<()> {
    use std::io::Read;
    if path.is_dir() {
        return Err(usage(format!("{} is a directory, not a database file", path.display())));
    }
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    match std::fs::File::open(path) {
        Ok(file) => file
            .take(SQLITE_HEADER.len() as u64)
            .read_to_end(&mut header)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(usage(format!("cannot read {}: {e}", path.display()))),
    };
    if header.is_empty() {
        return Err(usage(format!("{} is an empty file, not a tollgate database", path.display())));
    }
    if header != SQLITE_HEADER {
        return Err(usage(format!("{} is not a database: it does not start with the SQLite header", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn a_printed_database_url_has_no_password() {
        for (url, shown) in [
            ("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/postgres"),
            ("postgres://u:s3cret@db.example/tollgate", "postgres://u:***@db.example/tollgate"),
            ("postgresql://u:p%40ss@h:5433/db?sslmode=disable", "postgresql://u:***@h:5433/db?sslmode=disable"),
            (
                "postgres://u@h/db?password=s3cret&application_name=x",
                "postgres://u@h/db?password=***&application_name=x",
            ),
            ("postgres://h", "postgres://h"),
        ] {
            assert_eq!(without_password(url), shown, "{url}");
        }
    }
}
