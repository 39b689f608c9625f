//! Crafted and damaged files: a lowered token counter never makes a token be granted twice; a
//! duplicated log entry is `Corrupt`, never a second copy that comes back once the first is
//! reaped; a bad entry is reported with its position in the log.

use std::path::{Path, PathBuf};

use idemstore::Error;
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
