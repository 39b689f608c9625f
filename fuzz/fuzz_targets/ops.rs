//! Operation sequences, two modes picked by the first input byte.
//!
//! **Model mode** (`mode % 4` is 0, 1: in memory; 2: a file, where `Reopen` closes and
//! reopens it): the testkit's operation enum and checker (also run by the proptest model
//! test): every answer, every `get` and the counters are compared with a `HashMap` model of
//! the store's contract after every step.
//!
//! **Fault mode** (`mode % 4 == 3`): the model checker cannot inject faults, so this mode
//! runs the same operations on a store opened with `Builder::open_backend` on the testkit's
//! `FaultyBackend`: redb's `InMemoryBackend` with every method forwarded (the lock methods
//! and `close` included), failing the Nth `write` / `set_len` / `sync_data` (which of them,
//! N, and once or from then on, come from the input). It keeps the *durable image*: the bytes
//! as of the last successful `sync_data`. It checks:
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

use std::time::{Duration, UNIX_EPOCH};

use idemstore::{Begin, Clock, Durability, Entry, Error, Fingerprint, Key, Lease, ManualClock, Store};
use idemstore_testkit::crash::{Expect, ImageChecker};
use idemstore_testkit::fault::{Call, Fault, Faults, FaultyBackend};
use idemstore_testkit::model::{self, By, FINGERPRINTS, KEYS, MAX_BYTES, Op, Size, Tick};
use idemstore_testkit::store::scratch_dir;
use libfuzzer_sys::fuzz_target;

/// Operations per input at most (longer inputs are cut).
const MAX_OPS: usize = 96;
/// Faults per input at most; the countdown restarts after each reopen.
const MAX_FAULTS: usize = 4;
/// Operations run on a faulted store before it is reopened (they must all be refused).
const AFTER_FAULT: usize = 3;

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

fn open(backend: FaultyBackend, clock: &ManualClock) -> idemstore::Result<Store> {
    builder(clock).open_backend(backend)
}

fn builder(clock: &ManualClock) -> idemstore::Builder {
    Store::builder()
        .ttl(TTL)
        .lease(LEASE)
        .reap_interval(None)
        .max_response_bytes(MAX_BYTES)
        .durability(Durability::Immediate)
        .cache_bytes(1 << 20)
        .clock(clock.clone())
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
    images: ImageChecker,
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

    /// Opens `image` (a crash image), checks it with the testkit's crash-image check (every
    /// key as acknowledged, or the key of the failed write as it requested), and returns the
    /// store and the state it holds per key.
    /// `keep`: the run goes on from this image (its probe token counts for later checks).
    fn check_image(
        &mut self,
        what: &str,
        image: &[u8],
        alt: Option<&(usize, Requested)>,
        keep: bool,
    ) -> (Store, Faults, Vec<Seen>) {
        let (acked, max_token) = (&self.acked, self.max_token);
        let accept = |state: &[Option<Entry>]| -> Result<(), String> {
            for (k, entry) in state.iter().enumerate() {
                let got = seen(entry.clone());
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
                        ) => *token > max_token && a == attempt && c == checkpoint,
                        (Requested::Exactly(s), got) => s == got,
                        _ => false,
                    },
                    _ => false,
                };
                if got != acked[k] && !as_requested {
                    return Err(format!(
                        "key {k} holds {got:?}; acknowledged {:?}, the failed write asked {:?}",
                        acked[k],
                        alt.filter(|(ak, _)| *ak == k).map(|(_, r)| r)
                    ));
                }
            }
            Ok(())
        };
        let expect = Expect {
            keys: &self.keys,
            min_token: max_token,
            // Before anything was acknowledged the store may not have been created.
            creating: max_token == 0 && acked.iter().all(|s| *s == Seen::Absent),
            accept: &accept,
        };
        let clock = &self.clock;
        let reopened = match self.images.check(what, image, &|| builder(clock), &expect) {
            Some(r) => r,
            // A half-created file, refused as it must be: the user deletes it, and the run
            // goes on from an empty file.
            None => self
                .images
                .check(what, &[], &|| builder(clock), &expect)
                .expect("an empty image opens"),
        };
        let store = reopened.store;
        // Every completion replays its bytes (to the one fingerprint it was begun with).
        for (k, (key, entry)) in self.keys.iter().zip(&reopened.state).enumerate() {
            let Some(Entry::Completed(done)) = entry else {
                continue;
            };
            let mut replays = 0;
            for fp in &self.fps {
                match store.begin(key, fp) {
                    Ok(Begin::Replay(c)) => {
                        assert_eq!(c.response(), done.response(), "{what}: key {k} replay");
                        assert_eq!(c.token(), done.token(), "{what}: key {k} replay token");
                        replays += 1;
                    }
                    Ok(Begin::Mismatch) => {}
                    Ok(other) => panic!("{what}: key {k} is completed, begin answered {other:?}"),
                    Err(e) => panic!("{what}: begin: {e:?}"),
                }
            }
            assert_eq!(replays, 1, "{what}: key {k}: one fingerprint replays");
        }
        if keep {
            self.max_token = self.max_token.max(reopened.probe_token);
        }
        let state = reopened.state.into_iter().map(seen).collect();
        let faults = reopened.faults.expect("crash images are opened in memory");
        (store, faults, state)
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
        pass: u64::from(n),
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
        // In memory only: the run goes on from a checked image, with its fault handle.
        images: ImageChecker::new(0),
    };

    // Open under the fault: creating the store may fail too.
    let (backend, mut disk) = FaultyBackend::in_memory(&[]);
    disk.arm(Some(fault));
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
            let (durable, live, torn) = (disk.durable(), disk.written(), disk.torn(u64::from(mask)));
            for (what, image) in [("the written image", &live), ("a torn image", &torn)] {
                let (s, _, _) = run.check_image(what, image, alt.as_ref(), false);
                s.close().unwrap_or_else(|e| panic!("{what}: close: {e:?}"));
            }
            let (s, d, state) = run.check_image("the durable image", &durable, alt.as_ref(), true);
            run.acked = state;
            run.faults += 1;
            if run.faults < MAX_FAULTS {
                d.arm(Some(fault));
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
                    // The countdown goes on on the reopened file.
                    let (backend, d) = FaultyBackend::in_memory(&disk.written());
                    d.arm(disk.fault());
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
    let (durable, live) = (disk.durable(), disk.written());
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
            let dir = scratch_dir("idemstore-fuzz");
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
