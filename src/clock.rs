//! Time: the [`Clock`] trait, [`SystemClock`], [`ManualClock`], and the store's internal
//! timestamp arithmetic (nanoseconds since the Unix epoch, saturating, never panicking).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Where the store reads the time from.
///
/// The store asks for `now` at every operation; deadlines (lease expiry, record death) are
/// computed from it and stored. A clock that goes backwards is tolerated: nothing panics,
/// nothing dead comes back, and nothing expires early (a deadline only passes once `now`
/// reaches it).
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to: test retry and expiry logic without sleeping.
///
/// Clones share one time, so keep a clone and give another to the store:
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use idemstore::{Clock, ManualClock};
///
/// let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
/// let store_side = clock.clone();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(store_side.now(), UNIX_EPOCH + Duration::from_secs(1_700_000_030));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the time forward by `by`; the time is left unchanged if that would overflow
    /// `SystemTime`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock();
        *now = now.checked_add(by).unwrap_or(*now);
    }

    /// Sets the time, forwards or backwards.
    pub fn set(&self, to: SystemTime) {
        *self.now.lock() = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock()
    }
}

/// The store's view of a [`Clock`]: it never goes backwards. It returns the latest time read
/// so far when the wrapped clock is behind it, so a record once seen dead stays dead and no
/// deadline passes before `now` has reached it (SPEC §6, the clock going backwards).
///
/// The latest time is persisted by write batches (at most once a second) and exactly on a
/// clean close, and a reopened store starts from it, so this holds across restarts too
/// (after a crash, up to a second of it may be lost).
pub(crate) struct Monotonic {
    clock: Arc<dyn Clock>,
    /// The latest time read, in nanoseconds since the Unix epoch.
    latest: AtomicU64,
}

impl Monotonic {
    /// Wraps `clock`, never answering less than `floor` (nanoseconds since the epoch).
    pub(crate) fn new(clock: Arc<dyn Clock>, floor: u64) -> Monotonic {
        Monotonic {
            clock,
            latest: AtomicU64::new(floor),
        }
    }
}

impl Clock for Monotonic {
    fn now(&self) -> SystemTime {
        let now = to_nanos(self.clock.now());
        let latest = self.latest.fetch_max(now, Ordering::AcqRel);
        from_nanos(latest.max(now))
    }
}

/// Nanoseconds since the Unix epoch; times before it count as 0, times past year 2554 as `u64::MAX`.
pub(crate) fn to_nanos(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => duration_nanos(d),
        Err(_) => 0,
    }
}

/// The inverse of [`to_nanos`].
pub(crate) fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// A duration in nanoseconds, saturating at `u64::MAX` (about 584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_saturate() {
        assert_eq!(to_nanos(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(duration_nanos(Duration::MAX), u64::MAX);
        let t = UNIX_EPOCH + Duration::from_nanos(123_456);
        assert_eq!(from_nanos(to_nanos(t)), t);
        let _ = from_nanos(u64::MAX);
    }

    #[test]
    fn manual_clock_shares_time_and_saturates() {
        let c = ManualClock::new(UNIX_EPOCH);
        let d = c.clone();
        c.advance(Duration::from_secs(1));
        assert_eq!(d.now(), UNIX_EPOCH + Duration::from_secs(1));
        c.advance(Duration::MAX);
        d.set(UNIX_EPOCH);
        assert_eq!(c.now(), UNIX_EPOCH);
    }
}
