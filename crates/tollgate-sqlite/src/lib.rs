//! The embedded SQLite backend of the store, tollgate's default.
//!
//! One writer thread owns the only write connection. Callers hand it jobs through a channel; it
//! takes every job waiting, runs them in one transaction (each inside its own savepoint, so a
//! failed job undoes only itself), commits with a full fsync (WAL, `synchronous = FULL`) and
//! only then replies. That group commit is what makes durable writes fast, and running every
//! ledger decision on the one writer inside the transaction is what makes holds atomic against
//! the limit. Reads use a small pool of separate connections (WAL readers never block the
//! writer). A lock file keeps a second process from writing the same database.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod alerts;
mod audit;
mod ledger;
mod report;
mod rows;
mod schema;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;
use tollgate_core::{Nanos, PoolKind, PoolPolicy, Tier};
use tollgate_store::{
    Account, AccountUpdate, Audit, Balance, Event, EventOutcome, EventQuery, Grant, Hold, HoldOutcome, HoldRequest,
    Key, NewAccount, NewEvent, NewGrant, NewKey, PoolBalance, SettleRequest, Store, StoreError, StoreResult,
};

use crate::rows::{backend, us};
use crate::writer::{Db, Job, Reply, Run};
use tollgate_store::step::{Op, PoolTotals};

const READERS: usize = 4;
/// Most idle reader connections kept after a burst.
const READERS_IDLE_MAX: usize = 16;

fn open_reader(path: &Path) -> StoreResult<Connection> {
    let r = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(backend)?;
    r.pragma_update(None, "busy_timeout", 5000).map_err(backend)?;
    Ok(r)
}

pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    /// Dropped with the store: stops the checkpointer.
    _checkpoint_stop: mpsc::Sender<()>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    _lock: Option<File>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Commits do not wait for the disk: the writer's syncer fsyncs the WAL before any reply
    // (see `writer::writer`), so an acknowledged write is on disk all the same.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    // Checkpoints run on their own thread (see `checkpointer`), not inside the writer's commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Savepoint journals in memory; a page cache large enough for the hot tables and indexes.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -65_536)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, runs migrations, seeds the built-in
    /// tiers that are missing, and starts the writer. Fails if another process has it open.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let lock_path = path.with_extension("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", lock_path.display())))?;
        lock.try_lock().map_err(|_| {
            StoreError::Backend(format!(
                "{} is in use by another tollgate process (lock {}); one process per SQLite file — use PostgreSQL \
                 to run several",
                path.display(),
                lock_path.display()
            ))
        })?;
        // The ledger is the owner's alone: a new database file (and SQLite's WAL and shared-memory
        // files, which take its mode) is readable and writable by the owner only, like the token
        // file. An existing file keeps the mode its owner gave it.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match File::options().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::Backend(format!("cannot create {}: {e}", path.display()))),
            }
        }
        let mut conn = Connection::open(path).map_err(backend)?;
        configure(&conn).map_err(backend)?;
        schema::migrate(&mut conn).map_err(backend)?;
        for tier in Tier::builtins() {
            rows::write_tier(&conn, &tier, false)?;
        }
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r =
                Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                    .map_err(backend)?;
            r.pragma_update(None, "busy_timeout", 5000).map_err(backend)?;
            readers.push(r);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let restart_wal = Arc::new(AtomicBool::new(false));
        let writer_restart = restart_wal.clone();
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        std::thread::Builder::new()
            .name("tg-sqlite-write".into())
            .spawn(move || writer::writer(Db::new(conn), wal_path, rx, &writer_restart))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        let checkpoint_conn = Connection::open(path).map_err(backend)?;
        checkpoint_conn.pragma_update(None, "busy_timeout", 5000).map_err(backend)?;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tg-sqlite-ckpt".into())
            .spawn(move || writer::checkpointer(checkpoint_conn, stop_rx, &restart_wal))
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(SqliteStore {
            jobs: tx,
            _checkpoint_stop: stop_tx,
            readers: Arc::new(Mutex::new(readers)),
            path: path.to_path_buf(),
            _lock: Some(lock),
        })
    }

    /// Opens a database read-only for inspection (`tollgate check`), without taking the lock.
    pub fn audit_file(path: &Path) -> StoreResult<Audit> {
        if !path.exists() {
            return Err(StoreError::NotFound(format!("database {}", path.display())));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
        match schema::version(&conn).map_err(backend)? {
            Some(schema::VERSION) => {}
            found => {
                let found = found.map_or_else(|| "none of its tables".to_string(), |v| format!("schema version {v}"));
                return Err(StoreError::Invalid(format!(
                    "{} is an SQLite database but not tollgate's, or from another version of it ({found}; this \
                     tollgate writes schema version {})",
                    path.display(),
                    schema::VERSION
                )));
            }
        }
        audit::audit(&conn)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer inside the current group commit, in a savepoint of its own so a
    /// failure undoes only it; replies once the commit is on disk.
    async fn write<T: Send + 'static>(&self, f: impl FnOnce(&Db) -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
        self.submit(f, true).await
    }

    /// A ledger write that returns every refusal before its first change, so it needs no
    /// savepoint (see [`writer::Job`]).
    async fn write_ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.submit(f, false).await
    }

    async fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> StoreResult<T> + Send + 'static,
        savepoint: bool,
    ) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        let run: Run = Box::new(move |db| {
            let result = f(db);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit_error| {
                let _ = tx.send(match commit_error {
                    Some(e) => Err(e),
                    None => result,
                });
            });
            (reply, ok)
        });
        self.jobs
            .send(Job { run, savepoint })
            .map_err(|_| StoreError::Backend("the writer thread has stopped".into()))?;
        rx.await.map_err(|_| StoreError::Backend("the writer thread has stopped".into()))?
    }

    /// A write that changes accounts, tiers or policies, which the writer caches.
    async fn write_settings<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.write(move |db| {
            let result = f(db);
            db.settings_changed();
            result
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // Every reader busy: open another one rather than fail; it joins the pool after.
            #[allow(clippy::expect_used, reason = "never poisoned: the reader pool is only locked to pop or push")]
            let pooled = readers.lock().expect("reader pool lock").pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = conn
                .execute_batch("BEGIN")
                .map_err(backend)
                .and_then(|_| f(&conn))
                .and_then(|v| conn.execute_batch("COMMIT").map(|_| v).map_err(backend));
            if result.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            #[allow(clippy::expect_used, reason = "never poisoned: the reader pool is only locked to pop or push")]
            let mut pool = readers.lock().expect("reader pool lock");
            if pool.len() < READERS_IDLE_MAX {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_tier(&self, tier: Tier) -> StoreResult<()> {
        self.write_settings(move |conn| {
            rows::write_tier(conn, &tier, true)?;
            Ok(())
        })
        .await
    }

    async fn tiers(&self) -> StoreResult<Vec<Tier>> {
        self.read(|conn| {
            let mut s = conn
                .prepare_cached(&format!("SELECT {} FROM tiers ORDER BY id", rows::TIER_COLUMNS))
                .map_err(backend)?;
            s.query_map([], rows::tier).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn create_account(&self, a: NewAccount, now: DateTime<Utc>) -> StoreResult<Account> {
        self.write_settings(move |conn| {
            if rows::load_tier(conn, &a.tier)?.is_none() {
                return Err(StoreError::Invalid(format!(
                    "unknown tier {:?}: create it first or pick an existing one",
                    a.tier
                )));
            }
            if rows::load_account(conn, &a.id)?.is_some() {
                return Err(StoreError::Conflict(format!("account {:?} already exists", a.id)));
            }
            let account = a.into_account(now);
            conn.execute(
                "INSERT INTO accounts (id, tier, anchor_us, timezone, interactive_grant, programmatic_grant, created_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    account.id,
                    account.tier,
                    us(account.anchor),
                    account.timezone.name(),
                    account.interactive_grant.map(|n| n.0),
                    account.programmatic_grant.map(|n| n.0),
                    us(now)
                ],
            )
            .map_err(backend)?;
            Ok(account)
        })
        .await
    }

    async fn update_account(&self, id: &str, u: AccountUpdate) -> StoreResult<Account> {
        let id = id.to_string();
        self.write_settings(move |conn| {
            let account = rows::require_account(conn, &id)?;
            if let Some(tier) = &u.tier
                && rows::load_tier(conn, tier)?.is_none()
            {
                return Err(StoreError::Invalid(format!("unknown tier {tier:?}")));
            }
            let state = u.moves_cycles(&account) && ledger::has_ledger_state(conn, &id)?;
            let account = u.apply_to(account, state)?;
            conn.execute(
                "UPDATE accounts SET tier = ?2, anchor_us = ?3, timezone = ?4, interactive_grant = ?5,
                     programmatic_grant = ?6 WHERE id = ?1",
                params![
                    account.id,
                    account.tier,
                    us(account.anchor),
                    account.timezone.name(),
                    account.interactive_grant.map(|n| n.0),
                    account.programmatic_grant.map(|n| n.0)
                ],
            )
            .map_err(backend)?;
            Ok(account)
        })
        .await
    }

    async fn account(&self, id: &str) -> StoreResult<Option<Account>> {
        let id = id.to_string();
        self.read(move |conn| rows::load_account(conn, &id)).await
    }

    async fn accounts(&self) -> StoreResult<Vec<Account>> {
        self.read(|conn| {
            let mut s = conn
                .prepare_cached(&format!("SELECT {} FROM accounts ORDER BY id", rows::ACCOUNT_COLUMNS))
                .map_err(backend)?;
            s.query_map([], rows::account).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn set_policy(&self, account: &str, pool: PoolKind, p: PoolPolicy) -> StoreResult<()> {
        let account = account.to_string();
        self.write_settings(move |conn| {
            rows::require_account(conn, &account)?;
            conn.execute(
                "INSERT INTO policies (account, pool, on_exhausted, overage_cap, spend_cap) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account, pool) DO UPDATE SET on_exhausted = ?3, overage_cap = ?4, spend_cap = ?5",
                params![
                    account,
                    pool.as_str(),
                    p.on_exhausted.as_str(),
                    p.overage_cap.map(|n| n.0),
                    p.spend_cap.map(|n| n.0)
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn policy(&self, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy> {
        let account = account.to_string();
        self.read(move |conn| {
            rows::require_account(conn, &account)?;
            rows::load_policy(conn, &account, pool)
        })
        .await
    }

    async fn add_grant(&self, g: NewGrant, now: DateTime<Utc>) -> StoreResult<Grant> {
        self.write(move |conn| {
            if g.amount <= Nanos::ZERO {
                return Err(StoreError::Invalid("a grant's amount must be positive".into()));
            }
            let account = rows::require_account(conn, &g.account)?;
            let cycle = account.cycle_anchor().cycle_at(now);
            ledger::pool_cycle(conn, &account, g.pool, &cycle)?;
            let grant = Grant::top_up(&g, &cycle, now);
            let id = ledger::insert_grant(conn, &grant)?;
            let top_up = PoolTotals { grants: g.amount, ..PoolTotals::default() };
            conn.add_to_pool(&(g.account.clone(), g.pool, us(cycle.start)), top_up)?;
            Ok(Grant { id, ..grant })
        })
        .await
    }

    async fn grants(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Vec<Grant>> {
        let account = account.to_string();
        self.read(move |conn| {
            let a = rows::require_account(conn, &account)?;
            let cycle = a.cycle_anchor().cycle_at(now);
            let mut s = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM grants WHERE account = ?1 AND cycle_start_us = ?2 ORDER BY id",
                    tollgate_store::rows::GRANT_COLUMNS
                ))
                .map_err(backend)?;
            s.query_map(params![account, us(cycle.start)], rows::grant).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn create_key(&self, k: NewKey, now: DateTime<Utc>) -> StoreResult<Key> {
        self.write(move |conn| {
            rows::require_account(conn, &k.account)?;
            conn.execute(
                "INSERT INTO keys (id, account, secret_hash, name, pool, labels, cap, created_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    k.id,
                    k.account,
                    k.secret_hash,
                    k.name,
                    k.pool.as_str(),
                    rows::labels_to_text(&k.labels),
                    k.cap.map(|n| n.0),
                    us(now)
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    StoreError::Conflict(format!("key {:?} already exists", k.id))
                }
                e => backend(e),
            })?;
            Ok(Key {
                id: k.id,
                account: k.account,
                name: k.name,
                pool: k.pool,
                labels: k.labels,
                cap: k.cap,
                created_at: now,
                revoked_at: None,
            })
        })
        .await
    }

    async fn keys(&self, account: &str) -> StoreResult<Vec<Key>> {
        let account = account.to_string();
        self.read(move |conn| {
            rows::require_account(conn, &account)?;
            let mut s = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM keys WHERE account = ?1 ORDER BY created_us, id",
                    rows::KEY_COLUMNS
                ))
                .map_err(backend)?;
            s.query_map([account], rows::key).and_then(|r| r.collect()).map_err(backend)
        })
        .await
    }

    async fn key_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Key>> {
        let hash = secret_hash.to_string();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {} FROM keys WHERE secret_hash = ?1", rows::KEY_COLUMNS))
                .and_then(|mut s| s.query_row([hash], rows::key).optional())
                .map_err(backend)
        })
        .await
    }

    async fn revoke_key(&self, account: &str, key_id: &str, now: DateTime<Utc>) -> StoreResult<Key> {
        let (account, key_id) = (account.to_string(), key_id.to_string());
        self.write(move |conn| {
            let key = conn
                .prepare_cached(&format!("SELECT {} FROM keys WHERE id = ?1 AND account = ?2", rows::KEY_COLUMNS))
                .and_then(|mut s| s.query_row([&key_id, &account], rows::key).optional())
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("key {key_id:?}")))?;
            if key.revoked_at.is_some() {
                return Ok(key);
            }
            conn.execute("UPDATE keys SET revoked_us = ?2 WHERE id = ?1", params![key_id, us(now)]).map_err(backend)?;
            Ok(Key { revoked_at: Some(now), ..key })
        })
        .await
    }

    async fn balance(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Balance> {
        let account = account.to_string();
        self.read(move |conn| {
            let a = rows::require_account(conn, &account)?;
            let cycle = a.cycle_anchor().cycle_at(now);
            let tier = rows::load_tier(conn, &a.tier)?
                .ok_or_else(|| StoreError::Corrupt(format!("unknown tier {}", a.tier)))?;
            let pool = |kind: PoolKind| -> StoreResult<PoolBalance> {
                let policy = rows::load_policy(conn, &account, kind)?;
                let row = conn
                    .prepare_cached(
                        "SELECT grants, used, overage, held FROM pool_cycles
                         WHERE account = ?1 AND pool = ?2 AND cycle_start_us = ?3",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![account, kind.as_str(), us(cycle.start)], |r| {
                            Ok((Nanos(r.get(0)?), Nanos(r.get(1)?), Nanos(r.get(2)?), Nanos(r.get(3)?)))
                        })
                        .optional()
                    })
                    .map_err(backend)?;
                let tier_grant = a.grant_override(kind).unwrap_or(tier.grant(kind));
                let (grants, used, overage, held) = row.unwrap_or((tier_grant, Nanos::ZERO, Nanos::ZERO, Nanos::ZERO));
                Ok(PoolBalance { pool: kind, policy, grants, used, overage, held, limit: policy.limit(grants) })
            };
            Ok(Balance {
                account: a.id.clone(),
                tier: a.tier.clone(),
                cycle,
                pools: [pool(PoolKind::Interactive)?, pool(PoolKind::Programmatic)?],
            })
        })
        .await
    }

    async fn hold(&self, request: HoldRequest, now: DateTime<Utc>) -> StoreResult<HoldOutcome> {
        self.write_ledger(move |db| ledger::run_one(db, Op::Hold(request), now)?.into_hold_outcome()).await
    }

    async fn settle(&self, request: SettleRequest, now: DateTime<Utc>) -> StoreResult<Event> {
        self.write_ledger(move |db| ledger::run_one(db, Op::Settle(Box::new(request)), now)?.into_event()).await
    }

    async fn settle_part(&self, request: SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Event> {
        self.write_ledger(move |db| ledger::run_one(db, Op::SettlePart(Box::new(request), release), now)?.into_event())
            .await
    }

    async fn void(&self, account: &str, hold_id: &str, now: DateTime<Utc>) -> StoreResult<Hold> {
        let (account, hold_id) = (account.to_string(), hold_id.to_string());
        self.write_ledger(move |db| ledger::run_one(db, Op::Void { account, hold_id }, now)?.into_hold()).await
    }

    async fn extend_hold(&self, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
        let (account, hold_id) = (account.to_string(), hold_id.to_string());
        self.write_ledger(move |db| ledger::run_one(db, Op::Extend { account, hold_id, ttl_s }, now)?.into_hold()).await
    }

    async fn hold_by_id(&self, account: &str, hold_id: &str) -> StoreResult<Option<Hold>> {
        let (account, hold_id) = (account.to_string(), hold_id.to_string());
        self.read(move |conn| Ok(rows::load_hold(conn, &account, &hold_id)?.map(|r| r.hold))).await
    }

    async fn record_events(&self, events: Vec<NewEvent>, now: DateTime<Utc>) -> StoreResult<Vec<EventOutcome>> {
        // The writer runs the whole batch in one savepoint: a failure undoes all of it.
        self.write(move |db| ledger::record_events(db, events, now)).await
    }

    async fn events(&self, q: EventQuery) -> StoreResult<Vec<Event>> {
        self.read(move |conn| {
            let mut sql = format!("SELECT {} FROM events WHERE account = ?1", rows::EVENT_COLUMNS);
            let mut args: Vec<rusqlite::types::Value> = vec![q.account.clone().into()];
            let mut push = |cond: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&format!(" AND {cond} ?{}", args.len()));
            };
            if let Some(p) = q.pool {
                push("pool =", p.as_str().to_string().into());
            }
            if let Some(m) = &q.model {
                push("model =", m.clone().into());
            }
            if let Some(t) = q.since {
                push("ts_us >=", us(t).into());
            }
            if let Some(t) = q.until {
                push("ts_us <", us(t).into());
            }
            if let Some(s) = q.after_seq {
                push("seq >", s.into());
            }
            sql.push_str(&format!(" ORDER BY seq LIMIT {}", q.limit.clamp(1, 10_000)));
            let mut s = conn.prepare(&sql).map_err(backend)?;
            s.query_map(rusqlite::params_from_iter(args), |r| rows::event(r).map(|e| e.event))
                .and_then(|r| r.collect())
                .map_err(backend)
        })
        .await
    }

    async fn expire_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        self.write(move |conn| ledger::expire(conn, now, false)).await
    }

    async fn recover_open_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        self.write(move |conn| ledger::expire(conn, now, true)).await
    }

    async fn audit(&self) -> StoreResult<Audit> {
        self.read(audit::audit).await
    }
}
