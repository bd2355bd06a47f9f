//! The store conformance suite on the SQLite backend, each case on a fresh database file.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::sync::Arc;

use tollgate_sqlite::SqliteStore;
use tollgate_store::Store;

async fn fresh() -> Arc<dyn Store> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tollgate.db");
    // The directory must outlive the store: leak it for the test's duration.
    std::mem::forget(dir);
    Arc::new(SqliteStore::open(&path).expect("open store"))
}

tollgate_conformance::conformance_suite!(fresh());
