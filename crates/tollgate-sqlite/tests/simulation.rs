//! The seeded simulation on the SQLite backend: a few fixed seeds, plus the one named by
//! `TOLLGATE_SIM_SEED` when it is set (`TOLLGATE_SIM_SEED=1234 cargo test -p tollgate-sqlite
//! --test simulation -- --nocapture`). Each seed runs on a fresh database file.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;

use tollgate_conformance::simulation::{self, Config};
use tollgate_sqlite::SqliteStore;
use tollgate_store::Store;

async fn run_seed(seed: u64) {
    println!("simulation seed {seed} ({seed:#x}); rerun with {}={seed}", simulation::SEED_ENV);
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("tollgate.db")).expect("open store"));
    let report = simulation::run(store, Config::new(seed)).await;
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_1() {
    run_seed(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_0x5eed() {
    run_seed(0x5EED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_0xdecafbad() {
    run_seed(0xDECA_FBAD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_from_env() {
    match simulation::seed_from_env() {
        Some(seed) => run_seed(seed).await,
        None => println!("{} is not set: no extra seed", simulation::SEED_ENV),
    }
}
