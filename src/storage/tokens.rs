//! The fencing-token counter as the running store keeps it.
//!
//! The file's counter (`"last_token"` in the meta table) is an upper bound: no token above it
//! was ever granted. A claim that needs a token above it writes the counter
//! [`RESERVED_AHEAD`] tokens ahead, so the next claims grant tokens without touching the meta
//! table: a claim's commit writes the log and the expiry index only, a page fewer. A clean
//! close writes the exact last token back, so tokens go on without a gap after it. After a
//! crash the reopened store goes on above the counter: tokens skip at most
//! `RESERVED_AHEAD - 1` values, and still rise strictly, which is what fencing needs.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many tokens a write of the file's counter reserves.
pub(crate) const RESERVED_AHEAD: u64 = 1024;

/// The last token granted by a committed transaction, and the file's counter as committed.
/// Only the committer changes them, after a commit.
#[derive(Debug)]
pub(crate) struct TokenCounter {
    granted: AtomicU64,
    reserved: AtomicU64,
}

/// What one transaction did with the counter: the last token it granted, and the counter it
/// wrote, if it wrote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drawn {
    pub last: u64,
    pub reserved: Option<u64>,
}

impl TokenCounter {
    /// The counter of a store whose file's counter reads `persisted` (and whose log holds no
    /// token above `persisted`, or the caller passes the highest one).
    pub(crate) fn new(persisted: u64) -> TokenCounter {
        TokenCounter {
            granted: AtomicU64::new(persisted),
            reserved: AtomicU64::new(persisted),
        }
    }

    /// The last token granted (or, before any, the file's counter at open).
    pub(crate) fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// The file's counter as last committed.
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Notes what a committed transaction drew.
    pub(crate) fn committed(&self, drawn: Drawn) {
        self.granted.fetch_max(drawn.last, Ordering::AcqRel);
        if let Some(reserved) = drawn.reserved {
            self.reserved.store(reserved, Ordering::Release);
        }
    }
}

/// The counter to write before granting `next`, when the file's counter `reserved` does not
/// cover it.
pub(crate) fn reservation(next: u64, reserved: u64) -> Option<u64> {
    (next > reserved).then(|| next.saturating_add(RESERVED_AHEAD - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_is_written_only_when_a_token_passes_the_counter() {
        assert_eq!(reservation(1, 0), Some(RESERVED_AHEAD));
        assert_eq!(reservation(RESERVED_AHEAD, RESERVED_AHEAD), None);
        assert_eq!(
            reservation(RESERVED_AHEAD + 1, RESERVED_AHEAD),
            Some(2 * RESERVED_AHEAD)
        );
        assert_eq!(reservation(u64::MAX, 5), Some(u64::MAX));
    }

    #[test]
    fn a_commit_moves_the_granted_token_up_only() {
        let counter = TokenCounter::new(7);
        assert_eq!((counter.granted(), counter.reserved()), (7, 7));
        counter.committed(Drawn {
            last: 9,
            reserved: Some(7 + RESERVED_AHEAD),
        });
        assert_eq!(
            (counter.granted(), counter.reserved()),
            (9, 7 + RESERVED_AHEAD)
        );
        counter.committed(Drawn {
            last: 8,
            reserved: None,
        });
        assert_eq!(counter.granted(), 9);
    }
}
