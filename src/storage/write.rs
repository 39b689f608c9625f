//! The store's tables inside one write transaction: records and their expiry entries, the
//! fencing-token counter, and the meta keys a batch updates.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Table, WriteTransaction};

use super::read::{Located, lookup_located};
use super::*;
use crate::config::Durability;
use crate::index::Change;
use crate::record::{State, entry_len, write_entry};
use crate::timeline::Stamp;

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

/// The store's tables, opened inside one write transaction, with the index changes the
/// transaction made so far (published by the committer once it committed).
pub(crate) struct WriteTables<'t> {
    pub(super) log: Table<'t, u64, &'static [u8]>,
    pub(super) deaths: Table<'t, (u64, u64), ()>,
    /// Opened on first use: most operations (all but a claim's token) do not touch it.
    pub(super) meta: Option<Table<'t, &'static str, &'static [u8]>>,
    pub(super) txn: &'t WriteTransaction,
    pub(super) stored: &'t Stored,
    /// When this transaction writes (every record it writes is stamped with it).
    pub(super) stamp: Stamp,
    pub(super) corrections: Arc<Corrections>,
    pub(super) last_token: Option<u64>,
    /// Where each key touched by this transaction lives now (`None`: absent).
    pub(super) located: HashMap<Vec<u8>, Option<Located>>,
    pub(super) changes: Vec<Change>,
    /// Where the reaper's re-filing starts as of this transaction, when it changed it
    /// (published to [`Stored`] only once the transaction committed).
    pub(super) resweep: Option<Option<u64>>,
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
            resweep: None,
        })
    }

    pub(super) fn meta(&mut self) -> Result<&mut Table<'t, &'static str, &'static [u8]>> {
        let meta = match self.meta.take() {
            Some(meta) => meta,
            None => self.txn.open_table(META).map_err(table_error)?,
        };
        Ok(self.meta.insert(meta))
    }

    /// The index changes of this transaction, to publish once it committed.
    /// What the transaction changed that the store publishes once it committed: the key
    /// index's changes, and the re-filing position when it moved (`None`: unchanged).
    pub fn into_published(self) -> (Vec<Change>, Option<Option<u64>>) {
        (self.changes, self.resweep)
    }

    /// Where the reaper's re-filing of expiry entries starts, as of this transaction
    /// (`None`: nothing to re-file).
    pub(super) fn resweep_from(&self) -> Option<u64> {
        self.resweep
            .unwrap_or_else(|| *self.stored.resweep_from.lock())
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
    /// the death time changed); a new key gets an entry appended at the log's end. An
    /// in-flight record is followed by room for its response ([`ResponseHint`]).
    ///
    /// In place rather than appended again: the key's old entry has to be touched anyway (to
    /// delete it), so rewriting it dirties no more pages, and saves the append. The entry is
    /// encoded straight into the space the storage engine reserved for it: a response is
    /// copied once, into the page that stores it.
    pub fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        let located = self.locate(key)?;
        let seq = match &located {
            Some(l) => l.seq,
            // One number a new key, never wrapping onto the entries at the log's start; the
            // last one is not handed out (the index's end is one above it). Legitimately the
            // numbers are never used up: only a damaged or crafted file gets near the end.
            None => self
                .stored
                .next_seq
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    (s < u64::MAX).then(|| s + 1)
                })
                .map_err(|_| {
                    Error::corrupt(
                        "the log's sequence numbers are used up (a damaged or crafted file): \
                         no new key can be written",
                    )
                })?,
        };
        let dies_at = record.dies_at();
        let room = self.stored.response_hint.room(record);
        if let State::Completed { response, .. } = &record.state {
            self.stored.response_hint.completed(response.len());
        }
        {
            let mut space = self
                .log
                .insert_reserve(seq, entry_len(key, record, room))
                .map_err(|e| Error::storage("writing a record", e))?;
            write_entry(key, record, self.stamp, room, space.as_mut());
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
        let hash = self.stored.index.hash(key);
        self.journal_deletions(std::iter::once((old.seq, hash)))?;
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
    /// Also writes it as the time mark the key index's snapshot checks.
    pub fn note_time(&mut self, now: u64) -> Result<()> {
        let meta = self.meta()?;
        for key in [TIME_KEY, TIME_MARK_KEY] {
            meta.insert(key, now.to_be_bytes().as_slice())
                .map_err(|e| Error::storage("writing the latest time", e))?;
        }
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

    /// Persists where the re-filing starts; the store follows once the transaction commits.
    pub(super) fn set_resweep(&mut self, from: Option<u64>) -> Result<()> {
        self.resweep = Some(from);
        let meta = self.meta()?;
        match from {
            Some(at) => meta
                .insert(RESWEEP_KEY, at.to_be_bytes().as_slice())
                .map(|_| ()),
            None => meta.remove(RESWEEP_KEY).map(|_| ()),
        }
        .map_err(|e| Error::storage("writing the re-filing position", e))
    }
}
