//! `tollgate check`: the sums the ledger invariants of SPEC section 3 compare, read with SQL
//! over the whole database; `tollgate_store::audit::judge` decides.

use rusqlite::Connection;
use tollgate_core::{Nanos, PoolKind};
use tollgate_store::audit::{AuditRows, KeySums, PoolSums};
use tollgate_store::{Audit, StoreResult};

use crate::rows::{self, backend, time};

pub fn audit(conn: &Connection) -> StoreResult<Audit> {
    Ok(tollgate_store::audit::judge(&rows(conn)?))
}

fn rows(conn: &Connection) -> StoreResult<AuditRows> {
    let count = |sql: &str| -> StoreResult<u64> {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(backend)
    };
    Ok(AuditRows {
        pools: pool_sums(conn)?,
        keys: key_sums(conn)?,
        events: count("SELECT COUNT(*) FROM events")?,
        holds_open: count("SELECT COUNT(*) FROM holds WHERE state = 'open'")?,
        charged_twice: count(
            "SELECT COUNT(*) FROM (SELECT e.hold_id FROM events e
              JOIN holds h ON h.account = e.account AND h.id = e.hold_id AND h.lease = 0
              GROUP BY e.account, e.hold_id HAVING COUNT(*) > 1)",
        )?,
    })
}

fn pool_sums(conn: &Connection) -> StoreResult<Vec<PoolSums>> {
    let mut pools = Vec::new();
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
        let account: String = r.get(0).map_err(backend)?;
        let pool: String = r.get(1).map_err(backend)?;
        let policy = match PoolKind::parse(&pool) {
            Some(kind) => Some(rows::load_policy(conn, &account, kind)?),
            None => None,
        };
        pools.push(tollgate_store::rows::pool_sums(&rows::Cols(r), 12, policy)?);
    }
    Ok(pools)
}

fn key_sums(conn: &Connection) -> StoreResult<Vec<KeySums>> {
    let mut sums = Vec::new();
    let mut keys = conn
        .prepare(
            "SELECT k.key_id, k.cycle_start_us, k.charged, k.held,
                (SELECT COALESCE(SUM(grant_part + overage_part), 0) FROM events e
                  WHERE e.key_id = k.key_id AND e.cycle_start_us = k.cycle_start_us),
                (SELECT COALESCE(SUM(amount), 0) FROM holds h
                  WHERE h.key_id = k.key_id AND h.cycle_start_us = k.cycle_start_us AND h.state = 'open')
             FROM key_cycles k ORDER BY k.key_id, k.cycle_start_us",
        )
        .map_err(backend)?;
    let mut q = keys.query([]).map_err(backend)?;
    while let Some(r) = q.next().map_err(backend)? {
        let n = |i: usize| -> StoreResult<Nanos> { r.get::<_, i64>(i).map(Nanos).map_err(backend) };
        sums.push(KeySums {
            key: r.get(0).map_err(backend)?,
            cycle_start: time(r.get(1).map_err(backend)?),
            charged: n(2)?,
            held: n(3)?,
            events: n(4)?,
            open_holds: n(5)?,
        });
    }
    Ok(sums)
}
