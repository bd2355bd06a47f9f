//! The writer thread, its group commit, the settings it caches, and the checkpointer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tollgate_core::{Nanos, PoolKind, PoolPolicy, Tier};
use tollgate_store::step::{AccountPool, KeyId, KeyTotals, Map, Plan, PoolId, PoolTotals, Terms};
use tollgate_store::{Account, StoreError, StoreResult};

use crate::rows::{self, backend};

/// Most jobs in one group commit.
const BATCH_JOBS_MAX: usize = 1024;

pub type Reply = Box<dyn FnOnce(Option<StoreError>) + Send>;
pub type Run = Box<dyn FnOnce(&Db) -> (Reply, bool) + Send>;

/// One write. `savepoint: false` is for ledger writes that refuse only before their first
/// change (hold, settle, void, extend): they run without a savepoint of their own, which saves
/// journaling every page they touch. If one fails after changing rows all the same (a disk
/// error), the whole batch is rolled back and every write in it fails.
pub struct Job {
    pub run: Run,
    pub savepoint: bool,
}

/// The write connection, with what every ledger write reads and changes kept in memory. The
/// writer is the only writer of the file, so what it keeps is the truth:
///
/// - settings (accounts, tiers, policies): a job that changes them calls
///   [`Db::settings_changed`]; a job or batch that rolls back empties this cache;
/// - the running totals of pools and keys per cycle (`pool_cycles`, `key_cycles`): changed in
///   memory by each job, written once per batch just before its commit ([`Db::flush`]). A job
///   that fails has its changes undone from an undo log, as its savepoint undoes its rows; a
///   batch whose commit fails forgets them all, to be read again from the file.
///
/// So a batch of 64 holds on one pool reads and writes that pool's row once, not 64 times.
pub struct Db {
    conn: Connection,
    settings: RefCell<Settings>,
    totals: RefCell<Totals>,
    /// Usage per hour added by this batch's events, written with its commit (`rollups`).
    rollups: RefCell<HashMap<RollupKey, RollupDelta>>,
    /// The ledger's plan, reused from write to write so that its memory is kept.
    plan: RefCell<Plan>,
}

/// (account, cycle start µs, pool, hour µs, model, source, key id, labels JSON).
pub type RollupKey = (String, i64, PoolKind, i64, String, String, String, String);

/// calls, input, 5m writes, 1h writes, cache reads, output, web searches, cost, charged,
/// latency ms sum, timed calls.
pub type RollupDelta = [i64; 11];

/// A cached row and whether it differs from the file.
#[derive(Clone, Copy)]
struct Cached<T> {
    value: T,
    dirty: bool,
}

enum Undo {
    Pool(PoolId, Option<Cached<PoolTotals>>),
    Key(KeyId, Option<Cached<KeyTotals>>),
    Rollup(RollupKey, Option<RollupDelta>),
}

/// Rows kept after a flush; beyond this the clean ones are dropped.
const TOTALS_KEPT_MAX: usize = 65_536;

#[derive(Default)]
struct Totals {
    pools: Map<PoolId, Cached<PoolTotals>>,
    keys: Map<KeyId, Cached<KeyTotals>>,
    /// What the running job changed, first value first.
    undo: Vec<Undo>,
}

#[derive(Default)]
struct Settings {
    accounts: Map<String, Account>,
    tiers: Map<String, Tier>,
    policies: Map<(String, PoolKind), PoolPolicy>,
    terms: Map<String, Terms>,
}

impl Deref for Db {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Db {
    pub fn new(conn: Connection) -> Db {
        Db {
            conn,
            settings: RefCell::default(),
            totals: RefCell::default(),
            rollups: RefCell::default(),
            plan: RefCell::default(),
        }
    }

    /// A pool's totals in a cycle; None when the cycle has no row yet.
    pub fn pool_totals(&self, id: &PoolId) -> StoreResult<Option<PoolTotals>> {
        if let Some(c) = self.totals.borrow().pools.get(id) {
            return Ok(Some(c.value));
        }
        let row = self
            .conn
            .prepare_cached(
                "SELECT grants, used, overage, held FROM pool_cycles
                 WHERE account = ?1 AND pool = ?2 AND cycle_start_us = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![id.0, id.1.as_str(), id.2], |r| {
                    Ok(PoolTotals {
                        grants: Nanos(r.get(0)?),
                        used: Nanos(r.get(1)?),
                        overage: Nanos(r.get(2)?),
                        held: Nanos(r.get(3)?),
                    })
                })
                .optional()
            })
            .map_err(backend)?;
        if let Some(value) = row {
            self.totals.borrow_mut().pools.insert(id.clone(), Cached { value, dirty: false });
        }
        Ok(row)
    }

    /// Creates a pool's row for a cycle, with its tier grant.
    pub fn create_pool(&self, id: &PoolId, cycle_end_us: i64, grants: Nanos) -> StoreResult<PoolTotals> {
        self.conn
            .prepare_cached(
                "INSERT INTO pool_cycles (account, pool, cycle_start_us, cycle_end_us, grants, used, overage, held)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, 0)",
            )
            .and_then(|mut s| s.execute(params![id.0, id.1.as_str(), id.2, cycle_end_us, grants.0]))
            .map_err(backend)?;
        let value = PoolTotals { grants, ..PoolTotals::default() };
        let mut totals = self.totals.borrow_mut();
        let before = totals.pools.insert(id.clone(), Cached { value, dirty: false });
        totals.undo.push(Undo::Pool(id.clone(), before));
        Ok(value)
    }

    /// Adds to a pool's totals (the row must exist); written to the file at the batch's end.
    pub fn add_to_pool(&self, id: &PoolId, add: PoolTotals) -> StoreResult<()> {
        let current = self
            .pool_totals(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("pool {} {} has no row for its cycle", id.0, id.1.as_str())))?;
        self.set_pool(id, current.plus(add)?);
        Ok(())
    }

    /// Sets a pool's totals (the row must exist); written to the file at the batch's end.
    pub fn set_pool(&self, id: &PoolId, value: PoolTotals) {
        let mut totals = self.totals.borrow_mut();
        let before = totals.pools.insert(id.clone(), Cached { value, dirty: true });
        totals.undo.push(Undo::Pool(id.clone(), before));
    }

    /// A key's totals in a cycle (zero when it has no row yet).
    pub fn key_totals(&self, id: &KeyId) -> StoreResult<KeyTotals> {
        if let Some(c) = self.totals.borrow().keys.get(id) {
            return Ok(c.value);
        }
        let value = self
            .conn
            .prepare_cached("SELECT charged, held FROM key_cycles WHERE key_id = ?1 AND cycle_start_us = ?2")
            .and_then(|mut s| {
                s.query_row(params![id.0, id.1], |r| {
                    Ok(KeyTotals { charged: Nanos(r.get(0)?), held: Nanos(r.get(1)?) })
                })
                .optional()
            })
            .map_err(backend)?;
        let cached = Cached { value: value.unwrap_or_default(), dirty: value.is_none() };
        self.totals.borrow_mut().keys.insert(id.clone(), cached);
        Ok(cached.value)
    }

    /// Sets a key's totals; written to the file at the batch's end.
    pub fn set_key(&self, id: &KeyId, value: KeyTotals) {
        let mut totals = self.totals.borrow_mut();
        let before = totals.keys.insert(id.clone(), Cached { value, dirty: true });
        totals.undo.push(Undo::Key(id.clone(), before));
    }

    /// Adds an event's usage to its hour's rollup (written at the batch's end).
    pub fn add_rollup(&self, key: RollupKey, delta: RollupDelta) {
        let before = {
            let mut rollups = self.rollups.borrow_mut();
            let entry = rollups.entry(key.clone()).or_insert([0; 11]);
            let before = *entry;
            for (a, d) in entry.iter_mut().zip(delta) {
                *a = a.saturating_add(d);
            }
            before
        };
        let before = (before != [0; 11]).then_some(before);
        self.totals.borrow_mut().undo.push(Undo::Rollup(key, before));
    }

    /// Writes every changed total to the file; the writer calls it just before COMMIT.
    fn flush(&self) -> StoreResult<()> {
        for ((account, cycle, pool, hour, model, source, key, labels), d) in self.rollups.borrow_mut().drain() {
            self.conn
                .prepare_cached(
                    "INSERT INTO rollups (account, cycle_start_us, pool, hour_us, model, source, key_id, labels, calls,
                         input_tokens, cache_creation_5m_input_tokens, cache_creation_1h_input_tokens,
                         cache_read_input_tokens, output_tokens, web_search_requests, cost, charged, latency_ms_sum, timed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
                     ON CONFLICT (account, cycle_start_us, pool, hour_us, model, source, key_id, labels) DO UPDATE SET
                         calls = calls + ?9, input_tokens = input_tokens + ?10,
                         cache_creation_5m_input_tokens = cache_creation_5m_input_tokens + ?11,
                         cache_creation_1h_input_tokens = cache_creation_1h_input_tokens + ?12,
                         cache_read_input_tokens = cache_read_input_tokens + ?13, output_tokens = output_tokens + ?14,
                         web_search_requests = web_search_requests + ?15, cost = cost + ?16, charged = charged + ?17,
                         latency_ms_sum = latency_ms_sum + ?18, timed = timed + ?19",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        account,
                        cycle,
                        pool.as_str(),
                        hour,
                        model,
                        source,
                        key,
                        labels,
                        d[0],
                        d[1],
                        d[2],
                        d[3],
                        d[4],
                        d[5],
                        d[6],
                        d[7],
                        d[8],
                        d[9],
                        d[10]
                    ])
                })
                .map_err(backend)?;
        }
        let mut totals = self.totals.borrow_mut();
        for (id, c) in totals.pools.iter_mut().filter(|(_, c)| c.dirty) {
            self.conn
                .prepare_cached(
                    "UPDATE pool_cycles SET grants = ?4, used = ?5, overage = ?6, held = ?7
                     WHERE account = ?1 AND pool = ?2 AND cycle_start_us = ?3",
                )
                .and_then(|mut s| {
                    let v = c.value;
                    s.execute(params![id.0, id.1.as_str(), id.2, v.grants.0, v.used.0, v.overage.0, v.held.0])
                })
                .map_err(backend)?;
            c.dirty = false;
        }
        for (id, c) in totals.keys.iter_mut().filter(|(_, c)| c.dirty) {
            self.conn
                .prepare_cached(
                    "INSERT INTO key_cycles (key_id, cycle_start_us, charged, held) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key_id, cycle_start_us) DO UPDATE SET charged = ?3, held = ?4",
                )
                .and_then(|mut s| s.execute(params![id.0, id.1, c.value.charged.0, c.value.held.0]))
                .map_err(backend)?;
            c.dirty = false;
        }
        if totals.pools.len() + totals.keys.len() > TOTALS_KEPT_MAX {
            totals.pools.clear();
            totals.keys.clear();
        }
        Ok(())
    }

    /// Undoes the running job's changes to the totals (its savepoint undoes its rows).
    fn undo_job(&self) {
        let mut totals = self.totals.borrow_mut();
        while let Some(undo) = totals.undo.pop() {
            match undo {
                Undo::Pool(id, Some(before)) => {
                    totals.pools.insert(id, before);
                }
                Undo::Pool(id, None) => {
                    totals.pools.remove(&id);
                }
                Undo::Key(id, Some(before)) => {
                    totals.keys.insert(id, before);
                }
                Undo::Key(id, None) => {
                    totals.keys.remove(&id);
                }
                Undo::Rollup(key, Some(before)) => {
                    self.rollups.borrow_mut().insert(key, before);
                }
                Undo::Rollup(key, None) => {
                    self.rollups.borrow_mut().remove(&key);
                }
            }
        }
    }

    fn end_job(&self) {
        self.totals.borrow_mut().undo.clear();
    }

    /// Forgets all totals, after a rollback of the whole batch.
    fn forget_totals(&self) {
        *self.totals.borrow_mut() = Totals::default();
        self.rollups.borrow_mut().clear();
    }

    /// The account, or `NotFound`.
    pub fn account(&self, id: &str) -> StoreResult<Account> {
        if let Some(a) = self.settings.borrow().accounts.get(id) {
            return Ok(a.clone());
        }
        let account = rows::require_account(&self.conn, id)?;
        self.settings.borrow_mut().accounts.insert(id.to_string(), account.clone());
        Ok(account)
    }

    pub fn tier(&self, id: &str) -> StoreResult<Option<Tier>> {
        if let Some(t) = self.settings.borrow().tiers.get(id) {
            return Ok(Some(t.clone()));
        }
        let tier = rows::load_tier(&self.conn, id)?;
        if let Some(t) = &tier {
            self.settings.borrow_mut().tiers.insert(id.to_string(), t.clone());
        }
        Ok(tier)
    }

    pub fn policy(&self, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy> {
        if let Some(p) = self.settings.borrow().policies.get(&AccountPool(account, pool)) {
            return Ok(*p);
        }
        let policy = rows::load_policy(&self.conn, account, pool)?;
        self.settings.borrow_mut().policies.insert((account.to_string(), pool), policy);
        Ok(policy)
    }

    /// An account with its tier and policies, as a ledger snapshot holds it; None when the
    /// account does not exist.
    pub fn terms(&self, id: &str) -> StoreResult<Option<Terms>> {
        if let Some(t) = self.settings.borrow().terms.get(id) {
            return Ok(Some(t.clone()));
        }
        let account = match self.account(id) {
            Ok(account) => account,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let terms = Terms {
            tier: self.tier(&account.tier)?.map(Arc::new),
            policies: [self.policy(id, PoolKind::Interactive)?, self.policy(id, PoolKind::Programmatic)?],
            account: Arc::new(account),
        };
        self.settings.borrow_mut().terms.insert(id.to_string(), terms.clone());
        Ok(Some(terms))
    }

    /// The ledger's plan, to reuse; give it back with [`Db::put_plan`].
    pub fn take_plan(&self) -> Plan {
        self.plan.take()
    }

    pub fn put_plan(&self, plan: Plan) {
        *self.plan.borrow_mut() = plan;
    }

    /// Forgets the cached settings; call after writing an account, tier or policy.
    pub fn settings_changed(&self) {
        *self.settings.borrow_mut() = Settings::default();
    }
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);
/// WAL frames (pages) beyond which the writer is asked to finish a checkpoint between two
/// batches, so that the WAL restarts from its beginning even under sustained load.
const WAL_FRAMES_RESTART: i64 = 16_384;

/// Copies committed WAL frames into the database file off the writer's path (PASSIVE: never
/// blocks the writer or readers). Under sustained writes a passive checkpoint never catches
/// the WAL's end, so when the WAL grows past `WAL_FRAMES_RESTART` it asks the writer to run one
/// between batches, when no write is in flight; the next write then restarts the WAL.
pub fn checkpointer(conn: Connection, stop: mpsc::Receiver<()>, restart_wal: &AtomicBool) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))) {
            Ok((log, _)) if log > WAL_FRAMES_RESTART => restart_wal.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; will retry"),
        }
    }
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "final WAL checkpoint failed; the next open replays the WAL");
    }
}

/// The writer loop: one transaction per batch of waiting jobs. The commit itself does not wait
/// for the disk (`synchronous = NORMAL`); the committed batch goes to the syncer thread, which
/// fsyncs the WAL and only then replies. So the writer runs the next batch while the disk
/// flushes the last one, and no reply is sent before its write is on disk.
pub fn writer(db: Db, wal_path: PathBuf, jobs: mpsc::Receiver<Job>, restart_wal: &AtomicBool) {
    let (committed, to_sync) = mpsc::channel::<Vec<Reply>>();
    #[allow(
        clippy::expect_used,
        reason = "started once, as the store opens: if the OS cannot start a thread then, the writer thread ends before its first job and every write fails with `the writer thread has stopped`"
    )]
    let syncer = std::thread::Builder::new()
        .name("tg-sqlite-sync".into())
        .spawn(move || syncer(&wal_path, to_sync))
        .expect("the WAL sync thread starts");
    let conn: &Connection = &db;
    while let Ok(first) = jobs.recv() {
        if restart_wal.swap(false, Ordering::Relaxed)
            && let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL checkpoint by the writer failed");
        }
        let mut batch = vec![first];
        while batch.len() < BATCH_JOBS_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let err = backend(e);
            for job in batch {
                let (reply, _) = run_failed(job, &err);
                reply(Some(err.clone()));
            }
            continue;
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut torn = false;
        for job in batch {
            let changes_before = conn.total_changes();
            let savepoint = job.savepoint && exec_cached(conn, "SAVEPOINT job").is_ok();
            let (reply, ok) = (job.run)(&db);
            if ok {
                db.end_job();
            } else {
                db.undo_job();
                db.settings_changed();
                torn |= !job.savepoint && conn.total_changes() != changes_before;
            }
            if savepoint {
                let end = if ok {
                    exec_cached(conn, "RELEASE job")
                } else {
                    conn.execute_batch("ROLLBACK TO job; RELEASE job")
                };
                if let Err(e) = end {
                    tracing::error!(error = %e, "savepoint failed");
                }
            }
            replies.push(reply);
        }
        let outcome = if torn {
            // Ledger writes return every refusal before their first change, so one that failed
            // after a change met the disk (full, or an I/O error): the store is unavailable.
            Err(StoreError::Unavailable("a write failed halfway, so its whole batch was rolled back; retry".into()))
        } else {
            db.flush().and_then(|()| exec_cached(conn, "COMMIT").map_err(backend))
        };
        match outcome {
            Ok(()) => {
                if let Err(mpsc::SendError(replies)) = committed.send(replies) {
                    let err = StoreError::Backend("the WAL sync thread has stopped".into());
                    replies.into_iter().for_each(|r| r(Some(err.clone())));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; every write in it is refused");
                let _ = conn.execute_batch("ROLLBACK");
                db.settings_changed();
                db.forget_totals();
                replies.into_iter().for_each(|r| r(Some(e.clone())));
            }
        }
    }
    drop(committed);
    let _ = syncer.join();
}

/// Fsyncs the WAL for every batch committed since the last fsync, then replies to them in
/// commit order. One fsync covers all batches that waited for it.
fn syncer(wal_path: &Path, committed: mpsc::Receiver<Vec<Reply>>) {
    let mut wal: Option<File> = None;
    while let Ok(mut replies) = committed.recv() {
        while let Ok(more) = committed.try_recv() {
            replies.extend(more);
        }
        let synced = match &wal {
            Some(file) => file.sync_data(),
            None => File::open(wal_path).and_then(|file| file.sync_data().map(|()| wal = Some(file))),
        };
        match synced {
            Ok(()) => replies.into_iter().for_each(|r| r(None)),
            Err(e) => {
                tracing::error!(error = %e, wal = %wal_path.display(), "fsync of the WAL failed");
                let err = StoreError::Backend(format!(
                    "the write is committed but not known to be on disk: fsync of {} failed: {e}",
                    wal_path.display()
                ));
                replies.into_iter().for_each(|r| r(Some(err.clone())));
            }
        }
    }
}

fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Gets the reply handle of a job whose transaction could not start. The job runs against a
/// scratch in-memory database, never the real file, and its reply carries the error.
pub fn run_failed(job: Job, _err: &StoreError) -> (Reply, bool) {
    #[allow(clippy::expect_used, reason = "an in-memory SQLite database fails to open only if memory runs out")]
    let scratch = Db::new(Connection::open_in_memory().expect("in-memory SQLite opens"));
    (job.run)(&scratch)
}
