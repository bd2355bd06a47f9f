//! Test databases on a real PostgreSQL server, for the tests of `tollgate` on PostgreSQL. The
//! server is named by `TOLLGATE_PG_URL` (an admin connection, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`); each test creates a database of its own with a
//! random name and drops it at its end (`TOLLGATE_PG_KEEP=1` keeps it, to look at after a
//! failure). Without `TOLLGATE_PG_URL` a test says on stderr that it did not run, and passes.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use std::io::Write;

use tokio_postgres::NoTls;

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
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| panic!("{URL_ENV}={url:?} is not a postgres:// url"));
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let query = path.find('?').map_or("", |i| &path[i..]);
    format!("{scheme}://{authority}/{name}{query}")
}

/// A connection to `url`, driven by a task of the current runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Says on stderr (uncaptured, so it shows for passing tests too) that the test did not run.
pub fn not_run(test_binary: &str) {
    let test = std::thread::current().name().unwrap_or("this test").to_string();
    let _ = std::io::stderr().write_all(
        format!(
            "tollgate: {test} did not run: {URL_ENV} is not set. To run it against PostgreSQL: \
             {URL_ENV}=postgres://postgres@127.0.0.1:5432/postgres cargo test -p tollgate --test {test_binary}\n"
        )
        .as_bytes(),
    );
}

impl TestDb {
    /// A fresh, empty database; None, after saying so on stderr, when `TOLLGATE_PG_URL` is unset.
    pub async fn create(test_binary: &str) -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(URL_ENV) else {
            not_run(test_binary);
            return None;
        };
        let name = format!("tollgate_test_{:016x}", getrandom::u64().expect("randomness"));
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e:?}"));
        let url = with_database(&admin_url, &name);
        Some(TestDb { admin_url, name, url })
    }

    /// Runs one SQL statement on the test database; the number of rows it changed.
    pub async fn execute(&self, statement: &str) -> u64 {
        connect(&self.url).await.execute(statement, &[]).await.unwrap_or_else(|e| panic!("{statement}: {e:?}"))
    }

    /// The first column of the first row of a query on the test database, as an i64.
    pub async fn number(&self, query: &str) -> i64 {
        connect(&self.url).await.query_one(query, &[]).await.unwrap_or_else(|e| panic!("{query}: {e:?}")).get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("{KEEP_ENV} is set: kept the test database {} ({})", self.name, self.url);
            return;
        }
        // Drop may run inside the test's runtime: drop the database from a thread of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async {
                connect(&admin_url).await.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
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
