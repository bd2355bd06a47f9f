//! `tollgate check`: the ledger invariants of SPEC section 3, verified with SQL over the whole
//! database, inside one read-only snapshot.

use deadpool_postgres::Transaction;
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy};
use tollgate_store::Audit;

use crate::Result;
use crate::rows::{self, query, query_one, time};

pub async fn audit(tx: &Transaction<'_>) -> Result<Audit> {
    let mut audit = Audit::default();
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
        audit.pools_checked += 1;
        let account: String = r.try_get(0)?;
        let pool_name: String = r.try_get(1)?;
        let start = time(r.try_get(2)?);
        let n = |i: usize| -> Result<Nanos> { Ok(Nanos(r.try_get(i)?)) };
        let (grants, used, overage, held) = (n(3)?, n(4)?, n(5)?, n(6)?);
        let (sum_grant, sum_overage, through_holds, open_held, sum_grants) = (n(7)?, n(8)?, n(9)?, n(10)?, n(11)?);
        let policy: PoolPolicy = rows::policy(r, 12)?;
        let (overshoot, overshot) = (n(15)?, r.try_get::<_, i64>(16)?);
        if overshot > 0 {
            audit.warnings.push(Audit::overshoot_warning(&account, &pool_name, start, overshoot, overshot as u64));
        }
        let at = format!("account {account} pool {pool_name} cycle {}", start.to_rfc3339());
        let mut breach = |text: String| audit.breaches.push(format!("{at}: {text}"));
        if used != sum_grant {
            breach(format!("used {used} != Σ events' grant part {sum_grant}"));
        }
        if overage != sum_overage {
            breach(format!("overage {overage} != Σ events' overage part {sum_overage}"));
        }
        if held != open_held {
            breach(format!("held {held} != Σ open holds {open_held}"));
        }
        if grants != sum_grants {
            breach(format!("grants {grants} != Σ grant rows {sum_grants}"));
        }
        if PoolKind::parse(&pool_name).is_some()
            && policy.on_exhausted == OnExhausted::Block
            && let Some(limit) = policy.limit(grants)
            && through_holds.saturating_add(held) > limit
        {
            breach(format!(
                "charged through holds {through_holds} + held {held} exceeds the block limit {limit} \
                 (a lowered cap after the charges also shows here)"
            ));
        }
    }
    let count = |row: tokio_postgres::Row| -> Result<u64> { Ok(row.try_get::<_, i64>(0)? as u64) };
    audit.events_checked = count(query_one(tx, "SELECT COUNT(*) FROM events", &[]).await?)?;
    audit.holds_open = count(query_one(tx, "SELECT COUNT(*) FROM holds WHERE state = 'open'", &[]).await?)?;
    let twice = count(
        query_one(
            tx,
            "SELECT COUNT(*) FROM (SELECT e.hold_id FROM events e
              JOIN holds h ON h.account = e.account AND h.id = e.hold_id AND NOT h.lease
              GROUP BY e.account, e.hold_id HAVING COUNT(*) > 1) AS charged_twice",
            &[],
        )
        .await?,
    )?;
    if twice > 0 {
        audit.breaches.push(format!("{twice} holds were charged by more than one event"));
    }
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
        let key: String = r.try_get(0)?;
        let n = |i: usize| -> Result<i64> { Ok(r.try_get(i)?) };
        if n(2)? != n(4)? || n(3)? != n(5)? {
            audit.breaches.push(format!(
                "key {key} cycle {}: charged {} held {} but events say {} and open holds {}",
                time(n(1)?).to_rfc3339(),
                n(2)?,
                n(3)?,
                n(4)?,
                n(5)?
            ));
        }
    }
    Ok(audit)
}
