//! Progress of the long steps of an open, as `tracing` events at info level: the check of
//! every page of the file, and the pass over the log that verifies every entry's checksum.
//! Both read the whole file, so on a large store they take seconds (about 11 s for ten
//! million records); the events say what the open is doing meanwhile and what each step
//! cost.

use std::time::Instant;

/// Log entries between two progress events of a pass over the log.
pub(super) const ENTRIES_PER_EVENT: u64 = 1 << 20;

/// Counts the entries of a pass over the log at open and reports every
/// [`ENTRIES_PER_EVENT`] of them.
pub(super) struct LogPass {
    /// What the pass is for, for the events.
    pass: &'static str,
    /// Entries in the log (the events' `of`).
    total: u64,
    done: u64,
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
            done: 0,
            every,
            started: Instant::now(),
        }
    }

    /// One more entry verified. Returns whether that was reported.
    pub fn step(&mut self) -> bool {
        self.done += 1;
        if !self.done.is_multiple_of(self.every) {
            return false;
        }
        tracing::info!(
            pass = self.pass,
            entries = self.done,
            of = self.total,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "opening the store: log entries verified so far"
        );
        true
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
        let mut pass = LogPass::every("test", 10, 4);
        let reported: Vec<bool> = (0..10).map(|_| pass.step()).collect();
        assert_eq!(
            reported,
            [
                false, false, false, true, false, false, false, true, false, false
            ]
        );
    }

    #[test]
    fn a_pass_of_the_default_interval_is_quiet_below_it() {
        let mut pass = LogPass::new("test", 1000);
        assert!((0..1000).all(|_| !pass.step()));
    }
}
