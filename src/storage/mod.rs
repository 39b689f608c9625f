//! The redb layer: the file's tables, opening and format checks, and the reads
//! and writes of records with their expiry index. Decisions are made by [`crate::machine`];
//! this module only moves records in and out of redb.
//!
//! # Tables (format version 4)
//!
//! | table | key | value |
//! |---|---|---|
//! | `idemstore_meta` | `"magic"`, `"format_version"`, `"last_token"`, `"latest_time"`, `"clock_corrections"`, `"resweep_from"` | `b"idemstore"`, `u32` BE, `u64` BE, `u64` BE nanoseconds (the latest time a write saw), the clock corrections ([`crate::timeline`]: 12 bytes each), `u64` BE (the death time from which the reaper still has to re-file records moved back by a correction) |
//! | `idemstore_log` | sequence number (`u64`) | a log entry: key length (`u16` BE), encoded [`Key`](crate::Key) (scope length byte, scope, id), [`Record`] ([`crate::record`]; an in-flight one followed by room for its response, [`ResponseHint`]), CRC-32 |
//! | `idemstore_log_expiry` | (death time in nanoseconds, sequence number), both `u64` | `()` |
//! | `idemstore_index_snapshot` | segment number << 32 \| piece number (`u64`) | a piece of one segment of the key index's slots ([`crate::index`]), 12 bytes each, at most 16 KiB |
//! | `idemstore_index_deleted` | sequence number (`u64`) | key hash (`u64`): a log entry below the snapshot's end deleted since it was written |
//!
//! The key index's snapshot (`snapshot`) adds to the meta table `"index_snapshot"` (its header:
//! hash keys, size, end, entry count, token floor, CRC-32) and `"latest_time_mark"` (the latest
//! time again, written with it). These were added within format version 3: a file without
//! them opens as before (its index is built from the whole log, and the first close writes a
//! snapshot); an older build of idemstore ignores them, and an open by this build after such a
//! build wrote the file finds the snapshot stale by its checks and rebuilds the index.
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
//! in-memory index from key hash to sequence number ([`crate::index`]), loaded from its
//! snapshot plus the log written after it when the store opens (or rebuilt by a scan of the
//! whole log when there is no snapshot to trust).
//!
//! The expiry index holds exactly one entry per log entry, keyed by the record's death time,
//! so the reaper walks dead records in time order and never scans live ones.
//!
//! Format version 4 is version 3 with room after in-flight records (record codec version 3,
//! [`crate::record`]; [`ResponseHint`]): a read-write open of a version 3 file marks it
//! version 4 in its first transaction (an older build then refuses it, as it could not read
//! those records), a read-only open reads it as it is. Other format versions (1 and 2 were
//! development formats) are refused with [`Error::IncompatibleFormat`], never migrated.
//!
//! # Layout
//!
//! `format` checks, creates and opens the file and builds the key index from the log;
//! `snapshot` writes, checks and loads the key index's snapshot;
//! `read` is the read path (one record, or a walk of the whole log); `write` the tables of
//! one write transaction (records, expiry entries, the token counter and the meta keys);
//! `reap` the reaper's passes over the expiry index; `scan` splits the passes over the
//! whole log at open across threads; `progress` the events that report the long steps of an open. The tables and the meta keys are named here, once.

mod batch;
mod format;
mod progress;
mod read;
mod reap;
mod scan;
mod snapshot;
mod write;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use redb::{Database, ReadableTable, TableDefinition, TableError};

use crate::error::{Error, Result};
use crate::index::Index;
use crate::record::{Record, split_entry};
use crate::redb_file::FileIdentity;
use crate::timeline::{Corrections, StoreClock};

pub(crate) use batch::RedbWriter;
#[cfg(feature = "test-backend")]
pub(crate) use format::open_backend;
pub(crate) use format::{initialize, open_file, open_memory, open_read_only};
pub(crate) use read::ReadOnlyFile;
#[cfg(test)]
use reap::ReapPass;
pub(crate) use snapshot::IndexSource;
pub(crate) use write::{WriteTables, begin_write};

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
/// The key index snapshot's header ([`snapshot`]).
const SNAPSHOT_KEY: &str = "index_snapshot";
/// The latest time again, written with it by builds that keep the snapshot up to date.
const TIME_MARK_KEY: &str = "latest_time_mark";
/// The file format version this build writes.
pub(crate) const FORMAT_VERSION: u32 = 4;
/// The oldest format version this build opens. Version 3 differs from 4 only in that its
/// in-flight records have no room after them (record codec version 3 is new in format 4); a
/// read-write open marks a version 3 file as version 4 before it writes anything else, a
/// read-only open leaves it as it is.
pub(crate) const OLDEST_FORMAT_VERSION: u32 = 3;

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
    /// Whether the database outlives the store (a file or a backend, not memory): only then
    /// is the key index's snapshot written.
    persistent: bool,
    /// The end of the snapshot in the file (0: none): deletions below it are counted.
    snapshot_floor: AtomicU64,
    /// The index's generation the snapshot in the file was written or loaded at.
    snapshot_generation: Mutex<Option<u64>>,
    /// How the key index was built at open.
    #[cfg_attr(not(test), allow(dead_code))]
    pub index_source: IndexSource,
    /// The response length an in-flight record reserves room for ([`WriteTables::put`]).
    /// Only the committer changes it.
    response_hint: ResponseHint,
    /// Set when a commit failed or the engine panicked while writing: the file's state is
    /// unknown, so nothing more is written into it (no batch, no snapshot, not the close's
    /// commit) until the store is reopened.
    poisoned: AtomicBool,
}

impl Stored {
    /// Whether the database outlives the store (a file or a backend): only then is the key
    /// index's snapshot written.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Refuses every later write into the file, until the store is reopened.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Whether [`Stored::poison`] was called.
    pub fn poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// The length of the responses completed lately, as room for the next in-flight records.
///
/// A claim's log entry is written first without a response and rewritten in place when the
/// request completes. If it grew then, and its B-tree leaf had no space left, the storage
/// engine would split the leaf into two half-full ones; and the leaves left of the log's
/// newest never receive another entry, so the log would end up about half empty (pages the
/// open's checks read and the file keeps). Reserving room for the response at the claim
/// keeps the entry's size, and the leaves full.
///
/// The hint is a slowly decaying maximum of the completed responses' lengths: it rises at
/// once to a longer response (room too short splits a leaf; room too long only leaves a gap
/// in it) and falls by 1/64 (at least a byte) per shorter one. Room is capped at
/// [`ResponseHint::MAX_ROOM`]: a larger response would fill most of a page anyway.
#[derive(Debug, Default)]
pub(crate) struct ResponseHint(AtomicUsize);

impl ResponseHint {
    /// The most room an in-flight record reserves (bytes).
    pub const MAX_ROOM: usize = 1024;

    /// The room for `record` (0 unless it is in flight).
    pub fn room(&self, record: &Record) -> usize {
        record
            .room_for(self.0.load(Ordering::Relaxed))
            .min(Self::MAX_ROOM)
    }

    /// Notes a completed response of `len` bytes.
    pub fn completed(&self, len: usize) {
        let hint = self.0.load(Ordering::Relaxed);
        self.0
            .store(len.max(hint - hint.div_ceil(64)), Ordering::Relaxed);
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

#[cfg(test)]
mod tests;
