//! The PostgreSQL backend of the store: several tollgate processes on one database form one
//! system (SPEC section 10).
//!
//! Every ledger write runs in a transaction that locks the rows its decision depends on (the
//! pool's cycle row, `SELECT … FOR UPDATE`, created first with `INSERT … ON CONFLICT DO
//! NOTHING`; then the key's) and asks `tollgate-core` for the decision under those locks, so a
//! `block` limit holds exactly whatever the number of processes. Holds, settles, voids and
//! extensions (the calls' hot path) are group-committed: a writer task per store runs every
//! one waiting in one transaction (`batch`); the other writes run one transaction each
//! (`ledger`). Idempotency ids are primary keys. Nothing decides from process memory: no cache
//! of totals or settings. A commit is durable when it returns: every connection sets
//! `synchronous_commit = on`. `ledger` names the lock order that keeps transactions from
//! deadlocking; a deadlock or a unique id taken by a concurrent transaction makes the whole
//! transaction run again.
//!
//! Migrations run on open in one transaction under an advisory lock (`schema`), so several
//! processes may start at once.
//!
//! *Decision — holds at start.* On SQLite one process owns the file, so every hold open at start
//! was left by a dead run and `recover_open_holds` settles them all. Here other live processes
//! may be in the middle of their calls, so `recover_open_holds` never settles a hold just
//! because it is open: it settles the holds past their time to live (as `expire_holds` does)
//! and the holds made by this very store (each open store takes a number, `holds.owner`), which
//! the caller declares it can no longer finish — none, in a process that has just started. The
//! holds of a process that died are settled, at their held amount and flagged `unsettled`, by
//! whichever process sweeps first once their time to live has passed (gateway holds are extended
//! only while their stream is alive). `expire_holds` may run in every process at once: it locks
//! the holds it settles with `FOR UPDATE`, waiting for a concurrent settle, void or sweep of the
//! same hold and re-reading its state after, so each is settled exactly once. (Skipping locked
//! holds instead made a sweep miss a hold whose concurrent write then failed: the seeded
//! simulation caught it.)

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod audit;
mod batch;
mod events;
mod ledger;
mod rows;
mod schema;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls};
use tollgate_core::{Nanos, PoolKind, PoolPolicy, Tier};
use tollgate_store::{
    Account, AccountUpdate, Audit, Balance, Event, EventOutcome, EventQuery, Grant, Hold, HoldOutcome, HoldRequest,
    Key, NewAccount, NewEvent, NewGrant, NewKey, PoolBalance, SettleRequest, Store, StoreError, StoreResult,
};

use crate::ledger::Sweep;
use crate::rows::{execute, query, query_one, query_opt, us};
use tollgate_store::step::{Done, Op};

/// Connections one store keeps open at most.
pub const CONNECTIONS_MAX: usize = 16;
/// Times a write transaction runs before its error is returned, when it keeps meeting a
/// deadlock or a concurrent insert of the same id.
const ATTEMPTS_MAX: u32 = 8;

/// What goes wrong inside this crate; becomes a [`StoreError`] at the trait's boundary.
#[derive(Debug)]
pub(crate) enum Error {
    Store(StoreError),
    Pg(tokio_postgres::Error),
    /// A concurrent transaction committed a row this one was about to insert (same id): run the
    /// transaction again, and its checks see that row.
    Retry,
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(e)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::Pg(e)
    }
}

impl Error {
    /// Whether running the whole transaction again may succeed.
    fn retryable(&self) -> bool {
        match self {
            Error::Retry => true,
            // A connection lost in the middle (killed, reset, its server shutting down) is made
            // anew for the next attempt, which fails at once if the server is away: a write
            // whose COMMIT did land is then replayed by its idempotency id.
            Error::Pg(e) if server_away(e) => true,
            Error::Pg(e) => e
                .code()
                .is_some_and(|c| *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE),
            Error::Store(_) => false,
        }
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> StoreError {
        match e {
            Error::Store(e) => e,
            Error::Pg(e) => pg_error(&e),
            Error::Retry => StoreError::Backend("a write kept colliding with concurrent writes; retry".into()),
        }
    }
}

/// A PostgreSQL error in one line, with the server's message when there is one.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL {} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("PostgreSQL: {e}: {source}"),
            None => format!("PostgreSQL: {e}"),
        },
    }
}

/// Whether `e` says the server is away rather than that a statement failed: the connection is
/// lost or cannot be made (closed, refused, reset), or the server is shutting down, starting up,
/// or out of a resource (disk, memory, connections). The same write later may succeed.
pub(crate) fn server_away(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let code = code.code();
            // 08: connection exception; 53: insufficient resources; 57P01-03: admin shutdown,
            // crash shutdown, cannot connect now; 58: system error (I/O).
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code.starts_with("58")
        }
        // No answer from the server: the socket failed (refused, reset, broken pipe, timed out).
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// A PostgreSQL error as the store's: `Unavailable` when the server is away ([`server_away`]).
pub(crate) fn pg_error(e: &tokio_postgres::Error) -> StoreError {
    if server_away(e) { StoreError::Unavailable(describe(e)) } else { StoreError::Backend(describe(e)) }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => match pg_error(&e) {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("cannot connect: {m}")),
            other => StoreError::Backend(format!("cannot connect: {other}")),
        },
        PoolError::Timeout(_) => StoreError::Unavailable(format!("cannot get a PostgreSQL connection in time: {e}")),
        e => StoreError::Backend(format!("cannot get a PostgreSQL connection: {e}")),
    }
}

/// Runs `$body` (an expression of type `Result<T>` that uses the transaction `$tx`) in a
/// read-committed transaction and commits; runs it all again when [`Error::retryable`].
macro_rules! write_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 1u32;
        loop {
            let mut client = $store.client().await?;
            let result: Result<_> = async {
                let $tx = client.transaction().await?;
                let body: Result<_> = $body;
                let value = body?;
                $tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Ok(value) => break Ok(value),
                Err(e) if e.retryable() && attempt < ATTEMPTS_MAX => {
                    tracing::debug!(attempt, error = ?e, "transaction runs again");
                    attempt += 1;
                }
                Err(e) => break Err(StoreError::from(e)),
            }
        }
    }};
}

/// Runs `$body` in a read-only snapshot (repeatable read), so that its several reads agree.
macro_rules! read_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut client = $store.client().await?;
        let result: Result<_> = async {
            let $tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let body: Result<_> = $body;
            let value = body?;
            $tx.commit().await?;
            Ok(value)
        }
        .await;
        result.map_err(StoreError::from)
    }};
}

pub struct PgStore {
    pool: Pool,
    /// This store's number, written on the holds it makes (see `recover_open_holds`).
    owner: i64,
    /// The writer tasks that run holds, settles, voids and extensions in shared transactions
    /// (`batch`); None for a store opened read-only.
    batcher: Option<batch::Batcher>,
    /// The background task that rolls events up (`report`); None for a store opened read-only.
    _roller: Option<report::Roller>,
}

/// Writer tasks per store (see `batch`). One: the fixed cost of a transaction (its statements,
/// its commit) is shared by more writes when one writer takes them all; measured with 1, 2 and
/// 4 (docs/BENCHMARKS.md), one was fastest on one pool and on 1,000.
const WRITERS: usize = 1;

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`; a host that is a
    /// percent-encoded directory is a Unix socket), runs the migrations not yet applied, adds
    /// the built-in tiers that are missing, and takes this store's owner number.
    pub async fn open(url: &str) -> StoreResult<PgStore> {
        let mut config = parse_url(url)?;
        // A commit returns only once it is on disk, whatever the server's default says.
        const OPTIONS: &str = "-c synchronous_commit=on";
        let options = match config.get_options() {
            Some(given) => format!("{given} {OPTIONS}"),
            None => OPTIONS.to_string(),
        };
        let mut writer_config = config.clone();
        writer_config.options(format!("{options} {}", batch::WRITER_OPTIONS));
        config.options(options);
        let pool = build_pool(config)?;
        let mut client = pool.get().await.map_err(pool_error)?;
        schema::migrate(&mut client).await?;
        let owner: i64 =
            query_one(&client, "SELECT nextval('store_owners')", &[]).await?.try_get(0).map_err(Error::from)?;
        drop(client);
        let batcher = Some(batch::Batcher::start(writer_config, owner, WRITERS));
        let roller = Some(report::Roller::start(pool.clone()));
        Ok(PgStore { pool, owner, batcher, _roller: roller })
    }

    /// Opens an existing tollgate database only to read it (what `tollgate check` needs): no
    /// migration, no tier written, no owner number taken, and every transaction read-only.
    /// `NotFound` when the database does not exist; `Invalid` when it has no tollgate schema, or
    /// one of another version; `Backend` when the server cannot be reached.
    pub async fn open_read_only(url: &str) -> StoreResult<PgStore> {
        let mut config = parse_url(url)?;
        let options = match config.get_options() {
            Some(given) => format!("{given} -c default_transaction_read_only=on"),
            None => "-c default_transaction_read_only=on".to_string(),
        };
        config.options(options);
        let pool = build_pool(config)?;
        let client = pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
                StoreError::NotFound(format!("PostgreSQL database ({})", describe(&e)))
            }
            e => pool_error(e),
        })?;
        let has_schema: bool = query_one(&client, "SELECT to_regclass('schema_version') IS NOT NULL", &[])
            .await?
            .try_get(0)
            .map_err(Error::from)?;
        let found: Option<i32> = match has_schema {
            false => None,
            true => query_one(&client, "SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
                .await?
                .try_get(0)
                .map_err(Error::from)?,
        };
        let known = schema::VERSION;
        match found {
            None => {
                return Err(StoreError::Invalid(
                    "the database has no tollgate tables (no schema_version): it is not tollgate's".into(),
                ));
            }
            Some(v) if v != known => {
                return Err(StoreError::Invalid(format!(
                    "the database's tollgate schema is at version {v}, this tollgate reads version {known}{}",
                    if v < known { ": start `tollgate serve` on it once to migrate it" } else { ": upgrade tollgate" }
                )));
            }
            Some(_) => {}
        }
        drop(client);
        Ok(PgStore { pool, owner: 0, batcher: None, _roller: None })
    }

    /// Rolls up the events committed so far (what the store's background task does every
    /// `report::ROLL_EVERY`), waiting for the transactions that may still insert some of them;
    /// for a benchmark that loaded events outside the store. Reports are exact without it.
    pub async fn roll_up(&self) -> StoreResult<()> {
        let client = self.client().await?;
        let target: i64 = query_one(&client, report::LAST_SEQ, &[]).await?.try_get(0).map_err(Error::from)?;
        loop {
            // Waiting, or skipped while another process rolls up: both move on in time.
            report::roll_up(&self.pool).await?;
            let rolled: i64 = query_one(&client, "SELECT rolled_seq FROM rollup_progress", &[])
                .await?
                .try_get(0)
                .map_err(Error::from)?;
            if rolled >= target {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Runs a hold, settle, void or extension in the writer's next batch.
    async fn batched(&self, op: Op, now: DateTime<Utc>) -> StoreResult<Done> {
        match &self.batcher {
            Some(batcher) => batcher.run(op, now).await,
            None => Err(StoreError::Invalid("this store was opened read-only".into())),
        }
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }
}

fn parse_url(url: &str) -> StoreResult<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| StoreError::Invalid(format!("PostgreSQL url: {}", describe(&e))))?;
    if config.get_application_name().is_none() {
        config.application_name("tollgate");
    }
    // A server that does not answer is unavailable, not a wait without end (the url's
    // `connect_timeout` wins).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(5));
    }
    Ok(config)
}

fn build_pool(config: tokio_postgres::Config) -> StoreResult<Pool> {
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(CONNECTIONS_MAX)
        .build()
        .map_err(|e| StoreError::Backend(format!("cannot build the PostgreSQL pool: {e}")))
}

#[async_trait]
impl Store for PgStore {
    async fn put_tier(&self, tier: Tier) -> StoreResult<()> {
        let client = self.client().await?;
        Ok(rows::write_tier(&client, &tier, true).await?)
    }

    async fn tiers(&self) -> StoreResult<Vec<Tier>> {
        let client = self.client().await?;
        let found = query(&client, &format!("SELECT {} FROM tiers ORDER BY id", rows::TIER_COLUMNS), &[]).await?;
        Ok(found.iter().map(rows::tier).collect::<Result<_>>()?)
    }

    async fn create_account(&self, a: NewAccount, now: DateTime<Utc>) -> StoreResult<Account> {
        let account = a.into_account(now);
        write_tx!(self, |tx| async {
            if rows::load_tier(&tx, &account.tier).await?.is_none() {
                return Err(StoreError::Invalid(format!(
                    "unknown tier {:?}: create it first or pick an existing one",
                    account.tier
                ))
                .into());
            }
            let inserted = execute(
                &tx,
                "INSERT INTO accounts (id, tier, anchor_us, timezone, interactive_grant, programmatic_grant,
                     created_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[
                    &account.id,
                    &account.tier,
                    &us(account.anchor),
                    &account.timezone.name(),
                    &account.interactive_grant.map(|n| n.0),
                    &account.programmatic_grant.map(|n| n.0),
                    &us(now),
                ],
            )
            .await?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!("account {:?} already exists", account.id)).into());
            }
            Ok(account.clone())
        }
        .await)
    }

    async fn update_account(&self, id: &str, u: AccountUpdate) -> StoreResult<Account> {
        write_tx!(self, |tx| async {
            let row = query_opt(
                &tx,
                &format!("SELECT {} FROM accounts WHERE id = $1 FOR UPDATE", rows::ACCOUNT_COLUMNS),
                &[&id],
            )
            .await?;
            let account = match row {
                Some(r) => rows::account(&r)?,
                None => return Err(StoreError::NotFound(format!("account {id:?}")).into()),
            };
            if let Some(tier) = &u.tier
                && rows::load_tier(&tx, tier).await?.is_none()
            {
                return Err(StoreError::Invalid(format!("unknown tier {tier:?}")).into());
            }
            let state = u.moves_cycles(&account) && ledger::has_ledger_state(&tx, id).await?;
            let account = u.apply_to(account, state)?;
            execute(
                &tx,
                "UPDATE accounts SET tier = $2, anchor_us = $3, timezone = $4, interactive_grant = $5,
                     programmatic_grant = $6 WHERE id = $1",
                &[
                    &account.id,
                    &account.tier,
                    &us(account.anchor),
                    &account.timezone.name(),
                    &account.interactive_grant.map(|n| n.0),
                    &account.programmatic_grant.map(|n| n.0),
                ],
            )
            .await?;
            Ok(account)
        }
        .await)
    }

    async fn account(&self, id: &str) -> StoreResult<Option<Account>> {
        let client = self.client().await?;
        Ok(rows::load_account(&client, id).await?)
    }

    async fn accounts(&self) -> StoreResult<Vec<Account>> {
        let client = self.client().await?;
        let found = query(&client, &format!("SELECT {} FROM accounts ORDER BY id", rows::ACCOUNT_COLUMNS), &[]).await?;
        Ok(found.iter().map(rows::account).collect::<Result<_>>()?)
    }

    async fn set_policy(&self, account: &str, pool: PoolKind, p: PoolPolicy) -> StoreResult<()> {
        write_tx!(self, |tx| async {
            rows::require_account(&tx, account).await?;
            execute(
                &tx,
                "INSERT INTO policies (account, pool, on_exhausted, overage_cap, spend_cap) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account, pool) DO UPDATE SET on_exhausted = $3, overage_cap = $4, spend_cap = $5",
                &[
                    &account,
                    &pool.as_str(),
                    &p.on_exhausted.as_str(),
                    &p.overage_cap.map(|n| n.0),
                    &p.spend_cap.map(|n| n.0),
                ],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    async fn policy(&self, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy> {
        read_tx!(self, |tx| async {
            rows::require_account(&tx, account).await?;
            rows::load_policy(&tx, account, pool).await
        }
        .await)
    }

    async fn add_grant(&self, g: NewGrant, now: DateTime<Utc>) -> StoreResult<Grant> {
        write_tx!(self, |tx| ledger::add_grant(&tx, &g, now).await)
    }

    async fn grants(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Vec<Grant>> {
        read_tx!(self, |tx| async {
            let a = rows::require_account(&tx, account).await?;
            let cycle = a.cycle_anchor().cycle_at(now);
            let found = query(
                &tx,
                &format!(
                    "SELECT {} FROM grants WHERE account = $1 AND cycle_start_us = $2 ORDER BY id",
                    tollgate_store::rows::GRANT_COLUMNS
                ),
                &[&account, &us(cycle.start)],
            )
            .await?;
            found.iter().map(rows::grant).collect::<Result<Vec<_>>>()
        }
        .await)
    }

    async fn create_key(&self, k: NewKey, now: DateTime<Utc>) -> StoreResult<Key> {
        write_tx!(self, |tx| async {
            rows::require_account(&tx, &k.account).await?;
            // A taken id or secret hash: the key exists.
            let inserted = execute(
                &tx,
                "INSERT INTO keys (id, account, secret_hash, name, pool, labels, cap, created_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                &[
                    &k.id,
                    &k.account,
                    &k.secret_hash,
                    &k.name,
                    &k.pool.as_str(),
                    &rows::labels_to_text(&k.labels),
                    &k.cap.map(|n| n.0),
                    &us(now),
                ],
            )
            .await?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!("key {:?} already exists", k.id)).into());
            }
            Ok(Key {
                id: k.id.clone(),
                account: k.account.clone(),
                name: k.name.clone(),
                pool: k.pool,
                labels: k.labels.clone(),
                cap: k.cap,
                created_at: now,
                revoked_at: None,
            })
        }
        .await)
    }

    async fn keys(&self, account: &str) -> StoreResult<Vec<Key>> {
        read_tx!(self, |tx| async {
            rows::require_account(&tx, account).await?;
            let found = query(
                &tx,
                &format!("SELECT {} FROM keys WHERE account = $1 ORDER BY created_us, id", rows::KEY_COLUMNS),
                &[&account],
            )
            .await?;
            found.iter().map(rows::key).collect::<Result<Vec<_>>>()
        }
        .await)
    }

    async fn key_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Key>> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            &format!("SELECT {} FROM keys WHERE secret_hash = $1", rows::KEY_COLUMNS),
            &[&secret_hash],
        )
        .await?;
        Ok(row.as_ref().map(rows::key).transpose()?)
    }

    async fn revoke_key(&self, account: &str, key_id: &str, now: DateTime<Utc>) -> StoreResult<Key> {
        // A revoked key keeps its first revocation time.
        let client = self.client().await?;
        let row = query_opt(
            &client,
            &format!(
                "UPDATE keys SET revoked_us = COALESCE(revoked_us, $3) WHERE id = $1 AND account = $2 RETURNING {}",
                rows::KEY_COLUMNS
            ),
            &[&key_id, &account, &us(now)],
        )
        .await?;
        match row {
            Some(r) => Ok(rows::key(&r)?),
            None => Err(StoreError::NotFound(format!("key {key_id:?}"))),
        }
    }

    async fn balance(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Balance> {
        read_tx!(self, |tx| async {
            let a = rows::require_account(&tx, account).await?;
            let cycle = a.cycle_anchor().cycle_at(now);
            let tier = rows::load_tier(&tx, &a.tier)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("unknown tier {}", a.tier)))?;
            let mut pools = Vec::with_capacity(2);
            for kind in PoolKind::ALL {
                let policy = rows::load_policy(&tx, account, kind).await?;
                let row = query_opt(
                    &tx,
                    "SELECT grants, used, overage, held FROM pool_cycles
                     WHERE account = $1 AND pool = $2 AND cycle_start_us = $3",
                    &[&account, &kind.as_str(), &us(cycle.start)],
                )
                .await?;
                let tier_grant = a.grant_override(kind).unwrap_or(tier.grant(kind));
                let (grants, used, overage, held) = match row {
                    Some(r) => (Nanos(r.try_get(0)?), Nanos(r.try_get(1)?), Nanos(r.try_get(2)?), Nanos(r.try_get(3)?)),
                    None => (tier_grant, Nanos::ZERO, Nanos::ZERO, Nanos::ZERO),
                };
                pools.push(PoolBalance {
                    pool: kind,
                    policy,
                    grants,
                    used,
                    overage,
                    held,
                    limit: policy.limit(grants),
                });
            }
            let [interactive, programmatic]: [PoolBalance; 2] =
                pools.try_into().map_err(|_| StoreError::Backend("two pools expected".into()))?;
            Ok(Balance { account: a.id.clone(), tier: a.tier.clone(), cycle, pools: [interactive, programmatic] })
        }
        .await)
    }

    async fn hold(&self, request: HoldRequest, now: DateTime<Utc>) -> StoreResult<HoldOutcome> {
        self.batched(Op::Hold(request), now).await?.into_hold_outcome()
    }

    async fn settle(&self, request: SettleRequest, now: DateTime<Utc>) -> StoreResult<Event> {
        self.batched(Op::Settle(Box::new(request)), now).await?.into_event()
    }

    async fn settle_part(&self, request: SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Event> {
        self.batched(Op::SettlePart(Box::new(request), release), now).await?.into_event()
    }

    async fn void(&self, account: &str, hold_id: &str, now: DateTime<Utc>) -> StoreResult<Hold> {
        let op = Op::Void { account: account.to_string(), hold_id: hold_id.to_string() };
        self.batched(op, now).await?.into_hold()
    }

    async fn extend_hold(&self, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
        let op = Op::Extend { account: account.to_string(), hold_id: hold_id.to_string(), ttl_s };
        self.batched(op, now).await?.into_hold()
    }

    async fn hold_by_id(&self, account: &str, hold_id: &str) -> StoreResult<Option<Hold>> {
        let client = self.client().await?;
        Ok(rows::load_hold(&client, account, hold_id).await?.map(|r| r.hold))
    }

    async fn record_events(&self, events: Vec<NewEvent>, now: DateTime<Utc>) -> StoreResult<Vec<EventOutcome>> {
        write_tx!(self, |tx| ledger::record_events(&tx, &events, now).await)
    }

    async fn events(&self, q: EventQuery) -> StoreResult<Vec<Event>> {
        let mut sql = format!("SELECT {} FROM events WHERE account = $1", rows::EVENT_COLUMNS);
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(q.account.clone())];
        let mut push = |cond: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!(" AND {cond} ${}", args.len()));
        };
        if let Some(p) = q.pool {
            push("pool =", Box::new(p.as_str()));
        }
        if let Some(m) = &q.model {
            push("model =", Box::new(m.clone()));
        }
        if let Some(t) = q.since {
            push("ts_us >=", Box::new(us(t)));
        }
        if let Some(t) = q.until {
            push("ts_us <", Box::new(us(t)));
        }
        if let Some(s) = q.after_seq {
            push("seq >", Box::new(s));
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT {}", q.limit.clamp(1, 10_000)));
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
        let client = self.client().await?;
        let found = query(&client, &sql, &params).await?;
        Ok(found.iter().map(|r| rows::event(r).map(|e| e.event)).collect::<Result<_>>()?)
    }

    async fn expire_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        write_tx!(self, |tx| ledger::expire(&tx, now, Sweep::Expired).await)
    }

    /// Settles the holds past their time to live and the open holds this store made; never an
    /// open hold of another live process (see the crate's documentation).
    async fn recover_open_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        write_tx!(self, |tx| ledger::expire(&tx, now, Sweep::ExpiredAndOwnedBy(self.owner)).await)
    }

    async fn audit(&self) -> StoreResult<Audit> {
        read_tx!(self, |tx| audit::audit(&tx).await)
    }
}

mod alerts;
mod report;

pub use report::ROLL_EVERY;
