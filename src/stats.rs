//! [`Stats`]: the store's counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the store's counters since it was opened (they are not persisted).
///
/// Counters count successful, acknowledged outcomes only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `begin` calls that returned `Started`, takeovers included.
    pub started: u64,
    /// `begin` calls that returned `Replay`.
    pub replayed: u64,
    /// `begin` calls that returned `InFlight` (HTTP 409).
    pub in_flight_conflicts: u64,
    /// `begin` calls that returned `Mismatch` (HTTP 422).
    pub mismatches: u64,
    /// `Started` outcomes that took over an expired or released lease.
    pub takeovers: u64,
    /// Leases completed.
    pub completed: u64,
    /// Leases abandoned.
    pub abandoned: u64,
    /// Leases released by being dropped unfinished.
    pub released: u64,
    /// Lease operations refused with `LeaseLost` (fencing at work).
    pub leases_lost: u64,
    /// Dead records deleted, by the reaper thread or [`Store::reap`](crate::Store::reap).
    pub reaped: u64,
    /// Reaper passes that failed (the error is not retried until the next interval).
    pub reap_errors: u64,
    /// Write transactions committed by the group committer.
    pub commits: u64,
    /// Operations applied in those transactions; `committed_ops / commits` is the mean batch size.
    pub committed_ops: u64,
}

macro_rules! cells {
    ($($field:ident),* $(,)?) => {
        /// Live atomic counters behind [`Stats`].
        #[derive(Debug, Default)]
        pub(crate) struct StatsCells {
            $(pub $field: AtomicU64,)*
        }

        impl StatsCells {
            /// A consistent-enough snapshot (each counter is read atomically).
            pub fn snapshot(&self) -> Stats {
                Stats { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }
    };
}

cells!(
    started,
    replayed,
    in_flight_conflicts,
    mismatches,
    takeovers,
    completed,
    abandoned,
    released,
    leases_lost,
    reaped,
    reap_errors,
    commits,
    committed_ops,
);

/// Adds `n` to a counter.
pub(crate) fn bump(cell: &AtomicU64, n: u64) {
    cell.fetch_add(n, Ordering::Relaxed);
}
