//! Migrations, applied in order on open. The table `schema_version` records each one applied.
//! Times are microseconds since the Unix epoch (UTC) and amounts nano-USD, both `BIGINT`, as in
//! the SQLite backend: no floats, no `NUMERIC`.
//!
//! Several processes may open the same database at once: the whole migration runs in one
//! transaction under a transaction-scoped advisory lock, so exactly one of them applies a
//! migration and the others find it applied.

use deadpool_postgres::Client;
use tollgate_core::Tier;

use crate::Result;
use crate::rows;

/// The advisory lock taken around migrations (the bytes of "tollgate" as a big-endian integer).
/// One-integer advisory locks live in a key space apart from the two-integer ones.
const MIGRATION_LOCK: i64 = 0x746F_6C6C_6761_7465;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tiers (
    id TEXT PRIMARY KEY,
    interactive BIGINT NOT NULL,
    programmatic BIGINT NOT NULL,
    monthly_price BIGINT,
    payg_multiplier_ppm BIGINT NOT NULL
);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    tier TEXT NOT NULL,
    anchor_us BIGINT NOT NULL,
    timezone TEXT NOT NULL,
    interactive_grant BIGINT,
    programmatic_grant BIGINT,
    created_us BIGINT NOT NULL
);
CREATE TABLE policies (
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    on_exhausted TEXT NOT NULL,
    overage_cap BIGINT,
    spend_cap BIGINT,
    PRIMARY KEY (account, pool)
);
-- One row per pool and cycle: the running totals every ledger write locks (FOR UPDATE).
CREATE TABLE pool_cycles (
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    cycle_end_us BIGINT NOT NULL,
    grants BIGINT NOT NULL,
    used BIGINT NOT NULL,
    overage BIGINT NOT NULL,
    held BIGINT NOT NULL,
    PRIMARY KEY (account, pool, cycle_start_us)
);
CREATE TABLE grants (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount BIGINT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    expires_us BIGINT NOT NULL,
    note TEXT,
    created_us BIGINT NOT NULL
);
CREATE INDEX grants_cycle ON grants (account, cycle_start_us);
CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    name TEXT,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    cap BIGINT,
    created_us BIGINT NOT NULL,
    revoked_us BIGINT
);
CREATE INDEX keys_account ON keys (account);
CREATE TABLE key_cycles (
    key_id TEXT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    charged BIGINT NOT NULL,
    held BIGINT NOT NULL,
    PRIMARY KEY (key_id, cycle_start_us)
);
-- Each open store takes a number from this sequence and writes it on the holds it makes
-- (`holds.owner`), so that `recover_open_holds` can tell its own holds from other processes'.
CREATE SEQUENCE store_owners;
CREATE TABLE holds (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    pool TEXT NOT NULL,
    key_id TEXT,
    amount BIGINT NOT NULL,
    model TEXT,
    source TEXT,
    state TEXT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    cycle_end_us BIGINT NOT NULL,
    created_us BIGINT NOT NULL,
    expires_us BIGINT NOT NULL,
    remaining_after BIGINT,
    fingerprint TEXT NOT NULL,
    event_seq BIGINT,
    owner BIGINT NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE INDEX holds_open ON holds (expires_us) WHERE state = 'open';
CREATE TABLE events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    pool TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cache_creation_5m_input_tokens BIGINT NOT NULL,
    cache_creation_1h_input_tokens BIGINT NOT NULL,
    cache_read_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    web_search_requests BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    grant_part BIGINT NOT NULL,
    overage_part BIGINT NOT NULL,
    overshoot BIGINT NOT NULL,
    service_tier TEXT,
    inference_geo TEXT,
    speed TEXT,
    source TEXT,
    key_id TEXT,
    labels TEXT NOT NULL,
    ts_us BIGINT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    hold_id TEXT,
    latency_ms BIGINT,
    ttft_ms BIGINT,
    partial BOOLEAN NOT NULL,
    unsettled BOOLEAN NOT NULL,
    recorded_us BIGINT NOT NULL,
    fingerprint TEXT NOT NULL,
    UNIQUE (account, id)
);
CREATE INDEX events_account_ts ON events (account, ts_us);
CREATE INDEX events_pool_cycle ON events (account, pool, cycle_start_us);
CREATE INDEX events_key_cycle ON events (key_id, cycle_start_us) WHERE key_id IS NOT NULL;
"#,
    r#"
CREATE TABLE alert_rules (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    account TEXT,
    pool TEXT,
    percents TEXT NOT NULL,
    window_s BIGINT,
    factor_ppm BIGINT,
    floor BIGINT,
    days BIGINT,
    channels TEXT NOT NULL,
    from_config BOOLEAN NOT NULL
);
CREATE TABLE alerts (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    rule_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    pool TEXT NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    cycle_end_us BIGINT NOT NULL,
    percent BIGINT,
    used BIGINT NOT NULL,
    limit_amount BIGINT,
    message TEXT NOT NULL,
    fired_us BIGINT NOT NULL
);
CREATE INDEX alerts_account ON alerts (account, fired_us);
CREATE TABLE outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_us BIGINT NOT NULL,
    lease_until_us BIGINT,
    state TEXT NOT NULL,
    last_error TEXT
);
CREATE INDEX outbox_due ON outbox (next_us) WHERE state = 'pending';
"#,
    r#"
-- Usage per hour, what reports, forecasts and advice read (tollgate_store::report). A
-- statement-level trigger adds each INSERT's events to their hours, grouped, so a batch of a
-- hundred events costs one upsert per (hour, model, source, key, labels). Rows of one account are
-- only written under its event-order lock (ledger.rs), so concurrent upserts never deadlock.
-- Its keys compare bytewise (COLLATE "C"): cheaper than the locale's rules, and no order is
-- shown to people from this index.
CREATE TABLE rollups (
    account TEXT COLLATE "C" NOT NULL,
    cycle_start_us BIGINT NOT NULL,
    pool TEXT COLLATE "C" NOT NULL,
    hour_us BIGINT NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    key_id TEXT COLLATE "C" NOT NULL,
    labels TEXT COLLATE "C" NOT NULL,
    calls BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cache_creation_5m_input_tokens BIGINT NOT NULL,
    cache_creation_1h_input_tokens BIGINT NOT NULL,
    cache_read_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    web_search_requests BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    charged BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    timed BIGINT NOT NULL,
    PRIMARY KEY (account, cycle_start_us, pool, hour_us, model, source, key_id, labels)
);
CREATE FUNCTION tollgate_add_rollups() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rollups AS r
    SELECT account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
           COALESCE(key_id, ''), labels, COUNT(*), SUM(input_tokens), SUM(cache_creation_5m_input_tokens),
           SUM(cache_creation_1h_input_tokens), SUM(cache_read_input_tokens), SUM(output_tokens),
           SUM(web_search_requests), SUM(cost), SUM(grant_part + overage_part), COALESCE(SUM(latency_ms), 0),
           COUNT(latency_ms)
    FROM new_events
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (account, cycle_start_us, pool, hour_us, model, source, key_id, labels) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        cache_creation_5m_input_tokens = r.cache_creation_5m_input_tokens + EXCLUDED.cache_creation_5m_input_tokens,
        cache_creation_1h_input_tokens = r.cache_creation_1h_input_tokens + EXCLUDED.cache_creation_1h_input_tokens,
        cache_read_input_tokens = r.cache_read_input_tokens + EXCLUDED.cache_read_input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        web_search_requests = r.web_search_requests + EXCLUDED.web_search_requests,
        cost = r.cost + EXCLUDED.cost,
        charged = r.charged + EXCLUDED.charged,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,
        timed = r.timed + EXCLUDED.timed;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_rollups AFTER INSERT ON events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_add_rollups();
INSERT INTO rollups
SELECT account, cycle_start_us, pool, (ts_us / 3600000000) * 3600000000, model, COALESCE(source, ''),
       COALESCE(key_id, ''), labels, COUNT(*), SUM(input_tokens), SUM(cache_creation_5m_input_tokens),
       SUM(cache_creation_1h_input_tokens), SUM(cache_read_input_tokens), SUM(output_tokens),
       SUM(web_search_requests), SUM(cost), SUM(grant_part + overage_part), COALESCE(SUM(latency_ms), 0),
       COUNT(latency_ms)
FROM events
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
"#,
    r#"
-- A lease: a hold that several calls' events were charged against (Store::settle_part).
ALTER TABLE holds ADD COLUMN lease BOOLEAN NOT NULL DEFAULT false;
"#,
    r#"
-- Read only by the audit, which now sums all events in one grouped scan: one index entry fewer
-- for every event written (the ledger's hot path).
DROP INDEX events_pool_cycle;
"#,
    r#"
-- Rollups are no longer added by a trigger inside every transaction that inserts events: a
-- background task of one tollgate process at a time adds the committed events to them (report.rs,
-- `roll_up`), and readers add the events not rolled up yet. Every event with seq <= rolled_seq is
-- in the rollups, and no other; pending_seq and pending_xid are the next step's bound and the
-- transaction that must be over before it is taken.
DROP TRIGGER events_rollups ON events;
DROP FUNCTION tollgate_add_rollups();
CREATE TABLE rollup_progress (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    rolled_seq BIGINT NOT NULL,
    pending_seq BIGINT NOT NULL,
    pending_xid xid8 NOT NULL
);
INSERT INTO rollup_progress (rolled_seq, pending_seq, pending_xid)
SELECT COALESCE(MAX(seq), 0), COALESCE(MAX(seq), 0), pg_current_xact_id() FROM events;
"#,
    r#"
-- Who made a hold (`gateway`, `admin` or `key:<id>`): only its maker may end it. Holds made
-- before this column are the gateway's when their ids are the gateway's (`tgr_…`, `lease_…`),
-- else their key's, else the admin's.
ALTER TABLE holds ADD COLUMN made_by TEXT NOT NULL DEFAULT 'admin';
UPDATE holds SET made_by = CASE
    WHEN lease OR id LIKE 'tgr\_%' OR id LIKE 'lease\_%' THEN 'gateway'
    WHEN key_id IS NOT NULL THEN 'key:' || key_id
    ELSE 'admin' END;
-- An event charged at an estimate: served work whose usage was not known.
ALTER TABLE events ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT false;
"#,
];

/// The schema version this code reads and writes: the number of migrations.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// Runs the migrations not yet applied and adds the built-in tiers that are missing, all in one
/// transaction under the migration lock.
pub async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    // No notice that the table exists on every open but the first.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: i32 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await?.get(0);
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        return Err(tollgate_store::StoreError::Backend(format!(
            "the database's schema is at version {applied}, newer than this tollgate knows ({known}): upgrade \
             tollgate"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&(i as i32 + 1)]).await?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    for tier in Tier::builtins() {
        rows::write_tier(&tx, &tier, false).await?;
    }
    tx.commit().await?;
    Ok(())
}
