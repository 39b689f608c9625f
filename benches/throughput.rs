//! criterion benches of idemstore's hot paths (file store, `Durability::Immediate`):
//!
//! * `cycles/N`: begin + complete on fresh keys from N caller threads (1, 8, 64), against
//!   `naive/N`, the same transitions with one redb transaction per operation (baseline in the
//!   same run, see `idemstore_testkit::peers`);
//! * `replay/N`: `begin` answering `Replay`, 1 and 2 threads, against `raw_lookup/N`, a redb
//!   read transaction + get;
//! * `begin_in_flight`: `begin` on a key held in flight (a read-only answer).
//!
//! `cargo bench --bench throughput` (a few minutes). Ratios are computed from criterion's
//! report in BENCHMARKS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemstore::{Begin, Fingerprint, Key};
use idemstore_testkit::peers::{self, Idem, NaiveRedb, Peer};

/// Runs `iters` cycles split over `threads` callers and returns the wall time.
fn timed_cycles(peer: &dyn Peer, threads: usize, iters: u64, next: &AtomicU64) -> Duration {
    let per = iters.div_ceil(threads as u64);
    let base = next.fetch_add(per, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..per {
                    peer.cycle(t, base + i);
                }
            });
        }
    });
    start.elapsed()
}

fn cycles(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("cycles");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    for threads in [1usize, 8, 64] {
        let idem = Idem::open(&dir.path().join(format!("idem-{threads}.redb")));
        let next = AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("idemstore", threads), |b| {
            b.iter_custom(|iters| timed_cycles(&idem, threads, iters, &next))
        });
        let naive = NaiveRedb::open(&dir.path().join(format!("naive-{threads}.redb")));
        let next = AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("naive", threads), |b| {
            b.iter_custom(|iters| timed_cycles(&naive, threads, iters, &next))
        });
    }
    group.finish();
}

const REPLAY_KEYS: u64 = 10_000;

fn replay(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let idem = Idem::open(&dir.path().join("replay.redb"));
    let raw = NaiveRedb::open(&dir.path().join("raw.redb"));
    // Data is written before timing starts.
    std::thread::scope(|s| {
        for t in 0..8 {
            let (idem, raw) = (&idem, &raw);
            s.spawn(move || {
                for i in (t..REPLAY_KEYS).step_by(8) {
                    idem.cycle(0, i);
                    raw.cycle(0, i);
                }
            });
        }
    });
    let keys: Vec<(Key, Fingerprint, String)> = (0..REPLAY_KEYS)
        .map(|i| {
            let id = peers::key_id(0, i);
            let k = Key::new("bench", &id).expect("key");
            let fp = Fingerprint::of(k.id());
            (k, fp, id)
        })
        .collect();
    let mut group = c.benchmark_group("replay");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        let keys = &keys;
        let run = |iters: u64, f: &(dyn Fn(&(Key, Fingerprint, String)) + Sync)| {
            let per = iters.div_ceil(threads as u64);
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    s.spawn(move || {
                        for i in 0..per {
                            f(&keys[((i * 7919 + t as u64 * 31) % REPLAY_KEYS) as usize]);
                        }
                    });
                }
            });
            start.elapsed()
        };
        group.bench_function(BenchmarkId::new("idemstore", threads), |b| {
            b.iter_custom(|iters| {
                run(iters, &|(k, fp, _)| match idem.store.begin(k, fp) {
                    Ok(Begin::Replay(done)) => assert_eq!(done.response().len(), 200),
                    other => panic!("expected a replay, got {other:?}"),
                })
            })
        });
        group.bench_function(BenchmarkId::new("raw_lookup", threads), |b| {
            b.iter_custom(|iters| {
                run(iters, &|(_, _, id)| {
                    assert!(raw.lookup(id.as_bytes()).is_some())
                })
            })
        });
    }
    group.finish();
}

fn begin_in_flight(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let idem = Idem::open(&dir.path().join("inflight.redb"));
    let key = Key::new("bench", "held-6a1f4c1e-8e1c-4c36-9d51").expect("key");
    let fp = Fingerprint::of(b"body");
    let Ok(Begin::Started(lease)) = idem.store.begin(&key, &fp) else {
        panic!("fresh key must start")
    };
    c.bench_function("begin_in_flight", |b| {
        b.iter(|| match idem.store.begin(&key, &fp) {
            Ok(Begin::InFlight { .. }) => {}
            other => panic!("expected InFlight, got {other:?}"),
        })
    });
    drop(lease);
}

criterion_group!(benches, cycles, replay, begin_in_flight);
criterion_main!(benches);
