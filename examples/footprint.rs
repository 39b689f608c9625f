//! Disk and memory footprint: store N completed records with 200-byte responses, then
//! report bytes on disk per record and the process's peak resident memory (VmHWM from
//! /proc/self/status, Linux), with the default 32 MiB page cache.
//!
//! ```sh
//! cargo run --release --example footprint               # 1,000,000 records
//! cargo run --release --example footprint -- 100000     # fewer
//! ```
//!
//! Records are written by 64 threads with `Durability::None` (the figure of interest is the
//! footprint, not the speed; the clean close makes them durable before the file is measured),
//! or with `IDEMSTORE_DURABILITY=immediate`, one fsync per group commit as in production.
//! The store is then reopened and every 100th record replayed, so the peak includes a
//! working read path over the full file.

use std::time::Instant;

use idemstore::{Begin, Durability, Fingerprint, Key, Store};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn key(i: u64) -> Key {
    // UUID-shaped, spread over the key space like real idempotency keys.
    let z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7);
    Key::new(
        "tenant-1",
        &format!("{:016x}-{:08x}-4000-8000", z, i as u32),
    )
    .expect("key")
}

fn main() -> Result<(), idemstore::Error> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the record count is a number"))
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("footprint.redb");
    let response = [b'x'; 200];
    let start = Instant::now();
    {
        let durability = match std::env::var("IDEMSTORE_DURABILITY").as_deref() {
            Ok("immediate") => Durability::Immediate,
            _ => Durability::None,
        };
        let store = Store::builder()
            .durability(durability)
            .reap_interval(None)
            .open(&path)?;
        let threads = 64u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let store = &store;
                s.spawn(move || {
                    for i in (t..n).step_by(threads as usize) {
                        let k = key(i);
                        match store.begin(&k, &Fingerprint::of(k.id())) {
                            Ok(Begin::Started(lease)) => {
                                lease.complete(&response).expect("complete");
                            }
                            other => panic!("fresh key did not start: {other:?}"),
                        }
                        if t == 0 && i % 100_000 == 0 {
                            eprintln!("  {i} / {n} records…");
                        }
                    }
                });
            }
        });
        store.close()?;
    }
    let written = start.elapsed();
    let bytes = std::fs::metadata(&path).expect("metadata").len();
    let reopen = Instant::now();
    let store = Store::builder().reap_interval(None).open(&path)?;
    let reopened = reopen.elapsed();
    for i in (0..n).step_by(100) {
        let k = key(i);
        match store.begin(&k, &Fingerprint::of(k.id()))? {
            Begin::Replay(done) => assert_eq!(done.response(), &response[..]),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    store.close()?;
    println!("| measure | value |");
    println!("|---|---|");
    println!("| records | {n} (200-byte responses, written in {written:.1?}) |");
    println!(
        "| file size | {:.1} MiB = {:.0} bytes per record |",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / n as f64
    );
    println!("| reopen (format check + integrity check of the whole file) | {reopened:.2?} |");
    match peak_rss_kib() {
        Some(kib) => println!("| peak RSS (VmHWM) | {:.1} MiB |", kib as f64 / 1024.0),
        None => println!("| peak RSS | not available on this OS |"),
    }
    Ok(())
}
