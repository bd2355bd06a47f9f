//! `tollgate check`: the ledger invariants of SPEC section 3, verified with SQL over the whole
//! database.

use rusqlite::Connection;
use tollgate_core::{Nanos, OnExhausted, PoolKind};
use tollgate_store::{Audit, StoreResult};

use crate::rows::{self, backend, time};

pub fn audit(conn: &Connection) -> StoreResult<Audit> {
    let mut audit = Audit::default();
    let mut s = conn
        .prepare(
            "SELECT p.account, p.pool, p.cycle_start_us, p.grants, p.used, p.overage, p.held,
                (SELECT COALESCE(SUM(grant_part), 0) FROM events e
                  WHERE e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us),
                (SELECT COALESCE(SUM(overage_part), 0) FROM events e
                  WHERE e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us),
                (SELECT COALESCE(SUM(grant_part + overage_part - overshoot), 0) FROM events e
                  WHERE e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us
                    AND e.hold_id IS NOT NULL),
                (SELECT COALESCE(SUM(amount), 0) FROM holds h
                  WHERE h.account = p.account AND h.pool = p.pool AND h.cycle_start_us = p.cycle_start_us
                    AND h.state = 'open'),
                (SELECT COALESCE(SUM(amount), 0) FROM grants g
                  WHERE g.account = p.account AND g.pool = p.pool AND g.cycle_start_us = p.cycle_start_us),
                (SELECT COALESCE(SUM(overshoot), 0) FROM events e
                  WHERE e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us
                    AND e.overshoot > 0),
                (SELECT COUNT(*) FROM events e
                  WHERE e.account = p.account AND e.pool = p.pool AND e.cycle_start_us = p.cycle_start_us
                    AND e.overshoot > 0)
             FROM pool_cycles p ORDER BY p.account, p.pool, p.cycle_start_us",
        )
        .map_err(backend)?;
    let mut q = s.query([]).map_err(backend)?;
    while let Some(r) = q.next().map_err(backend)? {
        audit.pools_checked += 1;
        let account: String = r.get(0).map_err(backend)?;
        let pool_name: String = r.get(1).map_err(backend)?;
        let start = time(r.get(2).map_err(backend)?);
        let n = |i: usize| -> StoreResult<Nanos> { r.get::<_, i64>(i).map(Nanos).map_err(backend) };
        let (grants, used, overage, held) = (n(3)?, n(4)?, n(5)?, n(6)?);
        let (sum_grant, sum_overage, through_holds, open_held, sum_grants) = (n(7)?, n(8)?, n(9)?, n(10)?, n(11)?);
        let (overshoot, overshot) = (n(12)?, r.get::<_, i64>(13).map_err(backend)?);
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
        if let Some(pool) = PoolKind::parse(&pool_name) {
            let policy = rows::load_policy(conn, &account, pool)?;
            if policy.on_exhausted == OnExhausted::Block
                && let Some(limit) = policy.limit(grants)
                && through_holds.saturating_add(held) > limit
            {
                breach(format!(
                    "charged through holds {through_holds} + held {held} exceeds the block limit {limit} \
                     (a lowered cap after the charges also shows here)"
                ));
            }
        }
    }
    audit.events_checked =
        conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0)).map_err(backend)? as u64;
    audit.holds_open = conn
        .query_row("SELECT COUNT(*) FROM holds WHERE state = 'open'", [], |r| r.get::<_, i64>(0))
        .map_err(backend)? as u64;
    let twice: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT e.hold_id FROM events e
              JOIN holds h ON h.account = e.account AND h.id = e.hold_id AND h.lease = 0
              GROUP BY e.account, e.hold_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .map_err(backend)?;
    if twice > 0 {
        audit.breaches.push(format!("{twice} holds were charged by more than one event"));
    }
    let mut keys = conn
        .prepare(
            "SELECT k.key_id, k.cycle_start_us, k.charged, k.held,
                (SELECT COALESCE(SUM(grant_part + overage_part), 0) FROM events e
                  WHERE e.key_id = k.key_id AND e.cycle_start_us = k.cycle_start_us),
                (SELECT COALESCE(SUM(amount), 0) FROM holds h
                  WHERE h.key_id = k.key_id AND h.cycle_start_us = k.cycle_start_us AND h.state = 'open')
             FROM key_cycles k",
        )
        .map_err(backend)?;
    let mut q = keys.query([]).map_err(backend)?;
    while let Some(r) = q.next().map_err(backend)? {
        let key: String = r.get(0).map_err(backend)?;
        let n = |i: usize| -> StoreResult<i64> { r.get::<_, i64>(i).map_err(backend) };
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
