//! Crafted and damaged files: a lowered token counter never makes a token be granted twice; a
//! duplicated log entry is `Corrupt`, never a second copy that comes back once the first is
//! reaped; a bad entry is reported with its position in the log; an entry moved or rewritten
//! under the index's snapshot is found or refused, never lost; sequence numbers never wrap
//! onto the log's first entries.

use std::path::{Path, PathBuf};

use idemstore::{Durability, Entry, Error};
use idemstore_testkit::store::{builder, clock, fp, key, started};
use redb::{ReadableTable, TableDefinition};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("idemstore_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");

/// A closed store with `n` completed keys `k0..`; returns the directory and the path.
fn store_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let store = builder(&clock()).open(&path).expect("open");
    for i in 0..n {
        started(&store, &key(&format!("k{i}")), &fp("body"))
            .complete(format!("response {i}").as_bytes())
            .expect("complete");
    }
    store.close().expect("close");
    (dir, path)
}

/// Changes the file with redb directly, as a crafted or damaged file would be.
fn edit(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).expect("redb open");
    let txn = db.begin_write().expect("write");
    f(&txn);
    txn.commit().expect("commit");
}

/// The log's entries as (sequence number, bytes).
fn entries(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    edit(path, |txn| {
        let log = txn.open_table(LOG).expect("log");
        for item in log.iter().expect("iter") {
            let (k, v) = item.expect("entry");
            out.push((k.value(), v.value().to_vec()));
        }
    });
    out
}

/// Frames `body` (key length, key, record) with its checksum, as the store does.
fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

fn corrupt_reason(path: &Path) -> String {
    match builder(&clock()).open(path) {
        Err(Error::Corrupt { reason }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_lowered_token_counter_never_makes_a_token_be_granted_twice() {
    let (_dir, path) = store_with(5);
    edit(&path, |txn| {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert("last_token", &0u64.to_be_bytes()[..])
            .expect("lower the counter");
    });
    let store = builder(&clock()).open(&path).expect("open");
    let token = started(&store, &key("new"), &fp("body")).token();
    assert!(
        token > 5,
        "token {token} was granted before (the file holds tokens 1 to 5)"
    );
    store.close().expect("close");
}

#[test]
fn a_duplicated_log_entry_is_corrupt_and_named() {
    let (_dir, path) = store_with(3);
    let all = entries(&path);
    let (seq, bytes) = all[1].clone();
    let copy_at = all.last().expect("entries").0 + 10;
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.insert(copy_at, bytes.as_slice()).expect("duplicate");
    });
    let reason = corrupt_reason(&path);
    assert!(
        reason.contains(&format!("log entries {seq} and {copy_at}")),
        "{reason}"
    );
}

#[test]
fn a_bad_entry_is_reported_with_its_position() {
    let (_dir, path) = store_with(3);
    let (seq, bytes) = entries(&path)[2].clone();

    // A key length past the entry's end, with a checksum that matches (a crafted file).
    let mut crafted = bytes[..bytes.len() - 4].to_vec();
    crafted[0] = 0xFF;
    crafted[1] = 0xFF;
    let crafted = with_checksum(crafted);
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.insert(seq, crafted.as_slice()).expect("craft");
    });
    let reason = corrupt_reason(&path);
    assert!(reason.contains(&format!("log entry {seq}")), "{reason}");

    // One damaged byte (no matching checksum).
    let mut damaged = bytes.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 1;
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.insert(seq, damaged.as_slice()).expect("damage");
    });
    let reason = corrupt_reason(&path);
    assert!(
        reason.contains(&format!("log entry {seq}")) && reason.contains("checksum"),
        "{reason}"
    );
}

/// A closed store of `n` completed keys `k0..`, enough for the close to write the key index's
/// snapshot (not durable while writing, for speed: the clean close makes it all durable).
fn store_with_snapshot(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let store = builder(&clock())
        .durability(Durability::None)
        .open(&path)
        .expect("open");
    for i in 0..n {
        started(&store, &key(&format!("k{i}")), &fp("body"))
            .complete(format!("response {i}").as_bytes())
            .expect("complete");
    }
    store.close().expect("close");
    edit(&path, |txn| {
        let meta = txn.open_table(META).expect("meta");
        assert!(
            meta.get("index_snapshot").expect("get").is_some(),
            "the close wrote a snapshot"
        );
    });
    (dir, path)
}

/// An entry moved to a free sequence number below the snapshot's end (the count of entries
/// there unchanged): the open does not trust the snapshot, and the record is found where it
/// now is. An entry rewritten in place with another key's record: refused as two entries of
/// one key, as a rebuild finds, never a key silently absent.
#[test]
fn entries_moved_or_rewritten_under_the_snapshot_are_found_or_refused_never_lost() {
    let (_dir, path) = store_with_snapshot(1_100);
    let all = entries(&path);
    assert!(all.iter().all(|&(seq, _)| seq > 0), "entry 0 is free");
    let (seq, bytes) = all[5].clone();
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.remove(seq).expect("remove");
        log.insert(0, bytes.as_slice()).expect("move");
    });
    let store = builder(&clock()).open(&path).expect("open");
    assert!(
        matches!(
            store.get(&key("k5")).expect("get"),
            Some(Entry::Completed(_))
        ),
        "the record moved from log entry {seq} to 0 is lost"
    );
    store.close().expect("close");

    let (_dir, path) = store_with_snapshot(1_100);
    let all = entries(&path);
    let (over, _) = all[7].clone();
    let (_, of_k5) = all[5].clone();
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.insert(over, of_k5.as_slice()).expect("rewrite");
    });
    let reason = corrupt_reason(&path);
    assert!(reason.contains("of one key"), "{reason}");
}

/// A log entry two below the last sequence number (of an unused key, its checksum valid): a
/// new key takes the last number handed out, then new keys are refused, never given the
/// log's first numbers (which would overwrite other keys' records).
#[test]
fn sequence_numbers_never_wrap_onto_the_first_entries() {
    let (_dir, path) = store_with(3);
    let all = entries(&path);
    let (_, bytes) = all[2].clone();
    let mut body = bytes[..bytes.len() - 4].to_vec();
    let key_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    body[2 + key_len - 1] = b'Z'; // "k2" -> "kZ"
    let body = with_checksum(body);
    edit(&path, |txn| {
        let mut log = txn.open_table(LOG).expect("log");
        log.insert(u64::MAX - 2, body.as_slice()).expect("insert");
    });
    let store = builder(&clock()).open(&path).expect("open");
    let begun: Vec<_> = ["n0", "n1", "n2"]
        .iter()
        .map(|id| store.begin(&key(id), &fp("body")).map(|_| ()))
        .collect();
    assert!(begun[0].is_ok(), "{begun:?}");
    assert!(
        begun[1..]
            .iter()
            .all(|b| matches!(b, Err(Error::Corrupt { .. }))),
        "{begun:?}"
    );
    for i in 0..3 {
        assert!(
            matches!(
                store.get(&key(&format!("k{i}"))).expect("get"),
                Some(Entry::Completed(_))
            ),
            "k{i} was overwritten"
        );
    }
    drop(store);
}
