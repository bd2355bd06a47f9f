//! Migrations, applied in order on open. `PRAGMA user_version` records how many have run.
//! Times are microseconds since the Unix epoch (UTC); amounts are nano-USD integers.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tiers (
    id TEXT PRIMARY KEY,
    interactive INTEGER NOT NULL,
    programmatic INTEGER NOT NULL,
    monthly_price INTEGER,
    payg_multiplier_ppm INTEGER NOT NULL
);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    tier TEXT NOT NULL,
    anchor_us INTEGER NOT NULL,
    timezone TEXT NOT NULL,
    interactive_grant INTEGER,
    programmatic_grant INTEGER,
    created_us INTEGER NOT NULL
);
CREATE TABLE policies (
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    on_exhausted TEXT NOT NULL,
    overage_cap INTEGER,
    spend_cap INTEGER,
    PRIMARY KEY (account, pool)
) WITHOUT ROWID;
CREATE TABLE pool_cycles (
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    cycle_end_us INTEGER NOT NULL,
    grants INTEGER NOT NULL,
    used INTEGER NOT NULL,
    overage INTEGER NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (account, pool, cycle_start_us)
) WITHOUT ROWID;
CREATE TABLE grants (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    note TEXT,
    created_us INTEGER NOT NULL
);
CREATE INDEX grants_cycle ON grants (account, cycle_start_us);
CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    name TEXT,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    cap INTEGER,
    created_us INTEGER NOT NULL,
    revoked_us INTEGER
);
CREATE INDEX keys_account ON keys (account);
CREATE TABLE key_cycles (
    key_id TEXT NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (key_id, cycle_start_us)
) WITHOUT ROWID;
CREATE TABLE holds (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    pool TEXT NOT NULL,
    key_id TEXT,
    amount INTEGER NOT NULL,
    model TEXT,
    source TEXT,
    state TEXT NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    cycle_end_us INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    remaining_after INTEGER,
    fingerprint TEXT NOT NULL,
    event_seq INTEGER,
    PRIMARY KEY (account, id)
);
CREATE INDEX holds_open ON holds (expires_us) WHERE state = 'open';
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    pool TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cache_creation_5m_input_tokens INTEGER NOT NULL,
    cache_creation_1h_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    web_search_requests INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    grant_part INTEGER NOT NULL,
    overage_part INTEGER NOT NULL,
    overshoot INTEGER NOT NULL,
    service_tier TEXT,
    inference_geo TEXT,
    speed TEXT,
    source TEXT,
    key_id TEXT,
    labels TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    hold_id TEXT,
    latency_ms INTEGER,
    ttft_ms INTEGER,
    partial INTEGER NOT NULL,
    unsettled INTEGER NOT NULL,
    recorded_us INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    UNIQUE (account, id)
);
CREATE INDEX events_account_ts ON events (account, ts_us);
"#,
    r#"
CREATE TABLE alert_rules (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    account TEXT,
    pool TEXT,
    percents TEXT NOT NULL,
    window_s INTEGER,
    factor_ppm INTEGER,
    floor INTEGER,
    days INTEGER,
    channels TEXT NOT NULL,
    from_config INTEGER NOT NULL
);
CREATE TABLE alerts (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    rule_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    cycle_end_us INTEGER NOT NULL,
    percent INTEGER,
    used INTEGER NOT NULL,
    limit_amount INTEGER,
    message TEXT NOT NULL,
    fired_us INTEGER NOT NULL
);
CREATE INDEX alerts_account ON alerts (account, fired_us);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    alert_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_us INTEGER NOT NULL,
    lease_until_us INTEGER,
    state TEXT NOT NULL,
    last_error TEXT
);
CREATE INDEX outbox_due ON outbox (next_us) WHERE state = 'pending';
"#,
    r#"
CREATE TABLE rollups (
    account TEXT NOT NULL,
    cycle_start_us INTEGER NOT NULL,
    pool TEXT NOT NULL,
    hour_us INTEGER NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    key_id TEXT NOT NULL,
    labels TEXT NOT NULL,
    calls INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cache_creation_5m_input_tokens INTEGER NOT NULL,
    cache_creation_1h_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    web_search_requests INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    latency_ms_sum INTEGER NOT NULL,
    timed INTEGER NOT NULL,
    PRIMARY KEY (account, cycle_start_us, pool, hour_us, model, source, key_id, labels)
) WITHOUT ROWID;
INSERT INTO rollups
SELECT account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
       COALESCE(key_id, ''), labels, COUNT(*), SUM(input_tokens), SUM(cache_creation_5m_input_tokens),
       SUM(cache_creation_1h_input_tokens), SUM(cache_read_input_tokens), SUM(output_tokens),
       SUM(web_search_requests), SUM(cost), SUM(grant_part + overage_part), COALESCE(SUM(latency_ms), 0),
       COUNT(latency_ms)
FROM events
GROUP BY account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
         COALESCE(key_id, ''), labels;
"#,
    r#"
-- A lease: a hold that several calls' events were charged against (Store::settle_part).
ALTER TABLE holds ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
-- Who made a hold (`gateway`, `admin` or `key:<id>`): only its maker may end it. Holds made
-- before this column are the gateway's when their ids are the gateway's (`tgr_…`, `lease_…`),
-- else their key's, else the admin's.
ALTER TABLE holds ADD COLUMN made_by TEXT NOT NULL DEFAULT 'admin';
UPDATE holds SET made_by = CASE
    WHEN lease = 1 OR id LIKE 'tgr\_%' ESCAPE '\' OR id LIKE 'lease\_%' ESCAPE '\' THEN 'gateway'
    WHEN key_id IS NOT NULL THEN 'key:' || key_id
    ELSE 'admin' END;
-- An event charged at an estimate: served work whose usage was not known.
ALTER TABLE events ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
"#,
];

/// Runs the migrations not yet applied, each in its own transaction.
/// Whether the database at `conn` is tollgate's, at the version this build writes: the schema
/// version it records, or None when it has none of tollgate's tables.
pub fn version(conn: &Connection) -> rusqlite::Result<Option<usize>> {
    let has_tables: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'holds')",
        [],
        |r| r.get(0),
    )?;
    if !has_tables {
        return Ok(None);
    }
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).map(|v| Some(v as usize))
}

/// How many migrations this build knows.
pub const VERSION: usize = MIGRATIONS.len();

pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let applied: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}
