//! A writer's connection: the statements of a batch sent together (pipelined), so that a
//! batch takes two round trips however many operations it holds (a reaper's pass inside it
//! adds one).
//!
//! The synchronous `postgres` client waits for each statement's answer before it sends the
//! next, and a simple query of several statements is parsed and planned by the server on
//! every call. A writer therefore talks through `tokio-postgres` on a current-thread runtime
//! of its own, driven only while the writer's thread waits in [`Wire`]'s calls (never from
//! inside another runtime: the committer's threads and the callers that lead a batch are
//! plain threads or tokio's blocking pool). Its statements are prepared once per
//! connection; the server plans them once and runs them with binary parameters. The writers'
//! connections live in an r2d2 pool of their own ([`WirePool`]).
//!
//! A batch's first round trip is `BEGIN`, the key locks, and after the locks the keys' rows,
//! the fencing tokens for its claims and the server's clock. Nothing of the batch is written
//! in it. Its second round trip is the writes and `COMMIT`. A batch of one key (the lone
//! caller's) runs statements for one key, which the server runs faster than the array forms.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::{try_join, try_join3, try_join4};
use postgres::types::{ToSql, Type};
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Statement};

use super::error::write_failed;
use super::pool::{ConnectFailed, target};
use super::sql::{
    BatchStart, Columns, Loaded, Statements, Upsert, clock_reading, drawn_tokens, last_rows,
    token_count,
};
use crate::error::{Error, Result};

/// A parameter of a statement.
type Param<'a> = &'a (dyn ToSql + Sync);

/// How long closing a writer's connection waits for the server to see it go.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A writer's connection (from the writers' pool), with its runtime and its prepared
/// statements.
pub(crate) struct Wire {
    /// Taken only by `drop`.
    runtime: Option<Runtime>,
    client: Option<Client>,
    /// Set when a call failed: the session's state is unknown (a transaction may be open),
    /// so the pool discards the connection instead of handing it out again.
    failed: bool,
    /// The task that drives the connection (it ends when the client is dropped).
    driver: tokio::task::JoinHandle<()>,
    prepared: Prepared,
}

/// The statements a writer runs, prepared on its connection.
struct Prepared {
    begin: Statement,
    commit: Statement,
    rollback: Statement,
    lock: Statement,
    lock_one: Statement,
    load: Statement,
    load_one: Statement,
    tokens: Statement,
    clock_and_tokens: Statement,
    upsert: Statement,
    upsert_one: Statement,
    delete: Statement,
    reap: Statement,
}

impl Wire {
    /// Connects to the database of `config` and prepares the statements of `sql`.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] (nothing was written) when the server cannot be reached in the
    /// config's connect timeout, or refuses the connection or a statement.
    pub(crate) fn connect(config: &tokio_postgres::Config, sql: &Statements) -> Result<Wire> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| {
                Error::storage("starting the runtime of a PostgreSQL writer connection", e)
            })?;
        let fail = |e| {
            connect_failed(
                &format!("connecting a writer to PostgreSQL at {}", target(config)),
                e,
            )
        };
        let (client, connection) = runtime.block_on(config.connect(NoTls)).map_err(fail)?;
        let driver = runtime.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "idemstore: a PostgreSQL writer connection ended");
            }
        });
        let prepared = runtime
            .block_on(async {
                // Every statement of a batch finds its rows through an index (the key's, or the
                // death time's for the reaper). A plan the server caches for a prepared
                // statement while the table is small would scan it whole instead (cheaper
                // then), and keep doing so as the table grows until the next ANALYZE: measured,
                // that cut 64 callers' throughput to a third in some runs.
                // A key's lock is held by a caller's open transaction after `complete_in`:
                // waiting for it is bounded, so a transaction left open (or a write of the
                // store made before it commits, on the same thread) fails one batch after
                // KEY_LOCK_TIMEOUT instead of holding this writer, and every key it serves.
                client
                    .batch_execute(&format!(
                        "SET enable_seqscan = off; SET lock_timeout = {}",
                        KEY_LOCK_TIMEOUT.as_millis()
                    ))
                    .await?;
                Prepared::new(&client, sql).await
            })
            .map_err(|e| connect_failed("preparing a writer's statements in PostgreSQL", e))?;
        Ok(Wire {
            runtime: Some(runtime),
            client: Some(client),
            failed: false,
            driver,
            prepared,
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the client lives until drop")
    }

    /// Whether the connection is known to be closed (the server ended it, or a call broke).
    pub(crate) fn is_closed(&self) -> bool {
        self.client().is_closed()
    }

    /// A batch's first round trip: `BEGIN`, the locks on `keys` (`lock_ids` as
    /// [`Statements::lock_order`] gives them), then the keys' rows, `claims` fresh tokens and
    /// the server's clock. The transaction stays open, also after an error (the caller rolls
    /// it back).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] (nothing of the batch was written); [`Error::Corrupt`] for a negative
    /// token or death time.
    pub(crate) fn start(
        &mut self,
        keys: &[Vec<u8>],
        lock_ids: &[i64],
        claims: usize,
    ) -> Result<BatchStart> {
        let one_key = keys.first().filter(|k| keys.iter().all(|o| o == *k));
        let started = match one_key {
            Some(key) if claims <= 1 && lock_ids.len() == 1 => {
                self.start_one(key, lock_ids[0], claims == 1)
            }
            _ => self.start_many(keys, lock_ids, claims),
        };
        self.noted(started)
    }

    /// `result`, noting a failure (see [`Wire::failed`]).
    fn noted<T>(&mut self, result: Result<T>) -> Result<T> {
        self.failed |= result.is_err();
        result
    }

    /// Whether the connection is known to be closed, or a call on it failed.
    pub(crate) fn is_broken(&self) -> bool {
        self.failed || self.is_closed()
    }

    /// One round trip that changes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the connection does not answer.
    fn check(&mut self) -> Result<()> {
        let checked = self
            .runtime()
            .block_on(self.client().simple_query(""))
            .map(|_| ())
            .map_err(|e| connect_failed("checking a PostgreSQL writer connection", e));
        self.noted(checked)
    }

    fn start_one(&mut self, key: &[u8], lock_id: i64, claim: bool) -> Result<BatchStart> {
        let (c, p) = (self.client(), &self.prepared);
        let lock: [Param<'_>; 1] = [&lock_id];
        let load: [Param<'_>; 2] = [&key, &claim];
        let (_, _, row) = self
            .runtime()
            .block_on(try_join3(
                c.execute(&p.begin, &[]),
                c.execute(&p.lock_one, &lock),
                c.query_one(&p.load_one, &load),
            ))
            .map_err(start_failed)?;
        let now: i64 = row.get(0);
        let token: Option<i64> = row.get(1);
        let tokens = drawn_tokens(token, usize::from(claim))?;
        let mut rows = HashMap::new();
        let stored: (Option<i64>, Option<i64>, Option<Vec<u8>>) =
            (row.get(2), row.get(3), row.get(4));
        match stored {
            (Some(token), Some(dies_at), Some(record)) => {
                rows.insert(key.to_vec(), Loaded::new(token, dies_at, record)?);
            }
            (None, None, None) => {}
            _ => {
                return Err(Error::corrupt(
                    "PostgreSQL answered a batch's start in an unexpected shape",
                ));
            }
        }
        Ok(BatchStart {
            rows,
            tokens,
            server_now: clock_reading(now),
        })
    }

    fn start_many(
        &mut self,
        keys: &[Vec<u8>],
        lock_ids: &[i64],
        claims: usize,
    ) -> Result<BatchStart> {
        let (c, p) = (self.client(), &self.prepared);
        let count = token_count(claims)?;
        let lock: [Param<'_>; 1] = [&lock_ids];
        let load: [Param<'_>; 1] = [&keys];
        let clock: [Param<'_>; 1] = [&count];
        let fail = start_failed;
        let (loaded, clock) = if keys.is_empty() {
            let (_, clock) = self
                .runtime()
                .block_on(try_join(
                    c.execute(&p.begin, &[]),
                    c.query_one(&p.clock_and_tokens, &clock),
                ))
                .map_err(fail)?;
            (Vec::new(), clock)
        } else {
            let (_, _, loaded, clock) = self
                .runtime()
                .block_on(try_join4(
                    c.execute(&p.begin, &[]),
                    c.execute(&p.lock, &lock),
                    c.query(&p.load, &load),
                    c.query_one(&p.clock_and_tokens, &clock),
                ))
                .map_err(fail)?;
            (loaded, clock)
        };
        let rows = loaded
            .iter()
            .map(Loaded::keyed)
            .collect::<Result<HashMap<_, _>>>()?;
        let now: i64 = clock.get(0);
        let tokens = drawn_tokens(clock.get::<_, Vec<i64>>(1), claims)?;
        Ok(BatchStart {
            rows,
            tokens,
            server_now: clock_reading(now),
        })
    }

    /// A batch's second round trip: writes `rows` (a key's last row counts), deletes the
    /// rows of `deleted`, and commits.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`], its outcome unknown unless the server's answer shows nothing was
    /// committed; [`Error::Corrupt`] for a token above `i64::MAX` (never drawn from the
    /// sequence).
    pub(crate) fn finish(&mut self, rows: &[Upsert<'_>], deleted: &[&[u8]]) -> Result<()> {
        let result = self.finish_once(rows, deleted);
        self.noted(result)
    }

    fn finish_once(&mut self, rows: &[Upsert<'_>], deleted: &[&[u8]]) -> Result<()> {
        let rows = last_rows(rows)?;
        let (c, p) = (self.client(), &self.prepared);
        let fail = |e| write_failed("writing and committing a batch in PostgreSQL", e);
        if let ([(key, token, dies_at, record)], []) = (rows.as_slice(), deleted) {
            let row: [Param<'_>; 4] = [key, token, dies_at, record];
            self.runtime()
                .block_on(try_join(
                    c.execute(&p.upsert_one, &row),
                    c.execute(&p.commit, &[]),
                ))
                .map_err(fail)?;
            return Ok(());
        }
        let columns = Columns::of(&rows);
        let upsert: [Param<'_>; 4] = [
            &columns.keys,
            &columns.tokens,
            &columns.deaths,
            &columns.records,
        ];
        let delete: [Param<'_>; 1] = [&deleted];
        let write = async {
            if !rows.is_empty() {
                c.execute(&p.upsert, &upsert).await?;
            }
            Ok::<_, postgres::Error>(())
        };
        let remove = async {
            if !deleted.is_empty() {
                c.execute(&p.delete, &delete).await?;
            }
            Ok::<_, postgres::Error>(())
        };
        // Joined, the three are sent together, in this order.
        self.runtime()
            .block_on(try_join3(write, remove, c.execute(&p.commit, &[])))
            .map_err(fail)?;
        Ok(())
    }

    /// Ends the open transaction without committing it.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]: the connection is broken (the server rolls the transaction back
    /// when the session ends).
    pub(crate) fn rollback(&mut self) -> Result<()> {
        let result = self.rollback_once();
        self.noted(result)
    }

    fn rollback_once(&mut self) -> Result<()> {
        let (c, p) = (self.client(), &self.prepared);
        self.runtime()
            .block_on(c.execute(&p.rollback, &[]))
            .map_err(|e| write_failed("rolling back a batch in PostgreSQL", e))?;
        Ok(())
    }

    /// `n` more fresh fencing tokens, ascending, inside the open transaction.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] for a negative token.
    pub(crate) fn next_tokens(&mut self, n: usize) -> Result<Vec<u64>> {
        let result = self.next_tokens_once(n);
        self.noted(result)
    }

    fn next_tokens_once(&mut self, n: usize) -> Result<Vec<u64>> {
        let count = token_count(n)?;
        let (c, p) = (self.client(), &self.prepared);
        let params: [Param<'_>; 1] = [&count];
        let rows = self
            .runtime()
            .block_on(c.query(&p.tokens, &params))
            .map_err(|e| write_failed("drawing fencing tokens from PostgreSQL", e))?;
        drawn_tokens(rows.iter().map(|row| row.get(0)), n)
    }

    /// Deletes up to `limit` rows dead at `now`, oldest first, inside the open transaction,
    /// and returns their keys (as [`Statements::reap`]).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub(crate) fn reap(&mut self, now: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        let result = self.reap_once(now, limit);
        self.noted(result)
    }

    fn reap_once(&mut self, now: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A stored `i64::MAX` is any death time from there on (clamped): never due, even at
        // the last representable instant.
        let now = super::sql::to_bigint(now).min(i64::MAX - 1);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (c, p) = (self.client(), &self.prepared);
        let params: [Param<'_>; 2] = [&now, &limit];
        let rows = self
            .runtime()
            .block_on(c.query(&p.reap, &params))
            .map_err(|e| write_failed("reaping dead records in PostgreSQL", e))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// The writers' connections in an r2d2 pool of their own: each writer checks one out and keeps
/// it from batch to batch; a connection that failed is discarded when it goes back.
pub(crate) struct WireManager {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) statements: Statements,
}

/// How long a writer's batch waits for a key's lock before it fails (with a known outcome:
/// nothing of it is written). Batches of other replicas hold a key's lock for one batch; a
/// caller's transaction that ran `complete_in` holds it until the caller commits.
pub(crate) const KEY_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of writers' connections.
pub(crate) type WirePool = r2d2::Pool<WireManager>;

impl r2d2::ManageConnection for WireManager {
    type Connection = Wire;
    type Error = ConnectFailed;

    fn connect(&self) -> std::result::Result<Wire, ConnectFailed> {
        Wire::connect(&self.config, &self.statements).map_err(ConnectFailed)
    }

    fn is_valid(&self, wire: &mut Wire) -> std::result::Result<(), ConnectFailed> {
        wire.check().map_err(ConnectFailed)
    }

    fn has_broken(&self, wire: &mut Wire) -> bool {
        wire.is_broken()
    }
}

impl Drop for Wire {
    /// Closes the connection: the client's end makes the driver tell the server and finish,
    /// waited for at most [`CLOSE_TIMEOUT`], where this thread may block
    /// ([`crate::may_block::place`]: in `block_in_place` on a multi-threaded runtime).
    /// Where it may not (a current-thread runtime, whose own thread tokio cannot tell from
    /// its blocking pool's), the runtime is shut down without waiting, and the server sees
    /// the connection end when its socket closes.
    fn drop(&mut self) {
        drop(self.client.take());
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let driver = &mut self.driver;
        let close = || {
            let _ = runtime.block_on(async { tokio::time::timeout(CLOSE_TIMEOUT, driver).await });
        };
        match crate::may_block::place() {
            crate::may_block::Where::Here => close(),
            crate::may_block::Where::InPlace => tokio::task::block_in_place(close),
            crate::may_block::Where::Elsewhere => runtime.shutdown_background(),
        }
    }
}

impl Prepared {
    async fn new(c: &Client, sql: &Statements) -> std::result::Result<Prepared, postgres::Error> {
        use Type as T;
        Ok(Prepared {
            begin: c.prepare("BEGIN").await?,
            commit: c.prepare("COMMIT").await?,
            rollback: c.prepare("ROLLBACK").await?,
            lock: c.prepare_typed(&sql.lock, &[T::INT8_ARRAY]).await?,
            lock_one: c.prepare_typed(&sql.lock_one, &[T::INT8]).await?,
            load: c.prepare_typed(&sql.load, &[T::BYTEA_ARRAY]).await?,
            load_one: c.prepare_typed(&sql.load_one, &[T::BYTEA, T::BOOL]).await?,
            tokens: c.prepare_typed(&sql.tokens, &[T::INT4]).await?,
            clock_and_tokens: c.prepare_typed(&sql.clock_and_tokens, &[T::INT4]).await?,
            upsert: c
                .prepare_typed(
                    &sql.upsert,
                    &[T::BYTEA_ARRAY, T::INT8_ARRAY, T::INT8_ARRAY, T::BYTEA_ARRAY],
                )
                .await?,
            upsert_one: c
                .prepare_typed(&sql.upsert_one, &[T::BYTEA, T::INT8, T::INT8, T::BYTEA])
                .await?,
            delete: c.prepare_typed(&sql.delete, &[T::BYTEA_ARRAY]).await?,
            reap: c.prepare_typed(&sql.reap, &[T::INT8, T::INT8]).await?,
        })
    }
}

/// A failure of a batch's first round trip (`BEGIN`, the locks, the reads, the tokens):
/// nothing of the batch was written, whatever the error says (a token drawn from the
/// sequence is only skipped).
fn start_failed(e: postgres::Error) -> Error {
    super::error::read_failed("starting a batch in PostgreSQL", e)
}

/// A failure to open a writer's connection: nothing was written, whatever the error says.
fn connect_failed(context: &str, e: postgres::Error) -> Error {
    super::error::read_failed(context, e)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::postgres::pool::parse_conninfo;
    use crate::postgres::testdb::{TestDb, row};

    /// A test schema with idemstore's objects, its statements and a writer's connection
    /// named `name` in `pg_stat_activity`.
    fn opened(name: &str) -> Option<(TestDb, Statements, Wire)> {
        let (db, sql) = TestDb::with_schema()?;
        let wire = db.wire(&sql, name);
        Some((db, sql, wire))
    }

    fn start(wire: &mut Wire, sql: &Statements, keys: &[&[u8]], claims: usize) -> BatchStart {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        wire.start(&keys, &sql.lock_order(&keys), claims).unwrap()
    }

    #[test]
    fn a_batch_of_one_key_locks_loads_claims_writes_and_commits() {
        let Some((db, sql, mut wire)) = opened("wire_one") else {
            return;
        };
        let key: &[u8] = b"\0scope\0k'1\\";
        let first = start(&mut wire, &sql, &[key], 1);
        assert!(first.rows.is_empty());
        assert_eq!(first.tokens.len(), 1);
        assert!(*first.server_now.as_ref().unwrap() > 1_600_000_000_000_000_000);
        assert!(
            !db.lock_is_free(&sql, key),
            "the batch holds the key's lock"
        );
        let record: Vec<u8> = (0..=255u8).collect();
        wire.finish(&[row(key, first.tokens[0], 100, &record)], &[])
            .unwrap();
        assert!(db.lock_is_free(&sql, key), "committed: the lock is gone");
        let rows = db.committed(&sql, &[key]);
        assert_eq!(rows[key].token, first.tokens[0]);
        assert_eq!(rows[key].record, record);

        // Without a claim no token is drawn; the row is loaded.
        let second = start(&mut wire, &sql, &[key, key], 0);
        assert!(second.tokens.is_empty());
        assert_eq!(second.rows[key].dies_at, 100);
        assert_eq!(second.rows[key].record, record);
        wire.finish(&[], &[key]).unwrap();
        assert!(db.committed(&sql, &[key]).is_empty(), "deleted");
        // A claim after that gets a larger token.
        let third = start(&mut wire, &sql, &[key], 1);
        assert!(third.tokens[0] > first.tokens[0]);
        wire.rollback().unwrap();
        assert!(db.lock_is_free(&sql, key), "rolled back: the lock is gone");
    }

    #[test]
    fn a_batch_of_many_keys_writes_each_keys_last_row_and_deletes() {
        let Some((db, sql, mut wire)) = opened("wire_many") else {
            return;
        };
        let keys: [&[u8]; 3] = [b"k-a", b"k-b", b"k-c"];
        let start1 = start(&mut wire, &sql, &keys, 2);
        assert_eq!(start1.tokens.len(), 2);
        assert!(start1.tokens[0] < start1.tokens[1]);
        for key in keys {
            assert!(!db.lock_is_free(&sql, key));
        }
        wire.finish(
            &[
                row(keys[0], start1.tokens[0], 10, b"a1"),
                row(keys[1], start1.tokens[1], u64::MAX, b"b"),
                row(keys[2], start1.tokens[1], 30, b"c"),
                // A key written twice: its last row counts.
                row(keys[0], start1.tokens[1], 20, b"a2"),
            ],
            &[],
        )
        .unwrap();
        let rows = db.committed(&sql, &keys);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[keys[0]].record, b"a2");
        assert_eq!(rows[keys[0]].dies_at, 20);
        // A death time past year 2262 is kept as bigint's largest.
        assert_eq!(rows[keys[1]].dies_at, i64::MAX as u64);

        let start2 = start(&mut wire, &sql, &keys, 0);
        assert_eq!(start2.rows.len(), 3);
        assert!(start2.tokens.is_empty());
        wire.finish(&[row(keys[1], 9, 90, b"b2")], &[keys[0], keys[2]])
            .unwrap();
        let rows = db.committed(&sql, &keys);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[keys[1]].record, b"b2");

        // A batch without keys (the reaper's) draws tokens and reads the clock only.
        let start3 = start(&mut wire, &sql, &[], 1);
        assert!(start3.rows.is_empty());
        assert_eq!(start3.tokens.len(), 1);
        assert_eq!(wire.next_tokens(2).unwrap().len(), 2);
        assert_eq!(wire.reap(100, 10).unwrap(), vec![keys[1].to_vec()]);
        wire.finish(&[], &[]).unwrap();
        assert!(db.committed(&sql, &keys).is_empty(), "reaped");
    }

    #[test]
    fn a_refused_batch_marks_the_connection_broken_and_rolls_back() {
        let Some((db, sql, mut wire)) = opened("wire_failed") else {
            return;
        };
        let key: &[u8] = b"k";
        start(&mut wire, &sql, &[key], 1);
        assert!(!wire.is_broken());
        // A token that does not fit a bigint is refused before anything is sent.
        let e = wire
            .finish(&[row(key, u64::MAX, 1, b"r")], &[])
            .unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
        // The pool discards a marked connection when it goes back (see
        // `the_pool_discards_a_connection_whose_call_failed`), also after a rollback that
        // worked: the mark stays.
        assert!(wire.is_broken(), "a failed call marks the connection");
        wire.rollback().unwrap();
        assert!(wire.is_broken(), "the mark outlives the rollback");
        assert!(db.committed(&sql, &[key]).is_empty());
        // Nothing was sent, so the session itself is sound: a batch on it still commits (the
        // pool would not hand it out again; this checks the refusal left no half-sent batch).
        let started = start(&mut wire, &sql, &[key], 1);
        wire.finish(&[row(key, started.tokens[0], 1, b"r")], &[])
            .unwrap();
        assert_eq!(db.committed(&sql, &[key])[key].record, b"r");
    }

    #[test]
    fn a_connection_the_server_ended_fails_the_next_call() {
        let Some((mut db, sql, mut wire)) = opened("wire_ended") else {
            return;
        };
        assert!(!wire.is_closed());
        let ended: i64 = db
            .admin()
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'wire_ended'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(ended, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let keys = vec![b"k".to_vec()];
        loop {
            match wire.start(&keys, &sql.lock_order(&keys), 1) {
                Err(e) => {
                    assert!(matches!(e, Error::Storage { .. }), "{e:?}");
                    return;
                }
                Ok(_) => {
                    // The server had not ended the session yet.
                    wire.rollback().unwrap();
                    assert!(Instant::now() < deadline, "the session was not ended");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    #[test]
    fn a_connection_dropped_by_async_code_closes_without_blocking() {
        let Some((mut db, _sql, wire)) = opened("wire_async_drop") else {
            return;
        };
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Blocking inside a task panics; the drop must not block.
        outer.block_on(async move { drop(wire) });
        db.wait_until_gone(
            "application_name = 'wire_async_drop'",
            &[],
            "the dropped connection's session",
        );
    }

    #[test]
    fn the_pool_discards_a_connection_whose_call_failed() {
        let Some((db, sql, _)) = opened("wire_pool") else {
            return;
        };
        let manager = WireManager {
            config: parse_conninfo(db.conninfo()).unwrap(),
            statements: sql.clone(),
        };
        let pool = crate::postgres::pool::build(manager, 1, &db.workers).unwrap();
        let mut wire = pool.get().unwrap();
        start(&mut wire, &sql, &[b"k"], 1);
        // Refused before anything is sent, but the transaction is left open: the session's
        // state is not one to hand out again.
        assert!(wire.finish(&[row(b"k", u64::MAX, 1, b"r")], &[]).is_err());
        assert!(wire.is_broken());
        drop(wire);
        let mut fresh = pool.get().unwrap();
        assert!(!fresh.is_broken(), "a new connection, not the failed one");
        let started = start(&mut fresh, &sql, &[b"k"], 1);
        fresh
            .finish(&[row(b"k", started.tokens[0], 1, b"r")], &[])
            .unwrap();
        assert_eq!(db.committed(&sql, &[b"k"])[b"k".as_slice()].record, b"r");
    }
}
