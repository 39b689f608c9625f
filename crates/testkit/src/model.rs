//! The operation enum, the reference model of the store's contract and the checker that runs
//! both side by side. Shared by the proptest model test (`tests/model.rs`) and the `ops` fuzz
//! target (which builds the operations with [`Op::decode`]).
//!
//! The model is a plain `HashMap` from key index to record, with its own time (nanoseconds),
//! its own copy of the fencing-token counter (tokens are 1, 2, 3… per store file, one per
//! `Started`, takeovers included) and its own counters. After every operation the checker
//! compares the store's answer with the model's, then `get` of every key and `stats()`.
//!
//! Time: the store's `now` is the latest time it has read (it reads at every operation, and
//! the checker calls `get` after every step, so it reads every value the clock takes). A
//! clock moved back by at most a second is ignored until it passes that time again; one moved
//! back further is a correction: `now` follows it, records dead before stay dead (they die
//! at the corrected time), and records written more than a second after the corrected time
//! are moved back to it with all their times. A reopened store starts from the latest time it
//! saw before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::{
    Begin, Builder, Completed, Durability, Entry, Error, Fingerprint, Key, Lease, ManualClock,
    Stats, Store,
};

/// Keys the operations choose from (by index). Two pairs differ only in where the scope ends.
pub const KEYS: [(&str, &str); 5] = [
    ("a", "bc"),
    ("ab", "c"),
    ("", "x"),
    ("t", "x"),
    ("t", "y y"),
];
/// Request payloads; their fingerprints are the two a key can be used with.
pub const FINGERPRINTS: [&[u8]; 2] = [b"POST /charges amount=1", b"POST /charges amount=2"];
/// `max_response_bytes` of the store under test.
pub const MAX_BYTES: usize = 64;
/// `(ttl, lease)` in milliseconds; a reopen picks one (stored deadlines are kept).
pub const SETTINGS: [(u64, u64); 2] = [(10_000, 2_000), (20_000, 3_000)];

const MS: u64 = 1_000_000;
/// Backward steps of the clock up to this are absorbed by the store; larger ones are
/// corrections.
const TOLERANCE: u64 = 1_000 * MS;
const START: u64 = 1_700_000_000 * 1_000_000_000;

/// How far the clock moves, relative to the current settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    Zero,
    Ms,
    LeaseMinusMs,
    Lease,
    LeasePlusMs,
    TtlMinusMs,
    Ttl,
    TtlPlusMs,
    BackMs,
    BackLease,
}

impl Tick {
    pub const ALL: [Tick; 10] = [
        Tick::Zero,
        Tick::Ms,
        Tick::LeaseMinusMs,
        Tick::Lease,
        Tick::LeasePlusMs,
        Tick::TtlMinusMs,
        Tick::Ttl,
        Tick::TtlPlusMs,
        Tick::BackMs,
        Tick::BackLease,
    ];
}

/// Length of a response or checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Empty,
    One,
    Some,
    Max,
    TooLarge,
}

impl Size {
    pub const ALL: [Size; 5] = [
        Size::Empty,
        Size::One,
        Size::Some,
        Size::Max,
        Size::TooLarge,
    ];

    fn len(self) -> usize {
        match self {
            Size::Empty => 0,
            Size::One => 1,
            Size::Some => 17,
            Size::Max => MAX_BYTES,
            Size::TooLarge => MAX_BYTES + 1,
        }
    }
}

/// The duration given to `extend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Zero,
    Ms,
    Lease,
    Ttl,
    TwoTtl,
}

impl By {
    pub const ALL: [By; 5] = [By::Zero, By::Ms, By::Lease, By::Ttl, By::TwoTtl];
}

/// One step. `key` indexes [`KEYS`] (modulo), `fp` [`FINGERPRINTS`] (modulo), `lease` the
/// leases the checker holds (modulo their number; a no-op when it holds none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Begin {
        key: u8,
        fp: u8,
    },
    Complete {
        lease: u8,
        size: Size,
    },
    Extend {
        lease: u8,
        by: By,
    },
    Checkpoint {
        lease: u8,
        size: Size,
    },
    Abandon {
        lease: u8,
    },
    /// Drop a held lease: the best-effort release.
    Drop {
        lease: u8,
    },
    Advance(Tick),
    Reap,
    /// Drop every held lease, close the store and reopen it with `SETTINGS[settings % 2]`.
    /// In memory, only the leases are dropped.
    Reopen {
        settings: u8,
    },
}

impl Op {
    /// Operations from raw bytes (for a fuzz target): two bytes per operation.
    pub fn decode(bytes: &[u8]) -> Vec<Op> {
        bytes
            .chunks_exact(2)
            .map(|c| {
                let (kind, arg) = (c[0], c[1]);
                let pick = |n: usize| usize::from(arg / 16) % n;
                match kind % 16 {
                    0..=3 => Op::Begin {
                        key: arg % 16,
                        fp: arg / 16,
                    },
                    4 | 5 => Op::Complete {
                        lease: arg,
                        size: Size::ALL[pick(Size::ALL.len())],
                    },
                    6 => Op::Extend {
                        lease: arg,
                        by: By::ALL[pick(By::ALL.len())],
                    },
                    7 => Op::Checkpoint {
                        lease: arg,
                        size: Size::ALL[pick(Size::ALL.len())],
                    },
                    8 => Op::Abandon { lease: arg },
                    9 => Op::Drop { lease: arg },
                    10..=12 => Op::Advance(Tick::ALL[usize::from(arg) % Tick::ALL.len()]),
                    13 => Op::Reap,
                    14 => Op::Reopen { settings: arg },
                    _ => Op::Advance(Tick::Ms),
                }
            })
            .collect()
    }
}

/// Where the store under test lives.
#[derive(Clone, Debug)]
pub enum Backend {
    Memory,
    /// A file path (its parent must exist); `Reopen` closes and reopens it.
    File(PathBuf),
}

/// What a run exercised, so a test can check that its generator reaches every row.
#[derive(Clone, Copy, Debug, Default)]
pub struct Coverage {
    pub started: u64,
    pub takeovers: u64,
    pub takeovers_with_checkpoint: u64,
    pub replays: u64,
    pub in_flight: u64,
    pub mismatches: u64,
    pub completed: u64,
    pub abandoned: u64,
    pub leases_lost: u64,
    pub released: u64,
    pub reaped: u64,
    pub reopens: u64,
    /// Advances that left the clock behind the store's time (ignored by the store).
    pub clock_behind: u64,
    /// Clock corrections (the clock moved back by more than the tolerance).
    pub corrections: u64,
}

impl Coverage {
    pub fn add(&mut self, o: &Coverage) {
        self.started += o.started;
        self.takeovers += o.takeovers;
        self.takeovers_with_checkpoint += o.takeovers_with_checkpoint;
        self.replays += o.replays;
        self.in_flight += o.in_flight;
        self.mismatches += o.mismatches;
        self.completed += o.completed;
        self.abandoned += o.abandoned;
        self.leases_lost += o.leases_lost;
        self.released += o.released;
        self.reaped += o.reaped;
        self.reopens += o.reopens;
        self.clock_behind += o.clock_behind;
        self.corrections += o.corrections;
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum MState {
    InFlight {
        created_at: u64,
        ttl_deadline: u64,
        lease_expires_at: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
    },
    Completed {
        completed_at: u64,
        expires_at: u64,
        response: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MRecord {
    fp: usize,
    token: u64,
    /// The store's time of the last write of the record.
    written: u64,
    state: MState,
}

impl MRecord {
    /// Moves every time of the record `by` back.
    fn shift_back(&mut self, by: u64) {
        self.written = self.written.saturating_sub(by);
        match &mut self.state {
            MState::InFlight {
                created_at,
                ttl_deadline,
                lease_expires_at,
                ..
            } => {
                for t in [created_at, ttl_deadline, lease_expires_at] {
                    *t = t.saturating_sub(by);
                }
            }
            MState::Completed {
                completed_at,
                expires_at,
                ..
            } => {
                for t in [completed_at, expires_at] {
                    *t = t.saturating_sub(by);
                }
            }
        }
    }

    /// Completed records die at `completed_at + ttl`, in-flight ones at
    /// `max(created_at + ttl, lease_expires_at)` (both computed when written).
    fn dies_at(&self) -> u64 {
        match &self.state {
            MState::InFlight {
                ttl_deadline,
                lease_expires_at,
                ..
            } => (*ttl_deadline).max(*lease_expires_at),
            MState::Completed { expires_at, .. } => *expires_at,
        }
    }
}

/// A completed record as seen from outside (times in nanoseconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub response: Vec<u8>,
    pub token: u64,
    pub completed_at: u64,
    pub expires_at: u64,
}

/// The answer to `begin`, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginOut {
    Started {
        token: u64,
        expires_at: u64,
        /// `(previous_token, attempt, checkpoint)`.
        recovered: Option<(u64, u32, Option<Vec<u8>>)>,
    },
    Replay(Done),
    InFlight {
        retry_after: u64,
    },
    Mismatch,
}

/// `get`, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryOut {
    InFlight {
        token: u64,
        lease_expires_at: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
        created_at: u64,
        expires_at: u64,
    },
    Completed(Done),
}

/// Errors the model predicts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrOut {
    LeaseLost {
        token: u64,
    },
    TooLarge,
    InvalidConfig,
    /// Anything else (never predicted: always a failure).
    Other(String),
}

/// The reference model of the store's contract.
#[derive(Debug)]
pub struct Model {
    /// What the `ManualClock` says.
    pub clock: u64,
    /// The store's `now`: the latest clock value it read since it was opened (0: none yet).
    pub now: u64,
    pub ttl: u64,
    pub lease: u64,
    pub last_token: u64,
    /// Clock corrections seen.
    pub corrections: u64,
    records: HashMap<usize, MRecord>,
    pub stats: Stats,
}

impl Model {
    fn new(settings: (u64, u64)) -> Model {
        Model {
            clock: START,
            now: 0,
            ttl: settings.0 * MS,
            lease: settings.1 * MS,
            last_token: 0,
            corrections: 0,
            records: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// The store reads the clock: its time follows the clock forwards, absorbs a small step
    /// back, and takes a larger one as a correction.
    fn read_clock(&mut self) {
        if self.clock >= self.now {
            self.now = self.clock;
        } else if self.now - self.clock > TOLERANCE {
            let (from, to) = (self.now, self.clock);
            for r in self.records.values_mut() {
                let death = r.dies_at();
                let by = if death <= from {
                    death.saturating_sub(to)
                } else if r.written > to + TOLERANCE {
                    r.written - to
                } else {
                    0
                };
                r.shift_back(by);
            }
            self.now = to;
            self.corrections += 1;
        }
    }

    /// A reopened store starts from the latest time it saw before (persisted on close), so
    /// its time never goes backwards across reopens either.
    fn reopen(&mut self, settings: (u64, u64)) {
        self.ttl = settings.0 * MS;
        self.lease = settings.1 * MS;
        self.stats = Stats::default();
    }

    /// The record of `key` (just granted a lease) takes `token` instead, and the counter
    /// goes on from there: for stores whose tokens may skip values.
    fn retoken(&mut self, key: usize, token: u64) {
        let r = self
            .records
            .get_mut(&key)
            .expect("a record was just started");
        r.token = token;
        self.last_token = token;
    }

    fn alive(&self, key: usize) -> Option<&MRecord> {
        self.records.get(&key).filter(|r| self.now < r.dies_at())
    }

    /// The record `token` may act on: alive, in flight, same token.
    fn held(&mut self, key: usize, token: u64) -> Option<&mut MRecord> {
        let now = self.now;
        self.records.get_mut(&key).filter(|r| {
            now < r.dies_at() && r.token == token && matches!(r.state, MState::InFlight { .. })
        })
    }

    fn lost(&mut self, token: u64) -> ErrOut {
        self.stats.leases_lost += 1;
        ErrOut::LeaseLost { token }
    }

    fn begin(&mut self, key: usize, fp: usize) -> BeginOut {
        let now = self.now;
        let lease_expires_at = now.saturating_add(self.lease);
        let current = self.alive(key).cloned();
        let out = match current {
            Some(r) if r.fp != fp => {
                self.stats.mismatches += 1;
                return BeginOut::Mismatch;
            }
            Some(MRecord {
                token,
                state:
                    MState::Completed {
                        completed_at,
                        expires_at,
                        response,
                    },
                ..
            }) => {
                self.stats.replayed += 1;
                return BeginOut::Replay(Done {
                    response,
                    token,
                    completed_at,
                    expires_at,
                });
            }
            Some(MRecord {
                state:
                    MState::InFlight {
                        lease_expires_at: live_until,
                        ..
                    },
                ..
            }) if now < live_until => {
                self.stats.in_flight_conflicts += 1;
                return BeginOut::InFlight {
                    retry_after: live_until - now,
                };
            }
            Some(MRecord {
                token: previous,
                state:
                    MState::InFlight {
                        created_at,
                        ttl_deadline,
                        attempt,
                        checkpoint,
                        ..
                    },
                ..
            }) => {
                // Takeover of an expired (or released) lease: deadlines of the first attempt kept.
                self.last_token += 1;
                let token = self.last_token;
                let attempt = attempt + 1;
                self.records.insert(
                    key,
                    MRecord {
                        fp,
                        token,
                        written: now,
                        state: MState::InFlight {
                            created_at,
                            ttl_deadline,
                            lease_expires_at,
                            attempt,
                            checkpoint: checkpoint.clone(),
                        },
                    },
                );
                self.stats.takeovers += 1;
                BeginOut::Started {
                    token,
                    expires_at: lease_expires_at,
                    recovered: Some((previous, attempt, checkpoint)),
                }
            }
            None => {
                self.last_token += 1;
                let token = self.last_token;
                self.records.insert(
                    key,
                    MRecord {
                        fp,
                        token,
                        written: now,
                        state: MState::InFlight {
                            created_at: now,
                            ttl_deadline: now.saturating_add(self.ttl),
                            lease_expires_at,
                            attempt: 1,
                            checkpoint: None,
                        },
                    },
                );
                BeginOut::Started {
                    token,
                    expires_at: lease_expires_at,
                    recovered: None,
                }
            }
        };
        self.stats.started += 1;
        out
    }

    fn complete(&mut self, key: usize, token: u64, response: &[u8]) -> Result<Done, ErrOut> {
        if response.len() > MAX_BYTES {
            // Nothing stored; the consumed lease is released as on drop.
            self.release(key, token);
            return Err(ErrOut::TooLarge);
        }
        let (now, ttl) = (self.now, self.ttl);
        let Some(r) = self.held(key, token) else {
            return Err(self.lost(token));
        };
        let done = Done {
            response: response.to_vec(),
            token,
            completed_at: now,
            expires_at: now.saturating_add(ttl),
        };
        r.written = now;
        r.state = MState::Completed {
            completed_at: done.completed_at,
            expires_at: done.expires_at,
            response: done.response.clone(),
        };
        self.stats.completed += 1;
        Ok(done)
    }

    /// `Ok(new lease_expires_at)`.
    fn extend(&mut self, key: usize, token: u64, by: u64) -> Result<u64, ErrOut> {
        if by == 0 {
            return Err(ErrOut::InvalidConfig);
        }
        let (now, until) = (self.now, self.now.saturating_add(by));
        let Some(r) = self.held(key, token) else {
            return Err(self.lost(token));
        };
        r.written = now;
        if let MState::InFlight {
            lease_expires_at, ..
        } = &mut r.state
        {
            *lease_expires_at = until;
        }
        Ok(until)
    }

    fn checkpoint(&mut self, key: usize, token: u64, bytes: &[u8]) -> Result<(), ErrOut> {
        if bytes.len() > MAX_BYTES {
            return Err(ErrOut::TooLarge);
        }
        let now = self.now;
        let Some(r) = self.held(key, token) else {
            return Err(self.lost(token));
        };
        r.written = now;
        if let MState::InFlight { checkpoint, .. } = &mut r.state {
            *checkpoint = Some(bytes.to_vec());
        }
        Ok(())
    }

    fn abandon(&mut self, key: usize, token: u64) -> Result<(), ErrOut> {
        if self.held(key, token).is_none() {
            return Err(self.lost(token));
        }
        self.records.remove(&key);
        self.stats.abandoned += 1;
        Ok(())
    }

    /// Drop of a lease: "lease_expires_at = now, checkpoint kept", best effort.
    fn release(&mut self, key: usize, token: u64) {
        let now = self.now;
        let Some(r) = self.held(key, token) else {
            self.stats.leases_lost += 1;
            return;
        };
        r.written = now;
        if let MState::InFlight {
            lease_expires_at, ..
        } = &mut r.state
        {
            *lease_expires_at = now;
        }
        self.stats.released += 1;
    }

    fn reap(&mut self) -> u64 {
        let now = self.now;
        let before = self.records.len();
        self.records.retain(|_, r| now < r.dies_at());
        let n = (before - self.records.len()) as u64;
        self.stats.reaped += n;
        n
    }

    fn get(&self, key: usize) -> Option<EntryOut> {
        let r = self.alive(key)?;
        Some(match &r.state {
            MState::InFlight {
                created_at,
                lease_expires_at,
                attempt,
                checkpoint,
                ..
            } => EntryOut::InFlight {
                token: r.token,
                lease_expires_at: *lease_expires_at,
                attempt: *attempt,
                checkpoint: checkpoint.clone(),
                created_at: *created_at,
                expires_at: r.dies_at(),
            },
            MState::Completed {
                completed_at,
                expires_at,
                response,
            } => EntryOut::Completed(Done {
                response: response.clone(),
                token: r.token,
                completed_at: *completed_at,
                expires_at: *expires_at,
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Observing the store
// ---------------------------------------------------------------------------------------

fn nanos(t: SystemTime) -> u64 {
    u64::try_from(
        t.duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos(),
    )
    .expect("fits in u64")
}

fn done(c: &Completed) -> Done {
    Done {
        response: c.response().to_vec(),
        token: c.token(),
        completed_at: nanos(c.completed_at()),
        expires_at: nanos(c.expires_at()),
    }
}

fn err(e: Error) -> ErrOut {
    match e {
        Error::LeaseLost { token } => ErrOut::LeaseLost { token },
        Error::ResponseTooLarge { .. } => ErrOut::TooLarge,
        Error::InvalidConfig { .. } => ErrOut::InvalidConfig,
        other => ErrOut::Other(other.to_string()),
    }
}

fn observe(b: Begin) -> (BeginOut, Option<Lease>) {
    match b {
        Begin::Started(lease) => (
            BeginOut::Started {
                token: lease.token(),
                expires_at: nanos(lease.expires_at()),
                recovered: lease.recovered().map(|r| {
                    (
                        r.previous_token(),
                        r.attempt(),
                        r.checkpoint().map(<[u8]>::to_vec),
                    )
                }),
            },
            Some(lease),
        ),
        Begin::Replay(c) => (BeginOut::Replay(done(&c)), None),
        Begin::InFlight { retry_after } => (
            BeginOut::InFlight {
                retry_after: u64::try_from(retry_after.as_nanos()).expect("fits"),
            },
            None,
        ),
        Begin::Mismatch => (BeginOut::Mismatch, None),
    }
}

fn entry(e: Entry) -> EntryOut {
    match e {
        Entry::InFlight {
            token,
            lease_expires_at,
            attempt,
            checkpoint,
            created_at,
            expires_at,
            ..
        } => EntryOut::InFlight {
            token,
            lease_expires_at: nanos(lease_expires_at),
            attempt,
            checkpoint,
            created_at: nanos(created_at),
            expires_at: nanos(expires_at),
        },
        Entry::Completed(c) => EntryOut::Completed(done(&c)),
    }
}

/// The counters the model keeps (the store may have more).
fn counters(s: &Stats) -> [(&'static str, u64); 11] {
    [
        ("started", s.started),
        ("replayed", s.replayed),
        ("in_flight_conflicts", s.in_flight_conflicts),
        ("mismatches", s.mismatches),
        ("takeovers", s.takeovers),
        ("completed", s.completed),
        ("abandoned", s.abandoned),
        ("released", s.released),
        ("leases_lost", s.leases_lost),
        ("reaped", s.reaped),
        ("reap_errors", s.reap_errors),
    ]
}

/// Bytes of a response or checkpoint, distinct per step so mix-ups show.
fn payload(size: Size, step: usize) -> Vec<u8> {
    (0..size.len())
        .map(|j| (step as u8).wrapping_mul(37).wrapping_add(j as u8))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------------------

struct Held {
    lease: Lease,
    key: usize,
    token: u64,
}

struct Harness<'a> {
    /// Opens the store under test with the given builder.
    open: &'a dyn Fn(Builder) -> idemstore::Result<Store>,
    assume: Assume,
    clock: ManualClock,
    store: Option<Store>,
    keys: Vec<Key>,
    fps: Vec<Fingerprint>,
    model: Model,
    held: Vec<Held>,
    max_token: u64,
    /// Per key: `(token, death time)` of the last record the clock moved past its death.
    seen_dead: HashMap<usize, (u64, u64)>,
    coverage: Coverage,
}

fn open(
    opener: &dyn Fn(Builder) -> idemstore::Result<Store>,
    clock: &ManualClock,
    settings: (u64, u64),
) -> Store {
    let builder = Store::builder()
        .ttl(Duration::from_millis(settings.0))
        .lease(Duration::from_millis(settings.1))
        .reap_interval(None)
        .max_response_bytes(MAX_BYTES)
        .durability(Durability::Immediate)
        .clock(clock.clone());
    opener(builder).expect("open the store")
}

impl<'a> Harness<'a> {
    fn new(opener: &'a dyn Fn(Builder) -> idemstore::Result<Store>, assume: Assume) -> Harness<'a> {
        let model = Model::new(SETTINGS[0]);
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_nanos(model.clock));
        let store = open(opener, &clock, SETTINGS[0]);
        Harness {
            open: opener,
            assume,
            clock,
            store: Some(store),
            keys: KEYS
                .iter()
                .map(|(s, i)| Key::new(s, i).expect("valid key"))
                .collect(),
            fps: FINGERPRINTS.iter().map(Fingerprint::of).collect(),
            model,
            held: Vec::new(),
            max_token: 0,
            seen_dead: HashMap::new(),
            coverage: Coverage::default(),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    fn pick(&self, lease: u8) -> Option<usize> {
        (!self.held.is_empty()).then(|| usize::from(lease) % self.held.len())
    }

    fn drop_lease(&mut self, i: usize) {
        let h = self.held.remove(i);
        let lost = self.model.stats.leases_lost;
        self.model.release(h.key, h.token);
        if self.model.stats.leases_lost == lost {
            self.coverage.released += 1;
        }
        drop(h.lease);
    }

    fn step(&mut self, step: usize, op: &Op) {
        if !matches!(op, Op::Advance(_)) {
            // Every other operation reads the clock (moving it reads nothing).
            self.model.read_clock();
        }
        match *op {
            Op::Begin { key, fp } => {
                let (k, f) = (usize::from(key) % KEYS.len(), usize::from(fp) % 2);
                let mut want = self.model.begin(k, f);
                let got = self.store().begin(&self.keys[k], &self.fps[f]);
                let (got, lease) = observe(got.expect("begin"));
                if !self.assume.dense_tokens
                    && let (BeginOut::Started { token: g, .. }, BeginOut::Started { token: w, .. }) =
                        (&got, &mut want)
                    && *g > self.max_token
                {
                    // Tokens may skip values: the model takes the store's (rising is checked
                    // below).
                    self.model.retoken(k, *g);
                    *w = *g;
                }
                assert_eq!(got, want, "begin(key {k}, fp {f})");
                match &got {
                    BeginOut::Started {
                        token, recovered, ..
                    } => {
                        assert!(
                            *token > self.max_token,
                            "token {token} not above {}",
                            self.max_token
                        );
                        self.max_token = *token;
                        self.coverage.started += 1;
                        if let Some((_, _, cp)) = recovered {
                            self.coverage.takeovers += 1;
                            self.coverage.takeovers_with_checkpoint += u64::from(cp.is_some());
                        }
                        self.held.push(Held {
                            lease: lease.expect("Started carries a lease"),
                            key: k,
                            token: *token,
                        });
                    }
                    BeginOut::Replay(_) => self.coverage.replays += 1,
                    BeginOut::InFlight { .. } => self.coverage.in_flight += 1,
                    BeginOut::Mismatch => self.coverage.mismatches += 1,
                }
            }
            Op::Complete { lease, size } => {
                let Some(i) = self.pick(lease) else { return };
                let h = self.held.remove(i);
                let bytes = payload(size, step);
                let want = self.model.complete(h.key, h.token, &bytes);
                let got = h.lease.complete(&bytes).map(|c| done(&c)).map_err(err);
                assert_eq!(
                    got,
                    want,
                    "complete(token {}, {} bytes)",
                    h.token,
                    bytes.len()
                );
                self.count(&got);
                if got.is_ok() {
                    self.coverage.completed += 1;
                }
            }
            Op::Extend { lease, by } => {
                let Some(i) = self.pick(lease) else { return };
                let by = match by {
                    By::Zero => 0,
                    By::Ms => MS,
                    By::Lease => self.model.lease,
                    By::Ttl => self.model.ttl,
                    By::TwoTtl => 2 * self.model.ttl,
                };
                let (key, token) = (self.held[i].key, self.held[i].token);
                let want = self.model.extend(key, token, by);
                let lease = &mut self.held[i].lease;
                let got = lease
                    .extend(Duration::from_nanos(by))
                    .map(|()| nanos(lease.expires_at()))
                    .map_err(err);
                assert_eq!(got, want, "extend(token {token}, {by} ns)");
                self.count(&got);
            }
            Op::Checkpoint { lease, size } => {
                let Some(i) = self.pick(lease) else { return };
                let bytes = payload(size, step);
                let (key, token) = (self.held[i].key, self.held[i].token);
                let want = self.model.checkpoint(key, token, &bytes);
                let got = self.held[i].lease.checkpoint(&bytes).map_err(err);
                assert_eq!(
                    got,
                    want,
                    "checkpoint(token {token}, {} bytes)",
                    bytes.len()
                );
                self.count(&got);
            }
            Op::Abandon { lease } => {
                let Some(i) = self.pick(lease) else { return };
                let h = self.held.remove(i);
                let want = self.model.abandon(h.key, h.token);
                let got = h.lease.abandon().map_err(err);
                assert_eq!(got, want, "abandon(token {})", h.token);
                self.count(&got);
                if got.is_ok() {
                    self.coverage.abandoned += 1;
                }
            }
            Op::Drop { lease } => {
                if let Some(i) = self.pick(lease) {
                    self.drop_lease(i);
                }
            }
            Op::Advance(tick) => {
                let (l, t) = (self.model.lease, self.model.ttl);
                let now = self.model.clock;
                let to = match tick {
                    Tick::Zero => now,
                    Tick::Ms => now + MS,
                    Tick::LeaseMinusMs => now + l - MS,
                    Tick::Lease => now + l,
                    Tick::LeasePlusMs => now + l + MS,
                    Tick::TtlMinusMs => now + t - MS,
                    Tick::Ttl => now + t,
                    Tick::TtlPlusMs => now + t + MS,
                    Tick::BackMs => now - MS,
                    Tick::BackLease => now - l,
                };
                self.model.clock = to;
                self.clock.set(UNIX_EPOCH + Duration::from_nanos(to));
            }
            Op::Reap => {
                let want = self.model.reap();
                let got = self.store().reap().expect("reap");
                assert_eq!(got, want, "reap() deleted");
                self.coverage.reaped += got;
            }
            Op::Reopen { settings } => {
                while !self.held.is_empty() {
                    self.drop_lease(0);
                }
                if self.assume.reopens {
                    self.check_stats("before close");
                    self.store.take().expect("open").close().expect("close");
                    let s = SETTINGS[usize::from(settings) % SETTINGS.len()];
                    self.model.reopen(s);
                    self.store = Some(open(self.open, &self.clock, s));
                    self.coverage.reopens += 1;
                }
            }
        }
    }

    fn count<T>(&mut self, r: &Result<T, ErrOut>) {
        if let Err(ErrOut::LeaseLost { .. }) = r {
            self.coverage.leases_lost += 1;
        }
    }

    fn verify(&mut self, step: usize, op: &Op) {
        self.model.read_clock();
        if self.model.clock < self.model.now {
            self.coverage.clock_behind += 1;
        }
        for (k, key) in self.keys.iter().enumerate() {
            let got = self.store().get(key).expect("get").map(entry);
            let want = self.model.get(k);
            assert_eq!(got, want, "get(key {k}) after step {step} {op:?}");
            let revived = self
                .model
                .records
                .get(&k)
                .is_some_and(|r| self.seen_dead.get(&k) == Some(&(r.token, r.dies_at())));
            assert!(
                !(got.is_some() && revived),
                "key {k}: a record seen dead came back after step {step} {op:?}"
            );
        }
        // Remember records that are dead now, to count revivals after a reopen.
        for (k, r) in &self.model.records {
            if self.model.now >= r.dies_at() {
                self.seen_dead.insert(*k, (r.token, r.dies_at()));
            }
        }
        self.check_stats(&format!("after step {step} {op:?}"));
    }

    fn check_stats(&self, when: &str) {
        assert_eq!(
            counters(&self.store().stats()),
            counters(&self.model.stats),
            "stats {when}"
        );
    }

    fn finish(mut self) -> Coverage {
        while !self.held.is_empty() {
            self.drop_lease(0);
        }
        self.check_stats("at the end");
        self.store.take().expect("open").close().expect("close");
        self.coverage.corrections = self.model.corrections;
        self.coverage
    }
}

/// Runs `ops` against a new store on `backend` and against the model, asserting after every
/// step. Panics on the first difference. Returns what the run exercised.
pub fn check(backend: &Backend, ops: &[Op]) -> Coverage {
    match backend {
        Backend::Memory => check_on(&|b: Builder| b.open_in_memory(), Assume::MEMORY, ops),
        Backend::File(path) => check_on(&|b: Builder| b.open(path), Assume::FILE, ops),
    }
}

/// What the checker may assume of the store under test.
#[derive(Clone, Copy, Debug)]
pub struct Assume {
    /// `Reopen` closes the store and opens it again, and the new one finds the same records
    /// (a file, a PostgreSQL schema); when false, `Reopen` does nothing.
    pub reopens: bool,
    /// Tokens are 1, 2, 3… with no value skipped (redb); when false (a PostgreSQL sequence,
    /// which may skip values), each new token only has to be above every earlier one.
    pub dense_tokens: bool,
}

impl Assume {
    /// redb in memory.
    pub const MEMORY: Assume = Assume {
        reopens: false,
        dense_tokens: true,
    };
    /// redb on a file.
    pub const FILE: Assume = Assume {
        reopens: true,
        dense_tokens: true,
    };
    /// PostgreSQL.
    pub const POSTGRES: Assume = Assume {
        reopens: true,
        dense_tokens: false,
    };
}

/// As [`check`], on the store `open` opens from a builder (the checker's settings and
/// clock), assuming `assume` of it. Each call needs a new, empty store: the model's tokens
/// start above 0 and its records are none.
pub fn check_on(
    open: &dyn Fn(Builder) -> idemstore::Result<Store>,
    assume: Assume,
    ops: &[Op],
) -> Coverage {
    let mut h = Harness::new(open, assume);
    for (step, op) in ops.iter().enumerate() {
        h.step(step, op);
        h.verify(step, op);
    }
    h.finish()
}
