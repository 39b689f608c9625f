//! Process-kill crash test (durability, replay fidelity, no lost keys,
//! a file open in another process, tokens rise across restarts).
//!
//! The test binary re-runs itself as a child (`crash_child`, selected with `--exact`, does its
//! work only when `IDEMSTORE_CRASH_CHILD` is set). The child opens a file store with
//! `Durability::Immediate` and runs concurrent begin / checkpoint / complete / abandon / drop
//! on a few hundred keys. Around every write it prints, on stdout (a pipe):
//!
//! * an *intent* line before the call (`b key`, `k key token seq`, `c key token`, `a key token`),
//! * an *acknowledgement* line only after the call returned `Ok` (`S key token`,
//!   `K key token <checkpoint hex>`, `C key token <response hex>`, `A key token`), and the
//!   answer of every `begin` that did not start (`R key token`, `I key`).
//!
//! The parent SIGKILLs the child at a random moment (5–50 ms after it opened the store), reads
//! every complete line, reopens the file and checks, for every key that was ever touched since
//! the file was created (the file is reused across kills, so state accumulates; now and then
//! the test starts a fresh file):
//!
//! * an acknowledged completion is there and replays byte for byte (a `begin` with the same
//!   fingerprint answers `Replay` with exactly the acknowledged bytes, and `get` agrees);
//! * an acknowledged `Started` is in flight or completed, unless an abandon of that token was
//!   at least attempted (an abandon that became durable just before the kill cannot be
//!   acknowledged); an acknowledged abandon is not undone;
//! * a stored completion or checkpoint carries bytes that were really attempted, by the holder
//!   of the token that wrote them (responses and checkpoints encode key, token and sequence);
//! * the next token granted after the reopen exceeds every token seen;
//! * on some iterations, while the child lives, `Store::open` of its file fails with
//!   `Error::AlreadyOpen`.
//!
//! Sometimes the parent does not reopen between two kills: the next child then opens the
//! crashed file itself (crash recovery in the child) and the checks run later, on the
//! accumulated history.
//!
//! `IDEMSTORE_CRASH_SEED` fixes the seed of the parent's choices (printed on every run); the
//! kill moments are real time, so a run is not exactly reproducible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idemstore::{Begin, Durability, Entry, Error, Fingerprint, Key, ManualClock, Store};
use idemstore_testkit::child::marked_lines;
use idemstore_testkit::rng::{RngExt, rng};

/// The child's instructions: `seed,path,clock_secs,keys`.
const CHILD_ENV: &str = "IDEMSTORE_CRASH_CHILD";
/// Name of the test that is the child's body.
const CHILD_TEST: &str = "crash_child";
/// Marks the child's own lines on stdout (libtest prints its own lines around them).
const MARK: &str = "@@";

const SCOPE: &str = "crash";
/// Keys of one file: `k000` .. `k299`.
const KEYS: u64 = 300;
/// Worker threads in the child.
const THREADS: u64 = 4;
/// Records never die during the test.
const TTL: Duration = Duration::from_secs(1000 * 24 * 3600);
const LEASE: Duration = Duration::from_secs(60);
/// Clock time between two children: every lease of the previous child has run out, so the
/// next child takes over what was left in flight.
const STEP: Duration = Duration::from_secs(120);
const BASE_SECS: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// What both sides compute the same way

fn id(k: u64) -> String {
    format!("k{k:03}")
}

fn key(id: &str) -> Key {
    Key::new(SCOPE, id).expect("valid key")
}

fn fp(id: &str) -> Fingerprint {
    Fingerprint::builder()
        .part(b"crash")
        .part(id.as_bytes())
        .finish()
}

fn mix(id: &str, token: u64) -> u64 {
    let mut h = token ^ 0xA076_1D64_78BD_642F;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01B3);
    }
    h
}

/// The only response the holder of `token` on `id` ever completes with: it names key and
/// token, then 0–599 pseudo-random bytes (binary, so byte-for-byte comparison matters).
fn response(id: &str, token: u64) -> Vec<u8> {
    let mut out = format!("resp {id} {token} ").into_bytes();
    let mut rng = rng(mix(id, token));
    let len = rng.random_range(0..600);
    out.extend((0..len).map(|_| (rng.random::<u64>() >> 32) as u8));
    out
}

/// The `seq`-th checkpoint the holder of `token` on `id` stores.
fn checkpoint(id: &str, token: u64, seq: u64) -> Vec<u8> {
    format!("cp {id} {token} {seq}").into_bytes()
}

/// `(id, token, seq)` of a checkpoint written by [`checkpoint`].
fn parse_checkpoint(bytes: &[u8]) -> Option<(String, u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let mut it = s.split(' ');
    if it.next()? != "cp" {
        return None;
    }
    let id = it.next()?.to_owned();
    let token = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    it.next().is_none().then_some((id, token, seq))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn clock_at(secs: u64) -> ManualClock {
    ManualClock::new(UNIX_EPOCH + Duration::from_secs(secs))
}

fn builder(clock: &ManualClock) -> idemstore::Builder {
    Store::builder()
        .ttl(TTL)
        .lease(LEASE)
        .reap_interval(None)
        .durability(Durability::Immediate)
        .clock(clock.clone())
}

// ---------------------------------------------------------------------------------------------
// The child

/// One line on stdout, written whole while holding the lock, then flushed: a line that reached
/// the pipe survives the kill, a partial last line is ignored by the parent.
fn emit(line: std::fmt::Arguments<'_>) {
    let text = format!("{MARK}{line}\n");
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).expect("stdout");
    out.flush().expect("stdout");
}

fn child_worker(store: &Store, seed: u64, keys: u64) -> ! {
    let mut rng = rng(seed);
    loop {
        let id = id(rng.random_range(0..keys));
        let (key, fp) = (key(&id), fp(&id));
        emit(format_args!("b {id}"));
        match store.begin(&key, &fp).expect("begin") {
            Begin::Started(mut lease) => {
                let token = lease.token();
                emit(format_args!("S {id} {token}"));
                for seq in 1..=rng.random_range(0..3) {
                    let cp = checkpoint(&id, token, seq);
                    emit(format_args!("k {id} {token} {seq}"));
                    lease.checkpoint(&cp).expect("checkpoint");
                    emit(format_args!("K {id} {token} {}", hex(&cp)));
                }
                match rng.random_range(0..10) {
                    0..=5 => {
                        let bytes = response(&id, token);
                        emit(format_args!("c {id} {token}"));
                        let done = lease.complete(&bytes).expect("complete");
                        assert_eq!(done.response(), &bytes[..]);
                        assert_eq!(done.token(), token);
                        emit(format_args!("C {id} {token} {}", hex(&bytes)));
                    }
                    6..=7 => {
                        emit(format_args!("a {id} {token}"));
                        lease.abandon().expect("abandon");
                        emit(format_args!("A {id} {token}"));
                    }
                    // Dropped: released, the next begin takes over at once.
                    _ => drop(lease),
                }
            }
            Begin::Replay(done) => {
                assert_eq!(
                    done.response(),
                    &response(&id, done.token())[..],
                    "replay of {id}"
                );
                emit(format_args!("R {id} {}", done.token()));
            }
            Begin::InFlight { .. } => emit(format_args!("I {id}")),
            Begin::Mismatch => panic!("{id}: one fingerprint per key, yet Mismatch"),
        }
    }
}

/// Not a test on its own: the body of the child process. Does nothing unless
/// `IDEMSTORE_CRASH_CHILD` is set. Never returns when it is: it runs until it is killed.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.splitn(4, ',').collect();
    let [seed, clock_secs, keys, path] = parts[..] else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let seed: u64 = seed.parse().expect("seed");
    let clock = clock_at(clock_secs.parse().expect("clock"));
    let keys: u64 = keys.parse().expect("keys");
    let store = builder(&clock).open(path).expect("child: open the store");
    emit(format_args!("READY"));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = &store;
            s.spawn(move || child_worker(store, seed ^ (t + 1).wrapping_mul(0x5851_F42D), keys));
        }
    });
    unreachable!("the workers never return");
}

// ---------------------------------------------------------------------------------------------
// The parent

/// What the log says about one token of one key.
#[derive(Default, Debug)]
struct TokenLog {
    /// `S` seen.
    started: bool,
    /// Checkpoint sequence numbers attempted (`k`) and the last acknowledged (`K`).
    cp_attempted: BTreeSet<u64>,
    cp_acked: u64,
    complete_attempted: bool,
    completed: Option<Vec<u8>>,
    abandon_attempted: bool,
    abandoned: bool,
}

/// The history of one key since the file was created.
#[derive(Default, Debug)]
struct KeyLog {
    tokens: BTreeMap<u64, TokenLog>,
    /// A `begin` on this key was still unanswered when some child was killed: it may have
    /// claimed the key with a token nobody saw.
    unanswered_begin: bool,
    /// Unchecked acknowledgements.
    new_acks: u64,
    /// The token of a completion some child saw replayed (read from committed, hence durable,
    /// state).
    replayed: Option<u64>,
}

#[derive(Default)]
struct History {
    keys: HashMap<String, KeyLog>,
    /// Every token seen in the log or in a stored record.
    max_token: u64,
}

#[derive(Default, Debug)]
struct Figures {
    kills: u64,
    files: u64,
    acks: u64,
    acks_checked: u64,
    completions_replayed: u64,
    checks: u64,
    already_open_checks: u64,
    child_recoveries: u64,
    kills_before_open_returned: u64,
    lines: u64,
}

impl History {
    fn key(&mut self, id: &str) -> &mut KeyLog {
        self.keys.entry(id.to_owned()).or_default()
    }

    /// Takes in the complete lines of one child run.
    fn absorb(&mut self, lines: &[String], figures: &mut Figures) {
        // begin intents minus answers, per key, within this run.
        let mut open_begins: HashMap<String, i64> = HashMap::new();
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad line {line:?}"))
            };
            let ack = matches!(f[0], "S" | "K" | "C" | "A");
            if ack {
                figures.acks += 1;
            }
            if f[0] == "READY" {
                continue;
            }
            let id = (*f.get(1).unwrap_or_else(|| panic!("bad line {line:?}"))).to_owned();
            match f[0] {
                "b" => *open_begins.entry(id.clone()).or_default() += 1,
                "R" | "I" => *open_begins.entry(id.clone()).or_default() -= 1,
                _ => {}
            }
            if f[0] == "S" {
                *open_begins.entry(id.clone()).or_default() -= 1;
            }
            if matches!(f[0], "b" | "I") {
                continue;
            }
            let token = num(2);
            self.max_token = self.max_token.max(token);
            let k = self.key(&id);
            if ack {
                k.new_acks += 1;
            }
            if f[0] == "R" {
                assert!(
                    k.replayed.is_none_or(|t| t == token),
                    "{id}: replays of two different completions"
                );
                k.replayed = Some(token);
                continue;
            }
            let t = k.tokens.entry(token).or_default();
            match f[0] {
                "S" => {
                    assert!(!t.started, "{id}: token {token} started twice");
                    t.started = true;
                }
                "k" => {
                    assert!(t.started, "{id}: checkpoint of a token never started");
                    t.cp_attempted.insert(num(3));
                }
                "K" => {
                    let bytes = unhex(f[3]).expect("hex");
                    let (cid, ctoken, seq) = parse_checkpoint(&bytes).expect("checkpoint bytes");
                    assert_eq!((cid.as_str(), ctoken), (id.as_str(), token));
                    assert!(
                        seq > t.cp_acked,
                        "{id}/{token}: checkpoints acknowledged in order"
                    );
                    t.cp_acked = seq;
                }
                "c" => t.complete_attempted = true,
                "C" => {
                    let bytes = unhex(f[3]).expect("hex");
                    assert_eq!(bytes, response(&id, token), "{id}/{token}: acked bytes");
                    t.completed = Some(bytes);
                }
                "a" => t.abandon_attempted = true,
                "A" => t.abandoned = true,
                other => panic!("unknown line kind {other:?} in {line:?}"),
            }
        }
        for (id, open) in open_begins {
            assert!(open >= 0, "{id}: more answers than begins");
            if open > 0 {
                self.key(&id).unanswered_begin = true;
            }
        }
    }

    /// Reopens the file and checks every key of the history against it.
    fn check(&mut self, path: &Path, clock_secs: u64, figures: &mut Figures) {
        let clock = clock_at(clock_secs);
        let store = builder(&clock)
            .open(path)
            .unwrap_or_else(|e| panic!("reopen after the kill: {e}"));
        let mut max_seen = self.max_token;
        // Every key a child may use, touched or not: a record without history fails too.
        for k in 0..KEYS {
            let id = &id(k);
            let log = self.keys.entry(id.clone()).or_default();
            let entry = store
                .get(&key(id))
                .unwrap_or_else(|e| panic!("{id}: get: {e}"));
            if let Some(t) = check_key(id, log, entry.as_ref()) {
                max_seen = max_seen.max(t);
            }
            if let Some(Entry::Completed(done)) = &entry {
                // Read-only: a completed record answers Replay, byte for byte.
                match store
                    .begin(&key(id), &fp(id))
                    .expect("begin on a completed key")
                {
                    Begin::Replay(again) => {
                        assert_eq!(again.response(), done.response(), "{id}: replay");
                        assert_eq!(again.token(), done.token(), "{id}: replay token");
                    }
                    other => panic!("{id}: completed, yet begin answered {other:?}"),
                }
                if log.tokens.values().any(|t| t.completed.is_some()) {
                    figures.completions_replayed += 1;
                }
            }
            figures.acks_checked += std::mem::take(&mut log.new_acks);
        }
        // Tokens rise across the crash.
        let probe = format!("probe-{clock_secs}");
        match store.begin(&key(&probe), &fp(&probe)).expect("probe begin") {
            Begin::Started(lease) => {
                assert!(
                    lease.token() > max_seen,
                    "token {} granted after the reopen, {max_seen} seen before",
                    lease.token()
                );
                self.max_token = lease.token();
                lease.abandon().expect("abandon the probe");
            }
            other => panic!("a fresh key must start, got {other:?}"),
        }
        store.close().expect("close after the check");
        figures.checks += 1;
    }
}

/// Checks one key's stored state against its history; returns the stored token.
fn check_key(id: &str, log: &KeyLog, entry: Option<&Entry>) -> Option<u64> {
    let completed: Vec<(&u64, &Vec<u8>)> = log
        .tokens
        .iter()
        .filter_map(|(t, l)| l.completed.as_ref().map(|b| (t, b)))
        .collect();
    assert!(
        completed.len() <= 1,
        "{id}: two completions acknowledged (a completed record was replaced): {completed:?}"
    );
    // The latest acknowledged claim and what happened to it.
    let last = log.tokens.iter().rev().find(|(_, t)| t.started);
    match entry {
        None => {
            assert!(completed.is_empty(), "{id}: acknowledged completion lost");
            assert_eq!(log.replayed, None, "{id}: a replayed completion was lost");
            if let Some((token, t)) = last {
                assert!(
                    t.abandon_attempted,
                    "{id}: acknowledged Started (token {token}) lost: absent, and no abandon \
                     was attempted; log {t:?}"
                );
            }
            None
        }
        Some(Entry::Completed(done)) => {
            let token = done.token();
            if let Some(seen) = log.replayed {
                assert_eq!(
                    token, seen,
                    "{id}: the completion a child saw replayed was replaced"
                );
            }
            assert_eq!(
                done.response(),
                &response(id, token)[..],
                "{id}: stored completion (token {token}) has bytes never attempted"
            );
            let t = log.tokens.get(&token);
            assert!(
                t.is_some_and(|t| t.started && t.complete_attempted),
                "{id}: completion by token {token} that no acknowledged holder attempted"
            );
            if let Some((acked, bytes)) = completed.first() {
                assert_eq!(**acked, token, "{id}: acknowledged completion replaced");
                assert_eq!(done.response(), &bytes[..], "{id}: replay differs");
            }
            if let Some((last_token, _)) = last {
                assert!(
                    token >= *last_token,
                    "{id}: completed by {token}, older than the acknowledged claim {last_token}"
                );
            }
            Some(token)
        }
        Some(Entry::InFlight {
            token, checkpoint, ..
        }) => {
            let token = *token;
            assert!(completed.is_empty(), "{id}: acknowledged completion undone");
            assert_eq!(log.replayed, None, "{id}: a replayed completion was undone");
            match last {
                Some((last_token, t)) if token == *last_token => {
                    assert!(!t.abandoned, "{id}: acknowledged abandon of {token} undone");
                }
                Some((last_token, _)) if token < *last_token => {
                    panic!("{id}: in flight under {token}, older than the acked {last_token}")
                }
                _ => assert!(
                    log.unanswered_begin,
                    "{id}: in flight under token {token} that no begin could have claimed \
                     (acked claims: {:?})",
                    log.tokens.keys().collect::<Vec<_>>()
                ),
            }
            check_checkpoint(id, log, token, checkpoint.as_deref());
            Some(token)
        }
    }
}

/// The checkpoint of an in-flight record under `token`: the last one acknowledged by its
/// holder or a later attempted one, or, if the holder acknowledged none, one inherited by the
/// takeover from an earlier holder who attempted it (or none at all).
fn check_checkpoint(id: &str, log: &KeyLog, token: u64, stored: Option<&[u8]>) {
    let own = log.tokens.get(&token);
    let acked = own.map_or(0, |t| t.cp_acked);
    let Some(bytes) = stored else {
        assert_eq!(
            acked, 0,
            "{id}/{token}: acknowledged checkpoint {acked} lost"
        );
        return;
    };
    let (cid, writer, seq) = parse_checkpoint(bytes)
        .unwrap_or_else(|| panic!("{id}: checkpoint bytes never attempted: {bytes:?}"));
    assert_eq!(cid, id, "{id}: checkpoint of another key");
    assert!(
        writer <= token,
        "{id}: checkpoint of a later token {writer}"
    );
    let w = log
        .tokens
        .get(&writer)
        .unwrap_or_else(|| panic!("{id}: checkpoint by token {writer}, never started"));
    assert!(
        w.cp_attempted.contains(&seq),
        "{id}: checkpoint {writer}/{seq} never attempted"
    );
    if writer == token {
        assert!(
            seq >= acked,
            "{id}/{token}: checkpoint {seq} older than acked {acked}"
        );
    } else {
        assert_eq!(
            acked, 0,
            "{id}/{token}: holds an inherited checkpoint, its own acknowledged one is lost"
        );
    }
}

/// A running child and the lines it printed so far.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
    stderr: PathBuf,
}

fn spawn_child(seed: u64, clock_secs: u64, path: &Path, stderr: &Path) -> Run {
    let err = std::fs::File::create(stderr).expect("stderr file");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("{seed},{clock_secs},{KEYS},{}", path.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let (rx, reader) = marked_lines(stdout, MARK);
    Run {
        child,
        lines: rx,
        reader,
        stderr: stderr.to_owned(),
    }
}

impl Run {
    fn fail(mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        panic!("{why}; child stderr:\n{err}");
    }

    /// Waits for `READY`; returns the lines read so far.
    fn wait_ready(self) -> (Run, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = line == "READY";
                    lines.push(line);
                    if ready {
                        return (self, lines);
                    }
                }
                Err(_) => self.fail("the child did not open the store"),
            }
        }
    }

    /// SIGKILLs the child (it must still be running) and returns every complete line.
    fn kill(mut self, mut lines: Vec<String>) -> Vec<String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(&format!("the child died by itself ({status})"));
        }
        self.child.kill().expect("kill the child");
        let status = self.child.wait().expect("wait for the child");
        assert!(!status.success(), "killed child reported success");
        self.reader.join().expect("reader thread");
        lines.extend(self.lines.try_iter());
        lines
    }
}

fn already_open(path: &Path, clock_secs: u64) {
    match builder(&clock_at(clock_secs)).open(path) {
        Err(Error::AlreadyOpen { path: p }) => assert_eq!(p, path),
        Ok(_) => panic!("opened a file that a live child has open"),
        Err(e) => panic!("expected AlreadyOpen while the child lives, got {e:?}"),
    }
}

fn seed() -> u64 {
    std::env::var("IDEMSTORE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        })
}

fn crash_loop(kills: u64) {
    let seed = seed();
    println!("crash test: seed {seed} (IDEMSTORE_CRASH_SEED), {kills} kills");
    let started = Instant::now();
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = dir.path().join("child.stderr");
    let mut figures = Figures::default();
    let mut history = History::default();
    let mut path = PathBuf::new();
    let mut clock_secs = BASE_SECS;
    let mut unchecked = false;
    for i in 0..kills {
        // A fresh file at first and now and then; otherwise state accumulates.
        if i == 0 || rng.random_range(0..12) == 0 {
            if unchecked {
                history.check(&path, clock_secs, &mut figures);
            }
            figures.files += 1;
            path = dir.path().join(format!("crash-{}.redb", figures.files));
            history = History::default();
            unchecked = false;
        }
        clock_secs += STEP.as_secs();
        if unchecked {
            figures.child_recoveries += 1;
        }
        // Now and then, on a file that exists, kill without waiting for the open: the child may
        // still be starting, opening, or recovering the file the previous child crashed.
        let early = path.exists() && rng.random_range(0..8) == 0;
        let run = spawn_child(rng.random::<u64>(), clock_secs, &path, &stderr);
        let (run, lines, wait) = if early {
            (
                run,
                Vec::new(),
                Duration::from_millis(rng.random_range(0..10)),
            )
        } else {
            let (run, lines) = run.wait_ready();
            (
                run,
                lines,
                Duration::from_millis(5 + rng.random_range(0..46)),
            )
        };
        let t0 = Instant::now();
        if !early && i % 4 == 1 {
            already_open(&path, clock_secs);
            figures.already_open_checks += 1;
        }
        std::thread::sleep(wait.saturating_sub(t0.elapsed()));
        let lines = run.kill(lines);
        figures.kills += 1;
        if early && !lines.iter().any(|l| l == "READY") {
            figures.kills_before_open_returned += 1;
        }
        figures.lines += lines.len() as u64;
        history.absorb(&lines, &mut figures);
        clock_secs += STEP.as_secs();
        // Mostly check at once; sometimes let the next child recover the crashed file.
        if rng.random_range(0..4) == 0 && i + 1 < kills {
            unchecked = true;
        } else {
            history.check(&path, clock_secs, &mut figures);
            unchecked = false;
        }
    }
    assert_eq!(
        figures.acks, figures.acks_checked,
        "every acknowledgement checked"
    );
    println!(
        "crash test: {} kills on {} files, {} acknowledgements checked ({} lines), {} \
         completion replays, {} reopen checks, {} AlreadyOpen checks, {} crashed files \
         recovered by the next child, {} kills before the child's open returned, {:.1} s",
        figures.kills,
        figures.files,
        figures.acks_checked,
        figures.lines,
        figures.completions_replayed,
        figures.checks,
        figures.already_open_checks,
        figures.child_recoveries,
        figures.kills_before_open_returned,
        started.elapsed().as_secs_f64()
    );
    assert!(figures.kills >= kills);
    assert!(
        figures.acks_checked > kills,
        "the children acknowledged too little to test anything"
    );
}

fn kills_from_env(default: u64) -> u64 {
    std::env::var("IDEMSTORE_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    crash_loop(kills_from_env(200));
}

#[test]
#[ignore = "long: 2,000 kills (cargo test --test crash -- --ignored)"]
fn sigkill_at_random_moments_loses_no_acknowledged_write_long() {
    crash_loop(kills_from_env(2000));
}
