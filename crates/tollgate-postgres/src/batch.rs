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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::error::Error as StdError;

use bytes::BytesMut;
use chrono::{DateTime, Duration, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Row, Statement};
use tollgate_core::ledger::{self, PoolScope, Replay};
use tollgate_core::{Cycle, KeyScope, Nanos, PoolKind, PoolPolicy, Tier};
use tollgate_store::{
    Account, Event, Hold, HoldOutcome, HoldRequest, HoldState, SettleRequest, StoreError, StoreResult,
};

use crate::events;
use crate::ledger::{EVENT_ORDER_LOCK, EVENT_ORDER_LOCKS, KeyTotals, PoolTotals};
use crate::rows::{self, us};
use crate::{ATTEMPTS_MAX, Error, Result, describe};
use tollgate_store::ChargedEvent;

/// Most writes in one transaction.
const BATCH_JOBS_MAX: usize = 512;

/// How many times a write may be put off to the next batch because a pool or key row it needs
/// is locked by another transaction, before its batch waits for that row (see [`lock_pools`]).
const PUT_OFF_MAX: u8 = 2;

/// Settings of a writer's connection, beyond the store's (see "Plans" above).
pub const WRITER_OPTIONS: &str = "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan";

/// A write the writer task runs.
pub enum Op {
    Hold(HoldRequest),
    Settle(Box<SettleRequest>),
    /// `Store::settle_part`: an event charged against `release` of a lease, which stays open.
    SettlePart(Box<SettleRequest>, Nanos),
    Void {
        account: String,
        hold_id: String,
    },
    Extend {
        account: String,
        hold_id: String,
        ttl_s: u64,
    },
}

impl Op {
    fn account(&self) -> &str {
        match self {
            Op::Hold(r) => &r.account,
            Op::Settle(r) | Op::SettlePart(r, _) => &r.account,
            Op::Void { account, .. } | Op::Extend { account, .. } => account,
        }
    }

    /// The hold this write names: (account, hold id).
    fn hold_key(&self) -> (&str, &str) {
        match self {
            Op::Hold(r) => (&r.account, &r.id),
            Op::Settle(r) | Op::SettlePart(r, _) => (&r.account, &r.hold_id),
            Op::Void { account, hold_id } | Op::Extend { account, hold_id, .. } => (account, hold_id),
        }
    }
}

/// What a write returns.
pub enum Done {
    Hold(HoldOutcome),
    Settled(Event),
    /// A voided or extended hold.
    Changed(Hold),
}

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

/// A row's physical address, read under its lock and used to update it (a TID scan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tid([u8; 6]);

impl<'a> FromSql<'a> for Tid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Tid, Box<dyn StdError + Sync + Send>> {
        Ok(Tid(raw.try_into().map_err(|_| "a tid is 6 bytes")?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
}

impl ToSql for Tid {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }

    to_sql_checked!();
}

const HOLD_LOCK_COLUMNS: &str = "h.id, h.account, h.pool, h.key_id, h.amount, h.model, h.source, h.state, \
     h.cycle_start_us, h.cycle_end_us, h.created_us, h.expires_us, h.remaining_after, h.fingerprint, h.event_seq, h.made_by, h.ctid";

/// A writer's connection and its prepared statements.
struct Conn {
    client: Client,
    st: Statements,
}

struct Statements {
    begin: Statement,
    custom_plans: Statement,
    commit: Statement,
    rollback: Statement,
    settings: Statement,
    keys: Statement,
    lock_holds: Statement,
    taken: Statement,
    events_by_seq: Statement,
    lock_pools: Statement,
    lock_pools_skip: Statement,
    create_pool: Statement,
    insert_tier_grant: Statement,
    lock_keys: Statement,
    lock_keys_skip: Statement,
    create_key: Statement,
    event_order: Statement,
    write: Statement,
    update_hold: Statement,
    read_holds: Statement,
}

impl Conn {
    async fn connect(config: &tokio_postgres::Config) -> StoreResult<Conn> {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| match crate::pg_error(&e) {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("cannot connect: {m}")),
            _ => StoreError::Backend(format!("cannot connect: {}", describe(&e))),
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a writer's PostgreSQL connection ended");
            }
        });
        let st = prepare_statements(&client).await.map_err(|e| match crate::pg_error(&e) {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("cannot prepare the writer's statements: {m}"))
            }
            _ => StoreError::Backend(format!("cannot prepare the writer's statements: {}", describe(&e))),
        })?;
        Ok(Conn { client, st })
    }
}

/// Prepares every statement the writer runs, once per connection.
async fn prepare_statements(client: &tokio_postgres::Client) -> std::result::Result<Statements, tokio_postgres::Error> {
    let prepare = |sql: String| async move { client.prepare(&sql).await };
    Ok(Statements {
        begin: prepare("BEGIN".into()).await?,
        custom_plans: prepare("SET LOCAL plan_cache_mode = force_custom_plan".into()).await?,
        commit: prepare("COMMIT".into()).await?,
        rollback: prepare("ROLLBACK".into()).await?,
        settings: prepare(SETTINGS.into()).await?,
        keys: prepare("SELECT id, account, cap FROM keys WHERE id = ANY($1::text[])".into()).await?,
        // Locked in the order of the arrays, which the caller sorts.
        lock_holds: prepare(format!(
            "SELECT {HOLD_LOCK_COLUMNS} FROM unnest($1::text[], $2::text[]) AS u(a, i)
             CROSS JOIN LATERAL (SELECT *, ctid FROM holds WHERE account = u.a AND id = u.i FOR UPDATE) AS h"
        ))
        .await?,
        taken: prepare(format!(
            "SELECT {} FROM unnest($1::text[], $2::text[]) AS u(a, i)
             CROSS JOIN LATERAL (SELECT * FROM events WHERE account = u.a AND id = u.i OFFSET 0) AS e",
            rows::EVENT_COLUMNS
        ))
        .await?,
        events_by_seq: prepare(format!("SELECT {} FROM events WHERE seq = ANY($1::int8[])", rows::EVENT_COLUMNS))
            .await?,
        lock_pools: prepare(lock_pools_sql("")).await?,
        lock_pools_skip: prepare(lock_pools_sql(" SKIP LOCKED")).await?,
        create_pool: prepare(
            "INSERT INTO pool_cycles (account, pool, cycle_start_us, cycle_end_us, grants, used, overage, held)
             VALUES ($1, $2, $3, $4, $5, 0, 0, 0) ON CONFLICT DO NOTHING"
                .into(),
        )
        .await?,
        insert_tier_grant: prepare(
            "INSERT INTO grants (account, pool, kind, amount, cycle_start_us, expires_us, note, created_us)
             VALUES ($1, $2, 'tier', $3, $4, $5, NULL, $4)"
                .into(),
        )
        .await?,
        lock_keys: prepare(lock_keys_sql("")).await?,
        lock_keys_skip: prepare(lock_keys_sql(" SKIP LOCKED")).await?,
        create_key: prepare(
            "INSERT INTO key_cycles (key_id, cycle_start_us, charged, held) VALUES ($1, $2, 0, 0)
             ON CONFLICT DO NOTHING"
                .into(),
        )
        .await?,
        event_order: prepare(EVENT_ORDER_LOCKS.into()).await?,
        write: prepare(write_sql()).await?,
        update_hold: prepare(
            "UPDATE holds SET state = $3, expires_us = $4, event_seq = COALESCE($5, event_seq), amount = $6,
                 lease = lease OR $7
             WHERE account = $1 AND id = $2"
                .into(),
        )
        .await?,
        read_holds: prepare(format!(
            "SELECT {HOLD_LOCK_COLUMNS} FROM unnest($1::text[], $2::text[]) AS u(a, i)
             CROSS JOIN LATERAL (SELECT *, ctid FROM holds WHERE account = u.a AND id = u.i OFFSET 0) AS h"
        ))
        .await?,
    })
}

/// Locks pool rows and reads their totals; `skip` is "" (wait for rows locked by another
/// transaction) or " SKIP LOCKED" (leave them out).
fn lock_pools_sql(skip: &str) -> String {
    format!(
        "SELECT p.account, p.pool, p.cycle_start_us, p.grants, p.used, p.overage, p.held, p.ctid
         FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(a, pl, c)
         CROSS JOIN LATERAL (SELECT *, ctid FROM pool_cycles
             WHERE account = u.a AND pool = u.pl AND cycle_start_us = u.c FOR UPDATE{skip}) AS p"
    )
}

/// Locks key rows and reads their totals; `skip` as in [`lock_pools_sql`].
fn lock_keys_sql(skip: &str) -> String {
    format!(
        "SELECT k.key_id, k.cycle_start_us, k.charged, k.held, k.ctid
         FROM unnest($1::text[], $2::int8[]) AS u(k, c)
         CROSS JOIN LATERAL (SELECT *, ctid FROM key_cycles WHERE key_id = u.k AND cycle_start_us = u.c
             FOR UPDATE{skip}) AS k"
    )
}

/// Each account with its tier and the policies of its two pools (`SETTINGS_COLUMNS`).
const SETTINGS: &str = "SELECT a.*, t.*, pi.*, pp.* FROM unnest($1::text[]) AS u(id)
     CROSS JOIN LATERAL (SELECT id, tier, anchor_us, timezone, interactive_grant, programmatic_grant, created_us
         FROM accounts WHERE id = u.id) AS a
     LEFT JOIN LATERAL (SELECT id, interactive, programmatic, monthly_price, payg_multiplier_ppm
         FROM tiers WHERE id = a.tier) AS t ON true
     LEFT JOIN LATERAL (SELECT on_exhausted, overage_cap, spend_cap FROM policies
         WHERE account = a.id AND pool = 'interactive') AS pi ON true
     LEFT JOIN LATERAL (SELECT on_exhausted, overage_cap, spend_cap FROM policies
         WHERE account = a.id AND pool = 'programmatic') AS pp ON true";

/// Everything a batch writes, in one statement: new holds (`$1`…`$14`, their makers `$58`), new events (`$15`…`$43`),
/// the holds they settle (found by `ctid`, `$44`, each with its event by hold id), voided holds
/// (`$45`), extended holds (`$46`, `$47`), pools (`$48`…`$52`), keys (`$53`…`$55`) and leases
/// charged in parts (`$56`, `$57`), the last three found by `ctid` with their new figures at the
/// same position in the arrays. Its rows: the new events' seqs. The statement's parts change
/// different rows.
fn write_sql() -> String {
    format!(
        "WITH new_holds AS (
         INSERT INTO holds (account, id, pool, key_id, amount, model, source, state, cycle_start_us, cycle_end_us,
             created_us, expires_us, remaining_after, fingerprint, owner, made_by)
         SELECT a, i, p, k, amt, m, src, 'open', cs, ce, cr, ex, ra, fp, $14, mb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::int8[],
                     $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::text[], $58::text[])
             AS u(a, i, p, k, amt, m, src, cs, ce, cr, ex, ra, fp, mb)),
     e AS (
         {events}
         RETURNING account, id, hold_id, seq),
     settled AS (
         UPDATE holds SET state = 'settled', event_seq = e.seq FROM e
         WHERE holds.ctid = ANY($44::tid[]) AND e.account = holds.account AND e.hold_id = holds.id),
     voided AS (UPDATE holds SET state = 'voided' WHERE ctid = ANY($45::tid[])),
     extended AS (
         UPDATE holds SET expires_us = ($47::int8[])[array_position($46::tid[], ctid)] WHERE ctid = ANY($46::tid[])),
     pool_totals AS (
         UPDATE pool_cycles p SET (grants, used, overage, held) =
             (SELECT ($49::int8[])[n], ($50::int8[])[n], ($51::int8[])[n], ($52::int8[])[n]
              FROM (SELECT array_position($48::tid[], p.ctid) AS n) AS x)
         WHERE ctid = ANY($48::tid[])),
     key_totals AS (
         UPDATE key_cycles k SET (charged, held) =
             (SELECT ($54::int8[])[n], ($55::int8[])[n] FROM (SELECT array_position($53::tid[], k.ctid) AS n) AS x)
         WHERE ctid = ANY($53::tid[])),
     parted AS (
         UPDATE holds SET amount = ($57::int8[])[array_position($56::tid[], ctid)], lease = true
         WHERE ctid = ANY($56::tid[]))
     SELECT account, id, seq FROM e",
        events = events::insert_sql(15)
    )
}

/// (account, pool, cycle start in µs).
type PoolId = (String, PoolKind, i64);
/// (key id, cycle start in µs).
type KeyId = (String, i64);

/// Where a settled hold's event is: committed before, or made by this batch.
#[derive(Clone, Copy)]
enum EventRef {
    Seq(i64),
    New(usize),
}

struct HoldEntry {
    hold: Hold,
    fingerprint: String,
    event: Option<EventRef>,
    /// Where its row is, for a hold read (and locked) from the database.
    tid: Option<Tid>,
    /// Whether this batch extended it.
    expires_changed: bool,
    /// Whether this batch charged parts of it (a lease: its amount changed).
    parted: bool,
}

/// A write's result before the batch's events have their seqs. Short-lived, one per write of a
/// batch: not worth a box.
#[allow(clippy::large_enum_variant, reason = "short-lived, one per write of a batch: not worth a box")]
enum Outcome {
    Ready(StoreResult<Done>),
    Settled(usize),
    /// Put off to the next batch.
    Later,
}

/// What a batch read, locked and changed.
#[derive(Default)]
struct State {
    accounts: HashMap<String, Account>,
    tiers: HashMap<String, Tier>,
    policies: HashMap<(String, PoolKind), PoolPolicy>,
    /// Key id → (its account, its cap).
    keys: HashMap<String, (String, Option<Nanos>)>,
    holds: HashMap<(String, String), HoldEntry>,
    /// Whether this attempt reads which event ids are taken (see [`batch`]).
    careful: bool,
    /// Set when a decision needs what only a careful attempt reads.
    needs_careful: bool,
    /// Committed events among the ids the batch's settles take, by (account, event id), with
    /// their fingerprints; read only by a careful attempt.
    taken: HashMap<(String, String), (String, Event)>,
    /// Committed events of the settled holds the batch names, by seq, with their fingerprints.
    settled_events: HashMap<i64, (String, Event)>,
    pools: HashMap<PoolId, PoolTotals>,
    pool_tids: HashMap<PoolId, Tid>,
    key_totals: HashMap<KeyId, KeyTotals>,
    key_tids: HashMap<KeyId, Tid>,
    // What the batch writes.
    new_holds: Vec<(Hold, String)>,
    new_events: Vec<ChargedEvent>,
    /// The events this batch inserts: (account, event id) → place in `new_events`.
    new_event_ids: HashMap<(String, String), usize>,
    changed_holds: BTreeSet<(String, String)>,
    changed_pools: BTreeSet<PoolId>,
    changed_keys: BTreeSet<KeyId>,
    /// The writes (their places in the batch) put off to the next batch: a row they need is
    /// locked by another transaction.
    later: HashSet<usize>,
}

fn sorted<T: Ord>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    items.into_iter().collect::<BTreeSet<T>>().into_iter().collect()
}

/// The event id a settle records: its own, or the hold's when it has none.
fn settle_event_id(r: &SettleRequest) -> &str {
    if r.event.id.is_empty() { &r.hold_id } else { &r.event.id }
}

fn hold_not_found(hold_id: &str) -> StoreError {
    StoreError::NotFound(format!("hold {hold_id:?}"))
}

/// A hold row read with `HOLD_LOCK_COLUMNS`.
fn hold_entry(r: &Row) -> Result<HoldEntry> {
    let row = rows::hold(r)?;
    Ok(HoldEntry {
        event: row.event_seq.map(EventRef::Seq),
        hold: row.hold,
        fingerprint: row.fingerprint,
        tid: Some(r.try_get(16)?),
        expires_changed: false,
        parted: false,
    })
}

/// One attempt at a batch. A first attempt does not look up whether the event ids its settles
/// take are taken (that lookup would need a plan per batch, see "Plans"): the insert of a taken
/// id fails the attempt (a unique violation) and the batch runs again carefully, reading them
/// with plans made for its parameters.
async fn batch(c: &Conn, owner: i64, jobs: &[Work<'_>], must_wait: &[bool], careful: bool) -> Result<Vec<Answer>> {
    let mut s = State { careful, ..State::default() };
    read(c, &mut s, jobs).await?;
    lock_pools(c, &mut s, jobs, must_wait).await?;
    lock_keys(c, &mut s, jobs, must_wait).await?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (i, (op, now)) in jobs.iter().enumerate() {
        if s.later.contains(&i) {
            outcomes.push(Outcome::Later);
            continue;
        }
        outcomes.push(match op {
            Op::Hold(r) => decide_hold(&mut s, r, *now).unwrap_or_else(|e| Outcome::Ready(Err(e))),
            Op::Settle(r) => decide_settle(&mut s, r, *now).unwrap_or_else(|e| Outcome::Ready(Err(e))),
            Op::SettlePart(r, release) => {
                decide_settle_part(&mut s, r, *release, *now).unwrap_or_else(|e| Outcome::Ready(Err(e)))
            }
            Op::Void { account, hold_id } => Outcome::Ready(decide_void(&mut s, account, hold_id).map(Done::Changed)),
            Op::Extend { account, hold_id, ttl_s } => {
                Outcome::Ready(decide_extend(&mut s, account, hold_id, *ttl_s, *now).map(Done::Changed))
            }
        });
    }
    if s.needs_careful {
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
            Outcome::Ready(result) => Some(result),
            Outcome::Settled(i) => Some(Ok(Done::Settled(s.new_events[i].event(seqs[i])))),
            Outcome::Later => None,
        })
        .collect())
}

/// `BEGIN` and every read of the batch, sent together: accounts, their tiers and policies, the
/// caps of the keys the holds name; the existing holds the batch names, locked in (account, id)
/// order (the first step of the lock order); which event ids its settles would take are taken.
async fn read(c: &Conn, s: &mut State, jobs: &[Work<'_>]) -> Result<()> {
    let accounts: Vec<&str> = sorted(jobs.iter().map(|(op, _)| op.account()));
    let keys: Vec<&str> = sorted(jobs.iter().filter_map(|(op, _)| match op {
        Op::Hold(r) => r.key.as_deref(),
        _ => None,
    }));
    let named: Vec<(&str, &str)> = sorted(jobs.iter().map(|(op, _)| op.hold_key()));
    let (hold_accounts, hold_ids): (Vec<&str>, Vec<&str>) = named.into_iter().unzip();
    let settles: Vec<(&str, &str)> = sorted(jobs.iter().filter_map(|(op, _)| match op {
        Op::Settle(r) => Some((r.account.as_str(), settle_event_id(r))),
        Op::SettlePart(r, _) => Some((r.account.as_str(), r.event.id.as_str())),
        _ => None,
    }));
    let (event_accounts, event_ids): (Vec<&str>, Vec<&str>) = settles.into_iter().unzip();
    let (st, client) = (&c.st, &c.client);
    let (_, _, setting_rows, key_rows, hold_rows, taken_rows) = tokio::try_join!(
        client.execute(&st.begin, &[]),
        async { if s.careful { client.execute(&st.custom_plans, &[]).await } else { Ok(0) } },
        async { client.query(&st.settings, &[&accounts]).await },
        async { if keys.is_empty() { Ok(Vec::new()) } else { client.query(&st.keys, &[&keys]).await } },
        async { client.query(&st.lock_holds, &[&hold_accounts, &hold_ids]).await },
        async {
            if event_ids.is_empty() || !s.careful {
                Ok(Vec::new())
            } else {
                client.query(&st.taken, &[&event_accounts, &event_ids]).await
            }
        },
    )?;
    for r in &setting_rows {
        let account = rows::account(r)?;
        if r.try_get::<_, Option<String>>(7)?.is_some() {
            let tier = rows::tier_at(r, 7)?;
            s.tiers.insert(tier.id.clone(), tier);
        }
        for (pool, at) in [(PoolKind::Interactive, 12), (PoolKind::Programmatic, 15)] {
            if r.try_get::<_, Option<String>>(at)?.is_some() {
                s.policies.insert((account.id.clone(), pool), rows::policy(r, at)?);
            }
        }
        s.accounts.insert(account.id.clone(), account);
    }
    for r in &key_rows {
        s.keys.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get::<_, Option<i64>>(2)?.map(Nanos)));
    }
    for r in &hold_rows {
        let entry = hold_entry(r)?;
        s.holds.insert((entry.hold.account.clone(), entry.hold.id.clone()), entry);
    }
    for r in &taken_rows {
        let row = rows::event(r)?;
        s.taken.insert((row.event.account.clone(), row.event.id.clone()), (row.fingerprint, row.event));
    }
    // The first events of settled holds that settles name again (a settle repeated): rare.
    let repeated: Vec<i64> = jobs
        .iter()
        .filter_map(|(op, _)| match op {
            Op::Settle(r) => s.holds.get(&(r.account.clone(), r.hold_id.clone())),
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
            s.settled_events.insert(e.event.seq, (e.fingerprint, e.event));
        }
    }
    Ok(())
}

/// A pool's tier grant and PAYG multiplier; None when the account's tier does not exist.
fn tier_grant(s: &State, account: &Account, pool: PoolKind) -> Option<(Nanos, u64)> {
    let tier = s.tiers.get(&account.tier)?;
    Some((account.grant_override(pool).unwrap_or(tier.grant(pool)), tier.payg_multiplier_ppm))
}

/// Whether a hold request passes the checks before its pool: its account exists, its key is
/// the account's, its id is not taken already.
fn hold_reaches_pool(s: &State, r: &HoldRequest) -> bool {
    s.accounts.contains_key(&r.account)
        && r.key.as_ref().is_none_or(|k| s.keys.get(k).is_some_and(|(a, _)| *a == r.account))
        && !s.holds.contains_key(&(r.account.clone(), r.id.clone()))
}

/// The open, existing hold a settle or void names.
fn open_hold<'a>(s: &'a State, account: &str, hold_id: &str) -> Option<&'a Hold> {
    s.holds.get(&(account.to_string(), hold_id.to_string())).map(|h| &h.hold).filter(|h| h.state == HoldState::Open)
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
    // Pool → the account and cycle to create it with, when a write may create it.
    let mut create: BTreeMap<PoolId, (Account, Cycle)> = BTreeMap::new();
    for (i, (op, now)) in jobs.iter().enumerate() {
        let id = match op {
            Op::Hold(r) if hold_reaches_pool(s, r) => {
                let account = &s.accounts[&r.account];
                let cycle = account.cycle_anchor().cycle_at(*now);
                let id = (r.account.clone(), r.pool, us(cycle.start));
                create.insert(id.clone(), (account.clone(), cycle));
                id
            }
            Op::Settle(r) | Op::SettlePart(r, _) => {
                match (open_hold(s, &r.account, &r.hold_id), s.accounts.get(&r.account)) {
                    (Some(h), Some(account)) => {
                        let cycle = Cycle { index: 0, start: h.cycle_start, end: h.cycle_end };
                        let id = (h.account.clone(), h.pool, us(h.cycle_start));
                        create.insert(id.clone(), (account.clone(), cycle));
                        id
                    }
                    _ => continue,
                }
            }
            Op::Void { account, hold_id } => match open_hold(s, account, hold_id) {
                Some(h) => (h.account.clone(), h.pool, us(h.cycle_start)),
                None => continue,
            },
            _ => continue,
        };
        needs.entry(id).or_default().add(i, must_wait);
    }
    if needs.is_empty() {
        return Ok(());
    }
    let (waiting, skipping) = wait_or_skip(&needs);
    lock_pool_rows(c, s, &waiting, Lock::Wait).await?;
    lock_pool_rows(c, s, &skipping, Lock::Skip).await?;
    let busy: Vec<PoolId> = skipping.into_iter().filter(|id| !s.pools.contains_key(*id)).cloned().collect();
    let busy = put_off_busy(&mut s.later, &mut needs, busy);
    lock_pool_rows(c, s, &busy.iter().collect::<Vec<_>>(), Lock::Wait).await?;
    let missing: Vec<(&PoolId, &Account, &Cycle)> = needs
        .keys()
        .filter(|id| !s.pools.contains_key(*id))
        .filter_map(|id| create.get(id).map(|(a, c)| (id, a, c)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut created = Vec::new();
    for (id, account, cycle) in missing {
        let Some((grant, _)) = tier_grant(s, account, id.1) else { continue };
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
        s.pools.insert(id, totals);
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
        match op {
            Op::Hold(r) if hold_reaches_pool(s, r) => {
                if let Some(key) = &r.key {
                    let cycle = s.accounts[&r.account].cycle_anchor().cycle_at(*now);
                    needs.entry((key.clone(), us(cycle.start))).or_default().add(i, must_wait);
                }
            }
            Op::Settle(_) | Op::SettlePart(..) | Op::Void { .. } => {
                let (account, hold_id) = op.hold_key();
                if let Some(h) = open_hold(s, account, hold_id)
                    && let Some(key) = &h.key
                {
                    needs.entry((key.clone(), us(h.cycle_start))).or_default().add(i, must_wait);
                }
            }
            _ => {}
        }
    }
    if needs.is_empty() {
        return Ok(());
    }
    let (waiting, skipping) = wait_or_skip(&needs);
    lock_key_rows(c, s, &waiting, Lock::Wait).await?;
    lock_key_rows(c, s, &skipping, Lock::Skip).await?;
    let busy: Vec<KeyId> = skipping.into_iter().filter(|id| !s.key_totals.contains_key(*id)).cloned().collect();
    let busy = put_off_busy(&mut s.later, &mut needs, busy);
    lock_key_rows(c, s, &busy.iter().collect::<Vec<_>>(), Lock::Wait).await?;
    let missing: Vec<&KeyId> = needs.keys().filter(|id| !s.key_totals.contains_key(*id)).collect();
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
        s.key_totals.insert(id, KeyTotals { charged: Nanos(r.try_get(2)?), held: Nanos(r.try_get(3)?) });
    }
    Ok(())
}

fn out_of_range() -> StoreError {
    StoreError::Invalid("amount out of the ledger's range".into())
}

fn add_pool(current: PoolTotals, add: PoolTotals) -> StoreResult<PoolTotals> {
    let sum = |a: Nanos, b: Nanos| a.checked_add(b).ok_or_else(out_of_range);
    Ok(PoolTotals {
        grants: sum(current.grants, add.grants)?,
        used: sum(current.used, add.used)?,
        overage: sum(current.overage, add.overage)?,
        held: sum(current.held, add.held)?,
    })
}

fn add_key(current: KeyTotals, add: KeyTotals) -> StoreResult<KeyTotals> {
    let out = || StoreError::Invalid("amount out of range".into());
    Ok(KeyTotals {
        charged: current.charged.checked_add(add.charged).ok_or_else(out)?,
        held: current.held.checked_add(add.held).ok_or_else(out)?,
    })
}

/// The locked pool of a cycle, with its scope for core's decisions.
fn pool_scope(s: &State, id: &PoolId) -> StoreResult<(PoolTotals, PoolScope)> {
    let totals = *s
        .pools
        .get(id)
        .ok_or_else(|| StoreError::Backend(format!("pool {} {} has no row for its cycle", id.0, id.1.as_str())))?;
    let policy = s.policies.get(&(id.0.clone(), id.1)).copied().unwrap_or_default();
    let PoolTotals { grants, used, overage, held } = totals;
    Ok((totals, PoolScope { limit: policy.limit(grants), grants, used, overage, held }))
}

fn key_totals(s: &State, id: &KeyId) -> StoreResult<KeyTotals> {
    s.key_totals.get(id).copied().ok_or_else(|| StoreError::Backend(format!("key {} has no row for its cycle", id.0)))
}

/// The same checks, in the same order, as `ledger::hold`.
fn decide_hold(s: &mut State, r: &HoldRequest, now: DateTime<Utc>) -> StoreResult<Outcome> {
    let account = s.accounts.get(&r.account).ok_or_else(|| StoreError::NotFound(format!("account {:?}", r.account)))?;
    let cap = match &r.key {
        Some(id) => match s.keys.get(id) {
            Some((a, cap)) if *a == r.account => Some(*cap),
            _ => {
                return Err(StoreError::Invalid(format!("account {:?} has no key {id:?}", r.account)));
            }
        },
        None => None,
    };
    let cycle = account.cycle_anchor().cycle_at(now);
    let key = (r.account.clone(), r.id.clone());
    if let Some(existing) = s.holds.get(&key) {
        return match ledger::replay(Some((existing.fingerprint.clone(), existing.hold.clone())), &r.fingerprint) {
            Replay::Same(hold) => Ok(Outcome::Ready(Ok(Done::Hold(HoldOutcome::Replayed(hold))))),
            _ => Err(StoreError::Conflict(format!(
                "hold id {:?} was already used for a different request; use a new id",
                r.id
            ))),
        };
    }
    let pool_id = (r.account.clone(), r.pool, us(cycle.start));
    if tier_grant(s, account, r.pool).is_none() {
        return Err(StoreError::Backend(format!("account {} has unknown tier {}", account.id, account.tier)));
    }
    let (totals, scope) = pool_scope(s, &pool_id)?;
    let key_scope = match (&r.key, cap) {
        (Some(id), Some(cap)) => {
            let key_id = (id.clone(), us(cycle.start));
            let t = key_totals(s, &key_id)?;
            Some((key_id, t, KeyScope { cap, charged: t.charged, held: t.held }))
        }
        _ => None,
    };
    let decision = match ledger::decide_hold(&scope, key_scope.as_ref().map(|(_, _, k)| k), r.amount) {
        Ok(d) => d,
        Err(refusal) => {
            return Ok(Outcome::Ready(Ok(Done::Hold(HoldOutcome::Refused { refusal, resets_at: cycle.end }))));
        }
    };
    let new_pool = add_pool(totals, PoolTotals { held: r.amount, ..PoolTotals::default() })?;
    let new_key = match &key_scope {
        Some((id, t, _)) => Some((id.clone(), add_key(*t, KeyTotals { charged: Nanos::ZERO, held: r.amount })?)),
        None => None,
    };
    let hold = Hold {
        id: r.id.clone(),
        account: r.account.clone(),
        pool: r.pool,
        key: r.key.clone(),
        amount: r.amount,
        model: r.model.clone(),
        source: r.source.clone(),
        state: HoldState::Open,
        cycle_start: cycle.start,
        cycle_end: cycle.end,
        created_at: now,
        expires_at: now + Duration::seconds(r.ttl_s as i64),
        remaining_after: decision.pool_remaining,
        made_by: r.made_by.clone(),
    };
    // No refusal after this point: the changes.
    s.pools.insert(pool_id.clone(), new_pool);
    s.changed_pools.insert(pool_id);
    if let Some((id, t)) = new_key {
        s.key_totals.insert(id.clone(), t);
        s.changed_keys.insert(id);
    }
    s.new_holds.push((hold.clone(), r.fingerprint.clone()));
    let entry = HoldEntry {
        hold: hold.clone(),
        fingerprint: r.fingerprint.clone(),
        event: None,
        tid: None,
        expires_changed: false,
        parted: false,
    };
    s.holds.insert(key, entry);
    Ok(Outcome::Ready(Ok(Done::Hold(HoldOutcome::Held(hold)))))
}

fn event_id_taken(id: &str) -> StoreError {
    StoreError::Conflict(format!("event id {id:?} is already recorded; use another event id"))
}

/// What settling against a hold reads: its pool (id, totals, and scope for core's decisions)
/// and its tier's PAYG multiplier.
fn hold_pool(s: &State, hold: &Hold) -> StoreResult<(PoolId, PoolTotals, PoolScope, u64)> {
    let account =
        s.accounts.get(&hold.account).ok_or_else(|| StoreError::NotFound(format!("account {:?}", hold.account)))?;
    let (_, ppm) = tier_grant(s, account, hold.pool)
        .ok_or_else(|| StoreError::Backend(format!("account {} has unknown tier {}", account.id, account.tier)))?;
    let pool_id = (hold.account.clone(), hold.pool, us(hold.cycle_start));
    let (totals, scope) = pool_scope(s, &pool_id)?;
    Ok((pool_id, totals, scope, ppm))
}

/// A charge against a hold, decided: its pool's and key's new totals.
struct Charge {
    pool: (PoolId, PoolTotals),
    key: Option<(KeyId, KeyTotals)>,
}

/// The totals once `split` is charged to `hold`'s pool and key and `release` of it is freed;
/// refused (out of range) before anything changes.
fn charge(
    s: &State,
    hold: &Hold,
    pool: (PoolId, PoolTotals),
    split: ledger::Split,
    release: Nanos,
) -> StoreResult<Charge> {
    let freed = Nanos(-release.0);
    let (pool_id, totals) = pool;
    let new_pool =
        add_pool(totals, PoolTotals { grants: Nanos::ZERO, used: split.grant, overage: split.overage, held: freed })?;
    let key = match &hold.key {
        Some(k) => {
            let id = (k.clone(), us(hold.cycle_start));
            let t = key_totals(s, &id)?;
            Some((id, add_key(t, KeyTotals { charged: split.total(), held: freed })?))
        }
        None => None,
    };
    Ok(Charge { pool: (pool_id, new_pool), key })
}

/// Applies a decided charge and adds its event (`event_key` its (account, id)) to the batch's
/// new events; returns the event's place among them.
fn record(s: &mut State, charge: Charge, event_key: (String, String), row: ChargedEvent) -> usize {
    let (pool_id, totals) = charge.pool;
    s.pools.insert(pool_id.clone(), totals);
    s.changed_pools.insert(pool_id);
    if let Some((id, t)) = charge.key {
        s.key_totals.insert(id.clone(), t);
        s.changed_keys.insert(id);
    }
    let i = s.new_events.len();
    s.new_event_ids.insert(event_key, i);
    s.new_events.push(row);
    i
}

/// The same checks, in the same order, as `ledger::settle` and `ledger::charge_hold`.
fn decide_settle(s: &mut State, r: &SettleRequest, now: DateTime<Utc>) -> StoreResult<Outcome> {
    let key = (r.account.clone(), r.hold_id.clone());
    let entry = s.holds.get(&key).ok_or_else(|| hold_not_found(&r.hold_id))?;
    match entry.hold.state {
        HoldState::Open => {}
        HoldState::Settled => {
            let first = match entry.event {
                Some(EventRef::Seq(seq)) => s.settled_events.get(&seq).map(|(f, e)| (f.clone(), Ok(e.clone()))),
                Some(EventRef::New(i)) => Some((s.new_events[i].event.fingerprint.clone(), Err(i))),
                None => None,
            }
            .ok_or_else(|| rows::corrupt("settled hold without its event", &r.hold_id))?;
            return match ledger::replay(Some(first), &r.event.fingerprint) {
                Replay::Same(Ok(event)) => Ok(Outcome::Ready(Ok(Done::Settled(event)))),
                Replay::Same(Err(i)) => Ok(Outcome::Settled(i)),
                _ => {
                    Err(StoreError::Conflict(format!("hold {:?} is already settled with a different usage", r.hold_id)))
                }
            };
        }
        state => {
            return Err(StoreError::Conflict(format!(
                "hold {:?} is {} and can no longer be settled",
                r.hold_id,
                state.as_str()
            )));
        }
    }
    let hold = entry.hold.clone();
    let mut event = r.event.clone();
    // The hold decides where the charge goes: its account, pool and key, never the event's.
    event.account = hold.account.clone();
    if event.id.is_empty() {
        event.id = hold.id.clone();
    }
    event.pool = hold.pool;
    event.key = hold.key.clone();
    let (pool_id, totals, scope, ppm) = hold_pool(s, &hold)?;
    let event_key = (event.account.clone(), event.id.clone());
    let taken = s.taken.contains_key(&event_key) || s.new_event_ids.contains_key(&event_key);
    let settlement = match ledger::settle(hold.amount, event.cost, &scope, ppm) {
        Ok(settlement) => settlement,
        // A taken event id is reported before a bad amount, as in `ledger::charge_hold`: only a
        // careful attempt knows.
        Err(_) if taken => return Err(event_id_taken(&event.id)),
        Err(_) if !s.careful => {
            s.needs_careful = true;
            return Err(StoreError::Backend("the batch runs again carefully".into()));
        }
        Err(refusal) => return Err(StoreError::Invalid(format!("amount out of range ({})", refusal.code()))),
    };
    let charge = charge(s, &hold, (pool_id, totals), settlement.split, hold.amount)?;
    if taken {
        return Err(event_id_taken(&event.id));
    }
    // No refusal after this point: the changes.
    let i = record(s, charge, event_key, ChargedEvent::of_hold(event, &hold, settlement, now));
    let entry = s.holds.get_mut(&key).expect("the hold read above");
    entry.hold.state = HoldState::Settled;
    entry.event = Some(EventRef::New(i));
    s.changed_holds.insert(key);
    Ok(Outcome::Settled(i))
}

/// `Store::settle_part`: the checks of `tollgate_store::replay_part` and `part_event`, then the
/// charge of the event against `release` of the hold, which stays open with the rest.
fn decide_settle_part(s: &mut State, r: &SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Outcome> {
    let event_key = (r.account.clone(), r.event.id.clone());
    // A repeat of a part this batch charges already: the same answer, or a conflict.
    if let Some(&i) = s.new_event_ids.get(&event_key) {
        return match ledger::replay(Some((s.new_events[i].event.fingerprint.clone(), i)), &r.event.fingerprint) {
            Replay::Same(i) => Ok(Outcome::Settled(i)),
            _ => Err(StoreError::Conflict(format!(
                "event id {:?} is already recorded with different content; use another event id",
                r.event.id
            ))),
        };
    }
    // A committed event of that id is only known to a careful attempt; a first attempt that
    // meets one fails its insert and runs again carefully.
    if let Some(event) = tollgate_store::replay_part(r, s.taken.get(&event_key).cloned())? {
        return Ok(Outcome::Ready(Ok(Done::Settled(event))));
    }
    charge_part(s, r, event_key, release, now).map_err(|e| {
        // A repeat of a part recorded before its lease closed is answered with that part, not
        // refused: only a careful attempt knows.
        if s.careful {
            e
        } else {
            s.needs_careful = true;
            StoreError::Backend("the batch runs again carefully".into())
        }
    })
}

/// The part of [`decide_settle_part`] after the replay checks.
fn charge_part(
    s: &mut State,
    r: &SettleRequest,
    event_key: (String, String),
    release: Nanos,
    now: DateTime<Utc>,
) -> StoreResult<Outcome> {
    let key = (r.account.clone(), r.hold_id.clone());
    let hold = s.holds.get(&key).ok_or_else(|| hold_not_found(&r.hold_id))?.hold.clone();
    let event = tollgate_store::part_event(r, &hold, release)?;
    let (pool_id, totals, scope, ppm) = hold_pool(s, &hold)?;
    let settlement = ledger::settle(release, event.cost, &scope, ppm)
        .map_err(|refusal| StoreError::Invalid(format!("amount out of range ({})", refusal.code())))?;
    let charge = charge(s, &hold, (pool_id, totals), settlement.split, release)?;
    // No refusal after this point: the changes.
    let i = record(s, charge, event_key, ChargedEvent::of_hold(event, &hold, settlement, now));
    let entry = s.holds.get_mut(&key).expect("the hold read above");
    entry.hold.amount = Nanos(entry.hold.amount.0 - release.0);
    entry.parted = true;
    s.changed_holds.insert(key);
    Ok(Outcome::Settled(i))
}

/// The same checks, in the same order, as `ledger::void`.
fn decide_void(s: &mut State, account: &str, hold_id: &str) -> StoreResult<Hold> {
    let key = (account.to_string(), hold_id.to_string());
    let entry = s.holds.get(&key).ok_or_else(|| hold_not_found(hold_id))?;
    match entry.hold.state {
        HoldState::Open => {}
        HoldState::Voided => return Ok(entry.hold.clone()),
        state => {
            return Err(StoreError::Conflict(format!(
                "hold {hold_id:?} is {} and can no longer be voided",
                state.as_str()
            )));
        }
    }
    let h = entry.hold.clone();
    let release = Nanos(-h.amount.0);
    let pool_id = (account.to_string(), h.pool, us(h.cycle_start));
    let (totals, _) = pool_scope(s, &pool_id)?;
    let new_pool = add_pool(totals, PoolTotals { held: release, ..PoolTotals::default() })?;
    let new_key = match &h.key {
        Some(k) => {
            let id = (k.clone(), us(h.cycle_start));
            let t = key_totals(s, &id)?;
            Some((id, add_key(t, KeyTotals { charged: Nanos::ZERO, held: release })?))
        }
        None => None,
    };
    s.pools.insert(pool_id.clone(), new_pool);
    s.changed_pools.insert(pool_id);
    if let Some((id, t)) = new_key {
        s.key_totals.insert(id.clone(), t);
        s.changed_keys.insert(id);
    }
    let entry = s.holds.get_mut(&key).expect("the hold read above");
    entry.hold.state = HoldState::Voided;
    s.changed_holds.insert(key);
    Ok(entry.hold.clone())
}

/// The same checks as `ledger::extend`.
fn decide_extend(s: &mut State, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
    let key = (account.to_string(), hold_id.to_string());
    let entry = s.holds.get_mut(&key).ok_or_else(|| hold_not_found(hold_id))?;
    if entry.hold.state != HoldState::Open {
        return Err(StoreError::Conflict(format!("hold {hold_id:?} is {}", entry.hold.state.as_str())));
    }
    entry.hold.expires_at = now + Duration::seconds(ttl_s as i64);
    entry.expires_changed = true;
    let hold = entry.hold.clone();
    s.changed_holds.insert(key);
    Ok(hold)
}

/// Writes what the batch decided and commits: the event-order locks, one statement per kind of
/// row written, the re-check of refused holds and `COMMIT`, all sent at once (in that order: the
/// statements are prepared, so each is sent when first polled). Holds that cannot be found by
/// their `ctid` (made by this batch), whose event id is not their own, or that the batch changes
/// two ways (a lease charged in parts and extended, voided or settled) are updated one by one
/// first (rare). Returns the seq of each new event, in order.
async fn write(c: &Conn, s: &State, owner: i64, jobs: &[Work<'_>], outcomes: &mut [Outcome]) -> Result<Vec<i64>> {
    let (st, client) = (&c.st, &c.client);
    let h = NewHoldColumns::new(&s.new_holds);
    let e = &s.new_events;
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
    fn new(h: &'a [(Hold, String)]) -> NewHoldColumns<'a> {
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
            fingerprint: h.iter().map(|(_, f)| f.as_str()).collect(),
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
        for key in &s.changed_holds {
            let entry = &s.holds[key];
            let new_event = match entry.event {
                Some(EventRef::New(i)) => Some(i),
                _ => None,
            };
            match (entry.tid, entry.hold.state, entry.expires_changed, entry.parted) {
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
        for id in &s.changed_pools {
            let p = s.pools[id];
            t.p_tid.push(s.pool_tids[id]);
            t.p_grants.push(p.grants.0);
            t.p_used.push(p.used.0);
            t.p_overage.push(p.overage.0);
            t.p_held.push(p.held.0);
        }
        for id in &s.changed_keys {
            let k = s.key_totals[id];
            t.k_tid.push(s.key_tids[id]);
            t.k_charged.push(k.charged.0);
            t.k_held.push(k.held.0);
        }
        t
    }
}

/// Holds refused for lack of credit, with their place in the batch: another process may have
/// made one of the same id meanwhile (a retried request); then the answer is the replay, as in
/// `ledger::hold` ([`replay_refused`]).
fn refused_holds<'j>(jobs: &'j [Work<'_>], outcomes: &[Outcome]) -> Vec<(usize, &'j HoldRequest)> {
    jobs.iter()
        .zip(outcomes.iter())
        .enumerate()
        .filter_map(|(i, ((op, _), outcome))| match (op, outcome) {
            (Op::Hold(r), Outcome::Ready(Ok(Done::Hold(HoldOutcome::Refused { .. })))) => Some((i, r)),
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
/// hold's replay (or a conflict), as in `ledger::hold`.
fn replay_refused(outcomes: &mut [Outcome], refused: Vec<(usize, &HoldRequest)>, rows: &[Row]) -> Result<()> {
    let mut existing: HashMap<(String, String), HoldEntry> = HashMap::new();
    for r in rows {
        let entry = hold_entry(r)?;
        existing.insert((entry.hold.account.clone(), entry.hold.id.clone()), entry);
    }
    for (i, r) in refused {
        let Some(entry) = existing.remove(&(r.account.clone(), r.id.clone())) else { continue };
        outcomes[i] = Outcome::Ready(match ledger::replay(Some((entry.fingerprint, entry.hold)), &r.fingerprint) {
            Replay::Same(hold) => Ok(Done::Hold(HoldOutcome::Replayed(hold))),
            _ => Err(StoreError::Conflict(format!(
                "hold id {:?} was already used for a different request; use a new id",
                r.id
            ))),
        });
    }
    Ok(())
}
