//! Fault injection: durability and unknown outcomes, clean refusal, tokens across a crash.
//!
//! The testkit's `FaultyBackend` wraps a redb storage backend (in memory, or a file to
//! exercise the lock methods), forwards every method, the lock methods and `close` included,
//! counts the calls of `write`, `set_len` and `sync_data`, and fails the Nth call of one of
//! them, once or from then on. It keeps a *durable image*: the bytes as of the last successful
//! `sync_data` (writes and length changes since then are pending, and lost in a power cut).
//!
//! A probe run of a small workload (begin / checkpoint / extend / complete / abandon / drop /
//! reap on five keys, driven by a `ManualClock`) records the call counts, the state of every
//! key after every operation, and the durable image at every sync point (plus a torn image:
//! the previous durable image with a random subset of the writes that sync was making durable).
//! The sweep then fails every N of each call kind, once and always, and checks:
//!
//! * nothing panics, and every error is a clear `Storage` or `Poisoned`; until the store is
//!   reopened, no write after the first error is acknowledged; a read may still answer, but
//!   only as one of the possible states would, and it replays only a durable completion;
//! * operations before the first error answer exactly as in the probe run (a silently failed
//!   release on drop may show first as a read that still sees the lease);
//! * the backend is closed exactly once (its locks released) after `close`, or a failed open;
//! * reopened from the durable image (a power cut right after the fault), and from the image
//!   of everything written (a crash with all pending writes on disk), the store opens, redb's
//!   integrity check passes, and the state of all keys is exactly the state after some
//!   operation between the last acknowledged write and the failed one: every `Ok`'d change is
//!   there, the failed one is wholly there or wholly absent (no half state);
//! * the next token granted after the reopen exceeds every token acknowledged or stored.
//!
//! Each sync-point image of the probe run (a power cut at that fsync) is checked the same way.
//!
//! Under `Durability::None`, both crash images of a running store (durable, and everything
//! written) reopen exactly as the store was opened: a crash loses everything since the open.
//!
//! One exception is accepted, and only for images taken before the first `open` returned:
//! redb writes its magic number last when it creates a file, so such an image may be a
//! non-empty file without it, which the store refuses (`IncompatibleFormat`) and leaves as is.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, SystemTime};

use idemstore::backends::FileBackend;
use idemstore::{
    Begin, Clock, Durability, Entry, Error, Fingerprint, Key, Lease, ManualClock, Store,
};
use idemstore_testkit::crash::{self, ImageChecker, Snapshot};
use idemstore_testkit::fault::{Call, Fault, Faults, FaultyBackend, memory};
use idemstore_testkit::rng::noise;
use idemstore_testkit::store::{TTL, start};

/// How an injected fault repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Only the Nth call fails.
    Once,
    /// The Nth call and every later one fail.
    Always,
}

// ---------------------------------------------------------------------------------------------
// The workload

const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

fn builder(clock: &ManualClock) -> idemstore::Builder {
    idemstore_testkit::store::builder(clock).durability(Durability::Immediate)
}

fn key(k: usize) -> Key {
    Key::new("faults", KEYS[k]).expect("key")
}

fn keys() -> Vec<Key> {
    (0..KEYS.len()).map(key).collect()
}

fn fp(k: usize, variant: u8) -> Fingerprint {
    Fingerprint::builder()
        .part(KEYS[k].as_bytes())
        .part([variant])
        .finish()
}

/// Response bytes: binary, `len` long, different per key and length.
fn response(k: usize, len: usize) -> Vec<u8> {
    noise(len, (k as u64) << 32 ^ len as u64)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Begin(usize, u8),
    Checkpoint(usize, &'static str),
    Extend(usize, u64),
    Complete(usize, usize),
    Abandon(usize),
    /// Drop the lease: best-effort release, its errors are not reported.
    Drop(usize),
    Advance(u64),
    Reap,
}

const WORKLOAD: &[Op] = &[
    Op::Begin(0, 0),
    Op::Checkpoint(0, "a: step 1"),
    Op::Complete(0, 300),
    Op::Begin(1, 0),
    Op::Extend(1, 90),
    Op::Checkpoint(1, "b: step 1"),
    Op::Begin(2, 0),
    Op::Abandon(2),
    Op::Begin(2, 0),
    Op::Checkpoint(2, "c: step 1"),
    Op::Drop(2),
    Op::Begin(2, 0), // takeover, recovers the checkpoint
    Op::Complete(2, 20_000),
    Op::Begin(3, 0),
    Op::Complete(3, 64),
    Op::Begin(0, 0), // replay
    Op::Begin(1, 1), // mismatch
    Op::Begin(1, 0), // in flight
    Op::Drop(1),     // released
    Op::Advance(1100),
    Op::Reap, // a, b, c, d are dead
    Op::Begin(4, 0),
    Op::Checkpoint(4, "e: step 1"),
    Op::Advance(40), // e's lease ran out, nobody took over
    Op::Extend(4, 30),
    Op::Complete(4, 5000),
    Op::Begin(0, 0), // a again, from scratch
    Op::Complete(0, 100),
    Op::Begin(1, 0),
    Op::Drop(1),
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Started(u64),
    Replay(u64),
    InFlight,
    Mismatch,
    /// A lease operation returned `Ok`.
    Done,
    Reaped(u64),
    Dropped,
    Advanced,
    /// No lease to act on: the `begin` that should have made it failed.
    Skipped,
    Failed(&'static str),
}

impl Outcome {
    /// An acknowledged durable write.
    fn acknowledges_write(&self) -> bool {
        matches!(
            self,
            Outcome::Started(_) | Outcome::Done | Outcome::Reaped(_)
        )
    }
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Storage { .. } => "Storage",
        Error::Poisoned => "Poisoned",
        Error::Closed => "Closed",
        Error::Corrupt { .. } => "Corrupt",
        Error::LeaseLost { .. } => "LeaseLost",
        Error::AlreadyOpen { .. } => "AlreadyOpen",
        Error::IncompatibleFormat { .. } => "IncompatibleFormat",
        Error::InvalidConfig { .. } => "InvalidConfig",
        Error::InvalidKey { .. } => "InvalidKey",
        Error::ResponseTooLarge { .. } => "ResponseTooLarge",
        _ => "other",
    }
}

/// The state of every key, as `get` sees it.
fn snapshot(store: &Store) -> Result<Snapshot, Error> {
    crash::snapshot(store, &keys())
}

/// `s` as seen at `now` (records dead by then are absent).
fn view_at(s: &Snapshot, now: SystemTime) -> Snapshot {
    s.iter()
        .map(|e| {
            e.clone().filter(|e| match e {
                Entry::Completed(done) => now < done.expires_at(),
                Entry::InFlight { expires_at, .. } => now < *expires_at,
            })
        })
        .collect()
}

/// What one run of the workload did.
struct Run {
    /// `Err` when the open failed (with its error kind).
    open: Result<(), &'static str>,
    outcomes: Vec<Outcome>,
    /// The clock at each operation (index 0: open).
    times: Vec<SystemTime>,
    /// The state after each operation (index 0: after open); probe runs only.
    after: Vec<Snapshot>,
    close: Result<(), &'static str>,
    state: Faults,
}

fn run_op(
    store: &Store,
    clock: &ManualClock,
    leases: &mut HashMap<usize, Lease>,
    op: Op,
) -> Outcome {
    let failed = |e: Error| Outcome::Failed(error_kind(&e));
    match op {
        Op::Begin(k, v) => match store.begin(&key(k), &fp(k, v)) {
            Ok(Begin::Started(lease)) => {
                let token = lease.token();
                assert!(
                    leases.insert(k, lease).is_none(),
                    "workload: lease of {k} held"
                );
                Outcome::Started(token)
            }
            Ok(Begin::Replay(done)) => Outcome::Replay(done.token()),
            Ok(Begin::InFlight { .. }) => Outcome::InFlight,
            Ok(Begin::Mismatch) => Outcome::Mismatch,
            Err(e) => failed(e),
        },
        Op::Checkpoint(k, bytes) => match leases.get_mut(&k) {
            None => Outcome::Skipped,
            Some(l) => l
                .checkpoint(bytes.as_bytes())
                .map_or_else(failed, |()| Outcome::Done),
        },
        Op::Extend(k, secs) => match leases.get_mut(&k) {
            None => Outcome::Skipped,
            Some(l) => l
                .extend(Duration::from_secs(secs))
                .map_or_else(failed, |()| Outcome::Done),
        },
        Op::Complete(k, len) => match leases.remove(&k) {
            None => Outcome::Skipped,
            Some(l) => {
                let bytes = response(k, len);
                match l.complete(&bytes) {
                    Ok(done) => {
                        assert_eq!(done.response(), &bytes[..]);
                        Outcome::Done
                    }
                    Err(e) => failed(e),
                }
            }
        },
        Op::Abandon(k) => match leases.remove(&k) {
            None => Outcome::Skipped,
            Some(l) => l.abandon().map_or_else(failed, |()| Outcome::Done),
        },
        Op::Drop(k) => match leases.remove(&k) {
            None => Outcome::Skipped,
            Some(l) => {
                drop(l);
                Outcome::Dropped
            }
        },
        Op::Advance(secs) => {
            clock.advance(Duration::from_secs(secs));
            Outcome::Advanced
        }
        Op::Reap => store.reap().map_or_else(failed, Outcome::Reaped),
    }
}

/// Runs the workload on a fresh in-memory backend with `fault` armed.
fn run(fault: Option<Fault>, probe: bool) -> Run {
    let (backend, state) = FaultyBackend::in_memory(&[]);
    if probe {
        state.record_syncs(0x5eed);
    }
    state.arm(fault);
    let clock = ManualClock::new(start());
    let mut run = Run {
        open: Ok(()),
        outcomes: Vec::new(),
        times: vec![start()],
        after: Vec::new(),
        close: Ok(()),
        state: state.clone(),
    };
    let store = match builder(&clock).open_backend(backend) {
        Ok(store) => store,
        Err(e) => {
            run.open = Err(error_kind(&e));
            return run;
        }
    };
    if probe {
        run.after.push(snapshot(&store).expect("probe: get"));
    }
    let mut leases = HashMap::new();
    for (i, op) in WORKLOAD.iter().enumerate() {
        state.set_label(i + 1);
        run.times.push(clock.now());
        let outcome = run_op(&store, &clock, &mut leases, *op);
        if let Op::Advance(_) = op {
            *run.times.last_mut().unwrap() = clock.now();
        }
        if probe {
            assert!(
                !matches!(outcome, Outcome::Failed(_) | Outcome::Skipped),
                "probe run: {op:?} gave {outcome:?}"
            );
            run.after.push(snapshot(&store).expect("probe: get"));
        }
        run.outcomes.push(outcome);
    }
    state.set_label(WORKLOAD.len() + 1);
    drop(leases);
    run.close = store.close().map_err(|e| error_kind(&e));
    run
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The testkit's checker of crash images, each image checked once against the same
/// expectations.
struct Images {
    checker: ImageChecker,
    /// Results by image and expectation: an identical image checked against identical
    /// expectations gives the same result (the durable image is the same for every fault
    /// between two syncs), so it is checked once.
    seen: HashMap<(u64, u64), Option<Snapshot>>,
    repeats: u64,
}

/// What a reopened image must show.
struct Expect<'a> {
    /// The clock of the reopened store.
    now: SystemTime,
    /// The possible states of all keys; the image must hold exactly one of them.
    candidates: &'a [Snapshot],
    /// Every token acknowledged before the crash; the next one granted must exceed it.
    min_token: u64,
    /// The crash hit while the store was being created (`open` had not returned).
    creating: bool,
}

impl Images {
    /// Every `file_every`-th image through a real file, the others in memory.
    fn new(file_every: u64) -> Images {
        Images {
            checker: ImageChecker::new(file_every),
            seen: HashMap::new(),
            repeats: 0,
        }
    }

    /// A crash left `image`: it passes the testkit's check (integrity, reopen, tokens), and
    /// its keys are exactly one of the candidates (as seen at `now`). `None` for a refused
    /// half-created file.
    fn check(&mut self, what: &str, image: &[u8], expect: &Expect<'_>) -> Option<Snapshot> {
        let memo = (
            hash(image),
            hash(format!(
                "{:?}",
                (
                    expect.now,
                    expect.candidates,
                    expect.min_token,
                    expect.creating
                )
            )),
        );
        if let Some(found) = self.seen.get(&memo) {
            self.repeats += 1;
            return found.clone();
        }
        let clock = ManualClock::new(expect.now);
        let accept = |state: &[Option<Entry>]| {
            if expect.candidates.iter().any(|c| c.as_slice() == state) {
                Ok(())
            } else {
                Err(format!(
                    "half state or lost acknowledged change after reopen:\n  found {state:?}\n  \
                     expected one of {:#?}",
                    expect.candidates
                ))
            }
        };
        let keys = keys();
        let found = self
            .checker
            .check(
                what,
                image,
                &|| builder(&clock),
                &crash::Expect {
                    keys: &keys,
                    min_token: expect.min_token,
                    creating: expect.creating,
                    accept: &accept,
                },
            )
            .map(|reopened| {
                let state = reopened.state.clone();
                reopened.close();
                state
            });
        self.seen.insert(memo, found.clone());
        found
    }
}

fn hash(x: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(x)
}

const CLEAR: [&str; 2] = ["Storage", "Poisoned"];

/// The highest token acknowledged among `outcomes`.
fn acked_token(outcomes: &[Outcome]) -> u64 {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Started(t) => Some(*t),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Checks one faulty run against the probe run.
fn check_run(probe: &Run, r: &Run, images: &mut Images, what: &str) {
    if let Err(kind) = r.open {
        assert!(CLEAR.contains(&kind), "{what}: open failed with {kind}");
        assert_eq!(
            r.state.closes(),
            1,
            "{what}: a failed open closes the backend"
        );
        let expect = Expect {
            now: probe.times[0],
            candidates: std::slice::from_ref(&probe.after[0]),
            min_token: 0,
            creating: true,
        };
        images.check(
            &format!("{what}, durable image"),
            &r.state.durable(),
            &expect,
        );
        images.check(
            &format!("{what}, written image"),
            &r.state.written(),
            &expect,
        );
        return;
    }
    if let Err(kind) = r.close {
        assert!(CLEAR.contains(&kind), "{what}: close failed with {kind}");
    }
    assert_eq!(
        r.state.closes(),
        1,
        "{what}: after close the backend is closed once (its locks released)"
    );
    // The first answer that differs from the probe run: normally the first error; or, when the
    // release of a dropped lease failed silently (best effort), a read that still sees
    // the lease.
    let first = r
        .outcomes
        .iter()
        .zip(&probe.outcomes)
        .position(|(a, b)| a != b);
    let ok_until = first.unwrap_or(r.outcomes.len());
    let failed_at_first = first.is_some_and(|i| matches!(r.outcomes[i], Outcome::Failed(_)));
    if let Some(i) = first
        && !failed_at_first
    {
        assert!(
            WORKLOAD[..i].iter().any(|op| matches!(op, Op::Drop(_))),
            "{what}: op {i} {:?} answered {:?}, the probe {:?}, with no error before",
            WORKLOAD[i],
            r.outcomes[i],
            probe.outcomes[i]
        );
    }
    // From the first error on: clear errors and nothing acknowledged. Reads may still answer
    // (only writes are refused); they are checked below.
    let mut reads = Vec::new();
    for (j, (o, op)) in r.outcomes.iter().zip(WORKLOAD).enumerate().skip(ok_until) {
        match o {
            Outcome::Failed(kind) => assert!(
                CLEAR.contains(kind),
                "{what}: op {j} {op:?} failed with {kind}, not a clear Storage/Poisoned"
            ),
            Outcome::Skipped | Outcome::Dropped | Outcome::Advanced => {}
            Outcome::Replay(_) | Outcome::InFlight | Outcome::Mismatch => reads.push((j, *op, o)),
            other => panic!("{what}: op {j} {op:?} answered {other:?} after an earlier error"),
        }
    }
    // Index into `after` (0: open, j + 1: after op j): from the last acknowledged write to
    // the failed operation (or the end), every state is a possible outcome; nothing else is.
    let end = match first {
        None => WORKLOAD.len(),
        Some(i) if failed_at_first => i + 1,
        Some(i) => i,
    };
    let acked = r.outcomes[..ok_until]
        .iter()
        .rposition(Outcome::acknowledges_write)
        .map_or(0, |j| j + 1);
    let now = probe.times[end];
    let candidates: Vec<Snapshot> = (acked..=end)
        .map(|j| view_at(&probe.after[j], now))
        .collect();
    let expect = Expect {
        now,
        candidates: &candidates,
        min_token: acked_token(&r.outcomes[..ok_until]),
        creating: false,
    };
    let durable = images.check(
        &format!("{what}, durable image"),
        &r.state.durable(),
        &expect,
    );
    images.check(
        &format!("{what}, written image"),
        &r.state.written(),
        &expect,
    );
    let durable = durable.expect("the store was created");
    // A read after the failure answers from one of the possible states, and a replay only
    // from a completion that is durable (never a response that may be lost).
    for (j, op, o) in reads {
        let Op::Begin(k, v) = op else {
            panic!("{what}: op {j} {op:?} is not a read")
        };
        let at = r.times[j + 1];
        let possible: Vec<Option<Outcome>> = candidates
            .iter()
            .map(|c| answer(&view_at(c, at), k, v, at))
            .collect();
        assert!(
            possible.contains(&Some(o.clone())),
            "{what}: op {j} {op:?} answered {o:?} after the failure; possible: {possible:?}"
        );
        if let Outcome::Replay(_) = o {
            assert_eq!(
                answer(&view_at(&durable, at), k, v, at).as_ref(),
                Some(o),
                "{what}: op {j} replayed a completion that is not durable"
            );
        }
    }
}

/// What `begin(key k, fingerprint variant v)` answers without writing, from the state `s` at
/// `now`; `None` when it must write (a claim). Every key is begun with variant 0 only, but
/// for the one `Mismatch` probe.
fn answer(s: &Snapshot, k: usize, v: u8, now: SystemTime) -> Option<Outcome> {
    match &s[k] {
        None => None,
        Some(_) if v != 0 => Some(Outcome::Mismatch),
        Some(Entry::Completed(done)) => Some(Outcome::Replay(done.token())),
        Some(Entry::InFlight {
            lease_expires_at, ..
        }) => (now < *lease_expires_at).then_some(Outcome::InFlight),
    }
}

fn run_checked(probe: &Run, (call, n, mode): (Call, u64, Mode), images: &mut Images) -> u64 {
    let what = format!("{call:?} call {n}, {mode:?}");
    let result = catch_unwind(AssertUnwindSafe(|| {
        let r = run(Some(Fault::nth(call, n, mode == Mode::Always)), false);
        check_run(probe, &r, images, &what);
        r.state.injected()
    }));
    result.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        panic!("fault {what}: {msg}")
    })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_write_set_len_and_sync_fault_of_a_workload_keeps_the_guarantees() {
    let probe = run(None, true);
    assert!(
        probe.open.is_ok() && probe.close.is_ok(),
        "the probe run fails by itself"
    );
    let counts = Call::ALL.map(|c| probe.state.calls(c));
    println!(
        "probe run: {} operations, {} writes, {} set_len, {} sync_data, {} lock calls",
        WORKLOAD.len(),
        counts[0],
        counts[1],
        counts[2],
        probe.state.lock_calls()
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "the workload exercises every call kind"
    );
    let mut images = Images::new(8);
    let (mut injected, mut runs) = (0, 0);
    for call in Call::ALL {
        for mode in [Mode::Once, Mode::Always] {
            for n in 1..=probe.state.calls(call) {
                let got = run_checked(&probe, (call, n, mode), &mut images);
                assert!(
                    got >= 1,
                    "{call:?} call {n}, {mode:?}: the fault was not injected"
                );
                injected += got;
                runs += 1;
            }
        }
    }
    println!(
        "fault sweep: {runs} runs, {injected} faults injected; {} distinct crash images \
         reopened and checked ({} through a file, {} half-created files refused), {} repeats",
        images.checker.checked,
        images.checker.via_file,
        images.checker.refused_half_created,
        images.repeats
    );
}

#[test]
fn every_sync_point_image_of_a_workload_is_a_consistent_store() {
    let probe = run(None, true);
    let syncs = probe.state.take_syncs();
    assert!(
        syncs.len() > WORKLOAD.len() / 2,
        "one sync per write at least"
    );
    let mut images = Images::new(1);
    let n = WORKLOAD.len();
    for (s, sp) in syncs.iter().enumerate() {
        // A power cut at this fsync: the operation running then may or may not have happened.
        let (now, candidates, min_token) = match sp.label {
            0 => (probe.times[0], vec![probe.after[0].clone()], 0),
            j if j > n => (
                probe.times[n],
                vec![probe.after[n].clone()],
                acked_token(&probe.outcomes),
            ),
            j => {
                let now = probe.times[j];
                let c = vec![
                    view_at(&probe.after[j - 1], now),
                    view_at(&probe.after[j], now),
                ];
                (now, c, acked_token(&probe.outcomes[..j - 1]))
            }
        };
        let label = format!("sync point {s} (op {})", sp.label);
        let expect = Expect {
            now,
            candidates: &candidates,
            min_token,
            creating: sp.label == 0,
        };
        images.check(&format!("{label}, durable image"), &sp.durable, &expect);
        images.check(&format!("{label}, torn image"), &sp.torn, &expect);
    }
    println!(
        "sync points: {} (a power cut at each, and torn during each), {} images checked, {} \
         half-created files refused",
        syncs.len(),
        images.checker.checked,
        images.checker.refused_half_created
    );
}

/// `begin`, expecting `Started`.
#[track_caller]
fn started(store: &Store, k: usize) -> Lease {
    match store.begin(&key(k), &fp(k, 0)) {
        Ok(Begin::Started(lease)) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[track_caller]
fn assert_already_open(path: &std::path::Path, clock: &ManualClock) {
    match builder(clock).open(path) {
        Err(Error::AlreadyOpen { .. }) => {}
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
}

/// On a file, the wrapper's forwarded lock methods are what keeps a second open out: the file
/// is `AlreadyOpen` while the store lives, still after a failed commit poisoned it, and free
/// once `close` returns (the backend's `close` released the locks). After the reopen, the
/// failed completion is wholly there or wholly absent, and redb's integrity check passes.
#[test]
fn on_a_file_the_wrapper_forwards_the_locks_and_a_poisoned_store_keeps_the_file_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("locked.redb");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("create the file");
    let (backend, state) = FaultyBackend::new(FileBackend::new(file).expect("file backend"));
    let clock = ManualClock::new(start());
    let store = builder(&clock)
        .open_backend(backend)
        .expect("open on the file");
    assert!(
        state.lock_calls() > 0,
        "redb locked the file through the wrapper"
    );
    assert_already_open(&path, &clock);

    let done = started(&store, 0)
        .complete(b"acknowledged")
        .expect("complete");
    let mut held = started(&store, 1);
    held.checkpoint(b"step 1").expect("checkpoint");
    let held_token = held.token();
    // Every fsync from now on fails.
    state.arm(Some(Fault::every_sync()));
    match held.complete(b"unknown outcome") {
        Err(
            e @ Error::Storage {
                outcome_unknown: true,
                ..
            },
        ) => assert!(e.to_string().contains("outcome is unknown"), "{e}"),
        other => panic!("a failed fsync must be an unknown-outcome Storage error, got {other:?}"),
    }
    for k in [2, 3] {
        match store.begin(&key(k), &fp(k, 0)) {
            Err(Error::Poisoned | Error::Storage { .. }) => {}
            other => panic!("a poisoned store must refuse writes, got {other:?}"),
        }
    }
    assert!(state.injected() >= 1);
    assert_already_open(&path, &clock);
    assert_eq!(state.closes(), 0);
    match store.close() {
        Ok(()) | Err(Error::Storage { .. }) => {}
        Err(e) => panic!("close of a poisoned store: {e:?}"),
    }
    assert_eq!(state.closes(), 1, "close released the backend");

    let reopened = builder(&clock).open(&path).expect("reopen once closed");
    match reopened.get(&key(0)).expect("get") {
        Some(Entry::Completed(c)) => {
            assert_eq!(c.response(), b"acknowledged");
            assert_eq!(c.token(), done.token());
        }
        other => panic!("acknowledged completion lost: {other:?}"),
    }
    match reopened.get(&key(1)).expect("get") {
        Some(Entry::InFlight {
            token, checkpoint, ..
        }) => {
            assert_eq!(token, held_token);
            assert_eq!(checkpoint.as_deref(), Some(&b"step 1"[..]));
        }
        Some(Entry::Completed(c)) => {
            assert_eq!(
                (c.response(), c.token()),
                (&b"unknown outcome"[..], held_token)
            );
        }
        None => panic!("the acknowledged claim of key 1 is lost"),
    }
    for k in [2, 3] {
        assert_eq!(
            reopened.get(&key(k)).expect("get"),
            None,
            "refused claims left nothing"
        );
    }
    reopened.close().expect("close");
    let mut db = redb::Database::create(&path).expect("redb opens the file");
    assert!(matches!(db.check_integrity(), Ok(true)), "integrity check");
}

/// `Durability::None` loses, in a crash, everything since the store was opened, all at once:
/// its commits are named only by the database header held in memory, and the header in the
/// file keeps naming the open's durable commit. Checked on both images of a crash while the
/// store runs: the durable one (a power cut) and the one holding every write made (a killed
/// process, with the pages the engine already wrote out in the file). Both reopen as the
/// store was when it was opened: the completion of the session before (closed cleanly) is
/// there, every change since is gone, and the token counter is back where it was, so the
/// next claim is granted a token already handed out. A clean close makes all of it durable.
#[test]
fn under_durability_none_a_crash_loses_everything_since_the_open() {
    let clock = ManualClock::new(start());
    // A small page cache, so that the engine writes pages of uncommitted-to-disk commits out
    // to the file while the store runs.
    let none = || {
        builder(&clock)
            .durability(Durability::None)
            .cache_bytes(64 << 10)
    };

    // A first session, closed cleanly: its completion is durable, and outlives the test.
    let (backend, state) = FaultyBackend::in_memory(&[]);
    let store = none().ttl(TTL * 1000).open_backend(backend).expect("open");
    let kept = started(&store, 0).complete(b"kept").expect("complete");
    store.close().expect("close");
    let first = state.durable();

    // A second session: claims, completions, a checkpoint, an abandon and a reaping pass.
    let (backend, state) = FaultyBackend::in_memory(&first);
    let store = none().open_backend(backend).expect("reopen");
    let opened = state.written();
    let mut tokens = Vec::new();
    for round in 0..40 {
        let k = 1 + round % 3;
        let lease = started(&store, k);
        tokens.push(lease.token());
        if round % 3 == 2 {
            lease.abandon().expect("abandon");
        } else {
            lease.complete(&response(k, 8 << 10)).expect("complete");
            clock.advance(TTL);
            store.reap().expect("reap");
        }
    }
    let mut held = started(&store, 4);
    held.checkpoint(b"step 1").expect("checkpoint");
    tokens.push(held.token());
    let last_token = held.token();
    // The crash images, taken while the store runs.
    let power_cut = state.durable();
    let killed = state.written();
    assert_ne!(killed, opened, "pages of the session reached the file");

    for (what, image) in [("power cut", power_cut), ("killed process", killed)] {
        let reopened = builder(&clock)
            .open_backend(memory(&image))
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        // What was durable before the open stays.
        match reopened.get(&key(0)).expect("get") {
            Some(Entry::Completed(done)) => {
                assert_eq!(
                    (done.response(), done.token()),
                    (&b"kept"[..], kept.token())
                );
            }
            other => panic!("{what}: the first session's completion: {other:?}"),
        }
        let survivors = snapshot(&reopened).expect("snapshot");
        assert!(
            survivors[1..].iter().all(Option::is_none),
            "{what}: a change since the open survived: {survivors:?}"
        );
        let next = started(&reopened, 4).token();
        assert_eq!(
            next,
            kept.token() + 1,
            "{what}: the token counter is back at the open"
        );
        assert!(tokens.contains(&next), "{what}: tokens are granted again");
        reopened.close().expect("close");
    }

    // A clean close makes the whole session durable.
    drop(held);
    store.close().expect("close");
    let closed = builder(&clock)
        .open_backend(memory(&state.durable()))
        .expect("open after a clean close");
    assert!(
        matches!(closed.get(&key(4)).expect("get"), Some(Entry::InFlight { token, .. }) if token == last_token),
        "the session's last claim is durable after a clean close"
    );
    closed.close().expect("close");
}
