//! Group commit of the ledger's hot writes: holds, settles (whole, or a part of a lease), voids
//! and extensions.
//!
//! One transaction per hold cannot go fast on one hot pool: its row is locked from the hold's
//! first read until its commit is on disk, so the writes of every process to that pool go one
//! commit (one WAL flush) at a time. So each store sends these writes to its writer task, which
//! takes every write waiting and runs them all in one transaction, on a connection of its own,
//! in four round trips when no other transaction holds its rows (steps 2 and 3 take one more
//! each for rows a write must wait for, and another when every row was held):
//!
//! 1. `BEGIN` and the reads the decisions need, sent together: each account with its tier and
//!    policies, the caps of the keys named; the existing holds the batch names, locked (the
//!    first step of the lock order in `ledger`);
//! 2. the batch's pool rows, locked in (account, pool, cycle start) order, skipping the rows
//!    other transactions hold (the missing ones created with their tier grant first);
//! 3. its key rows, likewise, in (key, cycle start) order (only when a write has a key);
//! 4. then each write is decided in arrival order with `tollgate-core`, on running totals in
//!    memory: every refusal and error comes before a write's first change, so one write's
//!    refusal or error is its own and the others go on. The event-order locks, one statement
//!    that writes everything (new holds and events, settled, voided and extended holds, the rest
//!    of leases charged in parts, pool and key totals) and `COMMIT` are then sent together; every
//!    write of the batch is answered after the commit.
//!
//! Every row a decision depends on stays locked until the commit, as in a transaction of its
//! own, so a `block` limit still holds exactly across processes. A pool or key row that another
//! transaction holds (another process's batch) is not waited for while other rows of the batch
//! could be locked: the writes that need it are put off to the next batch, up to
//! [`PUT_OFF_MAX`] times (see [`lock_pools`]). So writes sent at the same moment by different
//! callers may be decided in another order than they arrived (two holds of one id on two pools:
//! the one put off finds the other's); a caller waits for its own write's answer, so one caller's
//! writes keep their order.
//!
//! A batch that meets a deadlock, a serialization failure or an id inserted meanwhile by another
//! transaction (a unique violation) runs again from the start; a batch that fails otherwise runs
//! again one write at a time, so that the write at fault fails alone. Whether the event id a
//! settle takes is taken already is not read on a first attempt: its insert fails, and the batch
//! runs again "carefully", reading it (see [`batch`]).
//!
//! Plans. The statements are prepared once per connection and planned once (generic plans):
//! no planning per batch. They look rows up by arrays of ids, and a generic plan chosen while a
//! table was small (a sequential scan, the table driving a join, or another index than the one
//! that matches) would stay cached as the table grows. So each lookup is a `LATERAL` subquery
//! driven by the array (the array's rows first, then one probe each of the only index that
//! matches), updates find their rows by the `ctid`s read under the locks (a TID scan), and the
//! writer's connection sets `enable_seqscan = off`: no statement here has a plan whose cost
//! grows with a table.

mod statements;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use tollgate_core::{Cycle, Nanos, PoolPolicy};
use tollgate_store::step::{self, Done, EventRef, HoldEntry, KeyId, KeyTotals, Op, Plan, PoolId, PoolTotals, Terms};
use tollgate_store::{Hold, HoldOutcome, HoldRequest, HoldState, StoreError, StoreResult};

use crate::events;
use crate::ledger::EVENT_ORDER_LOCK;
use crate::rows::{self, us};
use crate::{ATTEMPTS_MAX, Error, Result};
use statements::{Conn, Tid};

/// Most writes in one transaction.
const BATCH_JOBS_MAX: usize = 512;

/// How many times a write may be put off to the next batch because a pool or key row it needs
/// is locked by another transaction, before its batch waits for that row (see [`lock_pools`]).
const PUT_OFF_MAX: u8 = 2;

/// Settings of a writer's connection, beyond the store's (see "Plans" above).
pub const WRITER_OPTIONS: &str = "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan";

struct Job {
    op: Op,
    now: DateTime<Utc>,
    reply: oneshot::Sender<StoreResult<Done>>,
    /// How many batches have put it off.
    put_off: u8,
}

/// The sending end of a store's writer tasks.
pub struct Batcher {
    writers: Vec<mpsc::UnboundedSender<Job>>,
}

impl Batcher {
    /// Starts `writers` writer tasks (in the current tokio runtime), each with a connection of
    /// its own made from `config`; they stop when the batcher is dropped. Each account's writes
    /// go to one of them (by a hash of its id): the writers' batches touch different pools and
    /// do not wait for each other's locks.
    pub fn start(config: tokio_postgres::Config, owner: i64, writers: usize) -> Batcher {
        let writers = (0..writers.max(1))
            .map(|_| {
                let (jobs, waiting) = mpsc::unbounded_channel();
                tokio::spawn(writer(config.clone(), owner, waiting));
                jobs
            })
            .collect();
        Batcher { writers }
    }

    /// Runs `op` in a coming batch and returns its result once that batch is committed.
    pub async fn run(&self, op: Op, now: DateTime<Utc>) -> StoreResult<Done> {
        // FNV-1a, so that an account goes to the same writer whatever the process.
        let hash = op
            .account()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let writer = &self.writers[(hash % self.writers.len() as u64) as usize];
        let (reply, answer) = oneshot::channel();
        writer
            .send(Job { op, now, reply, put_off: 0 })
            .map_err(|_| StoreError::Backend("the store's writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the store's writer stopped before answering".into()))?
    }
}

async fn writer(config: tokio_postgres::Config, owner: i64, mut waiting: mpsc::UnboundedReceiver<Job>) {
    let mut conn: Option<Conn> = None;
    // Writes the last batch put off: the first of the next.
    let mut later: Vec<Job> = Vec::new();
    loop {
        let mut jobs = std::mem::take(&mut later);
        if jobs.is_empty() {
            match waiting.recv().await {
                Some(first) => jobs.push(first),
                None => break,
            }
        }
        while jobs.len() < BATCH_JOBS_MAX {
            match waiting.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let work: Vec<Work<'_>> = jobs.iter().map(|j| (&j.op, j.now)).collect();
        let must_wait: Vec<bool> = jobs.iter().map(|j| j.put_off >= PUT_OFF_MAX).collect();
        let results = run(&config, &mut conn, owner, &work, &must_wait).await;
        drop(work);
        for (mut job, result) in jobs.into_iter().zip(results) {
            match result {
                // A caller that went away does not need its answer.
                Some(result) => drop(job.reply.send(result)),
                None => {
                    job.put_off += 1;
                    later.push(job);
                }
            }
        }
    }
}

type Work<'a> = (&'a Op, DateTime<Utc>);

/// A write's result, or None when its batch put it off to the next one.
type Answer = Option<StoreResult<Done>>;

/// Runs a batch; one answer per write, in order. `must_wait` tells, for each write, whether its
/// batch must wait for the rows it needs rather than put it off.
#[allow(clippy::expect_used, reason = "a batch answers each of its jobs once: a write run alone has one answer")]
async fn run(
    config: &tokio_postgres::Config,
    conn: &mut Option<Conn>,
    owner: i64,
    jobs: &[Work<'_>],
    must_wait: &[bool],
) -> Vec<Answer> {
    match attempts(config, conn, owner, jobs, must_wait).await {
        Ok(results) => results,
        Err(e) if jobs.len() > 1 => {
            tracing::debug!(error = %e, jobs = jobs.len(), "a batch failed: its writes run again one by one");
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(match attempts(config, conn, owner, std::slice::from_ref(job), &[true]).await {
                    Ok(mut one) => one.pop().expect("one result for one write"),
                    Err(e) => Some(Err(e)),
                });
            }
            results
        }
        Err(e) => vec![Some(Err(e))],
    }
}

/// Runs a batch in one transaction, again from the start when that may succeed.
async fn attempts(
    config: &tokio_postgres::Config,
    conn: &mut Option<Conn>,
    owner: i64,
    jobs: &[Work<'_>],
    must_wait: &[bool],
) -> StoreResult<Vec<Answer>> {
    let mut attempt = 1u32;
    let mut careful = false;
    loop {
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            *conn = Some(Conn::connect(config).await?);
        }
        #[allow(clippy::expect_used, reason = "conn was set just above when it was None or closed")]
        let c = conn.as_ref().expect("connected above");
        let result = batch(c, owner, jobs, must_wait, careful).await;
        if result.is_err() {
            // Whatever the batch sent, nothing of it stays: end the transaction if one is open.
            let _ = c.client.execute(&c.st.rollback, &[]).await;
        }
        match result {
            Ok(results) => return Ok(results),
            Err(e) if e.retryable() && attempt < ATTEMPTS_MAX => {
                tracing::debug!(attempt, error = ?e, "batch runs again");
                careful |= matches!(e, Error::Retry);
                attempt += 1;
            }
            Err(e) => {
                // A connection that failed otherwise is made anew for the next batch (its
                // statements prepared again, e.g. after a migration changed a table).
                *conn = None;
                return Err(StoreError::from(e));
            }
        }
    }
}

/// A write's result, or `Later`: put off to the next batch.
#[allow(clippy::large_enum_variant, reason = "short-lived, one per write of a batch: not worth a box")]
enum Outcome {
    Planned(StoreResult<step::Outcome>),
    Later,
}

/// What a batch read, locked and decided.
#[derive(Default)]
struct State {
    /// The snapshot and what the writes decided on it.
    plan: Plan,
    /// Where the rows read under their locks are (a TID scan updates them).
    hold_tids: HashMap<(String, String), Tid>,
    pool_tids: HashMap<PoolId, Tid>,
    key_tids: HashMap<KeyId, Tid>,
    /// The writes (their places in the batch) put off to the next batch: a row they need is
    /// locked by another transaction.
    later: HashSet<usize>,
}

fn sorted<T: Ord>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    items.into_iter().collect::<BTreeSet<T>>().into_iter().collect()
}

/// A hold row read with `HOLD_LOCK_COLUMNS`, and where it is.
fn hold_entry(r: &Row) -> Result<(HoldEntry, Tid)> {
    let row = rows::hold(r)?;
    Ok((HoldEntry::read(row.hold, row.fingerprint, row.event_seq), r.try_get(16)?))
}

/// One attempt at a batch. A first attempt does not look up whether the event ids its settles
/// take are taken (that lookup would need a plan per batch, see "Plans"): the insert of a taken
/// id fails the attempt (a unique violation) and the batch runs again carefully, reading them
/// with plans made for its parameters.
async fn batch(c: &Conn, owner: i64, jobs: &[Work<'_>], must_wait: &[bool], careful: bool) -> Result<Vec<Answer>> {
    let mut s = State::default();
    s.plan.snapshot.knows_taken = careful;
    read(c, &mut s, jobs).await?;
    lock_pools(c, &mut s, jobs, must_wait).await?;
    lock_keys(c, &mut s, jobs, must_wait).await?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (i, (op, now)) in jobs.iter().enumerate() {
        outcomes.push(if s.later.contains(&i) { Outcome::Later } else { Outcome::Planned(s.plan.decide(op, *now)) });
    }
    if s.plan.needs_taken {
        return Err(Error::Retry);
    }
    let seqs = write(c, &s, owner, jobs, &mut outcomes).await.map_err(|e| match &e {
        // A hold or event id inserted by another transaction since it was checked: run again,
        // and the checks see it.
        Error::Pg(pg) if pg.code() == Some(&SqlState::UNIQUE_VIOLATION) => Error::Retry,
        _ => e,
    })?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Planned(result) => Some(result.map(|o| o.answer(&s.plan, &seqs))),
            Outcome::Later => None,
        })
        .collect())
}

/// `BEGIN` and every read of the batch, sent together: accounts, their tiers and policies, the
/// caps of the keys the holds name; the existing holds the batch names, locked in (account, id)
/// order (the first step of the lock order); which event ids its settles would take are taken.
async fn read(c: &Conn, s: &mut State, jobs: &[Work<'_>]) -> Result<()> {
    let accounts: Vec<&str> = sorted(jobs.iter().map(|(op, _)| op.account()));
    let keys: Vec<&str> = sorted(jobs.iter().filter_map(|(op, _)| op.key()));
    let named: Vec<(&str, &str)> = sorted(jobs.iter().filter_map(|(op, _)| op.hold_key()));
    let (hold_accounts, hold_ids): (Vec<&str>, Vec<&str>) = named.into_iter().unzip();
    let settles: Vec<(&str, &str)> = sorted(jobs.iter().filter_map(|(op, _)| op.event_key()));
    let (event_accounts, event_ids): (Vec<&str>, Vec<&str>) = settles.into_iter().unzip();
    let (st, client) = (&c.st, &c.client);
    let (_, _, setting_rows, key_rows, hold_rows, taken_rows) = tokio::try_join!(
        client.execute(&st.begin, &[]),
        async { if s.plan.snapshot.knows_taken { client.execute(&st.custom_plans, &[]).await } else { Ok(0) } },
        async { client.query(&st.settings, &[&accounts]).await },
        async { if keys.is_empty() { Ok(Vec::new()) } else { client.query(&st.keys, &[&keys]).await } },
        async { client.query(&st.lock_holds, &[&hold_accounts, &hold_ids]).await },
        async {
            if event_ids.is_empty() || !s.plan.snapshot.knows_taken {
                Ok(Vec::new())
            } else {
                client.query(&st.taken, &[&event_accounts, &event_ids]).await
            }
        },
    )?;
    let snap = &mut s.plan.snapshot;
    for r in &setting_rows {
        let account = rows::account(r)?;
        let tier = match r.try_get::<_, Option<String>>(7)? {
            Some(_) => Some(Arc::new(rows::tier_at(r, 7)?)),
            None => None,
        };
        let mut policies = [PoolPolicy::default(); 2];
        for (policy, at) in policies.iter_mut().zip([12, 15]) {
            if r.try_get::<_, Option<String>>(at)?.is_some() {
                *policy = rows::policy(r, at)?;
            }
        }
        snap.accounts.insert(account.id.clone(), Terms { account: Arc::new(account), tier, policies });
    }
    for r in &key_rows {
        snap.keys.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get::<_, Option<i64>>(2)?.map(Nanos)));
    }
    for r in &hold_rows {
        let (entry, tid) = hold_entry(r)?;
        let key = (entry.hold.account.clone(), entry.hold.id.clone());
        s.hold_tids.insert(key.clone(), tid);
        snap.holds.insert(key, entry);
    }
    for r in &taken_rows {
        let row = rows::event(r)?;
        snap.taken.insert((row.event.account.clone(), row.event.id.clone()), (row.fingerprint, row.event));
    }
    // The first events of settled holds that settles name again (a settle repeated): rare.
    let repeated: Vec<i64> = jobs
        .iter()
        .filter_map(|(op, _)| match op {
            Op::Settle(r) => snap.holds.get(&(r.account.clone(), r.hold_id.clone())),
            _ => None,
        })
        .filter(|h| h.hold.state == HoldState::Settled)
        .filter_map(|h| match h.event {
            Some(EventRef::Seq(seq)) => Some(seq),
            _ => None,
        })
        .collect();
    if !repeated.is_empty() {
        for r in client.query(&st.events_by_seq, &[&repeated]).await? {
            let e = rows::event(&r)?;
            snap.settled_events.insert(e.event.seq, (e.fingerprint, e.event));
        }
    }
    Ok(())
}

/// The writes of a batch that need one pool or key row, and whether one of them must wait for
/// it (it was put off [`PUT_OFF_MAX`] times already).
#[derive(Default)]
struct Need {
    jobs: Vec<usize>,
    wait: bool,
}

impl Need {
    fn add(&mut self, job: usize, must_wait: &[bool]) {
        self.jobs.push(job);
        self.wait |= must_wait[job];
    }
}

/// Whether a lock waits for a row another transaction holds, or leaves the row out.
#[derive(Clone, Copy, PartialEq)]
enum Lock {
    Wait,
    Skip,
}

/// The rows of `needs` to lock waiting (some write must wait) and the others, each in order.
fn wait_or_skip<K: Ord>(needs: &BTreeMap<K, Need>) -> (Vec<&K>, Vec<&K>) {
    let (mut wait, mut skip) = (Vec::new(), Vec::new());
    for (id, need) in needs {
        if need.wait { wait.push(id) } else { skip.push(id) }
    }
    (wait, skip)
}

/// After rows were locked skipping: the ones not locked (`busy`) are held by
/// another transaction (or do not exist yet). When every row the batch needs is busy, nothing
/// is gained by putting writes off: returns them, to be locked waiting. Otherwise the writes
/// that need them are put off to the next batch and nothing is returned.
fn put_off_busy<K: Ord>(later: &mut HashSet<usize>, needs: &mut BTreeMap<K, Need>, busy: Vec<K>) -> Vec<K> {
    if busy.len() == needs.len() {
        return busy;
    }
    for id in busy {
        if let Some(need) = needs.remove(&id) {
            later.extend(need.jobs);
        }
    }
    Vec::new()
}

/// Locks the pool rows the batch changes, in (account, pool, cycle start) order, creating with
/// their tier grant the ones a hold or settle needs and that do not exist yet (the first write
/// of a cycle: rare). A row another transaction creates meanwhile is waited for, then found.
///
/// Another process's batch may hold some of these rows until its commit. Waiting for it would
/// leave this batch's other writes waiting too (with 1,000 pools, four processes' batches of a
/// few dozen writes each often share a pool), so rows held elsewhere are skipped and the writes
/// that need them are put off to the next batch, where they come first; a write put off
/// [`PUT_OFF_MAX`] times is waited for, and so is every row when none could be locked (one hot
/// pool: putting off would gain nothing). A pool row that does not exist yet looks held: the
/// write that creates it is put off like the others (the first write of a cycle, under load).
async fn lock_pools(c: &Conn, s: &mut State, jobs: &[Work<'_>], must_wait: &[bool]) -> Result<()> {
    let mut needs: BTreeMap<PoolId, Need> = BTreeMap::new();
    // Pool → the tier grant and cycle to create it with, when a write may create it.
    let mut create: BTreeMap<PoolId, (Nanos, Cycle)> = BTreeMap::new();
    for (i, (op, now)) in jobs.iter().enumerate() {
        let Some((id, creating)) = s.plan.snapshot.needs(op, *now).pool else { continue };
        if let Some(c) = creating {
            create.insert(id.clone(), c);
        }
        needs.entry(id).or_default().add(i, must_wait);
    }
    if needs.is_empty() {
        return Ok(());
    }
    let (waiting, skipping) = wait_or_skip(&needs);
    lock_pool_rows(c, s, &waiting, Lock::Wait).await?;
    lock_pool_rows(c, s, &skipping, Lock::Skip).await?;
    let busy: Vec<PoolId> =
        skipping.into_iter().filter(|id| !s.plan.snapshot.pools.contains_key(*id)).cloned().collect();
    let busy = put_off_busy(&mut s.later, &mut needs, busy);
    lock_pool_rows(c, s, &busy.iter().collect::<Vec<_>>(), Lock::Wait).await?;
    let missing: Vec<(&PoolId, &(Nanos, Cycle))> = needs
        .keys()
        .filter(|id| !s.plan.snapshot.pools.contains_key(*id))
        .filter_map(|id| create.get(id).map(|c| (id, c)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut created = Vec::new();
    for (id, (grant, cycle)) in missing {
        let inserted =
            c.client.execute(&c.st.create_pool, &[&id.0, &id.1.as_str(), &id.2, &us(cycle.end), &grant.0]).await?;
        if inserted == 1 {
            c.client
                .execute(&c.st.insert_tier_grant, &[&id.0, &id.1.as_str(), &grant.0, &id.2, &us(cycle.end)])
                .await?;
        }
        created.push(id);
    }
    lock_pool_rows(c, s, &created, Lock::Wait).await
}

/// Locks pool rows in the order given (the caller's is sorted) and reads their totals.
async fn lock_pool_rows(c: &Conn, s: &mut State, ids: &[&PoolId], lock: Lock) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = ids.iter().map(|id| id.0.as_str()).collect();
    let pools: Vec<&str> = ids.iter().map(|id| id.1.as_str()).collect();
    let starts: Vec<i64> = ids.iter().map(|id| id.2).collect();
    let statement = if lock == Lock::Wait { &c.st.lock_pools } else { &c.st.lock_pools_skip };
    for r in c.client.query(statement, &[&accounts, &pools, &starts]).await? {
        let pool: String = r.try_get(1)?;
        let id = (r.try_get(0)?, rows::pool_of(&pool)?, r.try_get(2)?);
        let totals = PoolTotals {
            grants: Nanos(r.try_get(3)?),
            used: Nanos(r.try_get(4)?),
            overage: Nanos(r.try_get(5)?),
            held: Nanos(r.try_get(6)?),
        };
        s.pool_tids.insert(id.clone(), r.try_get(7)?);
        s.plan.snapshot.pools.insert(id, totals);
    }
    Ok(())
}

/// Locks the key rows the batch changes, in (key, cycle start) order, creating them at zero. A
/// row held by another transaction is skipped and its writes put off, as in [`lock_pools`].
async fn lock_keys(c: &Conn, s: &mut State, jobs: &[Work<'_>], must_wait: &[bool]) -> Result<()> {
    let mut needs: BTreeMap<KeyId, Need> = BTreeMap::new();
    for (i, (op, now)) in jobs.iter().enumerate() {
        if s.later.contains(&i) {
            continue;
        }
        if let Some(id) = s.plan.snapshot.needs(op, *now).key {
            needs.entry(id).or_default().add(i, must_wait);
        }
    }
    if needs.is_empty() {
        return Ok(());
    }
    let (waiting, skipping) = wait_or_skip(&needs);
    lock_key_rows(c, s, &waiting, Lock::Wait).await?;
    lock_key_rows(c, s, &skipping, Lock::Skip).await?;
    let busy: Vec<KeyId> =
        skipping.into_iter().filter(|id| !s.plan.snapshot.key_totals.contains_key(*id)).cloned().collect();
    let busy = put_off_busy(&mut s.later, &mut needs, busy);
    lock_key_rows(c, s, &busy.iter().collect::<Vec<_>>(), Lock::Wait).await?;
    let missing: Vec<&KeyId> = needs.keys().filter(|id| !s.plan.snapshot.key_totals.contains_key(*id)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (key, start) in &missing {
        c.client.execute(&c.st.create_key, &[key, start]).await?;
    }
    lock_key_rows(c, s, &missing, Lock::Wait).await
}

/// Locks key rows in the order given (the caller's is sorted) and reads their totals.
async fn lock_key_rows(c: &Conn, s: &mut State, ids: &[&KeyId], lock: Lock) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let (keys, starts): (Vec<&str>, Vec<i64>) = ids.iter().map(|(k, c)| (k.as_str(), *c)).unzip();
    let statement = if lock == Lock::Wait { &c.st.lock_keys } else { &c.st.lock_keys_skip };
    for r in c.client.query(statement, &[&keys, &starts]).await? {
        let id = (r.try_get(0)?, r.try_get(1)?);
        s.key_tids.insert((r.try_get(0)?, r.try_get(1)?), r.try_get(4)?);
        s.plan.snapshot.key_totals.insert(id, KeyTotals { charged: Nanos(r.try_get(2)?), held: Nanos(r.try_get(3)?) });
    }
    Ok(())
}

/// Writes what the batch decided and commits: the event-order locks, one statement per kind of
/// row written, the re-check of refused holds and `COMMIT`, all sent at once (in that order: the
/// statements are prepared, so each is sent when first polled). Holds that cannot be found by
/// their `ctid` (made by this batch), whose event id is not their own, or that the batch changes
/// two ways (a lease charged in parts and extended, voided or settled) are updated one by one
/// first (rare). Returns the seq of each new event, in order.
async fn write(c: &Conn, s: &State, owner: i64, jobs: &[Work<'_>], outcomes: &mut [Outcome]) -> Result<Vec<i64>> {
    let (st, client) = (&c.st, &c.client);
    let new_holds: Vec<(&Hold, &str)> = s.plan.new_holds().collect();
    let h = NewHoldColumns::new(&new_holds);
    let e = &s.plan.new_events;
    let e_columns = events::Columns::new(e);
    let changed = ChangedHolds::new(s);
    let totals = TotalColumns::new(s);
    let event_accounts: Vec<&str> = sorted(e.iter().map(|x| x.event.account.as_str()));
    let refused = refused_holds(jobs, outcomes);
    let r_account: Vec<&str> = refused.iter().map(|(_, r)| r.account.as_str()).collect();
    let r_id: Vec<&str> = refused.iter().map(|(_, r)| r.id.as_str()).collect();
    let commit_now = changed.one_by_one.is_empty();

    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &h.account,
        &h.id,
        &h.pool,
        &h.key,
        &h.amount,
        &h.model,
        &h.source,
        &h.cycle_start,
        &h.cycle_end,
        &h.created,
        &h.expires,
        &h.remaining_after,
        &h.fingerprint,
        &owner,
    ];
    params.extend(e_columns.params());
    params.extend([
        &changed.settled as &(dyn ToSql + Sync),
        &changed.voided,
        &changed.extended,
        &changed.extended_to,
        &totals.p_tid,
        &totals.p_grants,
        &totals.p_used,
        &totals.p_overage,
        &totals.p_held,
        &totals.k_tid,
        &totals.k_charged,
        &totals.k_held,
        &changed.parted,
        &changed.parted_to,
        &h.made_by,
    ]);
    let writes = !(h.id.is_empty()
        && e.is_empty()
        && changed.voided.is_empty()
        && changed.extended.is_empty()
        && totals.p_tid.is_empty()
        && totals.k_tid.is_empty()
        && changed.parted.is_empty());
    let (_, seq_rows, refused_rows, _) = tokio::try_join!(
        async {
            if event_accounts.is_empty() {
                Ok(0)
            } else {
                client.execute(&st.event_order, &[&EVENT_ORDER_LOCK, &event_accounts]).await
            }
        },
        async { if writes { client.query(&st.write, &params).await } else { Ok(Vec::new()) } },
        async {
            if refused.is_empty() { Ok(Vec::new()) } else { client.query(&st.read_holds, &[&r_account, &r_id]).await }
        },
        async { if commit_now { client.execute(&st.commit, &[]).await } else { Ok(0) } },
    )?;
    let seqs = events::seqs(e, &seq_rows)?;
    if !commit_now {
        update_one_by_one(c, &changed.one_by_one, &seqs).await?;
        client.execute(&st.commit, &[]).await?;
    }
    replay_refused(outcomes, refused, &refused_rows)?;
    Ok(seqs)
}

/// The batch's new holds, one array per column of the write statement.
struct NewHoldColumns<'a> {
    account: Vec<&'a str>,
    id: Vec<&'a str>,
    pool: Vec<&'a str>,
    key: Vec<Option<&'a str>>,
    amount: Vec<i64>,
    model: Vec<Option<&'a str>>,
    source: Vec<Option<&'a str>>,
    cycle_start: Vec<i64>,
    cycle_end: Vec<i64>,
    created: Vec<i64>,
    expires: Vec<i64>,
    remaining_after: Vec<Option<i64>>,
    fingerprint: Vec<&'a str>,
    made_by: Vec<String>,
}

impl<'a> NewHoldColumns<'a> {
    fn new(h: &[(&'a Hold, &'a str)]) -> NewHoldColumns<'a> {
        NewHoldColumns {
            account: h.iter().map(|(x, _)| x.account.as_str()).collect(),
            id: h.iter().map(|(x, _)| x.id.as_str()).collect(),
            pool: h.iter().map(|(x, _)| x.pool.as_str()).collect(),
            key: h.iter().map(|(x, _)| x.key.as_deref()).collect(),
            amount: h.iter().map(|(x, _)| x.amount.0).collect(),
            model: h.iter().map(|(x, _)| x.model.as_deref()).collect(),
            source: h.iter().map(|(x, _)| x.source.as_deref()).collect(),
            cycle_start: h.iter().map(|(x, _)| us(x.cycle_start)).collect(),
            cycle_end: h.iter().map(|(x, _)| us(x.cycle_end)).collect(),
            created: h.iter().map(|(x, _)| us(x.created_at)).collect(),
            expires: h.iter().map(|(x, _)| us(x.expires_at)).collect(),
            remaining_after: h.iter().map(|(x, _)| x.remaining_after.map(|n| n.0)).collect(),
            fingerprint: h.iter().map(|(_, f)| *f).collect(),
            made_by: h.iter().map(|(x, _)| x.made_by.to_text()).collect(),
        }
    }
}

/// Changed holds, found by ctid: settled (by the events' statement), voided, extended, a part
/// settled; anything else (a hold made by this batch, or changed two ways) one by one.
struct ChangedHolds<'a> {
    settled: Vec<Tid>,
    voided: Vec<Tid>,
    extended: Vec<Tid>,
    extended_to: Vec<i64>,
    parted: Vec<Tid>,
    parted_to: Vec<i64>,
    /// With the index of its new event, if any.
    one_by_one: Vec<(&'a HoldEntry, Option<usize>)>,
}

impl<'a> ChangedHolds<'a> {
    fn new(s: &'a State) -> ChangedHolds<'a> {
        let mut c = ChangedHolds {
            settled: Vec::new(),
            voided: Vec::new(),
            extended: Vec::new(),
            extended_to: Vec::new(),
            parted: Vec::new(),
            parted_to: Vec::new(),
            one_by_one: Vec::new(),
        };
        for key in &s.plan.changed_holds {
            let entry = &s.plan.snapshot.holds[key];
            let new_event = match entry.event {
                Some(EventRef::New(i)) => Some(i),
                _ => None,
            };
            match (s.hold_tids.get(key).copied(), entry.hold.state, entry.expires_changed, entry.parted) {
                (Some(tid), HoldState::Settled, false, false) if new_event.is_some() => c.settled.push(tid),
                (Some(tid), HoldState::Voided, false, false) => c.voided.push(tid),
                (Some(tid), HoldState::Open, true, false) => {
                    c.extended.push(tid);
                    c.extended_to.push(us(entry.hold.expires_at));
                }
                (Some(tid), HoldState::Open, false, true) => {
                    c.parted.push(tid);
                    c.parted_to.push(entry.hold.amount.0);
                }
                _ => c.one_by_one.push((entry, new_event)),
            }
        }
        c
    }
}

/// The changed pool and key totals, by ctid.
struct TotalColumns {
    p_tid: Vec<Tid>,
    p_grants: Vec<i64>,
    p_used: Vec<i64>,
    p_overage: Vec<i64>,
    p_held: Vec<i64>,
    k_tid: Vec<Tid>,
    k_charged: Vec<i64>,
    k_held: Vec<i64>,
}

impl TotalColumns {
    fn new(s: &State) -> TotalColumns {
        let mut t = TotalColumns {
            p_tid: Vec::new(),
            p_grants: Vec::new(),
            p_used: Vec::new(),
            p_overage: Vec::new(),
            p_held: Vec::new(),
            k_tid: Vec::new(),
            k_charged: Vec::new(),
            k_held: Vec::new(),
        };
        for id in &s.plan.changed_pools {
            let p = s.plan.snapshot.pools[id];
            t.p_tid.push(s.pool_tids[id]);
            t.p_grants.push(p.grants.0);
            t.p_used.push(p.used.0);
            t.p_overage.push(p.overage.0);
            t.p_held.push(p.held.0);
        }
        for id in &s.plan.changed_keys {
            let k = s.plan.snapshot.key_totals[id];
            t.k_tid.push(s.key_tids[id]);
            t.k_charged.push(k.charged.0);
            t.k_held.push(k.held.0);
        }
        t
    }
}

/// Holds refused for lack of credit, with their place in the batch: another process may have
/// made one of the same id meanwhile (a retried request); then the answer is the replay
/// ([`replay_refused`]).
fn refused_holds<'j>(jobs: &'j [Work<'_>], outcomes: &[Outcome]) -> Vec<(usize, &'j HoldRequest)> {
    jobs.iter()
        .zip(outcomes.iter())
        .enumerate()
        .filter_map(|(i, ((op, _), outcome))| match (op, outcome) {
            (Op::Hold(r), Outcome::Planned(Ok(step::Outcome::Ready(Done::Hold(HoldOutcome::Refused { .. }))))) => {
                Some((i, r))
            }
            _ => None,
        })
        .collect()
}

/// Writes the holds the batch's statement could not, one by one; `seqs` are the new events'.
async fn update_one_by_one(c: &Conn, holds: &[(&HoldEntry, Option<usize>)], seqs: &[i64]) -> Result<()> {
    for (entry, new_event) in holds {
        let hold = &entry.hold;
        let seq = new_event.map(|i| seqs[i]);
        let params: [&(dyn ToSql + Sync); 7] =
            [&hold.account, &hold.id, &hold.state.as_str(), &us(hold.expires_at), &seq, &hold.amount.0, &entry.parted];
        c.client.execute(&c.st.update_hold, &params).await?;
    }
    Ok(())
}

/// A hold refused for lack of credit whose id another process took meanwhile answers as that
/// hold's replay (or a conflict), as `step::replay_hold` answers.
fn replay_refused(outcomes: &mut [Outcome], refused: Vec<(usize, &HoldRequest)>, rows: &[Row]) -> Result<()> {
    let mut existing: HashMap<(String, String), HoldEntry> = HashMap::new();
    for r in rows {
        let (entry, _) = hold_entry(r)?;
        existing.insert((entry.hold.account.clone(), entry.hold.id.clone()), entry);
    }
    for (i, r) in refused {
        let Some(entry) = existing.remove(&(r.account.clone(), r.id.clone())) else { continue };
        outcomes[i] = Outcome::Planned(step::replay_hold(&entry, r).map(|o| step::Outcome::Ready(Done::Hold(o))));
    }
    Ok(())
}
