//! The writer's connection: its prepared statements (see "Plans" in the parent module) and the
//! row addresses (`ctid`) its updates find rows by.

use std::error::Error as StdError;

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};
use tollgate_store::{StoreError, StoreResult};

use crate::ledger::EVENT_ORDER_LOCKS;
use crate::{describe, events, rows};

/// A row's physical address, read under its lock and used to update it (a TID scan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Tid([u8; 6]);

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

pub(super) const HOLD_LOCK_COLUMNS: &str = "h.id, h.account, h.pool, h.key_id, h.amount, h.model, h.source, h.state, \
     h.cycle_start_us, h.cycle_end_us, h.created_us, h.expires_us, h.remaining_after, h.fingerprint, h.event_seq, h.made_by, h.ctid";

/// A writer's connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) st: Statements,
}

pub(super) struct Statements {
    pub(super) begin: Statement,
    pub(super) custom_plans: Statement,
    pub(super) commit: Statement,
    pub(super) rollback: Statement,
    pub(super) settings: Statement,
    pub(super) keys: Statement,
    pub(super) lock_holds: Statement,
    pub(super) taken: Statement,
    pub(super) events_by_seq: Statement,
    pub(super) lock_pools: Statement,
    pub(super) lock_pools_skip: Statement,
    pub(super) create_pool: Statement,
    pub(super) insert_tier_grant: Statement,
    pub(super) lock_keys: Statement,
    pub(super) lock_keys_skip: Statement,
    pub(super) create_key: Statement,
    pub(super) event_order: Statement,
    pub(super) write: Statement,
    pub(super) update_hold: Statement,
    pub(super) read_holds: Statement,
}

impl Conn {
    pub(super) async fn connect(config: &tokio_postgres::Config) -> StoreResult<Conn> {
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

/// Everything a batch writes, in one statement: new holds (`$1`…`$14`, their makers `$59`), new events (`$15`…`$44`),
/// the holds they settle (found by `ctid`, `$45`, each with its event by hold id), voided holds
/// (`$46`), extended holds (`$47`, `$48`), pools (`$49`…`$53`), keys (`$54`…`$56`) and leases
/// charged in parts (`$57`, `$58`), the last three found by `ctid` with their new figures at the
/// same position in the arrays. Its rows: the new events' seqs. The statement's parts change
/// different rows.
fn write_sql() -> String {
    format!(
        "WITH new_holds AS (
         INSERT INTO holds (account, id, pool, key_id, amount, model, source, state, cycle_start_us, cycle_end_us,
             created_us, expires_us, remaining_after, fingerprint, owner, made_by)
         SELECT a, i, p, k, amt, m, src, 'open', cs, ce, cr, ex, ra, fp, $14, mb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::int8[],
                     $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::text[], $59::text[])
             AS u(a, i, p, k, amt, m, src, cs, ce, cr, ex, ra, fp, mb)),
     e AS (
         {events}
         RETURNING account, id, hold_id, seq),
     settled AS (
         UPDATE holds SET state = 'settled', event_seq = e.seq FROM e
         WHERE holds.ctid = ANY($45::tid[]) AND e.account = holds.account AND e.hold_id = holds.id),
     voided AS (UPDATE holds SET state = 'voided' WHERE ctid = ANY($46::tid[])),
     extended AS (
         UPDATE holds SET expires_us = ($48::int8[])[array_position($47::tid[], ctid)] WHERE ctid = ANY($47::tid[])),
     pool_totals AS (
         UPDATE pool_cycles p SET (grants, used, overage, held) =
             (SELECT ($50::int8[])[n], ($51::int8[])[n], ($52::int8[])[n], ($53::int8[])[n]
              FROM (SELECT array_position($49::tid[], p.ctid) AS n) AS x)
         WHERE ctid = ANY($49::tid[])),
     key_totals AS (
         UPDATE key_cycles k SET (charged, held) =
             (SELECT ($55::int8[])[n], ($56::int8[])[n] FROM (SELECT array_position($54::tid[], k.ctid) AS n) AS x)
         WHERE ctid = ANY($54::tid[])),
     parted AS (
         UPDATE holds SET amount = ($58::int8[])[array_position($57::tid[], ctid)], lease = true
         WHERE ctid = ANY($57::tid[]))
     SELECT account, id, seq FROM e",
        events = events::insert_sql(15)
    )
}
