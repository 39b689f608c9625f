//! The throwaway database of the PostgreSQL tests: the cluster named by `IDEMSTORE_PG`
//! (`.ci/pg run -- cargo test ...` sets it), one schema of a random name per test, dropped
//! at the end of the test.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;

use postgres::{Client, NoTls};

use super::pool::{Pool, open_pool, parse_conninfo};
use super::schema::{Names, quote_identifier};
use super::sql::Upsert;

/// The cluster's conninfo, or `None` (after saying so loudly) when the tests must skip.
///
/// # Panics
///
/// With `CI=true` and no `IDEMSTORE_PG`: CI must run these tests, never pass them unrun.
pub(crate) fn conninfo() -> Option<String> {
    match std::env::var("IDEMSTORE_PG") {
        Ok(conninfo) if !conninfo.is_empty() => Some(conninfo),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "IDEMSTORE_PG is not set but CI=true: run the tests under .ci/pg run --"
            );
            // Straight to the process's stderr: the test harness would capture `eprintln!`.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: IDEMSTORE_PG not set (run under .ci/pg run --)"
            );
            None
        }
    }
}

/// A schema of its own for one test, dropped (with everything in it) when this is dropped.
pub(crate) struct TestDb {
    pub conninfo: String,
    pub names: Names,
    admin: Client,
}

impl TestDb {
    /// A fresh schema name on the test cluster (the schema itself is not created), or `None`
    /// when the tests skip.
    pub(crate) fn new() -> Option<TestDb> {
        let conninfo = conninfo()?;
        let admin = Client::connect(&conninfo, NoTls).expect("connect to IDEMSTORE_PG");
        let suffix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let names = Names::new(&format!("idemstore_test_{suffix:016x}")).expect("schema name");
        Some(TestDb {
            conninfo,
            names,
            admin,
        })
    }

    /// A new connection of its own.
    pub(crate) fn client(&self) -> Client {
        Client::connect(&self.conninfo, NoTls).expect("connect to IDEMSTORE_PG")
    }

    /// A pool of `size` connections.
    pub(crate) fn pool(&self, size: u32) -> Pool {
        open_pool(
            &parse_conninfo(&self.conninfo).expect("a good conninfo"),
            size,
            &super::pool::workers(),
        )
        .expect("open the pool")
    }

    /// The connection that drops the schema at the end, for checks and set-ups.
    pub(crate) fn admin(&mut self) -> &mut Client {
        &mut self.admin
    }
}

impl TestDb {
    /// Waits (at most 10 s) until no server session matches the SQL condition `sessions` on
    /// `pg_stat_activity`, with `params`; panics naming `what` otherwise.
    pub(crate) fn wait_until_gone(
        &mut self,
        sessions: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        what: &str,
    ) {
        let query = format!("SELECT count(*) FROM pg_stat_activity WHERE {sessions}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left: i64 = self.admin.query_one(&query, params).unwrap().get(0);
            if left == 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what} did not end");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A row to write, for the tests of the statements.
pub(crate) fn row<'a>(key: &'a [u8], token: u64, dies_at: u64, record: &'a [u8]) -> Upsert<'a> {
    Upsert {
        key,
        token,
        dies_at,
        record,
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_identifier(&self.names.schema)
        );
        if let Err(e) = self.admin.batch_execute(&sql) {
            eprintln!("could not drop test schema {}: {e}", self.names.schema);
        }
    }
}
