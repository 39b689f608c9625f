//! Progress of the long steps of an open, as `tracing` events at info level: the check of
//! every page of the file, and the pass over the log that verifies every entry's checksum.
//! Both read the whole file, so on a large store they take seconds (about 11 s for ten
//! million records); the events say what the open is doing meanwhile and what each step
//! cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Log entries between two progress events of a pass over the log.
pub(super) const ENTRIES_PER_EVENT: u64 = 1 << 20;

/// Entries a [`Tally`] counts before it adds them to its pass (the threads of a pass do not
/// touch one counter for every entry).
const TALLY_BATCH: u64 = 1 << 10;

/// Counts the entries of a pass over the log at open, read by one thread or several, and
/// reports every [`ENTRIES_PER_EVENT`] of them.
pub(super) struct LogPass {
    /// What the pass is for, for the events.
    pass: &'static str,
    /// Entries in the log (the events' `of`).
    total: u64,
    done: AtomicU64,
    every: u64,
    started: Instant,
}

impl LogPass {
    /// A pass over a log of `total` entries.
    pub fn new(pass: &'static str, total: u64) -> LogPass {
        LogPass::every(pass, total, ENTRIES_PER_EVENT)
    }

    fn every(pass: &'static str, total: u64, every: u64) -> LogPass {
        LogPass {
            pass,
            total,
            done: AtomicU64::new(0),
            every,
            started: Instant::now(),
        }
    }

    /// A counter of one thread's entries.
    pub fn tally(&self) -> Tally<'_> {
        Tally {
            pass: self,
            counted: 0,
        }
    }

    /// `n` more entries verified. Returns whether the total passed a multiple of the
    /// reporting interval, and so was reported.
    fn add(&self, n: u64) -> bool {
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if after / self.every == before / self.every {
            return false;
        }
        tracing::info!(
            pass = self.pass,
            entries = after,
            of = self.total,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "opening the store: log entries verified so far"
        );
        true
    }
}

/// One thread's count of a [`LogPass`]'s entries, added to the pass in batches and when it
/// is dropped.
pub(super) struct Tally<'p> {
    pass: &'p LogPass,
    counted: u64,
}

impl Tally<'_> {
    /// One more entry verified.
    pub fn step(&mut self) {
        self.counted += 1;
        if self.counted == TALLY_BATCH {
            self.pass.add(self.counted);
            self.counted = 0;
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if self.counted > 0 {
            self.pass.add(self.counted);
        }
    }
}

/// The check of every page of an existing file, which the storage engine makes as it opens
/// the file: an event before it, and one with its time after.
pub(super) struct PageCheck {
    bytes: u64,
    started: Instant,
}

impl PageCheck {
    /// Reports the start of the check of a file of `bytes` bytes; `recovering` when the
    /// file was not closed cleanly and the engine repairs it first.
    pub fn start(path: &std::path::Path, bytes: u64, recovering: bool) -> PageCheck {
        tracing::info!(
            path = %path.display(),
            bytes,
            recovering,
            "opening the store: checking every page of the file (this reads all of it)"
        );
        PageCheck {
            bytes,
            started: Instant::now(),
        }
    }

    /// Reports the end of the check.
    pub fn done(self) {
        tracing::info!(
            bytes = self.bytes,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "opening the store: every page of the file checked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_reports_every_so_many_entries_and_not_between() {
        let pass = LogPass::every("test", 10, 4);
        let reported: Vec<bool> = (0..10).map(|_| pass.add(1)).collect();
        assert_eq!(
            reported,
            [
                false, false, false, true, false, false, false, true, false, false
            ]
        );
        // A batch that passes a multiple is reported (10 + 5 passes 12); one that ends
        // short of the next is not (15 + 1 = 16 is the next).
        assert!(pass.add(5));
        assert!(!pass.add(0));
        assert!(pass.add(1));
    }

    #[test]
    fn tallies_of_several_threads_add_up_when_dropped() {
        let pass = LogPass::every("test", 0, u64::MAX);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let mut tally = pass.tally();
                    (0..TALLY_BATCH * 2 + 7).for_each(|_| tally.step());
                });
            }
        });
        assert_eq!(pass.done.load(Ordering::Relaxed), 3 * (TALLY_BATCH * 2 + 7));
    }

    #[test]
    fn a_pass_of_the_default_interval_is_quiet_below_it() {
        let pass = LogPass::new("test", 1000);
        assert!((0..1000).all(|_| !pass.add(1)));
    }
}
