use super::*;
use crate::fingerprint::Fingerprint;
use crate::machine;
use crate::timeline::Stamp;
use redb::{ReadableDatabase, ReadableTable};
use std::sync::Arc;

/// Writes `n` fresh in-flight records created at `now` (death `now + ttl`).
fn fill(stored: &Stored, prefix: &str, n: usize, now: u64, ttl: u64) {
    let txn = stored.db.begin_write().unwrap();
    let changes = {
        let mut t = WriteTables::open(&txn, stored, Stamp::default()).unwrap();
        for i in 0..n {
            let key = crate::Key::new("s", &format!("{prefix}{i}"))
                .unwrap()
                .encode();
            let token = t.next_token().unwrap();
            let fp = Fingerprint::of(&key);
            let record = machine::claim(None, &fp, token, now, ttl, 1).record;
            t.put(&key, &record).unwrap();
        }
        t.into_published().0
    };
    txn.commit().unwrap();
    stored.index.apply(&changes);
}

#[test]
fn reaping_examines_only_dead_index_entries() {
    let stored = initialize(
        open_memory(1 << 20).unwrap(),
        Arc::new(crate::clock::SystemClock),
        false,
    )
    .unwrap();
    fill(&stored, "dead-", 7, 0, 100);
    fill(&stored, "live-", 5_000, 0, 1_000_000);
    assert_eq!(stored.index.len(), 5_007);
    let txn = stored.db.begin_write().unwrap();
    let mut t = WriteTables::open(&txn, &stored, Stamp::default()).unwrap();
    // At time 500 only the 7 short-lived records are dead: a pass costs 7 entries, not
    // the 5,007 the store holds.
    let pass = t.reap(500, 1_000).unwrap();
    assert_eq!(
        pass,
        ReapPass {
            deleted: 7,
            examined: 7,
            more: false
        }
    );
    // Nothing dead is left: the next pass examines nothing.
    assert_eq!(t.reap(500, 1_000).unwrap().examined, 0);
    // A limit bounds a pass, and says more may be due.
    let pass = t.reap(2_000_000, 1_000).unwrap();
    assert_eq!(
        (pass.deleted, pass.examined, pass.more),
        (1_000, 1_000, true)
    );
}

/// (sequence number, key) of each log entry.
type Entries = Vec<(u64, Vec<u8>)>;

/// The log entries and expiry entries of the store, as (seq, key) and (death, seq).
fn contents(stored: &Stored) -> (Entries, Vec<(u64, u64)>) {
    let txn = stored.db.begin_read().unwrap();
    let log = txn.open_table(LOG).unwrap();
    let deaths = txn.open_table(DEATHS).unwrap();
    let entries = log
        .iter()
        .unwrap()
        .map(|e| {
            let (seq, entry) = e.unwrap();
            (seq.value(), split_entry(entry.value()).unwrap().0.to_vec())
        })
        .collect();
    let deaths = deaths
        .iter()
        .unwrap()
        .map(|e| e.unwrap().0.value())
        .collect();
    (entries, deaths)
}

/// Runs `f` on the tables in one committed transaction and publishes its index changes.
fn write(stored: &Stored, f: impl FnOnce(&mut WriteTables<'_>)) -> usize {
    let txn = stored.db.begin_write().unwrap();
    let changes = {
        let mut t = WriteTables::open(&txn, stored, Stamp::default()).unwrap();
        f(&mut t);
        t.into_published().0
    };
    txn.commit().unwrap();
    stored.index.apply(&changes);
    changes.len()
}

#[test]
fn a_key_is_rewritten_in_place_and_its_expiry_entry_follows_its_death_time() {
    let stored = initialize(
        open_memory(1 << 20).unwrap(),
        Arc::new(crate::clock::SystemClock),
        false,
    )
    .unwrap();
    fill(&stored, "k", 2, 0, 100);
    let key = crate::Key::new("s", "k0").unwrap().encode();
    let other = crate::Key::new("s", "k1").unwrap().encode();
    let (entries, deaths) = contents(&stored);
    let seq = entries.iter().find(|(_, k)| *k == key).unwrap().0;
    assert!(deaths.contains(&(100, seq)));

    // Completing the key: same entry, new record, expiry entry moved; no index change.
    let record = stored.read_record(&key).unwrap().unwrap();
    let (done, _) =
        machine::complete(Some(&record), record.token, b"ok".to_vec(), 10, 500).unwrap();
    assert_eq!(done.dies_at(), 510);
    let changes = write(&stored, |t| {
        assert!(t.get(&key).unwrap().is_some());
        t.put(&key, &done).unwrap();
    });
    assert_eq!(changes, 0, "the index does not change");
    let (after, deaths) = contents(&stored);
    assert_eq!(after, entries, "no entry added or moved");
    assert!(deaths.contains(&(510, seq)) && !deaths.contains(&(100, seq)));
    assert_eq!(deaths.len(), 2);
    assert_eq!(stored.read_record(&key).unwrap(), Some(done.clone()));

    // The same record again (same death time): the expiry index is left alone.
    write(&stored, |t| t.put(&key, &done).unwrap());
    assert_eq!(contents(&stored).1, deaths);

    // Deleted and claimed again: a new entry at the log's end.
    assert_eq!(write(&stored, |t| t.delete(&key).unwrap()), 1);
    assert_eq!(stored.read_record(&key).unwrap(), None);
    write(&stored, |t| t.put(&key, &done).unwrap());
    let (entries, deaths) = contents(&stored);
    let keys: Vec<_> = entries.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(keys, [other, key.clone()]);
    assert_eq!(deaths.len(), 2);
    assert_eq!(stored.read_record(&key).unwrap(), Some(done));
}

/// Opens (or creates) the store file at `path`, as `Builder::open` does.
fn open_stored(path: &std::path::Path) -> Stored {
    let (db, file) = open_file(path, 1 << 20).unwrap();
    let mut stored = initialize(db, Arc::new(crate::clock::SystemClock), true).unwrap();
    stored.file = Some(file);
    stored
}

fn key_of(prefix: &str, i: usize) -> Vec<u8> {
    crate::Key::new("s", &format!("{prefix}{i}"))
        .unwrap()
        .encode()
}

/// Checks that the keys `prefix0..n` are all present (`present`) or all absent.
fn assert_keys(stored: &Stored, prefix: &str, n: usize, present: bool) {
    for i in 0..n {
        let found = stored.read_record(&key_of(prefix, i)).unwrap().is_some();
        assert_eq!(found, present, "key {prefix}{i}");
    }
}

fn saved(stored: &Stored) -> crate::storage::snapshot::Saved {
    stored
        .save_index(crate::config::Durability::Immediate)
        .unwrap()
        .expect("a file store writes a snapshot")
}

#[test]
fn a_clean_reopen_loads_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Rebuilt { rejected: None });
    fill(&stored, "a", 3_000, 0, 1_000);
    assert_eq!(saved(&stored).entries, 3_000);
    assert_eq!(stored.changes_since_snapshot(), Some(0));
    let next = stored.next_seq.load(std::sync::atomic::Ordering::Relaxed);
    drop(stored);

    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Snapshot { tail: 0 });
    assert_eq!(stored.index.len(), 3_000);
    assert_eq!(
        stored.next_seq.load(std::sync::atomic::Ordering::Relaxed),
        next
    );
    assert_eq!(stored.changes_since_snapshot(), Some(0));
    assert_keys(&stored, "a", 3_000, true);
    assert_keys(&stored, "b", 10, false);
    // The fencing tokens go on above every token granted before.
    write(&stored, |t| assert!(t.next_token().unwrap() > 3_000));
}

/// A crash after a snapshot: the log written after it (new keys, deletions of keys in the
/// snapshot, a key deleted and claimed again) is replayed on top of it, and the index is
/// exactly the log's.
#[test]
fn after_a_crash_the_log_after_the_snapshot_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    fill(&stored, "dead", 50, 0, 100);
    fill(&stored, "live", 2_000, 0, 1_000_000);
    saved(&stored);
    // After the snapshot: new keys, the 50 short-lived ones reaped, one deleted and claimed
    // again (a new entry at the log's end).
    fill(&stored, "new", 700, 0, 1_000_000);
    let reaped = write(&stored, |t| {
        assert_eq!(t.reap(500, 1_000).unwrap().deleted, 50);
    });
    assert_eq!(reaped, 50);
    let again = key_of("live", 7);
    let record = stored.read_record(&again).unwrap().unwrap();
    write(&stored, |t| t.delete(&again).unwrap());
    write(&stored, |t| t.put(&again, &record).unwrap());
    let next = stored.next_seq.load(std::sync::atomic::Ordering::Relaxed);
    // No snapshot at the end (a crash, as far as the index is concerned).
    drop(stored);

    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Snapshot { tail: 701 });
    assert_eq!(
        stored.index.len(),
        2_700,
        "the index holds exactly the log's entries"
    );
    assert_eq!(
        stored.next_seq.load(std::sync::atomic::Ordering::Relaxed),
        next
    );
    assert_keys(&stored, "live", 2_000, true);
    assert_keys(&stored, "new", 700, true);
    assert_keys(&stored, "dead", 50, false);
    assert_eq!(stored.read_record(&again).unwrap(), Some(record));
    // The next snapshot starts a new journal: another reopen loads it with no tail.
    saved(&stored);
    drop(stored);
    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Snapshot { tail: 0 });
    assert_eq!(stored.index.len(), 2_700);
}

/// Rewrites the first chunk of the snapshot's slots that holds an entry with `f` (a valid
/// page of the file, with contents that do not match the snapshot's checksum or header).
fn edit_chunk(path: &std::path::Path, f: impl FnOnce(&mut Vec<u8>)) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<u64, &[u8]> =
            redb::TableDefinition::new("idemstore_index_snapshot");
        let mut chunks = txn.open_table(def).unwrap();
        let (n, mut chunk) = chunks
            .iter()
            .unwrap()
            .map(|c| {
                let (n, c) = c.unwrap();
                (n.value(), c.value().to_vec())
            })
            .find(|(_, c)| c.chunks(crate::index::SLOT_BYTES).any(|s| s[..4] != [0; 4]))
            .unwrap();
        f(&mut chunk);
        chunks.insert(n, chunk.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// The snapshot's slots table of the store file at `path`, key → value.
fn slot_values(path: &std::path::Path) -> Vec<(u64, Vec<u8>)> {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let def: redb::TableDefinition<u64, &[u8]> =
        redb::TableDefinition::new("idemstore_index_snapshot");
    let chunks = txn.open_table(def).unwrap();
    chunks
        .iter()
        .unwrap()
        .map(|c| {
            let (n, c) = c.unwrap();
            (n.value(), c.value().to_vec())
        })
        .collect()
}

/// Replaces the snapshot's slots table with `values`, and its header's layout and value
/// count, with the checksum of the new header fields and values (it covers neither the keys
/// nor the layout).
fn rewrite_slots(path: &std::path::Path, values: &[(u64, Vec<u8>)], layout: u32) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<u64, &[u8]> =
            redb::TableDefinition::new("idemstore_index_snapshot");
        txn.delete_table(def).unwrap();
        let mut chunks = txn.open_table(def).unwrap();
        for (n, v) in values {
            chunks.insert(n, v.as_slice()).unwrap();
        }
        let mut meta = txn.open_table(META).unwrap();
        let mut header = meta.get(SNAPSHOT_KEY).unwrap().unwrap().value().to_vec();
        header[..4].copy_from_slice(&layout.to_be_bytes());
        // The value count is the header's eighth field.
        header[4 + 7 * 8..4 + 8 * 8].copy_from_slice(&(values.len() as u64).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[4..4 + 9 * 8]);
        for (_, v) in values {
            crc.update(v);
        }
        let end = header.len();
        header[end - 4..].copy_from_slice(&crc.finalize().to_be_bytes());
        meta.insert(SNAPSHOT_KEY, header.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_snapshot_stores_each_segment_in_pieces_and_reads_whole_segments_of_earlier_builds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    fill(&stored, "a", 3_000, 0, 1_000_000);
    saved(&stored);
    drop(stored);
    let pieces = slot_values(&path);
    // Every segment is in pieces of at most `PIECE_BYTES` (two slots in these tests), keyed
    // by segment and piece.
    assert!(pieces.iter().all(|(_, v)| v.len() <= snapshot::PIECE_BYTES));
    assert!(pieces.iter().any(|&(n, _)| n & 0xffff_ffff > 0));
    assert_eq!(pieces.last().unwrap().0 >> 32, 1023);

    // The same slots as earlier builds wrote them: one value per segment.
    let mut whole: Vec<(u64, Vec<u8>)> = Vec::new();
    for (n, v) in &pieces {
        match whole.last_mut() {
            Some((s, w)) if *s == n >> 32 => w.extend_from_slice(v),
            _ => whole.push((n >> 32, v.clone())),
        }
    }
    assert_eq!(whole.len(), 1024);
    rewrite_slots(&path, &whole, 1);
    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Snapshot { tail: 0 });
    assert_keys(&stored, "a", 3_000, true);
    drop(stored);

    // A piece out of its place (renumbered past a gap) is refused, and the index rebuilt.
    let stored = open_stored(&path);
    saved(&stored);
    drop(stored);
    let mut pieces = slot_values(&path);
    // The last piece of a segment, piece 1 of it.
    let moved = (0..pieces.len() - 1)
        .find(|&i| pieces[i].0 & 0xffff_ffff == 1 && pieces[i + 1].0 >> 32 != pieces[i].0 >> 32)
        .unwrap();
    pieces[moved].0 += 1;
    rewrite_slots(&path, &pieces, 2);
    let stored = open_stored(&path);
    assert_eq!(
        stored.index_source,
        IndexSource::Rebuilt {
            rejected: Some("its slots do not match its header".into())
        }
    );
    assert_keys(&stored, "a", 3_000, true);
}

#[test]
fn a_damaged_snapshot_is_removed_and_the_index_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    fill(&stored, "a", 1_000, 0, 1_000_000);
    saved(&stored);
    drop(stored);
    // One bit of one slot flipped: the sequence number of an entry changes, which only the
    // checksum can tell.
    edit_chunk(&path, |chunk| {
        let at = chunk
            .chunks(crate::index::SLOT_BYTES)
            .position(|s| s[..4] != [0; 4])
            .unwrap();
        chunk[at * crate::index::SLOT_BYTES + 4] ^= 1;
    });
    let stored = open_stored(&path);
    assert_eq!(
        stored.index_source,
        IndexSource::Rebuilt {
            rejected: Some("its checksum does not match".into())
        }
    );
    assert_eq!(stored.index.len(), 1_000);
    assert_keys(&stored, "a", 1_000, true);
    drop(stored);
    // Removed: the next open rebuilds again, with no snapshot to check.
    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Rebuilt { rejected: None });
    saved(&stored);
    drop(stored);

    // A torn chunk (shorter than its slots): refused too.
    edit_chunk(&path, |chunk| chunk.truncate(chunk.len() - 5));
    let stored = open_stored(&path);
    assert!(matches!(
        stored.index_source,
        IndexSource::Rebuilt { rejected: Some(_) }
    ));
    assert_keys(&stored, "a", 1_000, true);
}

/// A writer that does not keep the snapshot up to date (an older build) writes the latest
/// time without its mark, or adds a log entry below the snapshot's end: either way the
/// snapshot is not used.
#[test]
fn a_snapshot_the_log_moved_away_from_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    fill(&stored, "a", 500, 0, 1_000_000);
    saved(&stored);
    drop(stored);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(TIME_KEY, 77u64.to_be_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let stored = open_stored(&path);
    assert!(matches!(
        stored.index_source,
        IndexSource::Rebuilt { rejected: Some(_) }
    ));
    assert_keys(&stored, "a", 500, true);
    saved(&stored);

    // An entry below the snapshot's end that the snapshot does not hold: the first entry's
    // record under another key, at sequence number 0 (free: the log starts at 1).
    let (entries, _) = contents(&stored);
    drop(stored);
    assert!(entries.iter().all(|&(seq, _)| seq > 0));
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(LOG).unwrap();
            let first = log.first().unwrap().unwrap().1.value().to_vec();
            let (key, record) = split_entry(&first).unwrap();
            let mut other = key.to_vec();
            *other.last_mut().unwrap() = b'Z';
            let mut entry = (other.len() as u16).to_be_bytes().to_vec();
            entry.extend_from_slice(&other);
            entry.extend_from_slice(record);
            entry.extend_from_slice(&crc32fast::hash(&entry).to_be_bytes());
            log.insert(0, entry.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let stored = open_stored(&path);
    assert_eq!(
        stored.index_source,
        IndexSource::Rebuilt {
            rejected: Some("the log holds another number of entries than it accounts for".into())
        }
    );
    assert_eq!(stored.index.len(), 501);
}

/// A batch that committed and has not published its changes (or whose commit failed with an
/// unknown outcome) leaves the index behind the log: no snapshot is written of it, and once
/// the changes are published one is.
#[test]
fn no_snapshot_is_written_of_an_index_behind_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let stored = open_stored(&path);
    fill(&stored, "a", 2_000, 0, 1_000_000);
    saved(&stored);
    for unpublished in ["add", "delete"] {
        let txn = stored.db.begin_write().unwrap();
        let changes = {
            let mut t = WriteTables::open(&txn, &stored, Stamp::default()).unwrap();
            if unpublished == "add" {
                let key = key_of("b", 0);
                let record = machine::claim(None, &Fingerprint::of(&key), 9_999, 0, 1_000_000, 1);
                t.put(&key, &record.record).unwrap();
            } else {
                t.delete(&key_of("a", 5)).unwrap();
            }
            t.into_published().0
        };
        txn.commit().unwrap();
        let none = stored
            .save_index(crate::config::Durability::Immediate)
            .unwrap();
        assert_eq!(none, None, "{unpublished}: the index is behind the log");
        stored.index.apply(&changes);
        saved(&stored);
    }
    drop(stored);
    let stored = open_stored(&path);
    assert_eq!(stored.index_source, IndexSource::Snapshot { tail: 0 });
    assert_eq!(stored.index.len(), 2_000);
    assert!(stored.read_record(&key_of("b", 0)).unwrap().is_some());
    assert!(stored.read_record(&key_of("a", 5)).unwrap().is_none());
}

#[test]
fn the_response_hint_rises_at_once_decays_slowly_and_caps_the_room() {
    let claim = machine::claim(None, &Fingerprint::of(b"x"), 1, 0, 100, 1).record;
    let hint = ResponseHint::default();
    assert_eq!(hint.room(&claim), 0, "nothing completed yet: no room");
    hint.completed(300);
    let room = hint.room(&claim);
    assert_eq!(room, claim.room_for(300));
    assert!(room > 0);
    // A shorter response lowers it by 1/64 only; a longer one raises it at once.
    hint.completed(10);
    assert_eq!(hint.room(&claim), claim.room_for(300 - 5));
    hint.completed(400);
    assert_eq!(hint.room(&claim), claim.room_for(400));
    // Shorter responses from then on bring it down to theirs, at least a byte at a time.
    for _ in 0..2_000 {
        hint.completed(10);
    }
    assert_eq!(hint.room(&claim), claim.room_for(10));
    hint.completed(1 << 20);
    assert_eq!(hint.room(&claim), ResponseHint::MAX_ROOM);
}

/// Flips a byte in the middle of the log entries at `positions` (in log order), through redb
/// (valid pages, entries whose checksum fails); their sequence numbers.
fn damage_entries(path: &std::path::Path, positions: &[usize]) -> Vec<u64> {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    let mut seqs = Vec::new();
    {
        let mut log = txn.open_table(LOG).unwrap();
        let all: Vec<(u64, Vec<u8>)> = log
            .iter()
            .unwrap()
            .map(|item| {
                let (k, v) = item.unwrap();
                (k.value(), v.value().to_vec())
            })
            .collect();
        for &at in positions {
            let (seq, mut bytes) = all[at].clone();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x10;
            log.insert(seq, bytes.as_slice()).unwrap();
            seqs.push(seq);
        }
    }
    txn.commit().unwrap();
    seqs
}

/// The passes over the log at open are split across threads (three under `cfg(test)`, each
/// a third of the sequence numbers); damage in the second and the third part is reported at
/// the second's entry, as a pass in order would report it, with a snapshot and without.
#[test]
fn a_pass_split_across_threads_reports_the_first_damaged_entry() {
    for with_snapshot in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let stored = open_stored(&path);
        fill(&stored, "a", 300, 0, 1_000);
        if with_snapshot {
            saved(&stored);
        }
        drop(stored);
        let seqs = damage_entries(&path, &[250, 150]);
        let (db, _) = open_file(&path, 1 << 20).unwrap();
        match initialize(db, Arc::new(crate::clock::SystemClock), true) {
            Err(Error::Corrupt { reason }) => assert!(
                reason.contains(&format!("log entry {}", seqs[1])),
                "snapshot {with_snapshot}: {reason}"
            ),
            Err(other) => panic!("snapshot {with_snapshot}: {other}"),
            Ok(_) => panic!("snapshot {with_snapshot}: the damaged file opened"),
        }
    }
}

#[test]
fn the_refiling_position_moves_only_with_its_commit() {
    use crate::committer::Tables;
    let stored = initialize(
        open_memory(1 << 20).unwrap(),
        Arc::new(crate::clock::SystemClock),
        false,
    )
    .unwrap();
    fill(&stored, "a-", 10, 0, 100);
    *stored.resweep_from.lock() = Some(0);
    let txn = stored.db.begin_write().unwrap();
    {
        let mut t = WriteTables::open(&txn, &stored, Stamp::default()).unwrap();
        // Three of the ten entries re-filed: the transaction's position moved on...
        assert!(Tables::reap(&mut t, 0, 3).unwrap().more);
        assert_eq!(t.resweep_from(), Some(100));
    }
    // ...but the transaction aborted (a later command of its batch failed, say): the store
    // still re-files from where the last commit left it.
    txn.abort().unwrap();
    assert_eq!(*stored.resweep_from.lock(), Some(0));
}
