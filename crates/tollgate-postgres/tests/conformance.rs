//! The store conformance suite on the PostgreSQL backend, each case on a fresh database of the
//! server named by `TOLLGATE_PG_URL`; without it, each case says it did not run and passes:
//! `TOLLGATE_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate-postgres
//! --test conformance`.

mod common;

tollgate_conformance::conformance_suite!({
    let Some(store) = common::fresh_store().await else { return };
    std::future::ready(store)
});
