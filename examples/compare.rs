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
                    "usage: compare [--smoke] [--seconds S] [--rounds R] [--callers 1,8,64] [--keys random|sequential] [--handoff] [--postgres | --no-postgres | --postgres-only] [--pg-pool N]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; try --help"),
        }
    }
    a
}

type Maker = dyn Fn(usize, &std::path::Path) -> Box<dyn Peer>;

/// A peer to measure: its name, how to make it for a cell, and the index of the peer its
/// ratios are against.
type Entry = (&'static str, Box<Maker>, usize);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
fn postgres_peers(conninfo: String, pool: Option<u32>, peers: &mut Vec<Entry>) {
    let base = peers.len();
    let info = conninfo.clone();
    peers.push((
        "postgres baseline (1 txn/op)",
        Box::new(move |n, p: &std::path::Path| {
            Box::new(pg::Baseline::open(&info, &pg::schema_for(p), n)) as Box<dyn Peer>
        }),
        base,
    ));
    peers.push((
        "idemstore on postgres",
        Box::new(move |_, p: &std::path::Path| {
            Box::new(pg::IdemPg::open(&conninfo, &pg::schema_for(p), pool)) as Box<dyn Peer>
        }),
        base,
    ));
}

#[cfg(not(feature = "postgres"))]
fn postgres_peers(_: String, _: Option<u32>, _: &mut Vec<Entry>) {
    unreachable!("postgres_conninfo is None without the feature")
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut peers: Vec<Entry> = Vec::new();
    if !a.postgres_only {
        peers.push((
            "naive redb (1 txn/op)",
            Box::new(|_, p: &std::path::Path| Box::new(NaiveRedb::open(p)) as Box<dyn Peer>),
            0,
        ));
        peers.push((
            "idemstore",
            Box::new(|_, p: &std::path::Path| Box::new(Idem::open(p)) as Box<dyn Peer>),
            0,
        ));
        peers.push((
            "sqlite WAL sync=FULL",
            Box::new(|n, p: &std::path::Path| Box::new(Sqlite::open(p, n)) as Box<dyn Peer>),
            0,
        ));
        peers.push((
            // What the default's two-phase commit costs (the second fsync per commit).
            "idemstore, 1-phase commit",
            Box::new(|_, p: &std::path::Path| {
                Box::new(Idem::open_with(p, idemstore::Durability::ImmediateOnePhase))
                    as Box<dyn Peer>
            }),
            0,
        ));
        if a.handoff {
            // Diagnostics: what a thread hand-off alone costs (no batching, naive's work).
            peers.push((
                "naive on a thread, recv",
                Box::new(|_, p: &std::path::Path| {
                    Box::new(NaiveOnThread::open(p, Wait::Recv)) as Box<dyn Peer>
                }),
                0,
            ));
            peers.push((
                "naive on a thread, park",
                Box::new(|_, p: &std::path::Path| {
                    Box::new(NaiveOnThread::open(p, Wait::Park)) as Box<dyn Peer>
                }),
                0,
            ));
        }
    }
    if let Some(conninfo) = postgres_conninfo(&a) {
        postgres_peers(conninfo, a.pg_pool, &mut peers);
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
                let (name, make, _) = &peers[pi];
                let path = dir.path().join(format!("p{pi}-n{n}-r{round}.db"));
                let peer = make(n, &path);
                let (cycles, secs) = run_cycles(peer.as_ref(), n, a.seconds);
                let rate = cycles as f64 / secs;
                eprintln!(
                    "  round {round}: {name:<28} {n:>3} callers: {rate:>10.0} cycles/s {}",
                    peer.note()
                );
                rates[pi][ci].push(rate);
            }
        }
        if !a.postgres_only {
            let (c, secs) =
                raw_batch_ceiling(&dir.path().join(format!("ceiling-r{round}.db")), a.seconds);
            let ceiling = c as f64 / secs;
            eprintln!("  round {round}: raw redb 64 ops/commit: {ceiling:>10.0} cycles/s");
            ceilings.push(ceiling);
        }
    }
    // (name, rates per caller count, the row its ratios are against)
    let mut rows: Vec<(&str, Vec<Vec<f64>>, usize)> = peers
        .iter()
        .zip(rates)
        .map(|((name, _, base), r)| (*name, r, *base))
        .collect();
    if !a.postgres_only {
        rows.push((
            "raw redb 64 ops/commit",
            vec![ceilings.clone(); a.callers.len()],
            0,
        ));
        match redis_cycles(&a) {
            Some(r) => rows.push((
                "redis appendfsync=always",
                r.into_iter().map(|x| vec![x; a.rounds]).collect(),
                0,
            )),
            None => eprintln!("  redis: skipped (no server on 127.0.0.1:6379)"),
        }
    }

    let ratio =
        |rates: &[f64], base: &[f64]| median(rates.iter().zip(base).map(|(r, b)| r / b).collect());
    let mut bases: Vec<usize> = rows.iter().map(|r| r.2).collect();
    bases.sort_unstable();
    bases.dedup();
    for base in bases {
        println!(
            "\n## Cycles/s (begin + complete, durable): median of {} round(s), and the median of \
             the per-round ratios to {}\n",
            a.rounds, rows[base].0
        );
        print!("| peer |");
        for n in &a.callers {
            print!(" {n} caller{} |", if *n == 1 { "" } else { "s" });
        }
        println!();
        println!("|---|{}", "---|".repeat(a.callers.len()));
        let base_rates = rows[base].1.clone();
        for (name, cells, _) in rows.iter().filter(|r| r.2 == base) {
            print!("| {name} |");
            for (r, b) in cells.iter().zip(&base_rates) {
                print!(" {:.0} ({:.2}×) |", median(r.clone()), ratio(r, b));
            }
            println!();
        }
    }
    if a.postgres_only {
        return;
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
