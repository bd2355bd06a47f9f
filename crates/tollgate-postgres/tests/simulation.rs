//! The seeded simulation on the PostgreSQL backend: a few fixed seeds, plus the one named by
//! `TOLLGATE_SIM_SEED` when it is set. Each seed runs on a fresh database of the server named by
//! `TOLLGATE_PG_URL`; without it, each test says it did not run and passes:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres TOLLGATE_SIM_SEED=1234 cargo test
//! -p tollgate-postgres --test simulation -- --nocapture`.

mod common;

use std::sync::Arc;

use tollgate_conformance::simulation::{self, Config};
use tollgate_store::Store;

async fn run_seed(seed: u64) {
    let Some(db) = common::TestDb::create().await else { return };
    println!("simulation seed {seed} ({seed:#x}) on database {}; rerun with {}={seed}", db.name, simulation::SEED_ENV);
    let store: Arc<dyn Store> = Arc::new(db.open().await);
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
