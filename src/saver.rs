//! The key index's saver: a named thread that writes a snapshot of the key index into the
//! store's file from time to time, so that an open after a crash replays only the log written
//! since ([`crate::storage`] has the snapshot and its checks). A clean close writes one too,
//! on this thread as its last job once the committer has stopped ([`Saver::finish`]).
//!
//! Why on this thread: a snapshot passes the whole index through the storage engine's page
//! cache, and the cache's page buffers are allocated by the thread that writes them. With
//! glibc's allocator each thread allocates from an arena of its own and keeps what it freed
//! there, so a snapshot written on one more thread (the one that closes the store) left one
//! more page cache's worth of memory resident: at four million records the writing process
//! peaked 31 MiB higher at its close than before it (measured; BENCHMARKS.md).
//!
//! Every [`CHECK_EVERY`] it looks at how much the index changed since the last snapshot, and
//! writes one when that is at least [`MIN_CHANGES`] and an eighth of the index: a snapshot
//! costs a write of the whole index (12 bytes a slot), so it is written about as often as
//! the log grows by an eighth, and a replay after a crash reads at most about that much of
//! the log (plus what [`CHECK_EVERY`] adds).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Durability;
use crate::error::Result;
use crate::periodic::Periodic;
use crate::storage::Stored;

/// How often the saver looks at the index.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// Changes of the index below which no snapshot is written: replaying that much of the log
/// costs well under a second.
const MIN_CHANGES: u64 = 200_000;

/// Entries below which a close writes no snapshot into a file that has none: the rebuild of
/// so small an index costs less than the commit that would save it.
const MIN_ENTRIES: usize = 1024;

/// Whether a snapshot is due for an index of `len` entries, changed `changes` times since the
/// last snapshot (`None`: the file holds none).
pub(crate) fn due(len: usize, changes: Option<u64>) -> bool {
    let changes = changes.unwrap_or(len as u64);
    changes >= MIN_CHANGES.max(len as u64 / 8)
}

/// Handle of the saver thread; finishing it (or dropping the handle) joins the thread.
pub(crate) struct Saver(Periodic);

impl Saver {
    /// Starts the thread.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage) if the thread cannot be spawned.
    pub fn spawn(stored: Arc<Stored>) -> Result<Saver> {
        Periodic::spawn(
            "idemstore-index-saver",
            "the key index's saver thread",
            CHECK_EVERY,
            move |_| {
                if due(stored.index.len(), stored.changes_since_snapshot()) {
                    save(&stored, Durability::Immediate, "from time to time");
                }
            },
        )
        .map(Saver)
    }

    /// At a clean close, once nothing writes any more: has the thread write the close's
    /// snapshot ([`save_at_close`]) after the snapshot under way, if any, and joins it. If the
    /// thread had ended before (its job panicked), the snapshot is written on this thread.
    pub fn finish(&mut self, stored: &Arc<Stored>) {
        let on_thread = Arc::clone(stored);
        if let Some(unrun) = self.0.stop_after(move || save_at_close(&on_thread)) {
            unrun();
        }
    }
}

/// The snapshot a clean close writes, once nothing writes any more: unless the file's
/// snapshot is of this very index, so the next open loads it instead of rebuilding the index
/// (a small index with no snapshot in the file is rebuilt faster than it is saved).
pub(crate) fn save_at_close(stored: &Stored) {
    let changes = stored.changes_since_snapshot();
    if stored.persistent()
        && changes != Some(0)
        && (changes.is_some() || stored.index.len() >= MIN_ENTRIES)
    {
        save(stored, Durability::Immediate, "at close");
    }
}

/// Writes a snapshot of the key index, logging what it cost; a failure is logged (the next
/// open rebuilds the index, or replays more of the log).
pub(crate) fn save(stored: &Stored, durability: Durability, when: &str) {
    match stored.save_index(durability) {
        Ok(Some(saved)) => tracing::debug!(
            when,
            entries = saved.entries,
            bytes = saved.bytes,
            elapsed_ms = saved.took.as_millis() as u64,
            "key index snapshot written"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            when,
            error = %e,
            "writing the key index's snapshot failed; the next open replays more of the log, \
             or rebuilds the index from it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_after_an_eighth_of_the_index_changed() {
        assert!(!due(0, None));
        assert!(!due(1_000, None));
        assert!(due(200_000, None));
        assert!(!due(200_000, Some(0)));
        assert!(!due(10_000_000, Some(1_000_000)));
        assert!(due(10_000_000, Some(1_250_000)));
        assert!(due(1_000, Some(200_000)));
    }
}
