//! The fault-injecting storage backend: [`FaultyBackend`] wraps a redb storage backend (in
//! memory, or a file to exercise the lock methods) and forwards every method, the lock methods
//! and `close` included.
//!
//! Through its [`Faults`] handle a test arms a [`Fault`]: a countdown of `write`, `set_len` or
//! `sync_data` calls (one kind, or all three) after which a call fails, once or from then on.
//! The handle counts every call and keeps the images a crash could leave:
//!
//! * the *durable image*: the bytes as of the last successful `sync_data` (a power cut now);
//! * the *written image*: every successful write and length change, synced or not (a killed
//!   process, with everything it wrote in the file);
//! * a *torn image*: the durable image plus a random subset of the writes made since (a power
//!   cut during an fsync); length changes are kept, as the file system orders them;
//! * with [`Faults::record_syncs`], the durable and a torn image at every successful sync,
//!   labelled with what the test was doing ([`Faults::set_label`]): a power cut at each fsync.

use std::fmt;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use idemstore::StorageBackend;
use idemstore::backends::InMemoryBackend;
use redb::BackendError;

use crate::rng::{RngExt, TestRng, rng};

/// The calls a [`Fault`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `StorageBackend::write`.
    Write,
    /// `StorageBackend::set_len`.
    SetLen,
    /// `StorageBackend::sync_data`.
    Sync,
}

impl Call {
    /// Every kind of call.
    pub const ALL: [Call; 3] = [Call::Write, Call::SetLen, Call::Sync];
}

/// A countdown: after `pass` counted calls succeed, the next one fails (and, if `always`,
/// every later one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The kind of call counted; `None` counts all three.
    pub call: Option<Call>,
    /// Counted calls that still succeed before the failing one.
    pub pass: u64,
    /// Every counted call fails once the countdown ran out (else only the first).
    pub always: bool,
}

impl Fault {
    /// The `n`-th call of `call` from now fails (1 is the next one), and every later one if
    /// `always`.
    pub fn nth(call: Call, n: u64, always: bool) -> Fault {
        Fault {
            call: Some(call),
            pass: n.saturating_sub(1),
            always,
        }
    }

    /// Every `sync_data` from now on fails (a disk that is gone).
    pub fn every_sync() -> Fault {
        Fault::nth(Call::Sync, 1, true)
    }
}

/// A change made since the last successful sync.
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(image: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(offset, data) => {
            let start = usize::try_from(*offset).expect("offset fits");
            if image.len() < start + data.len() {
                image.resize(start + data.len(), 0);
            }
            image[start..start + data.len()].copy_from_slice(data);
        }
        Change::SetLen(len) => image.resize(usize::try_from(*len).expect("length fits"), 0),
    }
}

/// The durable image plus the changes of `pending` that `rng` picks (every length change,
/// a coin toss per write).
fn torn(durable: &[u8], pending: &[Change], rng: &mut TestRng) -> Vec<u8> {
    let mut image = durable.to_vec();
    for change in pending {
        if matches!(change, Change::SetLen(_)) || rng.random::<bool>() {
            apply(&mut image, change);
        }
    }
    image
}

/// The images of a power cut at one successful sync (see [`Faults::record_syncs`]).
pub struct SyncPoint {
    /// The label set when the sync ran ([`Faults::set_label`]).
    pub label: usize,
    /// The image this sync made durable.
    pub durable: Vec<u8>,
    /// The previous durable image plus a random subset of the writes this sync made durable.
    pub torn: Vec<u8>,
}

#[derive(Default)]
struct Disk {
    durable: Vec<u8>,
    pending: Vec<Change>,
    fault: Option<Fault>,
    /// `Some` while recording sync points, with the generator of their torn images.
    syncs: Option<(Vec<SyncPoint>, TestRng)>,
}

/// What a [`FaultyBackend`] and its test share.
#[derive(Default)]
struct State {
    disk: Mutex<Disk>,
    calls: [AtomicU64; 3],
    injected: AtomicU64,
    label: AtomicUsize,
    lock_calls: AtomicU64,
    closes: AtomicU64,
    /// How long each `sync_data` sleeps before it syncs, in microseconds (a slow disk).
    sync_delay_us: AtomicU64,
}

/// The test's handle on a [`FaultyBackend`]: arms faults, counts calls, takes crash images.
#[derive(Clone, Default)]
pub struct Faults(Arc<State>);

impl Faults {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.0.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms `fault` (its countdown starts now), or disarms with `None`.
    pub fn arm(&self, fault: Option<Fault>) {
        self.disk().fault = fault;
    }

    /// The armed fault with what is left of its countdown (`None` once a one-time fault
    /// fired): arm it on another backend to go on counting there.
    pub fn fault(&self) -> Option<Fault> {
        self.disk().fault
    }

    /// Calls of `call` so far, failed ones included.
    pub fn calls(&self, call: Call) -> u64 {
        self.0.calls[call as usize].load(SeqCst)
    }

    /// Calls failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.0.injected.load(SeqCst)
    }

    /// Calls of the lock methods so far.
    pub fn lock_calls(&self) -> u64 {
        self.0.lock_calls.load(SeqCst)
    }

    /// Calls of `close` so far.
    pub fn closes(&self) -> u64 {
        self.0.closes.load(SeqCst)
    }

    /// Makes every later `sync_data` take `delay` longer (a slow disk; zero: as fast as the
    /// inner backend). The sleep holds no lock: reads and writes go on meanwhile.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.0.sync_delay_us.store(us, SeqCst);
    }

    /// The bytes as of the last successful `sync_data`: a power cut now.
    pub fn durable(&self) -> Vec<u8> {
        self.disk().durable.clone()
    }

    /// Everything written, synced or not: a killed process.
    pub fn written(&self) -> Vec<u8> {
        let disk = self.disk();
        let mut image = disk.durable.clone();
        for change in &disk.pending {
            apply(&mut image, change);
        }
        image
    }

    /// The durable image plus a subset of the writes since, picked by a generator seeded
    /// with `seed`: a power cut during an fsync that made some of them durable.
    pub fn torn(&self, seed: u64) -> Vec<u8> {
        let disk = self.disk();
        torn(&disk.durable, &disk.pending, &mut rng(seed))
    }

    /// From now on, records a [`SyncPoint`] at every successful sync (torn images from a
    /// generator seeded with `seed`).
    pub fn record_syncs(&self, seed: u64) {
        self.disk().syncs = Some((Vec::new(), rng(seed)));
    }

    /// The sync points recorded so far; stops recording.
    pub fn take_syncs(&self) -> Vec<SyncPoint> {
        self.disk().syncs.take().map(|(s, _)| s).unwrap_or_default()
    }

    /// Labels the sync points recorded from now on (the operation a workload runs).
    pub fn set_label(&self, label: usize) {
        self.0.label.store(label, SeqCst);
    }

    /// Counts a call; `Err` when the armed fault fails it.
    fn tick(&self, disk: &mut Disk, call: Call) -> io::Result<()> {
        let n = self.0.calls[call as usize].fetch_add(1, SeqCst) + 1;
        let Some(fault) = disk.fault.as_mut() else {
            return Ok(());
        };
        if fault.call.is_some_and(|c| c != call) {
            return Ok(());
        }
        if fault.pass > 0 {
            fault.pass -= 1;
            return Ok(());
        }
        if !fault.always {
            disk.fault = None;
        }
        self.0.injected.fetch_add(1, SeqCst);
        Err(io::Error::other(format!(
            "injected fault: {call:?} call {n}"
        )))
    }
}

/// A redb storage backend with injected failures and crash images (see the module doc).
pub struct FaultyBackend<B = InMemoryBackend> {
    inner: B,
    faults: Faults,
}

impl FaultyBackend {
    /// An in-memory backend holding `image`; `image` counts as durable.
    pub fn in_memory(image: &[u8]) -> (FaultyBackend, Faults) {
        FaultyBackend::new(memory(image))
    }
}

impl<B: StorageBackend> FaultyBackend<B> {
    /// Wraps `inner`; what it holds already counts as durable.
    pub fn new(inner: B) -> (FaultyBackend<B>, Faults) {
        let len = inner.len().expect("backend length");
        let mut bytes = vec![0; usize::try_from(len).expect("length fits")];
        inner.read(0, &mut bytes).expect("backend read");
        let faults = Faults::default();
        faults.disk().durable = bytes;
        (
            FaultyBackend {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }

    fn lock_call(&self) {
        self.faults.0.lock_calls.fetch_add(1, SeqCst);
    }
}

/// redb's in-memory backend holding `image`.
pub fn memory(image: &[u8]) -> InMemoryBackend {
    let backend = InMemoryBackend::new();
    backend.set_len(image.len() as u64).expect("memory");
    backend.write(0, image).expect("memory");
    backend
}

impl<B> fmt::Debug for FaultyBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyBackend").finish_non_exhaustive()
    }
}

impl<B: StorageBackend> StorageBackend for FaultyBackend<B> {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.faults.disk();
        self.faults.tick(&mut disk, Call::SetLen)?;
        self.inner.set_len(len)?;
        disk.pending.push(Change::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.faults.0.sync_delay_us.load(SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        let mut disk = self.faults.disk();
        self.faults.tick(&mut disk, Call::Sync)?;
        self.inner.sync_data()?;
        let disk = &mut *disk;
        let pending = std::mem::take(&mut disk.pending);
        if let Some((syncs, rng)) = disk.syncs.as_mut() {
            let torn = torn(&disk.durable, &pending, rng);
            for change in &pending {
                apply(&mut disk.durable, change);
            }
            syncs.push(SyncPoint {
                label: self.faults.0.label.load(SeqCst),
                durable: disk.durable.clone(),
                torn,
            });
        } else {
            for change in &pending {
                apply(&mut disk.durable, change);
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.faults.disk();
        self.faults.tick(&mut disk, Call::Write)?;
        self.inner.write(offset, data)?;
        disk.pending.push(Change::Write(offset, data.to_vec()));
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.faults.0.closes.fetch_add(1, SeqCst);
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lock_call();
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.lock_call();
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lock_call();
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lock_call();
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lock_call();
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lock_call();
        self.inner.query_lock_range(start, end)
    }
}
