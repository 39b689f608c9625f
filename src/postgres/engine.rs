//! The PostgreSQL engine behind the committer: a batch of operations is one transaction on
//! one connection (lock the batch's keys, load their rows, draw tokens, apply the state
//! machine, write, commit), and a read is one statement on a connection the readers keep.
//!
//! A row's `record` column holds the same checksummed entry as a redb log entry (the key,
//! the record, a CRC-32), verified on every read, so a damaged byte is [`Error::Corrupt`],
//! never replayed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postgres::Transaction;

use super::error::pool_failed;
use super::error::read_failed;
use super::error::session_ended;
use super::error::write_failed;
use super::off_runtime::off_runtime;
use super::pipeline::{Wire, WireManager, WirePool};
use super::pool::{Kept, Pool, Workers, connection, open_pool, parse_conninfo};
use super::schema::{Names, create_or_check};
use super::sql::{BatchStart, Loaded, Statements, Upsert, clock_reading};
use crate::clock::Clock;
use crate::committer::{self, BatchWriter, Command, Reaped, Tables};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::machine;
use crate::outcome::Completed;
use crate::record::{Record, entry_len, split_entry, write_entry};
use crate::store::Visit;
use crate::timeline::{Corrections, Stamp, Step, representable, step};

/// How far behind the latest time a reading may be before it is reported as a corrected
/// clock ([`PgStore::time`]): readings reach the store out of order by up to a round trip,
/// or longer when a thread stalls between the reading and its use.
const REPORTED_BEHIND: u64 = 10_000_000_000;

/// A store's database: its connections, its statements and its time.
pub(crate) struct PgStore {
    /// Taken only by the drop ([`Conns::close`]).
    conns: Option<Conns>,
    statements: Statements,
    /// The clock given to the builder; `None`: the database server's clock.
    clock: Option<Arc<dyn Clock>>,
    /// The latest time this process used: the store's time never goes back (a server clock
    /// stepped back by NTP, say); [`PgStore::time`].
    floor: AtomicU64,
}

/// A store's connections and the threads that open them.
struct Conns {
    /// The connections of the reads (and of the walk and the schema check at open).
    pool: Pool,
    /// The writers' connections, one per writer.
    writers: WirePool,
    /// The connections reads keep between calls.
    readers: Kept,
    /// The pools' threads. The last field: dropped after the pools, it waits for the threads
    /// to end.
    _workers: Workers,
}

impl Conns {
    /// Closes the connections and waits for them and the pools' threads to end, off any
    /// async runtime ([`off_runtime`]).
    fn close(self) {
        if let Err((conns, e)) = off_runtime(self, drop) {
            // Dropped here they would panic: left open instead, until the process ends.
            tracing::warn!(
                error = %e,
                "idemstore: no thread to close the PostgreSQL connections on; they stay open"
            );
            std::mem::forget(conns);
        }
    }
}

impl Drop for PgStore {
    /// Closes the connections ([`Conns::close`]).
    fn drop(&mut self) {
        if let Some(conns) = self.conns.take() {
            conns.close();
        }
    }
}

impl PgStore {
    /// Connects a pool of `pool_size` to `conninfo` and creates or checks idemstore's tables
    /// in `schema`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad schema name, conninfo or pool size;
    /// [`Error::IncompatibleFormat`] for a foreign or newer schema (nothing is modified);
    /// [`Error::Storage`] when the server cannot be reached or refuses.
    ///
    /// Off any async runtime ([`off_runtime`]): a store may be opened by async code.
    pub fn open(
        conninfo: &str,
        schema: &str,
        pool_size: u32,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<PgStore> {
        off_runtime(clock, |clock| {
            PgStore::open_here(conninfo, schema, pool_size, clock)
        })
        .unwrap_or_else(|(_, e)| {
            Err(Error::storage(
                "starting a thread to connect to PostgreSQL on (the open was called on an \
                 async runtime's thread)",
                e,
            ))
        })
    }

    fn open_here(
        conninfo: &str,
        schema: &str,
        pool_size: u32,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<PgStore> {
        let names = Names::new(schema)?;
        if pool_size < 2 {
            // The writers keep their connections: reads need another.
            return Err(Error::config(format!(
                "the PostgreSQL pool size must be at least 2 (half the connections, at least \
                 one, carry the writes, the rest the reads), not {pool_size}; set \
                 `postgres_pool_size` to 2 or more"
            )));
        }
        let config = parse_conninfo(conninfo)?;
        // Half the connections (at least one) are the writers' own; the pool has the rest.
        let writers = (pool_size / 2).max(1);
        let workers = Workers::new();
        let pool = open_pool(&config, pool_size - writers, &workers)?;
        create_or_check(&mut *connection(&pool)?, &names)?;
        let statements = Statements::new(&names);
        let writers = super::pool::build(
            WireManager {
                config,
                statements: statements.clone(),
            },
            writers,
            &workers,
        )?;
        // The readers may keep every connection of their pool: a walk takes a kept one too.
        let readers = Kept::new(usize::try_from(pool.max_size()).unwrap_or(usize::MAX));
        Ok(PgStore {
            conns: Some(Conns {
                pool,
                writers,
                readers,
                _workers: workers,
            }),
            statements,
            clock,
            floor: AtomicU64::new(0),
        })
    }

    fn conns(&self) -> &Conns {
        self.conns
            .as_ref()
            .expect("the connections live until drop")
    }

    /// The store's time, read inside `tx` when it is the server's.
    ///
    /// # Errors
    /// [`Error::Clock`] for a reading the store cannot represent; [`Error::Storage`].
    pub fn now_in(&self, tx: &mut Transaction<'_>) -> Result<u64> {
        self.time(|| self.statements.server_now(tx))
    }

    /// The store's time: the builder's clock, or else the server's reading `server`. It
    /// never goes back: a reading behind the latest time this process used is held at that
    /// time, so a deadline seen passed stays passed and a dead record never comes back.
    ///
    /// Unlike the embedded engine, a PostgreSQL store keeps no clock epochs in its rows, so
    /// it cannot tell the records written under a clock that ran ahead from the others:
    /// after such a clock is corrected, the store's time stays at the latest reading until
    /// the clock catches up (leases and TTLs do not run meanwhile), and a warning event says
    /// so when a reading is more than [`REPORTED_BEHIND`] behind.
    ///
    /// # Errors
    /// As [`PgStore::now_in`].
    fn time(&self, server: impl FnOnce() -> Result<u64>) -> Result<u64> {
        let read = match &self.clock {
            Some(clock) => representable(clock.now())?,
            None => server()?,
        };
        let latest = self.floor.fetch_max(read, Ordering::AcqRel);
        if step(latest, read, REPORTED_BEHIND) == Step::Corrected {
            tracing::warn!(
                behind_ms = (latest - read) / 1_000_000,
                "the clock reads far behind the latest time the store saw (a clock that ran \
                 ahead was corrected?): the store keeps that time until the clock catches up, \
                 so that no dead record comes back; leases and TTLs do not run meanwhile"
            );
        }
        Ok(latest.max(read))
    }

    /// Runs `f` in a read-only transaction on a reader's connection, once (a failure is
    /// returned, not retried on another connection).
    fn read<T>(&self, f: impl FnOnce(&mut Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conns().readers.checkout(&self.conns().pool)?;
        let mut tx = conn
            .build_transaction()
            .read_only(true)
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .map_err(|e| read_failed("starting a PostgreSQL read", e))?;
        let value = f(&mut tx)?;
        tx.commit()
            .map_err(|e| read_failed("ending a PostgreSQL read", e))?;
        self.conns().readers.keep(conn);
        Ok(value)
    }

    /// The store's time now.
    ///
    /// # Errors
    /// As [`PgStore::now_in`].
    pub fn now(&self) -> Result<u64> {
        self.blocking(|| self.now_here())
    }

    fn now_here(&self) -> Result<u64> {
        self.time(|| {
            let nanos = self.conns().readers.read(
                &self.conns().pool,
                "reading the PostgreSQL server's clock",
                |client| self.statements.read_clock(client),
            )?;
            clock_reading(nanos)
        })
    }

    /// The record of `key` and the store's time, read together: one statement in one round
    /// trip, the time read after the record.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged row; [`Error::Storage`]; [`Error::Clock`].
    pub fn read_record(&self, key: &[u8]) -> Result<(Option<Record>, u64)> {
        self.blocking(|| self.read_record_here(key))
    }

    /// Runs a read where the client may block ([`off_runtime`]).
    fn blocking<T: Send>(&self, read: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        off_runtime((), |()| read()).unwrap_or_else(|(_, e)| {
            Err(Error::storage(
                "starting a thread to read from PostgreSQL on (the call was made on an async \
                 runtime's thread)",
                e,
            ))
        })
    }

    fn read_record_here(&self, key: &[u8]) -> Result<(Option<Record>, u64)> {
        let (bytes, nanos) = self.conns().readers.read(
            &self.conns().pool,
            "reading a record from PostgreSQL",
            |client| self.statements.read_one(client, key),
        )?;
        let now = self.time(|| clock_reading(nanos))?;
        let record = match bytes {
            Some(bytes) => Some(decode_row(key, &bytes)?),
            None => None,
        };
        Ok((record, now))
    }

    /// Visits every record in one snapshot, in the order their keys were last claimed;
    /// returns the last fencing token granted.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged row (the walk stops there); [`Error::Storage`], or
    /// `visit`'s own error.
    pub fn walk(&self, visit: &mut Visit<'_>) -> Result<u64> {
        self.read(|tx| {
            self.statements.walk(tx, &mut |key, bytes| {
                let record = decode_row(key, bytes)?;
                visit(key, record)
            })?;
            self.statements.last_token(tx)
        })
    }

    /// Completes the lease `token` of `key` inside the caller's transaction `tx`: locks the
    /// key, checks the lease, writes the completed record. Durable when `tx` commits.
    ///
    /// # Errors
    /// [`Error::LeaseLost`]; [`Error::Storage`] (the caller's transaction is then aborted);
    /// [`Error::Corrupt`]; [`Error::Clock`].
    pub fn complete_in(
        &self,
        tx: &mut Transaction<'_>,
        key: &[u8],
        token: u64,
        response: Vec<u8>,
        settings: &Settings,
    ) -> Result<Completed> {
        let keys = [key];
        self.statements.lock_keys(tx, &keys)?;
        // Locked for update: the row as last committed, not as an older snapshot of the
        // caller's (REPEATABLE READ, SERIALIZABLE) saw it before a takeover; one changed or
        // deleted since that snapshot fails the statement (a serialization failure).
        let loaded = self.statements.load_locked(tx, &keys)?;
        let now = self.now_in(tx)?;
        let current = match loaded.get(key) {
            Some(row) => Some(decode_row(key, &row.record)?),
            None => {
                refuse_a_snapshot_older_than_the_claim(tx)?;
                None
            }
        };
        let (record, done) =
            machine::complete(current.as_ref(), token, response, now, settings.ttl)?;
        let entry = encode_row(key, &record, now);
        self.statements.upsert(
            tx,
            &[Upsert {
                key,
                token: record.token,
                dies_at: record.dies_at(),
                record: &entry,
            }],
        )?;
        Ok(done)
    }
}

/// When `complete_in` finds no row for its lease: in a transaction that reads from one
/// snapshot (REPEATABLE READ, SERIALIZABLE) taken before the claim, the claim's row is not
/// there to see, and "the lease was lost" would be a guess. Such a transaction is refused
/// instead; under READ COMMITTED the row's absence is the truth.
fn refuse_a_snapshot_older_than_the_claim(tx: &mut Transaction<'_>) -> Result<()> {
    let level: String = tx
        .query_one("SHOW transaction_isolation", &[])
        .and_then(|row| row.try_get(0))
        .map_err(|e| write_failed("reading the transaction's isolation level", e))?;
    if level == "read committed" {
        return Ok(());
    }
    Err(Error::storage(
        "completing a lease in the caller's transaction",
        std::io::Error::other(format!(
            "the transaction runs at {level}, and its snapshot holds no record of the lease: \
             it may have been taken before the lease was granted; roll back, and take the \
             snapshot after `begin` returned (or complete at READ COMMITTED)"
        )),
    ))
}

/// A row's record column: the checksummed entry of `key` and `record`.
fn encode_row(key: &[u8], record: &Record, now: u64) -> Vec<u8> {
    // No room reserved: a row is rewritten whole, it has no page to split.
    let mut out = vec![0; entry_len(key, record, 0)];
    write_entry(key, record, Stamp { at: now, epoch: 0 }, 0, &mut out);
    out
}

/// Verifies and decodes a row's record column, which must be the entry of the row's key.
fn decode_row(key: &[u8], bytes: &[u8]) -> Result<Record> {
    let (stored_key, record) = split_entry(bytes)?;
    if stored_key != key {
        return Err(Error::corrupt(
            "a PostgreSQL row holds the record of another key (a damaged or altered row)",
        ));
    }
    crate::storage::decode_record(record, &Corrections::default())
}

/// Writes the committer's batches into PostgreSQL.
pub(crate) struct PgWriter {
    /// The writer's connection, checked out of the writers' pool and kept between batches;
    /// given back after a failure (the pool discards it), so the next batch gets another.
    /// Declared first, so dropped before `store`: the store's drop waits for its pools'
    /// threads, which wait for every connection to be given back.
    conn: RefCell<Option<r2d2::PooledConnection<WireManager>>>,
    store: Arc<PgStore>,
    settings: Settings,
}

impl PgWriter {
    /// A writer of `store`'s batches with `settings`; it checks its connection out of the
    /// writers' pool at its first batch.
    pub fn new(store: Arc<PgStore>, settings: Settings) -> PgWriter {
        PgWriter {
            store,
            settings,
            conn: RefCell::new(None),
        }
    }

    /// Runs `batch` as one transaction on `wire`, in two round trips (see
    /// [`Wire::start`] and [`Wire::finish`]).
    fn write_on(
        &self,
        wire: &mut Wire,
        batch: &mut [Command],
    ) -> std::result::Result<bool, Failed> {
        let keys: Vec<Vec<u8>> = batch
            .iter()
            .filter_map(|c| c.key().map(<[u8]>::to_vec))
            .collect();
        let written = self.write_in(wire, &keys, batch)?;
        if !matches!(written, Ok(true)) {
            // Nothing to keep (a clock the store cannot represent), or a failure before the
            // commit answered: rolled back. A connection that cannot roll back is broken,
            // and is dropped.
            let rolled_back = wire.rollback();
            written.as_ref().map_err(|e| Failed::Writing(e.clone()))?;
            rolled_back.map_err(Failed::Writing)?;
        }
        written.map_err(Failed::Writing)
    }

    /// Starts the batch's transaction (the locks first: the rows loaded, the tokens drawn
    /// and the time read after them reflect every batch that held one of these keys before),
    /// applies the batch, and writes and commits it: `Ok(Ok(false))` when nothing was to be
    /// committed, `Ok(Err(_))` for a failure after the start (the transaction is still open).
    fn write_in(
        &self,
        wire: &mut Wire,
        keys: &[Vec<u8>],
        batch: &mut [Command],
    ) -> std::result::Result<Result<bool>, Failed> {
        let claims = batch.iter().filter(|c| c.is_claim()).count();
        let ids = self.store.statements.lock_order(keys);
        // Only locks and reads so far: a failure here wrote nothing of the batch.
        let start = match wire.start(keys, &ids, claims) {
            Ok(start) => start,
            Err(e) => {
                let _ = wire.rollback();
                return Err(Failed::BeforeWriting(e));
            }
        };
        Ok(self.apply(wire, start, batch))
    }

    /// Applies the batch to the rows `start` loaded and writes and commits it; `false` when
    /// nothing was to be committed.
    fn apply(&self, wire: &mut Wire, start: BatchStart, batch: &mut [Command]) -> Result<bool> {
        let server_now = start.server_now;
        let now = match self.store.time(|| server_now) {
            Ok(now) => now,
            // A clock reading the store cannot represent: nothing is written, every
            // command of the batch gets the error.
            Err(e @ Error::Clock { .. }) => {
                for command in batch.iter_mut() {
                    command.answer_without_writing(&e);
                }
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let mut tables = PgTables {
            wire,
            loaded: start.rows,
            tokens: start.tokens.into_iter(),
            written: HashMap::new(),
            now,
        };
        for command in batch.iter_mut() {
            committer::apply(&mut tables, command, now, &self.settings)?;
        }
        tables.close()?;
        Ok(true)
    }
}

/// How a batch failed: before anything of it was written (its first round trip only locks
/// and reads), or after (the outcome may be unknown).
enum Failed {
    BeforeWriting(Error),
    Writing(Error),
}

/// Whether `e` says the connection is gone (closed, an I/O error, the server ending the
/// session), not that the server refused a statement.
fn connection_lost(e: &Error) -> bool {
    let cause = std::error::Error::source(e).and_then(|s| s.downcast_ref::<postgres::Error>());
    cause.is_none_or(|pg| {
        session_ended(pg)
            || pg
                .as_db_error()
                .is_none_or(|db| db.code().code().starts_with("08"))
    })
}

impl Failed {
    fn into_error(self) -> Error {
        match self {
            Failed::BeforeWriting(e) | Failed::Writing(e) => e,
        }
    }
}

impl BatchWriter for PgWriter {
    /// Half the store's connections carry batches, each the own connection of a writer (a
    /// caller that finds one free commits on it; a committer thread serves each otherwise);
    /// the other half is the readers' pool. So while one batch waits for
    /// its commit, the next is already sent: PostgreSQL flushes the commits of concurrent
    /// transactions together, and the keys' locks order batches that share a key.
    fn siblings(&self) -> Vec<PgWriter> {
        (1..self.store.conns().writers.max_size())
            .map(|_| PgWriter::new(Arc::clone(&self.store), self.settings))
            .collect()
    }

    /// Not on a thread that may drive a current-thread runtime: the connection's own
    /// runtime could not be driven there ([`crate::may_block`]).
    fn may_write_here() -> bool {
        crate::may_block::place() != crate::may_block::Where::Elsewhere
    }

    /// On a thread of a multi-threaded runtime, in `block_in_place`.
    fn write(&self, batch: &mut [Command]) -> Result<bool> {
        match crate::may_block::place() {
            crate::may_block::Where::InPlace => {
                tokio::task::block_in_place(|| self.write_here(batch))
            }
            _ => self.write_here(batch),
        }
    }
}

impl PgWriter {
    fn write_here(&self, batch: &mut [Command]) -> Result<bool> {
        let mut slot = self.conn.borrow_mut();
        // The connection kept since the last batch was not checked since then: the server
        // may have closed it meanwhile (a restart, an idle timeout). One the client already
        // knows is closed is dropped; when the batch's first round trip fails on it (that one
        // only locks and reads: nothing of the batch is written yet), the batch runs again on
        // a new connection.
        if let Some(mut wire) = slot.take().filter(|w| !w.is_broken()) {
            match self.write_on(&mut wire, batch) {
                // Only when the connection itself is gone: a server's answer (a lock that
                // timed out, a deadlock) would come again on another connection, after
                // another wait.
                Err(Failed::BeforeWriting(e)) if connection_lost(&e) => tracing::debug!(
                    error = %e,
                    "idemstore: the kept PostgreSQL connection failed; the batch runs on a new one"
                ),
                written => {
                    let written = written.map_err(Failed::into_error);
                    if written.is_ok() {
                        *slot = Some(wire);
                    }
                    return written;
                }
            }
        }
        let mut wire =
            self.store.conns().writers.get().map_err(|e| {
                pool_failed("getting a PostgreSQL writer connection from the pool", e)
            })?;
        let written = self.write_on(&mut wire, batch).map_err(Failed::into_error);
        if written.is_ok() {
            *slot = Some(wire);
        }
        written
    }
}

/// A batch's view of the rows of its keys: loaded once after the locks, changed in memory,
/// written back before the commit.
struct PgTables<'a> {
    wire: &'a mut Wire,
    /// The rows of the batch's keys as loaded (keys without a row are absent).
    loaded: HashMap<Vec<u8>, Loaded>,
    /// Tokens drawn for this batch (one per claim; more are drawn if ever needed).
    tokens: std::vec::IntoIter<u64>,
    /// Each key written by this batch so far: its row (encoded when put, so a response is
    /// copied once), or `None` when deleted.
    written: HashMap<Vec<u8>, Option<Loaded>>,
    /// The batch's time (every record it writes is stamped with it).
    now: u64,
}

impl PgTables<'_> {
    /// Writes the batch's changes (every record put in one statement, every deletion in
    /// another) and commits.
    fn close(self) -> Result<()> {
        let mut rows = Vec::new();
        let mut deleted = Vec::new();
        for (key, row) in &self.written {
            match row {
                Some(row) => rows.push(Upsert {
                    key,
                    token: row.token,
                    dies_at: row.dies_at,
                    record: &row.record,
                }),
                None => deleted.push(key.as_slice()),
            }
        }
        self.wire.finish(&rows, &deleted)
    }
}

impl Tables for PgTables<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Record>> {
        let row = match self.written.get(key) {
            Some(written) => written.as_ref(),
            None => self.loaded.get(key),
        };
        row.map(|row| decode_row(key, &row.record)).transpose()
    }

    fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        let row = Loaded {
            token: record.token,
            dies_at: record.dies_at(),
            record: encode_row(key, record, self.now),
        };
        self.written.insert(key.to_vec(), Some(row));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.written.insert(key.to_vec(), None);
        Ok(())
    }

    fn next_token(&mut self) -> Result<u64> {
        match self.tokens.next() {
            Some(token) => Ok(token),
            None => {
                let more = self.wire.next_tokens(1)?;
                more.first().copied().ok_or_else(|| {
                    Error::storage(
                        "drawing a fencing token from PostgreSQL",
                        std::io::Error::other("the sequence returned no value"),
                    )
                })
            }
        }
    }

    /// Deletes dead rows at once, in this batch's transaction. A key this batch also writes
    /// is written after the deletion (its new record stands).
    fn reap(&mut self, now: u64, limit: usize) -> Result<Reaped> {
        let deleted = self.wire.reap(now, limit)?;
        for key in &deleted {
            self.loaded.remove(key);
        }
        Ok(Reaped {
            deleted: deleted.len() as u64,
            more: deleted.len() == limit,
        })
    }
}
