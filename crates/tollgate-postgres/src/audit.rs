//! `tollgate check`: the sums the ledger invariants of SPEC section 3 compare, read with SQL
//! over the whole database inside one read-only snapshot; `tollgate_store::audit::judge` decides.

use deadpool_postgres::Transaction;
use tollgate_core::{Nanos, PoolKind};
use tollgate_store::Audit;
use tollgate_store::audit::{AuditRows, KeySums, PoolSums};

use crate::Result;
use crate::rows::{self, query, query_one, time};

pub async fn audit(tx: &Transaction<'_>) -> Result<Audit> {
    Ok(tollgate_store::audit::judge(&rows(tx).await?))
}

async fn rows(tx: &Transaction<'_>) -> Result<AuditRows> {
    let count = |row: tokio_postgres::Row| -> Result<u64> { Ok(row.try_get::<_, i64>(0)? as u64) };
    Ok(AuditRows {
        pools: pool_sums(tx).await?,
        keys: key_sums(tx).await?,
        events: count(query_one(tx, "SELECT COUNT(*) FROM events", &[]).await?)?,
        holds_open: count(query_one(tx, "SELECT COUNT(*) FROM holds WHERE state = 'open'", &[]).await?)?,
        charged_twice: count(
            query_one(
                tx,
                "SELECT COUNT(*) FROM (SELECT e.hold_id FROM events e
                  JOIN holds h ON h.account = e.account AND h.id = e.hold_id AND NOT h.lease
                  GROUP BY e.account, e.hold_id HAVING COUNT(*) > 1) AS charged_twice",
                &[],
            )
            .await?,
        )?,
    })
}

async fn pool_sums(tx: &Transaction<'_>) -> Result<Vec<PoolSums>> {
    let mut sums = Vec::new();
    let pools = query(
        tx,
        "WITH e AS (
             SELECT account, pool, cycle_start_us, SUM(grant_part) AS grant_part, SUM(overage_part) AS overage_part,
                 SUM(grant_part + overage_part - overshoot) FILTER (WHERE hold_id IS NOT NULL) AS through_holds,
                 SUM(overshoot) AS overshoot, COUNT(*) FILTER (WHERE overshoot > 0) AS overshot
             FROM events GROUP BY account, pool, cycle_start_us),
         h AS (
             SELECT account, pool, cycle_start_us, SUM(amount) AS held FROM holds WHERE state = 'open'
             GROUP BY account, pool, cycle_start_us),
         g AS (SELECT account, pool, cycle_start_us, SUM(amount) AS amount FROM grants
             GROUP BY account, pool, cycle_start_us)
         SELECT p.account, p.pool, p.cycle_start_us, p.grants, p.used, p.overage, p.held,
            COALESCE(e.grant_part, 0)::BIGINT, COALESCE(e.overage_part, 0)::BIGINT,
            COALESCE(e.through_holds, 0)::BIGINT, COALESCE(h.held, 0)::BIGINT, COALESCE(g.amount, 0)::BIGINT,
            COALESCE(q.on_exhausted, 'block'), q.overage_cap, q.spend_cap,
            COALESCE(e.overshoot, 0)::BIGINT, COALESCE(e.overshot, 0)::BIGINT
         FROM pool_cycles p LEFT JOIN policies q ON q.account = p.account AND q.pool = p.pool
         LEFT JOIN e ON e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us
         LEFT JOIN h ON h.account = p.account AND h.pool = p.pool AND h.cycle_start_us = p.cycle_start_us
         LEFT JOIN g ON g.account = p.account AND g.pool = p.pool AND g.cycle_start_us = p.cycle_start_us
         ORDER BY p.account, p.pool, p.cycle_start_us",
        &[],
    )
    .await?;
    for r in &pools {
        let policy = match PoolKind::parse(r.try_get(1)?) {
            Some(_) => Some(rows::policy(r, 12)?),
            None => None,
        };
        sums.push(tollgate_store::rows::pool_sums(&rows::Cols(r), 15, policy)?);
    }
    Ok(sums)
}

async fn key_sums(tx: &Transaction<'_>) -> Result<Vec<KeySums>> {
    let mut sums = Vec::new();
    let keys = query(
        tx,
        "SELECT k.key_id, k.cycle_start_us, k.charged, k.held,
            (SELECT COALESCE(SUM(grant_part + overage_part), 0)::BIGINT FROM events e
              WHERE e.key_id = k.key_id AND e.cycle_start_us = k.cycle_start_us),
            (SELECT COALESCE(SUM(amount), 0)::BIGINT FROM holds h
              WHERE h.key_id = k.key_id AND h.cycle_start_us = k.cycle_start_us AND h.state = 'open')
         FROM key_cycles k ORDER BY k.key_id, k.cycle_start_us",
        &[],
    )
    .await?;
    for r in &keys {
        let n = |i: usize| -> Result<Nanos> { Ok(Nanos(r.try_get(i)?)) };
        sums.push(KeySums {
            key: r.try_get(0)?,
            cycle_start: time(r.try_get(1)?),
            charged: n(2)?,
            held: n(3)?,
            events: n(4)?,
            open_holds: n(5)?,
        });
    }
    Ok(sums)
}
