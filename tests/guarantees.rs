//! The guarantees: durability across close/reopen and across a process crash, rising tokens,
//! stored deadlines, no early deletion, replay fidelity, mutual exclusion, refusal of a file
//! open in another process, and the auto traits. Each test runs on every engine that
//! has what it checks (`memory::`, `redb::`, `postgres::` in the test names; see the list at
//! the end); the few that are about redb's file stay plain tests, each saying why.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use idemstore::{Begin, Clock, Completed, Durability, Error, Key, Lease, Store};
use idemstore_testkit::engine::Place;
use idemstore_testkit::rng::noise;
use idemstore_testkit::store::*;

const NS: Duration = Duration::from_nanos(1);

// ---------------------------------------------------------------------------------------------
// Auto traits (Send, Sync, Clone as documented)

fn store_lease_and_completed_have_the_promised_auto_traits(place: &Place) {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    clone_send_sync::<Store>();
    clone_send_sync::<Completed>();
    send::<Lease>();
    clone_send_sync::<idemstore::ManualClock>();
    clone_send_sync::<Key>();
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    error::<Error>();

    // And a lease really can move to another thread and finish there.
    let t = open(place, |b| b);
    let lease = started(&t.store, &key("moved"), &fp("b"));
    let done = std::thread::spawn(move || lease.complete(b"from another thread"))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(done.response(), b"from another thread");
    t.store.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Durability (the engines that keep data across a close)

fn completed_and_in_flight_records_survive_close_and_reopen(place: &Place) {
    let mut t = open(place, |b| b);
    let f = fp("body");
    let (ka, kb, kc, kd) = (key("a"), key("b"), key("c"), key("d"));
    let response = noise(10_000, 9);

    let done = started(&t.store, &ka, &f).complete(&response).unwrap();
    let mut held = started(&t.store, &kb, &f);
    held.checkpoint(b"\x00cp\xff").unwrap();
    held.extend(Duration::from_secs(120)).unwrap();
    let held_token = held.token();
    let held_view = get_in_flight(&t.store, &kb);
    started(&t.store, &kc, &f).abandon().unwrap();
    let released = started(&t.store, &kd, &f);
    let released_token = released.token();
    drop(released);
    let released_view = get_in_flight(&t.store, &kd);

    t.reopen();
    let store = &t.store;
    // Completed: replayed byte for byte, with the same metadata.
    assert_eq!(replay(store, &ka, &f), done);
    // In flight: same token, lease end, attempt and checkpoint.
    assert_eq!(get_in_flight(store, &kb), held_view);
    assert_eq!(held_view.token, held_token);
    assert_eq!(in_flight(store, &kb, &f), Duration::from_secs(120));
    // Abandoned: absent.
    assert_eq!(store.get(&kc).unwrap(), None);
    // Released: taken over at once.
    assert_eq!(get_in_flight(store, &kd), released_view);
    let rec = started(store, &kd, &f);
    assert_eq!(rec.recovered().unwrap().previous_token(), released_token);
    rec.complete(b"d").unwrap();

    // The lease held across the reopen belongs to the closed store.
    assert!(matches!(held.checkpoint(b"x"), Err(Error::Closed)));
    drop(held);
    // Its record runs out as after a crash, and the recovery point is handed over.
    t.clock.advance(Duration::from_secs(120));
    let next = started(&t.store, &kb, &f);
    let rec = next.recovered().unwrap();
    assert_eq!(
        (rec.previous_token(), rec.attempt(), rec.checkpoint()),
        (held_token, 2, Some(&b"\x00cp\xff"[..]))
    );
    assert!(next.token() > held_token);
    next.complete(b"b").unwrap();
    t.store.clone().close().unwrap();
}

fn tokens_rise_strictly_across_reopens(place: &Place) {
    let mut t = open(place, |b| b);
    let f = fp("body");
    let mut last = 0;
    for round in 0..4 {
        for i in 0..3 {
            let l = started(&t.store, &key(&format!("r{round}-{i}")), &f);
            assert!(l.token() > last, "round {round}: {} <= {last}", l.token());
            last = l.token();
            match i {
                0 => drop(l.complete(b"x").unwrap()),
                1 => l.abandon().unwrap(), // the highest token's record may be gone
                _ => drop(l),
            }
        }
        // Deleting every record must not reset the counter either.
        t.clock.advance(TTL + LEASE);
        t.store.reap().unwrap();
        t.reopen();
    }
    let l = started(&t.store, &key("final"), &f);
    assert!(l.token() > last);
    l.abandon().unwrap();
    t.store.clone().close().unwrap();
}

// redb only: `Durability` is redb's fsync setting (PostgreSQL commits with the server's own).
#[test]
fn durability_none_still_persists_after_a_clean_close() {
    let place = Place::new(idemstore_testkit::engine::Engine::Redb).expect("a redb place");
    let mut t = open(&place, |b| b.durability(Durability::None));
    let f = fp("body");
    let done = started(&t.store, &key("n1"), &f).complete(b"kept").unwrap();
    let mut l = started(&t.store, &key("n2"), &f);
    l.checkpoint(b"cp").unwrap();
    let token = l.token();
    std::mem::forget(l);
    let before = get_in_flight(&t.store, &key("n2"));

    t.reopen_with(|b| b.durability(Durability::None));
    assert_eq!(replay(&t.store, &key("n1"), &f), done);
    assert_eq!(get_in_flight(&t.store, &key("n2")), before);
    let next = started(&t.store, &key("n3"), &f);
    assert!(next.token() > token, "clean close keeps the token counter");
    next.complete(b"3").unwrap();

    // And an Immediate store reads what a None store wrote.
    t.reopen();
    assert_eq!(replay(&t.store, &key("n3"), &f).response(), b"3");
    t.store.clone().close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Crash of the process (a child process that aborts), and a file open in another process

const CHILD_ENV: &str = "IDEMSTORE_TEST_CHILD";
const CHILD_PATH_ENV: &str = "IDEMSTORE_TEST_CHILD_PATH";

/// Not a test on its own: the body of the child process the tests below start. It does
/// nothing unless the environment asks for a role. redb only (as the two tests below): a
/// process that owns a store file, aborted or holding the file's lock.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let path = std::env::var(CHILD_PATH_ENV).unwrap();
    let clock = clock();
    let store = builder(&clock).open(&path).unwrap();
    let f = fp("body");
    let mut out = std::io::stdout();
    match role.as_str() {
        "crash" => {
            let done = started(&store, &key("crash-done"), &f)
                .complete(&noise(4096, 77))
                .unwrap();
            let mut l = started(&store, &key("crash-held"), &f);
            l.checkpoint(b"child checkpoint").unwrap();
            writeln!(out, "child-done-token {}", done.token()).unwrap();
            writeln!(out, "child-held-token {}", l.token()).unwrap();
            out.flush().unwrap();
            // Die without closing anything, without dropping the lease.
            std::process::abort();
        }
        "hold" => {
            writeln!(out, "child-ready").unwrap();
            out.flush().unwrap();
            // Keep the file open until the parent closes our stdin.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            store.close().unwrap();
        }
        other => panic!("unknown child role {other}"),
    }
}

fn child(role: &str, path: &std::path::Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_process_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, role)
    .env(CHILD_PATH_ENV, path)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    cmd
}

// redb only: a process owning a store file aborts.
#[test]
fn acknowledged_writes_survive_a_process_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let output = child("crash", &path).output().unwrap();
    assert!(!output.status.success(), "the child aborts");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let token = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.split_once(name).map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("child said: {stdout}"))
            .trim()
            .parse()
            .unwrap()
    };
    let (done_token, held_token) = (token("child-done-token "), token("child-held-token "));

    let clock = clock();
    let store = builder(&clock).open(&path).unwrap();
    let f = fp("body");
    let done = replay(&store, &key("crash-done"), &f);
    assert_eq!(done.response(), &noise(4096, 77)[..]);
    assert_eq!(done.token(), done_token);
    let held = get_in_flight(&store, &key("crash-held"));
    assert_eq!(held.token, held_token);
    assert_eq!(held.checkpoint.as_deref(), Some(&b"child checkpoint"[..]));
    // The crashed holder's lease is live until it runs out; then it is taken over.
    assert_eq!(in_flight(&store, &key("crash-held"), &f), LEASE);
    clock.advance(LEASE);
    let next = started(&store, &key("crash-held"), &f);
    let rec = next.recovered().unwrap();
    assert_eq!(rec.previous_token(), held_token);
    assert_eq!(rec.checkpoint(), Some(&b"child checkpoint"[..]));
    assert!(next.token() > held_token, "tokens rise across a crash");
    next.complete(b"recovered").unwrap();
    store.close().unwrap();
}

// redb only: the lock of a store file held by another process.
#[test]
fn a_file_open_in_another_process_is_already_open_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.redb");
    let mut proc = child("hold", &path).spawn().unwrap();
    let mut stdout = BufReader::new(proc.stdout.take().unwrap());
    // The test harness prints its own lines first.
    let mut line = String::new();
    while !line.contains("child-ready") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the child exited early"
        );
    }

    let before = std::fs::read(&path).unwrap();
    let result = builder(&clock()).open(&path);
    let after = std::fs::read(&path).unwrap();
    drop(proc.stdin.take()); // let the child close and exit
    assert!(proc.wait().unwrap().success());
    match result {
        Err(Error::AlreadyOpen { path: p }) => assert_eq!(p, path),
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    assert!(before == after, "the refused open must not modify the file");

    // Once the other process closed it, it opens.
    builder(&clock()).open(&path).unwrap().close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Deadlines are stored

fn reopening_with_another_ttl_and_lease_changes_only_later_writes(place: &Place) {
    let mut t = open(place, |b| b);
    let f = fp("body");
    let t0 = t.clock.now();
    let done = started(&t.store, &key("old-done"), &f)
        .complete(b"old")
        .unwrap();
    assert_eq!(done.expires_at(), t0 + TTL);
    std::mem::forget(started(&t.store, &key("old-inflight"), &f));

    let (short_ttl, short_lease) = (Duration::from_secs(10), Duration::from_secs(5));
    t.reopen_with(|b| b.ttl(short_ttl).lease(short_lease));
    let store = &t.store;
    assert_eq!(
        get_completed(store, &key("old-done")).expires_at(),
        t0 + TTL
    );
    let e = get_in_flight(store, &key("old-inflight"));
    assert_eq!(
        (e.lease_expires_at, e.expires_at),
        (t0 + LEASE, t0 + TTL),
        "stored deadlines are kept"
    );
    assert_eq!(in_flight(store, &key("old-inflight"), &f), LEASE);

    // Later writes use the new settings.
    let l = started(store, &key("new"), &f);
    assert_eq!(l.expires_at(), t0 + short_lease);
    let new_done = l.complete(b"new").unwrap();
    assert_eq!(new_done.expires_at(), t0 + short_ttl);

    // Well past the new ttl, the old records live on with their own deadlines.
    t.clock.advance(TTL / 2);
    assert_eq!(t.store.get(&key("new")).unwrap(), None);
    assert_eq!(replay(&t.store, &key("old-done"), &f).response(), b"old");
    // A takeover of the old in-flight record gets the new lease but keeps its ttl deadline.
    let now = t.clock.now();
    let l = started(&t.store, &key("old-inflight"), &f);
    assert_eq!(l.expires_at(), now + short_lease);
    assert_eq!(
        get_in_flight(&t.store, &key("old-inflight")).expires_at,
        t0 + TTL
    );
    std::mem::forget(l);
    assert_eq!(
        t.store.reap().unwrap(),
        1,
        "only the new, short-lived record"
    );

    // Reopen with a very long ttl: records written before still die at their stored time.
    t.reopen_with(|b| b.ttl(TTL * 100));
    t.clock.set(t0 + TTL - NS);
    assert!(t.store.get(&key("old-done")).unwrap().is_some());
    t.clock.set(t0 + TTL);
    assert_eq!(t.store.get(&key("old-done")).unwrap(), None);
    assert_eq!(t.store.get(&key("old-inflight")).unwrap(), None);
    assert_eq!(t.store.reap().unwrap(), 2);
    t.store.clone().close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// No lost keys, no resurrected keys

/// Builds `n` records with varied deadlines; returns each key with its death time.
fn varied_records(t: &TestStore, n: usize) -> Vec<(Key, std::time::SystemTime)> {
    let store = &t.store;
    let f = fp("body");
    let mut out = Vec::new();
    let jitter = noise(n, 5);
    for (i, j) in jitter.iter().enumerate() {
        let k = key(&format!("v{i}"));
        let step = Duration::from_secs(u64::from(*j) % 40 + 1);
        t.clock.advance(step);
        let mut l = started(store, &k, &f);
        match i % 5 {
            0 => drop(l.complete(b"c").unwrap()),
            1 => std::mem::forget(l),
            2 => {
                l.extend(TTL + step * 7).unwrap();
                std::mem::forget(l);
            }
            3 => {
                t.clock.advance(step);
                drop(l.complete(b"late").unwrap());
            }
            _ => drop(l), // released
        }
        let dies = match store.get(&k).unwrap().unwrap() {
            idemstore::Entry::Completed(c) => c.expires_at(),
            idemstore::Entry::InFlight { expires_at, .. } => expires_at,
        };
        out.push((k, dies));
    }
    out
}

fn a_record_is_never_deleted_before_it_is_dead(place: &Place) {
    with_store(place, |t| {
        let records = varied_records(t, 30);
        let mut deaths: Vec<_> = records.iter().map(|(_, d)| *d).collect();
        deaths.sort();
        deaths.dedup();
        let mut reaped = 0;
        for death in deaths {
            // Just before this death time, and at it.
            for now in [death - NS, death] {
                if now < t.clock.now() {
                    continue;
                }
                t.clock.set(now);
                reaped += t.store.reap().unwrap();
                for (k, dies) in &records {
                    let alive = t.store.get(k).unwrap().is_some();
                    assert_eq!(alive, now < *dies, "{:?} {k:?} at {now:?}", t.engine);
                }
            }
        }
        assert_eq!(
            reaped,
            records.len() as u64,
            "every record died and was reaped"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Replay fidelity

fn replays_return_exactly_the_completed_bytes(place: &Place) {
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let mebibyte = noise(1 << 20, 1234);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("zero", vec![0]),
        ("all-bytes", all_bytes),
        (
            "crlf",
            b"HTTP/1.1 201 Created\r\n\r\n{\"id\":1}\r\n".to_vec(),
        ),
        ("invalid-utf8", vec![0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1]),
        ("mebibyte", mebibyte),
    ];
    with_store(place, |t| {
        let f = fp("body");
        for (name, bytes) in &cases {
            let k = key(name);
            let mut l = started(&t.store, &k, &f);
            l.checkpoint(bytes).unwrap();
            let done = l.complete(bytes).unwrap();
            assert!(done.response() == &bytes[..], "{name}: complete");
            for _ in 0..2 {
                let r = replay(&t.store, &k, &f);
                assert!(r.response() == &bytes[..], "{:?} {name}: replay", t.engine);
                assert_eq!(r.response().len(), bytes.len());
            }
            assert!(get_completed(&t.store, &k).into_response() == *bytes);
        }
        if t.engine.durable() {
            t.reopen();
            for (name, bytes) in &cases {
                let r = replay(&t.store, &key(name), &f);
                assert!(r.response() == &bytes[..], "{name}: replay after reopen");
            }
        }
        // Checkpoints are handed over exactly as well.
        for (name, bytes) in &cases {
            let k = Key::new("checkpoints", name).unwrap();
            let mut l = started(&t.store, &k, &f);
            l.checkpoint(bytes).unwrap();
            drop(l);
            let next = started(&t.store, &k, &f);
            assert!(next.recovered().unwrap().checkpoint() == Some(&bytes[..]));
            next.abandon().unwrap();
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion

fn at_most_one_live_lease_per_key_across_threads(place: &Place) {
    const THREADS: usize = 8;
    with_store(place, |t| {
        let f = fp("body");
        let k = key("contended");
        for round in 0..4 {
            let barrier = Arc::new(Barrier::new(THREADS));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (store, k, barrier) = (t.store.clone(), k.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        match store.begin(&k, &f).unwrap() {
                            Begin::Started(l) => {
                                let token = l.token();
                                std::mem::forget(l); // hold it: nobody else may get one
                                Some(token)
                            }
                            Begin::InFlight { .. } => None,
                            other => panic!("unexpected {other:?}"),
                        }
                    })
                })
                .collect();
            let winners: Vec<u64> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(
                winners.len(),
                1,
                "{:?} round {round}: {winners:?}",
                t.engine
            );
            // Let that lease run out: the next round races for the takeover.
            t.clock.advance(LEASE);
        }
        let e = get_in_flight(&t.store, &k);
        assert_eq!(e.attempt, 4);
        let s = t.store.stats();
        assert_eq!((s.started, s.takeovers), (4, 3));
        assert_eq!(s.in_flight_conflicts, 4 * (THREADS as u64 - 1));
    });
}

idemstore_testkit::engine_tests! {
    every:
        store_lease_and_completed_have_the_promised_auto_traits,
        a_record_is_never_deleted_before_it_is_dead,
        replays_return_exactly_the_completed_bytes,
        at_most_one_live_lease_per_key_across_threads,
    ;
    durable:
        completed_and_in_flight_records_survive_close_and_reopen,
        tokens_rise_strictly_across_reopens,
        reopening_with_another_ttl_and_lease_changes_only_later_writes,
    ;
}
