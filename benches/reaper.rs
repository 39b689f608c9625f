//! The reaper under load: delete 100k dead records while 8 threads run durable begin +
//! complete cycles, and compare the foreground p99 with the same load without reaping
//! (the baseline, measured in the same run).
//!
//! `cargo bench --bench reaper` (about a minute). `IDEMSTORE_BENCH_RECORDS=20000` for a
//! smaller run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use idemstore::{Durability, ManualClock, Store};
use idemstore_testkit::peers::{Idem, Peer};

const THREADS: usize = 8;

/// Runs cycles on `THREADS` threads until `stop`; returns every cycle's latency.
fn foreground(idem: &Idem, next: &AtomicU64, stop: &AtomicBool) -> Vec<Duration> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let start = Instant::now();
                        idem.cycle(t, i);
                        lat.push(start.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("foreground thread"))
            .collect()
    })
}

fn p99(mut lat: Vec<Duration>) -> (Duration, usize) {
    lat.sort();
    let n = lat.len();
    (lat[(n * 99 / 100).min(n.saturating_sub(1))], n)
}

fn main() {
    let records: u64 = std::env::var("IDEMSTORE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reaper.redb");
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let ttl = Duration::from_secs(3600);

    // Data first, outside any timing: `records` completed records, written without fsync and
    // made durable by the clean close.
    eprintln!("writing {records} records…");
    {
        let store = Store::builder()
            .ttl(ttl)
            .durability(Durability::None)
            .reap_interval(None)
            .clock(clock.clone())
            .open(&path)
            .expect("open");
        let fill = Idem { store };
        std::thread::scope(|s| {
            for t in 0..THREADS as u64 {
                let fill = &fill;
                s.spawn(move || {
                    for i in (t..records).step_by(THREADS) {
                        fill.cycle(usize::MAX, i);
                    }
                });
            }
        });
        fill.store.close().expect("close");
    }
    let store = Store::builder()
        .ttl(ttl)
        .durability(Durability::Immediate)
        .reap_interval(None)
        .clock(clock.clone())
        .open(&path)
        .expect("reopen");
    let idem = Idem { store };
    let next = AtomicU64::new(0);

    // Baseline: the foreground alone.
    let stop = AtomicBool::new(false);
    let unloaded = std::thread::scope(|s| {
        let h = s.spawn(|| foreground(&idem, &next, &stop));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        h.join().expect("join")
    });
    let (p99_unloaded, n_unloaded) = p99(unloaded);

    // Every filled record dies; the foreground's own records stay alive.
    clock.advance(ttl + Duration::from_secs(1));
    let stop = AtomicBool::new(false);
    let (loaded, reaped, reap_time) = std::thread::scope(|s| {
        let h = s.spawn(|| foreground(&idem, &next, &stop));
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let reaped = idem.store.reap().expect("reap");
        let reap_time = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        (h.join().expect("join"), reaped, reap_time)
    });
    let (p99_loaded, n_loaded) = p99(loaded);
    let rate = reaped as f64 / reap_time.as_secs_f64();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| dead records reaped | {reaped} in {reap_time:.2?} = {rate:.0}/s |");
    println!(
        "| foreground p99 without reaping (baseline) | {p99_unloaded:.2?} over {n_unloaded} cycles |"
    );
    println!("| foreground p99 while reaping | {p99_loaded:.2?} over {n_loaded} cycles |");
    println!(
        "| p99 ratio (reaping / baseline) | {:.2}× |",
        p99_loaded.as_secs_f64() / p99_unloaded.as_secs_f64()
    );
    // The filled records and the baseline's own cycles were all dead.
    assert!(
        reaped >= records,
        "only {reaped} of {records} dead records reaped"
    );
    idem.store.close().expect("close");
}
