//! Operation sequences (SPEC §3, §4), two modes picked by the first input byte.
//!
//! **Model mode** (`mode % 4` is 0, 1: in memory; 2: a file, where `Reopen` closes and
//! reopens it): the shared operation enum and checker of `tests/support/model.rs` (also run
//! by the proptest model test): every answer, every `get` and the counters are compared with
//! a `HashMap` model of SPEC §3 after every step.
//!
//! **Fault mode** (`mode % 4 == 3`): the model checker cannot inject faults, so this mode
//! runs the same operations on a store opened with `Builder::open_backend` on [`FaultBackend`]:
//! redb's `InMemoryBackend` with every method forwarded (the lock methods and `close`
//! included), failing the Nth `write` / `set_len` / `sync_data` (which of them, N, and once
//! or from then on, come from the input). It keeps the *durable image*: the bytes as of the
//! last successful `sync_data`. It checks:
//! * nothing panics, and every error is typed: `Storage` or `Poisoned` for a fault (besides
//!   the refusals that need no disk: `ResponseTooLarge`, `InvalidConfig`, `LeaseLost`);
//! * until the store is reopened after a fault, no write is acknowledged;
//! * every replay returns the bytes of the acknowledged completion;
//! * after the fault, the durable image (a power cut then), the image of everything written
//!   (a crash with all pending writes on disk) and the durable image plus a subset of the
//!   pending writes (a torn fsync) each pass redb's integrity check and open as a store in
//!   which every key is exactly as acknowledged, except the key of the failed operation,
//!   which may instead be exactly as that operation requested (no half state); every
//!   acknowledged completion replays its bytes; the next token exceeds every token seen.
//!
//! The run then goes on from the durable image (up to [`MAX_FAULTS`] faults per input); at
//! the end the store is closed cleanly and reopened, and every key must be as acknowledged.
#![no_main]

#[path = "../../tests/support/model.rs"]
mod model;

use std::fmt;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use idemstore::backends::InMemoryBackend;
use idemstore::{
    Begin, Clock, Durability, Entry, Error, Fingerprint, Key, Lease, ManualClock, StorageBackend,
    Store,
};
use libfuzzer_sys::fuzz_target;
use model::{By, FINGERPRINTS, KEYS, MAX_BYTES, Op, Size, Tick};
use redb::BackendError;

/// Operations per input at most (longer inputs are cut).
const MAX_OPS: usize = 96;
/// Faults per input at most; the countdown restarts after each reopen.
const MAX_FAULTS: usize = 4;
/// Operations run on a faulted store before it is reopened (they must all be refused).
const AFTER_FAULT: usize = 3;

// ---------------------------------------------------------------------------------------
// The fault-injecting backend

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Write,
    SetLen,
    Sync,
}

#[derive(Clone, Copy, Debug)]
struct Fault {
    /// `None`: any of the three calls counts.
    call: Option<Call>,
    /// Fails the call with this 0-based index among the counted ones.
    n: u64,
    /// Fails every counted call from the Nth on (else only the Nth).
    always: bool,
}

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

#[derive(Default)]
struct Disk {
    /// The bytes as of the last successful `sync_data`.
    durable: Vec<u8>,
    /// Successful writes and length changes since then.
    pending: Vec<Change>,
    fault: Option<Fault>,
    /// Counted calls since the fault was armed.
    counted: u64,
    injected: u64,
}

impl Disk {
    fn with_image(image: Vec<u8>) -> Disk {
        Disk {
            durable: image,
            ..Disk::default()
        }
    }

    /// Whether this call fails.
    fn inject(&mut self, call: Call) -> bool {
        let Some(f) = self.fault else { return false };
        if f.call.is_some_and(|c| c != call) {
            return false;
        }
        let i = self.counted;
        self.counted += 1;
        let fail = if f.always { i >= f.n } else { i == f.n };
        self.injected += u64::from(fail);
        fail
    }

    /// Everything written, synced or not.
    fn live(&self) -> Vec<u8> {
        let mut image = self.durable.clone();
        for c in &self.pending {
            apply(&mut image, c);
        }
        image
    }

    /// The durable image plus the pending changes picked by `mask` (a power cut during an
    /// fsync that made some of them durable).
    fn torn(&self, mask: u64) -> Vec<u8> {
        let mut image = self.durable.clone();
        for (i, c) in self.pending.iter().enumerate() {
            if mask.rotate_left(i as u32) & 1 == 1 {
                apply(&mut image, c);
            }
        }
        image
    }
}

/// redb's `InMemoryBackend`, every method forwarded, with injected failures and a durable
/// image (see the module doc).
struct FaultBackend {
    inner: InMemoryBackend,
    disk: Arc<Mutex<Disk>>,
}

impl fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultBackend")
            .field("inner", &self.inner)
            .finish()
    }
}

fn injected() -> io::Error {
    io::Error::other("injected I/O failure")
}

fn lock(disk: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultBackend {
    /// A backend holding `image`, sharing its bookkeeping with the caller.
    fn new(image: &[u8]) -> (FaultBackend, Arc<Mutex<Disk>>) {
        let inner = InMemoryBackend::new();
        inner.set_len(image.len() as u64).expect("memory");
        inner.write(0, image).expect("memory");
        let disk = Arc::new(Mutex::new(Disk::with_image(image.to_vec())));
        (
            FaultBackend {
                inner,
                disk: disk.clone(),
            },
            disk,
        )
    }
}

impl StorageBackend for FaultBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        if disk.inject(Call::SetLen) {
            return Err(injected());
        }
        self.inner.set_len(len)?;
        disk.pending.push(Change::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        if disk.inject(Call::Sync) {
            return Err(injected());
        }
        self.inner.sync_data()?;
        let pending = std::mem::take(&mut disk.pending);
        for c in &pending {
            apply(&mut disk.durable, c);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        if disk.inject(Call::Write) {
            return Err(injected());
        }
        self.inner.write(offset, data)?;
        disk.pending.push(Change::Write(offset, data.to_vec()));
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

// ---------------------------------------------------------------------------------------
// What was acknowledged

/// The part of a key's state that acknowledged operations determine (lease deadlines are
/// left out: a release on drop moves them without an acknowledgement).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Absent,
    InFlight {
        token: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
    },
    Completed {
        token: u64,
        response: Vec<u8>,
    },
}

/// What the key of a failed write may hold instead of its acknowledged state.
#[derive(Clone, Debug)]
enum Requested {
    /// A claim: in flight with a token above every earlier one.
    Claim {
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
    },
    Exactly(Seen),
}

fn seen(entry: Option<Entry>) -> Seen {
    match entry {
        None => Seen::Absent,
        Some(Entry::InFlight {
            token,
            attempt,
            checkpoint,
            ..
        }) => Seen::InFlight {
            token,
            attempt,
            checkpoint,
        },
        Some(Entry::Completed(c)) => Seen::Completed {
            token: c.token(),
            response: c.response().to_vec(),
        },
    }
}

/// `ttl` and `lease` of the store under test: nothing dies during a run (the clock moves
/// at most `MAX_OPS` leases forward), so acknowledged states stay visible.
const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(2);
const START: Duration = Duration::from_secs(1_700_000_000);

fn payload(size: Size, step: usize) -> Vec<u8> {
    let len = match size {
        Size::Empty => 0,
        Size::One => 1,
        Size::Some => 17,
        Size::Max => MAX_BYTES,
        Size::TooLarge => MAX_BYTES + 1,
    };
    (0..len)
        .map(|j| (step as u8).wrapping_mul(31).wrapping_add(j as u8))
        .collect()
}

fn open(backend: FaultBackend, clock: &ManualClock) -> idemstore::Result<Store> {
    Store::builder()
        .ttl(TTL)
        .lease(LEASE)
        .reap_interval(None)
        .max_response_bytes(MAX_BYTES)
        .durability(Durability::Immediate)
        .cache_bytes(1 << 20)
        .clock(clock.clone())
        .open_backend(backend)
}

/// An error a fault may cause.
fn fault_error(what: &str, e: &Error) {
    assert!(
        matches!(e, Error::Storage { .. } | Error::Poisoned),
        "{what}: a fault gave {e:?}, not Storage or Poisoned"
    );
}

struct Held {
    lease: Lease,
    key: usize,
    token: u64,
}

struct Run {
    clock: ManualClock,
    keys: Vec<Key>,
    fps: Vec<Fingerprint>,
    acked: Vec<Seen>,
    max_token: u64,
    held: Vec<Held>,
    faults: usize,
    probes: usize,
}

/// The outcome of one operation on a store that has not failed.
enum Step {
    Done,
    /// A write failed: `key` may hold `requested` instead of its acknowledged state.
    Failed(Option<(usize, Requested)>),
}

impl Run {
    fn pick(&self, lease: u8) -> Option<usize> {
        (!self.held.is_empty()).then(|| usize::from(lease) % self.held.len())
    }

    fn advance(&self, tick: Tick) {
        let now = self
            .clock
            .now()
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch");
        let ms = Duration::from_millis(1);
        let to = match tick {
            Tick::Zero => now,
            Tick::Ms => now + ms,
            Tick::LeaseMinusMs => now + LEASE - ms,
            Tick::Lease => now + LEASE,
            // Never near the ttl: acknowledged records must stay alive.
            Tick::LeasePlusMs | Tick::TtlMinusMs | Tick::Ttl | Tick::TtlPlusMs => now + LEASE + ms,
            Tick::BackMs => now.saturating_sub(ms),
            Tick::BackLease => now.saturating_sub(LEASE),
        };
        self.clock.set(UNIX_EPOCH + to);
    }

    /// Checks a replay against the acknowledged completion.
    fn check_replay(&self, k: usize, token: u64, response: &[u8], alt: Option<&Requested>) {
        let got = Seen::Completed {
            token,
            response: response.to_vec(),
        };
        let ok = self.acked[k] == got || matches!(alt, Some(Requested::Exactly(s)) if *s == got);
        assert!(
            ok,
            "key {k}: replayed {got:?}, acknowledged {:?}",
            self.acked[k]
        );
    }

    /// Runs one operation on a healthy store.
    fn step(&mut self, store: &Store, step: usize, op: &Op) -> Step {
        match *op {
            Op::Begin { key, fp } => {
                let (k, f) = (usize::from(key) % KEYS.len(), usize::from(fp) % 2);
                let requested = match &self.acked[k] {
                    Seen::Absent => Requested::Claim {
                        attempt: 1,
                        checkpoint: None,
                    },
                    Seen::InFlight {
                        attempt,
                        checkpoint,
                        ..
                    } => Requested::Claim {
                        attempt: attempt.saturating_add(1),
                        checkpoint: checkpoint.clone(),
                    },
                    Seen::Completed { .. } => Requested::Exactly(self.acked[k].clone()),
                };
                match store.begin(&self.keys[k], &self.fps[f]) {
                    Ok(Begin::Started(lease)) => {
                        let token = lease.token();
                        assert!(
                            token > self.max_token,
                            "token {token} not above {}",
                            self.max_token
                        );
                        self.max_token = token;
                        let (attempt, checkpoint) = match lease.recovered() {
                            Some(r) => (r.attempt(), r.checkpoint().map(<[u8]>::to_vec)),
                            None => (1, None),
                        };
                        if let (Seen::InFlight { token: prev, .. }, Some(r)) =
                            (&self.acked[k], lease.recovered())
                        {
                            assert_eq!(r.previous_token(), *prev, "key {k}: recovered token");
                        }
                        self.acked[k] = Seen::InFlight {
                            token,
                            attempt,
                            checkpoint,
                        };
                        self.held.push(Held {
                            lease,
                            key: k,
                            token,
                        });
                    }
                    Ok(Begin::Replay(c)) => self.check_replay(k, c.token(), c.response(), None),
                    Ok(_) => {}
                    Err(e) => {
                        fault_error("begin", &e);
                        return Step::Failed(Some((k, requested)));
                    }
                }
            }
            Op::Complete { lease, size } => {
                let Some(i) = self.pick(lease) else {
                    return Step::Done;
                };
                let h = self.held.remove(i);
                let bytes = payload(size, step);
                let requested = Requested::Exactly(Seen::Completed {
                    token: h.token,
                    response: bytes.clone(),
                });
                match h.lease.complete(&bytes) {
                    Ok(done) => {
                        assert_eq!(done.response(), bytes.as_slice());
                        assert_eq!(done.token(), h.token);
                        self.acked[h.key] = Seen::Completed {
                            token: h.token,
                            response: bytes,
                        };
                    }
                    Err(Error::ResponseTooLarge { .. }) => assert!(bytes.len() > MAX_BYTES),
                    Err(Error::LeaseLost { token }) => assert_eq!(token, h.token),
                    Err(e) => {
                        fault_error("complete", &e);
                        return Step::Failed(Some((h.key, requested)));
                    }
                }
            }
            Op::Extend { lease, by } => {
                let Some(i) = self.pick(lease) else {
                    return Step::Done;
                };
                let by = match by {
                    By::Zero => Duration::ZERO,
                    By::Ms => Duration::from_millis(1),
                    By::Lease => LEASE,
                    By::Ttl => TTL,
                    By::TwoTtl => 2 * TTL,
                };
                let k = self.held[i].key;
                match self.held[i].lease.extend(by) {
                    Ok(()) | Err(Error::LeaseLost { .. }) => {}
                    Err(Error::InvalidConfig { .. }) => assert!(by.is_zero()),
                    Err(e) => {
                        fault_error("extend", &e);
                        let same = Requested::Exactly(self.acked[k].clone());
                        return Step::Failed(Some((k, same)));
                    }
                }
            }
            Op::Checkpoint { lease, size } => {
                let Some(i) = self.pick(lease) else {
                    return Step::Done;
                };
                let bytes = payload(size, step);
                let (k, token) = (self.held[i].key, self.held[i].token);
                let requested = match &self.acked[k] {
                    Seen::InFlight {
                        token: t, attempt, ..
                    } if *t == token => Requested::Exactly(Seen::InFlight {
                        token,
                        attempt: *attempt,
                        checkpoint: Some(bytes.clone()),
                    }),
                    other => Requested::Exactly(other.clone()),
                };
                match self.held[i].lease.checkpoint(&bytes) {
                    Ok(()) => match &mut self.acked[k] {
                        Seen::InFlight {
                            token: t,
                            checkpoint,
                            ..
                        } if *t == token => *checkpoint = Some(bytes),
                        other => panic!("checkpoint of token {token} acknowledged on {other:?}"),
                    },
                    Err(Error::ResponseTooLarge { .. }) => assert!(bytes.len() > MAX_BYTES),
                    Err(Error::LeaseLost { .. }) => {}
                    Err(e) => {
                        fault_error("checkpoint", &e);
                        return Step::Failed(Some((k, requested)));
                    }
                }
            }
            Op::Abandon { lease } => {
                let Some(i) = self.pick(lease) else {
                    return Step::Done;
                };
                let h = self.held.remove(i);
                let current =
                    matches!(&self.acked[h.key], Seen::InFlight { token, .. } if *token == h.token);
                let requested = if current {
                    Requested::Exactly(Seen::Absent)
                } else {
                    Requested::Exactly(self.acked[h.key].clone())
                };
                match h.lease.abandon() {
                    Ok(()) => {
                        assert!(current, "abandon of a lease that is not current");
                        self.acked[h.key] = Seen::Absent;
                    }
                    Err(Error::LeaseLost { .. }) => {}
                    Err(e) => {
                        fault_error("abandon", &e);
                        return Step::Failed(Some((h.key, requested)));
                    }
                }
            }
            Op::Drop { lease } => {
                if let Some(i) = self.pick(lease) {
                    // A best-effort release: its failure is silent (the next write reports it).
                    drop(self.held.remove(i));
                }
            }
            Op::Advance(tick) => self.advance(tick),
            Op::Reap => match store.reap() {
                Ok(n) => assert_eq!(n, 0, "reap deleted live records"),
                Err(e) => {
                    fault_error("reap", &e);
                    return Step::Failed(None);
                }
            },
            Op::Reopen { .. } => unreachable!("handled by the driver"),
        }
        Step::Done
    }

    /// Runs an operation on a store that failed: nothing may be acknowledged.
    fn step_refused(
        &mut self,
        store: &Store,
        step: usize,
        op: &Op,
        alt: Option<&(usize, Requested)>,
    ) {
        let alt_for = |k: usize| alt.filter(|(key, _)| *key == k).map(|(_, r)| r);
        match *op {
            Op::Begin { key, fp } => {
                let (k, f) = (usize::from(key) % KEYS.len(), usize::from(fp) % 2);
                match store.begin(&self.keys[k], &self.fps[f]) {
                    Ok(Begin::Started(l)) => panic!("begin started {} after a fault", l.token()),
                    Ok(Begin::Replay(c)) => {
                        self.check_replay(k, c.token(), c.response(), alt_for(k))
                    }
                    Ok(_) => {}
                    Err(e) => fault_error("begin after a fault", &e),
                }
            }
            Op::Complete { lease, size } => {
                if let Some(i) = self.pick(lease) {
                    let h = self.held.remove(i);
                    match h.lease.complete(&payload(size, step)) {
                        Ok(_) => panic!("complete acknowledged after a fault"),
                        Err(Error::ResponseTooLarge { .. }) => {}
                        Err(e) => fault_error("complete after a fault", &e),
                    }
                }
            }
            Op::Extend { lease, .. } => {
                if let Some(i) = self.pick(lease) {
                    let r = self.held[i].lease.extend(LEASE);
                    assert!(r.is_err(), "extend acknowledged after a fault");
                    fault_error("extend after a fault", &r.unwrap_err());
                }
            }
            Op::Checkpoint { lease, size } => {
                if let Some(i) = self.pick(lease) {
                    match self.held[i].lease.checkpoint(&payload(size, step)) {
                        Ok(()) => panic!("checkpoint acknowledged after a fault"),
                        Err(Error::ResponseTooLarge { .. }) => {}
                        Err(e) => fault_error("checkpoint after a fault", &e),
                    }
                }
            }
            Op::Abandon { lease } => {
                if let Some(i) = self.pick(lease) {
                    let r = self.held.remove(i).lease.abandon();
                    assert!(r.is_err(), "abandon acknowledged after a fault");
                    fault_error("abandon after a fault", &r.unwrap_err());
                }
            }
            Op::Drop { lease } => {
                if let Some(i) = self.pick(lease) {
                    drop(self.held.remove(i));
                }
            }
            Op::Advance(tick) => self.advance(tick),
            Op::Reap => {
                let r = store.reap();
                assert!(r.is_err(), "reap acknowledged after a fault");
                fault_error("reap after a fault", &r.unwrap_err());
            }
            Op::Reopen { .. } => {}
        }
    }

    /// Opens `image` (a crash image), checks it, and returns the store and the state it
    /// holds per key.
    /// `keep`: the run goes on from this image (its probe token counts for later checks).
    fn check_image(
        &mut self,
        what: &str,
        image: &[u8],
        alt: Option<&(usize, Requested)>,
        keep: bool,
    ) -> (Store, Arc<Mutex<Disk>>, Vec<Seen>) {
        let mut image = image;
        if !image.is_empty() && !image.starts_with(&REDB_MAGIC) {
            // The creation of the store was cut before redb wrote its magic number (redb writes
            // it last): a non-empty file that no open accepts. Only possible before anything
            // was acknowledged. Refused with a typed error; the user deletes the file.
            assert!(
                self.max_token == 0 && self.acked.iter().all(|s| *s == Seen::Absent),
                "{what}: no redb magic number after writes were acknowledged"
            );
            match open(FaultBackend::new(image).0, &self.clock) {
                Ok(_) => panic!("{what}: a store opened on a file without redb's magic number"),
                Err(e) => assert!(
                    matches!(e, Error::Storage { .. } | Error::IncompatibleFormat { .. }),
                    "{what}: {e:?}"
                ),
            }
            image = &[];
        }
        integrity(what, image);
        let (backend, disk) = FaultBackend::new(image);
        let store = match open(backend, &self.clock) {
            Ok(s) => s,
            Err(e) => panic!("{what}: the store does not open: {e:?}"),
        };
        let mut state = Vec::with_capacity(KEYS.len());
        let mut top = self.max_token;
        for (k, key) in self.keys.iter().enumerate() {
            let got = seen(
                store
                    .get(key)
                    .unwrap_or_else(|e| panic!("{what}: get: {e:?}")),
            );
            let as_requested = match alt {
                Some((ak, r)) if *ak == k => match (r, &got) {
                    (
                        Requested::Claim {
                            attempt,
                            checkpoint,
                        },
                        Seen::InFlight {
                            token,
                            attempt: a,
                            checkpoint: c,
                        },
                    ) => *token > self.max_token && a == attempt && c == checkpoint,
                    (Requested::Exactly(s), got) => s == got,
                    _ => false,
                },
                _ => false,
            };
            assert!(
                got == self.acked[k] || as_requested,
                "{what}: key {k} holds {got:?}; acknowledged {:?}, the failed write asked {:?}",
                self.acked[k],
                alt.filter(|(ak, _)| *ak == k).map(|(_, r)| r)
            );
            // Every completion replays its bytes (to the one fingerprint it was begun with).
            if let Seen::Completed { token, response } = &got {
                let mut replays = 0;
                for fp in &self.fps {
                    match store.begin(key, fp) {
                        Ok(Begin::Replay(c)) => {
                            assert_eq!(c.response(), response.as_slice(), "{what}: key {k} replay");
                            assert_eq!(c.token(), *token, "{what}: key {k} replay token");
                            replays += 1;
                        }
                        Ok(Begin::Mismatch) => {}
                        Ok(other) => {
                            panic!("{what}: key {k} is completed, begin answered {other:?}")
                        }
                        Err(e) => panic!("{what}: begin: {e:?}"),
                    }
                }
                assert_eq!(replays, 1, "{what}: key {k}: one fingerprint replays");
            }
            if let Seen::InFlight { token, .. } | Seen::Completed { token, .. } = &got {
                top = top.max(*token);
            }
            state.push(got);
        }
        // Tokens rise across the crash: a new key's token exceeds every one seen.
        self.probes += 1;
        let probe = Key::new("probe", &format!("p{}", self.probes)).expect("key");
        match store.begin(&probe, &self.fps[0]) {
            Ok(Begin::Started(lease)) => {
                assert!(
                    lease.token() > top,
                    "{what}: token {} not above {top}",
                    lease.token()
                );
                if keep {
                    self.max_token = self.max_token.max(lease.token());
                }
                lease
                    .abandon()
                    .unwrap_or_else(|e| panic!("{what}: abandon: {e:?}"));
            }
            other => panic!("{what}: begin of a new key: {other:?}"),
        }
        (store, disk, state)
    }
}

/// The first bytes of every redb file, written last when a file is created.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// redb's integrity check on a copy of `image`.
fn integrity(what: &str, image: &[u8]) {
    if image.is_empty() {
        return;
    }
    let mem = InMemoryBackend::new();
    mem.set_len(image.len() as u64).expect("memory");
    mem.write(0, image).expect("memory");
    let mut db = redb::Builder::new()
        .create_with_backend(mem)
        .unwrap_or_else(|e| panic!("{what}: redb does not open the image: {e:?}"));
    match db.check_integrity() {
        Ok(true) => {}
        other => panic!("{what}: redb's integrity check: {other:?}"),
    }
}

fn fault_mode(header: &[u8], ops: &[Op]) {
    let (kind, n, mask) = (header[0], header[1], header[2]);
    let fault = Fault {
        call: match kind % 4 {
            0 => Some(Call::Write),
            1 => Some(Call::SetLen),
            2 => Some(Call::Sync),
            _ => None,
        },
        n: u64::from(n),
        always: kind & 4 != 0,
    };
    let clock = ManualClock::new(UNIX_EPOCH + START);
    let mut run = Run {
        clock: clock.clone(),
        keys: KEYS
            .iter()
            .map(|(s, i)| Key::new(s, i).expect("key"))
            .collect(),
        fps: FINGERPRINTS.iter().map(Fingerprint::of).collect(),
        acked: vec![Seen::Absent; KEYS.len()],
        max_token: 0,
        held: Vec::new(),
        faults: 0,
        probes: 0,
    };

    // Open under the fault: creating the store may fail too.
    let (backend, mut disk) = FaultBackend::new(&[]);
    lock(&disk).fault = Some(fault);
    let mut store = match open(backend, &clock) {
        Ok(s) => Some(s),
        Err(e) => {
            fault_error("open", &e);
            None
        }
    };
    let mut failure: Option<Option<(usize, Requested)>> = None;
    let mut refused = 0;
    let mut i = 0;
    loop {
        if store.is_none() || failure.is_some() && (refused >= AFTER_FAULT || i >= ops.len()) {
            // Reopen after the fault: check every crash image, go on from the durable one.
            run.held.clear();
            if let Some(s) = store.take() {
                match s.close() {
                    Ok(()) => {}
                    Err(e) => fault_error("close after a fault", &e),
                }
            }
            let alt = failure.take().flatten();
            let (durable, live, torn) = {
                let d = lock(&disk);
                (
                    d.durable.clone(),
                    d.live(),
                    d.torn(u64::from(mask).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                )
            };
            for (what, image) in [("the written image", &live), ("a torn image", &torn)] {
                let (s, _, _) = run.check_image(what, image, alt.as_ref(), false);
                s.close().unwrap_or_else(|e| panic!("{what}: close: {e:?}"));
            }
            let (s, d, state) = run.check_image("the durable image", &durable, alt.as_ref(), true);
            run.acked = state;
            run.faults += 1;
            if run.faults < MAX_FAULTS {
                lock(&d).fault = Some(fault);
            }
            store = Some(s);
            disk = d;
            refused = 0;
        }
        let Some(op) = ops.get(i) else { break };
        let s = store.as_ref().expect("open");
        if failure.is_some() {
            run.step_refused(s, i, op, failure.as_ref().and_then(|f| f.as_ref()));
            refused += 1;
        } else if let Op::Reopen { .. } = op {
            // A clean close and reopen of everything written.
            run.held.clear();
            let s = store.take().expect("open");
            match s.close() {
                Ok(()) => {
                    let (live, fault_state) = {
                        let d = lock(&disk);
                        (d.live(), d.fault.map(|f| (f, d.counted)))
                    };
                    let (backend, d) = FaultBackend::new(&live);
                    if let Some((f, counted)) = fault_state {
                        let mut d = lock(&d);
                        d.fault = Some(f);
                        d.counted = counted;
                    }
                    disk = d;
                    match open(backend, &clock) {
                        Ok(s) => {
                            for (k, key) in run.keys.iter().enumerate() {
                                if let Ok(e) = s.get(key) {
                                    assert_eq!(
                                        seen(e),
                                        run.acked[k],
                                        "key {k} after a clean reopen"
                                    );
                                }
                            }
                            store = Some(s);
                        }
                        Err(e) => {
                            fault_error("reopen", &e);
                            failure = Some(None);
                        }
                    }
                }
                Err(e) => {
                    fault_error("close", &e);
                    failure = Some(None);
                    // Reopen from the durable image at the top of the loop.
                    store = None;
                }
            }
        } else if let Step::Failed(alt) = run.step(s, i, op) {
            failure = Some(alt);
        }
        i += 1;
    }

    // The end: a clean close, and every key as acknowledged after reopening (what close
    // wrote, or, if a fault hit the close, every crash image).
    run.held.clear();
    let closed = store.take().map_or(Ok(()), Store::close);
    let (durable, live) = {
        let d = lock(&disk);
        (d.durable.clone(), d.live())
    };
    let images = match closed {
        Ok(()) => vec![("the file after close", live)],
        Err(e) => {
            fault_error("close", &e);
            vec![
                ("the durable image after close", durable),
                ("the written image after close", live),
            ]
        }
    };
    for (what, image) in images {
        let (s, _, state) = run.check_image(what, &image, None, false);
        assert_eq!(state, run.acked, "{what}");
        s.close().unwrap_or_else(|e| panic!("{what}: close: {e:?}"));
    }
    if std::env::var_os("IDEMSTORE_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "fault mode: {fault:?}, {} operations, {} reopens after a fault, final state {:?}",
            ops.len(),
            run.faults,
            run.acked
        );
    }
}

/// A directory for the model mode's files: memory-backed when available.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("idemstore-fuzz")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::Builder::new()
        .prefix("idemstore-fuzz")
        .tempdir()
        .expect("temporary directory")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 | 1 => {
            let ops = Op::decode(&rest[..rest.len().min(2 * MAX_OPS)]);
            model::check(&model::Backend::Memory, &ops);
        }
        2 => {
            let ops = Op::decode(&rest[..rest.len().min(2 * MAX_OPS)]);
            let dir = scratch();
            model::check(&model::Backend::File(dir.path().join("model.redb")), &ops);
        }
        _ => {
            if rest.len() < 3 {
                return;
            }
            let (header, ops) = rest.split_at(3);
            let ops = Op::decode(&ops[..ops.len().min(2 * MAX_OPS)]);
            fault_mode(header, &ops);
        }
    }
});
