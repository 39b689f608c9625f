//! The peer comparison of idemstore's durable write path, in one run, at 1, 8 and 64 callers:
//!
//! - **idemstore** at its default durability (every commit fsync'd in two phases, so a damaged
//!   newest commit is reported at open instead of silently rolled back), and with one-phase
//!   commits (`Durability::ImmediateOnePhase`: what the guard costs);
//! - **naive redb (1 txn/op)**: idemstore's transitions (fencing token, expiry entries) in one
//!   durable redb write transaction per operation, no group commit;
//! - **simplest redb (1 table)**: the code a user writes instead of idemstore: one table keyed
//!   by the idempotency key, `begin` a read and an insert in one durable transaction,
//!   `complete` an insert in another;
//! - both redb baselines at idemstore's default durability (redb's two-phase commit) and at
//!   redb's own default (one phase); every ratio is against a baseline at the same durability
//!   as the table says;
//! - **SQLite** (WAL, `synchronous=FULL`), **Redis** (`appendonly yes`, `appendfsync always`,
//!   `SET NX` then `SET XX`, a connection per caller) and the raw-redb ceiling (64 operations
//!   per two-phase commit);
//!
//! then replay lookups against raw redb read transactions.
//!
//! ```sh
//! cargo run --release --example compare                 # 3 rounds, a few minutes
//! cargo run --release --example compare -- --smoke      # seconds, for CI
//! cargo run --release --example compare -- --seconds 5  # longer runs per cell
//! cargo run --release --example compare -- --keys sequential  # thread-counter key ids
//! cargo run --release --example compare -- --callers 1 --handoff  # + the cost of a thread hop
//! ```
//!
//! Results go to stdout as Markdown tables: one at idemstore's default durability (every row,
//! with its ratios to both two-phase redb baselines) and one of one-phase commits (idemstore
//! 1-phase against the one-phase baselines). Each cell is the median rate of the rounds, each
//! ratio the median of the per-round ratios to the baseline measured in the same round (the
//! peers take turns within each round). Per-round rates go to stderr.
//!
//! **Redis**: when `redis-server` is on `PATH`, compare starts its own on 127.0.0.1, on a free
//! port, in a temporary folder, with `appendonly yes`, `appendfsync always` and no RDB
//! snapshots, waits until it answers `PING`, measures it, and stops it and removes the folder
//! at the end, also on a panic or on SIGINT, SIGTERM or SIGHUP. When `redis-server` is not
//! installed (`apt-get install redis-server`), it says it skipped Redis and why.
//! `--redis-addr HOST:PORT` measures a server already running there instead (compare sets
//! `appendonly yes` and `appendfsync always` on it with `CONFIG SET`); `--no-redis` skips it.
//!
//! `--handoff` adds two diagnostic rows: the naive baseline with every operation run on a
//! second thread, the threads waiting for each other either in crossbeam's blocking `recv`
//! or by parking at once. They show what a hand-off to a committer thread costs by itself.
//!
//! Keys are UUID-shaped and random by default, as clients generate them, so every peer
//! inserts all over its tree; `--keys sequential` gives each caller its own append point.
//!
//! With `IDEMSTORE_PG` set and the example built with `--features postgres`, idemstore on
//! PostgreSQL is measured too, against a hand-written PostgreSQL baseline of the same
//! transitions (ratios against that baseline, in a table of their own):
//!
//! ```sh
//! .ci/pg run -- cargo run --release --features postgres --example compare -- --postgres-only
//! ```
//!
//! `--postgres` insists on them, `--no-postgres` skips them, `--pg-pool N` sets idemstore's
//! pool size (half of it are committer threads).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemstore::{Begin, Durability, Fingerprint, Key};
use idemstore_testkit::peers::{
    self, Idem, NaiveOnThread, NaiveRedb, Peer, Redis, RedisConn, SimplestRedb, Sqlite, Wait,
    raw_batch_ceiling, run_cycles,
};

/// Which Redis to measure.
enum RedisChoice {
    /// Start one (the default), or say why not.
    Start,
    /// One already running at this address (`--redis-addr`).
    At(SocketAddr),
    /// None (`--no-redis`).
    Skip,
}

struct Args {
    seconds: f64,
    callers: Vec<usize>,
    rounds: usize,
    handoff: bool,
    redis: RedisChoice,
    /// Measure the PostgreSQL peers: `Some(true)` asked for (`--postgres`), `Some(false)`
    /// refused (`--no-postgres`), `None` when `IDEMSTORE_PG` is set.
    postgres: Option<bool>,
    /// Only the PostgreSQL peers (`--postgres-only`).
    postgres_only: bool,
    /// idemstore's PostgreSQL pool size (`--pg-pool N`; default: the store's default).
    pg_pool: Option<u32>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 2.0,
        callers: vec![1, 8, 64],
        rounds: 3,
        handoff: false,
        redis: RedisChoice::Start,
        postgres: None,
        postgres_only: false,
        pg_pool: None,
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
            "--redis-addr" => {
                a.redis = RedisChoice::At(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--redis-addr needs an address like 127.0.0.1:6379"),
                )
            }
            "--no-redis" => a.redis = RedisChoice::Skip,
            "--postgres" => a.postgres = Some(true),
            "--no-postgres" => a.postgres = Some(false),
            "--pg-pool" => {
                a.pg_pool = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n| n > 0)
                    .map(Some)
                    .expect("--pg-pool needs a number above 0")
            }
            "--postgres-only" => {
                a.postgres = Some(true);
                a.postgres_only = true;
            }
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
                    "usage: compare [--smoke] [--seconds S] [--rounds R] [--callers 1,8,64] [--keys random|sequential] [--handoff] [--redis-addr HOST:PORT | --no-redis] [--postgres | --no-postgres | --postgres-only] [--pg-pool N]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; try --help"),
        }
    }
    a
}

type Maker = dyn Fn(usize, &Path) -> Box<dyn Peer>;

/// A peer to measure: its name, how to make it for a cell (from the number of callers and a
/// fresh path), and the tables it is printed in (indices into the run's [`Table`]s).
struct Entry {
    name: String,
    make: Box<Maker>,
    tables: Vec<usize>,
}

fn entry(
    name: &str,
    make: impl Fn(usize, &Path) -> Box<dyn Peer> + 'static,
    tables: &[usize],
) -> Entry {
    Entry {
        name: name.to_owned(),
        make: Box::new(make),
        tables: tables.to_vec(),
    }
}

/// One table of the summary: what its rows share, and the rows its ratio columns are against.
struct Table {
    title: String,
    /// (row index, the ratio column's heading)
    bases: Vec<(usize, &'static str)>,
}

/// A measured row: its name, one rate per round for each caller count, its tables.
struct Row {
    name: String,
    rates: Vec<Vec<f64>>,
    tables: Vec<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of the per-round ratios of `rates` to `base`.
fn ratio(rates: &[f64], base: &[f64]) -> f64 {
    median(rates.iter().zip(base).map(|(r, b)| r / b).collect())
}

/// The conninfo of the PostgreSQL peers, if they are to be measured.
fn postgres_conninfo(a: &Args) -> Option<String> {
    let conninfo = std::env::var("IDEMSTORE_PG").ok().filter(|c| !c.is_empty());
    match (a.postgres, conninfo) {
        (Some(false), _) => None,
        (Some(true), None) => {
            eprintln!("--postgres needs IDEMSTORE_PG (run under .ci/pg run --)");
            std::process::exit(2);
        }
        (None, None) => {
            eprintln!("  postgres: skipped (IDEMSTORE_PG not set; run under .ci/pg run --)");
            None
        }
        (_, Some(conninfo)) => {
            if cfg!(feature = "postgres") {
                Some(conninfo)
            } else if a.postgres == Some(true) {
                eprintln!("--postgres needs the example built with --features postgres");
                std::process::exit(2);
            } else {
                eprintln!("  postgres: skipped (build with --features postgres to measure it)");
                None
            }
        }
    }
}

#[cfg(feature = "postgres")]
fn postgres_peers(
    conninfo: String,
    pool: Option<u32>,
    peers: &mut Vec<Entry>,
    tables: &mut Vec<Table>,
) {
    let table = tables.len();
    tables.push(Table {
        title: "PostgreSQL".to_owned(),
        bases: vec![(peers.len(), "× baseline")],
    });
    let info = conninfo.clone();
    peers.push(entry(
        "postgres baseline (1 txn/op)",
        move |n, p| Box::new(pg::Baseline::open(&info, &pg::schema_for(p), n)),
        &[table],
    ));
    peers.push(entry(
        "idemstore on postgres",
        move |_, p| Box::new(pg::IdemPg::open(&conninfo, &pg::schema_for(p), pool)),
        &[table],
    ));
}

#[cfg(not(feature = "postgres"))]
fn postgres_peers(_: String, _: Option<u32>, _: &mut Vec<Entry>, _: &mut Vec<Table>) {
    unreachable!("postgres_conninfo is None without the feature")
}

fn main() {
    let a = args();
    cleanup::on_signal();
    let dir = tempfile::tempdir().expect("tempdir");
    cleanup::remove_on_signal(dir.path());
    let mut peers: Vec<Entry> = Vec::new();
    let mut tables: Vec<Table> = Vec::new();
    // Kept until the measurements end; dropping it stops the server and removes its folder.
    let mut redis_server = None;
    // The rows of idemstore at its default durability and of the ceiling's table.
    let mut idem_default = None;
    let default_table = 0;
    if !a.postgres_only {
        use Durability::{Immediate, ImmediateOnePhase};
        let one_phase = 1;
        let full = peers.len();
        peers.push(entry(
            "naive redb (1 txn/op), 2-phase",
            |_, p| Box::new(NaiveRedb::open_with(p, Immediate)),
            &[default_table],
        ));
        let simplest = peers.len();
        peers.push(entry(
            "simplest redb (1 table), 2-phase",
            |_, p| Box::new(SimplestRedb::open_with(p, Immediate)),
            &[default_table],
        ));
        idem_default = Some(peers.len());
        peers.push(entry(
            "idemstore (default, 2-phase)",
            |_, p| Box::new(Idem::open_with(p, Immediate)),
            &[default_table],
        ));
        // What the default's two-phase commit costs (the second fsync per commit).
        peers.push(entry(
            "idemstore, 1-phase commit",
            |_, p| Box::new(Idem::open_with(p, ImmediateOnePhase)),
            &[default_table, one_phase],
        ));
        // redb's own default commit: what a user's code gets unless it asks for two phases.
        let full_1 = peers.len();
        peers.push(entry(
            "naive redb (1 txn/op), 1-phase",
            |_, p| Box::new(NaiveRedb::open_with(p, ImmediateOnePhase)),
            &[default_table, one_phase],
        ));
        let simplest_1 = peers.len();
        peers.push(entry(
            "simplest redb (1 table), 1-phase",
            |_, p| Box::new(SimplestRedb::open_with(p, ImmediateOnePhase)),
            &[default_table, one_phase],
        ));
        peers.push(entry(
            "sqlite WAL sync=FULL",
            |n, p| Box::new(Sqlite::open(p, n)),
            &[default_table],
        ));
        let redis_addr = match a.redis {
            RedisChoice::Skip => {
                eprintln!("  redis: skipped (--no-redis)");
                None
            }
            RedisChoice::At(addr) => {
                if let Err(why) = configure_redis(addr) {
                    eprintln!("--redis-addr {addr}: {why}");
                    std::process::exit(2);
                }
                eprintln!(
                    "  redis: measuring the server at {addr} (set to appendonly yes, appendfsync always)"
                );
                Some(addr)
            }
            RedisChoice::Start => match RedisServer::start() {
                Ok(server) => {
                    let addr = server.addr;
                    eprintln!(
                        "  redis: started redis-server on {addr} in {} (appendonly yes, appendfsync always, no RDB snapshots)",
                        server.dir.path().display()
                    );
                    redis_server = Some(server);
                    Some(addr)
                }
                Err(why) => {
                    eprintln!("  redis: skipped ({why})");
                    None
                }
            },
        };
        if let Some(addr) = redis_addr {
            peers.push(entry(
                "redis appendfsync=always",
                move |n, _| Box::new(Redis::open(addr, n)),
                &[default_table],
            ));
        }
        if a.handoff {
            // Diagnostics: what a thread hand-off alone costs (no batching, naive's work).
            peers.push(entry(
                "naive on a thread, recv",
                |_, p| Box::new(NaiveOnThread::open(p, Wait::Recv)),
                &[default_table],
            ));
            peers.push(entry(
                "naive on a thread, park",
                |_, p| Box::new(NaiveOnThread::open(p, Wait::Park)),
                &[default_table],
            ));
        }
        tables.push(Table {
            title: "at idemstore's default durability (the redb baselines commit in two phases, \
                    as idemstore does)"
                .to_owned(),
            bases: vec![(full, "× naive"), (simplest, "× simplest")],
        });
        tables.push(Table {
            title: "one-phase commits (redb's default commit, idemstore's `ImmediateOnePhase`)"
                .to_owned(),
            bases: vec![
                (full_1, "× naive 1-phase"),
                (simplest_1, "× simplest 1-phase"),
            ],
        });
    }
    if let Some(conninfo) = postgres_conninfo(&a) {
        postgres_peers(conninfo, a.pg_pool, &mut peers, &mut tables);
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
                let Entry { name, make, .. } = &peers[pi];
                let path = dir.path().join(format!("p{pi}-n{n}-r{round}.db"));
                let peer = make(n, &path);
                let (cycles, secs) = run_cycles(peer.as_ref(), n, a.seconds);
                let rate = cycles as f64 / secs;
                eprintln!(
                    "  round {round}: {name:<34} {n:>3} callers: {rate:>10.0} cycles/s {}",
                    peer.note()
                );
                rates[pi][ci].push(rate);
            }
        }
        if !a.postgres_only {
            let (c, secs) =
                raw_batch_ceiling(&dir.path().join(format!("ceiling-r{round}.db")), a.seconds);
            let ceiling = c as f64 / secs;
            eprintln!("  round {round}: raw redb 64 ops/commit, 2-phase: {ceiling:>10.0} cycles/s");
            ceilings.push(ceiling);
        }
    }
    if let Some(server) = redis_server.take() {
        drop(server);
        eprintln!("  redis: stopped, its folder removed");
    }
    let mut rows: Vec<Row> = peers
        .iter()
        .zip(rates)
        .map(|(e, rates)| Row {
            name: e.name.clone(),
            rates,
            tables: e.tables.clone(),
        })
        .collect();
    if !a.postgres_only {
        rows.push(Row {
            name: "raw redb 64 ops/commit, 2-phase".to_owned(),
            rates: vec![ceilings.clone(); a.callers.len()],
            tables: vec![default_table],
        });
    }
    print_tables(&a, &tables, &rows);
    let Some(idem) = idem_default else {
        return;
    };
    print!("\nidemstore (default) / ceiling (2-phase; median of per-round ratios):");
    for (n, r) in a.callers.iter().zip(&rows[idem].rates) {
        print!(" {n} callers {:.0} %;", 100.0 * ratio(r, &ceilings));
    }
    println!();

    replay(&a, dir.path());
}

/// The summary tables in Markdown: per caller count, the median rate and its ratios.
fn print_tables(a: &Args, tables: &[Table], rows: &[Row]) {
    if tables.first().is_some_and(|t| t.bases.len() == 2) {
        println!(
            "\nnaive redb: idemstore's transitions (fencing token, expiry entries), one durable \
             redb transaction per operation.\nsimplest redb: one table keyed by the idempotency \
             key; begin = a read and an insert in one durable transaction, complete = an insert \
             in another."
        );
    }
    for (ti, table) in tables.iter().enumerate() {
        let names: Vec<&str> = table
            .bases
            .iter()
            .map(|&(b, _)| rows[b].name.as_str())
            .collect();
        println!(
            "\n## Cycles/s (begin + complete, durable), {}: median of {} round(s), and the \
             medians of the per-round ratios to {}\n",
            table.title,
            a.rounds,
            names.join(" and ")
        );
        print!("| peer |");
        for n in &a.callers {
            print!(" {n} caller{} |", if *n == 1 { "" } else { "s" });
            for (_, heading) in &table.bases {
                print!(" {heading} |");
            }
        }
        println!();
        println!(
            "|---|{}",
            "---|".repeat(a.callers.len() * (1 + table.bases.len()))
        );
        for row in rows.iter().filter(|r| r.tables.contains(&ti)) {
            print!("| {} |", row.name);
            for (ci, r) in row.rates.iter().enumerate() {
                print!(" {:.0} |", median(r.clone()));
                for &(b, _) in &table.bases {
                    print!(" {:.2}× |", ratio(r, &rows[b].rates[ci]));
                }
            }
            println!();
        }
    }
}

/// Replay lookups: idemstore `begin` answering `Replay` vs a raw redb read transaction + get.
fn replay(a: &Args, dir: &std::path::Path) {
    const KEYS: u64 = 10_000;
    let idem = Idem::open(&dir.join("replay-idem.db"));
    // Only its reads are timed: its records are written with one-phase commits, to be ready sooner.
    let raw = NaiveRedb::open_with(&dir.join("replay-raw.db"), Durability::ImmediateOnePhase);
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

/// Sets `appendonly yes` and `appendfsync always` on the Redis server at `addr` (one the user
/// named with `--redis-addr`).
fn configure_redis(addr: SocketAddr) -> Result<(), String> {
    let mut conn = RedisConn::connect(addr, Duration::from_secs(2))
        .map_err(|e| format!("no Redis server answers there: {e}"))?;
    for (name, value) in [("appendonly", "yes"), ("appendfsync", "always")] {
        let reply = conn
            .command(&[b"CONFIG", b"SET", name.as_bytes(), value.as_bytes()])
            .map_err(|e| format!("CONFIG SET {name} {value}: {e}"))?;
        if reply != "+OK" {
            return Err(format!("CONFIG SET {name} {value} answered {reply}"));
        }
    }
    Ok(())
}

/// A `redis-server` this program started on loopback, in a temporary folder of its own;
/// dropping it stops the server and removes the folder.
struct RedisServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// How long the server gets to answer `PING` after it was started.
    const READY_WITHIN: Duration = Duration::from_secs(10);

    /// Starts `redis-server` from `PATH` on a free port of 127.0.0.1 with `appendonly yes`,
    /// `appendfsync always` and no RDB snapshots, and waits until it answers. The error says
    /// why there is no server (not installed, exited, did not answer in time).
    fn start() -> Result<RedisServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("compare-redis-")
            .tempdir()
            .map_err(|e| format!("no temporary folder for it: {e}"))?;
        cleanup::remove_on_signal(dir.path());
        // The port is free when asked for, but another process may take it before the server
        // binds it: then the server exits at once, and it is tried again on another port.
        let mut last = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
                .port();
            let log = dir.path().join("redis.log");
            let spawned = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ])
                .args(["--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(
                        "redis-server is not on PATH; install it (e.g. `apt-get install \
                         redis-server`) or name a running server with --redis-addr"
                            .to_owned(),
                    );
                }
                Err(e) => return Err(format!("redis-server did not start: {e}")),
            };
            cleanup::set_server(child);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(addr, &log) {
                Ok(()) => return Ok(RedisServer { addr, dir }),
                Err((why, retry)) => {
                    cleanup::stop_server();
                    if !retry {
                        return Err(why);
                    }
                    last = why;
                }
            }
        }
        Err(last)
    }
}

/// Waits until the server just started at `addr` answers `PING`. The error says why not, and
/// whether another port is worth a try (the server exited because its port was taken).
fn wait_ready(addr: SocketAddr, log: &Path) -> Result<(), (String, bool)> {
    let start = Instant::now();
    loop {
        if let Some(status) = cleanup::server_exited() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let mut tail: Vec<&str> = log.lines().rev().take(3).collect();
            tail.reverse();
            let taken = log.contains("Address already in use");
            return Err((
                format!("redis-server exited ({status}): {}", tail.join(" / ")),
                taken,
            ));
        }
        if let Ok(mut conn) = RedisConn::connect(addr, Duration::from_millis(500))
            && conn.command(&[b"PING"]).is_ok_and(|r| r == "+PONG")
        {
            return Ok(());
        }
        if start.elapsed() > RedisServer::READY_WITHIN {
            return Err((
                format!(
                    "redis-server did not answer on {addr} within {:?}",
                    RedisServer::READY_WITHIN
                ),
                false,
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        cleanup::stop_server();
        // The folder goes with `dir`, dropped next.
    }
}

/// What must not outlive the program: the Redis server it started and its temporary folders.
/// A normal end or a panic undoes them by their owners' `Drop`; a signal (SIGINT, SIGTERM,
/// SIGHUP) by the watcher thread [`on_signal`] starts, which then ends the process.
mod cleanup {
    use super::*;

    static SERVER: Mutex<Option<Child>> = Mutex::new(None);
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds the started server's process (the one [`stop_server`] ends).
    pub fn set_server(child: Child) {
        *lock(&SERVER) = Some(child);
    }

    /// The server's exit status, if it has exited.
    pub fn server_exited() -> Option<std::process::ExitStatus> {
        lock(&SERVER).as_mut()?.try_wait().ok().flatten()
    }

    /// Kills the started server, if any, and waits for it.
    pub fn stop_server() {
        if let Some(mut child) = lock(&SERVER).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes `dir` too if a signal ends the program.
    pub fn remove_on_signal(dir: &Path) {
        lock(&DIRS).push(dir.to_owned());
    }

    /// Starts the thread that, on SIGINT, SIGTERM or SIGHUP, stops the server, removes the
    /// folders and exits with 128 + the signal's number.
    #[cfg(unix)]
    pub fn on_signal() {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!(
                    "  (no signal handler: {e}; an interrupt may leave a redis-server behind)"
                );
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                stop_server();
                for dir in lock(&DIRS).iter() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                eprintln!(
                    "compare: stopped by signal {signal}; redis-server stopped, temporary folders removed"
                );
                std::process::exit(128 + signal);
            }
        });
    }

    /// Without Unix signals, only a normal end or a panic cleans up.
    #[cfg(not(unix))]
    pub fn on_signal() {}
}

/// The PostgreSQL peers (feature `postgres`, a server named by `IDEMSTORE_PG`): a
/// hand-written baseline of the same transitions, and idemstore on PostgreSQL. Each cell
/// gets a fresh schema of its own, dropped when the peer is.
#[cfg(feature = "postgres")]
mod pg {
    use std::sync::Mutex;

    use idemstore::{Begin, Fingerprint, Key, Store};
    use idemstore_testkit::peers::{self, Peer, RESPONSE};
    use postgres::types::Type;
    use postgres::{Client, NoTls, Statement};

    /// Records live this long in both peers (a day, in nanoseconds).
    const TTL: i64 = 86_400_000_000_000;
    /// The lease a `begin` takes (30 s, idemstore's default), in nanoseconds.
    const LEASE: i64 = 30_000_000_000;
    /// The server's clock in nanoseconds since 1970, as idemstore reads it.
    const NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000000000)::int8";

    fn connect(conninfo: &str) -> Client {
        Client::connect(conninfo, NoTls).expect("connect to PostgreSQL (IDEMSTORE_PG)")
    }

    fn drop_schema(conninfo: &str, schema: &str) {
        connect(conninfo)
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .expect("drop the peer's schema");
    }

    /// A schema name for the cell whose redb peers would use `path` (unique per run).
    pub fn schema_for(path: &std::path::Path) -> String {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("cell");
        let stem: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("compare_{}_{stem}", std::process::id())
    }

    /// One caller's connection and its prepared statements.
    struct Conn {
        client: Client,
        lock_row: Statement,
        insert: Statement,
        reclaim: Statement,
        complete: Statement,
    }

    /// What the baseline's `begin` found.
    #[derive(Debug)]
    pub enum Began {
        /// Claimed (a fresh key, or one dead or whose lease ran out): the fencing token.
        Started(i64),
        /// Completed earlier with the same fingerprint: the stored response.
        Replay(Vec<u8>),
        /// Held by a live lease (409).
        InFlight,
        /// The key was used with another request (422).
        Mismatch,
    }

    /// The baseline a careful user writes without idemstore (Brandur's design): one
    /// transaction per operation on the caller's own connection (a pool of one connection
    /// per caller thread, no checkout), statements prepared once with typed parameters,
    /// the key's row locked with `SELECT ... FOR UPDATE`, then `INSERT` (token from a
    /// sequence) or `UPDATE` as the state table says, and `COMMIT`. Completion is fenced by
    /// `WHERE key = $1 AND token = $2`. Times are the server's clock, read inside the
    /// statements (no round trip of their own).
    pub struct Baseline {
        conninfo: String,
        schema: String,
        conns: Vec<Mutex<Conn>>,
    }

    impl Baseline {
        pub fn open(conninfo: &str, schema: &str, callers: usize) -> Baseline {
            connect(conninfo)
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE;
                     CREATE SCHEMA {schema};
                     CREATE TABLE {schema}.requests (
                         key text PRIMARY KEY,
                         fingerprint bytea NOT NULL,
                         state smallint NOT NULL,      -- 1 in flight, 2 completed
                         token bigint NOT NULL,
                         lease_until bigint,
                         dies_at bigint NOT NULL,
                         response bytea
                     );
                     CREATE INDEX ON {schema}.requests (dies_at);
                     CREATE SEQUENCE {schema}.tokens AS bigint;"
                ))
                .expect("create the baseline's schema");
            let conns = (0..callers.max(1))
                .map(|_| {
                    let mut client = connect(conninfo);
                    let t = format!("{schema}.requests");
                    let seq = format!("'{schema}.tokens'");
                    let lock_row = client
                        .prepare_typed(
                            &format!(
                                "SELECT fingerprint, state, token, lease_until, dies_at, response, {NOW} \
                                 FROM {t} WHERE key = $1 FOR UPDATE"
                            ),
                            &[Type::TEXT],
                        )
                        .expect("prepare");
                    // ON CONFLICT: an absent row is not locked by FOR UPDATE, so a concurrent
                    // begin of the same key may insert first; then the begin is re-run.
                    let insert = client
                        .prepare_typed(
                            &format!(
                                "INSERT INTO {t} (key, fingerprint, state, token, lease_until, dies_at) \
                                 VALUES ($1, $2, 1, nextval({seq}), {NOW} + $3, {NOW} + $4) \
                                 ON CONFLICT (key) DO NOTHING RETURNING token"
                            ),
                            &[Type::TEXT, Type::BYTEA, Type::INT8, Type::INT8],
                        )
                        .expect("prepare");
                    let reclaim = client
                        .prepare_typed(
                            &format!(
                                "UPDATE {t} SET fingerprint = $2, state = 1, token = nextval({seq}), \
                                 lease_until = {NOW} + $3, dies_at = {NOW} + $4, response = NULL \
                                 WHERE key = $1 RETURNING token"
                            ),
                            &[Type::TEXT, Type::BYTEA, Type::INT8, Type::INT8],
                        )
                        .expect("prepare");
                    let complete = client
                        .prepare_typed(
                            &format!(
                                "UPDATE {t} SET state = 2, lease_until = NULL, response = $3, \
                                 dies_at = {NOW} + $4 WHERE key = $1 AND token = $2"
                            ),
                            &[Type::TEXT, Type::INT8, Type::BYTEA, Type::INT8],
                        )
                        .expect("prepare");
                    Mutex::new(Conn {
                        client,
                        lock_row,
                        insert,
                        reclaim,
                        complete,
                    })
                })
                .collect();
            Baseline {
                conninfo: conninfo.to_owned(),
                schema: schema.to_owned(),
                conns,
            }
        }

        /// `begin`: lock the key's row, decide, claim with a new token if it may run;
        /// one transaction.
        pub fn begin(&self, thread: usize, key: &str, fp: &[u8]) -> Began {
            let mut guard = self.conns[thread % self.conns.len()].lock().expect("conn");
            let c = &mut *guard;
            loop {
                let mut tx = c.client.transaction().expect("begin");
                let row = tx.query_opt(&c.lock_row, &[&key]).expect("select");
                let began = match row {
                    None => match tx
                        .query_opt(&c.insert, &[&key, &fp, &LEASE, &TTL])
                        .expect("insert")
                    {
                        Some(row) => Began::Started(row.get(0)),
                        // Inserted meanwhile by another caller: decide again on its row.
                        None => continue,
                    },
                    Some(row) => {
                        let (stored_fp, state, _token): (Vec<u8>, i16, i64) =
                            (row.get(0), row.get(1), row.get(2));
                        let (lease_until, dies_at, now): (Option<i64>, i64, i64) =
                            (row.get(3), row.get(4), row.get(6));
                        if dies_at <= now {
                            // Dead: claimed afresh, as if absent.
                            let row = tx
                                .query_one(&c.reclaim, &[&key, &fp, &LEASE, &TTL])
                                .expect("reclaim");
                            Began::Started(row.get(0))
                        } else if stored_fp != fp {
                            Began::Mismatch
                        } else if state == 2 {
                            Began::Replay(row.get(5))
                        } else if lease_until.is_some_and(|until| until > now) {
                            Began::InFlight
                        } else {
                            // The holder's lease ran out: a takeover with a new token.
                            let row = tx
                                .query_one(&c.reclaim, &[&key, &fp, &LEASE, &TTL])
                                .expect("takeover");
                            Began::Started(row.get(0))
                        }
                    }
                };
                tx.commit().expect("commit");
                return began;
            }
        }

        /// `complete`: lock the key's row, check the lease is still ours, write the
        /// response, fenced by the token; one transaction. `false`: the lease was lost.
        pub fn complete(&self, thread: usize, key: &str, token: i64, response: &[u8]) -> bool {
            let mut guard = self.conns[thread % self.conns.len()].lock().expect("conn");
            let c = &mut *guard;
            let mut tx = c.client.transaction().expect("begin");
            let row = tx.query_opt(&c.lock_row, &[&key]).expect("select");
            let ours =
                row.is_some_and(|row| row.get::<_, i16>(1) == 1 && row.get::<_, i64>(2) == token);
            let written = ours
                && tx
                    .execute(&c.complete, &[&key, &token, &response, &TTL])
                    .expect("complete")
                    == 1;
            tx.commit().expect("commit");
            written
        }
    }

    impl Peer for Baseline {
        fn cycle(&self, thread: usize, i: u64) {
            let key = peers::key_id(thread, i);
            let fp = Fingerprint::of(&key);
            match self.begin(thread, &key, fp.as_bytes()) {
                Began::Started(token) => {
                    assert!(self.complete(thread, &key, token, &RESPONSE), "fenced out")
                }
                Began::Replay(response) => {
                    panic!("fresh key replayed ({} bytes)", response.len())
                }
                other => panic!("fresh key did not start: {other:?}"),
            }
        }
    }

    impl Drop for Baseline {
        fn drop(&mut self) {
            self.conns.clear();
            drop_schema(&self.conninfo, &self.schema);
        }
    }

    /// idemstore on PostgreSQL (`open_postgres`, the default pool), in a schema of its own.
    pub struct IdemPg {
        conninfo: String,
        schema: String,
        store: Option<Store>,
    }

    impl IdemPg {
        pub fn open(conninfo: &str, schema: &str, pool: Option<u32>) -> IdemPg {
            drop_schema(conninfo, schema);
            let mut builder = Store::builder().postgres_schema(schema).reap_interval(None);
            if let Some(pool) = pool {
                builder = builder.postgres_pool_size(pool);
            }
            let store = builder
                .open_postgres(conninfo)
                .expect("open idemstore on PostgreSQL");
            IdemPg {
                conninfo: conninfo.to_owned(),
                schema: schema.to_owned(),
                store: Some(store),
            }
        }

        fn store(&self) -> &Store {
            self.store.as_ref().expect("open")
        }
    }

    impl Peer for IdemPg {
        fn cycle(&self, thread: usize, i: u64) {
            let key = Key::new("bench", &peers::key_id(thread, i)).expect("key");
            let fp = Fingerprint::of(key.id());
            match self.store().begin(&key, &fp).expect("begin") {
                Begin::Started(lease) => {
                    lease.complete(&RESPONSE).expect("complete");
                }
                other => panic!("fresh key did not start: {other:?}"),
            }
        }

        fn note(&self) -> String {
            let s = self.store().stats();
            format!(
                "({} commits, {:.1} ops per commit)",
                s.commits,
                s.committed_ops as f64 / s.commits.max(1) as f64
            )
        }
    }

    impl Drop for IdemPg {
        fn drop(&mut self) {
            if let Some(store) = self.store.take() {
                store.close().expect("close idemstore");
            }
            drop_schema(&self.conninfo, &self.schema);
        }
    }
}
