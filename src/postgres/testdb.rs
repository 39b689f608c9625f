//! The throwaway database of the PostgreSQL tests: the cluster named by `IDEMSTORE_PG`
//! (`.ci/pg run -- cargo test ...` sets it), one schema of a random name per test, dropped
//! at the end of the test.
//!
//! The skip-or-fail rule, the schema's name and its drop are the testkit's
//! ([`idemstore_testkit::engine::pg::Schema`]), shared with the integration tests. The testkit
//! links a copy of idemstore of its own, so only strings and `postgres` clients (one crate,
//! unified by Cargo) come from it; what needs this crate's own types is here.

use std::collections::HashMap;

use idemstore_testkit::engine::pg::{Schema, connect};
use postgres::Client;

use super::pipeline::Wire;
use super::pool::{Pool, open_pool, parse_conninfo};
use super::schema::{Names, create_or_check};
use super::sql::{Loaded, Statements, Upsert};

/// A schema of its own for one test, dropped (with everything in it) when this is dropped.
pub(crate) struct TestDb {
    pub names: Names,
    schema: Schema,
    /// The threads of the pools made for the test (which it drops before the `TestDb`).
    pub workers: super::pool::Workers,
}

impl TestDb {
    /// A fresh schema name on the test cluster (the schema itself is not created), or `None`
    /// when the tests skip (after saying so; with `CI=true` it panics instead).
    pub(crate) fn new() -> Option<TestDb> {
        let schema = Schema::new()?;
        let names = Names::new(&schema.name).expect("schema name");
        Some(TestDb {
            names,
            schema,
            workers: super::pool::Workers::new(),
        })
    }

    /// [`TestDb::new`] with idemstore's objects created in the schema, and its statements.
    pub(crate) fn with_schema() -> Option<(TestDb, Statements)> {
        let db = TestDb::new()?;
        create_or_check(&mut db.client(), &db.names).expect("create idemstore's objects");
        let sql = Statements::new(&db.names);
        Some((db, sql))
    }

    /// The test cluster's conninfo.
    pub(crate) fn conninfo(&self) -> &str {
        &self.schema.conninfo
    }

    /// A new connection of its own.
    pub(crate) fn client(&self) -> Client {
        connect(self.conninfo())
    }

    /// A pool of `size` connections.
    pub(crate) fn pool(&self, size: u32) -> Pool {
        open_pool(
            &parse_conninfo(self.conninfo()).expect("a good conninfo"),
            size,
            &self.workers,
        )
        .expect("open the pool")
    }

    /// A writer's connection running `sql`, named `application_name` in `pg_stat_activity`.
    pub(crate) fn wire(&self, sql: &Statements, application_name: &str) -> Wire {
        let conninfo = idemstore_testkit::pg::with_param(
            self.conninfo(),
            "application_name",
            application_name,
        );
        Wire::connect(&parse_conninfo(&conninfo).expect("a good conninfo"), sql)
            .expect("connect a writer")
    }

    /// The committed rows of `keys`, read on a connection of its own.
    pub(crate) fn committed<K: AsRef<[u8]>>(
        &self,
        sql: &Statements,
        keys: &[K],
    ) -> HashMap<Vec<u8>, Loaded> {
        let mut client = self.client();
        let mut tx = client.transaction().unwrap();
        sql.load_locked(&mut tx, keys).unwrap()
    }

    /// Whether another session can take the lock of `key` (it then lets it go at once).
    pub(crate) fn lock_is_free(&self, sql: &Statements, key: &[u8]) -> bool {
        let id = sql.lock_order(&[key])[0];
        let mut other = self.client();
        let free: bool = other
            .query_one("SELECT pg_try_advisory_lock($1)", &[&id])
            .unwrap()
            .get(0);
        if free {
            other
                .execute("SELECT pg_advisory_unlock($1)", &[&id])
                .unwrap();
        }
        free
    }

    /// The connection that drops the schema at the end, for checks and set-ups.
    pub(crate) fn admin(&mut self) -> &mut Client {
        self.schema.admin()
    }

    /// Waits until no server session matches `sessions` (see
    /// [`idemstore_testkit::pg::wait_until_gone`]), asking on [`TestDb::admin`].
    pub(crate) fn wait_until_gone(
        &mut self,
        sessions: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        what: &str,
    ) {
        idemstore_testkit::pg::wait_until_gone(self.admin(), sessions, params, what);
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
