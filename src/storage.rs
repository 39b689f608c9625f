//! The redb layer: the file's tables, opening and format checks, and the reads
//! and writes of records with their expiry index. Decisions are made by [`crate::machine`];
//! this module only moves records in and out of redb.
//!
//! # Tables (format version 3)
//!
//! | table | key | value |
//! |---|---|---|
//! | `idemstore_meta` | `"magic"`, `"format_version"`, `"last_token"`, `"latest_time"`, `"clock_corrections"`, `"resweep_from"` | `b"idemstore"`, `u32` BE, `u64` BE, `u64` BE nanoseconds (the latest time a write saw), the clock corrections ([`crate::timeline`]: 12 bytes each), `u64` BE (the death time from which the reaper still has to re-file records moved back by a correction) |
//! | `idemstore_log` | sequence number (`u64`) | a log entry: key length (`u16` BE), encoded [`Key`](crate::Key) (scope length byte, scope, id), [`Record`] ([`crate::record`]) |
//! | `idemstore_log_expiry` | (death time in nanoseconds, sequence number), both `u64` | `()` |
//!
//! # Why a log
//!
//! Idempotency keys are random (UUID v4). In a tree keyed by them every write lands on a
//! different page, so a commit of *n* writes copies about *n* pages of the tree and their
//! parents, and the disk's write bandwidth, not the fsync, bounds group commit. Here a new
//! key's first record is appended to the log under the next sequence number, and later
//! records of the key rewrite that entry in place (for the request that just ran it sits
//! near the log's end too), so a commit of a whole batch touches a handful of pages. The
//! log is in the order keys were claimed; a key deleted (abandoned or reaped) and
//! claimed again gets a new entry at the end. The cost is an
//! in-memory index from key hash to sequence number ([`crate::index`]), rebuilt by a scan of
//! the log when the store opens.
//!
//! The expiry index holds exactly one entry per log entry, keyed by the record's death time,
//! so the reaper walks dead records in time order and never scans live ones.
//!
//! Other format versions (1 and 2 were development formats) are refused with
//! [`Error::IncompatibleFormat`], never migrated.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableError, WriteTransaction,
};

use crate::clock::Clock;
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::index::{Change, Index};
use crate::record::{Record, entry_len, split_entry, write_entry};
use crate::redb_file::{self, FileIdentity, io_error, open_error, private_file_options};
use crate::timeline::{Corrections, Stamp, StoreClock};

/// Every table name of a store file (those of this format and of the development formats
/// before it), for files that must not be taken for a store (the client outbox).
#[cfg(feature = "client")]
pub(crate) const TABLE_NAMES: [&str; 5] = [
    "idemstore_meta",
    "idemstore_log",
    "idemstore_log_expiry",
    "idemstore_records",
    "idemstore_expiry",
];
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("idemstore_log");
const DEATHS: TableDefinition<(u64, u64), ()> = TableDefinition::new("idemstore_log_expiry");

const MAGIC_KEY: &str = "magic";
const MAGIC: &[u8] = b"idemstore";
const VERSION_KEY: &str = "format_version";
const TOKEN_KEY: &str = "last_token";
const TIME_KEY: &str = "latest_time";
const CORRECTIONS_KEY: &str = "clock_corrections";
const RESWEEP_KEY: &str = "resweep_from";
/// The file format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 3;

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
    /// A store of ours, of this format version.
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
    let found = check_meta(&meta)?;
    txn.open_table(LOG).map_err(table_error)?;
    txn.open_table(DEATHS).map_err(table_error)?;
    Ok(found)
}

/// Opens (or creates) the store file at `path`.
///
/// A file that exists and is not empty is first checked through a read-only open, which does
/// not modify it (a read-write open of redb rewrites the header). Only a redb file that needs
/// crash recovery cannot be checked that way: it is repaired by the read-write open first and
/// checked afterwards.
pub(crate) fn open_file(path: &Path, cache_bytes: usize) -> Result<(Database, FileIdentity)> {
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
    let identity = FileIdentity::of(path, &file)?;
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
    Ok((db, identity))
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
        let stored =
            initialize(db, Arc::new(crate::clock::SystemClock)).map_err(std::io::Error::other)?;
        stored.db.close().map_err(std::io::Error::other)
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
#[cfg(feature = "test-backend")]
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

/// Writes the meta table and creates the tables of a new store, or checks an existing one,
/// then builds the key index from the log. Always commits durably. The store's clock reads
/// `clock`, starting from the latest time and the clock corrections persisted in the file.
///
/// Guarded: the engine can panic on a damaged page that the read-only check did not visit
/// (its commit reads the system tables); the caller then gets [`Error::Corrupt`].
pub(crate) fn initialize(db: Database, clock: Arc<dyn Clock>) -> Result<Stored> {
    let built = guarded("initializing the store", || {
        let meta = initialize_unguarded(&db)?;
        let log = build_index(&db)?;
        Ok((meta, log))
    });
    match built {
        Ok((meta, log)) => Ok(Stored {
            db,
            index: log.index,
            next_seq: AtomicU64::new(log.next_seq),
            tokens_above: log.highest_token,
            timeline: StoreClock::new(clock, meta.latest_time, meta.corrections),
            resweep_from: Mutex::new(meta.resweep_from),
            file: None,
        }),
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

/// Starts a write transaction. A durable one commits in two phases (the new commit slot is
/// written and fsync'd, then the header byte that makes it the newest one, then fsync'd
/// again), so after a crash the newest commit is never mistaken for a torn write: with one
/// phase, redb verifies the newest commit's checksum at recovery and, if a damaged page fails
/// it, silently falls back to the commit before, rolling back an acknowledged write. With
/// two, a damaged newest commit is [`Error::Corrupt`] at open instead.
pub(crate) fn begin_write(db: &Database, durability: Durability) -> Result<WriteTransaction> {
    let mut txn = db
        .begin_write()
        .map_err(engine("starting a write transaction"))?;
    match durability {
        Durability::Immediate => txn.set_two_phase_commit(true),
        Durability::ImmediateOnePhase => {}
        Durability::None => txn
            .set_durability(redb::Durability::None)
            .map_err(engine("setting durability"))?,
    }
    Ok(txn)
}

/// What the meta table of an opened store holds about time.
struct Meta {
    latest_time: u64,
    corrections: Corrections,
    resweep_from: Option<u64>,
}

fn read_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<u64>> {
    let Some(v) = meta
        .get(key)
        .map_err(|e| Error::storage("reading the meta table", e))?
    else {
        return Ok(None);
    };
    let bytes = <[u8; 8]>::try_from(v.value())
        .map_err(|_| Error::corrupt(format!("the meta table's {key:?} is malformed")))?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

fn initialize_unguarded(db: &Database) -> Result<Meta> {
    let mut found = Meta {
        latest_time: 0,
        corrections: Corrections::default(),
        resweep_from: None,
    };
    let txn = begin_write(db, Durability::Immediate)?;
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
        let put = |meta: &mut Table<&str, &[u8]>, k: &str, v: &[u8]| {
            meta.insert(k, v)
                .map(|_| ())
                .map_err(|e| Error::storage("writing the meta table", e))
        };
        if fresh {
            put(&mut meta, MAGIC_KEY, MAGIC)?;
            put(&mut meta, VERSION_KEY, &FORMAT_VERSION.to_be_bytes())?;
            put(&mut meta, TOKEN_KEY, &0u64.to_be_bytes())?;
        } else {
            check_meta(&meta)?;
            found.latest_time = read_u64(&meta, TIME_KEY)?.unwrap_or(0);
            found.resweep_from = read_u64(&meta, RESWEEP_KEY)?;
            if let Some(v) = meta
                .get(CORRECTIONS_KEY)
                .map_err(|e| Error::storage("reading the meta table", e))?
            {
                found.corrections = Corrections::decode(v.value())?;
            }
        }
        txn.open_table(LOG).map_err(table_error)?;
        txn.open_table(DEATHS).map_err(table_error)?;
    }
    txn.commit()
        .map_err(|e| Error::storage("creating the store's tables", e))?;
    Ok(found)
}

/// What reading the log at open found.
struct LogScan {
    index: Index,
    next_seq: u64,
    /// The highest fencing token of any record in the log.
    highest_token: u64,
}

/// Reads every log entry (verifying its checksum) into a new index; finds the next sequence
/// number and the highest fencing token in the log. A damaged entry, or two entries of one
/// key, is [`Error::Corrupt`] naming the entries' sequence numbers.
fn build_index(db: &Database) -> Result<LogScan> {
    let read_error = |e| Error::storage("reading the log to build the key index", e);
    let txn = db.begin_read().map_err(engine("starting a read"))?;
    let log = txn.open_table(LOG).map_err(table_error)?;
    let len = log.len().map_err(read_error)?;
    let index = Index::with_capacity(usize::try_from(len).unwrap_or(usize::MAX));
    let mut changes = Vec::with_capacity(4096);
    let mut last = 0;
    let mut highest_token = 0;
    for item in log.iter().map_err(read_error)? {
        let (seq, entry) = item.map_err(read_error)?;
        last = seq.value();
        let at = |e: Error| e.at_log_entry(last);
        let (key, record) = split_entry(entry.value()).map_err(at)?;
        highest_token = highest_token.max(Record::peek_token(record).map_err(at)?);
        changes.push(Change {
            hash: index.hash(key),
            old: None,
            new: Some(last),
        });
        if changes.len() == changes.capacity() {
            index.apply(&changes);
            changes.clear();
        }
    }
    index.apply(&changes);
    // Entries of one key share a hash: compare the keys of every shared hash.
    for seqs in index.shared() {
        let mut keys: Vec<(Vec<u8>, u64)> = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(entry) = log.get(seq).map_err(read_error)? {
                let (key, _) = split_entry(entry.value()).map_err(|e| e.at_log_entry(seq))?;
                if let Some((_, first)) = keys.iter().find(|(k, _)| k == key) {
                    return Err(Error::corrupt(format!(
                        "log entries {} and {} hold records of one key (a damaged or \
                         crafted file)",
                        first.min(&seq),
                        first.max(&seq)
                    )));
                }
                keys.push((key.to_vec(), seq));
            }
        }
    }
    let next_seq = last
        .checked_add(1)
        .ok_or_else(|| Error::corrupt("the log's sequence numbers are exhausted"))?;
    Ok(LogScan {
        index,
        next_seq,
        highest_token,
    })
}

/// A store's database, the in-memory index of its log, and its clock.
pub(crate) struct Stored {
    pub db: Database,
    pub index: Index,
    /// The sequence number of the next log entry (only the committer takes them).
    next_seq: AtomicU64,
    /// The highest fencing token found in the log at open: the next token is above it,
    /// whatever the persisted counter says (a counter lowered by a crafted file).
    tokens_above: u64,
    /// The store's time ([`crate::timeline`]); records are read with its corrections.
    pub timeline: StoreClock,
    /// The death time from which the reaper has to re-file records moved back by a clock
    /// correction (`None`: nothing to re-file). Only the committer changes it.
    pub resweep_from: Mutex<Option<u64>>,
    /// The file the database lives in, checked after each commit; `None` without a path.
    pub file: Option<FileIdentity>,
}

impl Stored {
    /// Reads one record in a read transaction. An absent key costs one index lookup and no
    /// transaction. Never waits for the committer.
    ///
    /// The index is read first, then the snapshot, so every entry the index names was
    /// committed before the snapshot began. One that is gone from the snapshot was deleted
    /// (an abandon or the reaper, perhaps followed by a new claim of the key in the same
    /// batch) by a commit whose index changes the committer has not published yet; its
    /// callers are not answered before that, so the commit is concurrent with this read and
    /// reading the key as absent is a state the key really passed through (after the
    /// deletion, before any new claim). A `begin` that then asks the committer to claim the
    /// key gets the current answer from it.
    ///
    /// Guarded: if the engine panics on a damaged page, the caller gets [`Error::Corrupt`].
    pub fn read_record(&self, key: &[u8]) -> Result<Option<Record>> {
        let hash = self.index.hash(key);
        guarded("reading a record", || {
            let candidates = self.index.candidates(hash);
            let mut seqs = candidates.iter().peekable();
            if seqs.peek().is_none() {
                return Ok(None);
            }
            let txn = self.db.begin_read().map_err(engine("starting a read"))?;
            let log = txn.open_table(LOG).map_err(table_error)?;
            let corrections = self.timeline.corrections();
            Ok(lookup(&log, seqs, key, &corrections)?.map(|(_, record)| record))
        })
    }

    /// Visits every record in one read transaction (a consistent snapshot), in log order:
    /// `visit` gets the encoded key and the record (checksum verified, clock corrections
    /// applied) and says whether to go on. Also returns the persisted fencing-token counter
    /// of that snapshot. For tools: O(records).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged entry (naming its position; the walk stops there),
    /// [`Error::Storage`], or `visit`'s own error.
    pub fn walk_log(
        &self,
        mut visit: impl FnMut(&[u8], Record) -> Result<ControlFlow<()>>,
    ) -> Result<u64> {
        guarded("reading the records", || {
            let txn = self.db.begin_read().map_err(engine("starting a read"))?;
            let last_token = {
                let meta = txn.open_table(META).map_err(table_error)?;
                read_u64(&meta, TOKEN_KEY)?.unwrap_or(0)
            };
            let log = txn.open_table(LOG).map_err(table_error)?;
            let corrections = self.timeline.corrections();
            let read_error = |e| Error::storage("reading the records", e);
            for item in log.iter().map_err(read_error)? {
                let (seq, entry) = item.map_err(read_error)?;
                let at = |e: Error| e.at_log_entry(seq.value());
                let (key, bytes) = split_entry(entry.value()).map_err(at)?;
                let record = decode_record(bytes, &corrections).map_err(at)?;
                if visit(key, record)?.is_break() {
                    break;
                }
            }
            Ok(last_token)
        })
    }

    /// The fencing token above which new tokens are granted: at least the highest token of
    /// any record found in the log when the store opened.
    fn token_floor(&self) -> u64 {
        self.tokens_above
    }
}

/// Decodes the record bytes of a log entry (whose checksum [`split_entry`] verified), with
/// its times moved back if it was written under a clock that was later corrected.
pub(crate) fn decode_record(bytes: &[u8], corrections: &Corrections) -> Result<Record> {
    let (mut record, stamp) = Record::decode(bytes)?;
    let by = corrections.shift(stamp, record.dies_at());
    if by > 0 {
        record.shift_back(by);
    }
    Ok(record)
}

/// The death time of the record in a log entry, as [`decode_record`] would give it, reading
/// only its fixed-size fields.
///
/// # Errors
/// [`Error::Corrupt`] for a damaged entry.
fn entry_dies_at<'e>(entry: &'e [u8], corrections: &Corrections) -> Result<(&'e [u8], u64)> {
    let (key, record) = split_entry(entry)?;
    let (dies_at, stamp) = Record::peek(record)?;
    Ok((
        key,
        dies_at.saturating_sub(corrections.shift(stamp, dies_at)),
    ))
}

/// Looks for `key` among the log entries `seqs` of `log`: its sequence number and record.
/// Named entries that do not exist (deleted by a commit whose index changes are not
/// published yet) and entries of other keys (hash collisions) are passed over.
fn lookup(
    log: &impl ReadableTable<u64, &'static [u8]>,
    seqs: impl Iterator<Item = u64>,
    key: &[u8],
    corrections: &Corrections,
) -> Result<Option<(u64, Record)>> {
    Ok(lookup_located(log, seqs, key, corrections)?.map(|(l, record)| (l.seq, record)))
}

/// [`lookup`], with where the entry is filed in the expiry index.
fn lookup_located(
    log: &impl ReadableTable<u64, &'static [u8]>,
    seqs: impl Iterator<Item = u64>,
    key: &[u8],
    corrections: &Corrections,
) -> Result<Option<(Located, Record)>> {
    for seq in seqs {
        let entry = log
            .get(seq)
            .map_err(|e| Error::storage("reading a record", e))?;
        if let Some(entry) = entry {
            let at = |e: Error| e.at_log_entry(seq);
            let (k, bytes) = split_entry(entry.value()).map_err(at)?;
            if k == key {
                let (stored_death, _) = Record::peek(bytes).map_err(at)?;
                let record = decode_record(bytes, corrections).map_err(at)?;
                let located = Located {
                    seq,
                    filed: [stored_death, record.dies_at()],
                };
                return Ok(Some((located, record)));
            }
        }
    }
    Ok(None)
}

/// Where a key's entry is in the log, as of a write transaction.
#[derive(Clone, Copy, Debug)]
struct Located {
    seq: u64,
    /// The death times its expiry entry may be filed under: the stored one, and the one after
    /// clock corrections (the same unless a correction moved the record back; the reaper
    /// re-files such an entry from the first to the second).
    filed: [u64; 2],
}

impl Located {
    /// The distinct death times of [`Located::filed`].
    fn distinct(&self) -> &[u64] {
        if self.filed[0] == self.filed[1] {
            &self.filed[..1]
        } else {
            &self.filed
        }
    }
}

/// The store's tables, opened inside one write transaction, with the index changes the
/// transaction made so far (published by the committer once it committed).
pub(crate) struct WriteTables<'t> {
    log: Table<'t, u64, &'static [u8]>,
    deaths: Table<'t, (u64, u64), ()>,
    /// Opened on first use: most operations (all but a claim's token) do not touch it.
    meta: Option<Table<'t, &'static str, &'static [u8]>>,
    txn: &'t WriteTransaction,
    stored: &'t Stored,
    /// When this transaction writes (every record it writes is stamped with it).
    stamp: Stamp,
    corrections: Arc<Corrections>,
    last_token: Option<u64>,
    /// Where each key touched by this transaction lives now (`None`: absent).
    located: HashMap<Vec<u8>, Option<Located>>,
    changes: Vec<Change>,
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

impl<'t> WriteTables<'t> {
    /// Opens the tables in `txn`, whose writes are stamped `stamp`.
    pub fn open(
        txn: &'t WriteTransaction,
        stored: &'t Stored,
        stamp: Stamp,
    ) -> Result<WriteTables<'t>> {
        Ok(WriteTables {
            log: txn.open_table(LOG).map_err(table_error)?,
            deaths: txn.open_table(DEATHS).map_err(table_error)?,
            meta: None,
            txn,
            stored,
            stamp,
            corrections: stored.timeline.corrections(),
            last_token: None,
            located: HashMap::new(),
            changes: Vec::new(),
        })
    }

    fn meta(&mut self) -> Result<&mut Table<'t, &'static str, &'static [u8]>> {
        let meta = match self.meta.take() {
            Some(meta) => meta,
            None => self.txn.open_table(META).map_err(table_error)?,
        };
        Ok(self.meta.insert(meta))
    }

    /// The index changes of this transaction, to publish once it committed.
    pub fn into_changes(self) -> Vec<Change> {
        self.changes
    }

    /// The log entry of `key` as of this transaction, and its record.
    fn find(&mut self, key: &[u8]) -> Result<Option<(Located, Record)>> {
        let found = match self.located.get(key) {
            Some(None) => return Ok(None),
            Some(&Some(located)) => {
                let entry = self
                    .log
                    .get(located.seq)
                    .map_err(|e| Error::storage("reading a record", e))?
                    .ok_or_else(|| {
                        Error::storage(
                            format!("reading log entry {} of this transaction", located.seq),
                            std::io::Error::other(
                                "the storage engine lost an entry this transaction wrote",
                            ),
                        )
                    })?;
                let (_, record) = split_entry(entry.value())?;
                let record = decode_record(record, &self.corrections)?;
                return Ok(Some((located, record)));
            }
            None => {
                let candidates = self.stored.index.candidates(self.stored.index.hash(key));
                // A missing entry here belongs to a colliding key this batch deleted (a key
                // this batch touched is in `located`).
                lookup_located(&self.log, candidates.iter(), key, &self.corrections)?
            }
        };
        self.located
            .insert(key.to_vec(), found.as_ref().map(|&(located, _)| located));
        Ok(found)
    }

    /// The record of `key`, as written by earlier operations of this transaction.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Record>> {
        Ok(self.find(key)?.map(|(_, record)| record))
    }

    /// Writes `record` as the record of `key`. A key that has an entry gets it rewritten in
    /// place (one change to the log, none to the key index; its expiry entry moves only if
    /// the death time changed); a new key gets an entry appended at the log's end.
    ///
    /// In place rather than appended again: the key's old entry has to be touched anyway (to
    /// delete it), so rewriting it dirties no more pages, and saves the append. The entry is
    /// encoded straight into the space the storage engine reserved for it: a response is
    /// copied once, into the page that stores it.
    pub fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        let located = self.locate(key)?;
        let seq = located.map_or_else(
            || self.stored.next_seq.fetch_add(1, Ordering::Relaxed),
            |l| l.seq,
        );
        let dies_at = record.dies_at();
        {
            let mut space = self
                .log
                .insert_reserve(seq, entry_len(key, record))
                .map_err(|e| Error::storage("writing a record", e))?;
            write_entry(key, record, self.stamp, space.as_mut());
        }
        match located {
            Some(old) if old.filed == [dies_at, dies_at] => {}
            old => {
                if let Some(old) = old {
                    for &at in old.distinct() {
                        self.deaths
                            .remove((at, seq))
                            .map_err(|e| Error::storage("updating the expiry index", e))?;
                    }
                }
                self.deaths
                    .insert((dies_at, seq), ())
                    .map_err(|e| Error::storage("writing the expiry index", e))?;
            }
        }
        let now_at = Located {
            seq,
            filed: [dies_at, dies_at],
        };
        if located.is_none() {
            self.moved(key, None, Some(now_at));
        } else {
            self.located.insert(key.to_vec(), Some(now_at));
        }
        Ok(())
    }

    /// Deletes the record of `key` (if any) and its expiry index entry.
    pub fn delete(&mut self, key: &[u8]) -> Result<()> {
        let Some(old) = self.locate(key)? else {
            return Ok(());
        };
        self.log
            .remove(old.seq)
            .map_err(|e| Error::storage("deleting a record", e))?;
        for &at in old.distinct() {
            self.deaths
                .remove((at, old.seq))
                .map_err(|e| Error::storage("updating the expiry index", e))?;
        }
        self.moved(key, Some(old), None);
        Ok(())
    }

    /// Where `key`'s entry is as of this transaction. Usually known from the `get` before: no
    /// second read of the entry.
    fn locate(&mut self, key: &[u8]) -> Result<Option<Located>> {
        match self.located.get(key) {
            Some(&located) => Ok(located),
            None => Ok(self.find(key)?.map(|(located, _)| located)),
        }
    }

    fn moved(&mut self, key: &[u8], old: Option<Located>, new: Option<Located>) {
        self.changes.push(Change {
            hash: self.stored.index.hash(key),
            old: old.map(|l| l.seq),
            new: new.map(|l| l.seq),
        });
        self.located.insert(key.to_vec(), new);
    }

    /// Allocates the next fencing token: the persisted counter, bumped in this transaction.
    /// It is also above every token found in the log at open, so a counter that a damaged or
    /// crafted file lowered never makes a token be granted twice.
    pub fn next_token(&mut self) -> Result<u64> {
        let last = match self.last_token {
            Some(t) => t,
            None => {
                let v = self
                    .meta()?
                    .get(TOKEN_KEY)
                    .map_err(|e| Error::storage("reading the token counter", e))?
                    .ok_or_else(|| Error::corrupt("the fencing-token counter is missing"))?;
                let bytes = <[u8; 8]>::try_from(v.value())
                    .map_err(|_| Error::corrupt("the fencing-token counter is malformed"))?;
                u64::from_be_bytes(bytes)
            }
        }
        .max(self.stored.token_floor());
        let next = last
            .checked_add(1)
            .ok_or_else(|| Error::corrupt("the fencing-token counter is exhausted"))?;
        self.meta()?
            .insert(TOKEN_KEY, next.to_be_bytes().as_slice())
            .map_err(|e| Error::storage("writing the token counter", e))?;
        self.last_token = Some(next);
        Ok(next)
    }

    /// Records `now` as the latest time a write saw (the floor of the store's clock after a
    /// reopen).
    pub fn note_time(&mut self, now: u64) -> Result<()> {
        self.meta()?
            .insert(TIME_KEY, now.to_be_bytes().as_slice())
            .map_err(|e| Error::storage("writing the latest time", e))?;
        Ok(())
    }

    /// Persists the clock corrections (all of them, the new ones included) and, when they move
    /// records back, where the reaper's re-filing of expiry entries starts.
    pub fn save_corrections(
        &mut self,
        corrections: &Corrections,
        resweep_from: Option<u64>,
    ) -> Result<()> {
        self.meta()?
            .insert(CORRECTIONS_KEY, corrections.encode().as_slice())
            .map_err(|e| Error::storage("writing the clock corrections", e))?;
        self.set_resweep(resweep_from)
    }

    fn set_resweep(&mut self, from: Option<u64>) -> Result<()> {
        let meta = self.meta()?;
        match from {
            Some(at) => meta
                .insert(RESWEEP_KEY, at.to_be_bytes().as_slice())
                .map(|_| ()),
            None => meta.remove(RESWEEP_KEY).map(|_| ()),
        }
        .map_err(|e| Error::storage("writing the re-filing position", e))
    }

    /// Re-files the expiry entries of records that a clock correction moved back, visiting
    /// at most `limit` index entries from death time `from` upwards. Returns where the next
    /// pass starts, `None` once the index is done. Records written under a clock that ran
    /// ahead are filed under deaths far in the future; this moves each under its death as
    /// read now, so the reaper finds it when it is due. Runs only after a correction, once
    /// over the entries filed above the corrected time.
    pub fn resweep(&mut self, from: u64, limit: usize) -> Result<Option<u64>> {
        let index_error = |e| Error::storage("re-filing the expiry index", e);
        let mut visited = Vec::with_capacity(limit.min(1024));
        for item in self
            .deaths
            .range((from, 0)..)
            .map_err(index_error)?
            .take(limit + 1)
        {
            let (k, _) = item.map_err(index_error)?;
            visited.push(k.value());
        }
        let next = (visited.len() > limit).then(|| visited[limit].0);
        visited.truncate(limit);
        for (filed, seq) in visited {
            let death = match self.log.get(seq).map_err(index_error)? {
                None => None,
                // Damaged: left where it is; readers report it.
                Some(entry) => match entry_dies_at(entry.value(), &self.corrections) {
                    Ok((_, death)) => Some(death),
                    Err(_) => continue,
                },
            };
            if death != Some(filed) {
                self.deaths.remove((filed, seq)).map_err(index_error)?;
                if let Some(death) = death {
                    self.deaths.insert((death, seq), ()).map_err(index_error)?;
                }
            }
        }
        self.set_resweep(next)?;
        Ok(next)
    }

    /// Deletes the records dead at `now`, visiting at most `limit` index entries, oldest death
    /// first. Cost: O(entries visited), never a scan of live records (the index range ends
    /// at `now`).
    pub fn reap(&mut self, now: u64, limit: usize) -> Result<ReapPass> {
        let mut due: Vec<(u64, u64)> = Vec::with_capacity(limit.min(1024));
        let examined = Cell::new(0usize);
        {
            let index_error = |e| Error::storage("draining the expiry index", e);
            let all = |_: (u64, u64), _: ()| {
                examined.set(examined.get() + 1);
                true
            };
            let drained = self
                .deaths
                .extract_from_if::<(u64, u64), _>(..=(now, u64::MAX), all)
                .map_err(index_error)?;
            for entry in drained.take(limit) {
                let (k, _) = entry.map_err(index_error)?;
                due.push(k.value());
            }
        }
        let more = due.len() == limit;
        // The log entries go in runs of nearby sequence numbers, each removed in one pass over
        // its range (redb rebuilds each leaf once, not once per entry). A run never spans more
        // than `MAX_GAP - 1` live entries between two dead ones, so the cost stays proportional
        // to the dead entries.
        const MAX_GAP: u64 = 16;
        due.sort_unstable_by_key(|&(_, seq)| seq);
        let mut removed: Vec<(u64, Vec<u8>)> = Vec::with_capacity(due.len());
        let mut reindex: Vec<(u64, u64)> = Vec::new();
        let mut start = 0;
        while start < due.len() {
            let mut end = start + 1;
            while end < due.len() && due[end].1 - due[end - 1].1 <= MAX_GAP {
                end += 1;
            }
            let run = &due[start..end];
            let (first, last) = (run[0].1, run[run.len() - 1].1);
            let mut next = 0;
            self.log
                .retain_in(first..=last, |seq, entry| {
                    while next < run.len() && run[next].1 < seq {
                        next += 1;
                    }
                    if run.get(next).is_none_or(|&(_, s)| s != seq) {
                        return true; // a live entry between two dead ones
                    }
                    match entry_dies_at(entry, &self.corrections) {
                        Ok((key, at)) if at <= now => {
                            removed.push((seq, key.to_vec()));
                            false
                        }
                        // Not dead after all (an index entry that disagrees with its record):
                        // keep it, indexed at its own death time.
                        Ok((_, at)) => {
                            reindex.push((at, seq));
                            true
                        }
                        // Damaged: keep it (readers report it); its expiry entry is gone.
                        Err(_) => true,
                    }
                })
                .map_err(|e| Error::storage("deleting dead records", e))?;
            start = end;
        }
        for (at, seq) in reindex {
            self.deaths
                .insert((at, seq), ())
                .map_err(|e| Error::storage("restoring an expiry entry", e))?;
        }
        let deleted = removed.len() as u64;
        for (seq, key) in removed {
            self.changes.push(Change {
                hash: self.stored.index.hash(&key),
                old: Some(seq),
                new: None,
            });
            self.located.insert(key, None);
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
    fn fill(stored: &Stored, prefix: &str, n: usize, now: u64, ttl: u64) {
        let txn = stored.db.begin_write().unwrap();
        let changes = {
            let mut t = WriteTables::open(&txn, stored, Stamp::default()).unwrap();
            for i in 0..n {
                let key = crate::Key::new("s", &format!("{prefix}{i}"))
                    .unwrap()
                    .encode();
                let token = t.next_token().unwrap();
                let fp = Fingerprint::of(&key);
                let record = machine::claim(None, &fp, token, now, ttl, 1).record;
                t.put(&key, &record).unwrap();
            }
            t.into_changes()
        };
        txn.commit().unwrap();
        stored.index.apply(&changes);
    }

    #[test]
    fn reaping_examines_only_dead_index_entries() {
        let stored = initialize(
            open_memory(1 << 20).unwrap(),
            Arc::new(crate::clock::SystemClock),
        )
        .unwrap();
        fill(&stored, "dead-", 7, 0, 100);
        fill(&stored, "live-", 5_000, 0, 1_000_000);
        assert_eq!(stored.index.len(), 5_007);
        let txn = stored.db.begin_write().unwrap();
        let mut t = WriteTables::open(&txn, &stored, Stamp::default()).unwrap();
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

    /// (sequence number, key) of each log entry.
    type Entries = Vec<(u64, Vec<u8>)>;

    /// The log entries and expiry entries of the store, as (seq, key) and (death, seq).
    fn contents(stored: &Stored) -> (Entries, Vec<(u64, u64)>) {
        let txn = stored.db.begin_read().unwrap();
        let log = txn.open_table(LOG).unwrap();
        let deaths = txn.open_table(DEATHS).unwrap();
        let entries = log
            .iter()
            .unwrap()
            .map(|e| {
                let (seq, entry) = e.unwrap();
                (seq.value(), split_entry(entry.value()).unwrap().0.to_vec())
            })
            .collect();
        let deaths = deaths
            .iter()
            .unwrap()
            .map(|e| e.unwrap().0.value())
            .collect();
        (entries, deaths)
    }

    /// Runs `f` on the tables in one committed transaction and publishes its index changes.
    fn write(stored: &Stored, f: impl FnOnce(&mut WriteTables<'_>)) -> usize {
        let txn = stored.db.begin_write().unwrap();
        let changes = {
            let mut t = WriteTables::open(&txn, stored, Stamp::default()).unwrap();
            f(&mut t);
            t.into_changes()
        };
        txn.commit().unwrap();
        stored.index.apply(&changes);
        changes.len()
    }

    #[test]
    fn a_key_is_rewritten_in_place_and_its_expiry_entry_follows_its_death_time() {
        let stored = initialize(
            open_memory(1 << 20).unwrap(),
            Arc::new(crate::clock::SystemClock),
        )
        .unwrap();
        fill(&stored, "k", 2, 0, 100);
        let key = crate::Key::new("s", "k0").unwrap().encode();
        let other = crate::Key::new("s", "k1").unwrap().encode();
        let (entries, deaths) = contents(&stored);
        let seq = entries.iter().find(|(_, k)| *k == key).unwrap().0;
        assert!(deaths.contains(&(100, seq)));

        // Completing the key: same entry, new record, expiry entry moved; no index change.
        let record = stored.read_record(&key).unwrap().unwrap();
        let done = machine::apply_lease(
            Some(&record),
            record.token,
            machine::LeaseAction::Complete(b"ok".to_vec()),
            10,
            500,
        )
        .unwrap();
        let machine::Transition::Put(done) = done else {
            panic!("complete must write")
        };
        assert_eq!(done.dies_at(), 510);
        let changes = write(&stored, |t| {
            assert!(t.get(&key).unwrap().is_some());
            t.put(&key, &done).unwrap();
        });
        assert_eq!(changes, 0, "the index does not change");
        let (after, deaths) = contents(&stored);
        assert_eq!(after, entries, "no entry added or moved");
        assert!(deaths.contains(&(510, seq)) && !deaths.contains(&(100, seq)));
        assert_eq!(deaths.len(), 2);
        assert_eq!(stored.read_record(&key).unwrap(), Some(done.clone()));

        // The same record again (same death time): the expiry index is left alone.
        write(&stored, |t| t.put(&key, &done).unwrap());
        assert_eq!(contents(&stored).1, deaths);

        // Deleted and claimed again: a new entry at the log's end.
        assert_eq!(write(&stored, |t| t.delete(&key).unwrap()), 1);
        assert_eq!(stored.read_record(&key).unwrap(), None);
        write(&stored, |t| t.put(&key, &done).unwrap());
        let (entries, deaths) = contents(&stored);
        let keys: Vec<_> = entries.iter().map(|(_, k)| k.clone()).collect();
        assert_eq!(keys, [other, key.clone()]);
        assert_eq!(deaths.len(), 2);
        assert_eq!(stored.read_record(&key).unwrap(), Some(done));
    }
}
