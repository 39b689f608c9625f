//! [`Store`] and its [`Builder`]: opening, the read path of `begin`/`get`, and shutdown.

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RecursiveRwLock};

use crate::clock::{Clock, SystemClock, duration_nanos};
use crate::committer::{BatchWriter, Committer, Submitter};
use crate::config::{
    DEFAULT_CACHE_BYTES, DEFAULT_LEASE, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_REAP_INTERVAL,
    DEFAULT_TTL, Durability, MAX_RESPONSE_LIMIT, Settings,
};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::lease::Lease;
use crate::machine::{self, BeginStep, Grant, Refusal};
use crate::outcome::{Begin, Entry};
#[cfg(feature = "postgres")]
use crate::postgres::engine::PgStore;
use crate::reaper::{self, Reaper};
use crate::record::Record;
use crate::saver::{self, Saver};
use crate::stats::{Stats, StatsCells, bump};
use crate::storage::{self, Stored};

/// An idempotency-key store on one redb file.
///
/// Cheap to clone: clones share one store (an `Arc` inside). Share it by cloning, don't wrap
/// it in a lock. It is `Send + Sync`.
///
/// ```
/// use idemstore::{Begin, Fingerprint, Key, Store};
///
/// let store = Store::builder().open_in_memory()?;
/// let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
/// let fp = Fingerprint::of(b"POST /v1/charges amount=100");
///
/// let Begin::Started(lease) = store.begin(&key, &fp)? else { unreachable!() };
/// lease.complete(b"charge ch_1 created")?;
///
/// match store.begin(&key, &fp)? {
///     Begin::Replay(done) => assert_eq!(done.response(), b"charge ch_1 created"),
///     other => panic!("expected a replay, got {other:?}"),
/// }
/// store.close()?;
/// # Ok::<(), idemstore::Error>(())
/// ```
///
/// # Durability
///
/// With [`Durability::Immediate`] (the default), a `begin` that returns `Started`, and every
/// lease operation that returns `Ok`, is on disk (fsync'd) before it returns. Concurrent
/// writers share fsyncs (group commit), and each commit is made in two phases, so that a
/// damaged newest commit is [`Error::Corrupt`] at open after a crash, never silently rolled
/// back. An `Err` from a write is an unknown outcome: the store then refuses writes (with [`Error::Poisoned`] or [`Error::Storage`]) until it is
/// reopened, and a reopen shows what is really on disk.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Shared by the clones of this store, not by its leases: dropping the last clone closes
    /// the store (a lease alive then gets [`Error::Closed`], as after `close`), even while a
    /// lease still holds `inner`.
    _open: Arc<OpenHandle>,
}

/// Closes the store when the last [`Store`] clone is dropped.
struct OpenHandle(Arc<Inner>);

impl Drop for OpenHandle {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

pub(crate) struct Inner {
    engine: RecursiveRwLock<Option<Engine>>,
    /// Held for the whole of a shutdown: a second `close` (of another clone, or the last
    /// drop) waits for the first to release the file instead of returning at once.
    closing: Mutex<()>,
    /// Set when a shutdown starts: every later call is refused with [`Error::Closed`] without
    /// taking `engine`'s lock, so a call made from inside a scan's visitor (which runs under
    /// that lock) never waits behind the shutdown waiting for the scan: a deadlock.
    shutting_down: AtomicBool,
    pub(crate) settings: Settings,
    pub(crate) stats: Arc<StatsCells>,
    path: Option<PathBuf>,
}

struct Engine {
    records: Records,
    committer: Committer,
    submitter: Submitter,
    reaper: Option<Reaper>,
    /// The key index's saver (a store with a file or backend).
    saver: Option<Saver>,
}

/// What holds the records: the engine chosen at open. Writes go through the committer
/// whatever the engine; this is the read side.
pub(crate) enum Records {
    /// A redb file (or memory): reads go straight to the file, through the key index.
    Redb(Arc<Stored>),
    /// A PostgreSQL database shared by replicas.
    #[cfg(feature = "postgres")]
    Postgres(Arc<PgStore>),
}

impl Records {
    /// The store's time.
    ///
    /// # Errors
    /// [`Error::Clock`] for a reading the store cannot represent; [`Error::Storage`].
    fn now(&self) -> Result<u64> {
        match self {
            Records::Redb(stored) => stored.timeline.nanos(),
            #[cfg(feature = "postgres")]
            Records::Postgres(pg) => pg.now(),
        }
    }

    /// The record of `key`, dead or alive, and the store's time it was read at.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record; [`Error::Storage`]; [`Error::Clock`].
    fn lookup(&self, key: &[u8]) -> Result<(Option<Record>, u64)> {
        match self {
            Records::Redb(stored) => {
                // The time first: a clock correction it finds applies to the record read next.
                let before = stored.timeline.nanos()?;
                let record = stored.read_record(key)?;
                // And again after the read: every record the read can see was written at a
                // store time up to this one, so a lease it holds never seems to have more
                // than its full length left. (After a correction between the two readings,
                // the later one is lower and the first stands.)
                let after = stored.timeline.nanos()?;
                Ok((record, before.max(after)))
            }
            #[cfg(feature = "postgres")]
            Records::Postgres(pg) => pg.read_record(key),
        }
    }

    /// Visits every record in one snapshot; returns the last fencing token granted.
    ///
    /// # Errors
    /// [`Error::Corrupt`]; [`Error::Storage`]; `visit`'s own error.
    fn walk(&self, visit: &mut Visit<'_>) -> Result<u64> {
        match self {
            Records::Redb(stored) => stored.walk_log(visit),
            #[cfg(feature = "postgres")]
            Records::Postgres(pg) => pg.walk(visit),
        }
    }
}

/// A visitor of encoded keys and their records.
pub(crate) type Visit<'v> = dyn FnMut(&[u8], Record) -> Result<ControlFlow<()>> + 'v;

impl Inner {
    /// Runs `f` on the open engine's records; [`Error::Closed`] after close.
    fn records<T>(&self, f: impl FnOnce(&Records) -> Result<T>) -> Result<T> {
        let guard = self.engine_read()?;
        let engine = guard.as_ref().ok_or(Error::Closed)?;
        f(&engine.records)
    }

    /// The record of `key`, dead or alive, and the store's time it was read at.
    ///
    /// # Errors
    /// [`Error::Corrupt`]; [`Error::Storage`]; [`Error::Clock`]; [`Error::Closed`].
    pub(crate) fn lookup(&self, key: &[u8]) -> Result<(Option<Record>, u64)> {
        self.records(|r| r.lookup(key))
    }

    /// Visits every record in one snapshot; returns the last fencing token granted.
    ///
    /// # Errors
    /// [`Error::Corrupt`]; [`Error::Storage`]; [`Error::Closed`]; `visit`'s own error.
    pub(crate) fn walk(&self, visit: &mut Visit<'_>) -> Result<u64> {
        self.records(|r| r.walk(visit))
    }

    /// The PostgreSQL engine, for completions inside the caller's transaction.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a store on another engine; [`Error::Closed`].
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres(&self) -> Result<Arc<PgStore>> {
        self.records(|r| match r {
            Records::Postgres(pg) => Ok(Arc::clone(pg)),
            Records::Redb(_) => Err(Error::config(
                "complete_in needs a store opened with open_postgres (this one holds its records in redb)",
            )),
        })
    }

    /// A handle to send writes to the committer; [`Error::Closed`] after close.
    pub(crate) fn submitter(&self) -> Result<Submitter> {
        let guard = self.engine_read()?;
        Ok(guard.as_ref().ok_or(Error::Closed)?.submitter.clone())
    }

    /// The store's time ([`crate::timeline`]).
    ///
    /// # Errors
    /// [`Error::Clock`] for a clock reading the store cannot represent, [`Error::Closed`].
    pub(crate) fn now(&self) -> Result<u64> {
        self.records(Records::now)
    }

    /// A read guard of the engine; [`Error::Closed`] once a shutdown started. Recursive: a
    /// thread that holds one already (a scan's visitor calling the store) gets another even
    /// while a shutdown waits for the write lock (the flag keeps new callers out meanwhile).
    fn engine_read(&self) -> Result<parking_lot::RecursiveRwLockReadGuard<'_, Option<Engine>>> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(self.engine.read())
    }

    /// Stops the reaper and the committer, joins both, and closes the file.
    fn shutdown(&self) -> Result<()> {
        let _closing = self.closing.lock();
        self.shutting_down.store(true, Ordering::Release);
        let Some(mut engine) = self.engine.write().take() else {
            return Ok(());
        };
        if let Some(reaper) = engine.reaper.as_mut() {
            reaper.stop();
        }
        engine.committer.shutdown();
        #[cfg_attr(
            not(feature = "postgres"),
            allow(clippy::infallible_destructuring_match)
        )]
        let stored = match engine.records {
            Records::Redb(stored) => stored,
            // The pool's connections close as it drops.
            #[cfg(feature = "postgres")]
            Records::Postgres(_) => return Ok(()),
        };
        // Nothing writes any more: the index is the log's.
        match engine.saver.as_mut() {
            Some(saver) => saver.finish(&stored),
            None => saver::save_at_close(&stored),
        }
        match Arc::try_unwrap(stored).map(|s| s.db) {
            // Guarded: closing commits the engine's allocator state, and the engine can panic
            // on a damaged page.
            Ok(db) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.close())) {
                Ok(closed) => closed.map_err(|e| Error::storage("closing the database", e)),
                Err(_) => Err(Error::corrupt(
                    "the storage engine failed while closing the file (damaged file)",
                )),
            },
            // Unreachable: readers hold the lock, the committer was joined.
            Err(_) => Ok(()),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with the default settings and starts the reaper.
    ///
    /// # Errors
    /// As [`Builder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        Store::builder().open(path)
    }

    /// A builder to choose settings.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Asks what to do with a request carrying `key`, whose request fingerprint is `fp`:
    ///
    /// | state of the key | fingerprint | answer |
    /// |---|---|---|
    /// | absent, or dead (expired) | — | [`Begin::Started`]: run the request under the [`Lease`] |
    /// | in flight, lease live | same | [`Begin::InFlight`] with the time left (409) |
    /// | in flight, lease expired or released | same | [`Begin::Started`] with [`Lease::recovered`] set: a takeover |
    /// | completed | same | [`Begin::Replay`]: the stored response, byte for byte |
    /// | in flight or completed | differs | [`Begin::Mismatch`] (422) |
    ///
    /// Only `Started` writes (one durable commit, shared with concurrent writers); the other
    /// answers come from a read transaction.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record, [`Error::Storage`]/[`Error::Poisoned`] when the
    /// claim could not be written (unknown outcome: retry after reopening), [`Error::Closed`].
    pub fn begin(&self, key: &Key, fp: &Fingerprint) -> Result<Begin> {
        let encoded = key.encode();
        let step = self.inner.records(|records| match records {
            Records::Redb(_) => {
                let (current, now) = records.lookup(&encoded)?;
                Ok(machine::decide_begin(current, fp, now))
            }
            // Decided inside the batch, under the key's lock: one transaction, not a read and
            // then a write.
            #[cfg(feature = "postgres")]
            Records::Postgres(_) => Ok(BeginStep::Claim(None)),
        })?;
        let claimed = match step {
            BeginStep::Claim(_) => {
                self.inner
                    .submitter()?
                    .claim(encoded.clone(), *fp, self.inner.settings.lease)?
            }
            BeginStep::Refuse(refusal) => Err(refusal),
        };
        let stats = &self.inner.stats;
        Ok(match claimed {
            Ok(Grant {
                token,
                lease_expires_at,
                recovered,
                ..
            }) => {
                bump(&stats.started, 1);
                if let Some(r) = &recovered {
                    bump(&stats.takeovers, 1);
                    // No key above debug level: ids and scopes may identify people.
                    tracing::info!(
                        previous_token = r.previous_token,
                        token,
                        attempt = r.attempt,
                        checkpoint = r.checkpoint.is_some(),
                        "lease taken over (the previous holder crashed, stalled past its lease or dropped it)"
                    );
                    tracing::debug!(
                        scope = key.scope(),
                        id = key.id(),
                        token,
                        "lease taken over: key"
                    );
                }
                Begin::Started(Lease::new(
                    Arc::clone(&self.inner),
                    key.clone(),
                    encoded,
                    token,
                    lease_expires_at,
                    recovered,
                ))
            }
            Err(Refusal::Replay(done)) => {
                bump(&stats.replayed, 1);
                Begin::Replay(done)
            }
            Err(Refusal::InFlight { retry_after }) => {
                bump(&stats.in_flight_conflicts, 1);
                Begin::InFlight {
                    retry_after: Duration::from_nanos(retry_after),
                }
            }
            Err(Refusal::Mismatch) => {
                bump(&stats.mismatches, 1);
                Begin::Mismatch
            }
        })
    }

    /// The live record of `key`, or `None` when it is absent or dead. Read-only.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record, [`Error::Storage`], [`Error::Closed`].
    pub fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let (record, now) = self.inner.lookup(&key.encode())?;
        Ok(record.filter(|r| !r.is_dead(now)).map(Entry::from_record))
    }

    /// Runs reaping passes now until no dead record is left, each pass its own small write
    /// transaction. Returns how many records were deleted.
    ///
    /// # Errors
    /// [`Error::Storage`], [`Error::Poisoned`], [`Error::Closed`].
    pub fn reap(&self) -> Result<u64> {
        let submitter = {
            let guard = self.inner.engine_read()?;
            guard.as_ref().ok_or(Error::Closed)?.submitter.clone()
        };
        reaper::reap_all(&submitter, &self.inner.stats, || true)
    }

    /// The counters since the store was opened.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// The file this store was opened from (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Stops and joins the reaper and the committer, writes a snapshot of the key index into
    /// the file (on the thread that writes it from time to time, unless the file's snapshot
    /// is already of this index) so that the next open loads it, and releases the file: a
    /// new `open` of it succeeds once this returns. Every clone of this store, and every
    /// lease, then gets [`Error::Closed`]. Dropping the last clone does the same, silently.
    ///
    /// # Errors
    /// [`Error::Storage`] if the storage engine failed to close the file cleanly.
    pub fn close(self) -> Result<()> {
        self.inner.shutdown()
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// Chooses a store's settings; made by [`Store::builder`]. Every setter documents its default.
///
/// ```
/// use std::time::Duration;
/// use idemstore::{Durability, Store};
///
/// let store = Store::builder()
///     .ttl(Duration::from_secs(24 * 3600))
///     .lease(Duration::from_secs(30))
///     .reap_interval(Some(Duration::from_secs(60)))
///     .max_response_bytes(4 << 20)
///     .durability(Durability::Immediate)
///     .open_in_memory()?;
/// # Ok::<(), idemstore::Error>(())
/// ```
#[must_use = "call open(path) or open_in_memory()"]
pub struct Builder {
    ttl: Duration,
    lease: Duration,
    reap_interval: Option<Duration>,
    max_response_bytes: usize,
    durability: Durability,
    clock: Arc<dyn Clock>,
    /// Whether [`Builder::clock`] was called (PostgreSQL then uses it, not the server's).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    clock_set: bool,
    cache_bytes: usize,
    #[cfg(feature = "postgres")]
    postgres_schema: String,
    #[cfg(feature = "postgres")]
    postgres_pool_size: Option<u32>,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            reap_interval: Some(DEFAULT_REAP_INTERVAL),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            durability: Durability::Immediate,
            clock: Arc::new(SystemClock),
            clock_set: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
            #[cfg(feature = "postgres")]
            postgres_schema: crate::postgres::schema::DEFAULT_SCHEMA.to_owned(),
            #[cfg(feature = "postgres")]
            postgres_pool_size: None,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("reap_interval", &self.reap_interval)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("durability", &self.durability)
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

impl Builder {
    /// How long a record lives. Default 24 h. Must be greater than zero. Stored deadlines
    /// are computed when written: reopening with another ttl changes only later writes.
    pub fn ttl(mut self, ttl: Duration) -> Builder {
        self.ttl = ttl;
        self
    }

    /// The lease `begin` grants. Default 30 s. Must be greater than zero.
    pub fn lease(mut self, lease: Duration) -> Builder {
        self.lease = lease;
        self
    }

    /// How often the reaper thread deletes dead records. Default `Some(60 s)`; `None` starts
    /// no thread (call [`Store::reap`] yourself). Dead records are absent either way.
    pub fn reap_interval(mut self, interval: Option<Duration>) -> Builder {
        self.reap_interval = interval;
        self
    }

    /// Largest response (and checkpoint) accepted, in bytes. Default 4 MiB, at most
    /// [`MAX_RESPONSE_LIMIT`] (64 MiB). Storing or replaying a
    /// response holds two to three times its size in memory for the duration of the call.
    pub fn max_response_bytes(mut self, max: usize) -> Builder {
        self.max_response_bytes = max;
        self
    }

    /// Whether writes are fsync'd before they are acknowledged. Default [`Durability::Immediate`].
    /// With [`Durability::None`] a crash loses every change since the open (see there).
    pub fn durability(mut self, durability: Durability) -> Builder {
        self.durability = durability;
        self
    }

    /// Where time comes from. Default [`SystemClock`]; use a [`ManualClock`](crate::ManualClock)
    /// in tests.
    pub fn clock(mut self, clock: impl Clock) -> Builder {
        self.clock = Arc::new(clock);
        self.clock_set = true;
        self
    }

    /// Memory for the storage engine's page cache, in bytes. Default 32 MiB (redb's own
    /// default is 1 GiB).
    pub fn cache_bytes(mut self, bytes: usize) -> Builder {
        self.cache_bytes = bytes;
        self
    }

    fn settings(&self) -> Result<Settings> {
        if self.ttl.is_zero() {
            return Err(Error::config("ttl must be greater than zero"));
        }
        if self.lease.is_zero() {
            return Err(Error::config("lease must be greater than zero"));
        }
        if self.reap_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::config(
                "reap_interval must be greater than zero (use None for no reaper thread)",
            ));
        }
        if self.max_response_bytes > MAX_RESPONSE_LIMIT {
            return Err(Error::config(format!(
                "max_response_bytes is {}, at most {MAX_RESPONSE_LIMIT} (64 MiB) is supported",
                self.max_response_bytes
            )));
        }
        Ok(Settings {
            ttl: duration_nanos(self.ttl),
            lease: duration_nanos(self.lease),
            max_response_bytes: self.max_response_bytes,
            durability: self.durability,
        })
    }

    /// Opens the store file at `path`, creating it (mode 0600 on Unix) when it is missing or
    /// empty, and starts the reaper thread.
    ///
    /// A symbolic link at `path` is followed to an existing file; a dangling one is refused
    /// (a new, empty store there would forget every key), so to create a store behind a link,
    /// open its target once.
    ///
    /// # Open time
    ///
    /// Opening an existing file reads all of it, so its time grows with the file: the
    /// storage engine first verifies every page's checksum (a damaged file is then
    /// [`Error::Corrupt`], never a crash later), and the key index is then loaded from the
    /// snapshot a clean close wrote, while every log entry's checksum is verified (by a thread
    /// for each core, up to eight, each reading a part of the log). A store of ten million
    /// records with 200-byte responses (a 4 GiB file) opened in 7.6–8.9 s on a 2-vCPU
    /// machine, 4.9–5.8 s of it the page check; one of a million in 1.0 s. Each step is
    /// reported as a `tracing` event at info level, with its time: "checking every page of
    /// the file" and its end, a progress event every million log entries, and "key index
    /// ready".
    ///
    /// # The file is the store's
    ///
    /// While the store is open, `path` must keep naming the file it opened. On Unix, each
    /// commit checks that it does (one `stat`); if the file was removed, or another file was
    /// renamed over the path, the commit went into a file no one will open again, so every
    /// caller of that commit gets [`Error::Storage`] (an unknown outcome), an error is
    /// logged, and the store refuses writes (reads go on) until it is closed and the path
    /// opened again.
    ///
    /// # Errors
    /// * [`Error::InvalidConfig`] for a bad setting.
    /// * [`Error::AlreadyOpen`] when the file is open in this or another process.
    /// * [`Error::IncompatibleFormat`] for a file that is not an idemstore store of a format
    ///   version this build reads (a foreign redb file, another kind of file, a newer format):
    ///   the file is checked read-only first and not modified. A store of the previous format
    ///   version (3) is read as it is and marked as the current one (4) by this open, after
    ///   which older builds of idemstore refuse it.
    /// * [`Error::Corrupt`] for a damaged file.
    /// * [`Error::Storage`] for a directory, a missing parent directory, missing permissions
    ///   or another I/O failure.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        let settings = self.settings()?;
        let path = path.as_ref();
        let (db, file) = storage::open_file(path, self.cache_bytes)?;
        let mut stored = storage::initialize(db, self.clock.clone(), true)?;
        stored.file = Some(file);
        self.start_redb(stored, settings, Some(path.to_owned()))
    }

    /// Opens a new, empty store held in memory (nothing survives `close`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad setting; [`Error::Storage`] if a thread cannot start.
    pub fn open_in_memory(self) -> Result<Store> {
        let settings = self.settings()?;
        let db = storage::open_memory(self.cache_bytes)?;
        let stored = storage::initialize(db, self.clock.clone(), false)?;
        self.start_redb(stored, settings, None)
    }

    /// Opens a store on a custom redb storage backend, creating it when the backend is
    /// empty. For fault-injection and crash testing (a backend that fails chosen writes or
    /// keeps the image as of the last sync); production code uses [`Builder::open`].
    ///
    /// Unlike `open`, there is no read-only format check first: the backend is opened for
    /// writing at once. The backend trait is redb's, so this method follows redb's major
    /// version.
    ///
    /// # Errors
    /// As [`Builder::open`].
    #[cfg(feature = "test-backend")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-backend")))]
    pub fn open_backend(self, backend: impl redb::StorageBackend) -> Result<Store> {
        let settings = self.settings()?;
        let db = storage::open_backend(backend, self.cache_bytes)?;
        let stored = storage::initialize(db, self.clock.clone(), true)?;
        self.start_redb(stored, settings, None)
    }

    /// Opens the store on PostgreSQL: the database named by `conninfo` (a libpq-style
    /// `key=value` string or a `postgresql://` URL), shared by every replica of a service
    /// that opens it. Creates idemstore's tables in [`postgres_schema`](Builder::postgres_schema)
    /// on first open, checks them afterwards, and starts the reaper thread.
    ///
    /// Everything after `open` works as on redb. What differs:
    ///
    /// * **Time**: without [`clock`](Builder::clock), leases and TTLs use the database
    ///   server's clock, so replicas whose own clocks are skewed still agree. With a clock
    ///   set, that clock is used (every replica must then share it, as tests do with a
    ///   [`ManualClock`](crate::ManualClock)).
    /// * **Durability**: `Started` and every `Ok` come after the database committed, with
    ///   the server's own `synchronous_commit`; [`durability`](Builder::durability) and
    ///   [`cache_bytes`](Builder::cache_bytes) do not apply.
    /// * **Concurrent operations are sent together**: one thread per store takes the
    ///   operations queued by every caller, and runs them in one transaction (the keys
    ///   locked in a fixed order, so replicas never deadlock), with one commit.
    /// * A connection lost during a write is [`Error::Storage`] with an unknown outcome,
    ///   never `Ok`; the store is not poisoned, later calls get fresh connections.
    /// * **From async code**, make the store's calls in `tokio::task::spawn_blocking`, as the
    ///   tower layer (feature `tower`) does: they wait for the server. Made on a thread that
    ///   drives an async runtime they still work, as blocking calls: the client drives a
    ///   small runtime of its own, which tokio refuses to drive there, so on a
    ///   multi-threaded runtime they block in place (`block_in_place`), and on a
    ///   current-thread runtime the open, the reads and the close run on a thread of their
    ///   own and the writes on the store's committer thread, which the calling thread waits
    ///   for. (tokio cannot tell a current-thread runtime's thread from its blocking pool's,
    ///   so there even calls made in `spawn_blocking` take that way: a read costs about
    ///   twice a plain one.) Not `complete_in`, whose
    ///   transaction is the caller's own client's, nor `scan` and `summary` (they panic
    ///   there).
    ///
    /// # Errors
    /// * [`Error::InvalidConfig`] for a bad setting, a malformed `conninfo` or schema name.
    /// * [`Error::IncompatibleFormat`] when the schema holds tables of idemstore's names that
    ///   are not idemstore's, or of a newer version: nothing is modified.
    /// * [`Error::Storage`] when the server cannot be reached in time or refuses.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn open_postgres(self, conninfo: &str) -> Result<Store> {
        let settings = self.settings()?;
        let pool_size = self
            .postgres_pool_size
            .unwrap_or_else(crate::postgres::pool::default_pool_size);
        let clock = self.clock_set.then(|| Arc::clone(&self.clock));
        let pg = Arc::new(PgStore::open(
            conninfo,
            &self.postgres_schema,
            pool_size,
            clock,
        )?);
        let writer = crate::postgres::engine::PgWriter::new(Arc::clone(&pg), settings);
        self.start(Records::Postgres(pg), writer, settings, None, None)
    }

    /// The PostgreSQL schema holding idemstore's tables (`idemstore_version`,
    /// `idemstore_records` and the sequence `idemstore_tokens`). Default `"idemstore"`. Other
    /// tables in the schema are left alone. Only for [`open_postgres`](Builder::open_postgres).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn postgres_schema(mut self, schema: impl Into<String>) -> Builder {
        self.postgres_schema = schema.into();
        self
    }

    /// How many PostgreSQL connections the store keeps. Default: two per CPU core, at least
    /// 2 and at most 16. Half of them (at least one) carry batches of writes, each with a
    /// batch in flight; the others the reads. At least 2: [`open_postgres`](Builder::open_postgres)
    /// refuses a smaller size with [`Error::InvalidConfig`].
    /// Only for [`open_postgres`](Builder::open_postgres).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn postgres_pool_size(mut self, connections: u32) -> Builder {
        self.postgres_pool_size = Some(connections);
        self
    }

    fn start_redb(
        self,
        stored: Stored,
        settings: Settings,
        path: Option<PathBuf>,
    ) -> Result<Store> {
        let stored = Arc::new(stored);
        let writer = storage::RedbWriter::new(Arc::clone(&stored), settings);
        let saver = stored
            .persistent()
            .then(|| Saver::spawn(Arc::clone(&stored)))
            .transpose()?;
        self.start(Records::Redb(stored), writer, settings, path, saver)
    }

    fn start(
        self,
        records: Records,
        writer: impl BatchWriter,
        settings: Settings,
        path: Option<PathBuf>,
        saver: Option<Saver>,
    ) -> Result<Store> {
        let stats = Arc::new(StatsCells::default());
        let committer = Committer::spawn(writer, stats.clone())?;
        let submitter = committer.submitter();
        let reaper = self
            .reap_interval
            .map(|every| Reaper::spawn(every, submitter.clone(), stats.clone()))
            .transpose()?;
        let inner = Arc::new(Inner {
            engine: RecursiveRwLock::new(Some(Engine {
                records,
                committer,
                submitter,
                reaper,
                saver,
            })),
            closing: Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            settings,
            stats,
            path,
        });
        Ok(Store {
            _open: Arc::new(OpenHandle(Arc::clone(&inner))),
            inner,
        })
    }
}
