//! The PostgreSQL side of the demo (`--backend postgres`): the run's schema, the ledger
//! table, the hyper service's handler that charges and completes in one transaction, and
//! the evidence read back at the end.

use std::error::Error;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use idemstore::admin::Summary;
use idemstore::http::{Decision, RequestGuard, StoredResponse, complete, error_response};
use idemstore::{Error as StoreError, Store};
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use crate::server::{
    Books, broken_on_purpose, event, header_ms, payment_of, receipt, tenant, text,
};
use crate::{LEASE, PG_ENV, SCHEMA_ENV};

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Connections of a server process's ledger pool (its store has a pool of its own).
const LEDGER_CONNECTIONS: u32 = 12;
/// Connections of a server process's store.
const STORE_CONNECTIONS: u32 = 8;

/// The conninfo of the database, from `IDEMSTORE_PG`, or an error saying how to get one.
pub(crate) fn conninfo() -> Result<String, String> {
    match std::env::var(PG_ENV) {
        Ok(c) if !c.trim().is_empty() => Ok(c),
        _ => Err(format!(
            "--backend postgres needs a PostgreSQL database, named by {PG_ENV} (a conninfo), \
             which is not set. Run the demo under a throwaway cluster:\n  \
             .ci/pg run -- cargo run --release --features postgres --example demo -- --backend postgres --replicas 2\n\
             or start one for this shell first:\n  \
             eval \"$(.ci/pg start)\"   (and .ci/pg stop when done)"
        )),
    }
}

/// `name` as an SQL identifier (the demo's schema names are lowercase letters, digits and
/// underscores; quoting keeps them exactly as written).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn ledger_table(schema: &str) -> String {
    format!("{}.ledger", quoted(schema))
}

/// The run's own schema, created empty but for the ledger table (the store makes its
/// tables there when the first server opens it).
pub(crate) struct RunSchema {
    pub(crate) conninfo: String,
    pub(crate) schema: String,
}

impl RunSchema {
    /// Creates the schema `idemstore_demo_<suffix>` and its ledger table.
    pub(crate) fn create(conninfo: String, suffix: &str) -> Result<RunSchema, Box<dyn Error>> {
        let schema = format!("idemstore_demo_{suffix}");
        let mut client = postgres::Client::connect(&conninfo, NoTls)
            .map_err(|e| format!("cannot connect to {PG_ENV}: {e}"))?;
        // No unique constraint on the payment: a double charge must be possible for the
        // verdict to be able to see one. The reference is unique (the processor books a
        // reference once).
        client.batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {t} (
                 reference text PRIMARY KEY,
                 payment   text   NOT NULL,
                 amount    bigint NOT NULL,
                 token     bigint NOT NULL,
                 booked_at timestamptz NOT NULL DEFAULT now()
             );",
            s = quoted(&schema),
            t = ledger_table(&schema),
        ))?;
        Ok(RunSchema { conninfo, schema })
    }

    /// Every charge booked: `(reference, payment)`.
    pub(crate) fn charges(&self) -> Result<Vec<(String, String)>, Box<dyn Error>> {
        let mut client = postgres::Client::connect(&self.conninfo, NoTls)?;
        let rows = client.query(
            &format!(
                "SELECT reference, payment FROM {} ORDER BY payment, reference",
                ledger_table(&self.schema)
            ),
            &[],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The store's own count of its records.
    pub(crate) fn summary(&self) -> Result<Summary, Box<dyn Error>> {
        let store = Store::builder()
            .reap_interval(None)
            .postgres_schema(self.schema.clone())
            .postgres_pool_size(2)
            .open_postgres(&self.conninfo)?;
        let summary = store.summary()?;
        store.close()?;
        Ok(summary)
    }

    /// Drops the schema and everything in it.
    pub(crate) fn drop_schema(&self) -> Result<(), Box<dyn Error>> {
        let mut client = postgres::Client::connect(&self.conninfo, NoTls)?;
        client.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quoted(&self.schema)
        ))?;
        Ok(())
    }
}

/// The ledger table, as a server process writes it.
pub(crate) struct LedgerTable {
    pool: Pool,
    table: String,
}

impl LedgerTable {
    /// Books `reference` once: `Ok(false)` when it was booked before.
    pub(crate) fn charge_once(
        &self,
        reference: &str,
        payment: &str,
        amount: u64,
    ) -> Result<bool, Box<dyn Error + Send + Sync>> {
        let mut conn = self.pool.get()?;
        let booked = conn.execute(
            &format!(
                "INSERT INTO {} (reference, payment, amount, token) VALUES ($1, $2, $3, 0) \
                 ON CONFLICT (reference) DO NOTHING",
                self.table
            ),
            &[&reference, &payment, &(amount as i64)],
        )?;
        Ok(booked == 1)
    }
}

/// A server process's store and ledger table, from its environment.
pub(crate) fn open_store_and_books() -> Result<(Store, Books), Box<dyn Error + Send + Sync>> {
    let conninfo = std::env::var(PG_ENV).map_err(|_| format!("{PG_ENV} is not set"))?;
    let schema = std::env::var(SCHEMA_ENV).map_err(|_| format!("{SCHEMA_ENV} is not set"))?;
    let store = Store::builder()
        .lease(LEASE)
        .postgres_schema(schema.clone())
        .postgres_pool_size(STORE_CONNECTIONS)
        .open_postgres(&conninfo)?;
    let manager = PostgresConnectionManager::new(conninfo.parse()?, NoTls);
    let pool = r2d2::Pool::builder()
        .max_size(LEDGER_CONNECTIONS)
        .connection_timeout(Duration::from_secs(10))
        .build(manager)?;
    let table = LedgerTable {
        pool,
        table: ledger_table(&schema),
    };
    Ok((store, Books::Table(table.into())))
}

/// `POST /payments` on PostgreSQL: the charge row and the lease's completion in one
/// transaction. A crash or a fencing before the commit leaves neither, so a takeover always
/// starts from nothing charged, and needs no checkpoint.
pub(crate) fn payments(
    guard: &RequestGuard,
    ledger: &LedgerTable,
    req: &Request<Vec<u8>>,
) -> Response<Vec<u8>> {
    let scope = tenant(req.headers());
    let Some((payment, amount)) = payment_of(req.body()) else {
        return text(StatusCode::BAD_REQUEST, "need payment and amount");
    };
    let lease = match guard.begin(&scope, req) {
        Ok(Decision::Run(lease)) => lease,
        Ok(Decision::Replay(response) | Decision::Reject(response)) => return response,
        Err(e) => {
            event(format!("ERROR begin: {e}"));
            return error_response(&e);
        }
    };
    let token = lease.token();
    if let Some(r) = lease.recovered() {
        // Whatever the previous attempt did was rolled back with its transaction.
        event(format!(
            "TAKEOVER none {} {token} {}",
            r.previous_token(),
            r.attempt()
        ));
    }
    let failed = |what: &str, e: StoreError| {
        if matches!(e, StoreError::LeaseLost { .. }) {
            event(format!("FENCED {token} {what}"));
        } else {
            event(format!("ERROR {what}: {e}"));
        }
        error_response(&e)
    };
    let reference = format!("ch_{token}");
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        // The lease is dropped (released): a retry charges again, nothing was committed.
        event(format!("ERROR ledger {what}: {e}"));
        text(StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable")
    };
    let mut conn = match ledger.pool.get() {
        Ok(conn) => conn,
        Err(e) => return unavailable("connection", &e),
    };
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return unavailable("begin", &e),
    };
    let insert = format!(
        "INSERT INTO {} (reference, payment, amount, token) VALUES ($1, $2, $3, $4)",
        ledger.table
    );
    let params: [&(dyn postgres::types::ToSql + Sync); 4] =
        [&reference, &payment, &(amount as i64), &(token as i64)];
    if let Err(e) = tx.execute(&insert, &params) {
        return unavailable("insert", &e);
    }
    if broken_on_purpose() {
        // Broken on purpose (--ignore-checkpoints): the charge commits on its own, before the
        // completion, so an attempt that is fenced or killed after it leaves a charge behind
        // and the takeover charges again.
        if let Err(e) = tx.commit() {
            return unavailable("commit", &e);
        }
        tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => return unavailable("begin", &e),
        };
    }
    // The receipt, inside the transaction: a crash here loses the charge with the rest.
    let work = 3 + token % 12 + header_ms(req, "x-demo-slow-ms").unwrap_or(0);
    std::thread::sleep(Duration::from_millis(work));
    if let Some(stall) = header_ms(req, "x-demo-stall-ms") {
        std::thread::sleep(Duration::from_millis(stall.min(10_000)));
    }
    let response = receipt(&payment, &reference, amount);
    if broken_on_purpose() {
        drop(tx);
        return match complete(lease, &response) {
            Ok(_) => response,
            Err(e) => failed("complete", e),
        };
    }
    let stored = StoredResponse::from_response(&response).encode();
    if let Err(e) = lease.complete_in(&mut tx, &stored) {
        // Fenced (another attempt took the key over) or failed: roll the charge back.
        drop(tx);
        return failed("complete_in", e);
    }
    match tx.commit() {
        Ok(()) => response,
        Err(e) => {
            // Unknown whether it committed: a retry finds the key completed (a replay) or
            // in flight until the lease runs out, then charges with nothing booked.
            event(format!("ERROR commit: {e}"));
            text(StatusCode::SERVICE_UNAVAILABLE, "commit outcome unknown")
        }
    }
}
