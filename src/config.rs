//! Settings fixed when a store is opened, and [`Durability`].

use std::time::Duration;

/// How hard a write is pushed to disk before the call that made it returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// Every acknowledged change is fsync'd before the call returns (the default).
    /// Group commit shares one fsync between all callers whose changes are queued together.
    ///
    /// Commits are made in two phases (the new commit, fsync, then the header byte that makes
    /// it current, fsync again), so that after a crash a damaged newest commit is reported as
    /// [`Error::Corrupt`](crate::Error::Corrupt) when the store opens, never taken for a torn
    /// write and silently rolled back.
    #[default]
    Immediate,
    /// Like [`Durability::Immediate`], every acknowledged change is fsync'd before the call
    /// returns, but in one phase (one fsync per commit instead of two). The price: when the
    /// newest commit's pages are damaged on disk and the process crashes, the storage engine
    /// takes the damage for a write torn by the crash and falls back to the commit before,
    /// *silently* losing the writes acknowledged by the newest commit (a payment that was
    /// answered could then run again). Choose it only when that risk is acceptable;
    /// `BENCHMARKS.md` gives what it saves.
    ImmediateOnePhase,
    /// Changes are committed but not made durable: for tests and caches only.
    ///
    /// A crash loses *every* change since the store was opened, all together, not only the
    /// latest ones. The storage engine names a commit of this kind only in the database
    /// header it holds in memory; the header in the file keeps naming the last durable
    /// commit, which is the one the store makes when it opens. So after a power loss, a
    /// killed process or an abort, the file reopens exactly as it was opened: every claim,
    /// completion, checkpoint, extension, abandon and reaping since then is gone, and the
    /// fencing-token counter is back where it was, so tokens already handed out are granted
    /// again. Pages the engine wrote to the file in between do not help: nothing on disk
    /// points at them.
    ///
    /// A clean [`close`](crate::Store::close), or dropping the last handle, makes everything
    /// durable (one commit with an fsync); that and the next open are the only points a crash
    /// can fall back to.
    None,
}

/// Default time a record lives: 24 hours.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lease granted by `begin`: 30 seconds.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default interval of the reaper thread: 60 seconds.
pub(crate) const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(60);
/// Default largest response or checkpoint: 4 MiB.
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Default size of the storage engine's page cache: 32 MiB.
pub(crate) const DEFAULT_CACHE_BYTES: usize = 32 << 20;
/// Largest accepted `max_response_bytes`: 64 MiB.
///
/// An idempotency store keeps responses to replay them, and a response is held in memory
/// whole while it is stored or replayed: about two to three times its size (idemstore's copy,
/// and the storage engine's page for it, whose size is rounded up to a power of two).
pub const MAX_RESPONSE_LIMIT: usize = 64 << 20;

/// The validated settings a store runs with (durations in nanoseconds).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub ttl: u64,
    pub lease: u64,
    pub max_response_bytes: usize,
    pub durability: Durability,
}
