//! Time: the [`Clock`] trait, [`SystemClock`], [`ManualClock`], and the store's internal
//! timestamp arithmetic (nanoseconds since the Unix epoch, saturating, never panicking).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Where the store reads the time from.
///
/// The store asks for `now` at every operation; deadlines (lease expiry, record death) are
/// computed from it and stored. A clock that steps back by up to a second is absorbed (the
/// store's time waits for it); a larger step back is taken as the correction of a clock that
/// was wrong before: records written under the wrong time are read as if written at the
/// correction, so they expire within one lease or TTL of it. A reading before 1970 or from
/// year 2262 on fails the call with [`Error::Clock`](crate::Error::Clock) and is never stored.
///
/// On PostgreSQL (where, without a clock given to the builder, the store reads the server's
/// clock) there are no clock epochs in the rows, so a large step back is not corrected:
/// each replica's time stays at the latest reading it saw until the clock catches up (no
/// dead record comes back, but leases and TTLs do not run meanwhile: a crashed holder's key
/// answers "in flight" for as long as the clock was ahead), and a warning event says so.
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

/// Nanoseconds since the Unix epoch; times before it count as 0, times past year 2554 as `u64::MAX`.
#[cfg(any(test, feature = "client"))]
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
