//! Peers and baselines for idemstore's write path, shared by `benches/` and
//! `examples/compare.rs`. None of this is in the library.
//!
//! [`key_id`] is no random generator but a bijection from `(thread, i)` to UUID-shaped ids:
//! every id is distinct by construction, which a generator cannot promise.
//!
//! Every peer runs the same workload: a *cycle* is `begin` (claim an absent key: read it,
//! allocate a fencing token, write an in-flight record) followed by `complete` (re-read,
//! check the token, write the completed record with a 200-byte response), each durable
//! before it returns. [`SimplestRedb`] and [`Redis`] do less, as the code a user writes
//! instead of idemstore would: a claim without a token, then the response.
//!
//! The redb peers commit as idemstore's default `Durability::Immediate` does (two phases)
//! unless opened with another durability.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemstore::{Begin, Durability, Fingerprint, Key, Store};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// The response stored by every cycle.
pub const RESPONSE: [u8; 200] = [b'r'; 200];

/// One way of running cycles. `cycle(thread, i)` must use a key no other call uses.
pub trait Peer: Send + Sync {
    /// Runs one begin + complete cycle on a fresh key.
    fn cycle(&self, thread: usize, i: u64);

    /// Anything worth printing after a run.
    fn note(&self) -> String {
        String::new()
    }
}

static SEQUENTIAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Switches every peer to sequential key ids (see [`key_id`]).
pub fn set_sequential_keys(on: bool) {
    SEQUENTIAL.store(on, Ordering::Relaxed);
}

/// A unique, random-looking key id for `(thread, i)`, shaped like a UUID v4 as real
/// idempotency keys are (so inserts land all over the tree, not at its right edge).
/// `i` must stay below 2^40.
///
/// With [`set_sequential_keys`], ids are `thread-counter` instead: each caller appends at
/// its own point of the tree (cheaper for every peer; not how clients generate keys).
pub fn key_id(thread: usize, i: u64) -> String {
    if SEQUENTIAL.load(Ordering::Relaxed) {
        return format!("{thread:04}-{i:012}-6a1f4c1e-8e1c-4c36-9d51");
    }
    // splitmix64's finaliser is a bijection on u64, so distinct inputs give distinct ids.
    let mut z = ((thread as u64) << 40 | i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        z >> 32,
        (z >> 16) & 0xffff,
        z & 0xfff,
        (z >> 52) & 0xfff,
        z & 0xffff_ffff_ffff
    )
}

/// idemstore itself, file store, `Durability::Immediate`.
pub struct Idem {
    pub store: Store,
}

impl Idem {
    pub fn open(path: &Path) -> Idem {
        Idem::open_with(path, Durability::Immediate)
    }

    /// With another durability (`ImmediateOnePhase`: what the default's two-phase commit
    /// costs).
    pub fn open_with(path: &Path, durability: Durability) -> Idem {
        let store = Store::builder()
            .durability(durability)
            .reap_interval(None)
            .open(path)
            .expect("open idemstore");
        Idem { store }
    }
}

impl Peer for Idem {
    fn cycle(&self, thread: usize, i: u64) {
        let key = Key::new("bench", &key_id(thread, i)).expect("key");
        let fp = Fingerprint::of(key.id());
        match self.store.begin(&key, &fp).expect("begin") {
            Begin::Started(lease) => {
                lease.complete(&RESPONSE).expect("complete");
            }
            other => panic!("fresh key did not start: {other:?}"),
        }
    }

    fn note(&self) -> String {
        let s = self.store.stats();
        format!(
            "({} commits, {:.1} ops per commit)",
            s.commits,
            s.committed_ops as f64 / s.commits.max(1) as f64
        )
    }
}

const N_RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const N_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
const N_META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The naive baseline: the same transitions with one durable redb write transaction per
/// operation (what you get without group commit).
///
/// It commits as idemstore's default does ([`NaiveRedb::open`]: two phases), or as asked
/// ([`NaiveRedb::open_with`]).
pub struct NaiveRedb {
    db: Database,
    durability: Durability,
}

/// Starts a redb write transaction that commits as idemstore's `durability` does:
/// `Immediate` in two phases (redb's `set_two_phase_commit`), `ImmediateOnePhase` with
/// redb's default durable commit, `None` not durable.
fn begin_write(db: &Database, durability: Durability) -> redb::WriteTransaction {
    let mut txn = db.begin_write().expect("write");
    match durability {
        Durability::Immediate => txn.set_two_phase_commit(true),
        Durability::ImmediateOnePhase => {}
        Durability::None => txn
            .set_durability(redb::Durability::None)
            .expect("set durability"),
        other => panic!("no redb commit mode for {other:?}"),
    }
    txn
}

/// The name of a durability as the compare tables print it.
pub fn commit_name(durability: Durability) -> &'static str {
    match durability {
        Durability::Immediate => "2-phase",
        Durability::ImmediateOnePhase => "1-phase",
        _ => "not durable",
    }
}

fn naive_record(state: u8, token: u64, deadline: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(58 + body.len());
    v.push(1);
    v.push(state);
    v.extend_from_slice(&[7u8; 32]);
    v.extend_from_slice(&token.to_be_bytes());
    v.extend_from_slice(&deadline.to_be_bytes());
    v.extend_from_slice(&deadline.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn expiry_key(deadline: u64, key: &[u8]) -> Vec<u8> {
    let mut k = deadline.to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

impl NaiveRedb {
    /// Creates the baseline's file at `path`, committing in two phases as idemstore's
    /// default `Durability::Immediate` does.
    pub fn open(path: &Path) -> NaiveRedb {
        NaiveRedb::open_with(path, Durability::Immediate)
    }

    /// Creates the baseline's file at `path`, committing as idemstore does with
    /// `durability` (`ImmediateOnePhase`: redb's default commit, one fsync).
    pub fn open_with(path: &Path, durability: Durability) -> NaiveRedb {
        let db = redb::Builder::new()
            .set_cache_size(32 << 20)
            .create(path)
            .expect("create redb");
        let txn = begin_write(&db, durability);
        {
            txn.open_table(N_RECORDS).expect("table");
            txn.open_table(N_EXPIRY).expect("table");
            txn.open_table(N_META).expect("table");
        }
        txn.commit().expect("commit");
        NaiveRedb { db, durability }
    }

    /// begin: read the key, claim it with a new token; one durable commit.
    pub fn begin(&self, key: &[u8]) -> u64 {
        let txn = begin_write(&self.db, self.durability);
        let token;
        {
            let mut records = txn.open_table(N_RECORDS).expect("table");
            let mut expiry = txn.open_table(N_EXPIRY).expect("table");
            let mut meta = txn.open_table(N_META).expect("table");
            assert!(records.get(key).expect("get").is_none(), "fresh key");
            token = meta.get("token").expect("get").map_or(0, |v| v.value()) + 1;
            meta.insert("token", token).expect("insert");
            let deadline = 86_400_000_000_000u64 + token;
            records
                .insert(key, naive_record(1, token, deadline, &[]).as_slice())
                .expect("insert");
            expiry
                .insert(expiry_key(deadline, key).as_slice(), ())
                .expect("insert");
        }
        txn.commit().expect("commit");
        token
    }

    /// complete: re-read, check the token, write the completed record; one durable commit.
    pub fn complete(&self, key: &[u8], token: u64, response: &[u8]) {
        let txn = begin_write(&self.db, self.durability);
        {
            let mut records = txn.open_table(N_RECORDS).expect("table");
            let mut expiry = txn.open_table(N_EXPIRY).expect("table");
            let old = records
                .get(key)
                .expect("get")
                .expect("in flight")
                .value()
                .to_vec();
            assert_eq!(old[34..42], token.to_be_bytes(), "fenced");
            let old_deadline = 86_400_000_000_000u64 + token;
            expiry
                .remove(expiry_key(old_deadline, key).as_slice())
                .expect("remove");
            let deadline = old_deadline + 1;
            records
                .insert(key, naive_record(2, token, deadline, response).as_slice())
                .expect("insert");
            expiry
                .insert(expiry_key(deadline, key).as_slice(), ())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }

    /// A read transaction per lookup, returning a copy of the stored bytes: the raw replay
    /// baseline (a replay hands its bytes back after the transaction ends, so it copies them).
    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        let txn = self.db.begin_read().expect("read");
        let records = txn.open_table(N_RECORDS).expect("table");
        records.get(key).expect("get").map(|v| v.value().to_vec())
    }
}

impl Peer for NaiveRedb {
    fn cycle(&self, thread: usize, i: u64) {
        let key = key_id(thread, i);
        let token = self.begin(key.as_bytes());
        self.complete(key.as_bytes(), token, &RESPONSE);
    }
}

const S_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idempotency_keys");

/// The simplest redb code a user would write instead of idemstore: one table keyed by the
/// idempotency key, its value a state byte, the request's fingerprint and (once completed)
/// the response. `begin` reads the key and inserts the in-flight value in one durable write
/// transaction; `complete` inserts the completed value in another. No fencing token, no
/// expiry, no lease: less work per operation than idemstore or [`NaiveRedb`] do.
///
/// It opens with redb's defaults (`Database::create`, its default cache) and commits as
/// idemstore's default does ([`SimplestRedb::open`]: two phases), or as asked
/// ([`SimplestRedb::open_with`]; `ImmediateOnePhase` is redb's own default commit).
pub struct SimplestRedb {
    db: Database,
    durability: Durability,
}

impl SimplestRedb {
    /// Creates the file at `path`, committing in two phases as idemstore's default does.
    pub fn open(path: &Path) -> SimplestRedb {
        SimplestRedb::open_with(path, Durability::Immediate)
    }

    /// Creates the file at `path`, committing as idemstore does with `durability`.
    pub fn open_with(path: &Path, durability: Durability) -> SimplestRedb {
        let db = Database::create(path).expect("create redb");
        let txn = begin_write(&db, durability);
        txn.open_table(S_KEYS).expect("table");
        txn.commit().expect("commit");
        SimplestRedb { db, durability }
    }

    /// `begin`: `true` if the key was absent and is now claimed (in flight), `false` if it
    /// was there already (nothing written). One durable commit either way.
    pub fn begin(&self, key: &[u8], fingerprint: &[u8; 32]) -> bool {
        let txn = begin_write(&self.db, self.durability);
        let claimed = {
            let mut keys = txn.open_table(S_KEYS).expect("table");
            let absent = keys.get(key).expect("get").is_none();
            if absent {
                let mut value = [0u8; 33];
                value[0] = 1;
                value[1..].copy_from_slice(fingerprint);
                keys.insert(key, value.as_slice()).expect("insert");
            }
            absent
        };
        txn.commit().expect("commit");
        claimed
    }

    /// `complete`: stores the response under the key; one durable commit.
    pub fn complete(&self, key: &[u8], fingerprint: &[u8; 32], response: &[u8]) {
        let mut value = Vec::with_capacity(33 + response.len());
        value.push(2);
        value.extend_from_slice(fingerprint);
        value.extend_from_slice(response);
        let txn = begin_write(&self.db, self.durability);
        txn.open_table(S_KEYS)
            .expect("table")
            .insert(key, value.as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
}

impl Peer for SimplestRedb {
    fn cycle(&self, thread: usize, i: u64) {
        let key = key_id(thread, i);
        let fp = Fingerprint::of(&key);
        assert!(self.begin(key.as_bytes(), fp.as_bytes()), "fresh key");
        self.complete(key.as_bytes(), fp.as_bytes(), &RESPONSE);
    }
}

/// A job for [`NaiveOnThread`]'s worker.
type Job = Box<dyn FnOnce() + Send>;

/// How [`NaiveOnThread`]'s two threads wait for each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// crossbeam's blocking `recv` on both sides (it spins and yields before it parks).
    Recv,
    /// Park at once: the worker sleeps after an empty `try_recv`, the caller until its
    /// answer is there (what idemstore's committer and callers do).
    Park,
}

/// Diagnostic: the naive baseline with each operation handed to a worker thread over a
/// crossbeam channel while the caller waits, i.e. the cost of a thread hand-off alone, with
/// no batching (`compare --handoff`).
pub struct NaiveOnThread {
    naive: Arc<NaiveRedb>,
    wait: Wait,
    tx: Option<crossbeam_channel::Sender<Job>>,
    sleeping: Arc<std::sync::atomic::AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl NaiveOnThread {
    pub fn open(path: &Path, wait: Wait) -> NaiveOnThread {
        use crossbeam_channel::TryRecvError;
        use std::sync::atomic::{AtomicBool, fence};
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let sleeping = Arc::new(AtomicBool::new(false));
        let asleep = Arc::clone(&sleeping);
        let worker = std::thread::spawn(move || {
            loop {
                let job = match wait {
                    Wait::Recv => match rx.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                    Wait::Park => match rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Disconnected) => return,
                        Err(TryRecvError::Empty) => {
                            asleep.store(true, Ordering::Relaxed);
                            fence(Ordering::SeqCst);
                            if rx.is_empty() {
                                std::thread::park();
                            }
                            asleep.store(false, Ordering::Relaxed);
                            continue;
                        }
                    },
                };
                job();
            }
        });
        NaiveOnThread {
            naive: Arc::new(NaiveRedb::open(path)),
            wait,
            tx: Some(tx),
            sleeping,
            worker: Some(worker),
        }
    }

    /// Runs `f` on the worker and waits for its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let tx = self.tx.as_ref().expect("open");
        match self.wait {
            Wait::Recv => {
                let (done, result) = crossbeam_channel::bounded(1);
                tx.send(Box::new(move || {
                    let _ = done.send(f());
                }))
                .expect("worker");
                result.recv().expect("worker")
            }
            Wait::Park => {
                let slot = Arc::new(parking_lot::Mutex::new(None));
                let (out, caller) = (Arc::clone(&slot), std::thread::current());
                tx.send(Box::new(move || {
                    *out.lock() = Some(f());
                    caller.unpark();
                }))
                .expect("worker");
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.sleeping.load(Ordering::Relaxed) {
                    self.worker.as_ref().expect("open").thread().unpark();
                }
                loop {
                    if let Some(v) = slot.lock().take() {
                        return v;
                    }
                    std::thread::park();
                }
            }
        }
    }
}

impl Drop for NaiveOnThread {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            worker.thread().unpark();
            worker.join().expect("worker");
        }
    }
}

impl Peer for NaiveOnThread {
    fn cycle(&self, thread: usize, i: u64) {
        let key = key_id(thread, i);
        let (naive, k) = (Arc::clone(&self.naive), key.clone());
        let token = self.run(move || naive.begin(k.as_bytes()));
        let naive = Arc::clone(&self.naive);
        self.run(move || naive.complete(key.as_bytes(), token, &RESPONSE));
    }
}

/// SQLite through rusqlite (bundled): WAL, `synchronous=FULL`, a connection per thread,
/// the same transitions in `BEGIN IMMEDIATE` transactions.
pub struct Sqlite {
    conns: Vec<parking_lot::Mutex<rusqlite::Connection>>,
}

impl Sqlite {
    pub fn open(path: &Path, threads: usize) -> Sqlite {
        let open = || {
            let c = rusqlite::Connection::open(path).expect("sqlite open");
            c.busy_timeout(std::time::Duration::from_secs(30))
                .expect("busy timeout");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            c.pragma_update(None, "synchronous", "FULL").expect("sync");
            c
        };
        let first = open();
        first
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS records (key BLOB PRIMARY KEY, state INTEGER, token INTEGER, deadline INTEGER, body BLOB);
                 CREATE INDEX IF NOT EXISTS by_deadline ON records(deadline);
                 CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
                 INSERT OR IGNORE INTO meta VALUES ('token', 0);",
            )
            .expect("schema");
        let mut conns = vec![parking_lot::Mutex::new(first)];
        while conns.len() < threads {
            conns.push(parking_lot::Mutex::new(open()));
        }
        Sqlite { conns }
    }
}

impl Peer for Sqlite {
    fn cycle(&self, thread: usize, i: u64) {
        let key = key_id(thread, i);
        let mut c = self.conns[thread % self.conns.len()].lock();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM records WHERE key = ?1",
                [key.as_bytes()],
                |_| Ok(()),
            )
            .is_ok();
        assert!(!exists, "fresh key");
        let token: i64 = tx
            .query_row(
                "UPDATE meta SET v = v + 1 WHERE k = 'token' RETURNING v",
                [],
                |r| r.get(0),
            )
            .expect("token");
        tx.execute(
            "INSERT INTO records VALUES (?1, 1, ?2, ?3, NULL)",
            rusqlite::params![key.as_bytes(), token, 86_400i64 + token],
        )
        .expect("insert");
        tx.commit().expect("commit");
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        let t: i64 = tx
            .query_row(
                "SELECT token FROM records WHERE key = ?1",
                [key.as_bytes()],
                |r| r.get(0),
            )
            .expect("in flight");
        assert_eq!(t, token, "fenced");
        tx.execute(
            "UPDATE records SET state = 2, deadline = ?2, body = ?3 WHERE key = ?1",
            rusqlite::params![key.as_bytes(), 86_401i64 + token, &RESPONSE[..]],
        )
        .expect("update");
        tx.commit().expect("commit");
    }
}

/// A Redis connection speaking RESP: commands out, one-line replies in.
pub struct RedisConn {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl RedisConn {
    /// Connects to `addr`, waiting at most `timeout` for the connection and for each reply.
    ///
    /// # Errors
    ///
    /// The connection's error when nothing accepts it at `addr` in time.
    pub fn connect(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<RedisConn> {
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(RedisConn {
            stream: std::io::BufReader::new(stream),
        })
    }

    /// Sends one command and returns its reply's first line without the line end (`+OK`,
    /// `-ERR …`, `$-1`, `:1`, `*2`, `$5`; the lines after a bulk or array header are not read,
    /// so use it for commands with one-line replies only).
    ///
    /// # Errors
    ///
    /// A write or read error, a timeout, or the server closing the connection.
    pub fn command(&mut self, args: &[&[u8]]) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&cmd)?;
        let mut line = Vec::new();
        self.stream.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the connection mid-reply",
            ));
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Sends one command that must answer `+OK`.
    fn ok(&mut self, args: &[&[u8]]) {
        let reply = self.command(args).expect("redis command");
        assert_eq!(
            reply,
            "+OK",
            "redis refused {:?}",
            String::from_utf8_lossy(args[0])
        );
    }
}

/// Redis as a user would use it for idempotency keys: `begin` is `SET key inflight NX EX
/// 86400`, `complete` is `SET key response XX EX 86400`, one connection per caller. The
/// server's durability is its own configuration (`compare` runs it with `appendonly yes`,
/// `appendfsync always`: every write is in the fsync'd log before the reply).
pub struct Redis {
    conns: Vec<parking_lot::Mutex<RedisConn>>,
    /// Keeps this peer's keys apart from earlier peers' on the same server.
    prefix: String,
}

impl Redis {
    /// Opens one connection per caller to the server at `addr`.
    pub fn open(addr: std::net::SocketAddr, callers: usize) -> Redis {
        static OPENED: AtomicU64 = AtomicU64::new(0);
        let conns = (0..callers.max(1))
            .map(|_| {
                let conn =
                    RedisConn::connect(addr, Duration::from_secs(30)).expect("connect to redis");
                parking_lot::Mutex::new(conn)
            })
            .collect();
        Redis {
            conns,
            prefix: format!(
                "idem:{}:{}",
                std::process::id(),
                OPENED.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}

impl Peer for Redis {
    fn cycle(&self, thread: usize, i: u64) {
        let key = format!("{}:{}", self.prefix, key_id(thread, i));
        let mut conn = self.conns[thread % self.conns.len()].lock();
        let key = key.as_bytes();
        conn.ok(&[b"SET", key, b"inflight", b"NX", b"EX", b"86400"]);
        conn.ok(&[b"SET", key, &RESPONSE, b"XX", b"EX", b"86400"]);
    }
}

/// The ceiling: raw redb, one thread, 64 record writes per durable commit (32 begins and
/// 32 completes of the same shape), no channel, no reads, committing in two phases as
/// idemstore's default does. Returns cycles done.
pub fn raw_batch_ceiling(path: &Path, seconds: f64) -> (u64, f64) {
    let db = NaiveRedb::open(path);
    let start = std::time::Instant::now();
    let mut cycles = 0u64;
    let mut token = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let txn = begin_write(&db.db, db.durability);
        {
            let mut records = txn.open_table(N_RECORDS).expect("table");
            let mut expiry = txn.open_table(N_EXPIRY).expect("table");
            let mut meta = txn.open_table(N_META).expect("table");
            for _ in 0..32 {
                token += 1;
                // The keys 64 callers would use.
                let key = key_id((token % 64) as usize, token / 64);
                let deadline = 86_400_000_000_000u64 + token;
                meta.insert("token", token).expect("insert");
                records
                    .insert(
                        key.as_bytes(),
                        naive_record(1, token, deadline, &[]).as_slice(),
                    )
                    .expect("insert");
                expiry
                    .insert(expiry_key(deadline, key.as_bytes()).as_slice(), ())
                    .expect("insert");
                expiry
                    .remove(expiry_key(deadline, key.as_bytes()).as_slice())
                    .expect("remove");
                records
                    .insert(
                        key.as_bytes(),
                        naive_record(2, token, deadline + 1, &RESPONSE).as_slice(),
                    )
                    .expect("insert");
                expiry
                    .insert(expiry_key(deadline + 1, key.as_bytes()).as_slice(), ())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
        cycles += 32;
    }
    (cycles, start.elapsed().as_secs_f64())
}

/// Runs `threads` callers against `peer` for about `seconds`; returns cycles and elapsed seconds.
pub fn run_cycles(peer: &dyn Peer, threads: usize, seconds: f64) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let done = &done;
            let stop = &stop;
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    peer.cycle(t, i);
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}
