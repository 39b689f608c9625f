//! The texts of idemstore's statements for one schema, and the single statements (typed
//! parameters, one round trip each) that serve `complete_in` and the tests. The committer's
//! batches run the same texts as prepared statements, pipelined in two round trips (see
//! `pipeline`):
//!
//! 1. `BEGIN`; transaction advisory locks on the batch's keys (`lock`, or `lock_one` for a
//!    single key), in ascending order of their lock keys, so that batches on different
//!    replicas that share keys wait for one another instead of deadlocking;
//! 2. the keys' rows (`load`, `load_one`), read after the locks (separate statements, so
//!    their snapshot shows what the previous holder of each lock committed), and the server's
//!    clock with fresh fencing tokens (`clock_and_tokens`), also after the locks;
//! 3. the batch's writes (`upsert`, `upsert_one`, and a deletion) and `COMMIT`.
//!
//! `complete_in` runs the same steps as single statements inside the caller's transaction:
//! [`Statements::lock_keys`], [`Statements::load`], [`Statements::server_now`],
//! [`Statements::upsert`]. The reaper runs `reap` inside a batch. Times and tokens are
//! `u64` on idemstore's side and `bigint` in the database: a token is at most `i64::MAX`
//! (the sequence is a bigint), a time from the clock is below it (year 2262), and a death
//! time beyond it (a record that never dies in practice) is stored as `i64::MAX`.

use std::collections::HashMap;

use std::ops::ControlFlow;

use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};

use super::error::{read_failed, write_failed};
use super::schema::{Names, lock_key};
use crate::error::{Error, Result};

/// A visitor of stored rows (key, record bytes) that says whether to go on.
pub(crate) type RowVisit<'v> = dyn FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>> + 'v;

/// One row to write: a key's record, its fencing token and its death time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Upsert<'a> {
    pub key: &'a [u8],
    pub token: u64,
    pub dies_at: u64,
    pub record: &'a [u8],
}

/// A key's row as loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub token: u64,
    pub dies_at: u64,
    pub record: Vec<u8>,
}

impl Loaded {
    /// A row's stored token, death time and record.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] for a negative token or death time.
    pub(crate) fn new(token: i64, dies_at: i64, record: Vec<u8>) -> Result<Loaded> {
        Ok(Loaded {
            token: from_bigint(token, "token")?,
            dies_at: from_bigint(dies_at, "dies_at")?,
            record,
        })
    }

    /// A row of `load`: the key, then as [`Loaded::new`].
    ///
    /// # Errors
    ///
    /// As [`Loaded::new`].
    pub(crate) fn keyed(row: &postgres::Row) -> Result<(Vec<u8>, Loaded)> {
        Ok((row.get(0), Loaded::new(row.get(1), row.get(2), row.get(3))?))
    }
}

/// The server's clock in nanoseconds since 1970: `clock_timestamp()`, the time of the
/// reading, not the transaction's start (`now()`), which may lie before the waits for locks.
const NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000000000)::int8";

/// What a batch's first round trip read after its locks.
#[derive(Debug)]
pub(crate) struct BatchStart {
    /// The rows of the batch's keys that have one.
    pub rows: HashMap<Vec<u8>, Loaded>,
    /// Fresh fencing tokens, ascending.
    pub tokens: Vec<u64>,
    /// The server's clock, read after the locks (`Err`: a reading before 1970).
    pub server_now: Result<u64>,
}

/// The statement texts for one schema, built once when the store opens.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    schema: String,
    /// Locks on the lock keys `$1` (`int8[]`, sorted), in their order.
    pub(crate) lock: String,
    /// A lock on the one lock key `$1` (`int8`).
    pub(crate) lock_one: String,
    /// The rows (key, token, death time, record) of the keys `$1` (`bytea[]`) that have one.
    pub(crate) load: String,
    /// As `load`, the rows locked `FOR UPDATE`: in a caller's transaction at REPEATABLE READ
    /// or SERIALIZABLE, whose snapshot may predate a takeover, a row changed or deleted
    /// since the snapshot fails the statement (a serialization failure) instead of being
    /// read as it was.
    load_locked: String,
    /// One row: the server's clock, a fresh fencing token when `$2` (`bool`) is true (else
    /// NULL), and the token, death time and record of the key `$1` (`bytea`), NULL when it
    /// has no row.
    pub(crate) load_one: String,
    /// `$1` (`int4`) fresh fencing tokens, one per row.
    pub(crate) tokens: String,
    /// One row: the server's clock and `$1` (`int4`) fresh fencing tokens as an `int8[]`.
    pub(crate) clock_and_tokens: String,
    /// Inserts or replaces the rows of the arrays `$1` (keys), `$2` (tokens), `$3` (death
    /// times), `$4` (records); a key appears once.
    pub(crate) upsert: String,
    /// Inserts or replaces the row `$1` (key), `$2` (token), `$3` (death time), `$4` (record).
    pub(crate) upsert_one: String,
    /// Deletes the rows of the keys `$1` (`bytea[]`).
    pub(crate) delete: String,
    now: String,
    /// Deletes up to `$2` rows dead at `$1`, oldest first; returns their keys.
    pub(crate) reap: String,
    read_one: String,
    walk: String,
    last_token: String,
}

impl Statements {
    /// The statements over the objects of `names`.
    pub(crate) fn new(names: &Names) -> Statements {
        let Names {
            records, tokens, ..
        } = names;
        // The sequence's name as an escape-string literal for `nextval` (backslashes and
        // single quotes doubled; read the same whatever `standard_conforming_strings` says).
        let sequence = format!("E'{}'", tokens.replace('\\', "\\\\").replace('\'', "''"));
        const ON_CONFLICT: &str = "ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, \
             dies_at = EXCLUDED.dies_at, record = EXCLUDED.record";
        Statements {
            schema: names.schema.clone(),
            // The array arrives sorted and without duplicates; a function scan of `unnest`
            // yields its elements in order, so the locks are taken in that order.
            lock: "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS u(k)".to_owned(),
            lock_one: "SELECT pg_advisory_xact_lock($1::int8)".to_owned(),
            load: format!(
                "SELECT key, token, dies_at, record FROM {records} WHERE key = ANY($1::bytea[])"
            ),
            load_locked: format!(
                "SELECT key, token, dies_at, record FROM {records} WHERE key = ANY($1::bytea[]) \
                 FOR UPDATE"
            ),
            // `nextval` only runs when the CASE reaches it: a token is drawn only for a claim.
            load_one: format!(
                "SELECT {NOW}, CASE WHEN $2::bool THEN nextval({sequence}) END, \
                 r.token, r.dies_at, r.record \
                 FROM (SELECT $1::bytea AS key) AS one LEFT JOIN {records} AS r ON r.key = one.key"
            ),
            tokens: format!("SELECT nextval({sequence}) FROM generate_series(1, $1::int4)"),
            clock_and_tokens: format!(
                "SELECT {NOW}, ARRAY(SELECT nextval({sequence}) FROM generate_series(1, $1::int4))"
            ),
            upsert: format!(
                "INSERT INTO {records} (key, token, dies_at, record) \
                 SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[]) \
                 {ON_CONFLICT}"
            ),
            upsert_one: format!(
                "INSERT INTO {records} (key, token, dies_at, record) \
                 VALUES ($1::bytea, $2::int8, $3::int8, $4::bytea) {ON_CONFLICT}"
            ),
            delete: format!("DELETE FROM {records} WHERE key = ANY($1::bytea[])"),
            now: format!("SELECT {NOW}"),
            // One statement, one snapshot: the subquery sees the snapshot taken when the
            // statement starts, and `clock_timestamp()` is read as the row is produced, so the
            // time is never earlier than the record read.
            read_one: format!("SELECT {NOW}, (SELECT record FROM {records} WHERE key = $1)"),
            // Tokens rise with every claim: the order in which the keys were (last) claimed.
            walk: format!("SELECT key, record FROM {records} ORDER BY token"),
            // `is_called` is false until the first token was drawn (then none was granted).
            last_token: format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {tokens}"
            ),
            // Oldest first through the dies_at index; rows a batch or another reaper holds are
            // skipped, not waited for. Under read committed a row updated meanwhile is
            // re-checked against `dies_at <= $1` before it is locked, and the DELETE checks it
            // again, so a record revived by a batch that committed first is never deleted.
            reap: format!(
                "WITH doomed AS (
                     SELECT key FROM {records} WHERE dies_at <= $1
                     ORDER BY dies_at LIMIT $2 FOR UPDATE SKIP LOCKED
                 )
                 DELETE FROM {records} AS r USING doomed
                 WHERE r.key = doomed.key AND r.dies_at <= $1
                 RETURNING r.key"
            ),
        }
    }

    /// The advisory lock keys of `keys`, sorted and without duplicates: the order in which
    /// [`Statements::lock_keys`] takes them.
    pub(crate) fn lock_order<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<i64> {
        let mut ids: Vec<i64> = keys
            .iter()
            .map(|key| lock_key(&self.schema, key.as_ref()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Takes a transaction advisory lock on each key (a 64-bit hash of it; two keys that
    /// share a hash only wait for each other), in ascending order, in one statement. The
    /// locks are held until `tx` ends.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; a deadlock with a session that takes locks in another order is
    /// reported by the server after its `deadlock_timeout` (retryable).
    pub(crate) fn lock_keys<K: AsRef<[u8]>>(
        &self,
        tx: &mut impl GenericClient,
        keys: &[K],
    ) -> Result<()> {
        let ids = self.lock_order(keys);
        if ids.is_empty() {
            return Ok(());
        }
        tx.query_typed(&self.lock, &[(&ids, Type::INT8_ARRAY)])
            .map_err(|e| write_failed("locking keys in PostgreSQL", e))?;
        Ok(())
    }

    /// The stored rows of those of `keys` that have one, in one statement, locked for
    /// update: their latest committed versions in any isolation level, or a serialization
    /// failure when the transaction's snapshot saw an older one (for `complete_in` in the
    /// caller's transaction).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] for a negative token or death time.
    pub(crate) fn load_locked<K: AsRef<[u8]>>(
        &self,
        tx: &mut impl GenericClient,
        keys: &[K],
    ) -> Result<HashMap<Vec<u8>, Loaded>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        let rows = tx
            .query_typed(&self.load_locked, &[(&keys, Type::BYTEA_ARRAY)])
            .map_err(|e| write_failed("reading records from PostgreSQL", e))?;
        rows.iter().map(Loaded::keyed).collect()
    }

    /// Writes `rows` (inserting or replacing each key's row) in one statement. A key may
    /// appear more than once: its last row is written.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] for a token above `i64::MAX` (never drawn from
    /// the sequence).
    pub(crate) fn upsert(&self, tx: &mut impl GenericClient, rows: &[Upsert<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let c = Columns::of(&last_rows(rows)?);
        tx.query_typed(
            &self.upsert,
            &[
                (&c.keys, Type::BYTEA_ARRAY),
                (&c.tokens, Type::INT8_ARRAY),
                (&c.deaths, Type::INT8_ARRAY),
                (&c.records, Type::BYTEA_ARRAY),
            ],
        )
        .map_err(|e| write_failed("writing records to PostgreSQL", e))?;
        Ok(())
    }

    /// The database server's clock, in nanoseconds since 1970 (microsecond precision):
    /// `clock_timestamp()`, the time of this call, not the transaction's start (`now()`),
    /// which may lie before the waits for the locks.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Clock`] for a server time before 1970.
    pub(crate) fn server_now(&self, tx: &mut impl GenericClient) -> Result<u64> {
        let row = tx
            .query_typed_one(&self.now, &[])
            .map_err(|e| write_failed("reading the PostgreSQL server's clock", e))?;
        clock_reading(row.get(0))
    }

    /// The record bytes of `key` (`None`: no row) and the server's clock, read by one
    /// statement in one round trip, outside any transaction.
    ///
    /// # Errors
    ///
    /// The client's error, for the caller to map (and retry: the statement writes nothing).
    pub(crate) fn read_one(
        &self,
        client: &mut impl GenericClient,
        key: &[u8],
    ) -> std::result::Result<(Option<Vec<u8>>, i64), postgres::Error> {
        let row = client.query_typed_one(&self.read_one, &[(&key, Type::BYTEA)])?;
        Ok((row.get(1), row.get(0)))
    }

    /// The server's clock, as [`Statements::read_one`] reads it (nanoseconds since 1970).
    ///
    /// # Errors
    ///
    /// The client's error, for the caller to map.
    pub(crate) fn read_clock(
        &self,
        client: &mut impl GenericClient,
    ) -> std::result::Result<i64, postgres::Error> {
        Ok(client.query_typed_one(&self.now, &[])?.get(0))
    }

    /// Visits every row (key, record bytes) in token order, streaming them; `visit` says
    /// whether to go on.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`], or `visit`'s own error.
    pub(crate) fn walk(&self, tx: &mut impl GenericClient, visit: &mut RowVisit<'_>) -> Result<()> {
        let params: [&(dyn ToSql + Sync); 0] = [];
        let mut rows = tx
            .query_raw(self.walk.as_str(), params)
            .map_err(|e| read_failed("reading the records from PostgreSQL", e))?;
        while let Some(row) = rows
            .next()
            .map_err(|e| read_failed("reading the records from PostgreSQL", e))?
        {
            let key: &[u8] = row.get(0);
            let record: &[u8] = row.get(1);
            if visit(key, record)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// The last fencing token drawn from the sequence (0 when none was).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub(crate) fn last_token(&self, tx: &mut impl GenericClient) -> Result<u64> {
        let row = tx
            .query_typed_one(&self.last_token, &[])
            .map_err(|e| read_failed("reading the fencing-token sequence", e))?;
        from_bigint(row.get(0), "fencing token")
    }
}

/// A row to write with its numbers as bigints: key, token, death time, record.
pub(crate) type BigintRow<'a> = (&'a [u8], i64, i64, &'a [u8]);

/// Rows to write as the four arrays of the `upsert` statement's parameters.
pub(crate) struct Columns<'a> {
    pub keys: Vec<&'a [u8]>,
    pub tokens: Vec<i64>,
    pub deaths: Vec<i64>,
    pub records: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    /// The columns of `rows`, in their order.
    pub(crate) fn of(rows: &[BigintRow<'a>]) -> Columns<'a> {
        Columns {
            keys: rows.iter().map(|r| r.0).collect(),
            tokens: rows.iter().map(|r| r.1).collect(),
            deaths: rows.iter().map(|r| r.2).collect(),
            records: rows.iter().map(|r| r.3).collect(),
        }
    }
}

/// The `int4` count of `n` fencing tokens to draw.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for more than `i32::MAX` (a batch is far smaller).
pub(crate) fn token_count(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| Error::config(format!("{n} fencing tokens asked for in one batch")))
}

/// The fencing tokens drawn for `wanted` claims, in ascending order.
///
/// # Errors
///
/// [`Error::Corrupt`] for a negative token, or for as many tokens as were not asked for.
pub(crate) fn drawn_tokens(
    drawn: impl IntoIterator<Item = i64>,
    wanted: usize,
) -> Result<Vec<u64>> {
    let mut tokens = drawn
        .into_iter()
        .map(|t| from_bigint(t, "fencing token"))
        .collect::<Result<Vec<u64>>>()?;
    tokens.sort_unstable();
    if tokens.len() == wanted {
        Ok(tokens)
    } else {
        Err(Error::corrupt(format!(
            "PostgreSQL handed out {} fencing tokens where {wanted} were asked for",
            tokens.len()
        )))
    }
}

/// Each key's last row of `rows` (`ON CONFLICT DO UPDATE` refuses to touch a row twice), as
/// key, token, death time and record, the numbers as bigints.
///
/// # Errors
///
/// [`Error::Corrupt`] for a token above `i64::MAX`.
pub(crate) fn last_rows<'a>(rows: &[Upsert<'a>]) -> Result<Vec<BigintRow<'a>>> {
    let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        last.insert(row.key, i);
    }
    let mut out = Vec::with_capacity(last.len());
    for (i, row) in rows.iter().enumerate() {
        if last.get(row.key) != Some(&i) {
            continue;
        }
        let token = i64::try_from(row.token).map_err(|_| {
            Error::corrupt(format!(
                "fencing token {} does not fit PostgreSQL's bigint",
                row.token
            ))
        })?;
        out.push((row.key, token, to_bigint(row.dies_at), row.record));
    }
    Ok(out)
}

/// The server clock's reading in nanoseconds since 1970.
pub(crate) fn clock_reading(nanos: i64) -> Result<u64> {
    u64::try_from(nanos).map_err(|_| Error::Clock {
        reason: format!("the PostgreSQL server's clock reads {nanos} ns, before 1970"),
    })
}

/// A time as a bigint: beyond `i64::MAX` (year 2262) stored as `i64::MAX`.
pub(crate) fn to_bigint(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// A stored bigint as a `u64`.
///
/// # Errors
///
/// [`Error::Corrupt`] for a negative value, named `what`.
pub(crate) fn from_bigint(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| Error::corrupt(format!("a stored {what} is negative ({value})")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use postgres::Transaction;
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::postgres::pipeline::Wire;
    use crate::postgres::schema::create_or_check;
    use crate::postgres::testdb::{TestDb, row};

    /// Reaps up to `limit` rows dead at `now` in a batch of its own on `wire`, as the
    /// reaper's batches do.
    fn reap(wire: &mut Wire, now: u64, limit: usize) -> Vec<Vec<u8>> {
        wire.start(&[], &[], 0).unwrap();
        let reaped = wire.reap(now, limit).unwrap();
        wire.finish(&[], &[]).unwrap();
        reaped
    }

    /// The 64-bit advisory locks this session holds (PostgreSQL shows a bigint lock key as
    /// its high half in `classid` and its low half in `objid`).
    fn held_locks(tx: &mut Transaction<'_>) -> Vec<i64> {
        tx.query(
            "SELECT ((classid::int8 << 32) | objid::int8) FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid() \
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    #[test]
    fn lock_load_upsert_delete_round_trip() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        let mut client = db.client();
        let keys: [&[u8]; 4] = [b"k-a", b"k-b", b"\0scope\0k-c", b"k-missing"];
        let mut tx = client.transaction().unwrap();
        // Duplicates are locked once; the order is ascending.
        let with_duplicate = [keys[2], keys[0], keys[1], keys[3], keys[0]];
        let order = sql.lock_order(&with_duplicate);
        assert_eq!(order.len(), 4);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        sql.lock_keys(&mut tx, &with_duplicate).unwrap();
        assert_eq!(held_locks(&mut tx), order);

        assert!(sql.load_locked(&mut tx, &keys).unwrap().is_empty());
        sql.upsert(
            &mut tx,
            &[
                row(keys[0], 1, 100, b"rec-a"),
                row(keys[1], 2, 200, b"rec-b"),
                row(keys[2], 3, u64::MAX, b""),
                // A key written twice in one call: its last row counts.
                row(keys[0], 4, 400, b"rec-a2"),
            ],
        )
        .unwrap();
        let loaded = sql.load_locked(&mut tx, &keys).unwrap();
        assert_eq!(loaded.len(), 3);
        let expect = |token, dies_at, record: &[u8]| Loaded {
            token,
            dies_at,
            record: record.to_vec(),
        };
        assert_eq!(loaded[keys[0]], expect(4, 400, b"rec-a2"));
        assert_eq!(loaded[keys[1]], expect(2, 200, b"rec-b"));
        // A death time past year 2262 is kept as bigint's largest.
        assert_eq!(loaded[keys[2]], expect(3, i64::MAX as u64, b""));

        sql.upsert(&mut tx, &[row(keys[1], 5, 500, b"rec-b2")])
            .unwrap();
        let doomed: Vec<&[u8]> = vec![keys[0], keys[2], keys[3]];
        assert_eq!(tx.execute(sql.delete.as_str(), &[&doomed]).unwrap(), 2);
        tx.commit().unwrap();

        // Another connection sees what was committed.
        let loaded = db.committed(&sql, &keys);
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[keys[1]], expect(5, 500, b"rec-b2"));
        // The locks ended with the transaction that took them: the session holds none.
        let mut tx = client.transaction().unwrap();
        assert!(held_locks(&mut tx).is_empty());
        // Empty calls send nothing and succeed.
        sql.lock_keys::<&[u8]>(&mut tx, &[]).unwrap();
        assert!(sql.load_locked::<&[u8]>(&mut tx, &[]).unwrap().is_empty());
        sql.upsert(&mut tx, &[]).unwrap();
    }

    #[test]
    fn a_locked_key_makes_another_session_wait() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        let mut client = db.client();
        let mut tx = client.transaction().unwrap();
        sql.lock_keys(&mut tx, &[b"shared"]).unwrap();
        assert!(
            !db.lock_is_free(&sql, b"shared"),
            "the lock is held by the batch"
        );
        tx.commit().unwrap();
        assert!(
            db.lock_is_free(&sql, b"shared"),
            "the lock ends with the batch"
        );
    }

    #[test]
    fn batches_locking_keys_in_opposite_orders_never_deadlock() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("key-{i}").into_bytes()).collect();
        let barrier = Barrier::new(2);
        std::thread::scope(|scope| {
            for reverse in [false, true] {
                let mut client = db.client();
                let (sql, barrier) = (&sql, &barrier);
                let mut keys = keys.clone();
                if reverse {
                    keys.reverse();
                }
                scope.spawn(move || {
                    barrier.wait();
                    for round in 0..30u64 {
                        let mut tx = client.transaction().unwrap();
                        sql.lock_keys(&mut tx, &keys).unwrap();
                        let rows: Vec<Upsert<'_>> =
                            keys.iter().map(|k| row(k, round + 1, 1, b"r")).collect();
                        sql.upsert(&mut tx, &rows).unwrap();
                        tx.commit().unwrap();
                    }
                });
            }
        });
    }

    #[test]
    fn tokens_rise_for_every_key_across_connections() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        let keys: Vec<Vec<u8>> = (0..4).map(|i| vec![b'k', i]).collect();
        let barrier = Arc::new(Barrier::new(2));
        let drawn: Vec<Vec<u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|worker: usize| {
                    let mut wire = db.wire(&sql, "sql_tokens");
                    let (sql, keys, barrier) = (&sql, &keys, Arc::clone(&barrier));
                    scope.spawn(move || {
                        barrier.wait();
                        let mut drawn = Vec::new();
                        for round in 0..100usize {
                            // Batches of one to four keys, overlapping the other worker's.
                            let start = (round + worker) % keys.len();
                            let batch: Vec<Vec<u8>> = (0..1 + round % keys.len())
                                .map(|i| keys[(start + i) % keys.len()].clone())
                                .collect();
                            // The committer's batch: locks, rows and tokens, then the writes.
                            let start = wire.start(&batch, &sql.lock_order(&batch), batch.len());
                            let BatchStart {
                                rows: loaded,
                                tokens,
                                ..
                            } = start.unwrap();
                            assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
                            let rows: Vec<Upsert<'_>> = batch
                                .iter()
                                .zip(&tokens)
                                .map(|(key, &token)| {
                                    if let Some(old) = loaded.get(key) {
                                        assert!(
                                            token > old.token,
                                            "token {token} after {} for {key:?}",
                                            old.token
                                        );
                                    }
                                    row(key, token, 1, b"r")
                                })
                                .collect();
                            wire.finish(&rows, &[]).unwrap();
                            drawn.extend(tokens);
                        }
                        drawn
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<u64> = drawn.concat();
        let unique: HashSet<u64> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "a token was handed out twice");
    }

    #[test]
    fn the_server_clock_is_read_in_nanoseconds() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        let mut client = db.client();
        let mut tx = client.transaction().unwrap();
        let first = sql.server_now(&mut tx).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // clock_timestamp(), not the transaction's start: it moves within one transaction.
        let second = sql.server_now(&mut tx).unwrap();
        assert!(second >= first + 10_000_000, "{first} then {second}");
        let local = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        // The same machine: the two clocks agree to well within a minute.
        assert!(
            local.abs_diff(second) < 60_000_000_000,
            "{local} vs {second}"
        );
    }

    /// Inserts `dead` rows dying at 1..=dead and `alive` rows dying after `now` = 1_000_000.
    fn fill(db: &TestDb, sql: &Statements, dead: u64, alive: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let dead_keys: Vec<Vec<u8>> = (1..=dead)
            .map(|i| format!("dead-{i}").into_bytes())
            .collect();
        let alive_keys: Vec<Vec<u8>> = (1..=alive)
            .map(|i| format!("alive-{i}").into_bytes())
            .collect();
        let mut rows: Vec<Upsert<'_>> = dead_keys
            .iter()
            .zip(1..)
            .map(|(k, dies_at)| row(k, dies_at, dies_at, b"r"))
            .collect();
        rows.extend(
            alive_keys
                .iter()
                .zip(1..)
                .map(|(k, i)| row(k, 10_000 + i, 1_000_001 + i, b"r")),
        );
        let mut client = db.client();
        let mut tx = client.transaction().unwrap();
        sql.upsert(&mut tx, &rows).unwrap();
        tx.commit().unwrap();
        (dead_keys, alive_keys)
    }

    #[test]
    fn reaping_is_bounded_oldest_first_and_safe_on_two_connections() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        const NOW: u64 = 1_000_000;
        let (dead, alive) = fill(&db, &sql, 300, 200);

        let first = reap(&mut db.wire(&sql, "sql_reap_first"), NOW, 50);
        let first: HashSet<Vec<u8>> = first.into_iter().collect();
        assert_eq!(first, dead[..50].iter().cloned().collect(), "the 50 oldest");

        let barrier = Barrier::new(2);
        let reaped: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let mut wire = db.wire(&sql, "sql_reap_two");
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        let mut mine = Vec::new();
                        loop {
                            let batch = reap(&mut wire, NOW, 17);
                            assert!(batch.len() <= 17);
                            if batch.is_empty() {
                                return mine;
                            }
                            mine.extend(batch);
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<Vec<u8>> = reaped.concat();
        let unique: HashSet<Vec<u8>> = all.iter().cloned().collect();
        assert_eq!(unique.len(), all.len(), "a row was reaped twice");
        assert_eq!(unique, dead[50..].iter().cloned().collect());

        let left = db.committed(&sql, &alive);
        assert_eq!(left.len(), alive.len(), "an alive row was reaped");
        assert!(db.committed(&sql, &dead).is_empty());
    }

    #[test]
    fn the_reaper_finds_the_dead_through_the_dies_at_index() {
        let Some((mut db, sql)) = TestDb::with_schema() else {
            return;
        };
        fill(&db, &sql, 10, 20_000);
        let records = db.names.records.clone();
        let admin = db.admin();
        admin.batch_execute(&format!("ANALYZE {records}")).unwrap();
        let plan: Vec<String> = admin
            .query(&format!("EXPLAIN {}", sql.reap), &[&1_000_000i64, &100i64])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("idemstore_records_dies_at"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    #[test]
    fn tokens_come_from_a_sequence_whose_name_needs_escaping() {
        let Some(mut db) = TestDb::new() else { return };
        let odd = Names::new(&format!("{} it's a \\ name", db.names.schema)).unwrap();
        let result = create_or_check(&mut db.client(), &odd).and_then(|()| {
            let mut wire = db.wire(&Statements::new(&odd), "sql_odd_name");
            let tokens = wire.start(&[], &[], 3).map(|start| start.tokens);
            wire.rollback()?;
            tokens
        });
        db.admin()
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                odd.quoted_schema
            ))
            .unwrap();
        assert_eq!(result.unwrap(), [1, 2, 3]);
    }

    #[test]
    fn a_record_revived_by_a_batch_is_not_reaped() {
        let Some((db, sql)) = TestDb::with_schema() else {
            return;
        };
        const NOW: u64 = 1_000_000;
        let (dead, _) = fill(&db, &sql, 3, 0);
        let (mut batch_client, mut reaper) = (db.client(), db.wire(&sql, "sql_revived"));

        // A batch takes over dead-1 (a new lease, alive again) and has not committed yet.
        let mut batch = batch_client.transaction().unwrap();
        sql.lock_keys(&mut batch, &dead[..1]).unwrap();
        sql.upsert(&mut batch, &[row(&dead[0], 99, NOW + 500, b"revived")])
            .unwrap();
        // The reaper skips the row the batch holds, and takes the others.
        let reaped: HashSet<Vec<u8>> = reap(&mut reaper, NOW, 10).into_iter().collect();
        assert_eq!(reaped, dead[1..].iter().cloned().collect());
        batch.commit().unwrap();
        // Committed, it is alive: not reaped.
        assert!(reap(&mut reaper, NOW, 10).is_empty());
        assert_eq!(db.committed(&sql, &dead[..1])[&dead[0]].record, b"revived");
    }
}
