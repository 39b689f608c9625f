//! The redb layer: the file's tables, opening and format checks, and the reads and writes of
//! records with their expiry index. Decisions are made by [`crate::machine`]; this module
//! only moves records in and out of redb.
//!
//! # Tables
//!
//! | table | key | value |
//! |---|---|---|
//! | `idemstore_meta` | `"magic"`, `"format_version"`, `"last_token"`, `"latest_time"` | `b"idemstore"`, `u32` BE, `u64` BE, `u64` BE nanoseconds (the latest time a write saw: the store's clock never goes below it) |
//! | `idemstore_records` | encoded [`Key`](crate::Key): scope length (1 byte), scope, id | a [`Record`] ([`crate::record`]) |
//! | `idemstore_expiry` | death time (`u64` BE nanoseconds) followed by the record key | `()` |
//!
//! The expiry index holds exactly one entry per record, keyed by the record's death time,
//! so the reaper walks dead records in time order and never scans live ones.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableError, WriteTransaction,
};

use crate::error::{Error, Result};
use crate::record::Record;
use crate::redb_file::{self, io_error, open_error, private_file_options};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idemstore_records");
pub(crate) const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("idemstore_expiry");

const MAGIC_KEY: &str = "magic";
const MAGIC: &[u8] = b"idemstore";
const VERSION_KEY: &str = "format_version";
pub(crate) const TOKEN_KEY: &str = "last_token";
const TIME_KEY: &str = "latest_time";
/// The file format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

fn engine<E: std::error::Error + Send + Sync + 'static>(
    context: &str,
) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::storage(context, e)
}

/// Runs a redb call that may panic on a damaged file; a panic becomes [`Error::Corrupt`].
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::corrupt(format!(
            "the storage engine failed while {what} (damaged file)"
        )))
    })
}

/// What the format check found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A store of ours.
    Ours,
    /// A redb file without any table: a new store (or one whose creation was interrupted).
    Empty,
}

/// Checks a meta table's marker and version.
fn check_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Found> {
    let read = |k: &str| -> Result<Option<Vec<u8>>> {
        Ok(meta
            .get(k)
            .map_err(|e| Error::storage("reading the meta table", e))?
            .map(|v| v.value().to_vec()))
    };
    if read(MAGIC_KEY)?.as_deref() != Some(MAGIC) {
        return Err(Error::IncompatibleFormat {
            reason: "the redb file was not written by idemstore (no idemstore marker)".into(),
        });
    }
    let version = read(VERSION_KEY)?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| Error::corrupt("the format version is missing from the meta table"))?;
    if version != FORMAT_VERSION {
        return Err(Error::IncompatibleFormat {
            reason: format!(
                "the file has format version {version}, this build of idemstore reads version \
                 {FORMAT_VERSION}{}",
                if version > FORMAT_VERSION {
                    " (upgrade idemstore)"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(Found::Ours)
}

/// Maps "no such table"/"wrong table type" to a foreign-file error.
fn table_error(e: TableError) -> Error {
    match e {
        TableError::TableDoesNotExist(_)
        | TableError::TableTypeMismatch { .. }
        | TableError::TableIsMultimap(_)
        | TableError::TypeDefinitionChanged { .. } => Error::IncompatibleFormat {
            reason: "the redb file was not written by idemstore (its tables differ)".into(),
        },
        other => Error::storage("opening a table", other),
    }
}

/// Checks a read-only snapshot: ours, empty, or an error.
fn check_read(db: &impl ReadableDatabase) -> Result<Found> {
    let txn = db.begin_read().map_err(engine("starting a read"))?;
    let tables = txn
        .list_tables()
        .map_err(|e| Error::storage("listing tables", e))?
        .count()
        + txn
            .list_multimap_tables()
            .map_err(|e| Error::storage("listing tables", e))?
            .count();
    if tables == 0 {
        return Ok(Found::Empty);
    }
    let meta = txn.open_table(META).map_err(table_error)?;
    check_meta(&meta)?;
    txn.open_table(RECORDS).map_err(table_error)?;
    txn.open_table(EXPIRY).map_err(table_error)?;
    Ok(Found::Ours)
}

/// Opens (or creates) the store file at `path`.
///
/// A file that exists and is not empty is first checked through a read-only open, which does
/// not modify it (a read-write open of redb rewrites the header). Only a redb file that needs
/// crash recovery cannot be checked that way: it is repaired by the read-write open first and
/// checked afterwards.
pub(crate) fn open_file(path: &Path, cache_bytes: usize) -> Result<Database> {
    let io_err = |what: &str, e: std::io::Error| io_error(path, what, e);
    let existing_len = match redb_file::existing_len(path)? {
        Some(len) => len,
        None => {
            create_in_place(path).map_err(|e| io_err("creating", e))?;
            redb_file::existing_len(path)?.unwrap_or(0)
        }
    };
    let mut repaired = false;
    if existing_len > 0 {
        redb_file::require_redb(path, "")?;
        let checked = guarded("checking the file", || {
            let ro = redb::Builder::new()
                .set_cache_size(1 << 20)
                .open_read_only(path);
            match ro {
                Ok(ro) => {
                    let found = check_read(&ro);
                    let _ = ro.close();
                    found.map(Some)
                }
                Err(DatabaseError::RepairAborted) => Ok(None),
                Err(e) => Err(open_error(path, e)),
            }
        })?;
        repaired = checked.is_none();
    }

    let file = private_file_options()
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("opening", e))?;
    let backend = redb::backends::FileBackend::new(file).map_err(|e| open_error(path, e))?;
    let db = guarded("opening the file", || {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            // An existing file is verified page by page (checksums) before it is trusted: on a
            // damaged file the engine can panic while unwinding from a panic, which aborts the
            // process past any guard. Verified, a damaged file is `Corrupt` instead.
            .set_check_integrity_on_open(existing_len > 0)
            .create_with_backend(backend)
            .map_err(|e| open_error(path, e))
    })?;
    if repaired {
        // Recovery had to modify the file before it could be checked.
        if let Err(e) = guarded("checking the recovered file", || check_read(&db)) {
            discard(db);
            return Err(e);
        }
    }
    Ok(db)
}

/// Creates a new, initialized store at `path` without ever exposing a half-written file
/// there: the store is built in a temporary file beside it, made durable, and then linked
/// to `path` (a link never replaces an existing file, so a concurrent creator wins cleanly).
/// A crash before the link leaves only the temporary file, named
/// `.<name>.idemstore-new-<pid>`; the path itself stays missing and the next open starts over.
fn create_in_place(path: &Path) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".idemstore-new-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover of a crashed process that had our pid is stale: nobody else uses this name.
    let _ = std::fs::remove_file(&tmp);
    let built = (|| {
        let file = private_file_options().create_new(true).open(&tmp)?;
        let backend = redb::backends::FileBackend::new(file).map_err(std::io::Error::other)?;
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create_with_backend(backend)
            .map_err(std::io::Error::other)?;
        let (db, _) = initialize(db).map_err(std::io::Error::other)?;
        db.close().map_err(std::io::Error::other)
    })();
    let linked = built.and_then(|()| match std::fs::hard_link(&tmp, path) {
        // Another process created the store first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = std::fs::remove_file(&tmp);
    linked?;
    // Make the new name durable.
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Opens (or creates) a database on a custom backend, guarding against engine panics.
pub(crate) fn open_backend(
    backend: impl redb::StorageBackend,
    cache_bytes: usize,
) -> Result<Database> {
    guarded("opening the backend", || {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(backend)
            .map_err(|e| open_error(Path::new("<backend>"), e))
    })
}

/// Creates an in-memory store database.
pub(crate) fn open_memory(cache_bytes: usize) -> Result<Database> {
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .map_err(|e| Error::storage("creating an in-memory database", e))
}

/// Writes the meta table and creates the tables of a new store, or checks an existing one.
/// Always commits durably. Returns the latest time a write of this store saw (0 when new).
///
/// Guarded: the engine can panic on a damaged page that the read-only check did not visit
/// (its commit reads the system tables); the caller then gets [`Error::Corrupt`].
pub(crate) fn initialize(db: Database) -> Result<(Database, u64)> {
    match guarded("initializing the store", || initialize_unguarded(&db)) {
        Ok(latest_time) => Ok((db, latest_time)),
        Err(e) => {
            discard(db);
            Err(e)
        }
    }
}

/// Drops a database after an error: dropping closes it, which can panic again when the
/// engine panicked before (its locks are poisoned). The error is already being returned.
fn discard(db: Database) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(db)));
}

fn initialize_unguarded(db: &Database) -> Result<u64> {
    let mut latest_time = 0;
    let txn = db.begin_write().map_err(engine("starting a write"))?;
    {
        let mut meta = txn.open_table(META).map_err(table_error)?;
        let fresh = meta
            .get(MAGIC_KEY)
            .map_err(|e| Error::storage("reading the meta table", e))?
            .is_none()
            && meta
                .len()
                .map_err(|e| Error::storage("reading the meta table", e))?
                == 0;
        if fresh {
            let put = |meta: &mut Table<&str, &[u8]>, k: &str, v: &[u8]| {
                meta.insert(k, v)
                    .map(|_| ())
                    .map_err(|e| Error::storage("writing the meta table", e))
            };
            put(&mut meta, MAGIC_KEY, MAGIC)?;
            put(&mut meta, VERSION_KEY, &FORMAT_VERSION.to_be_bytes())?;
            put(&mut meta, TOKEN_KEY, &0u64.to_be_bytes())?;
        } else {
            check_meta(&meta)?;
            latest_time = meta
                .get(TIME_KEY)
                .map_err(|e| Error::storage("reading the meta table", e))?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map_or(0, u64::from_be_bytes);
        }
        txn.open_table(RECORDS).map_err(table_error)?;
        txn.open_table(EXPIRY).map_err(table_error)?;
    }
    txn.commit()
        .map_err(|e| Error::storage("creating the store's tables", e))?;
    Ok(latest_time)
}

/// Reads one record in a read transaction.
///
/// Guarded: if the engine panics on a damaged page, the caller gets [`Error::Corrupt`].
pub(crate) fn read_record(db: &Database, key: &[u8]) -> Result<Option<Record>> {
    guarded("reading a record", || {
        let txn = db.begin_read().map_err(engine("starting a read"))?;
        let table = txn.open_table(RECORDS).map_err(table_error)?;
        let value = table
            .get(key)
            .map_err(|e| Error::storage("reading a record", e))?;
        value.map(|v| Record::decode(v.value())).transpose()
    })
}

/// The store's tables, opened inside one write transaction.
pub(crate) struct WriteTables<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
    meta: Table<'t, &'static str, &'static [u8]>,
    last_token: Option<u64>,
}

/// What one reaping pass did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReapPass {
    /// Records deleted.
    pub deleted: u64,
    /// Index entries the pass examined (its cost).
    pub examined: usize,
    /// Whether the pass stopped at its limit (more records may be dead).
    pub more: bool,
}

fn expiry_key(dies_at: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&dies_at.to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl<'t> WriteTables<'t> {
    /// Opens the tables in `txn`.
    pub fn open(txn: &'t WriteTransaction) -> Result<WriteTables<'t>> {
        Ok(WriteTables {
            records: txn.open_table(RECORDS).map_err(table_error)?,
            expiry: txn.open_table(EXPIRY).map_err(table_error)?,
            meta: txn.open_table(META).map_err(table_error)?,
            last_token: None,
        })
    }

    /// The record of `key`, as written by earlier operations of this transaction.
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        let value = self
            .records
            .get(key)
            .map_err(|e| Error::storage("reading a record", e))?;
        value.map(|v| Record::decode(v.value())).transpose()
    }

    /// Writes `record` under `key`, moving its expiry index entry from `old`'s death time.
    pub fn put(&mut self, key: &[u8], old: Option<&Record>, record: &Record) -> Result<()> {
        let dies_at = record.dies_at();
        if let Some(old) = old
            && old.dies_at() != dies_at
        {
            self.unindex(key, old.dies_at())?;
        }
        self.records
            .insert(key, record.encode().as_slice())
            .map_err(|e| Error::storage("writing a record", e))?;
        self.expiry
            .insert(expiry_key(dies_at, key).as_slice(), ())
            .map_err(|e| Error::storage("writing the expiry index", e))?;
        Ok(())
    }

    /// Deletes the record of `key` and its expiry index entry.
    pub fn delete(&mut self, key: &[u8], old: &Record) -> Result<()> {
        self.records
            .remove(key)
            .map_err(|e| Error::storage("deleting a record", e))?;
        self.unindex(key, old.dies_at())
    }

    fn unindex(&mut self, key: &[u8], dies_at: u64) -> Result<()> {
        self.expiry
            .remove(expiry_key(dies_at, key).as_slice())
            .map_err(|e| Error::storage("updating the expiry index", e))?;
        Ok(())
    }

    /// Allocates the next fencing token: the persisted counter, bumped in this transaction.
    pub fn next_token(&mut self) -> Result<u64> {
        let last = match self.last_token {
            Some(t) => t,
            None => {
                let v = self
                    .meta
                    .get(TOKEN_KEY)
                    .map_err(|e| Error::storage("reading the token counter", e))?
                    .ok_or_else(|| Error::corrupt("the fencing-token counter is missing"))?;
                let bytes = <[u8; 8]>::try_from(v.value())
                    .map_err(|_| Error::corrupt("the fencing-token counter is malformed"))?;
                u64::from_be_bytes(bytes)
            }
        };
        let next = last
            .checked_add(1)
            .ok_or_else(|| Error::corrupt("the fencing-token counter is exhausted"))?;
        self.meta
            .insert(TOKEN_KEY, next.to_be_bytes().as_slice())
            .map_err(|e| Error::storage("writing the token counter", e))?;
        self.last_token = Some(next);
        Ok(next)
    }

    /// Records `now` as the latest time a write saw (the floor of the store's clock after a
    /// reopen).
    pub fn note_time(&mut self, now: u64) -> Result<()> {
        self.meta
            .insert(TIME_KEY, now.to_be_bytes().as_slice())
            .map_err(|e| Error::storage("writing the latest time", e))?;
        Ok(())
    }

    /// Deletes the records dead at `now`, visiting at most `limit` index entries, oldest death
    /// first. Cost: O(entries visited), never a scan of live records (the index range ends
    /// at `now`).
    pub fn reap(&mut self, now: u64, limit: usize) -> Result<ReapPass> {
        // Index keys of records dead at `now` sort before `now + 1` (big-endian prefix).
        let upper = now.checked_add(1).map(u64::to_be_bytes);
        let mut due: Vec<(u64, Vec<u8>)> = Vec::with_capacity(limit.min(1024));
        let examined = Cell::new(0usize);
        {
            let index_error = |e| Error::storage("draining the expiry index", e);
            let all = |_: &[u8], _: ()| {
                examined.set(examined.get() + 1);
                true
            };
            let drained = match &upper {
                Some(upper) => self
                    .expiry
                    .extract_from_if::<&[u8], _>(..upper.as_slice(), all),
                None => self.expiry.extract_from_if::<&[u8], _>(.., all),
            }
            .map_err(index_error)?;
            for entry in drained.take(limit) {
                let (k, _) = entry.map_err(index_error)?;
                // A malformed entry (shorter than its time) is dropped with the batch.
                if let Some((at, key)) = k.value().split_first_chunk::<8>() {
                    due.push((u64::from_be_bytes(*at), key.to_vec()));
                }
            }
        }
        let more = due.len() == limit;
        let mut deleted = 0;
        for (dies_at, key) in due {
            let stale = {
                let removed = self
                    .records
                    .remove(key.as_slice())
                    .map_err(|e| Error::storage("deleting a record", e))?;
                let Some(removed) = removed else { continue };
                match Record::peek_dies_at(removed.value()) {
                    // A stale entry: the record's death moved (it has another entry).
                    Ok(at) if at != dies_at => Some(removed.value().to_vec()),
                    // Dead, and this is its index entry; or damaged while the index says it
                    // is dead, when removing it is the safe choice.
                    _ => None,
                }
            };
            match stale {
                None => deleted += 1,
                Some(bytes) => {
                    self.records
                        .insert(key.as_slice(), bytes.as_slice())
                        .map_err(|e| Error::storage("restoring a record", e))?;
                }
            }
        }
        Ok(ReapPass {
            deleted,
            examined: examined.get(),
            more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::machine;

    /// Writes `n` fresh in-flight records created at `now` (death `now + ttl`).
    fn fill(db: &Database, prefix: &str, n: usize, now: u64, ttl: u64) {
        let txn = db.begin_write().unwrap();
        {
            let mut t = WriteTables::open(&txn).unwrap();
            for i in 0..n {
                let key = crate::Key::new("s", &format!("{prefix}{i}"))
                    .unwrap()
                    .encode();
                let token = t.next_token().unwrap();
                let fp = Fingerprint::of(&key);
                let (record, _) = machine::claim(None, &fp, token, now, ttl, 1);
                t.put(&key, None, &record).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn reaping_examines_only_dead_index_entries() {
        let (db, _) = initialize(open_memory(1 << 20).unwrap()).unwrap();
        fill(&db, "dead-", 7, 0, 100);
        fill(&db, "live-", 5_000, 0, 1_000_000);
        let txn = db.begin_write().unwrap();
        let mut t = WriteTables::open(&txn).unwrap();
        // At time 500 only the 7 short-lived records are dead: a pass costs 7 entries, not
        // the 5,007 the store holds.
        let pass = t.reap(500, 1_000).unwrap();
        assert_eq!(
            pass,
            ReapPass {
                deleted: 7,
                examined: 7,
                more: false
            }
        );
        // Nothing dead is left: the next pass examines nothing.
        assert_eq!(t.reap(500, 1_000).unwrap().examined, 0);
        // A limit bounds a pass, and says more may be due.
        let pass = t.reap(2_000_000, 1_000).unwrap();
        assert_eq!(
            (pass.deleted, pass.examined, pass.more),
            (1_000, 1_000, true)
        );
    }
}
