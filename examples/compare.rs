//! The peer comparison of idemstore's durable write path, in one run:
//! idemstore (group commit) vs the naive baseline (one redb transaction per operation),
//! SQLite (WAL, synchronous=FULL) and the raw-redb ceiling (64 operations per commit),
//! at 1, 8 and 64 callers; then replay lookups vs raw redb read transactions.
//!
//! ```sh
//! cargo run --release --example compare                 # 3 rounds, ~2 minutes
//! cargo run --release --example compare -- --smoke      # seconds, for CI
//! cargo run --release --example compare -- --seconds 5  # longer runs per cell
//! cargo run --release --example compare -- --keys sequential  # thread-counter key ids
//! cargo run --release --example compare -- --callers 1 --handoff  # + the cost of a thread hop
//! ```
//!
//! `--handoff` adds two diagnostic rows: the naive baseline with every operation run on a
//! second thread, the threads waiting for each other either in crossbeam's blocking `recv`
//! or by parking at once. They show what a hand-off to a committer thread costs by itself.
//!
//! Keys are UUID-shaped and random by default, as clients generate them, so every peer
//! inserts all over its tree; `--keys sequential` gives each caller its own append point.
//!
//! Ratios are against the naive baseline measured in the same run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemstore::{Begin, Fingerprint, Key};
use idemstore_testkit::peers::{
    self, Idem, NaiveOnThread, NaiveRedb, Peer, Sqlite, Wait, raw_batch_ceiling, run_cycles,
};

struct Args {
    seconds: f64,
    callers: Vec<usize>,
    rounds: usize,
    handoff: bool,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 2.0,
        callers: vec![1, 8, 64],
        rounds: 3,
        handoff: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => {
                a.seconds = 0.3;
                a.callers = vec![1, 8];
                a.rounds = 1;
            }
            "--handoff" => a.handoff = true,
            "--rounds" => {
                a.rounds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&r| r > 0)
                    .expect("--rounds needs a number above 0")
            }
            "--seconds" => {
                a.seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds needs a number")
            }
            "--callers" => {
                a.callers = it
                    .next()
                    .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
                    .expect("--callers needs a list like 1,8,64")
            }
            "--keys" => match it.next().as_deref() {
                Some("random") => peers::set_sequential_keys(false),
                Some("sequential") => peers::set_sequential_keys(true),
                _ => panic!("--keys needs random or sequential"),
            },
            "-h" | "--help" => {
                println!(
                    "usage: compare [--smoke] [--seconds S] [--rounds R] [--callers 1,8,64] [--keys random|sequential] [--handoff]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; try --help"),
        }
    }
    a
}

type Maker = dyn Fn(usize, &std::path::Path) -> Box<dyn Peer>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut peers: Vec<(&str, Box<Maker>)> = vec![
        (
            "naive redb (1 txn/op)",
            Box::new(|_, p: &std::path::Path| Box::new(NaiveRedb::open(p)) as Box<dyn Peer>),
        ),
        (
            "idemstore",
            Box::new(|_, p: &std::path::Path| Box::new(Idem::open(p)) as Box<dyn Peer>),
        ),
        (
            "sqlite WAL sync=FULL",
            Box::new(|n, p: &std::path::Path| Box::new(Sqlite::open(p, n)) as Box<dyn Peer>),
        ),
        (
            // What the default's two-phase commit costs (the second fsync per commit).
            "idemstore, 1-phase commit",
            Box::new(|_, p: &std::path::Path| {
                Box::new(Idem::open_with(p, idemstore::Durability::ImmediateOnePhase))
                    as Box<dyn Peer>
            }),
        ),
    ];
    if a.handoff {
        // Diagnostics: what a thread hand-off alone costs (no batching, naive's work).
        peers.push((
            "naive on a thread, recv",
            Box::new(|_, p: &std::path::Path| {
                Box::new(NaiveOnThread::open(p, Wait::Recv)) as Box<dyn Peer>
            }),
        ));
        peers.push((
            "naive on a thread, park",
            Box::new(|_, p: &std::path::Path| {
                Box::new(NaiveOnThread::open(p, Wait::Park)) as Box<dyn Peer>
            }),
        ));
    }
    // rates[peer][callers] = one rate per round; the peers take turns within each round (in a
    // rotating order), so slow drifts of the machine hit them all alike.
    let mut rates = vec![vec![Vec::new(); a.callers.len()]; peers.len()];
    let mut ceilings = Vec::new();
    eprintln!(
        "measuring {} round(s) of {} s per cell…",
        a.rounds, a.seconds
    );
    for round in 0..a.rounds {
        for (ci, &n) in a.callers.iter().enumerate() {
            for k in 0..peers.len() {
                let pi = (k + round + ci) % peers.len();
                let (name, make) = &peers[pi];
                let path = dir.path().join(format!("p{pi}-n{n}-r{round}.db"));
                let peer = make(n, &path);
                let (cycles, secs) = run_cycles(peer.as_ref(), n, a.seconds);
                let rate = cycles as f64 / secs;
                eprintln!(
                    "  round {round}: {name:<22} {n:>3} callers: {rate:>10.0} cycles/s {}",
                    peer.note()
                );
                rates[pi][ci].push(rate);
            }
        }
        let (c, secs) =
            raw_batch_ceiling(&dir.path().join(format!("ceiling-r{round}.db")), a.seconds);
        let ceiling = c as f64 / secs;
        eprintln!("  round {round}: raw redb 64 ops/commit: {ceiling:>10.0} cycles/s");
        ceilings.push(ceiling);
    }
    let mut rows: Vec<(&str, Vec<Vec<f64>>)> = peers
        .iter()
        .zip(rates)
        .map(|((name, _), r)| (*name, r))
        .collect();
    rows.push((
        "raw redb 64 ops/commit",
        vec![ceilings.clone(); a.callers.len()],
    ));
    match redis_cycles(&a) {
        Some(r) => rows.push((
            "redis appendfsync=always",
            r.into_iter().map(|x| vec![x; a.rounds]).collect(),
        )),
        None => eprintln!("  redis: skipped (no server on 127.0.0.1:6379)"),
    }

    let naive = rows[0].1.clone();
    println!(
        "\n## Cycles/s (begin + complete, durable): median of {} round(s), and the median of the \
         per-round ratios to naive redb\n",
        a.rounds
    );
    print!("| peer |");
    for n in &a.callers {
        print!(" {n} caller{} |", if *n == 1 { "" } else { "s" });
    }
    println!();
    println!("|---|{}", "---|".repeat(a.callers.len()));
    let ratio =
        |rates: &[f64], base: &[f64]| median(rates.iter().zip(base).map(|(r, b)| r / b).collect());
    for (name, cells) in &rows {
        print!("| {name} |");
        for (r, base) in cells.iter().zip(&naive) {
            print!(" {:.0} ({:.2}×) |", median(r.clone()), ratio(r, base));
        }
        println!();
    }
    let idem = &rows[1].1;
    print!("\nidemstore / ceiling (median of per-round ratios):");
    for (n, r) in a.callers.iter().zip(idem) {
        print!(" {n} callers {:.0} %;", 100.0 * ratio(r, &ceilings));
    }
    println!();

    replay(&a, dir.path());
}

/// Replay lookups: idemstore `begin` answering `Replay` vs a raw redb read transaction + get.
fn replay(a: &Args, dir: &std::path::Path) {
    const KEYS: u64 = 10_000;
    let idem = Idem::open(&dir.join("replay-idem.db"));
    let raw = NaiveRedb::open(&dir.join("replay-raw.db"));
    let keys: Vec<(Key, Fingerprint)> = (0..KEYS)
        .map(|i| {
            let k = Key::new("bench", &peers::key_id(0, i)).expect("key");
            let fp = Fingerprint::of(k.id());
            (k, fp)
        })
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..KEYS {
                idem.cycle(0, i)
            }
        });
        s.spawn(|| {
            for i in 0..KEYS {
                raw.cycle(0, i)
            }
        });
    });
    println!("\n## Replay lookups/s, ratio to a raw redb read transaction + get\n");
    println!("| threads | raw redb | idemstore replay | ratio |");
    println!("|---|---|---|---|");
    for threads in [1usize, 2] {
        let run = |f: &(dyn Fn(u64) + Sync)| {
            let n = AtomicU64::new(0);
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let n = &n;
                    s.spawn(move || {
                        let mut i = t as u64 * 7919;
                        while start.elapsed().as_secs_f64() < a.seconds {
                            for _ in 0..256 {
                                f(i % KEYS);
                                i += 1;
                            }
                            n.fetch_add(256, Ordering::Relaxed);
                        }
                    });
                }
            });
            n.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
        };
        // Both sides get their keys prepared before timing starts.
        let raw_rate = run(&|i| {
            let k = &keys[i as usize].0;
            assert!(raw.lookup(k.id().as_bytes()).is_some());
        });
        let idem_rate = run(&|i| {
            let (k, fp) = &keys[i as usize];
            match idem.store.begin(k, fp).expect("begin") {
                Begin::Replay(done) => assert_eq!(done.response().len(), 200),
                other => panic!("expected replay, got {other:?}"),
            }
        });
        println!(
            "| {threads} | {raw_rate:.0} | {idem_rate:.0} | {:.2}× |",
            idem_rate / raw_rate
        );
    }
}

/// Redis with `appendfsync always`, 16 connections per caller count (SET NX then SET XX),
/// if a server answers on localhost. Not started by this program.
fn redis_cycles(a: &Args) -> Option<Vec<f64>> {
    let mut probe =
        TcpStream::connect_timeout(&"127.0.0.1:6379".parse().ok()?, Duration::from_millis(200))
            .ok()?;
    redis_cmd(&mut probe, &["CONFIG", "SET", "appendonly", "yes"])?;
    redis_cmd(&mut probe, &["CONFIG", "SET", "appendfsync", "always"])?;
    let mut out = Vec::new();
    for &n in &a.callers {
        let conns = n.min(16);
        let done = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for c in 0..n {
                let done = &done;
                s.spawn(move || {
                    let mut conn = TcpStream::connect("127.0.0.1:6379").expect("redis");
                    let mut i = 0u64;
                    if c >= conns {
                        return;
                    }
                    while start.elapsed().as_secs_f64() < a.seconds {
                        let key = format!("idem:{c}:{i}:{}", std::process::id());
                        redis_cmd(&mut conn, &["SET", &key, "inflight", "NX", "EX", "86400"])
                            .expect("set nx");
                        let body = String::from_utf8_lossy(&peers::RESPONSE).into_owned();
                        redis_cmd(&mut conn, &["SET", &key, &body, "XX", "EX", "86400"])
                            .expect("set xx");
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        eprintln!("  redis {n:>3} callers ({conns} connections): {rate:>10.0} cycles/s");
        out.push(rate);
    }
    Some(out)
}

fn redis_cmd(conn: &mut TcpStream, args: &[&str]) -> Option<()> {
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    conn.write_all(cmd.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).ok()?;
    (n > 0 && buf[0] != b'-').then_some(())
}
