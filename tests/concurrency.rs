//! Concurrency: 8 threads each run the same 100 logical operations (one key each, in their
//! own order), retrying on `InFlight`, while a ticker thread moves the shared `ManualClock`
//! so leases (50 ms of clock time, about 15 ms of real time) run out while handlers sleep.
//! Some handlers are therefore taken over. Checked, per operation:
//!
//! * side effects == 1 + takeovers, and exactly one attempt started from scratch;
//! * the holders form one chain: each takeover names the previous token and the next attempt
//!   number, and its lease began no earlier than the previous lease ended (mutual exclusion);
//! * every taken-over holder's `complete` failed with `LeaseLost` (fencing), the last holder's
//!   succeeded;
//! * every caller that got a response saw the winning holder's bytes, and `get` agrees;
//! * takeovers really happened (the race is real), and the counters agree.
//!
//! Each test runs on every engine (`memory::`, `redb::`, `postgres::` in the test names).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use idemstore::{Begin, Durability, Entry, Error, Fingerprint, Key, ManualClock, Store};
use idemstore_testkit::engine::{Engine, Place};
use idemstore_testkit::rng::{RngExt, rng};

const THREADS: usize = 8;
const OPS: usize = 100;
const LEASE: Duration = Duration::from_millis(50);
/// Clock time added by the ticker every `TICK_EVERY` of real time (not a divisor of the
/// lease, so a takeover even 1 ms early would show as overlapping leases).
const TICK: Duration = Duration::from_millis(7);
const TICK_EVERY: Duration = Duration::from_millis(2);
/// Longest handler, in real time: about 1.7 times the lease's real-time length.
const MAX_HANDLER_MS: u64 = 25;

/// What one caller saw for one operation.
#[derive(Clone, Debug)]
enum Event {
    Started {
        token: u64,
        /// `(previous_token, attempt)` for a takeover.
        recovered: Option<(u64, u32)>,
        lease_start: u128,
        lease_end: u128,
    },
    Completed {
        token: u64,
        bytes: Vec<u8>,
    },
    Fenced {
        token: u64,
    },
    Replayed {
        bytes: Vec<u8>,
    },
}

struct Shared {
    store: Store,
    keys: Vec<Key>,
    fps: Vec<Fingerprint>,
    side_effects: Vec<AtomicU64>,
    events: Vec<Mutex<Vec<Event>>>,
}

fn nanos(t: std::time::SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos()
}

fn worker(shared: &Shared, thread: usize, seed: u64) {
    let mut rng = rng(seed ^ (thread as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..OPS).collect();
    for i in (1..OPS).rev() {
        order.swap(i, rng.random_range(0..i as u64 + 1) as usize);
    }
    for op in order {
        let (key, fp) = (&shared.keys[op], &shared.fps[op]);
        let mut log = Vec::new();
        loop {
            match shared.store.begin(key, fp).expect("begin") {
                Begin::Started(lease) => {
                    let token = lease.token();
                    log.push(Event::Started {
                        token,
                        recovered: lease.recovered().map(|r| (r.previous_token(), r.attempt())),
                        lease_start: nanos(lease.expires_at()) - LEASE.as_nanos(),
                        lease_end: nanos(lease.expires_at()),
                    });
                    // The handler: its side effect, then some real time during which the
                    // ticker may run the lease out and another thread take over.
                    shared.side_effects[op].fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(
                        rng.random_range(0..MAX_HANDLER_MS + 1),
                    ));
                    let response = format!("op {op} done by thread {thread} under token {token}");
                    match lease.complete(response.as_bytes()) {
                        Ok(done) => {
                            assert_eq!(done.response(), response.as_bytes());
                            assert_eq!(done.token(), token);
                            log.push(Event::Completed {
                                token,
                                bytes: response.into_bytes(),
                            });
                            break;
                        }
                        Err(Error::LeaseLost { token: lost }) => {
                            assert_eq!(lost, token);
                            log.push(Event::Fenced { token });
                        }
                        Err(e) => panic!("complete of op {op}: {e}"),
                    }
                }
                Begin::Replay(done) => {
                    log.push(Event::Replayed {
                        bytes: done.response().to_vec(),
                    });
                    break;
                }
                Begin::InFlight { retry_after } => {
                    assert!(retry_after > Duration::ZERO && retry_after <= LEASE);
                    thread::sleep(Duration::from_micros(300));
                }
                Begin::Mismatch => panic!("op {op}: mismatch for its own fingerprint"),
            }
        }
        shared.events[op].lock().expect("events").extend(log);
    }
}

/// Runs the race once on a new store of `engine`; returns the number of takeovers.
fn race(engine: Engine, durability: Durability, seed: u64) -> u64 {
    let place = Place::new(engine).expect("the engine of a place is available");
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let store = place
        .open(
            Store::builder()
                .ttl(Duration::from_secs(24 * 3600))
                .lease(LEASE)
                .reap_interval(None)
                .durability(durability)
                .clock(clock.clone()),
        )
        .expect("open");
    let shared = Arc::new(Shared {
        store,
        keys: (0..OPS)
            .map(|i| Key::new("concurrency", &format!("op-{i:03}")).expect("key"))
            .collect(),
        fps: (0..OPS)
            .map(|i| Fingerprint::of(format!("POST /op/{i}").as_bytes()))
            .collect(),
        side_effects: (0..OPS).map(|_| AtomicU64::new(0)).collect(),
        events: (0..OPS).map(|_| Mutex::new(Vec::new())).collect(),
    });

    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (stop, clock) = (stop.clone(), clock.clone());
        thread::Builder::new()
            .name("ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(TICK_EVERY);
                    clock.advance(TICK);
                }
            })
            .expect("spawn ticker")
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("worker-{t}"))
                .spawn(move || worker(&shared, t, seed))
                .expect("spawn worker")
        })
        .collect();
    for w in workers {
        w.join().expect("worker panicked");
    }
    stop.store(true, Ordering::Relaxed);
    ticker.join().expect("ticker");
    let elapsed = started.elapsed();

    let mut takeovers_total = 0;
    let mut fenced_total = 0;
    for op in 0..OPS {
        let events = shared.events[op].lock().expect("events").clone();
        let mut starts: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Started {
                    token,
                    recovered,
                    lease_start,
                    lease_end,
                } => Some((*token, *recovered, *lease_start, *lease_end)),
                _ => None,
            })
            .collect();
        starts.sort_by_key(|s| s.0);
        let takeovers = starts.iter().filter(|s| s.1.is_some()).count() as u64;
        let fresh = starts.len() as u64 - takeovers;
        takeovers_total += takeovers;

        let side_effects = shared.side_effects[op].load(Ordering::SeqCst);
        assert_eq!(
            fresh, 1,
            "op {op}: {fresh} attempts started from scratch: {events:?}"
        );
        assert_eq!(
            side_effects,
            1 + takeovers,
            "op {op}: side effects vs takeovers: {events:?}"
        );

        // One chain of holders: each takeover names its predecessor, leases never overlap.
        assert!(starts[0].1.is_none(), "op {op}: first holder is a takeover");
        for (n, pair) in starts.windows(2).enumerate() {
            let (prev, next) = (pair[0], pair[1]);
            assert_eq!(
                next.1,
                Some((prev.0, n as u32 + 2)),
                "op {op}: takeover chain broken: {starts:?}"
            );
            assert!(
                next.2 >= prev.3,
                "op {op}: lease of token {} began before the lease of token {} ended",
                next.0,
                prev.0
            );
        }

        // Fencing: every holder that was taken over failed to complete; the last one won.
        let (last, earlier) = starts.split_last().expect("at least one holder");
        for s in earlier {
            let fenced = events
                .iter()
                .any(|e| matches!(e, Event::Fenced { token } if *token == s.0));
            let completed = events
                .iter()
                .any(|e| matches!(e, Event::Completed { token, .. } if *token == s.0));
            assert!(
                fenced && !completed,
                "op {op}: token {} was taken over but not fenced: {events:?}",
                s.0
            );
            fenced_total += 1;
        }
        let winners: Vec<&Vec<u8>> = events
            .iter()
            .filter_map(|e| match e {
                Event::Completed { token, bytes } => {
                    assert_eq!(*token, last.0, "op {op}: a stale holder completed");
                    Some(bytes)
                }
                _ => None,
            })
            .collect();
        assert_eq!(winners.len(), 1, "op {op}: completions: {events:?}");
        let expected = winners[0].clone();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Fenced { .. }))
                .count() as u64,
            takeovers,
            "op {op}: fenced holders vs takeovers: {events:?}"
        );

        // Replay fidelity: every response anyone got is the winner's bytes.
        let responses = events
            .iter()
            .filter(|e| matches!(e, Event::Completed { .. } | Event::Replayed { .. }))
            .count();
        assert_eq!(responses, THREADS, "op {op}: every thread got one response");
        for e in &events {
            if let Event::Replayed { bytes } = e {
                assert_eq!(bytes, &expected, "op {op}: replayed other bytes");
            }
        }
        match shared.store.get(&shared.keys[op]).expect("get") {
            Some(Entry::Completed(done)) => assert_eq!(done.response(), expected.as_slice()),
            other => panic!("op {op}: stored {other:?}"),
        }
    }

    let total: u64 = shared
        .side_effects
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum();
    assert_eq!(total, OPS as u64 + takeovers_total);
    assert_eq!(total > OPS as u64, takeovers_total > 0);
    let stats = shared.store.stats();
    assert_eq!(stats.takeovers, takeovers_total, "{stats:?}");
    assert_eq!(stats.started, total, "{stats:?}");
    assert_eq!(stats.completed, OPS as u64, "{stats:?}");
    assert_eq!(stats.leases_lost, fenced_total, "{stats:?}");
    assert_eq!(
        stats.replayed,
        (THREADS * OPS - OPS) as u64,
        "every other caller got a replay: {stats:?}"
    );
    println!(
        "{engine:?}, {durability:?}, seed {seed:#x}: {takeovers_total} takeovers, {} in-flight answers, {elapsed:?}",
        stats.in_flight_conflicts
    );
    let store = Arc::try_unwrap(shared)
        .ok()
        .expect("workers are done")
        .store;
    store.close().expect("close");
    takeovers_total
}

/// Three races with different orders and handler times; the race must really happen.
fn races(engine: Engine, durability: Durability) {
    let takeovers: u64 = (1..=3u64)
        .map(|round| {
            race(
                engine,
                durability,
                round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
        })
        .sum();
    assert!(
        takeovers > 0,
        "no lease ran out under a handler: the race did not happen, tune the timings"
    );
}

fn takeovers_are_fenced_and_side_effects_counted(place: &Place) {
    races(place.engine(), Durability::None);
}

fn takeovers_are_fenced_with_immediate_durability(place: &Place) {
    races(place.engine(), Durability::Immediate);
}

/// Reads racing two writers that claim one key, rewrite its record in place (checkpoints)
/// and delete it (abandon), over and over (a deletion and the other writer's claim can land
/// in one batch): a read never fails and only ever sees a state the key really had (absent,
/// or in flight with a checkpoint a writer stored), and never an older checkpoint after a
/// newer one within one claim.
fn reads_racing_claims_rewrites_and_deletes_see_only_real_states(place: &Place) {
    const CLAIMS: u64 = 500;
    let store = place
        .open(
            Store::builder()
                .durability(Durability::None)
                .reap_interval(None),
        )
        .unwrap();
    let key = Key::new("race", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11").unwrap();
    let writers_done = AtomicU64::new(0);
    let (seen_absent, seen_present) = (AtomicU64::new(0), AtomicU64::new(0));
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                // (token, last checkpoint number) of the claim this reader saw last.
                let mut last: Option<(u64, u64)> = None;
                while writers_done.load(Ordering::Acquire) < 2 {
                    match store.get(&key).expect("a read never fails") {
                        None => {
                            seen_absent.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Entry::InFlight {
                            token, checkpoint, ..
                        }) => {
                            seen_present.fetch_add(1, Ordering::Relaxed);
                            let n = checkpoint.map_or(0, |c| {
                                let text = String::from_utf8(c).expect("a stored checkpoint");
                                text.strip_prefix("step ")
                                    .and_then(|n| n.parse().ok())
                                    .expect("a checkpoint a writer stored")
                            });
                            if let Some((t, m)) = last
                                && t == token
                            {
                                assert!(n >= m, "checkpoint {n} read after {m}, token {token}");
                            }
                            last = Some((token, n));
                        }
                        Some(other) => panic!("the key is never completed: {other:?}"),
                    }
                }
            });
        }
        for _ in 0..2 {
            s.spawn(|| {
                let fp = Fingerprint::of(b"request");
                let mut claims = 0;
                while claims < CLAIMS {
                    match store.begin(&key, &fp).unwrap() {
                        Begin::Started(mut lease) => {
                            claims += 1;
                            for step in 1..=(claims % 3) {
                                lease.checkpoint(format!("step {step}").as_bytes()).unwrap();
                            }
                            lease.abandon().unwrap();
                        }
                        Begin::InFlight { .. } => thread::yield_now(),
                        other => panic!("the key is never completed: {other:?}"),
                    }
                }
                writers_done.fetch_add(1, Ordering::Release);
            });
        }
    });
    let (absent, present) = (
        seen_absent.load(Ordering::Relaxed),
        seen_present.load(Ordering::Relaxed),
    );
    assert!(
        absent > 0 && present > 0,
        "absent {absent}, present {present}"
    );
}

idemstore_testkit::engine_tests! {
    every:
        takeovers_are_fenced_and_side_effects_counted,
        reads_racing_claims_rewrites_and_deletes_see_only_real_states,
    ;
    // redb only: `Durability` is redb's fsync setting (PostgreSQL commits with the server's
    // own), so on PostgreSQL this would repeat the race above.
    redb:
        takeovers_are_fenced_with_immediate_durability,
    ;
}
