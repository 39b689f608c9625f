//! redb's side of the committer: one write transaction per batch, with the store's time,
//! clock corrections, the key index and the file check around it.

use std::cell::Cell;
use std::sync::Arc;

use super::*;
use crate::committer::{self, BatchWriter, Command, Reaped, Tables};
use crate::config::{Durability, Settings};

/// How far the store's time may move before a batch persists it (nanoseconds). The store's
/// clock never goes below the persisted time after a reopen; a clean close persists the
/// exact time, a crash may lose up to this much of it.
const NOTE_TIME_EVERY: u64 = 1_000_000_000;

/// Writes the committer's batches into the store's redb file.
pub(crate) struct RedbWriter {
    stored: Arc<Stored>,
    settings: Settings,
    /// The latest time persisted by a batch (nanoseconds).
    noted_time: Cell<u64>,
}

impl RedbWriter {
    pub fn new(stored: Arc<Stored>, settings: Settings) -> RedbWriter {
        RedbWriter {
            stored,
            settings,
            noted_time: Cell::new(0),
        }
    }

    fn poison(&self) {
        self.stored.poison();
    }

    /// Applies every command in one transaction and commits; each command keeps its own
    /// result. `Err` fails the whole batch.
    fn write_unguarded(&self, batch: &mut [Command]) -> Result<bool> {
        let txn = begin_write(&self.stored.db, self.settings.durability)?;
        let stamp = match self.stored.timeline.now() {
            Ok(stamp) => stamp,
            // A clock reading the store cannot represent: nothing is written, every
            // command of the batch gets the error (the store is not poisoned).
            Err(e) => {
                for command in batch.iter_mut() {
                    command.answer_without_writing(&e);
                }
                return Ok(false);
            }
        };
        let now = stamp.at;
        let note_time = |saved: &Option<_>| {
            saved.is_some() || now >= self.noted_time.get().saturating_add(NOTE_TIME_EVERY)
        };
        let (changes, saved, resweep) = {
            let mut tables = WriteTables::open(&txn, &self.stored, stamp)?;
            // Before any record of a new clock epoch: the correction that began it.
            let saved = self.save_corrections(&mut tables)?;
            for command in batch.iter_mut() {
                committer::apply(&mut tables, command, now, &self.settings)?;
            }
            if note_time(&saved) {
                tables.note_time(now)?;
            }
            let (changes, resweep) = tables.into_published();
            (changes, saved, resweep)
        };
        if let Err(e) = txn.commit() {
            self.poison();
            // The committer's target, like every event of a failed write (the engine behind it
            // is an implementation detail a log filter should not depend on).
            tracing::error!(
                target: "idemstore::committer",
                error = %e,
                "commit failed (outcome unknown); the store is poisoned and refuses writes until it is reopened"
            );
            return Err(Error::write_failed("committing a write", e));
        }
        // Published only now: readers never see an entry that is not committed, and a batch
        // that failed before its commit leaves the re-filing where it was.
        self.stored.index.apply(&changes);
        self.resweep_saved(resweep);
        // The commit went into the file the store opened: unless its path still names that
        // file, no one will open this write again.
        if let Some(file) = &self.stored.file
            && let Err(e) = file.check()
        {
            self.poison();
            return Err(e);
        }
        if note_time(&saved) {
            self.noted_time.set(now);
        }
        self.corrections_saved(saved);
        Ok(true)
    }

    /// Writes the clock corrections not persisted yet, and where the reaper's re-filing of
    /// the records they move back starts. Returns how many corrections are then persisted
    /// (`None` when there was nothing to write), for [`RedbWriter::corrections_saved`] once
    /// the transaction committed.
    fn save_corrections(&self, tables: &mut WriteTables<'_>) -> Result<Option<usize>> {
        let Some((corrections, saved)) = self.stored.timeline.unsaved() else {
            return Ok(None);
        };
        let from = match (tables.resweep_from(), corrections.resweep_from(saved)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The reap operations of this same batch start re-filing at once (they read the
        // position through the same tables).
        tables.save_corrections(&corrections, from)?;
        Ok(Some(corrections.len()))
    }

    /// Publishes, after the commit, where the re-filing of expiry entries now starts.
    fn resweep_saved(&self, resweep: Option<Option<u64>>) {
        if let Some(from) = resweep {
            *self.stored.resweep_from.lock() = from;
        }
    }

    /// Notes, after the commit, what [`RedbWriter::save_corrections`] persisted.
    fn corrections_saved(&self, saved: Option<usize>) {
        if let Some(count) = saved {
            self.stored.timeline.mark_saved(count);
        }
    }
}

impl BatchWriter for RedbWriter {
    /// [`RedbWriter::write_unguarded`], guarded: the storage engine can panic on a damaged
    /// page. A panic fails the batch with [`Error::Corrupt`] and poisons the store, as a
    /// failed commit does (the outcome is unknown).
    fn write(&self, batch: &mut [Command]) -> Result<bool> {
        catch_unwind(AssertUnwindSafe(|| self.write_unguarded(batch))).unwrap_or_else(|_| {
            self.poison();
            Err(Error::corrupt(
                "the storage engine failed while writing (damaged file); the store refuses \
                 writes until it is reopened",
            ))
        })
    }

    fn refusal(&self) -> Option<Error> {
        self.stored.poisoned().then_some(Error::Poisoned)
    }

    /// On a clean close: one last durable commit that records the latest time seen (so a
    /// reopened store's clock starts there) and, under `Durability::None`, makes everything
    /// committed before durable.
    fn close(&self) {
        if self.stored.poisoned() {
            return;
        }
        let Ok(stamp) = self.stored.timeline.now() else {
            return;
        };
        // Guarded like every write: the engine can panic on a damaged page.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let Ok(txn) = begin_write(&self.stored.db, Durability::Immediate) else {
                return;
            };
            let noted = WriteTables::open(&txn, &self.stored, stamp).and_then(|mut t| {
                let saved = self.save_corrections(&mut t)?;
                t.note_time(stamp.at)?;
                Ok((saved, t.into_published().1))
            });
            if let Ok((saved, resweep)) = noted
                && txn.commit().is_ok()
            {
                self.resweep_saved(resweep);
                self.corrections_saved(saved);
            }
        }));
    }
}

impl Tables for WriteTables<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Record>> {
        WriteTables::get(self, key)
    }

    fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        WriteTables::put(self, key, record)
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        WriteTables::delete(self, key)
    }

    fn next_token(&mut self) -> Result<u64> {
        WriteTables::next_token(self)
    }

    /// After a clock correction, first re-files the expiry entries of records it moved back,
    /// a bounded step per pass, until the index is done; the ones due now are then deleted
    /// by this same pass.
    fn reap(&mut self, now: u64, limit: usize) -> Result<Reaped> {
        let resweeping = match self.resweep_from() {
            Some(from) => self.resweep(from, limit)?.is_some(),
            None => false,
        };
        let pass = WriteTables::reap(self, now, limit)?;
        Ok(Reaped {
            deleted: pass.deleted,
            more: pass.more || resweeping,
        })
    }
}
