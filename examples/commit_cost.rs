//! What one durable commit costs on this machine, peer by peer: its time, the bytes it
//! writes to the disk, and the CPU it takes without the fsync. One caller, fresh keys, one
//! begin + complete cycle after another (two commits per cycle).
//!
//! ```text
//! cargo run --release --example commit_cost -- [--cycles N] [--rounds R] [--dir FOLDER]
//! ```
//!
//! - **µs per commit**: the median over the rounds of the run's time / commits.
//! - **KiB written per commit**: what the process wrote to the disk meanwhile
//!   (`write_bytes` of `/proc/self/io`, Linux only), / commits. The fsync's time grows with it.
//! - **no fsync**: a redb peer's row at `Durability::None`: the CPU of a commit, without
//!   waiting for the disk (its bytes reach the disk later, so none are counted).
//!
//! The peers are those of `compare`: idemstore, the full-state-machine redb baseline (one
//! transaction per operation), the simplest redb code (one table), and SQLite in WAL mode with
//! `synchronous=FULL`, each redb peer at two-phase (the default) and one-phase commits.
//!
//! The files are made in a temporary folder inside `--dir` (default: the system's temporary
//! folder). Where that is a tmpfs, as `/tmp` is on some systems, fsync costs nothing and
//! nothing is written to a disk: the program says so, and the figures mean little.

use std::path::{Path, PathBuf};
use std::time::Instant;

use idemstore::Durability;
use idemstore_testkit::peers::{Idem, NaiveRedb, Peer, SimplestRedb, Sqlite};

/// A peer by name, opened on a file in a folder.
struct Entry {
    name: &'static str,
    open: fn(&Path, Durability) -> Box<dyn Peer>,
    /// Whether it is a redb peer (one row per commit mode).
    redb: bool,
}

const WARM_UP: u64 = 200;

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "commit_cost: {e}\nusage: commit_cost [--cycles N] [--rounds R] [--dir FOLDER]"
            );
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
    let modes = [
        ("2-phase", Durability::Immediate),
        ("1-phase", Durability::ImmediateOnePhase),
        ("no fsync", Durability::None),
    ];
    if on_tmpfs(&args.dir) {
        eprintln!(
            "commit_cost: {} is on a tmpfs: fsync costs nothing there, so the figures say \
             little about a disk; pass --dir with a folder on one",
            args.dir.display()
        );
    }
    println!(
        "{} cycles per round, {} round(s), one caller, files in {}; medians over rounds",
        args.cycles,
        args.rounds,
        args.dir.display()
    );
    println!();
    println!("| peer | commit | µs per commit | KiB written per commit |");
    println!("|---|---|---|---|");
    for peer in &peers {
        let modes: &[(&str, Durability)] = if peer.redb { &modes } else { &modes[..1] };
        for &(label, durability) in modes {
            let label = if peer.redb { label } else { "1 fsync" };
            let mut micros = Vec::new();
            let mut kib = Vec::new();
            for round in 0..args.rounds {
                eprint!(
                    "\r{} {label}: round {}/{}   ",
                    peer.name,
                    round + 1,
                    args.rounds
                );
                let (m, k) = measure(peer, durability, &args);
                micros.push(m);
                kib.extend(k);
            }
            eprint!("\r{:100}\r", "");
            let kib = if kib.is_empty() || durability == Durability::None {
                "n/a".to_owned()
            } else {
                format!("{:.1}", median(&mut kib))
            };
            println!(
                "| {} | {label} | {:.1} | {kib} |",
                peer.name,
                median(&mut micros)
            );
        }
    }
}

/// Whether `dir` is on a tmpfs (Linux: the longest matching mount point of
/// `/proc/self/mounts`); `false` where that cannot be told.
fn on_tmpfs(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (point, kind) = (fields.nth(1)?, fields.next()?);
            dir.starts_with(point)
                .then_some((point.len(), kind == "tmpfs"))
        })
        .max()
        .is_some_and(|(_, tmpfs)| tmpfs)
}

/// One round on a fresh file: µs per commit, and KiB written per commit where the kernel
/// says.
fn measure(peer: &Entry, durability: Durability, args: &Args) -> (f64, Option<f64>) {
    let cycles = args.cycles;
    let dir = tempfile::tempdir_in(&args.dir).expect("a temporary folder in --dir");
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

/// The command line.
struct Args {
    cycles: u64,
    rounds: usize,
    dir: PathBuf,
}

fn args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut args = Args {
        cycles: 3000,
        rounds: 3,
        dir: std::env::temp_dir(),
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("cycles") => args.cycles = parser.value()?.parse()?,
            Long("rounds") => args.rounds = parser.value()?.parse()?,
            Long("dir") => args.dir = parser.value()?.into(),
            _ => return Err(arg.unexpected()),
        }
    }
    if args.cycles == 0 || args.rounds == 0 {
        return Err("--cycles and --rounds must be above 0".into());
    }
    if !args.dir.is_dir() {
        return Err(format!("--dir {}: not a folder", args.dir.display()).into());
    }
    Ok(args)
}
