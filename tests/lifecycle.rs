//! A store's life on the embedded engine on a bad day: opens of one path racing in one
//! process (one store, the others `AlreadyOpen`), closes racing closes, writers and a scan's
//! visitor, the last clone dropped while a lease lives; and files cut short, flipped bits and
//! crashes after deletions below the index snapshot (refused or exact, never silently short).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::admin::StoreFile;
use idemstore::{Begin, Entry, Error};
use idemstore_testkit::rng::noise;
use idemstore_testkit::store::*;

fn completed_store(path: &std::path::Path, n: usize) -> Vec<(String, Vec<u8>)> {
    let store = builder(&clock()).open(path).unwrap();
    let mut done = Vec::new();
    for i in 0..n {
        let id = format!("k{i}");
        let body = noise(200, i as u64);
        started(&store, &key(&id), &fp("body"))
            .complete(&body)
            .unwrap();
        done.push((id, body));
    }
    store.close().unwrap();
    done
}

/// A file cut short (a cut copy or upload) opens with every completed record, or is refused;
/// never opens with a completed record silently missing.
/// The completed responses of the file at `path` by id, as the read-only tool sees them
/// (`Err` outside: it panicked).
fn read_only_responses(
    path: &std::path::Path,
) -> std::thread::Result<Result<std::collections::HashMap<String, Vec<u8>>, Error>> {
    std::panic::catch_unwind(|| {
        StoreFile::open(path).and_then(|f| {
            let mut seen = std::collections::HashMap::new();
            f.scan(|r| {
                if let Entry::Completed(c) = &r.entry {
                    seen.insert(r.key.id().to_owned(), c.response().to_vec());
                }
                ControlFlow::Continue(())
            })?;
            Ok(seen)
        })
    })
}

#[test]
fn a_cut_file_is_refused_or_complete_never_silently_short() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.redb");
    let done = completed_store(&src, 1500);
    let bytes = std::fs::read(&src).unwrap();
    eprintln!("file is {} bytes", bytes.len());
    let path = dir.path().join("cut.redb");
    let mut cuts: Vec<usize> = (1..bytes.len()).step_by(bytes.len() / 60 + 1).collect();
    cuts.extend((1..8).map(|k| bytes.len() - k * 4096).filter(|&c| c > 0));
    cuts.push(bytes.len() - 1);
    let mut problems = Vec::new();
    let (mut ro_ok, mut rw_ok) = (0, 0);
    for cut in cuts {
        // Read-only tool.
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let before = std::fs::read(&path).unwrap();
        match read_only_responses(&path) {
            Err(_) => problems.push(format!("cut {cut}: StoreFile panicked")),
            Ok(Ok(seen)) => {
                ro_ok += 1;
                let missing = done
                    .iter()
                    .filter(|(id, b)| seen.get(id) != Some(b))
                    .count();
                if missing > 0 {
                    problems.push(format!(
                        "cut {cut}: StoreFile scan misses {missing} completed records"
                    ));
                }
            }
            Ok(Err(_)) => {}
        }
        if std::fs::read(&path).unwrap() != before {
            problems.push(format!("cut {cut}: StoreFile modified the file"));
        }
        // Read-write open.
        match std::panic::catch_unwind(|| builder(&clock()).open(&path)) {
            Err(_) => problems.push(format!("cut {cut}: Store::open panicked")),
            Ok(Ok(store)) => {
                rw_ok += 1;
                let mut missing = 0;
                for (id, body) in &done {
                    match store.get(&key(id)) {
                        Ok(Some(Entry::Completed(c))) if c.response() == body.as_slice() => {}
                        _ => missing += 1,
                    }
                }
                if missing > 0 {
                    problems.push(format!(
                        "cut {cut}: Store::open misses {missing} completed records"
                    ));
                }
                let _ = store.close();
            }
            Ok(Err(_)) => {}
        }
    }
    eprintln!("read-only opened {ro_ok}, read-write opened {rw_ok}");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// close() racing with begin/complete on other threads: no hang, no panic; a call made
/// after close returned is Closed; every acknowledged completion is there after a reopen.
#[test]
fn close_racing_with_writers_acknowledges_only_durable_writes() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = builder(&clock()).open(&path).unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..4 {
            let store = store.clone();
            let acked = acked.clone();
            let closed = closed.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0.. {
                    let after_close = closed.load(Ordering::SeqCst);
                    let id = format!("t{t}-{i}");
                    let r = store.begin(&key(&id), &fp("b"));
                    match r {
                        Ok(Begin::Started(lease)) => {
                            assert!(!after_close, "begin started after close returned");
                            let after_close = closed.load(Ordering::SeqCst);
                            match lease.complete(id.as_bytes()) {
                                Ok(_) => {
                                    assert!(!after_close, "complete Ok after close returned");
                                    acked.lock().unwrap().push(id);
                                }
                                Err(Error::Closed) => {}
                                Err(e) => panic!("complete: {e:?}"),
                            }
                        }
                        Err(Error::Closed) => return,
                        other => panic!("begin: {other:?}"),
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(5 + round));
        store.close().unwrap();
        closed.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let store = builder(&clock()).open(&path).unwrap();
        for id in acked.lock().unwrap().iter() {
            assert_eq!(replay(&store, &key(id), &fp("b")).response(), id.as_bytes());
        }
        store.close().unwrap();
    }
}

/// The docs: dropping the last clone of a store closes it, and every lease then gets Closed.
#[test]
fn dropping_the_last_store_clone_with_a_lease_alive_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = builder(&clock()).open(&path).unwrap();
    let lease = started(&store, &key("k"), &fp("b"));
    drop(store);
    let again = builder(&clock()).open(&path);
    let lease_result = lease.complete(b"x");
    assert!(
        again.is_ok(),
        "open after the last Store clone was dropped: {:?}; the lease then completed: {:?}",
        again.err(),
        lease_result
    );
    assert!(
        matches!(lease_result, Err(Error::Closed)),
        "a lease of a dropped store: {lease_result:?}"
    );
}

/// Reopening with a smaller max_response_bytes keeps replaying what was stored.
#[test]
fn reopen_with_a_smaller_max_response_still_replays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = builder(&clock()).open(&path).unwrap();
    let mut l = started(&store, &key("cp"), &fp("b"));
    l.checkpoint(&[7u8; 5000]).unwrap();
    std::mem::forget(l);
    started(&store, &key("big"), &fp("b"))
        .complete(&[1u8; 5000])
        .unwrap();
    store.close().unwrap();
    let c = clock();
    let store = builder(&c).max_response_bytes(10).open(&path).unwrap();
    assert_eq!(
        replay(&store, &key("big"), &fp("b")).response(),
        &[1u8; 5000][..]
    );
    c.advance(LEASE + Duration::from_secs(1));
    let l = started(&store, &key("cp"), &fp("b"));
    assert_eq!(l.recovered().unwrap().checkpoint(), Some(&[7u8; 5000][..]));
    drop(l);
    store.close().unwrap();
}

/// Threads of one process opening one missing path at once: one store, the others
/// AlreadyOpen (the file being created is the one every open sees).
#[test]
fn concurrent_opens_of_a_missing_path_in_one_process_are_one_store_and_already_open() {
    let mut problems = Vec::new();
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("s.redb"));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    builder(&clock()).open(&*path)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        for r in &results {
            if let Err(e) = r
                && !matches!(e, Error::AlreadyOpen { .. })
            {
                problems.push(format!("round {round}: {e}"));
            }
        }
        if ok != 1 {
            problems.push(format!("round {round}: {ok} opens succeeded"));
        }
        drop(results);
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// close() on two clones at once: each returns only once the file is released, so an open
/// right after either close succeeds.
#[test]
fn a_close_racing_another_close_returns_only_once_the_file_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let mut problems = Vec::new();
    for round in 0..10 {
        let store = builder(&clock()).open(&path).unwrap();
        // Enough keys that the close writes the index's snapshot (it takes a while).
        if round == 0 {
            for i in 0..1500 {
                started(&store, &key(&format!("k{i}")), &fp("b"))
                    .complete(b"x")
                    .unwrap();
            }
        } else {
            started(&store, &key(&format!("r{round}")), &fp("b"))
                .complete(b"x")
                .unwrap();
        }
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let other = store.clone();
        let b = barrier.clone();
        let t = std::thread::spawn(move || {
            b.wait();
            other.close()
        });
        barrier.wait();
        std::thread::sleep(Duration::from_micros(200));
        store.close().unwrap();
        match builder(&clock()).open(&path) {
            Ok(s) => {
                t.join().unwrap().unwrap();
                s.close().unwrap();
            }
            Err(e) => {
                problems.push(format!(
                    "round {round}: open right after close returned: {e}"
                ));
                t.join().unwrap().unwrap();
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// close() on one thread while another scans and, for each record, reads the store: the
/// scan ends (the reads get an answer or Closed) and close returns; no deadlock.
#[test]
fn close_while_a_scan_reads_the_store_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let store = builder(&clock()).open(dir.path().join("s.redb")).unwrap();
    for i in 0..50 {
        started(&store, &key(&format!("k{i}")), &fp("b"))
            .complete(b"x")
            .unwrap();
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let scanner = store.clone();
    let tx = done_tx.clone();
    std::thread::spawn(move || {
        let r = scanner.scan(|view| {
            std::thread::sleep(Duration::from_millis(2));
            let _ = scanner.get(&view.key);
            ControlFlow::Continue(())
        });
        let _ = tx.send(format!("scan: {r:?}"));
    });
    std::thread::sleep(Duration::from_millis(20));
    std::thread::spawn(move || {
        let r = store.close();
        let _ = done_tx.send(format!("close: {r:?}"));
    });
    for _ in 0..2 {
        let got = done_rx.recv_timeout(Duration::from_secs(10));
        assert!(got.is_ok(), "scan and close deadlocked (no answer in 10 s)");
        eprintln!("{}", got.unwrap());
    }
}

/// The key index's snapshot across crashes: a store with a snapshot (written at a clean close)
/// whose entries below the snapshot's end are abandoned, reaped and claimed again, then
/// crashed (the durable image), opens with exactly the acknowledged state; and so does the
/// image of a crash after that recovered store wrote more.
#[test]
fn a_crash_after_deletions_below_the_snapshot_recovers_exactly_the_acknowledged_state() {
    use idemstore::Store;
    use idemstore_testkit::fault::FaultyBackend;
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let c = clock();
    let n = 1200;
    {
        let store = builder(&c).open(&path).unwrap();
        for i in 0..n {
            let l = started(&store, &key(&format!("k{i}")), &fp("b"));
            if i % 3 == 0 {
                std::mem::forget(l); // in flight, holder gone
            } else {
                l.complete(format!("r{i}").as_bytes()).unwrap();
            }
        }
        store.close().unwrap(); // writes the snapshot (1200 entries)
    }
    // What each key must read as: Some(response) completed, None absent, "inflight".
    let mut expect: HashMap<String, Option<String>> = HashMap::new();
    for i in 0..n {
        let want = if i % 3 == 0 {
            "inflight".to_owned()
        } else {
            format!("r{i}")
        };
        expect.insert(format!("k{i}"), Some(want));
    }
    let check = |store: &Store, expect: &HashMap<String, Option<String>>, what: &str| {
        let mut bad = Vec::new();
        for (id, want) in expect {
            let got = store.get(&key(id)).unwrap();
            let ok = match (want.as_deref(), &got) {
                (Some("inflight"), Some(Entry::InFlight { .. })) => true,
                (Some(r), Some(Entry::Completed(d))) => d.response() == r.as_bytes(),
                (None, None) => true,
                _ => false,
            };
            if !ok {
                bad.push(format!("{id}: want {want:?}, got {got:?}"));
            }
        }
        bad.sort();
        assert!(
            bad.is_empty(),
            "{what}: {} keys wrong: {:#?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
    };
    let image = std::fs::read(&path).unwrap();
    let mut image = image;
    for round in 0..3u64 {
        let (backend, faults) = FaultyBackend::in_memory(&image);
        let store = builder(&c).open_backend(backend).unwrap();
        check(&store, &expect, &format!("round {round} at open"));
        c.advance(LEASE + Duration::from_secs(1));
        if round == 2 {
            // Everything dies; the reaper deletes it (deletions below the snapshot's end).
            c.advance(TTL + LEASE);
            assert!(store.reap().unwrap() > 0);
            for v in expect.values_mut() {
                *v = None;
            }
        }
        for i in 0..n {
            let id = format!("k{i}");
            let k = key(&id);
            match (i + round as usize) % 7 {
                // Take over the stale in-flight ones and abandon them (a deletion below the
                // snapshot's end) or complete them.
                0 | 1 => {
                    if let Ok(Begin::Started(l)) = store.begin(&k, &fp("b")) {
                        if i % 2 == 0 {
                            l.abandon().unwrap();
                            expect.insert(id, None);
                        } else {
                            let r = format!("t{round}-{i}");
                            l.complete(r.as_bytes()).unwrap();
                            expect.insert(id, Some(r));
                        }
                    }
                }
                // Claim again what is absent (a new entry at the log's end), left in flight.
                2 if expect[&id].is_none() => {
                    std::mem::forget(started(&store, &k, &fp("b")));
                    expect.insert(id, Some("inflight".into()));
                }
                _ => {}
            }
        }
        check(&store, &expect, &format!("round {round} before the crash"));
        // The crash: the durable image, the store never closed.
        image = faults.durable();
        std::mem::forget(store);
        let (backend, _) = FaultyBackend::in_memory(&image);
        let again = builder(&c).open_backend(backend).unwrap();
        check(&again, &expect, &format!("round {round} after the crash"));
        // A clean close of the recovered store writes a new snapshot; the next round starts
        // from the image after it.
        let (backend, faults2) = FaultyBackend::in_memory(&image);
        drop(again);
        let recovered = builder(&c).open_backend(backend).unwrap();
        recovered.close().unwrap();
        image = faults2.durable();
    }
}

/// One flipped bit anywhere in a store file: the read-only tools refuse it, or see every
/// completed record with its bytes; never a silently shorter or different scan.
#[test]
fn a_flipped_bit_never_makes_the_read_only_scan_silently_short() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.redb");
    let done = completed_store(&src, 200);
    let bytes = std::fs::read(&src).unwrap();
    let path = dir.path().join("flipped.redb");
    let mut problems = Vec::new();
    let (mut opened, mut tried) = (0, 0);
    let step = (bytes.len() / 4000).max(1);
    for at in (0..bytes.len()).step_by(step) {
        let mut damaged = bytes.clone();
        damaged[at] ^= 1 << (at % 8);
        std::fs::write(&path, &damaged).unwrap();
        tried += 1;
        let result = read_only_responses(&path);
        match result {
            Err(_) => problems.push(format!("byte {at}: panic")),
            Ok(Ok(seen)) => {
                opened += 1;
                let wrong = done
                    .iter()
                    .filter(|(id, b)| seen.get(id) != Some(b))
                    .count();
                if wrong > 0 {
                    let rw = builder(&clock()).open(&path).map(|s| s.close());
                    problems.push(format!(
                        "byte {at}: scan Ok but {wrong} completed records missing or different (Store::open: {})",
                        match rw { Ok(_) => "opens".to_owned(), Err(e) => format!("refused: {e}") }
                    ));
                }
            }
            Ok(Err(_)) => {}
        }
    }
    eprintln!(
        "{tried} flips, {opened} opened read-only, {} problems",
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{:#?}",
        &problems[..problems.len().min(15)]
    );
}
