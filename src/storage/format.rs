//! The file: the format check (read-only, before anything writes), creation, opening, and
//! building the key index from the log.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use parking_lot::Mutex;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
};

use super::progress::{LogPass, PageCheck};
use super::scan;
use super::*;
use crate::clock::Clock;
use crate::config::Durability;
use crate::index::Change;
use crate::redb_file::{self, FileIdentity, io_error, open_error, private_file_options};

/// What the format check found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A store of ours, of a format version this build reads.
    Ours { version: u32 },
    /// A redb file without any table: a new store (or one whose creation was interrupted).
    Empty,
}

/// Checks a meta table's marker and version; returns the version.
fn check_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u32> {
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
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Error::IncompatibleFormat {
            reason: format!(
                "the file has format version {version}, this build of idemstore reads versions \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}{}",
                if version > FORMAT_VERSION {
                    " (upgrade idemstore)"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(version)
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
    let version = check_meta(&meta)?;
    txn.open_table(LOG).map_err(table_error)?;
    txn.open_table(DEATHS).map_err(table_error)?;
    Ok(Found::Ours { version })
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
    let check = (existing_len > 0).then(|| PageCheck::start(path, existing_len, repaired));
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
    if let Some(check) = check {
        check.done();
    }
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
    // One creation at a time in this process: the temporary name is per process, so two
    // threads creating a store at once would remove and link each other's half-built file.
    static CREATING: Mutex<()> = Mutex::new(());
    let _creating = CREATING.lock();
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
        let stored = initialize(db, Arc::new(crate::clock::SystemClock), false)
            .map_err(std::io::Error::other)?;
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
/// then builds the key index: from its snapshot and the log written after it when the file
/// holds one that passes its checks, else from the whole log (a snapshot that fails a check
/// is removed first). Always commits durably. The store's clock reads `clock`, starting from
/// the latest time and the clock corrections persisted in the file. `persistent`: the
/// database outlives the store (a file or a backend), so the index's snapshot is written.
///
/// Guarded: the engine can panic on a damaged page that the read-only check did not visit
/// (its commit reads the system tables); the caller then gets [`Error::Corrupt`].
pub(crate) fn initialize(db: Database, clock: Arc<dyn Clock>, persistent: bool) -> Result<Stored> {
    let built = guarded("initializing the store", || {
        let meta = initialize_unguarded(&db)?;
        let started = std::time::Instant::now();
        let mut snapshot_ms = 0;
        let (log, source, floor) = match snapshot::load(&db)? {
            snapshot::Loaded::Index {
                index,
                next_seq,
                highest_token,
                tail,
                seq_end,
                took,
            } => {
                snapshot_ms = took.0.as_millis() as u64;
                (
                    LogScan {
                        index,
                        next_seq,
                        highest_token,
                    },
                    IndexSource::Snapshot { tail },
                    Some(seq_end),
                )
            }
            snapshot::Loaded::Absent => (
                build_index(&db)?,
                IndexSource::Rebuilt { rejected: None },
                None,
            ),
            snapshot::Loaded::Rejected(why) => {
                tracing::warn!(
                    reason = %why,
                    "the key index's snapshot in the file failed a check: it is removed and \
                     the index rebuilt from the whole log"
                );
                snapshot::remove(&db)?;
                (
                    build_index(&db)?,
                    IndexSource::Rebuilt {
                        rejected: Some(why),
                    },
                    None,
                )
            }
        };
        tracing::info!(
            source = ?source,
            entries = log.index.len(),
            index_bytes = log.index.heap_bytes(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            snapshot_ms,
            "key index ready"
        );
        Ok((meta, log, source, floor))
    });
    match built {
        Ok((meta, log, index_source, floor)) => Ok(Stored {
            db,
            index: log.index,
            next_seq: AtomicU64::new(log.next_seq),
            tokens_above: log.highest_token,
            timeline: StoreClock::new(clock, meta.latest_time, meta.corrections),
            resweep_from: Mutex::new(meta.resweep_from),
            file: None,
            persistent,
            snapshot_floor: AtomicU64::new(floor.unwrap_or(0)),
            snapshot_generation: Mutex::new(floor.map(|_| 0)),
            index_source,
            response_hint: ResponseHint::default(),
            poisoned: AtomicBool::new(false),
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

/// What the meta table of an opened store holds about time.
struct Meta {
    latest_time: u64,
    corrections: Corrections,
    resweep_from: Option<u64>,
}

/// Reads what the meta table of a checked store holds about time.
fn read_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Meta> {
    Ok(Meta {
        latest_time: read_u64(meta, TIME_KEY)?.unwrap_or(0),
        resweep_from: read_u64(meta, RESWEEP_KEY)?,
        corrections: match meta
            .get(CORRECTIONS_KEY)
            .map_err(|e| Error::storage("reading the meta table", e))?
        {
            Some(v) => Corrections::decode(v.value())?,
            None => Corrections::default(),
        },
    })
}

/// Opens an existing store file read-only, for tools: checked like any open, and never
/// written to (no crash recovery, no meta update). A file that needs crash recovery (its last
/// writer did not close it) is refused: only a read-write open repairs it.
///
/// # Errors
/// As [`open_file`] for a missing parent, a directory, a foreign or damaged file, or one
/// that is open for writing elsewhere; [`Error::IncompatibleFormat`] for an empty file or a
/// redb file without tables (not a store yet); [`Error::Storage`] for a file that needs
/// recovery.
pub(crate) fn open_read_only(path: &Path) -> Result<ReadOnlyFile> {
    match redb_file::existing_len(path)? {
        Some(len) if len > 0 => {}
        _ => {
            return Err(Error::IncompatibleFormat {
                reason: "the file is missing or empty: not a store yet".into(),
            });
        }
    }
    redb_file::require_redb(path, "")?;
    guarded("opening the file read-only", || {
        let db = match redb::Builder::new()
            .set_cache_size(16 << 20)
            .open_read_only(path)
        {
            Ok(db) => db,
            Err(DatabaseError::RepairAborted) => {
                return Err(Error::storage(
                    format!("opening {} read-only", path.display()),
                    std::io::Error::other(
                        "the file was not closed cleanly (its last writer crashed, or the file \
                         was cut short or changed since): it needs the recovery a read-write \
                         open performs (Store::open, or `idemstore reap FILE`), which refuses \
                         it as corrupt if it is damaged; keep a copy of the file first",
                    ),
                ));
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let Found::Ours { version } = check_read(&db)? else {
            return Err(Error::IncompatibleFormat {
                reason: "a redb file without tables: not a store yet".into(),
            });
        };
        let meta = {
            let txn = db.begin_read().map_err(engine("starting a read"))?;
            let table = txn.open_table(META).map_err(table_error)?;
            read_meta(&table)?
        };
        Ok(ReadOnlyFile {
            db,
            timeline: StoreClock::new(
                Arc::new(crate::clock::SystemClock),
                meta.latest_time,
                meta.corrections,
            ),
            format_version: version,
        })
    })
}

fn initialize_unguarded(db: &Database) -> Result<Meta> {
    let mut found = Meta {
        latest_time: 0,
        corrections: Corrections::default(),
        resweep_from: None,
    };
    let mut raised = None;
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
            let version = check_meta(&meta)?;
            found = read_meta(&meta)?;
            if version < FORMAT_VERSION {
                // Before this build writes a record an older build could not read.
                put(&mut meta, VERSION_KEY, &FORMAT_VERSION.to_be_bytes())?;
                raised = Some(version);
            }
        }
        txn.open_table(LOG).map_err(table_error)?;
        txn.open_table(DEATHS).map_err(table_error)?;
    }
    txn.commit()
        .map_err(|e| Error::storage("creating the store's tables", e))?;
    if let Some(from) = raised {
        tracing::info!(
            from,
            to = FORMAT_VERSION,
            "the file's format version was raised (older builds of idemstore no longer open it)"
        );
    }
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
    let pass = LogPass::new("rebuilding the key index", len);
    // Each thread adds its entries to the index in batches (the index takes a lock for each).
    let highest_tokens = scan::over_log(&log, &pass, read_error, |range, tally| {
        let mut changes = Vec::with_capacity(4096);
        let mut highest_token = 0;
        for item in scan::entries(&log, range, read_error)? {
            let (seq, entry) = item?;
            tally.step();
            let at = |e: Error| e.at_log_entry(seq);
            let (key, record) = split_entry(entry.value()).map_err(at)?;
            highest_token = highest_token.max(Record::peek_token(record).map_err(at)?);
            changes.push(Change {
                hash: index.hash(key),
                old: None,
                new: Some(seq),
            });
            if changes.len() == changes.capacity() {
                index.apply(&changes);
                changes.clear();
            }
        }
        index.apply(&changes);
        Ok(highest_token)
    })?;
    let highest_token = highest_tokens.into_iter().max().unwrap_or(0);
    let last = log
        .last()
        .map_err(read_error)?
        .map_or(0, |(seq, _)| seq.value());
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
