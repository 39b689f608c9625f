//! The statements of a write batch, each one round trip (typed parameters, no separate
//! prepare), run by the committer inside one transaction on one pooled connection:
//!
//! 1. [`Statements::lock_keys`]: transaction advisory locks on the batch's keys, in
//!    ascending order of their lock keys, so that batches on different replicas that share
//!    keys wait for one another instead of deadlocking;
//! 2. [`Statements::load`]: the keys' rows, read after the locks (a separate statement, so
//!    its snapshot shows what the previous holder of each lock committed);
//! 3. [`Statements::server_now`] and [`Statements::next_tokens`], also after the locks;
//! 4. [`Statements::upsert`] and [`Statements::delete`]: the batch's writes;
//! 5. `COMMIT`.
//!
//! The reaper runs [`Statements::reap`] in transactions of its own. Times and tokens are
//! `u64` on idemstore's side and `bigint` in the database: a token is at most `i64::MAX`
//! (the sequence is a bigint), a time from the clock is below it (year 2262), and a death
//! time beyond it (a record that never dies in practice) is stored as `i64::MAX`.

use std::collections::HashMap;

use postgres::Transaction;
use postgres::types::Type;

use super::error::write_failed;
use super::schema::{Names, lock_key};
use crate::error::{Error, Result};

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

/// The statement texts for one schema, built once when the store opens.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    schema: String,
    lock: String,
    load: String,
    tokens: String,
    upsert: String,
    delete: String,
    now: String,
    reap: String,
}

impl Statements {
    /// The statements over the objects of `names`.
    pub(crate) fn new(names: &Names) -> Statements {
        let Names {
            records, tokens, ..
        } = names;
        // The sequence's name as a string literal for `nextval` (single quotes doubled).
        let sequence = format!("'{}'", tokens.replace('\'', "''"));
        Statements {
            schema: names.schema.clone(),
            // The array arrives sorted and without duplicates; a function scan of `unnest`
            // yields its elements in order, so the locks are taken in that order.
            lock: "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS u(k)".to_owned(),
            load: format!(
                "SELECT key, token, dies_at, record FROM {records} WHERE key = ANY($1::bytea[])"
            ),
            tokens: format!("SELECT nextval({sequence}) FROM generate_series(1, $1::int4)"),
            upsert: format!(
                "INSERT INTO {records} (key, token, dies_at, record) \
                 SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[]) \
                 ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, \
                 dies_at = EXCLUDED.dies_at, record = EXCLUDED.record"
            ),
            delete: format!("DELETE FROM {records} WHERE key = ANY($1::bytea[])"),
            now: "SELECT (extract(epoch FROM clock_timestamp()) * 1000000000)::int8".to_owned(),
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
        tx: &mut Transaction<'_>,
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

    /// The stored rows of those of `keys` that have one, in one statement.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] for a negative token or death time.
    pub(crate) fn load<K: AsRef<[u8]>>(
        &self,
        tx: &mut Transaction<'_>,
        keys: &[K],
    ) -> Result<HashMap<Vec<u8>, Loaded>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        let rows = tx
            .query_typed(&self.load, &[(&keys, Type::BYTEA_ARRAY)])
            .map_err(|e| write_failed("reading records from PostgreSQL", e))?;
        rows.iter()
            .map(|row| {
                let key: Vec<u8> = row.get(0);
                let loaded = Loaded {
                    token: from_bigint(row.get(1), "token")?,
                    dies_at: from_bigint(row.get(2), "dies_at")?,
                    record: row.get(3),
                };
                Ok((key, loaded))
            })
            .collect()
    }

    /// `n` fresh fencing tokens from the sequence, ascending, in one statement.
    ///
    /// Call it after [`Statements::lock_keys`]: tokens must rise for every key. A token taken
    /// before waiting for a key's lock could be smaller than the one the lock's holder writes
    /// and commits meanwhile, and the key would then go from the larger token back to the
    /// smaller one. Taken after the lock, every token already written to the key was drawn
    /// before that writer committed, so before ours.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] when the sequence hands out a negative value.
    pub(crate) fn next_tokens(&self, tx: &mut Transaction<'_>, n: usize) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let count = i32::try_from(n)
            .map_err(|_| Error::config(format!("{n} fencing tokens asked for in one batch")))?;
        let rows = tx
            .query_typed(&self.tokens, &[(&count, Type::INT4)])
            .map_err(|e| write_failed("drawing fencing tokens from PostgreSQL", e))?;
        let mut tokens = rows
            .iter()
            .map(|row| from_bigint(row.get(0), "fencing token"))
            .collect::<Result<Vec<u64>>>()?;
        tokens.sort_unstable();
        Ok(tokens)
    }

    /// Writes `rows` (inserting or replacing each key's row) in one statement. A key may
    /// appear more than once: its last row is written.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Corrupt`] for a token above `i64::MAX` (never drawn from
    /// the sequence).
    pub(crate) fn upsert(&self, tx: &mut Transaction<'_>, rows: &[Upsert<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // One row per key: `ON CONFLICT DO UPDATE` refuses to touch a row twice.
        let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            last.insert(row.key, i);
        }
        let mut keys = Vec::with_capacity(last.len());
        let mut tokens = Vec::with_capacity(last.len());
        let mut deaths = Vec::with_capacity(last.len());
        let mut records = Vec::with_capacity(last.len());
        for (i, row) in rows.iter().enumerate() {
            if last.get(row.key) != Some(&i) {
                continue;
            }
            keys.push(row.key);
            tokens.push(i64::try_from(row.token).map_err(|_| {
                Error::corrupt(format!(
                    "fencing token {} does not fit PostgreSQL's bigint",
                    row.token
                ))
            })?);
            deaths.push(to_bigint(row.dies_at));
            records.push(row.record);
        }
        tx.query_typed(
            &self.upsert,
            &[
                (&keys, Type::BYTEA_ARRAY),
                (&tokens, Type::INT8_ARRAY),
                (&deaths, Type::INT8_ARRAY),
                (&records, Type::BYTEA_ARRAY),
            ],
        )
        .map_err(|e| write_failed("writing records to PostgreSQL", e))?;
        Ok(())
    }

    /// Deletes the rows of `keys` in one statement; returns how many there were.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub(crate) fn delete<K: AsRef<[u8]>>(
        &self,
        tx: &mut Transaction<'_>,
        keys: &[K],
    ) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        tx.execute_typed(&self.delete, &[(&keys, Type::BYTEA_ARRAY)])
            .map_err(|e| write_failed("deleting records from PostgreSQL", e))
    }

    /// The database server's clock, in nanoseconds since 1970 (microsecond precision):
    /// `clock_timestamp()`, the time of this call, not the transaction's start (`now()`),
    /// which may lie before the waits for the locks.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]; [`Error::Clock`] for a server time before 1970.
    pub(crate) fn server_now(&self, tx: &mut Transaction<'_>) -> Result<u64> {
        let row = tx
            .query_typed_one(&self.now, &[])
            .map_err(|e| write_failed("reading the PostgreSQL server's clock", e))?;
        let nanos: i64 = row.get(0);
        u64::try_from(nanos).map_err(|_| Error::Clock {
            reason: format!("the PostgreSQL server's clock reads {nanos} ns, before 1970"),
        })
    }

    /// Deletes up to `limit` rows whose death time is at or before `now`, oldest first, and
    /// returns their keys. Safe on every replica at once: rows locked by another reaper or a
    /// batch are skipped, and a row no longer dead when it is locked is kept.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub(crate) fn reap(
        &self,
        tx: &mut Transaction<'_>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = tx
            .query_typed(
                &self.reap,
                &[(&to_bigint(now), Type::INT8), (&limit, Type::INT8)],
            )
            .map_err(|e| write_failed("reaping dead records in PostgreSQL", e))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// A time as a bigint: beyond `i64::MAX` (year 2262) stored as `i64::MAX`.
fn to_bigint(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

fn from_bigint(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| Error::corrupt(format!("a stored {what} is negative ({value})")))
}
