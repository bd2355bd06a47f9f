//! Test databases on a real PostgreSQL server. The server is named by `TOLLGATE_PG_URL` (an
//! admin connection, e.g. `postgres://postgres@127.0.0.1:5432/postgres`); each test creates a
//! database of its own with a random name and drops it at its end (`TOLLGATE_PG_KEEP=1` keeps
//! it, to look at after a failure). Without `TOLLGATE_PG_URL` each test says on stderr that it
//! did not run, and passes.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::NoTls;
use tollgate_core::{Nanos, PoolKind, PoolPolicy, Tier};
use tollgate_postgres::PgStore;
use tollgate_store::{
    Account, AccountUpdate, Audit, Balance, Event, EventOutcome, EventQuery, Grant, Hold, HoldOutcome, HoldRequest,
    Key, NewAccount, NewEvent, NewGrant, NewKey, SettleRequest, Store, StoreResult,
};

pub const URL_ENV: &str = "TOLLGATE_PG_URL";
pub const KEEP_ENV: &str = "TOLLGATE_PG_KEEP";

/// A database created for one test, dropped with this value.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    /// The test database's own url.
    pub url: String,
}

/// `url` with its database replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| panic!("{URL_ENV}={url:?} is not a postgres:// url"));
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let query = path.find('?').map_or("", |i| &path[i..]);
    format!("{scheme}://{authority}/{name}{query}")
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("cannot connect to {URL_ENV}={url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl TestDb {
    /// A fresh, empty database; None, after saying so on stderr, when `TOLLGATE_PG_URL` is unset.
    pub async fn create() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(URL_ENV) else {
            let test = std::thread::current().name().unwrap_or("this test").to_string();
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            let _ = std::io::stderr().write_all(
                format!(
                    "tollgate-postgres: {test} did not run: {URL_ENV} is not set. To run it against PostgreSQL: \
                     {URL_ENV}=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate-postgres\n"
                )
                .as_bytes(),
            );
            return None;
        };
        let name = format!("tollgate_test_{:016x}", getrandom::u64().expect("randomness"));
        let client = admin(&admin_url).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e:?}"));
        let url = with_database(&admin_url, &name);
        Some(TestDb { admin_url, name, url })
    }

    pub async fn open(&self) -> PgStore {
        PgStore::open(&self.url).await.unwrap_or_else(|e| panic!("open the store on {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("{KEEP_ENV} is set: kept the test database {} ({})", self.name, self.url);
            return;
        }
        // Drop runs inside the test's runtime: drop the database from a thread of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async {
                admin(&admin_url).await.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop the test database {}: {e:?}", self.name),
            Err(_) => eprintln!("could not drop the test database {}: the dropping thread panicked", self.name),
        }
    }
}

/// A store on a fresh database, which it drops when the store is dropped.
use tollgate_store::alerts::{Alert, AlertQuery, AlertRule, NewAlert, Outbound};

pub struct TestStore {
    store: PgStore,
    _db: TestDb,
}

/// A fresh store for one test; None when `TOLLGATE_PG_URL` is unset (the test then passes).
pub async fn fresh_store() -> Option<Arc<dyn Store>> {
    let db = TestDb::create().await?;
    let store = db.open().await;
    Some(Arc::new(TestStore { store, _db: db }))
}

#[async_trait]
impl tollgate_store::alerts::AlertStore for TestStore {
    async fn put_alert_rule(&self, rule: AlertRule) -> StoreResult<AlertRule> {
        self.store.put_alert_rule(rule).await
    }
    async fn alert_rules(&self) -> StoreResult<Vec<AlertRule>> {
        self.store.alert_rules().await
    }
    async fn delete_alert_rule(&self, id: &str) -> StoreResult<()> {
        self.store.delete_alert_rule(id).await
    }
    async fn replace_config_alert_rules(&self, rules: Vec<AlertRule>) -> StoreResult<()> {
        self.store.replace_config_alert_rules(rules).await
    }
    async fn fire_alert(&self, alert: NewAlert) -> StoreResult<Option<Alert>> {
        self.store.fire_alert(alert).await
    }
    async fn alerts(&self, query: AlertQuery) -> StoreResult<Vec<Alert>> {
        self.store.alerts(query).await
    }
    async fn claim_deliveries(&self, now: DateTime<Utc>, lease_s: u64, limit: usize) -> StoreResult<Vec<Outbound>> {
        self.store.claim_deliveries(now, lease_s, limit).await
    }
    async fn delivery_done(&self, id: i64, now: DateTime<Utc>) -> StoreResult<()> {
        self.store.delivery_done(id, now).await
    }
    async fn delivery_failed(&self, id: i64, retry_at: Option<DateTime<Utc>>, error: &str) -> StoreResult<()> {
        self.store.delivery_failed(id, retry_at, error).await
    }
}

#[async_trait]
impl tollgate_store::report::ReportStore for TestStore {
    async fn rollups(
        &self,
        account: &str,
        cycle_start: DateTime<Utc>,
        dims: tollgate_store::report::Dims,
    ) -> StoreResult<Vec<tollgate_store::report::Rollup>> {
        self.store.rollups(account, cycle_start, dims).await
    }
}

#[async_trait]
impl Store for TestStore {
    async fn put_tier(&self, tier: Tier) -> StoreResult<()> {
        self.store.put_tier(tier).await
    }
    async fn tiers(&self) -> StoreResult<Vec<Tier>> {
        self.store.tiers().await
    }
    async fn create_account(&self, account: NewAccount, now: DateTime<Utc>) -> StoreResult<Account> {
        self.store.create_account(account, now).await
    }
    async fn update_account(&self, id: &str, update: AccountUpdate) -> StoreResult<Account> {
        self.store.update_account(id, update).await
    }
    async fn account(&self, id: &str) -> StoreResult<Option<Account>> {
        self.store.account(id).await
    }
    async fn accounts(&self) -> StoreResult<Vec<Account>> {
        self.store.accounts().await
    }
    async fn set_policy(&self, account: &str, pool: PoolKind, policy: PoolPolicy) -> StoreResult<()> {
        self.store.set_policy(account, pool, policy).await
    }
    async fn policy(&self, account: &str, pool: PoolKind) -> StoreResult<PoolPolicy> {
        self.store.policy(account, pool).await
    }
    async fn add_grant(&self, grant: NewGrant, now: DateTime<Utc>) -> StoreResult<Grant> {
        self.store.add_grant(grant, now).await
    }
    async fn grants(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Vec<Grant>> {
        self.store.grants(account, now).await
    }
    async fn create_key(&self, key: NewKey, now: DateTime<Utc>) -> StoreResult<Key> {
        self.store.create_key(key, now).await
    }
    async fn keys(&self, account: &str) -> StoreResult<Vec<Key>> {
        self.store.keys(account).await
    }
    async fn key_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Key>> {
        self.store.key_by_hash(secret_hash).await
    }
    async fn revoke_key(&self, account: &str, key_id: &str, now: DateTime<Utc>) -> StoreResult<Key> {
        self.store.revoke_key(account, key_id, now).await
    }
    async fn balance(&self, account: &str, now: DateTime<Utc>) -> StoreResult<Balance> {
        self.store.balance(account, now).await
    }
    async fn hold(&self, request: HoldRequest, now: DateTime<Utc>) -> StoreResult<HoldOutcome> {
        self.store.hold(request, now).await
    }
    async fn settle(&self, request: SettleRequest, now: DateTime<Utc>) -> StoreResult<Event> {
        self.store.settle(request, now).await
    }
    async fn settle_part(&self, request: SettleRequest, release: Nanos, now: DateTime<Utc>) -> StoreResult<Event> {
        self.store.settle_part(request, release, now).await
    }
    async fn void(&self, account: &str, hold_id: &str, now: DateTime<Utc>) -> StoreResult<Hold> {
        self.store.void(account, hold_id, now).await
    }
    async fn extend_hold(&self, account: &str, hold_id: &str, ttl_s: u64, now: DateTime<Utc>) -> StoreResult<Hold> {
        self.store.extend_hold(account, hold_id, ttl_s, now).await
    }
    async fn hold_by_id(&self, account: &str, hold_id: &str) -> StoreResult<Option<Hold>> {
        self.store.hold_by_id(account, hold_id).await
    }
    async fn record_events(&self, events: Vec<NewEvent>, now: DateTime<Utc>) -> StoreResult<Vec<EventOutcome>> {
        self.store.record_events(events, now).await
    }
    async fn events(&self, query: EventQuery) -> StoreResult<Vec<Event>> {
        self.store.events(query).await
    }
    async fn expire_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        self.store.expire_holds(now).await
    }
    async fn recover_open_holds(&self, now: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        self.store.recover_open_holds(now).await
    }
    async fn audit(&self) -> StoreResult<Audit> {
        self.store.audit().await
    }
}

#[test]
fn with_database_replaces_only_the_database() {
    for (url, want) in [
        ("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/t"),
        ("postgres://postgres@127.0.0.1:5432", "postgres://postgres@127.0.0.1:5432/t"),
        ("postgresql://u:p@h/db?sslmode=disable", "postgresql://u:p@h/t?sslmode=disable"),
        ("postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres", "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/t"),
        ("postgres://h?connect_timeout=5", "postgres://h/t?connect_timeout=5"),
    ] {
        assert_eq!(with_database(url, "t"), want, "{url}");
    }
}
