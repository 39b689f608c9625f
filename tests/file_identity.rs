//! The file is ours: a store whose file was unlinked, or replaced by another file renamed over
//! its path, stops acknowledging writes within one commit. The write of that commit went into
//! a file no one will open again, so its callers get an unknown-outcome error, the store
//! refuses every later write until it is reopened, and reads go on. A second open of the path
//! is a new, independent store: one key is never `Started` in both.
//!
//! And no false alarm: a store opened through a relative path or a symbolic link keeps
//! writing after the process changes its working directory.

#![cfg(unix)]

use std::path::Path;

use idemstore::{Begin, Durability, Entry, Error, Store};
use idemstore_testkit::store::*;

/// Every write of `store` is refused, and says why.
#[track_caller]
fn refuses_writes(store: &Store, id: &str) {
    match store.begin(&key(id), &fp(id)) {
        Err(Error::Poisoned | Error::Storage { .. }) => {}
        other => panic!("a store that lost its file acknowledged a write: {other:?}"),
    }
}

/// `store` does not grant `id`: a write is refused, or a read answers (the claim that failed
/// is in flight in the store's own snapshot).
#[track_caller]
fn never_grants(store: &Store, id: &str) {
    if let Ok(Begin::Started(lease)) = store.begin(&key(id), &fp(id)) {
        panic!("a store that lost its file granted {id}: {lease:?}");
    }
}

/// Runs the scenario with `replace` doing something to the file under the running store.
fn lose_the_file(durability: Durability, replace: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let first = builder(&clock).durability(durability).open(&path).unwrap();
    let before = started(&first, &key("before"), &fp("before"))
        .complete(b"kept")
        .unwrap();
    let mut held = started(&first, &key("held"), &fp("held"));

    replace(&path);

    // The next write commits into the lost file: its caller is told the outcome is unknown.
    match first.begin(&key("k"), &fp("k")) {
        Err(e @ Error::Storage { .. }) => {
            let text = e.to_string();
            assert!(text.contains("unknown"), "{text}");
            assert!(text.contains("reopen"), "{text}");
            assert!(matches!(
                e,
                Error::Storage {
                    outcome_unknown: true,
                    ..
                }
            ));
        }
        other => panic!("the first write after the file was lost: {other:?}"),
    }
    // And every later write is refused, a lease's too.
    never_grants(&first, "k");
    refuses_writes(&first, "other");
    refuses_writes(&first, "another");
    assert!(held.checkpoint(b"step").is_err());
    assert!(held.complete(b"late").is_err());
    // Reads go on.
    match first.get(&key("before")).unwrap() {
        Some(Entry::Completed(done)) => assert_eq!(done.response(), before.response()),
        other => panic!("a read of the running store: {other:?}"),
    }

    // A second open of the path is a store of its own: it grants the key the first refused,
    // and the first still refuses it.
    let second = builder(&clock).open(&path).unwrap();
    let lease = started(&second, &key("k"), &fp("k"));
    never_grants(&first, "k");
    refuses_writes(&first, "third");
    lease.complete(b"second").unwrap();
    assert!(matches!(
        second.begin(&key("k"), &fp("k")).unwrap(),
        Begin::Replay(_)
    ));
    second.close().unwrap();
    let _ = first.close();
}

#[test]
fn an_unlinked_file_stops_the_store_acknowledging_writes() {
    for durability in [Durability::Immediate, Durability::None] {
        lose_the_file(durability, |path| std::fs::remove_file(path).unwrap());
    }
}

#[test]
fn a_file_renamed_over_the_path_stops_the_store_acknowledging_writes() {
    for durability in [Durability::Immediate, Durability::None] {
        lose_the_file(durability, |path| {
            // Another store, built beside it and moved over the path.
            let other = path.with_file_name("other.redb");
            let store = builder(&clock()).open(&other).unwrap();
            started(&store, &key("elsewhere"), &fp("elsewhere"))
                .complete(b"other store")
                .unwrap();
            store.close().unwrap();
            std::fs::rename(&other, path).unwrap();
        });
    }
}

#[test]
fn the_renamed_in_file_is_what_a_second_open_sees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.redb");
    let other = dir.path().join("other.redb");
    let first = builder(&clock()).open(&path).unwrap();
    started(&first, &key("mine"), &fp("mine"))
        .complete(b"first")
        .unwrap();
    let store = builder(&clock()).open(&other).unwrap();
    started(&store, &key("theirs"), &fp("theirs"))
        .complete(b"other")
        .unwrap();
    store.close().unwrap();
    std::fs::rename(&other, &path).unwrap();

    refuses_writes(&first, "new");
    let second = builder(&clock()).open(&path).unwrap();
    assert_eq!(second.get(&key("mine")).unwrap(), None);
    assert!(matches!(
        second.get(&key("theirs")).unwrap(),
        Some(Entry::Completed(_))
    ));
    second.close().unwrap();
    let _ = first.close();
}

/// A store that lost its file writes nothing more into the file it opened, not even the key
/// index's snapshot a clean close writes: the store refuses writes until it is reopened.
#[test]
fn a_store_that_lost_its_file_writes_no_snapshot_at_its_close() {
    let (events, _serial) = idemstore_testkit::events::serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.redb");
    let store = builder(&clock()).open(&path).unwrap();
    // Enough records that a clean close writes the index's snapshot.
    for i in 0..1_100 {
        let id = format!("k{i}");
        started(&store, &key(&id), &fp(&id))
            .complete(b"done")
            .unwrap();
    }
    std::fs::remove_file(&path).unwrap();
    assert!(store.begin(&key("lost"), &fp("lost")).is_err());
    refuses_writes(&store, "after");
    events.clear();
    let _ = store.close();
    assert_eq!(
        events
            .latest("key index snapshot written")
            .map(|e| e.text()),
        None,
        "the close wrote a snapshot into the file the store had lost"
    );
}

/// The one test of this binary that changes the working directory; every other test uses
/// absolute paths.
#[test]
fn a_relative_or_symlinked_path_is_no_false_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::os::unix::fs::symlink("data/idem.redb", dir.path().join("link.redb")).unwrap();
    let home = std::env::current_dir().unwrap();

    std::env::set_current_dir(dir.path()).unwrap();
    let relative = builder(&clock()).open("data/idem.redb").unwrap();
    std::env::set_current_dir(elsewhere.path()).unwrap();
    started(&relative, &key("a"), &fp("a"))
        .complete(b"a")
        .unwrap();
    relative.close().unwrap();

    std::env::set_current_dir(dir.path()).unwrap();
    let linked = builder(&clock()).open("link.redb").unwrap();
    std::env::set_current_dir(&home).unwrap();
    started(&linked, &key("b"), &fp("b"))
        .complete(b"b")
        .unwrap();
    assert!(matches!(
        linked.begin(&key("a"), &fp("a")).unwrap(),
        Begin::Replay(_)
    ));
    linked.close().unwrap();
}
