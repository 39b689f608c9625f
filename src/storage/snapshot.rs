//! The key index's snapshot: written into the store's file at a clean close and from time
//! to time while the store runs, loaded at open in place of a scan of the whole log.
//!
//! # What it holds, and why it can be trusted
//!
//! The snapshot is the index's table as it was in the transaction that wrote it
//! ([`crate::index`]: its hash keys, its slots), written only when the index is exactly the
//! log's then (as many entries, none at or above `seq_end`), and `seq_end`, one above every
//! sequence number in it. The log only ever changes in three ways after that: a new key's
//! entry is appended at a sequence number at or above `seq_end` (sequence numbers are taken in
//! order, and every open starts them at `seq_end` at least); an entry is rewritten in place,
//! for the same key; an entry is deleted, and journaled (below). So the snapshot, less the
//! journaled deletions, plus the log entries from `seq_end` on, is exactly the log's index.
//!
//! That holds only if every writer since the snapshot kept those rules. Three marks check it
//! at open; when one fails (or the snapshot's checksum does), the snapshot is removed and the
//! index is rebuilt from the whole log:
//!
//! * the number of entries: the snapshot records how many log entries were below `seq_end`
//!   when it was written, and every deletion below `seq_end` since is journaled (sequence
//!   number and key hash, in the transaction that deletes it; the open removes them from the
//!   loaded index, so it is exact again). At open, the entries below `seq_end` must number
//!   that, minus the journaled deletions. An entry added below `seq_end` by a writer that
//!   does not know these rules (an older build of idemstore) breaks the count.
//! * the time mark: every write of the latest time by this build writes the same value under
//!   a second key. An older build writes the time at its first commit without the mark.
//! * the digest of the entries below `seq_end` ([`crate::index::entry_digest`], each key's
//!   hash tag and sequence number): the snapshot's slots, less the journaled deletions, must
//!   give the digest of the log's entries. An entry moved to another free sequence number
//!   below `seq_end`, or rewritten in place under another key (a hand-edited file), keeps
//!   the count and breaks the digest.
//!
//! The open still reads every log entry, verifies its checksum (a damaged entry is
//! [`Error::Corrupt`] at open, naming its position, as with a rebuild) and hashes its key,
//! and checks that no entry from `seq_end` on holds a key the index already has; what the
//! snapshot saves is building the table (an insertion at a random place of it per key).
//!
//! Damage to the snapshot's pages is caught by the storage engine's integrity check at open
//! like damage to any page; the snapshot's own CRC-32 catches a snapshot that does not
//! match its header (a bug, a hand-edited file). Neither detects a deliberately forged
//! snapshot: a crafted file can hold any index, as it can hold any log.
//!
//! # Layout
//!
//! The header is the meta table's `"index_snapshot"` value ([`Header`]); the slots are in the
//! table `idemstore_index_snapshot`, [`SLOT_BYTES`] bytes each, segment by segment, each
//! segment's slots cut into pieces of at most [`PIECE_BYTES`]: key `segment << 32 | piece`.
//! (The storage engine stores a value longer than a page in a run of pages whose number is a
//! power of two: a whole segment, some 150 KB at ten million records, took 256 KiB, and the
//! snapshot 1.8 times its size. Layout 1 of the header, written by earlier builds, has one
//! value per segment, keyed by the segment number; it is read as well.) The deletions since
//! are in `idemstore_index_deleted`, sequence number → key hash.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::progress::LogPass;
use super::scan;
use super::*;
use crate::config::Durability;
use crate::index::{Change, Loader, SLOT_BYTES, Shape, entry_digest};

/// The snapshot's slots: chunk number → slots.
const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("idemstore_index_snapshot");
/// Log entries below the snapshot's end deleted since it was written: sequence number → hash.
const DELETIONS: TableDefinition<u64, u64> = TableDefinition::new("idemstore_index_deleted");
/// The header's layout version this build writes: 2, each segment in pieces.
const LAYOUT: u32 = 2;
/// The layout of earlier builds: one value per segment, keyed by the segment number.
const LAYOUT_WHOLE_SEGMENTS: u32 = 1;
/// The most slot bytes in one value of the slots table: whole slots, and with the engine's
/// leaf header and key, within four pages.
#[cfg(not(test))]
pub(super) const PIECE_BYTES: usize = (16 * 1024 - 128) / SLOT_BYTES * SLOT_BYTES;
/// Two slots in the unit tests, so that their small indexes have segments of several pieces.
#[cfg(test)]
pub(super) const PIECE_BYTES: usize = 2 * SLOT_BYTES;
/// Encoded header length.
const HEADER_LEN: usize = 4 + 9 * 8 + 4;

/// The snapshot's header, in the meta table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    shape: Shape,
    /// Log entries below `shape.seq_end` when the snapshot was written.
    below: u64,
    /// Above every fencing token in the log when the snapshot was written.
    token_floor: u64,
    /// Values in the slots table.
    chunks: u64,
    /// CRC-32 of the other fields and of every chunk, in order.
    crc: u32,
    /// How the slots are keyed: [`LAYOUT`] or [`LAYOUT_WHOLE_SEGMENTS`].
    layout: u32,
}

impl Header {
    fn fields(&self) -> [u64; 9] {
        let s = &self.shape;
        [
            s.keys.0,
            s.keys.1,
            s.capacity,
            s.len,
            s.seq_end,
            self.below,
            self.token_floor,
            self.chunks,
            0,
        ]
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN);
        v.extend_from_slice(&self.layout.to_be_bytes());
        for f in self.fields() {
            v.extend_from_slice(&f.to_be_bytes());
        }
        v.extend_from_slice(&self.crc.to_be_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Option<Header> {
        let layout = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        if bytes.len() != HEADER_LEN || ![LAYOUT, LAYOUT_WHOLE_SEGMENTS].contains(&layout) {
            return None;
        }
        let f = |i: usize| {
            let at = 4 + 8 * i;
            u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
        };
        let crc = u32::from_be_bytes(bytes[HEADER_LEN - 4..].try_into().expect("4 bytes"));
        Some(Header {
            shape: Shape {
                keys: (f(0), f(1)),
                capacity: f(2),
                len: f(3),
                seq_end: f(4),
                generation: 0,
            },
            below: f(5),
            token_floor: f(6),
            chunks: f(7),
            crc,
            layout,
        })
    }

    /// The segment and the piece of it a key of the slots table names.
    fn piece(&self, key: u64) -> (u64, u64) {
        if self.layout == LAYOUT_WHOLE_SEGMENTS {
            (key, 0)
        } else {
            (key >> 32, key & u64::from(u32::MAX))
        }
    }

    /// A CRC-32 hasher fed with the fields the checksum covers, before the chunks.
    fn crc_start(&self) -> crc32fast::Hasher {
        let mut crc = crc32fast::Hasher::new();
        for f in self.fields() {
            crc.update(&f.to_be_bytes());
        }
        crc
    }
}

/// How the key index came to be at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexSource {
    /// Loaded from the snapshot, plus `tail` log entries written after it.
    Snapshot { tail: u64 },
    /// Built by a scan of the whole log: there was no snapshot, or (`rejected`) the one there
    /// failed a check and was removed.
    Rebuilt { rejected: Option<String> },
}

/// What [`load`] found.
pub(super) enum Loaded {
    /// No snapshot in the file.
    Absent,
    /// A snapshot that failed a check (why).
    Rejected(String),
    /// The index, with what the log scan would have found.
    Index {
        /// The index: the snapshot's, less the journaled deletions, plus the tail.
        index: Index,
        /// The next sequence number to take.
        next_seq: u64,
        /// Above every fencing token in the log.
        highest_token: u64,
        /// Log entries from `seq_end` on (indexed on top of the snapshot).
        tail: u64,
        /// The snapshot's end.
        seq_end: u64,
        /// How long reading the snapshot took, and then the pass over the log.
        took: (Duration, Duration),
    },
}

/// What one thread's part of the pass over the log at open found.
#[derive(Default)]
struct Part {
    /// The highest fencing token in its entries.
    highest_token: u64,
    /// Its entries below the snapshot's end.
    below: u64,
    /// Their digest ([`entry_digest`]).
    digest: u64,
    /// Its entries from the snapshot's end on: sequence number, key hash, key.
    tail: Vec<(u64, u64, Vec<u8>)>,
}

/// Loads the snapshot and the log entries after it, checking both marks and the checksum.
/// A damaged log entry after the snapshot is [`Error::Corrupt`], as in a rebuild.
pub(super) fn load(db: &Database) -> Result<Loaded> {
    let started = Instant::now();
    let txn = db.begin_read().map_err(engine("starting a read"))?;
    let meta = txn.open_table(META).map_err(table_error)?;
    let Some(header) = meta
        .get(SNAPSHOT_KEY)
        .map_err(|e| Error::storage("reading the meta table", e))?
        .map(|v| Header::decode(v.value()))
    else {
        return Ok(Loaded::Absent);
    };
    let reject = |why: &str| Ok(Loaded::Rejected(why.to_owned()));
    let Some(header) = header else {
        return reject("its header is malformed");
    };
    if read_u64(&meta, TIME_KEY)? != read_u64(&meta, TIME_MARK_KEY)? {
        return reject("the file was written since by a build that does not keep it up to date");
    }
    if header.shape.len != header.below {
        return reject("it holds another number of entries than the log had");
    }
    let chunks = match txn.open_table(CHUNKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return reject("its slots are missing"),
        Err(e) => return Err(table_error(e)),
    };
    let read_error = |e| Error::storage("reading the key index's snapshot", e);
    if chunks.len().map_err(read_error)? != header.chunks {
        return reject("it has another number of chunks than its header says");
    }
    let Some(mut loader) = Loader::new(header.shape) else {
        return reject("its header describes no index");
    };
    let mut crc = header.crc_start();
    // The pieces of one segment, in order, are joined before the segment is loaded.
    let mut segment = Vec::new();
    let mut at: Option<(u64, u64)> = None;
    for item in chunks.iter().map_err(read_error)? {
        let (key, chunk) = item.map_err(read_error)?;
        crc.update(chunk.value());
        let (s, piece) = header.piece(key.value());
        let expected = match at {
            Some((at_s, at_piece)) if at_s == s => (s, at_piece + 1),
            Some((at_s, _)) => {
                if !loader.push(&segment) {
                    return reject("its slots do not match its header");
                }
                segment.clear();
                (at_s + 1, 0)
            }
            None => (0, 0),
        };
        if (s, piece) != expected {
            return reject("its slots do not match its header");
        }
        at = Some((s, piece));
        segment.extend_from_slice(chunk.value());
        // No segment is larger than the whole table (the loader checks it as well; this
        // bounds what a damaged or crafted snapshot makes the open hold).
        if segment.len() as u64 > header.shape.capacity.saturating_mul(SLOT_BYTES as u64) {
            return reject("its slots do not match its header");
        }
    }
    if at.is_some() && !loader.push(&segment) {
        return reject("its slots do not match its header");
    }
    drop(segment);
    if crc.finalize() != header.crc {
        return reject("its checksum does not match");
    }
    let slots_digest = loader.digest();
    let Some(index) = loader.finish() else {
        return reject("its slots do not match its header");
    };

    let loaded = started.elapsed();
    let log = txn.open_table(LOG).map_err(table_error)?;
    let log_error = |e| Error::storage("reading the log to check the key index's snapshot", e);
    let seq_end = header.shape.seq_end;
    let mut changes = Vec::new();
    // The digest of the entries below the snapshot's end that the log should hold: the
    // snapshot's, less the journaled deletions.
    let mut expected_digest = slots_digest;
    match txn.open_table(DELETIONS) {
        Ok(journal) => {
            for item in journal.iter().map_err(log_error)? {
                let (seq, hash) = item.map_err(log_error)?;
                expected_digest =
                    expected_digest.wrapping_sub(entry_digest(hash.value(), seq.value()));
                changes.push(Change {
                    hash: hash.value(),
                    old: Some(seq.value()),
                    new: None,
                });
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(table_error(e)),
    }
    let deleted = changes.len() as u64;
    // Every entry's checksum is verified, as a rebuild does: a damaged entry is reported at
    // open with its position. Only the entries from `seq_end` on are hashed and indexed.
    let pass = LogPass::new(
        "checking the log against the key index's snapshot",
        log.len().map_err(log_error)?,
    );
    let parts = scan::over_log(&log, &pass, log_error, |range, tally| {
        let mut part = Part::default();
        for item in scan::entries(&log, range, log_error)? {
            let (seq, entry) = item?;
            tally.step();
            let at = |e: Error| e.at_log_entry(seq);
            let (key, record) = split_entry(entry.value()).map_err(at)?;
            part.highest_token = part
                .highest_token
                .max(Record::peek_token(record).map_err(at)?);
            if seq < seq_end {
                part.below += 1;
                part.digest = part.digest.wrapping_add(entry_digest(index.hash(key), seq));
            } else {
                part.tail.push((seq, index.hash(key), key.to_vec()));
            }
        }
        Ok(part)
    })?;
    let highest_token = parts
        .iter()
        .map(|p| p.highest_token)
        .fold(header.token_floor, u64::max);
    let below: u64 = parts.iter().map(|p| p.below).sum();
    let below_digest = parts.iter().fold(0u64, |sum, p| sum.wrapping_add(p.digest));
    let mut tail_keys = Vec::new();
    for (seq, hash, key) in parts.into_iter().flat_map(|p| p.tail) {
        changes.push(Change {
            hash,
            old: None,
            new: Some(seq),
        });
        tail_keys.push(key);
    }
    let tail = tail_keys.len() as u64;
    if header.below.checked_sub(deleted) != Some(below) {
        return reject("the log holds another number of entries than it accounts for");
    }
    if below_digest != expected_digest {
        return reject(
            "the log's entries below its end are not the ones it indexes (moved, or rewritten \
             under another key, by another writer)",
        );
    }
    index.apply(&changes);
    // An entry after the snapshot of a key the index already had: two entries of one key (a
    // damaged or crafted file), as a rebuild would find.
    for (change, key) in changes[deleted as usize..].iter().zip(&tail_keys) {
        let seq = change.new.unwrap_or_default();
        for other in index.candidates(change.hash).iter().filter(|&s| s != seq) {
            if let Some(entry) = log.get(other).map_err(log_error)?
                && split_entry(entry.value())
                    .map_err(|e| e.at_log_entry(other))?
                    .0
                    == key.as_slice()
            {
                return Err(Error::corrupt(format!(
                    "log entries {} and {} hold records of one key (a damaged or crafted file)",
                    other.min(seq),
                    other.max(seq)
                )));
            }
        }
    }
    let last = log
        .last()
        .map_err(log_error)?
        .map_or(0, |(seq, _)| seq.value());
    let next_seq = last
        .checked_add(1)
        .ok_or_else(|| Error::corrupt("the log's sequence numbers are exhausted"))?
        .max(seq_end);
    Ok(Loaded::Index {
        index,
        next_seq,
        highest_token,
        tail,
        seq_end,
        took: (loaded, started.elapsed() - loaded),
    })
}

/// Removes a rejected snapshot (durably, before anything else is written): a snapshot that
/// failed a check once is never used.
pub(super) fn remove(db: &Database) -> Result<()> {
    let txn = begin_write(db, Durability::Immediate)?;
    {
        let mut meta = txn.open_table(META).map_err(table_error)?;
        meta.remove(SNAPSHOT_KEY)
            .map_err(|e| Error::storage("removing the key index's snapshot", e))?;
    }
    txn.delete_table(CHUNKS)
        .map_err(|e| Error::storage("removing the key index's snapshot", e))?;
    txn.delete_table(DELETIONS)
        .map_err(|e| Error::storage("removing the key index's snapshot", e))?;
    txn.commit()
        .map_err(|e| Error::storage("removing the key index's snapshot", e))
}

/// What [`Stored::save_index`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Saved {
    /// Entries in the snapshot.
    pub entries: u64,
    /// Bytes of its slots.
    pub bytes: u64,
    /// How long writing it took (its tries included).
    pub took: Duration,
}

impl Stored {
    /// Changes applied to the key index since the snapshot in the file was written or loaded
    /// (`None`: the file holds no snapshot of this index).
    pub fn changes_since_snapshot(&self) -> Option<u64> {
        let at = (*self.snapshot_generation.lock())?;
        Some(self.index.generation().saturating_sub(at))
    }

    /// Writes a snapshot of the key index into the file, in one write transaction of
    /// `durability` (the committer waits for it). Readers go on meanwhile. `None` for a store
    /// without a file.
    ///
    /// A snapshot written without durability becomes durable with the next durable commit;
    /// a crash before that loses it along with everything after the last durable commit, and
    /// the file keeps the snapshot before it, which matches the file's log as well.
    ///
    /// # Errors
    /// [`Error::Storage`] when the write fails (the file keeps its previous snapshot, if
    /// any); [`Error::Corrupt`] if the storage engine panics.
    pub fn save_index(&self, durability: Durability) -> Result<Option<Saved>> {
        if !self.persistent || self.poisoned() {
            return Ok(None);
        }
        let started = Instant::now();
        // A batch that committed but has not published its changes to the index yet leaves
        // the index behind the log: give it a moment to publish. A snapshot is written only
        // of an index exactly in step with the log (never of one that may miss an entry).
        for _ in 0..5 {
            if let Some(saved) = self.try_save_index(durability, started)? {
                return Ok(Some(saved));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!("key index snapshot not written: the index is not in step with the log");
        Ok(None)
    }

    /// One try of [`Stored::save_index`]: `None` (nothing written) when the index is not in
    /// step with the log.
    fn try_save_index(&self, durability: Durability, started: Instant) -> Result<Option<Saved>> {
        guarded("writing the key index's snapshot", || {
            let txn = begin_write(&self.db, durability)?;
            fn write_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
                Error::storage("writing the key index's snapshot", e)
            }
            // The slots are written anew: an older snapshot's keys need not be this one's.
            txn.delete_table(CHUNKS).map_err(write_error)?;
            let written = {
                let log = txn.open_table(LOG).map_err(table_error)?;
                let mut meta = txn.open_table(META).map_err(table_error)?;
                let mut chunks = txn.open_table(CHUNKS).map_err(table_error)?;
                let counter = read_u64(&meta, TOKEN_KEY)?.unwrap_or(0);
                let time = read_u64(&meta, TIME_KEY)?;
                let written = self.index.with_snapshot(|shape, view| {
                    // Under the index's read lock: no batch changes it meanwhile, and none
                    // commits (this transaction holds the file's write lock). In step: no
                    // entry at or above `seq_end` (a batch that committed and has not published
                    // its changes yet, or whose commit failed with an unknown outcome, would
                    // have put its new keys there), and as many entries below it as the index
                    // holds (its deletions would leave stale ones).
                    let tail = log.range(shape.seq_end..).map_err(write_error)?.count() as u64;
                    let below = log.len().map_err(write_error)?.saturating_sub(tail);
                    if tail > 0 || below != shape.len {
                        return Ok(None);
                    }
                    let mut header = Header {
                        shape,
                        below,
                        token_floor: self.tokens_above.max(counter),
                        chunks: 0,
                        crc: 0,
                        layout: LAYOUT,
                    };
                    // Counted first: the checksum starts with the header's fields.
                    header.chunks = (0..view.segments())
                        .map(|c| view.segment_bytes(c).div_ceil(PIECE_BYTES) as u64)
                        .sum();
                    let mut crc = header.crc_start();
                    let mut segment = Vec::new();
                    for c in 0..view.segments() {
                        segment.resize(view.segment_bytes(c), 0);
                        view.write_segment(c, &mut segment);
                        for (piece, bytes) in (0..).zip(segment.chunks(PIECE_BYTES)) {
                            chunks
                                .insert((c as u64) << 32 | piece, bytes)
                                .map_err(write_error)?;
                            crc.update(bytes);
                        }
                    }
                    header.crc = crc.finalize();
                    Ok::<_, Error>(Some((shape, header)))
                })?;
                let Some((shape, header)) = written else {
                    return Ok(None);
                };
                meta.insert(SNAPSHOT_KEY, header.encode().as_slice())
                    .map_err(write_error)?;
                match time {
                    Some(t) => meta.insert(TIME_MARK_KEY, t.to_be_bytes().as_slice()),
                    None => meta.remove(TIME_MARK_KEY),
                }
                .map_err(write_error)?;
                (shape, header)
            };
            let (shape, header) = written;
            txn.delete_table(DELETIONS).map_err(write_error)?;
            // Before the commit, while no batch can write: deletions from here on are
            // journaled against this snapshot. (Should the commit fail, the older snapshot's
            // journal misses those between the two ends, so its count fails: a rebuild,
            // never a wrong index.)
            self.snapshot_floor.store(shape.seq_end, Ordering::Release);
            txn.commit().map_err(write_error)?;
            *self.snapshot_generation.lock() = Some(shape.generation);
            Ok(Some(Saved {
                entries: shape.len,
                bytes: header.shape.capacity * SLOT_BYTES as u64,
                took: started.elapsed(),
            }))
        })
    }
}

impl WriteTables<'_> {
    /// Journals the deleted log entries `(seq, hash)` that are below the snapshot's end.
    pub(super) fn journal_deletions(
        &mut self,
        deleted: impl Iterator<Item = (u64, u64)>,
    ) -> Result<()> {
        let floor = self.stored.snapshot_floor.load(Ordering::Acquire);
        let mut below = deleted.filter(|&(seq, _)| seq < floor).peekable();
        if below.peek().is_none() {
            return Ok(());
        }
        let write_error = |e| Error::storage("journaling a deletion", e);
        let mut journal = self.txn.open_table(DELETIONS).map_err(table_error)?;
        for (seq, hash) in below {
            journal.insert(seq, hash).map_err(write_error)?;
        }
        Ok(())
    }
}
