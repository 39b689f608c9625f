//! The test builders and helpers: stores of both kinds (in memory and on a file) driven by a
//! `ManualClock`, so that every behaviour test runs over both backends, and `begin`/`get`
//! helpers that expect one answer.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::{Begin, Builder, Completed, Entry, Fingerprint, Key, Lease, ManualClock, Store};
use tempfile::TempDir;

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

/// Which backend a [`TestStore`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Memory,
    File,
}

/// A store under test, with its clock and (for the file kind) its directory and path.
pub struct TestStore {
    pub kind: Kind,
    pub store: Store,
    pub clock: ManualClock,
    pub path: Option<PathBuf>,
    dir: Option<TempDir>,
}

impl TestStore {
    /// The store file (file kind only).
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("only file stores have a path")
    }

    /// Closes the store and opens the same file again with `configure(builder(clock))`.
    /// File kind only.
    pub fn reopen_with(&mut self, configure: impl FnOnce(Builder) -> Builder) {
        assert_eq!(self.kind, Kind::File, "only a file store can be reopened");
        let path = self.path().to_owned();
        let old = std::mem::replace(
            &mut self.store,
            // A placeholder while the file is closed; replaced right below.
            builder(&self.clock)
                .open_in_memory()
                .expect("placeholder store"),
        );
        old.close().expect("close before reopen");
        let placeholder = std::mem::replace(
            &mut self.store,
            configure(builder(&self.clock))
                .open(&path)
                .expect("reopen the store file"),
        );
        placeholder.close().expect("close placeholder");
    }

    /// Closes the store and opens the same file again with the default test settings.
    pub fn reopen(&mut self) {
        self.reopen_with(|b| b);
    }

    /// The temporary directory holding the store file (file kind only).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

/// Opens a store of `kind` with `configure(builder(clock))` and a fresh clock at [`start`].
pub fn open(kind: Kind, configure: impl FnOnce(Builder) -> Builder) -> TestStore {
    let clock = clock();
    let b = configure(builder(&clock));
    match kind {
        Kind::Memory => TestStore {
            kind,
            store: b.open_in_memory().expect("open in-memory store"),
            clock,
            path: None,
            dir: None,
        },
        Kind::File => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("idem.redb");
            TestStore {
                kind,
                store: b.open(&path).expect("open file store"),
                clock,
                path: Some(path),
                dir: Some(dir),
            }
        }
    }
}

/// Runs `f` once on an in-memory store and once on a file store, both with the default test
/// settings. The store is closed cleanly afterwards.
pub fn for_each_store(f: impl Fn(&mut TestStore)) {
    for_each_store_with(|b| b, f);
}

/// As [`for_each_store`], with `configure` applied to the test builder.
pub fn for_each_store_with(configure: impl Fn(Builder) -> Builder, f: impl Fn(&mut TestStore)) {
    for kind in [Kind::Memory, Kind::File] {
        let mut t = open(kind, &configure);
        f(&mut t);
        let TestStore { store, dir, .. } = t;
        store
            .close()
            .unwrap_or_else(|e| panic!("{kind:?}: close: {e}"));
        drop(dir);
    }
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
