//! The store's time: a view of the user's [`Clock`] that absorbs small backward steps and
//! recovers from a clock that was wrong, and the write stamps that make the recovery work.
//!
//! # Small backward steps
//!
//! The store's time never goes backwards by a small step: when the clock reads up to
//! [`TOLERANCE`] (1 s) behind the latest time the store has seen, the store keeps that latest
//! time until the clock catches up. So a record once seen dead stays dead, and no deadline
//! passes before the clock reached it. The latest time is persisted by write batches (at
//! least once a second while writes happen) and on a clean close, and a reopened store starts
//! from it. The store's time therefore runs ahead of the clock by at most the tolerance.
//!
//! # Corrections
//!
//! A clock that reads more than the tolerance behind the latest time is taken to have been
//! wrong before and right now (an RTC set years ahead at boot and then fixed by NTP, a VM
//! restored from a snapshot): a *correction*. The store's time follows the clock from then
//! on, and a new *clock epoch* begins. The correction (the epoch it ended and the corrected
//! time) is persisted before any record of the new epoch, and corrections found at open
//! (the file's latest time far ahead of the clock, say after a process that ran with a wrong
//! clock crashed) are handled the same way.
//!
//! Every record is stamped with the store's time and the epoch it was written in. A record
//! of an ended epoch written more than the tolerance after the correction's time was written
//! by the wrong clock: it is read with all its times moved back by the difference, as if it
//! had been written at the moment of the correction. So after a forward jump of any size is
//! corrected, every lease runs out within one lease duration of the correction and every
//! record dies within one TTL of it, including records written during the glitch, and none
//! expires earlier than it would have under a right clock (the shift never moves a deadline
//! before the correction plus the time that was left on it when it was written).
//!
//! A clock reading before 1970 or from year 2262 on cannot be represented: the call that
//! read it fails with [`Error::Clock`] and the reading is never stored.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::{Error, Result};

/// How far the store's time may run ahead of the clock: backward steps up to this size are
/// absorbed, larger ones are corrections (nanoseconds: 1 s).
pub(crate) const TOLERANCE: u64 = 1_000_000_000;

/// Times from this many nanoseconds since the epoch on (2^63, year 2262) are refused, so
/// that deadlines computed from them do not saturate.
const LATEST_REPRESENTABLE: u64 = 1 << 63;

/// What a clock reading does to the store's latest time ([`step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The reading is at or after the latest time: the store's time moves to it.
    Ahead,
    /// The reading is behind by at most the tolerance: the store keeps its latest time.
    Held,
    /// The reading is behind by more: a corrected clock, which the store's time follows.
    Corrected,
}

/// What the clock reading `read` does to the store's latest time `latest`, when backward
/// steps up to `tolerance` are absorbed (the rule of every engine; [`TOLERANCE`] where the
/// clock is read under the store's lock).
pub(crate) fn step(latest: u64, read: u64, tolerance: u64) -> Step {
    if read >= latest {
        Step::Ahead
    } else if latest - read <= tolerance {
        Step::Held
    } else {
        Step::Corrected
    }
}

/// When a record was written: the store's time then, and the clock epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The store's time, nanoseconds since the Unix epoch.
    pub at: u64,
    /// The clock epoch: how many corrections the store had seen.
    pub epoch: u32,
}

/// One correction: epoch `epoch` ended when the clock was corrected to `to`, while the store's
/// time stood at `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Correction {
    epoch: u32,
    from: u64,
    to: u64,
}

/// The corrections of a store, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Corrections {
    ends: Vec<Correction>,
}

impl Corrections {
    /// The epoch a write made now belongs to.
    pub fn current_epoch(&self) -> u32 {
        self.ends.last().map_or(0, |c| c.epoch.saturating_add(1))
    }

    /// How far back the times of a record written at `stamp` and dying at `dies_at` (as
    /// stored) are to be moved. For each correction after its epoch, in order: a record that
    /// was dead at the store's time before the correction stays dead (it is moved back to die
    /// at the corrected time: a dead record never comes back); otherwise a record stamped more
    /// than the tolerance after the corrected time, written by the clock that ran ahead, is
    /// moved back to it.
    pub fn shift(&self, stamp: Stamp, dies_at: u64) -> u64 {
        let first = self.ends.partition_point(|c| c.epoch < stamp.epoch);
        let (mut at, mut death, mut by) = (stamp.at, dies_at, 0u64);
        for c in &self.ends[first..] {
            let step = if death <= c.from {
                death.saturating_sub(c.to)
            } else if at > c.to.saturating_add(TOLERANCE) {
                at - c.to
            } else {
                0
            };
            by = by.saturating_add(step);
            at = at.saturating_sub(step);
            death = death.saturating_sub(step);
        }
        by
    }

    /// The lowest death time under which a record that a correction after the first `since`
    /// ones moves back can be filed in the expiry index (the reaper re-files those from there
    /// on; below it, records are due anyway).
    pub fn resweep_from(&self, since: usize) -> Option<u64> {
        self.ends[since.min(self.ends.len())..]
            .iter()
            .map(|c| c.to)
            .min()
    }

    /// How many corrections there are.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The persisted form: 20 bytes per correction (`u32` epoch, `u64` store time before,
    /// `u64` corrected time; big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ends.len() * 20);
        for c in &self.ends {
            out.extend_from_slice(&c.epoch.to_be_bytes());
            out.extend_from_slice(&c.from.to_be_bytes());
            out.extend_from_slice(&c.to.to_be_bytes());
        }
        out
    }

    /// Reads the persisted form.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the length is not a multiple of 20 or the epochs do not rise by one.
    pub fn decode(bytes: &[u8]) -> Result<Corrections> {
        let bad = || Error::corrupt("the clock corrections in the meta table are malformed");
        if !bytes.len().is_multiple_of(20) {
            return Err(bad());
        }
        let mut ends: Vec<Correction> = Vec::with_capacity(bytes.len() / 20);
        for chunk in bytes.chunks_exact(20) {
            let word = |i: usize| -> Result<u64> {
                Ok(u64::from_be_bytes(
                    chunk[i..i + 8].try_into().map_err(|_| bad())?,
                ))
            };
            let epoch = u32::from_be_bytes(chunk[..4].try_into().map_err(|_| bad())?);
            if epoch != ends.last().map_or(0, |c| c.epoch.wrapping_add(1)) {
                return Err(bad());
            }
            ends.push(Correction {
                epoch,
                from: word(4)?,
                to: word(12)?,
            });
        }
        Ok(Corrections { ends })
    }

    fn push(&mut self, from: u64, to: u64) {
        let epoch = self.current_epoch();
        self.ends.push(Correction { epoch, from, to });
    }
}

/// Nanoseconds since the Unix epoch of a clock reading.
///
/// # Errors
/// [`Error::Clock`] for a reading before 1970 or from year 2262 on.
pub(crate) fn representable(t: SystemTime) -> Result<u64> {
    let nanos = t
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .filter(|&n| n < LATEST_REPRESENTABLE);
    nanos.ok_or_else(|| {
        let reading = match t.duration_since(UNIX_EPOCH) {
            Ok(after) => format!(
                "{} s after 1970-01-01T00:00:00Z (the year 2262 or later)",
                after.as_secs()
            ),
            Err(before) => format!(
                "{:.3} s before 1970-01-01T00:00:00Z",
                before.duration().as_secs_f64()
            ),
        };
        Error::Clock {
            reason: format!(
                "the clock reads {reading}, outside the range the store can represent (1970 \
                 to 2262); nothing was stored (check the clock given to the store, or the \
                 system's)"
            ),
        }
    })
}

/// The store's clock (see the module doc).
pub(crate) struct StoreClock {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

struct State {
    /// The latest time the store has answered.
    latest: u64,
    corrections: Arc<Corrections>,
    /// How many of `corrections` are persisted.
    saved: usize,
}

impl StoreClock {
    /// The store's clock over `clock`, starting from the persisted latest time `floor` and
    /// the persisted `corrections`.
    pub fn new(clock: Arc<dyn Clock>, floor: u64, corrections: Corrections) -> StoreClock {
        let saved = corrections.len();
        StoreClock {
            clock,
            state: Mutex::new(State {
                latest: floor,
                corrections: Arc::new(corrections),
                saved,
            }),
        }
    }

    /// The store's time now, and the epoch a write made now belongs to.
    ///
    /// # Errors
    /// [`Error::Clock`] when the clock reads outside the representable range.
    pub fn now(&self) -> Result<Stamp> {
        let read = representable(self.clock.now())?;
        let mut state = self.state.lock();
        match step(state.latest, read, TOLERANCE) {
            Step::Ahead => state.latest = read,
            Step::Held => {}
            Step::Corrected => {
                let ended = state.corrections.current_epoch();
                tracing::warn!(
                    behind_ms = (state.latest - read) / 1_000_000,
                    epoch = ended,
                    "the clock reads far behind the latest time the store saw: taken as a \
                     corrected clock; records written before under the wrong time are moved \
                     back to now"
                );
                let from = state.latest;
                Arc::make_mut(&mut state.corrections).push(from, read);
                state.latest = read;
            }
        }
        Ok(Stamp {
            at: state.latest,
            epoch: state.corrections.current_epoch(),
        })
    }

    /// The store's time in nanoseconds (see [`StoreClock::now`]).
    ///
    /// # Errors
    /// As [`StoreClock::now`].
    pub fn nanos(&self) -> Result<u64> {
        self.now().map(|s| s.at)
    }

    /// The corrections so far (persisted or not).
    pub fn corrections(&self) -> Arc<Corrections> {
        Arc::clone(&self.state.lock().corrections)
    }

    /// The corrections if some are not persisted yet, with how many are.
    pub fn unsaved(&self) -> Option<(Arc<Corrections>, usize)> {
        let state = self.state.lock();
        (state.saved < state.corrections.len())
            .then(|| (Arc::clone(&state.corrections), state.saved))
    }

    /// Notes that the first `n` corrections are persisted.
    pub fn mark_saved(&self, n: usize) {
        let mut state = self.state.lock();
        state.saved = state.saved.max(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_reading_moves_ahead_is_held_within_the_tolerance_or_is_a_correction() {
        assert_eq!(step(10 * S, 10 * S, S), Step::Ahead);
        assert_eq!(step(10 * S, 11 * S, S), Step::Ahead);
        assert_eq!(step(10 * S, 9 * S, S), Step::Held);
        assert_eq!(step(10 * S, 9 * S - 1, S), Step::Corrected);
        assert_eq!(step(10 * S, 0, 10 * S), Step::Held);
    }

    #[test]
    fn small_backward_steps_are_absorbed_large_ones_are_corrections() {
        let manual = ManualClock::new(at(1000));
        let clock = StoreClock::new(Arc::new(manual.clone()), 0, Corrections::default());
        assert_eq!(
            clock.now().unwrap(),
            Stamp {
                at: 1000 * S,
                epoch: 0
            }
        );
        manual.set(at(1000) - Duration::from_millis(900));
        assert_eq!(
            clock.now().unwrap(),
            Stamp {
                at: 1000 * S,
                epoch: 0
            }
        );
        manual.set(at(990));
        assert_eq!(
            clock.now().unwrap(),
            Stamp {
                at: 990 * S,
                epoch: 1
            }
        );
        assert_eq!(clock.unsaved().map(|(c, n)| (c.len(), n)), Some((1, 0)));
        clock.mark_saved(1);
        assert!(clock.unsaved().is_none());
    }

    #[test]
    fn a_floor_far_ahead_of_the_clock_is_corrected_at_once() {
        let manual = ManualClock::new(at(1000));
        let clock = StoreClock::new(
            Arc::new(manual),
            20 * 365 * 86_400 * S,
            Corrections::default(),
        );
        assert_eq!(
            clock.now().unwrap(),
            Stamp {
                at: 1000 * S,
                epoch: 1
            }
        );
    }

    #[test]
    fn records_of_the_wrong_clock_are_moved_back_to_the_correction() {
        let mut c = Corrections::default();
        // The store's time stood at 600 s when the clock was corrected to 100 s.
        c.push(600 * S, 100 * S);
        let stamp = |at: u64, epoch: u32| Stamp { at: at * S, epoch };
        // Written before the glitch (at most the tolerance after the corrected time) and
        // alive at 600 s: kept.
        assert_eq!(c.shift(stamp(99, 0), 700 * S), 0);
        assert_eq!(c.shift(stamp(101, 0), 700 * S), 0);
        // Written by the clock that ran ahead: moved back to the correction.
        assert_eq!(c.shift(stamp(500, 0), 700 * S), 400 * S);
        // Dead at 600 s: moved back to die at the correction, never alive again.
        assert_eq!(c.shift(stamp(99, 0), 599 * S), 499 * S);
        assert_eq!(c.shift(stamp(99, 0), 50 * S), 0);
        // Written after the correction: kept, whatever its time.
        assert_eq!(c.shift(stamp(500, 1), 700 * S), 0);
        // A second correction further back applies to both epochs before it.
        c.push(120 * S, 50 * S);
        assert_eq!(c.shift(stamp(500, 0), 700 * S), 450 * S);
        assert_eq!(c.shift(stamp(80, 1), 200 * S), 30 * S);
        assert_eq!(c.shift(stamp(80, 2), 200 * S), 0);
        assert_eq!(Corrections::decode(&c.encode()).unwrap(), c);
        assert!(Corrections::decode(&[0; 19]).is_err());
        assert_eq!(c.resweep_from(0), Some(50 * S));
        assert_eq!(c.resweep_from(2), None);
    }

    #[test]
    fn unrepresentable_readings_are_errors() {
        let text = |t| representable(t).unwrap_err().to_string();
        let before = text(UNIX_EPOCH - Duration::from_millis(10_500));
        assert!(
            before.contains("reads 10.500 s before 1970-01-01T00:00:00Z"),
            "{before}"
        );
        let after = text(UNIX_EPOCH + Duration::from_nanos(1 << 63));
        assert!(
            after.contains("reads 9223372036 s after 1970-01-01T00:00:00Z"),
            "{after}"
        );
        assert!(!after.contains("SystemTime"), "{after}");
        assert_eq!(representable(at(5)).unwrap(), 5 * S);
        let manual = ManualClock::new(UNIX_EPOCH + Duration::from_secs(600 * 365 * 86_400));
        let clock = StoreClock::new(Arc::new(manual.clone()), 0, Corrections::default());
        assert!(matches!(clock.now(), Err(Error::Clock { .. })));
        manual.set(at(7));
        assert_eq!(
            clock.now().unwrap().at,
            7 * S,
            "the bad reading was not kept"
        );
    }
}
