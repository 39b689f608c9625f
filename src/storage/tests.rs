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
        t.into_changes()
    };
    txn.commit().unwrap();
    stored.index.apply(&changes);
}

#[test]
fn reaping_examines_only_dead_index_entries() {
    let stored = initialize(
        open_memory(1 << 20).unwrap(),
        Arc::new(crate::clock::SystemClock),
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
        t.into_changes()
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
