//! Replicas for real (feature `postgres`): store instances in separate processes on one
//! database. Duplicates across processes start once; a SIGKILLed holder's key is taken over
//! with its checkpoint and a paused holder is fenced; a server restarted under load loses no
//! acknowledged completion and the stores recover without being reopened; a completion in the
//! caller's transaction is all or nothing with the business write under SIGKILL.
//!
//! The replicas are this test binary run again ([`idemstore_testkit::child`]) with
//! `IDEMSTORE_REPLICA_CHILD` naming their role; they talk to the parent in lines. Runs against
//! the cluster named by `IDEMSTORE_PG` (`.ci/pg run -- cargo test ...`); skipped loudly without
//! it, and failed under `CI=true`.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use idemstore::{Begin, Entry, Error, Fingerprint, Key, Lease, Store};
use idemstore_testkit::child::{Child, commands, emit};
use idemstore_testkit::engine::pg::Schema;
use idemstore_testkit::rng::{RngExt, rng};

/// The child's role (unset: not a child).
const ROLE_ENV: &str = "IDEMSTORE_REPLICA_CHILD";
/// The schema the child's store lives in.
const SCHEMA_ENV: &str = "IDEMSTORE_REPLICA_SCHEMA";
/// The child's lease duration, in milliseconds.
const LEASE_ENV: &str = "IDEMSTORE_REPLICA_LEASE_MS";
/// The `tx` child's key prefix.
const PREFIX_ENV: &str = "IDEMSTORE_REPLICA_PREFIX";
/// Where the `tx` child sleeps on every round: `none`, `written` (after the business write) or
/// `completed` (after `complete_in`, before the commit).
const PAUSE_ENV: &str = "IDEMSTORE_REPLICA_PAUSE";
/// The name of the child test.
const CHILD_TEST: &str = "replica_child";

/// How long a child may take to answer one command.
const ANSWER: Duration = Duration::from_secs(30);

/// The server restart stops every other test's calls: it runs alone (write), the others
/// beside each other (read).
static SERVER: RwLock<()> = RwLock::new(());

/// A schema of the test's own on the test cluster, dropped at the end.
struct Db {
    conninfo: String,
    schema: String,
    /// Drops the schema at the end.
    _dropped: Schema,
}

impl Db {
    fn new() -> Option<Db> {
        let dropped = Schema::new()?;
        let db = Db {
            conninfo: dropped.conninfo.clone(),
            schema: dropped.name.clone(),
            _dropped: dropped,
        };
        // Created here, so that the children racing to open it find it there.
        db.open(Duration::from_secs(30)).close().expect("close");
        Some(db)
    }

    /// A store of the parent's own on the schema.
    fn open(&self, lease: Duration) -> Store {
        open_store(&self.conninfo, &self.schema, lease)
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo, postgres::NoTls).expect("connect")
    }

    /// A replica process, its store open.
    fn replica(&self, name: &str, lease: Duration) -> Child {
        let lease = lease.as_millis().to_string();
        let mut child = Child::spawn(
            name,
            CHILD_TEST,
            &[
                (ROLE_ENV, "replica"),
                (SCHEMA_ENV, &self.schema),
                (LEASE_ENV, &lease),
            ],
        );
        let ready = child.expect(ANSWER, "ready");
        assert_eq!(ready, "ready", "{name}");
        child
    }
}

fn open_store(conninfo: &str, schema: &str, lease: Duration) -> Store {
    Store::builder()
        .postgres_schema(schema)
        .postgres_pool_size(4)
        .lease(lease)
        .reap_interval(None)
        .open_postgres(conninfo)
        .expect("open on PostgreSQL")
}

fn key(id: &str) -> Key {
    Key::new("tenant", id).unwrap()
}

fn fp() -> Fingerprint {
    Fingerprint::of(b"the request")
}

/// The response every process stores for `id` under `token`.
fn response(id: &str, token: u64) -> Vec<u8> {
    format!("resp:{id}:{token}").into_bytes()
}

/// A seed of this run, printed so that a failure can be told apart from another.
fn seed() -> u64 {
    let seed = RandomState::new().build_hasher().finish();
    let _ = writeln!(std::io::stderr(), "seed {seed:#x}");
    seed
}

// ---------------------------------------------------------------------------------------------
// The children

/// Not a test on its own: the body of a child process (ignored; only the parents run it).
#[test]
#[ignore = "a child process of the replica tests"]
fn replica_child() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let conninfo = std::env::var("IDEMSTORE_PG").expect("IDEMSTORE_PG in the child");
    let schema = std::env::var(SCHEMA_ENV).expect("the child's schema");
    let lease_ms: u64 = std::env::var(LEASE_ENV)
        .map_or(Ok(30_000), |v| v.parse())
        .expect("lease in ms");
    let store = open_store(&conninfo, &schema, Duration::from_millis(lease_ms));
    match role.as_str() {
        "replica" => serve(&store),
        "tx" => complete_in_rounds(&store, &conninfo, &schema),
        other => panic!("unknown child role {other}"),
    }
}

/// The answer to a lease operation: `ok ID`, `lost ID` or `err ID MESSAGE`.
fn answer(id: &str, result: Result<(), Error>) -> String {
    match result {
        Ok(()) => format!("ok {id}"),
        Err(Error::LeaseLost { .. }) => format!("lost {id}"),
        Err(e) => format!("err {id} {}", one_line(&e)),
    }
}

fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

/// `begin` of `id`, as one answer line; a lease granted goes into `leases`.
fn begin_line(store: &Store, id: &str, leases: &mut HashMap<String, Lease>) -> String {
    match store.begin(&key(id), &fp()) {
        Ok(Begin::Started(lease)) => {
            let (prev, attempt, cp) = match lease.recovered() {
                Some(r) => (
                    r.previous_token(),
                    r.attempt(),
                    r.checkpoint()
                        .map_or("-".to_owned(), |c| String::from_utf8_lossy(c).into_owned()),
                ),
                None => (0, 1, "-".to_owned()),
            };
            let line = format!("started {id} {} {prev} {attempt} {cp}", lease.token());
            leases.insert(id.to_owned(), lease);
            line
        }
        Ok(Begin::InFlight { .. }) => format!("inflight {id}"),
        Ok(Begin::Replay(done)) => format!("replay {id} {}", done.token()),
        Ok(Begin::Mismatch) => format!("mismatch {id}"),
        Err(e) => format!("err {id} {}", one_line(&e)),
    }
}

/// The `replica` role: runs the parent's commands until its stdin closes.
///
/// * `begin ID` → `started ID TOKEN PREVIOUS_TOKEN ATTEMPT CHECKPOINT` | `inflight ID` |
///   `replay ID TOKEN` | `mismatch ID` | `err ID MESSAGE`
/// * `complete ID`, `extend ID`, `checkpoint ID BYTES`, `abandon ID` → `ok ID` | `lost ID` |
///   `err ID MESSAGE`
/// * `race KEYS THREADS SEED`: every thread begins every key `dup{i}` in an order of its own,
///   completing those it starts: `S ID TOKEN` for each start, then `raced`
/// * `load PREFIX THREADS`: begin → complete of fresh keys until `stop`: `ok ID TOKEN` per
///   acknowledged completion, `cerr ID TOKEN MESSAGE` per failed completion, `berr ID
///   MESSAGE` per failed begin; `stopped` after `stop`
fn serve(store: &Store) {
    let mut leases: HashMap<String, Lease> = HashMap::new();
    let mut load: Option<(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>)> = None;
    emit("ready");
    for line in commands() {
        let words: Vec<&str> = line.split(' ').collect();
        let reply = match words[..] {
            ["begin", id] => begin_line(store, id, &mut leases),
            ["complete", id] => match leases.remove(id) {
                Some(lease) => {
                    let token = lease.token();
                    answer(id, lease.complete(&response(id, token)).map(|_| ()))
                }
                None => format!("nolease {id}"),
            },
            ["extend", id] => match leases.get_mut(id) {
                Some(lease) => answer(id, lease.extend(Duration::from_secs(60))),
                None => format!("nolease {id}"),
            },
            ["checkpoint", id, bytes] => match leases.get_mut(id) {
                Some(lease) => answer(id, lease.checkpoint(bytes.as_bytes())),
                None => format!("nolease {id}"),
            },
            ["abandon", id] => match leases.remove(id) {
                Some(lease) => answer(id, lease.abandon()),
                None => format!("nolease {id}"),
            },
            ["race", keys, threads, seed] => {
                race(
                    store,
                    keys.parse().expect("keys"),
                    threads.parse().expect("threads"),
                    seed.parse().expect("seed"),
                );
                "raced".to_owned()
            }
            ["load", prefix, threads] => {
                let stop = Arc::new(AtomicBool::new(false));
                let handles = (0..threads.parse::<u32>().expect("threads"))
                    .map(|t| {
                        let (store, stop) = (store.clone(), Arc::clone(&stop));
                        let prefix = format!("{prefix}-{t}");
                        std::thread::spawn(move || run_load(&store, &prefix, &stop))
                    })
                    .collect();
                load = Some((stop, handles));
                continue;
            }
            ["stop"] => {
                let (stop, handles) = load.take().expect("stop without load");
                stop.store(true, Ordering::Release);
                for h in handles {
                    h.join().expect("a load thread panicked");
                }
                "stopped".to_owned()
            }
            _ => panic!("unknown command {line:?}"),
        };
        emit(reply);
    }
}

fn race(store: &Store, keys: u64, threads: u64, seed: u64) {
    let barrier = Barrier::new(usize::try_from(threads).expect("threads"));
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                let mut random = rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut order: Vec<u64> = (0..keys).collect();
                for i in (1..order.len()).rev() {
                    let j = random.random_range(0..=i);
                    order.swap(i, j);
                }
                barrier.wait();
                for i in order {
                    let id = format!("dup{i}");
                    match store.begin(&key(&id), &fp()) {
                        Ok(Begin::Started(lease)) => {
                            let token = lease.token();
                            emit(format_args!("S {id} {token}"));
                            lease
                                .complete(&response(&id, token))
                                .expect("complete a raced key");
                        }
                        Ok(Begin::InFlight { .. } | Begin::Replay(_)) => {}
                        Ok(other) => panic!("{id}: {other:?}"),
                        Err(e) => panic!("{id}: begin failed: {e}"),
                    }
                }
            });
        }
    });
}

fn run_load(store: &Store, prefix: &str, stop: &AtomicBool) {
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let id = format!("{prefix}-{i}");
        i += 1;
        match store.begin(&key(&id), &fp()) {
            Ok(Begin::Started(lease)) => {
                let token = lease.token();
                match lease.complete(&response(&id, token)) {
                    Ok(_) => emit(format_args!("ok {id} {token}")),
                    Err(e) => {
                        emit(format_args!("cerr {id} {token} {}", one_line(&e)));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            Ok(other) => emit(format_args!("odd {id} {other:?}")),
            Err(e) => {
                emit(format_args!("berr {id} {}", one_line(&e)));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Most rounds of one `tx` child (it is killed long before, normally).
const MAX_ROUNDS: u64 = 5_000;
/// How long a `tx` child sleeps at its pause point.
const PAUSE: Duration = Duration::from_millis(300);

/// The `tx` role: rounds of begin → business INSERT → `complete_in` → commit on fresh keys
/// `PREFIX-i`, printing `started ID TOKEN`, `written ID`, `completed_in ID`, `committed ID`
/// after each step, sleeping at the pause point of `IDEMSTORE_REPLICA_PAUSE`, until killed.
fn complete_in_rounds(store: &Store, conninfo: &str, schema: &str) {
    let prefix = std::env::var(PREFIX_ENV).expect("the tx child's prefix");
    let pause = std::env::var(PAUSE_ENV).unwrap_or_else(|_| "none".to_owned());
    let mut client = postgres::Client::connect(conninfo, postgres::NoTls).expect("connect");
    let insert = client
        .prepare(&format!(
            "INSERT INTO \"{schema}\".ledger (id, token) VALUES ($1, $2)"
        ))
        .expect("prepare");
    emit("ready");
    for i in 0..MAX_ROUNDS {
        let id = format!("{prefix}-{i}");
        let Begin::Started(lease) = store.begin(&key(&id), &fp()).expect("begin") else {
            panic!("{id}: a fresh key not started")
        };
        let token = lease.token();
        emit(format_args!("started {id} {token}"));
        let mut tx = client.transaction().expect("begin a transaction");
        let signed = i64::try_from(token).expect("token");
        tx.execute(&insert, &[&id, &signed])
            .expect("business write");
        emit(format_args!("written {id}"));
        if pause == "written" {
            std::thread::sleep(PAUSE);
        }
        lease
            .complete_in(&mut tx, &response(&id, token))
            .expect("complete_in");
        emit(format_args!("completed_in {id}"));
        if pause == "completed" {
            std::thread::sleep(PAUSE);
        }
        tx.commit().expect("commit");
        emit(format_args!("committed {id}"));
    }
    emit("exhausted");
    for _ in commands() {}
}

// ---------------------------------------------------------------------------------------------
// The parents

/// A child's `started` answer.
#[derive(Debug)]
struct Started {
    token: u64,
    previous: u64,
    attempt: u32,
    checkpoint: String,
}

fn parse_started(line: &str, id: &str) -> Option<Started> {
    let words: Vec<&str> = line.split(' ').collect();
    match words[..] {
        ["started", got, token, previous, attempt, checkpoint] if got == id => Some(Started {
            token: token.parse().ok()?,
            previous: previous.parse().ok()?,
            attempt: attempt.parse().ok()?,
            checkpoint: checkpoint.to_owned(),
        }),
        _ => None,
    }
}

/// Sends `command` and returns the answer.
fn ask(child: &mut Child, command: &str) -> String {
    child.send(command);
    child.expect(ANSWER, command)
}

/// `begin ID` on `child`, which must start it.
fn start(child: &mut Child, id: &str) -> Started {
    let line = ask(child, &format!("begin {id}"));
    parse_started(&line, id).unwrap_or_else(|| child.fail(&format!("begin {id}: {line}")))
}

/// The completed entry of `id`, whose token and response must be `token`'s.
fn assert_completed(store: &Store, id: &str, token: u64) {
    match store.get(&key(id)).expect("get") {
        Some(Entry::Completed(done)) => {
            assert_eq!(done.token(), token, "{id}: completed by another token");
            assert_eq!(done.response(), &response(id, token)[..], "{id}: response");
        }
        other => panic!("{id}: acknowledged completion with token {token}, found {other:?}"),
    }
}

#[test]
fn duplicates_across_replica_processes_start_exactly_once() {
    let _shared = SERVER.read().unwrap_or_else(|e| e.into_inner());
    let Some(db) = Db::new() else { return };
    const KEYS: u64 = 150;
    let seed = seed();
    let mut replicas: Vec<Child> = (0..3)
        .map(|r| db.replica(&format!("replica {r}"), Duration::from_secs(30)))
        .collect();
    for (r, child) in replicas.iter_mut().enumerate() {
        child.send(format_args!(
            "race {KEYS} 4 {}",
            seed.wrapping_add(r as u64)
        ));
    }
    let mut starts: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
    for (r, child) in replicas.iter_mut().enumerate() {
        for line in child.until(Duration::from_secs(120), "raced", |l| l == "raced") {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["S", id, token] => starts
                    .entry(id.to_owned())
                    .or_default()
                    .push((r, token.parse().unwrap())),
                ["raced"] => {}
                _ => child.fail(&format!("unexpected answer {line:?}")),
            }
        }
    }
    let store = db.open(Duration::from_secs(30));
    let mut tokens = HashSet::new();
    let mut by_replica = [0u32; 3];
    for i in 0..KEYS {
        let id = format!("dup{i}");
        let started = starts.get(&id).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            started.len(),
            1,
            "{id}: exactly one Started across the replica processes, got {started:?}"
        );
        let (r, token) = started[0];
        by_replica[r] += 1;
        assert!(tokens.insert(token), "{id}: token {token} granted twice");
        assert_completed(&store, &id, token);
    }
    let _ = writeln!(
        std::io::stderr(),
        "starts per replica process: {by_replica:?}"
    );
    for child in replicas {
        child.finish(ANSWER);
    }
    store.close().unwrap();
}

#[test]
fn a_killed_holder_is_taken_over_with_its_checkpoint_and_a_paused_one_is_fenced() {
    let _shared = SERVER.read().unwrap_or_else(|e| e.into_inner());
    let Some(db) = Db::new() else { return };
    let lease = Duration::from_millis(1500);
    let (mut a, mut b, mut c) = (
        db.replica("holder", lease),
        db.replica("successor", lease),
        db.replica("stale holder", lease),
    );

    // The holder checkpoints, then its process is SIGKILLed.
    let first = start(&mut a, "k");
    assert_eq!(ask(&mut a, "checkpoint k step-1-done"), "ok k");
    a.kill();
    // Its lease is still live: in flight, until it runs out; then taken over, checkpoint and all.
    assert_eq!(ask(&mut b, "begin k"), "inflight k");
    let deadline = Instant::now() + lease + Duration::from_secs(15);
    let taken = loop {
        let line = ask(&mut b, "begin k");
        if let Some(started) = parse_started(&line, "k") {
            break started;
        }
        assert_eq!(line, "inflight k", "before the lease ran out");
        assert!(Instant::now() < deadline, "never taken over");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (taken.previous, taken.attempt, taken.checkpoint.as_str()),
        (first.token, 2, "step-1-done"),
        "the takeover after the kill: {taken:?}"
    );
    assert!(taken.token > first.token);
    assert_eq!(ask(&mut b, "complete k"), "ok k");

    // A holder paused past its leases (SIGSTOP: a GC pause, a VM migration), its keys taken
    // over meanwhile, then resumed: every lease operation of its is fenced.
    let ids = ["s0", "s1", "s2", "s3"];
    let stale: Vec<Started> = ids.iter().map(|id| start(&mut c, id)).collect();
    c.signal("STOP");
    std::thread::sleep(lease + Duration::from_millis(300));
    let fresh: Vec<Started> = ids
        .iter()
        .map(|id| {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let line = ask(&mut b, &format!("begin {id}"));
                if let Some(started) = parse_started(&line, id) {
                    break started;
                }
                assert!(Instant::now() < deadline, "{id} never taken over: {line}");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .collect();
    for (old, new) in stale.iter().zip(&fresh) {
        assert_eq!((new.previous, new.attempt), (old.token, 2));
        assert!(new.token > old.token);
    }
    c.signal("CONT");
    assert_eq!(ask(&mut c, "extend s1"), "lost s1");
    assert_eq!(ask(&mut c, "checkpoint s2 stale"), "lost s2");
    assert_eq!(ask(&mut c, "complete s0"), "lost s0");
    assert_eq!(ask(&mut c, "abandon s3"), "lost s3");
    // Nothing of it changed anything: the successor's leases stand and complete.
    let store = db.open(lease);
    match store.get(&key("s2")).unwrap() {
        Some(Entry::InFlight {
            token, checkpoint, ..
        }) => assert_eq!((token, checkpoint), (fresh[2].token, None)),
        other => panic!("s2: {other:?}"),
    }
    for (id, new) in ids.iter().zip(&fresh) {
        assert_eq!(ask(&mut b, &format!("complete {id}")), format!("ok {id}"));
        assert_completed(&store, id, new.token);
    }
    assert_completed(&store, "k", taken.token);
    for child in [b, c] {
        child.finish(ANSWER);
    }
    store.close().unwrap();
}

/// The cluster's folder, or `None` after saying loudly that the test is skipped.
fn cluster_dir() -> Option<String> {
    idemstore_testkit::pg::cluster_env("IDEMSTORE_PG_DIR", "the server cannot be restarted")
}

/// What one replica under load reported.
#[derive(Default)]
struct LoadLog {
    /// Acknowledged completions: id → token.
    acked: Vec<(String, u64)>,
    /// Completions that failed (outcome unknown): id → token.
    failed_completions: Vec<(String, u64)>,
    failed_begins: u32,
}

impl LoadLog {
    fn take(&mut self, child: &mut Child, line: &str) {
        let words: Vec<&str> = line.splitn(4, ' ').collect();
        match words[..] {
            ["ok", id, token] => self.acked.push((id.to_owned(), token.parse().unwrap())),
            ["cerr", id, token, ..] => self
                .failed_completions
                .push((id.to_owned(), token.parse().unwrap())),
            ["berr", ..] => self.failed_begins += 1,
            ["stopped"] => {}
            _ => child.fail(&format!("unexpected answer under load: {line:?}")),
        }
    }
}

/// `pg_ctl restart -m immediate` of the test cluster in `dir` (a crash and recovery of the
/// server, on the same port).
fn restart_server(dir: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/pg");
    let restarted = std::process::Command::new(script)
        .args(["restart", dir])
        .status()
        .expect("run .ci/pg restart");
    assert!(restarted.success(), ".ci/pg restart failed: {restarted}");
}

#[test]
fn a_server_restart_under_load_loses_no_acknowledged_completion() {
    let _alone = SERVER.write().unwrap_or_else(|e| e.into_inner());
    let Some(db) = Db::new() else { return };
    let Some(dir) = cluster_dir() else { return };
    const REPLICAS: usize = 2;
    let mut replicas: Vec<Child> = (0..REPLICAS)
        .map(|r| db.replica(&format!("replica {r}"), Duration::from_secs(30)))
        .collect();
    let mut logs: Vec<LoadLog> = (0..REPLICAS).map(|_| LoadLog::default()).collect();
    for (r, child) in replicas.iter_mut().enumerate() {
        child.send(format_args!("load p{r} 3"));
    }
    // Under load first.
    for (child, log) in replicas.iter_mut().zip(&mut logs) {
        while log.acked.len() < 30 {
            let line = child.expect(ANSWER, "completions before the restart");
            log.take(child, &line);
        }
    }
    restart_server(&dir);

    // The same store instances recover: each acknowledges completions again within a
    // bounded time of the server's return (calls during the outage failed, or waited for a
    // connection and then worked).
    let deadline = Instant::now() + Duration::from_secs(60);
    for (r, (child, log)) in replicas.iter_mut().zip(&mut logs).enumerate() {
        for line in child.drain() {
            log.take(child, &line);
        }
        let before = log.acked.len();
        while log.acked.len() < before + 30 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = child.recv(left) else {
                child.fail(&format!(
                    "replica {r} did not recover within 60 s of the restart ({} begins and {} \
                     completions failed, {} acknowledged since)",
                    log.failed_begins,
                    log.failed_completions.len(),
                    log.acked.len() - before
                ))
            };
            log.take(child, &line);
        }
    }
    for (child, log) in replicas.iter_mut().zip(&mut logs) {
        child.send("stop");
        for line in child.until(ANSWER, "stopped", |l| l == "stopped") {
            log.take(child, &line);
        }
    }

    // Restarted while the replicas are idle: their first calls after it work (a connection
    // the server closed meanwhile is replaced, not failed on).
    restart_server(&dir);
    for (r, child) in replicas.iter_mut().enumerate() {
        let id = format!("after-idle-restart-{r}");
        let started = start(child, &id);
        assert_eq!(ask(child, &format!("complete {id}")), format!("ok {id}"));
        logs[r].acked.push((id, started.token));
    }

    // Every completion acknowledged with Ok is there; every failed one is wholly there or
    // wholly absent (still in flight with its token).
    let store = db.open(Duration::from_secs(30));
    for (r, log) in logs.iter().enumerate() {
        let _ = writeln!(
            std::io::stderr(),
            "replica {r}: {} completions acknowledged, {} failed begins, {} failed completions",
            log.acked.len(),
            log.failed_begins,
            log.failed_completions.len()
        );
        for (id, token) in &log.acked {
            assert_completed(&store, id, *token);
        }
        for (id, token) in &log.failed_completions {
            match store.get(&key(id)).unwrap() {
                Some(Entry::Completed(done)) => {
                    assert_eq!(
                        (done.token(), done.response()),
                        (*token, &response(id, *token)[..])
                    );
                }
                Some(Entry::InFlight { token: held, .. }) => assert_eq!(held, *token, "{id}"),
                None => panic!("{id}: claimed with token {token}, then lost"),
            }
        }
    }
    for child in replicas {
        child.finish(ANSWER);
    }
    store.close().unwrap();
}

/// How the parent of the `tx` children kills one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum KillAt {
    /// At a random instant of its rounds.
    Random,
    /// While it sleeps between the business write and `complete_in`.
    Written,
    /// While it sleeps between `complete_in` and the commit.
    CompletedIn,
}

#[test]
fn completion_in_the_callers_transaction_is_all_or_nothing_under_sigkill() {
    let _shared = SERVER.read().unwrap_or_else(|e| e.into_inner());
    let Some(db) = Db::new() else { return };
    const KILLS: u64 = 36;
    let mut random = rng(seed());
    let mut client = db.client();
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{}\".ledger (id text PRIMARY KEY, token bigint NOT NULL)",
            db.schema
        ))
        .unwrap();

    // Per child: the keys it began (with their tokens), and the one it was killed on
    // (between the business write and the commit) when known.
    let mut began: Vec<(String, u64)> = Vec::new();
    let mut candidates: Vec<String> = Vec::new();
    let mut cut_before_commit: Vec<String> = Vec::new();
    for n in 0..KILLS {
        let at = match n % 3 {
            0 => KillAt::Random,
            1 => KillAt::Written,
            _ => KillAt::CompletedIn,
        };
        let prefix = format!("r{n}");
        let pause = match at {
            KillAt::Random => "none",
            KillAt::Written => "written",
            KillAt::CompletedIn => "completed",
        };
        let mut child = Child::spawn(
            &format!("tx child {n}"),
            CHILD_TEST,
            &[
                (ROLE_ENV, "tx"),
                (SCHEMA_ENV, &db.schema),
                (PREFIX_ENV, &prefix),
                (PAUSE_ENV, pause),
            ],
        );
        assert_eq!(child.expect(ANSWER, "ready"), "ready");
        let mut lines = Vec::new();
        match at {
            KillAt::Random => {
                std::thread::sleep(Duration::from_millis(20 + random.random_range(0..300)))
            }
            KillAt::Written | KillAt::CompletedIn => {
                // On the first, second or third round.
                let round = random.random_range(0..3u64);
                let step = if at == KillAt::Written {
                    "written"
                } else {
                    "completed_in"
                };
                let target = format!("{step} {prefix}-{round}");
                lines = child.until(ANSWER, &target, |l| l == target);
                cut_before_commit.push(format!("{prefix}-{round}"));
            }
        }
        lines.extend(child.kill());
        let mut last = None;
        for line in &lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["started", id, token] => {
                    began.push((id.to_owned(), token.parse().unwrap()));
                    last = Some(id.to_owned());
                }
                ["written" | "completed_in" | "committed", _] => {}
                _ => panic!("tx child {n}: unexpected answer {line:?}"),
            }
        }
        // The begin of the next key may have been claimed without its answer reaching us.
        let next = last.map_or(0, |id| {
            id.rsplit('-').next().unwrap().parse::<u64>().unwrap() + 1
        });
        candidates.push(format!("{prefix}-{next}"));
    }

    let store = db.open(Duration::from_secs(30));
    let ledger: HashMap<String, u64> = client
        .query(
            &format!("SELECT id, token FROM \"{}\".ledger", db.schema),
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|row| {
            let token: i64 = row.get(1);
            (row.get(0), u64::try_from(token).unwrap())
        })
        .collect();
    let (mut both, mut neither) = (0u32, 0u32);
    let mut seen = HashSet::new();
    for (id, token) in &began {
        seen.insert(id.clone());
        match (store.get(&key(id)).unwrap(), ledger.get(id)) {
            (Some(Entry::Completed(done)), Some(row)) => {
                assert_eq!((done.token(), *row), (*token, *token), "{id}");
                assert_eq!(done.response(), &response(id, *token)[..], "{id}");
                both += 1;
            }
            (Some(Entry::InFlight { token: held, .. }), None) => {
                assert_eq!(held, *token, "{id}");
                neither += 1;
            }
            (entry, row) => panic!(
                "{id}: the business row and the completion must be both there or neither: \
                 entry {entry:?}, business row {row:?}"
            ),
        }
    }
    for id in &cut_before_commit {
        assert!(
            matches!(store.get(&key(id)).unwrap(), Some(Entry::InFlight { .. })),
            "{id}: killed before its commit, yet not in flight"
        );
        assert!(!ledger.contains_key(id), "{id}: killed before its commit");
    }
    for id in &candidates {
        assert!(
            !ledger.contains_key(id),
            "{id}: a business row, never written"
        );
        if let Some(entry) = store.get(&key(id)).unwrap() {
            assert!(matches!(entry, Entry::InFlight { .. }), "{id}: {entry:?}");
        }
    }
    assert!(
        ledger.keys().all(|id| seen.contains(id)),
        "a business row of a key never begun"
    );
    let _ = writeln!(
        std::io::stderr(),
        "{KILLS} kills, {} keys begun: {both} with business row and completion, {neither} with neither",
        began.len()
    );
    assert!(both > 0 && neither as usize >= cut_before_commit.len());
    store.close().unwrap();
}
