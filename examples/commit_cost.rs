//! What one durable commit costs on this machine, peer by peer: its time, the bytes it
//! writes to the disk, and the CPU it takes without the fsync. One caller, fresh keys, one
//! begin + complete cycle after another (two commits per cycle).
//!
//! ```text
//! cargo run --release --example commit_cost -- [--cycles N] [--rounds R]
//! ```
//!
//! - **µs per commit**: the median over the rounds of the run's time / commits.
//! - **KiB written per commit**: what the process wrote to the disk meanwhile
//!   (`write_bytes` of `/proc/self/io`, Linux only), / commits. The fsync's time grows with it.
//! - **µs per commit, no fsync**: the same peer at `Durability::None` (redb peers only): the
//!   CPU of a commit, without waiting for the disk.
//!
//! The peers are those of `compare`: idemstore, the full-state-machine redb baseline (one
//! transaction per operation), the simplest redb code (one table), and SQLite in WAL mode with
//! `synchronous=FULL`, each redb peer at two-phase (the default) and one-phase commits.

use std::path::Path;
use std::time::Instant;

use idemstore::Durability;
use idemstore_testkit::peers::{Idem, NaiveRedb, Peer, SimplestRedb, Sqlite};

/// A peer by name, opened on a file in a folder.
struct Entry {
    name: &'static str,
    open: fn(&Path, Durability) -> Box<dyn Peer>,
    /// Whether it has a `Durability::None` run (redb peers).
    redb: bool,
}

const WARM_UP: u64 = 200;

fn main() {
    let (cycles, rounds) = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("commit_cost: {e}\nusage: commit_cost [--cycles N] [--rounds R]");
            std::process::exit(2);
        }
    };
    let peers = [
        Entry {
            name: "idemstore",
            open: |p, d| Box::new(Idem::open_with(&p.join("store.redb"), d)),
            redb: true,
        },
        Entry {
            name: "full-state-machine redb (1 txn/op)",
            open: |p, d| Box::new(NaiveRedb::open_with(&p.join("naive.redb"), d)),
            redb: true,
        },
        Entry {
            name: "simplest redb (1 table)",
            open: |p, d| Box::new(SimplestRedb::open_with(&p.join("simplest.redb"), d)),
            redb: true,
        },
        Entry {
            name: "SQLite WAL synchronous=FULL",
            open: |p, _| Box::new(Sqlite::open(&p.join("sqlite.db"), 1)),
            redb: false,
        },
    ];
    let durabilities = [
        ("2-phase", Durability::Immediate),
        ("1-phase", Durability::ImmediateOnePhase),
    ];
    println!("{cycles} cycles per round, {rounds} round(s), one caller; medians over rounds");
    println!();
    println!(
        "| peer | commit | µs per commit | KiB written per commit | µs per commit, no fsync |"
    );
    println!("|---|---|---|---|---|");
    for peer in &peers {
        let modes: &[(&str, Durability)] = if peer.redb {
            &durabilities
        } else {
            &durabilities[..1]
        };
        for &(label, durability) in modes {
            let label = if peer.redb { label } else { "1 fsync" };
            let mut micros = Vec::new();
            let mut kib = Vec::new();
            let mut cpu = Vec::new();
            for round in 0..rounds {
                eprint!("\r{} {label}: round {}/{rounds}   ", peer.name, round + 1);
                let (m, k) = measure(peer, durability, cycles);
                micros.push(m);
                kib.extend(k);
                if peer.redb {
                    cpu.push(measure(peer, Durability::None, cycles).0);
                }
            }
            eprint!("\r{:70}\r", "");
            let kib = if kib.is_empty() {
                "n/a".to_owned()
            } else {
                format!("{:.1}", median(&mut kib))
            };
            let cpu = if cpu.is_empty() {
                "n/a".to_owned()
            } else {
                format!("{:.1}", median(&mut cpu))
            };
            println!(
                "| {} | {label} | {:.1} | {kib} | {cpu} |",
                peer.name,
                median(&mut micros)
            );
        }
    }
}

/// One round on a fresh file: µs per commit, and KiB written per commit where the kernel
/// says.
fn measure(peer: &Entry, durability: Durability, cycles: u64) -> (f64, Option<f64>) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let p = (peer.open)(dir.path(), durability);
    for i in 0..WARM_UP {
        p.cycle(0, (1 << 39) + i);
    }
    let before = written_bytes();
    let started = Instant::now();
    for i in 0..cycles {
        p.cycle(0, i);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = written_bytes();
    drop(p);
    let commits = (2 * cycles) as f64;
    let kib = before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / 1024.0 / commits);
    (elapsed * 1e6 / commits, kib)
}

/// The bytes this process caused to be written to storage so far (Linux: `/proc/self/io`).
fn written_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn args() -> Result<(u64, usize), lexopt::Error> {
    use lexopt::prelude::*;
    let (mut cycles, mut rounds) = (3000u64, 3usize);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("cycles") => cycles = parser.value()?.parse()?,
            Long("rounds") => rounds = parser.value()?.parse()?,
            _ => return Err(arg.unexpected()),
        }
    }
    if cycles == 0 || rounds == 0 {
        return Err("--cycles and --rounds must be above 0".into());
    }
    Ok((cycles, rounds))
}
