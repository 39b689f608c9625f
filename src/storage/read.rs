//! The read path: one record through the key index, or a walk of the whole log.

use std::ops::ControlFlow;

use redb::ReadableDatabase;

use super::*;
use crate::timeline::Corrections;

/// Visits every record of `db` in one read transaction (a consistent snapshot), in log
/// order: `visit` gets the encoded key and the record (checksum verified, `corrections`
/// applied) and says whether to go on. Also returns the persisted fencing-token counter of
/// that snapshot. For tools: O(records).
///
/// # Errors
/// [`Error::Corrupt`] for a damaged entry (naming its position; the walk stops there),
/// [`Error::Storage`], or `visit`'s own error.
fn walk_log(
    db: &impl ReadableDatabase,
    corrections: &Corrections,
    mut visit: impl FnMut(&[u8], Record) -> Result<ControlFlow<()>>,
) -> Result<u64> {
    guarded("reading the records", || {
        let txn = db.begin_read().map_err(engine("starting a read"))?;
        let last_token = {
            let meta = txn.open_table(META).map_err(table_error)?;
            read_u64(&meta, TOKEN_KEY)?.unwrap_or(0)
        };
        let log = txn.open_table(LOG).map_err(table_error)?;
        let read_error = |e| Error::storage("reading the records", e);
        for item in log.iter().map_err(read_error)? {
            let (seq, entry) = item.map_err(read_error)?;
            let at = |e: Error| e.at_log_entry(seq.value());
            let (key, bytes) = split_entry(entry.value()).map_err(at)?;
            let record = decode_record(bytes, corrections).map_err(at)?;
            if visit(key, record)?.is_break() {
                break;
            }
        }
        Ok(last_token)
    })
}

/// A store file opened read-only, for tools: nothing is written to it, not even the meta
/// table a read-write open updates. It has no key index, so a lookup walks the log.
pub(crate) struct ReadOnlyFile {
    pub(super) db: redb::ReadOnlyDatabase,
    /// The store's time as a read-write open would start it (never persisted from here).
    pub timeline: StoreClock,
    /// The file's format version, as found (a read-only open never upgrades it).
    pub format_version: u32,
}

impl ReadOnlyFile {
    /// [`walk_log`] on the file.
    ///
    /// # Errors
    /// As [`walk_log`].
    pub fn walk_log(
        &self,
        visit: impl FnMut(&[u8], Record) -> Result<ControlFlow<()>>,
    ) -> Result<u64> {
        walk_log(&self.db, &self.timeline.corrections(), visit)
    }

    /// The record of `key`, found by walking the log (O(records)).
    ///
    /// # Errors
    /// As [`walk_log`].
    pub fn read_record(&self, key: &[u8]) -> Result<Option<Record>> {
        let mut found = None;
        self.walk_log(|k, record| {
            Ok(if k == key {
                found = Some(record);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        Ok(found)
    }
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

    /// Visits every record in one read transaction: [`walk_log`] on the store's database.
    ///
    /// # Errors
    /// As [`walk_log`].
    pub fn walk_log(
        &self,
        visit: impl FnMut(&[u8], Record) -> Result<ControlFlow<()>>,
    ) -> Result<u64> {
        walk_log(&self.db, &self.timeline.corrections(), visit)
    }

    /// The fencing token above which new tokens are granted: at least the highest token of
    /// any record found in the log when the store opened.
    pub(super) fn token_floor(&self) -> u64 {
        self.tokens_above
    }
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
pub(super) fn lookup_located(
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
pub(super) struct Located {
    pub(super) seq: u64,
    /// The death times its expiry entry may be filed under: the stored one, and the one after
    /// clock corrections (the same unless a correction moved the record back; the reaper
    /// re-files such an entry from the first to the second).
    pub(super) filed: [u64; 2],
}

impl Located {
    /// The distinct death times of [`Located::filed`].
    pub(super) fn distinct(&self) -> &[u64] {
        if self.filed[0] == self.filed[1] {
            &self.filed[..1]
        } else {
            &self.filed
        }
    }
}
