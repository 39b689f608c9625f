//! The test builders and helpers: a store at a [`Place`] of any engine driven by a
//! `ManualClock` (see [`crate::engine`] for running a test on every engine), and
//! `begin`/`get` helpers that expect one answer.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::{Begin, Builder, Completed, Entry, Fingerprint, Key, Lease, ManualClock, Store};
use tempfile::TempDir;

use crate::engine::{Engine, Place};

/// Record lifetime used by the tests unless they say otherwise.
pub const TTL: Duration = Duration::from_secs(1000);
/// Lease duration used by the tests unless they say otherwise.
pub const LEASE: Duration = Duration::from_secs(30);

/// The instant every test clock starts at.
pub fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A fresh manual clock standing at [`start`].
pub fn clock() -> ManualClock {
    ManualClock::new(start())
}

/// The builder every test store starts from: the test TTL and lease, no reaper thread
/// (tests call `reap()` themselves), and the given clock.
pub fn builder(clock: &ManualClock) -> Builder {
    Store::builder()
        .ttl(TTL)
        .lease(LEASE)
        .reap_interval(None)
        .clock(clock.clone())
}

/// A store under test at a [`Place`], with its clock.
pub struct TestStore<'p> {
    /// The engine the store runs on.
    pub engine: Engine,
    /// The open store.
    pub store: Store,
    /// The clock every open of this test store uses.
    pub clock: ManualClock,
    place: &'p Place,
}

impl TestStore<'_> {
    /// The place the store lives at.
    pub fn place(&self) -> &Place {
        self.place
    }

    /// Opens another store at the same place with `configure(builder(clock))`, this store
    /// staying open (for PostgreSQL: a second replica on the same schema).
    ///
    /// # Panics
    ///
    /// When the open fails.
    pub fn open_again(&self, configure: impl FnOnce(Builder) -> Builder) -> Store {
        self.place
            .open(configure(builder(&self.clock)))
            .unwrap_or_else(|e| panic!("{:?}: open again: {e}", self.engine))
    }

    /// Closes the store and opens the same place again with `configure(builder(clock))`.
    ///
    /// # Panics
    ///
    /// On an engine that is not [durable](Engine::durable), and when the close or the open
    /// fails.
    pub fn reopen_with(&mut self, configure: impl FnOnce(Builder) -> Builder) {
        assert!(
            self.engine.durable(),
            "an in-memory store cannot be reopened"
        );
        self.store
            .clone()
            .close()
            .unwrap_or_else(|e| panic!("{:?}: close before reopen: {e}", self.engine));
        self.store = self.open_again(configure);
    }

    /// Closes the store and opens the same place again with the default test settings.
    ///
    /// # Panics
    ///
    /// As [`reopen_with`](TestStore::reopen_with).
    pub fn reopen(&mut self) {
        self.reopen_with(|b| b);
    }
}

/// Opens a store at `place` with `configure(builder(clock))` and a fresh clock at [`start`].
///
/// # Panics
///
/// When the open fails.
pub fn open(place: &Place, configure: impl FnOnce(Builder) -> Builder) -> TestStore<'_> {
    let clock = clock();
    let store = place
        .open(configure(builder(&clock)))
        .unwrap_or_else(|e| panic!("{:?}: open: {e}", place.engine()));
    TestStore {
        engine: place.engine(),
        store,
        clock,
        place,
    }
}

/// Runs `f` on a store at `place` with the default test settings, and closes it cleanly
/// afterwards.
///
/// # Panics
///
/// When the open or the close fails, or `f` panics.
pub fn with_store(place: &Place, f: impl FnOnce(&mut TestStore<'_>)) {
    with_store_with(place, |b| b, f);
}

/// As [`with_store`], with `configure` applied to the test builder.
///
/// # Panics
///
/// As [`with_store`].
pub fn with_store_with(
    place: &Place,
    configure: impl FnOnce(Builder) -> Builder,
    f: impl FnOnce(&mut TestStore<'_>),
) {
    let mut t = open(place, configure);
    f(&mut t);
    let engine = t.engine;
    t.store
        .close()
        .unwrap_or_else(|e| panic!("{engine:?}: close: {e}"));
}

/// A valid key in scope `"tenant"`.
pub fn key(id: &str) -> Key {
    Key::new("tenant", id).expect("valid key")
}

/// The fingerprint of `body`.
pub fn fp(body: &str) -> Fingerprint {
    Fingerprint::of(body.as_bytes())
}

/// `begin`, expecting `Started`.
#[track_caller]
pub fn started(store: &Store, key: &Key, fp: &Fingerprint) -> Lease {
    match store.begin(key, fp).expect("begin") {
        Begin::Started(lease) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}

/// `begin`, expecting `Replay`.
#[track_caller]
pub fn replay(store: &Store, key: &Key, fp: &Fingerprint) -> Completed {
    match store.begin(key, fp).expect("begin") {
        Begin::Replay(done) => done,
        other => panic!("expected Replay, got {other:?}"),
    }
}

/// `begin`, expecting `InFlight`; returns `retry_after`.
#[track_caller]
pub fn in_flight(store: &Store, key: &Key, fp: &Fingerprint) -> Duration {
    match store.begin(key, fp).expect("begin") {
        Begin::InFlight { retry_after } => retry_after,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// `begin`, expecting `Mismatch`.
#[track_caller]
pub fn mismatch(store: &Store, key: &Key, fp: &Fingerprint) {
    match store.begin(key, fp).expect("begin") {
        Begin::Mismatch => {}
        other => panic!("expected Mismatch, got {other:?}"),
    }
}

/// The fields of an in-flight entry, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightView {
    pub token: u64,
    pub lease_expires_at: SystemTime,
    pub attempt: u32,
    pub checkpoint: Option<Vec<u8>>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

/// `get`, expecting an in-flight entry.
#[track_caller]
pub fn get_in_flight(store: &Store, key: &Key) -> InFlightView {
    match store.get(key).expect("get") {
        Some(Entry::InFlight {
            token,
            lease_expires_at,
            attempt,
            checkpoint,
            created_at,
            expires_at,
            ..
        }) => InFlightView {
            token,
            lease_expires_at,
            attempt,
            checkpoint,
            created_at,
            expires_at,
        },
        other => panic!("expected an in-flight entry, got {other:?}"),
    }
}

/// `get`, expecting a completed entry.
#[track_caller]
pub fn get_completed(store: &Store, key: &Key) -> Completed {
    match store.get(key).expect("get") {
        Some(Entry::Completed(done)) => done,
        other => panic!("expected a completed entry, got {other:?}"),
    }
}

/// A temporary directory named `prefix…`: in memory-backed `/dev/shm` when there is one
/// (an fsync is then cheap), else in the system's temporary directory.
///
/// # Panics
///
/// When neither can hold a new directory.
pub fn scratch_dir(prefix: &str) -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(shm)
    {
        return d;
    }
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temporary directory")
}
