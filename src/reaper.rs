//! The background reaper: a named thread that deletes dead records every `reap_interval`,
//! in batches of [`REAP_BATCH`] index entries, each its own write transaction (submitted
//! through the committer, so foreground writes interleave between batches).
//!
//! It holds no handle to the store itself, only a [`Submitter`] and the counters, so it never
//! keeps a store alive; [`Reaper::stop`] wakes it, waits for the batch under way (if any) and
//! joins it.

use std::sync::Arc;
use std::time::Duration;

use crate::committer::Submitter;
use crate::error::Result;
use crate::periodic::Periodic;
use crate::stats::{StatsCells, bump};

/// Index entries visited per reaping transaction.
pub(crate) const REAP_BATCH: usize = 256;

/// Runs reaping transactions until no dead record is left; returns how many were deleted.
/// `keep_going` is asked before each batch.
pub(crate) fn reap_all(
    submitter: &Submitter,
    stats: &StatsCells,
    mut keep_going: impl FnMut() -> bool,
) -> Result<u64> {
    let started = std::time::Instant::now();
    let mut total = 0;
    let mut batches = 0u64;
    while keep_going() {
        let pass = submitter.reap(REAP_BATCH)?;
        bump(&stats.reaped, pass.deleted);
        total += pass.deleted;
        batches += 1;
        if !pass.more {
            break;
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if total > 0 {
        tracing::info!(deleted = total, batches, elapsed_ms, "reaper pass");
    } else {
        tracing::debug!(deleted = total, batches, elapsed_ms, "reaper pass");
    }
    Ok(total)
}

/// Handle of the reaper thread; stopping it (or dropping the handle) joins the thread.
pub(crate) struct Reaper(Periodic);

impl Reaper {
    /// Starts the thread.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage) if the thread cannot be spawned.
    pub fn spawn(
        interval: Duration,
        submitter: Submitter,
        stats: Arc<StatsCells>,
    ) -> Result<Reaper> {
        Periodic::spawn(
            "idemstore-reaper",
            "the reaper thread",
            interval,
            move |keep_going| {
                if let Err(e) = reap_all(&submitter, &stats, || keep_going.now()) {
                    bump(&stats.reap_errors, 1);
                    tracing::error!(error = %e, "reaper pass failed; it retries at the next interval");
                }
            },
        )
        .map(Reaper)
    }

    /// Stops the thread (within one batch) and joins it.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}
