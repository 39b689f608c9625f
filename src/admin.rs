//! Looking inside a store, for tools and operators: [`Store::scan`], [`Store::inspect`] and
//! [`Store::summary`] on an open store, the same on a file opened read-only with
//! [`StoreFile`] (the `idemstore` command-line tool is built on them), and the types they
//! answer with, [`RecordView`] and [`Summary`].
//!
//! Unlike [`Store::get`], these see dead records too (expired, not yet deleted by the
//! reaper), flagged as such. They only read: each runs in one read transaction (a consistent
//! snapshot) and never blocks writers. `scan` and `summary` visit every record, so they cost
//! O(records): for tools, not for a request path.

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::Entry;
use crate::record::{Record, State};
use crate::storage;
use crate::store::{Store, Visit};

/// One stored record as [`Store::scan`] and [`Store::inspect`] see it, dead or alive.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordView {
    /// The record's key.
    pub key: Key,
    /// The fingerprint of the request that created the record.
    pub fingerprint: Fingerprint,
    /// What is stored: in flight (with its lease and checkpoint) or completed (with its
    /// response).
    pub entry: Entry,
    /// Whether the record is dead at the store's current time: absent for every operation,
    /// waiting for the reaper to delete it.
    pub dead: bool,
}

/// What [`Store::summary`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Live in-flight records (a request holds, or held, a lease).
    pub in_flight: u64,
    /// Of `in_flight`: those whose lease ran out (the holder crashed, stalled or dropped it);
    /// the next `begin` with the same request takes over.
    pub lease_expired: u64,
    /// Live completed records (replayed to retries).
    pub completed: u64,
    /// Dead in-flight records (absent for every operation, not yet reaped).
    pub dead_in_flight: u64,
    /// Dead completed records (absent for every operation, not yet reaped).
    pub dead_completed: u64,
    /// Bytes of stored responses in live completed records.
    pub response_bytes: u64,
    /// The last fencing token granted (0 when none was): the next lease gets a larger one.
    pub last_token: u64,
    /// The file's format version (the store opened, so it is one this build reads).
    pub format_version: u32,
    /// The size of the store file in bytes; `None` for a store in memory or on a custom
    /// backend.
    pub file_bytes: Option<u64>,
}

impl Summary {
    /// Every record in the file, live or dead.
    pub fn records(&self) -> u64 {
        self.live() + self.dead()
    }

    /// Live records (`in_flight + completed`).
    pub fn live(&self) -> u64 {
        self.in_flight + self.completed
    }

    /// Dead records, waiting for the reaper.
    pub fn dead(&self) -> u64 {
        self.dead_in_flight + self.dead_completed
    }
}

fn view(key: Key, record: Record, now: u64) -> RecordView {
    let dead = record.is_dead(now);
    let fingerprint = Fingerprint::from_bytes(record.fingerprint);
    RecordView {
        key,
        fingerprint,
        entry: Entry::from_record(record),
        dead,
    }
}

/// What the views read records from: an open store, or a file opened read-only.
trait Records {
    /// The store's current time.
    fn now(&self) -> Result<u64>;
    /// Walks every record in one snapshot; returns the token counter of that snapshot.
    fn walk(&self, visit: &mut Visit<'_>) -> Result<u64>;
    /// The record of an encoded key, dead or alive.
    fn record(&self, key: &[u8]) -> Result<Option<Record>>;
    /// The file, if the records are in one.
    fn file(&self) -> Option<&Path>;
    /// The format version of the file the records are in.
    fn format_version(&self) -> u32;
}

impl Records for Store {
    fn now(&self) -> Result<u64> {
        self.inner().now()
    }

    fn walk(&self, visit: &mut Visit<'_>) -> Result<u64> {
        self.inner().walk(visit)
    }

    fn record(&self, key: &[u8]) -> Result<Option<Record>> {
        self.inner().lookup(key).map(|(record, _)| record)
    }

    fn file(&self) -> Option<&Path> {
        self.path()
    }

    /// The version this build writes: a read-write open marks an older file with it.
    fn format_version(&self) -> u32 {
        storage::FORMAT_VERSION
    }
}

/// Visits every record of `from` with `visit` (see [`Store::scan`]).
fn scan(from: &impl Records, visit: &mut dyn FnMut(&RecordView) -> ControlFlow<()>) -> Result<u64> {
    let now = from.now()?;
    // The engine is guarded against panics on damaged pages; a panic of `visit` is the
    // caller's own and is resumed as it was, never reported as a damaged file.
    let mut visitor_panic = None;
    let mut visited = 0;
    from.walk(&mut |key, record| {
        let key = Key::decode(key)?;
        visited += 1;
        let record = view(key, record, now);
        Ok(match catch_unwind(AssertUnwindSafe(|| visit(&record))) {
            Ok(flow) => flow,
            Err(payload) => {
                visitor_panic = Some(payload);
                ControlFlow::Break(())
            }
        })
    })?;
    if let Some(payload) = visitor_panic {
        resume_unwind(payload);
    }
    Ok(visited)
}

/// The record of `key` in `from`, dead or alive (see [`Store::inspect`]).
fn inspect(from: &impl Records, key: &Key) -> Result<Option<RecordView>> {
    let now = from.now()?;
    let record = from.record(&key.encode())?;
    Ok(record.map(|r| view(key.clone(), r, now)))
}

/// Counts the records of `from` (see [`Store::summary`]).
fn summary(from: &impl Records) -> Result<Summary> {
    let now = from.now()?;
    let mut summary = Summary {
        format_version: from.format_version(),
        ..Summary::default()
    };
    summary.last_token = from.walk(&mut |_, record| {
        let dead = record.is_dead(now);
        match &record.state {
            State::InFlight {
                lease_expires_at, ..
            } => {
                if dead {
                    summary.dead_in_flight += 1;
                } else {
                    summary.in_flight += 1;
                    if now >= *lease_expires_at {
                        summary.lease_expired += 1;
                    }
                }
            }
            State::Completed { response, .. } => {
                if dead {
                    summary.dead_completed += 1;
                } else {
                    summary.completed += 1;
                    summary.response_bytes += response.len() as u64;
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if let Some(path) = from.file() {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::storage(format!("reading the size of {}", path.display()), e))?;
        summary.file_bytes = Some(meta.len());
    }
    Ok(summary)
}

impl Store {
    /// Visits every record, dead ones included, in the order their keys were claimed (oldest
    /// first; a key deleted and claimed again counts from its new claim), until `visit`
    /// returns [`ControlFlow::Break`]. Returns how many records were visited.
    ///
    /// The visit runs inside one read transaction: it sees a snapshot, and writers are not
    /// blocked. Costs O(records); meant for tools such as the `idemstore` CLI.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use idemstore::{Begin, Fingerprint, Key, Store};
    ///
    /// let store = Store::builder().open_in_memory()?;
    /// let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
    /// let Begin::Started(lease) = store.begin(&key, &Fingerprint::of(b"req"))? else { unreachable!() };
    /// lease.complete(b"done")?;
    ///
    /// let mut ids = Vec::new();
    /// let visited = store.scan(|record| {
    ///     ids.push(record.key.id().to_owned());
    ///     ControlFlow::Continue(())
    /// })?;
    /// assert_eq!((visited, ids), (1, vec![key.id().to_owned()]));
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record or key (the scan stops there),
    /// [`Error::Storage`], [`Error::Closed`].
    ///
    /// # Panics
    /// Only if `visit` panics: its panic is passed on unchanged.
    pub fn scan(&self, mut visit: impl FnMut(&RecordView) -> ControlFlow<()>) -> Result<u64> {
        scan(self, &mut visit)
    }

    /// The record stored under `key`, dead or alive (unlike [`Store::get`], which treats a
    /// dead record as absent). `None` when there is no record at all.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record, [`Error::Storage`], [`Error::Closed`].
    pub fn inspect(&self, key: &Key) -> Result<Option<RecordView>> {
        inspect(self, key)
    }

    /// Counts the records by state, live and dead, and reads the fencing-token counter and
    /// the file size. Visits every record (O(records)), in one read transaction.
    ///
    /// ```
    /// use idemstore::{Begin, Fingerprint, Key, Store};
    ///
    /// let store = Store::builder().open_in_memory()?;
    /// let key = Key::new("", "k1")?;
    /// let Begin::Started(lease) = store.begin(&key, &Fingerprint::of(b"req"))? else { unreachable!() };
    /// let summary = store.summary()?;
    /// assert_eq!((summary.in_flight, summary.completed, summary.last_token), (1, 0, lease.token()));
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record or meta table, [`Error::Storage`] (also when
    /// the file's size cannot be read), [`Error::Closed`].
    pub fn summary(&self) -> Result<Summary> {
        summary(self)
    }
}

/// A store file opened read-only, for tools: the views of [`Store::scan`],
/// [`Store::inspect`] and [`Store::summary`] without opening the store. Nothing is ever
/// written to the file (a read-write open updates its meta table and may repair it).
///
/// The file must not be open for writing elsewhere (a running service holds its store open
/// exclusively): that is [`Error::AlreadyOpen`]. It has no key index, so
/// [`inspect`](StoreFile::inspect) walks the records (O(records)).
///
/// ```
/// use std::ops::ControlFlow;
/// use idemstore::admin::StoreFile;
/// use idemstore::{Begin, Fingerprint, Key, Store};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("idempotency.redb");
/// let store = Store::open(&path)?;
/// let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
/// let Begin::Started(lease) = store.begin(&key, &Fingerprint::of(b"req"))? else { unreachable!() };
/// lease.complete(b"done")?;
/// store.close()?;
///
/// let file = StoreFile::open(&path)?;
/// assert_eq!(file.summary()?.completed, 1);
/// assert!(file.inspect(&key)?.is_some());
/// # Ok::<(), idemstore::Error>(())
/// ```
pub struct StoreFile {
    file: storage::ReadOnlyFile,
    path: PathBuf,
}

impl StoreFile {
    /// Opens the store file at `path` read-only. It is checked like any open (a foreign file
    /// or another format version is refused), and never created or modified.
    ///
    /// # Errors
    /// * [`Error::AlreadyOpen`]: a process has the file open for writing.
    /// * [`Error::IncompatibleFormat`]: not a store of this format version, or an empty file
    ///   (not a store yet).
    /// * [`Error::Corrupt`]: a damaged file.
    /// * [`Error::Storage`]: a missing file, a directory, no permission, or a file that needs
    ///   crash recovery (its last writer did not close it; a read-write open repairs it).
    pub fn open(path: impl AsRef<Path>) -> Result<StoreFile> {
        let path = path.as_ref();
        Ok(StoreFile {
            file: storage::open_read_only(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// As [`Store::scan`].
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record or key (the scan stops there),
    /// [`Error::Storage`], [`Error::Clock`].
    ///
    /// # Panics
    /// Only if `visit` panics: its panic is passed on unchanged.
    pub fn scan(&self, mut visit: impl FnMut(&RecordView) -> ControlFlow<()>) -> Result<u64> {
        scan(self, &mut visit)
    }

    /// As [`Store::inspect`]; walks the records to find the key.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record, [`Error::Storage`], [`Error::Clock`].
    pub fn inspect(&self, key: &Key) -> Result<Option<RecordView>> {
        inspect(self, key)
    }

    /// As [`Store::summary`].
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record or meta table, [`Error::Storage`] (also when
    /// the file's size cannot be read), [`Error::Clock`].
    pub fn summary(&self) -> Result<Summary> {
        summary(self)
    }
}

impl Records for StoreFile {
    fn now(&self) -> Result<u64> {
        self.file.timeline.nanos()
    }

    fn walk(&self, visit: &mut Visit<'_>) -> Result<u64> {
        self.file.walk_log(visit)
    }

    fn record(&self, key: &[u8]) -> Result<Option<Record>> {
        self.file.read_record(key)
    }

    fn file(&self) -> Option<&Path> {
        Some(&self.path)
    }

    /// As found in the file: a read-only open leaves an older version as it is.
    fn format_version(&self) -> u32 {
        self.file.format_version
    }
}

impl std::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFile")
            .field("path", &self.path)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{Begin, ManualClock};

    fn started(store: &Store, key: &Key) -> crate::Lease {
        match store.begin(key, &Fingerprint::of(key.id())).unwrap() {
            Begin::Started(lease) => lease,
            other => panic!("expected Started, got {other:?}"),
        }
    }

    #[test]
    fn summary_and_scan_count_live_and_dead_records() {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::builder()
            .ttl(Duration::from_secs(100))
            .lease(Duration::from_secs(10))
            .reap_interval(None)
            .clock(clock.clone())
            .open(dir.path().join("s.redb"))
            .unwrap();
        let key = |id: &str| Key::new("t", id).unwrap();

        started(&store, &key("old-done"))
            .complete(b"12345")
            .unwrap();
        clock.advance(Duration::from_secs(150)); // old-done is dead now
        started(&store, &key("done")).complete(b"abc").unwrap();
        let stalled = started(&store, &key("stalled"));
        let stalled_token = stalled.token();
        std::mem::forget(stalled); // a crashed holder: no release
        clock.advance(Duration::from_secs(20)); // its lease ran out
        let running = started(&store, &key("running"));

        let s = store.summary().unwrap();
        assert_eq!((s.in_flight, s.lease_expired), (2, 1));
        assert_eq!((s.completed, s.response_bytes), (1, 3));
        assert_eq!((s.dead_completed, s.dead_in_flight), (1, 0));
        assert_eq!((s.records(), s.live(), s.dead()), (4, 3, 1));
        assert_eq!(s.last_token, running.token());
        assert_eq!(s.format_version, storage::FORMAT_VERSION);
        assert!(s.file_bytes.unwrap() > 0);

        let mut seen = Vec::new();
        let n = store
            .scan(|r| {
                seen.push((r.key.id().to_owned(), r.dead));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n, 4);
        let expected = [
            ("old-done", true),
            ("done", false),
            ("stalled", false),
            ("running", false),
        ];
        let expected: Vec<_> = expected.iter().map(|(k, d)| (k.to_string(), *d)).collect();
        assert_eq!(seen, expected);

        // A panic of the visitor is passed on, not reported as a damaged file.
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = store.scan(|_| panic!("visitor bug"));
        }));
        let payload = caught.expect_err("the visitor's panic is resumed");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"visitor bug"));

        // Break stops the visit.
        assert_eq!(store.scan(|_| ControlFlow::Break(())).unwrap(), 1);

        // inspect sees the dead record that get hides.
        assert!(store.get(&key("old-done")).unwrap().is_none());
        let old = store.inspect(&key("old-done")).unwrap().unwrap();
        assert!(old.dead);
        assert_eq!(old.fingerprint, Fingerprint::of("old-done"));
        let stalled = store.inspect(&key("stalled")).unwrap().unwrap();
        assert!(matches!(stalled.entry, Entry::InFlight { token, .. } if token == stalled_token));
        assert!(store.inspect(&key("never")).unwrap().is_none());

        drop(running);
        store.close().unwrap();
    }

    #[test]
    fn a_store_file_opened_read_only_sees_the_records_and_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::builder().reap_interval(None).open(&path).unwrap();
        let key = Key::new("t", "done").unwrap();
        started(&store, &key).complete(b"abc").unwrap();
        std::mem::forget(started(&store, &Key::new("t", "stalled").unwrap()));

        // Held open for writing: refused, as a service's file is.
        assert!(matches!(
            StoreFile::open(&path),
            Err(Error::AlreadyOpen { .. })
        ));
        store.close().unwrap();

        let before = std::fs::read(&path).unwrap();
        let file = StoreFile::open(&path).unwrap();
        let s = file.summary().unwrap();
        assert_eq!((s.completed, s.in_flight, s.records()), (1, 1, 2));
        assert_eq!(s.file_bytes, Some(before.len() as u64));
        let done = file.inspect(&key).unwrap().unwrap();
        assert!(matches!(&done.entry, Entry::Completed(c) if c.response() == b"abc"));
        assert!(
            file.inspect(&Key::new("t", "never").unwrap())
                .unwrap()
                .is_none()
        );
        let mut ids = Vec::new();
        file.scan(|r| {
            ids.push(r.key.id().to_owned());
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ids, ["done", "stalled"]);
        drop(file);
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the file is unchanged"
        );

        // A store file is required: an empty file or a foreign one is refused untouched.
        let empty = dir.path().join("empty.redb");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            StoreFile::open(&empty),
            Err(Error::IncompatibleFormat { .. })
        ));
        let foreign = dir.path().join("foreign.txt");
        std::fs::write(&foreign, b"not a store").unwrap();
        assert!(StoreFile::open(&foreign).is_err());
        assert_eq!(std::fs::read(&foreign).unwrap(), b"not a store");
    }
}
