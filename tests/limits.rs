//! Inputs and limits, and the clean refusals: keys, sizes, settings, the file,
//! double opens, use after close, overflowing durations and a clock that goes backwards.
//! The tests of the store's behaviour run on every engine (`memory::`, `redb::`,
//! `postgres::` in the test names; the list is at the end); those about keys alone and about
//! redb's file are plain tests.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use idemstore::{Begin, Durability, Error, Key, Store};
use idemstore_testkit::rng::noise;
use idemstore_testkit::store::*;
// `::redb`: the crate, not the test module of that name.
use ::redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use idemstore_testkit::engine::Place;

const NS: Duration = Duration::from_nanos(1);

#[track_caller]
fn assert_invalid_key(scope: &str, id: &str) {
    match Key::new(scope, id) {
        Err(Error::InvalidKey { reason }) => {
            assert!(!reason.is_empty(), "InvalidKey must carry a reason");
        }
        other => panic!("Key::new({scope:?}, {id:?}): expected InvalidKey, got {other:?}"),
    }
}

#[track_caller]
fn assert_valid_key(scope: &str, id: &str) {
    let k = Key::new(scope, id).unwrap_or_else(|e| panic!("Key::new({scope:?}, {id:?}): {e}"));
    assert_eq!((k.scope(), k.id()), (scope, id));
}

// ---------------------------------------------------------------------------------------------
// Keys

#[test]
fn id_rules() {
    assert_invalid_key("s", "");
    assert_invalid_key("s", &"x".repeat(256));
    assert_valid_key("s", &"x".repeat(255));
    assert_valid_key("s", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11");
    // Printable ASCII is 0x20..=0x7E: both ends are allowed.
    assert_valid_key("s", " !");
    assert_valid_key("s", "~");
    assert_valid_key("s", " a ");
    for bad in [
        "a\n",
        "\tab",
        "a\x7f",
        "\x1f",
        "a\0b",
        "caf\u{e9}",
        "\u{1F600}",
    ] {
        assert_invalid_key("s", bad);
    }
    // Only spaces.
    assert_invalid_key("s", " ");
    assert_invalid_key("s", &" ".repeat(255));
}

#[test]
fn scope_rules() {
    assert_valid_key("", "id");
    assert_valid_key(&"s".repeat(255), "id");
    assert_invalid_key(&"s".repeat(256), "id");
    // Any UTF-8, counted in bytes: 85 × '€' (3 bytes) = 255 bytes is fine, 86 is not.
    assert_valid_key(&"€".repeat(85), "id");
    assert_invalid_key(&"€".repeat(86), "id");
    assert_valid_key("tenant \n\t\0 ünïcode", "id");
}

fn key_parts_cannot_run_into_each_other(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let a = Key::new("a", "bc").unwrap();
        let b = Key::new("ab", "c").unwrap();
        assert_ne!(a, b);
        let f = fp("body");
        started(store, &a, &f).complete(b"a/bc").unwrap();
        assert_eq!(store.get(&b).unwrap(), None);
        let lb = started(store, &b, &f);
        assert!(lb.recovered().is_none());
        lb.complete(b"ab/c").unwrap();
        assert_eq!(replay(store, &a, &f).response(), b"a/bc");
        assert_eq!(replay(store, &b, &f).response(), b"ab/c");
    });
}

// ---------------------------------------------------------------------------------------------
// Response and checkpoint size

const SMALL_MAX: usize = 64;

fn response_at_the_limit_is_stored(place: &Place) {
    with_store_with(
        place,
        |b| b.max_response_bytes(SMALL_MAX),
        |t| {
            let k = key("at-limit");
            let f = fp("body");
            let body = noise(SMALL_MAX, 1);
            let mut lease = started(&t.store, &k, &f);
            lease.checkpoint(&body).unwrap();
            lease.complete(&body).unwrap();
            assert_eq!(replay(&t.store, &k, &f).response(), &body[..]);
        },
    );
}

fn too_large_complete_stores_nothing_and_releases_the_lease(place: &Place) {
    with_store_with(
        place,
        |b| b.max_response_bytes(SMALL_MAX),
        |t| {
            let (store, clock) = (&t.store, &t.clock);
            let k = key("too-large-complete");
            let f = fp("body");
            let mut lease = started(store, &k, &f);
            lease.checkpoint(b"cp").unwrap();
            let token = lease.token();
            let before = get_in_flight(store, &k);
            clock.advance(Duration::from_secs(3));
            let now = idemstore::Clock::now(clock);

            match lease.complete(&noise(SMALL_MAX + 1, 2)) {
                Err(Error::ResponseTooLarge { len, max }) => {
                    assert_eq!((len, max), (SMALL_MAX + 1, SMALL_MAX));
                }
                other => panic!("expected ResponseTooLarge, got {other:?}"),
            }
            // Nothing stored: still in flight, same token and checkpoint, lease released.
            let e = get_in_flight(store, &k);
            assert_eq!(
                InFlightView {
                    lease_expires_at: before.lease_expires_at,
                    ..e.clone()
                },
                before
            );
            assert_eq!(e.lease_expires_at, now, "released as on drop");

            // The next begin takes over at once, with the last checkpoint.
            let next = started(store, &k, &f);
            let rec = next.recovered().expect("a takeover");
            assert_eq!(rec.previous_token(), token);
            assert_eq!(rec.attempt(), 2);
            assert_eq!(rec.checkpoint(), Some(&b"cp"[..]));
            next.complete(b"small").unwrap();
            assert_eq!(replay(store, &k, &f).response(), b"small");
        },
    );
}

fn too_large_checkpoint_stores_nothing_and_keeps_the_lease(place: &Place) {
    with_store_with(
        place,
        |b| b.max_response_bytes(SMALL_MAX),
        |t| {
            let store = &t.store;
            let k = key("too-large-checkpoint");
            let f = fp("body");
            let mut lease = started(store, &k, &f);
            lease.checkpoint(b"good").unwrap();
            let before = store.get(&k).unwrap();

            match lease.checkpoint(&noise(SMALL_MAX + 1, 3)) {
                Err(Error::ResponseTooLarge { len, max }) => {
                    assert_eq!((len, max), (SMALL_MAX + 1, SMALL_MAX));
                }
                other => panic!("expected ResponseTooLarge, got {other:?}"),
            }
            assert_eq!(store.get(&k).unwrap(), before, "nothing stored");
            // The lease is kept: others get 409, the holder can go on.
            assert_eq!(in_flight(store, &k, &f), LEASE);
            lease.checkpoint(b"better").unwrap();
            lease.complete(b"done").unwrap();
            assert_eq!(replay(store, &k, &f).response(), b"done");
        },
    );
}

fn default_limit_is_four_mebibytes(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let f = fp("body");
        let max = 4 << 20;
        let mut lease = started(store, &key("default-limit"), &f);
        assert!(matches!(
            lease.checkpoint(&vec![7u8; max + 1]),
            Err(Error::ResponseTooLarge { len, max: m }) if len == max + 1 && m == max
        ));
        let big = noise(max, 4);
        let done = lease.complete(&big).unwrap();
        assert_eq!(done.response().len(), max);
        assert_eq!(
            replay(store, &key("default-limit"), &f).response(),
            &big[..]
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Settings

fn zero_ttl_or_lease_is_invalid_config(place: &Place) {
    let clock = clock();
    for (what, b) in [
        ("ttl", builder(&clock).ttl(Duration::ZERO)),
        ("lease", builder(&clock).lease(Duration::ZERO)),
    ] {
        match place.open(b) {
            Err(Error::InvalidConfig { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!(
                "{:?}: {what} 0: expected InvalidConfig, got {other:?}",
                place.engine()
            ),
        }
        assert!(
            !place.created(),
            "a refused open must not create the file or the tables"
        );
    }
    // The smallest positive values are accepted.
    place
        .open(builder(&clock).ttl(NS).lease(NS))
        .unwrap()
        .close()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The file

fn use_store(store: &Store) {
    let k = key("probe");
    let f = fp("probe");
    started(store, &k, &f).complete(b"probe").unwrap();
    assert_eq!(replay(store, &k, &f).response(), b"probe");
}

// redb only: a store file at a path.
#[test]
fn a_missing_file_becomes_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.redb");
    assert!(!path.exists());
    let store = builder(&clock()).open(&path).unwrap();
    assert!(path.exists());
    use_store(&store);
    store.close().unwrap();
    // And it is a store of ours afterwards.
    let store = builder(&clock()).open(&path).unwrap();
    assert_eq!(
        replay(&store, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    store.close().unwrap();
}

// redb only: how a new store file is created.
#[test]
fn a_new_store_appears_complete_or_not_at_all() {
    // A new store is built beside its path and linked into place once initialized, so a
    // crash during creation never leaves a half-written file at the path. A leftover of a
    // crashed creation (same naming scheme, our pid) neither blocks the open nor survives it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.redb");
    let leftover = dir
        .path()
        .join(format!(".new.redb.idemstore-new-{}", std::process::id()));
    std::fs::write(&leftover, vec![0u8; 4096]).unwrap();
    let store = builder(&clock()).open(&path).unwrap();
    use_store(&store);
    store.close().unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["new.redb".to_string()],
        "only the store remains"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the store file is private to its owner"
        );
    }
}

// redb only: an empty file at the path.
#[test]
fn a_zero_byte_file_becomes_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.redb");
    std::fs::write(&path, b"").unwrap();
    let store = builder(&clock()).open(&path).unwrap();
    use_store(&store);
    store.close().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 0);
    let store = builder(&clock()).open(&path).unwrap();
    assert_eq!(
        replay(&store, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    store.close().unwrap();
}

#[track_caller]
fn assert_storage(r: Result<Store, Error>) {
    match r {
        Err(e @ Error::Storage { .. }) => {
            assert!(std::error::Error::source(&e).is_some(), "{e}");
            // Nothing was written: no word of an unknown outcome.
            let text = e.to_string();
            assert!(!text.contains("outcome"), "{text}");
            assert!(!text.contains("if this was a write"), "{text}");
        }
        other => panic!("expected Error::Storage, got {other:?}"),
    }
}

// redb only: the path of a store file.
#[test]
fn a_directory_or_a_missing_parent_is_a_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    assert_storage(builder(&clock()).open(dir.path()));
    assert!(dir.path().is_dir());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let missing = dir.path().join("no-such-dir").join("store.redb");
    assert_storage(builder(&clock()).open(&missing));
    assert!(
        !missing.parent().unwrap().exists(),
        "the parent is not created"
    );
}

// redb only: the path of a store file.
/// A dangling symbolic link at the path is refused: the file it names is missing, which may
/// be a lost volume or a deleted store, and a new empty store there would forget every key.
/// Nothing is created, at the link's target or beside the link.
#[cfg(unix)]
#[test]
fn a_dangling_symlink_is_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let target = dir.path().join("data").join("idem.redb");
    let link = dir.path().join("idem.redb");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // A chain of links ending nowhere, too.
    let chain = dir.path().join("chain.redb");
    std::os::unix::fs::symlink(&link, &chain).unwrap();
    for path in [&link, &chain] {
        let e = match builder(&clock()).open(path) {
            Err(e @ Error::Storage { .. }) => e,
            other => panic!("a dangling symlink: expected a Storage error, got {other:?}"),
        };
        let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(text.contains("symbolic link"), "{text}");
        assert!(text.contains(&target.display().to_string()), "{text}");
        assert!(!text.contains("outcome"), "{text}");
    }
    assert!(!target.exists(), "nothing created at the target");
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["chain.redb", "data", "idem.redb"], "no leftovers");
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        0
    );

    // Once the file exists, the link is followed.
    let store = builder(&clock()).open(&target).unwrap();
    use_store(&store);
    store.close().unwrap();
    let store = builder(&clock()).open(&link).unwrap();
    assert_eq!(
        replay(&store, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    store.close().unwrap();
}

/// Opens `path`, which must be refused with `IncompatibleFormat`, and checks that the file's
/// bytes did not change.
#[track_caller]
fn assert_refused_unchanged(path: &Path) {
    let before = std::fs::read(path).unwrap();
    match builder(&clock()).open(path) {
        Err(Error::IncompatibleFormat { reason }) => assert!(!reason.is_empty()),
        other => panic!("expected IncompatibleFormat, got {other:?}"),
    }
    // Also through the default builder (reaper thread on).
    assert!(matches!(
        Store::open(path),
        Err(Error::IncompatibleFormat { .. })
    ));
    let after = std::fs::read(path).unwrap();
    assert!(before == after, "a refused file must not be modified");
}

// redb only: the file format check.
#[test]
fn a_file_that_is_not_redb_is_incompatible_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let random = dir.path().join("random.bin");
    std::fs::write(&random, noise(64 * 1024, 42)).unwrap();
    assert_refused_unchanged(&random);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text\nnot a database\n").unwrap();
    assert_refused_unchanged(&text);

    let one = dir.path().join("one-byte");
    std::fs::write(&one, b"r").unwrap();
    assert_refused_unchanged(&one);
}

// redb only: the file format check.
#[test]
fn a_redb_file_of_another_program_is_incompatible_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = ::redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: TableDefinition<&str, u64> = TableDefinition::new("their_table");
            let mut table = txn.open_table(def).unwrap();
            table.insert("answer", 42).unwrap();
        }
        txn.commit().unwrap();
    }
    assert_refused_unchanged(&path);

    // Their data is still there and readable.
    let db = ::redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let def: TableDefinition<&str, u64> = TableDefinition::new("their_table");
    let table = txn.open_table(def).unwrap();
    assert_eq!(table.get("answer").unwrap().unwrap().value(), 42);
}

// redb only: the file format check.
#[test]
fn a_redb_file_with_a_meta_table_of_ours_but_no_marker_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lookalike.redb");
    {
        let db = ::redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
            let mut table = txn.open_table(def).unwrap();
            table.insert("something", &b"else"[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    assert_refused_unchanged(&path);
}

/// Creates a store file, closes it, and overwrites its format version with `version`.
fn store_with_format_version(path: &Path, version: u32) {
    let store = builder(&clock()).open(path).unwrap();
    use_store(&store);
    store.close().unwrap();
    set_format_version(path, version);
}

/// Overwrites the format version of the (closed) store file at `path` with `version`.
fn set_format_version(path: &Path, version: u32) {
    let db = ::redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
        let mut meta = txn.open_table(def).unwrap();
        let old = meta
            .get("format_version")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        assert_eq!(
            old,
            4u32.to_be_bytes(),
            "this build writes format version 4"
        );
        meta.insert("format_version", &version.to_be_bytes()[..])
            .unwrap();
    }
    txn.commit().unwrap();
}

// redb only: the file format check.
#[test]
fn a_store_of_another_format_version_is_incompatible_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let newer = dir.path().join("newer.redb");
    store_with_format_version(&newer, 5);
    assert_refused_unchanged(&newer);

    // Older versions are refused like any other, never migrated.
    for old in [0, 2] {
        let older = dir.path().join(format!("older-{old}.redb"));
        store_with_format_version(&older, old);
        assert_refused_unchanged(&older);
    }

    // Control: the same steps with version 4 give a file we open.
    let same = dir.path().join("same.redb");
    store_with_format_version(&same, 4);
    let store = builder(&clock()).open(&same).unwrap();
    assert_eq!(
        replay(&store, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    store.close().unwrap();
}

/// The format version in the meta table of the store file at `path`.
fn format_version_of(path: &Path) -> u32 {
    let db = ::redb::ReadOnlyDatabase::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let def: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
    let meta = txn.open_table(def).unwrap();
    let v = meta.get("format_version").unwrap().unwrap();
    u32::from_be_bytes(v.value().try_into().unwrap())
}

// redb only: the file format check. Version 3 had no room after in-flight records; this
// build reads its records as they are.
#[test]
fn a_version_3_store_is_read_as_it_is_and_raised_to_version_4_by_a_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.redb");
    let clock = clock();
    // A version 3 file: one completed record, and one in flight written without room (as a
    // build of version 3 wrote them: the room of the first claim is 0, nothing completed
    // before it).
    {
        let store = builder(&clock).open(&path).unwrap();
        std::mem::forget(started(&store, &key("pending"), &fp("pending")));
        use_store(&store);
        store.close().unwrap();
    }
    set_format_version(&path, 3);

    // A read-only open reads it and leaves it as it is.
    let before = std::fs::read(&path).unwrap();
    let file = idemstore::admin::StoreFile::open(&path).unwrap();
    let summary = file.summary().unwrap();
    // (Dead by the system clock: they were written at the test clock's start.)
    assert_eq!((summary.format_version, summary.records()), (3, 2));
    drop(file);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read-only open wrote"
    );

    // A read-write open reads the same records and marks the file version 4.
    let store = builder(&clock).open(&path).unwrap();
    assert_eq!(format_version_of_open(&store), 4);
    assert_eq!(
        replay(&store, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    // The in-flight record without room is taken over and completed (rewritten with none).
    in_flight(&store, &key("pending"), &fp("pending"));
    clock.advance(LEASE);
    let lease = started(&store, &key("pending"), &fp("pending"));
    assert_eq!(lease.recovered().map(|r| r.attempt()), Some(2));
    lease.complete(b"at last").unwrap();
    // A new claim gets room (for a 5-byte response: the completions so far).
    started(&store, &key("new"), &fp("new"))
        .complete(b"done")
        .unwrap();
    store.close().unwrap();
    assert_eq!(format_version_of(&path), 4);
    let store = builder(&clock).open(&path).unwrap();
    assert_eq!(replay(&store, &key("new"), &fp("new")).response(), b"done");
    assert_eq!(
        replay(&store, &key("pending"), &fp("pending")).response(),
        b"at last"
    );
    store.close().unwrap();
}

// redb only: the log's layout. A claim's entry grows when the request completes; unless the
// claim reserved room for the response, the grown entry splits its B-tree leaf into two
// half-full ones, which nothing fills again (new entries go to the log's last leaf): a lone
// caller's log ended up half empty, pages that every open's checks read.
#[test]
fn a_lone_callers_log_stays_packed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("packed.redb");
    let store = builder(&clock())
        .durability(Durability::None)
        .open(&path)
        .unwrap();
    let response = [7u8; 200];
    for i in 0..3000 {
        let k = key(&format!("k{i}"));
        started(&store, &k, &fp("body"))
            .complete(&response)
            .unwrap();
    }
    store.close().unwrap();
    let db = ::redb::ReadOnlyDatabase::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let def: TableDefinition<u64, &[u8]> = TableDefinition::new("idemstore_log");
    let stats = txn.open_table(def).unwrap().stats().unwrap();
    let fill = stats.stored_bytes() as f64 / (stats.leaf_pages() * 4096) as f64;
    assert!(
        fill > 0.85,
        "the log's leaves are {:.0} % full ({} bytes of entries in {} leaves)",
        fill * 100.0,
        stats.stored_bytes(),
        stats.leaf_pages()
    );
}

/// The format version a running store reports.
fn format_version_of_open(store: &Store) -> u32 {
    store.summary().unwrap().format_version
}

/// A record in format version 1's record codec (documented in `src/record.rs`).
fn v1_record(state: u8, fp: &[u8; 32], token: u64, fields: &[u64], tail: &[u8]) -> Vec<u8> {
    let mut v = vec![1, state];
    v.extend_from_slice(fp);
    v.extend_from_slice(&token.to_be_bytes());
    for f in fields {
        v.extend_from_slice(&f.to_be_bytes());
    }
    v.extend_from_slice(tail);
    v
}

/// Writes a store in format version 1 by hand (as idemstore 0.1 before the log layout did):
/// `idemstore_records` keyed by the encoded key, `idemstore_expiry` keyed by death time and
/// key. Returns (completed key, in-flight key).
fn write_v1_store(path: &Path) -> (Key, Key) {
    let now = start().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let encode = |k: &Key| {
        let mut v = vec![k.scope().len() as u8];
        v.extend_from_slice(k.scope().as_bytes());
        v.extend_from_slice(k.id().as_bytes());
        v
    };
    let (done, running) = (key("v1-done"), key("v1-running"));
    let ttl = TTL.as_nanos() as u64;
    let done_record = {
        let mut tail = 5u32.to_be_bytes().to_vec();
        tail.extend_from_slice(b"hello");
        v1_record(2, fp("done").as_bytes(), 1, &[now, now + ttl], &tail)
    };
    let lease_end = now + LEASE.as_nanos() as u64;
    let mut tail = 1u32.to_be_bytes().to_vec();
    tail.push(0);
    let running_record = v1_record(
        2 - 1,
        fp("run").as_bytes(),
        2,
        &[now, now + ttl, lease_end],
        &tail,
    );
    let db = ::redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let meta_def: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore_meta");
        let records_def: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idemstore_records");
        let expiry_def: TableDefinition<&[u8], ()> = TableDefinition::new("idemstore_expiry");
        let mut meta = txn.open_table(meta_def).unwrap();
        meta.insert("magic", &b"idemstore"[..]).unwrap();
        meta.insert("format_version", &1u32.to_be_bytes()[..])
            .unwrap();
        meta.insert("last_token", &2u64.to_be_bytes()[..]).unwrap();
        let mut records = txn.open_table(records_def).unwrap();
        let mut expiry = txn.open_table(expiry_def).unwrap();
        for (k, rec) in [(&done, &done_record), (&running, &running_record)] {
            records
                .insert(encode(k).as_slice(), rec.as_slice())
                .unwrap();
            let mut e = (now + ttl).to_be_bytes().to_vec();
            e.extend_from_slice(&encode(k));
            expiry.insert(e.as_slice(), ()).unwrap();
        }
    }
    txn.commit().unwrap();
    (done, running)
}

// redb only: the file format check.
#[test]
fn a_format_version_1_store_is_refused_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    write_v1_store(&path);
    assert_refused_unchanged(&path);
}

/// A store file with a few records, closed, as bytes.
fn store_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("source.redb");
    let store = builder(&clock()).open(&path).unwrap();
    for i in 0..20 {
        let k = key(&format!("k{i}"));
        started(&store, &k, &fp("body"))
            .complete(&noise(300, i))
            .unwrap();
    }
    store.close().unwrap();
    std::fs::read(&path).unwrap()
}

/// Opening damaged bytes gives a store or a typed error, never a panic; a store that opens
/// still works.
fn assert_opens_or_refuses_cleanly(path: &Path) {
    match builder(&clock()).open(path) {
        Ok(store) => {
            // Whatever survived is usable: reads answer, a new key completes.
            let _ = store.get(&key("k0"));
            let k = key("after-damage");
            if let Ok(Begin::Started(lease)) = store.begin(&k, &fp("x")) {
                let _ = lease.complete(b"ok");
            }
            let _ = store.close();
        }
        Err(
            e @ (Error::Corrupt { .. } | Error::IncompatibleFormat { .. } | Error::Storage { .. }),
        ) => {
            // An open wrote nothing of the caller's, and deleting the file would forget every
            // key: no message says either.
            let text = e.to_string();
            assert!(!text.contains("outcome"), "{text}");
            assert!(!text.contains("delete"), "{text}");
        }
        Err(other) => panic!("unexpected error for a damaged file: {other:?}"),
    }
}

// redb only: damaged store files.
#[test]
fn truncated_store_files_are_refused_or_opened_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = store_bytes(dir.path());
    let path = dir.path().join("truncated.redb");
    for cut in [
        1,
        9,
        100,
        4096,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert_opens_or_refuses_cleanly(&path);
    }
}

// redb only: damaged store files.
#[test]
fn bit_flipped_store_files_are_refused_or_opened_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = store_bytes(dir.path());
    let path = dir.path().join("flipped.redb");
    let mut refused = 0;
    for i in 0..64u64 {
        let mut damaged = bytes.clone();
        // Spread over the header and the pages; a fixed pattern, so failures reproduce.
        let at = ((i * 2_654_435_761) % bytes.len() as u64) as usize;
        damaged[at] ^= 1 << (i % 8);
        std::fs::write(&path, &damaged).unwrap();
        if builder(&clock()).open(&path).map(|s| s.close()).is_err() {
            refused += 1;
        }
        std::fs::write(&path, &damaged).unwrap();
        assert_opens_or_refuses_cleanly(&path);
    }
    eprintln!("{refused} of 64 bit-flipped files refused");
}

/// Makes `path` unwritable: mode 0400, or, for root (who ignores modes), the immutable
/// attribute. Returns false when neither is possible here.
#[cfg(unix)]
fn make_unwritable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
    if std::fs::OpenOptions::new().write(true).open(path).is_err() {
        return true;
    }
    std::process::Command::new("chattr")
        .arg("+i")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
        && std::fs::OpenOptions::new().write(true).open(path).is_err()
}

// redb only: the store file's permissions.
#[cfg(unix)]
#[test]
fn a_file_we_may_not_write_is_a_storage_error_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("readonly.redb");
    let store = builder(&clock()).open(&path).unwrap();
    use_store(&store);
    store.close().unwrap();
    let before = std::fs::read(&path).unwrap();
    if !make_unwritable(&path) {
        eprintln!("skipped: cannot make a file unwritable here (root without chattr)");
        return;
    }
    let result = builder(&clock()).open(&path);
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&path)
        .status();
    match result {
        Err(e @ Error::Storage { .. }) => {
            let text = e.to_string();
            assert!(!text.contains("outcome"), "{text}");
        }
        other => panic!("expected a Storage error, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was modified"
    );
}

// redb only: the file's lock (replicas share a PostgreSQL schema by design).
#[test]
fn opening_the_same_file_twice_is_already_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("twice.redb");
    let first = builder(&clock()).open(&path).unwrap();
    use_store(&first);
    for attempt in 0..2 {
        match builder(&clock()).open(&path) {
            Err(Error::AlreadyOpen { path: p }) => assert_eq!(p, path),
            other => panic!("attempt {attempt}: expected AlreadyOpen, got {other:?}"),
        }
    }
    assert!(matches!(Store::open(&path), Err(Error::AlreadyOpen { .. })));
    // The first store is unharmed.
    assert_eq!(
        replay(&first, &key("probe"), &fp("probe")).response(),
        b"probe"
    );
    let l = started(&first, &key("after"), &fp("x"));
    l.complete(b"fine").unwrap();

    // close() releases the file: a new open succeeds and sees the data.
    first.close().unwrap();
    let second = builder(&clock()).open(&path).unwrap();
    assert_eq!(replay(&second, &key("after"), &fp("x")).response(), b"fine");

    // Dropping the last clone releases it as well.
    let clone = second.clone();
    drop(second);
    assert!(matches!(
        builder(&clock()).open(&path),
        Err(Error::AlreadyOpen { .. })
    ));
    drop(clone);
    let third = builder(&clock()).open(&path).unwrap();
    third.close().unwrap();
}

fn clones_and_leases_used_after_close_get_closed(place: &Place) {
    let kind = place.engine();
    {
        let t = open(place, |b| b);
        let store = t.store.clone();
        let k = key("closed");
        let f = fp("body");
        started(&store, &key("done"), &f).complete(b"x").unwrap();
        let mut l1 = started(&store, &k, &f);
        let l2 = started(&store, &key("closed-2"), &f);
        let l3 = started(&store, &key("closed-3"), &f);
        let l4 = started(&store, &key("closed-4"), &f);
        let clone = store.clone();
        store.close().unwrap();

        let closed = |r: Result<(), Error>, what: &str| {
            assert!(
                matches!(r, Err(Error::Closed)),
                "{kind:?} {what}: expected Closed, got {r:?}"
            );
        };
        closed(clone.begin(&k, &f).map(|_| ()), "begin");
        closed(clone.begin(&key("new"), &f).map(|_| ()), "begin new");
        closed(clone.get(&key("done")).map(|_| ()), "get");
        closed(clone.reap().map(|_| ()), "reap");
        closed(l1.extend(Duration::from_secs(1)), "extend");
        closed(l1.checkpoint(b"cp"), "checkpoint");
        closed(l2.complete(b"x").map(|_| ()), "complete");
        closed(l3.abandon(), "abandon");
        drop(l4); // a silent no-op
        drop(l1);
        let _ = clone.stats();
        // The test store handle is a clone too.
        closed(t.store.get(&k).map(|_| ()), "get on another clone");
        // Closing again is harmless.
        clone.close().unwrap();

        if kind.durable() {
            // The file or schema was released and holds what was acknowledged before close.
            let store = t.open_again(|b| b);
            assert_eq!(replay(&store, &key("done"), &f).response(), b"x");
            assert_eq!(in_flight(&store, &k, &f), LEASE);
            store.close().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time edge cases

fn durations_that_overflow_system_time_do_not_panic(place: &Place) {
    with_store_with(
        place,
        |b| b.ttl(Duration::MAX).lease(Duration::MAX),
        |t| {
            let (store, clock) = (&t.store, &t.clock);
            let k = key("forever");
            let f = fp("body");
            let mut lease = started(store, &k, &f);
            let _ = lease.expires_at();
            assert!(in_flight(store, &k, &f) > Duration::from_secs(100 * 365 * 24 * 3600));
            lease.extend(Duration::MAX).unwrap();
            lease.checkpoint(b"cp").unwrap();
            let _ = get_in_flight(store, &k);
            let done = lease.complete(b"kept forever").unwrap();
            let _ = (done.completed_at(), done.expires_at());
            assert!(done.expires_at() > done.completed_at());

            // Two hundred years later it is still alive.
            clock.advance(Duration::from_secs(200 * 365 * 24 * 3600));
            assert_eq!(replay(store, &k, &f).response(), b"kept forever");
            assert_eq!(store.reap().unwrap(), 0);
            // A clock past what the store can represent (year 2262): a clear error for each
            // call, nothing stored, no panic.
            clock.advance(Duration::from_secs(400 * 365 * 24 * 3600));
            assert!(matches!(store.get(&k), Err(Error::Clock { .. })));
            assert!(matches!(store.begin(&k, &f), Err(Error::Clock { .. })));
            assert!(matches!(
                store.begin(&key("late"), &f),
                Err(Error::Clock { .. })
            ));
            assert!(matches!(store.reap(), Err(Error::Clock { .. })));
            // The bad readings were not kept: with the clock back, the record is there.
            clock.set(idemstore::Clock::now(clock) - Duration::from_secs(400 * 365 * 24 * 3600));
            assert_eq!(replay(store, &k, &f).response(), b"kept forever");
        },
    );
    // A huge extend on a store with ordinary settings, and a clock before 1970.
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let mut lease = started(store, &key("huge-extend"), &fp("b"));
        lease.extend(Duration::MAX).unwrap();
        assert!(in_flight(store, &key("huge-extend"), &fp("b")) > TTL);
        lease.complete(b"ok").unwrap();
        clock.set(UNIX_EPOCH - Duration::from_secs(3600));
        assert!(matches!(
            store.get(&key("huge-extend")),
            Err(Error::Clock { .. })
        ));
        assert!(matches!(
            store.begin(&key("pre-epoch"), &fp("b")),
            Err(Error::Clock { .. })
        ));
        assert!(matches!(store.reap(), Err(Error::Clock { .. })));
    });
}

fn a_clock_going_backwards_does_not_resurrect_a_dead_record(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("no-resurrection");
        let f = fp("body");
        let done = started(store, &k, &f).complete(b"old").unwrap();
        clock.set(done.expires_at());
        assert_eq!(store.get(&k).unwrap(), None, "dead at expires_at");

        // The clock jumps back before the death time: the record stays dead.
        clock.set(done.completed_at() + Duration::from_secs(1));
        assert_eq!(
            store.get(&k).unwrap(),
            None,
            "{:?}: resurrected by get",
            t.engine
        );
        match store.begin(&k, &f).unwrap() {
            Begin::Started(l) => {
                assert!(l.recovered().is_none());
                l.abandon().unwrap();
            }
            other => panic!("{:?}: a dead record came back: {other:?}", t.engine),
        }

        // The same for an in-flight record whose holder crashed.
        let k2 = key("no-resurrection-in-flight");
        let t1 = done.expires_at() + Duration::from_secs(10);
        clock.set(t1);
        std::mem::forget(started(store, &k2, &f));
        clock.set(t1 + TTL);
        assert_eq!(store.get(&k2).unwrap(), None);
        clock.set(t1 + Duration::from_secs(1));
        assert_eq!(store.get(&k2).unwrap(), None, "{:?}", t.engine);
        mismatch_is_not_returned(store, &k2);
    });
}

fn mismatch_is_not_returned(store: &Store, k: &Key) {
    match store.begin(k, &fp("another body")).unwrap() {
        Begin::Started(l) => {
            assert!(l.recovered().is_none());
            l.abandon().unwrap();
        }
        other => panic!("a dead in-flight record came back: {other:?}"),
    }
}

fn a_clock_going_backwards_does_not_expire_anything_early(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let f = fp("body");
        let t0 = idemstore::Clock::now(clock);
        let kl = key("lease-after-jump");
        let kc = key("completed-after-jump");
        let lease = started(store, &kl, &f);
        let lease_left = lease.expires_at().duration_since(t0).unwrap();
        std::mem::forget(lease);
        let done = started(store, &kc, &f).complete(b"kept").unwrap();
        let ttl_left = done.expires_at().duration_since(t0).unwrap();

        // A step back within the tolerance (half a second) is absorbed: nothing moves.
        clock.set(t0 - Duration::from_millis(500));
        assert_eq!(in_flight(store, &kl, &f), lease_left);

        // Back by an hour: taken as a corrected clock. The records keep the time they had
        // left, counted from the correction: nothing expires early, nothing waits an hour more.
        let back = t0 - Duration::from_secs(3600);
        clock.set(back);
        assert_eq!(in_flight(store, &kl, &f), lease_left);
        assert_eq!(replay(store, &kc, &f).response(), b"kept");
        assert_eq!(store.reap().unwrap(), 0);

        clock.set(back + lease_left - NS);
        assert!(in_flight(store, &kl, &f) >= NS, "the lease is still live");
        clock.set(back + ttl_left - NS);
        assert_eq!(replay(store, &kc, &f).response(), b"kept");
        assert_eq!(store.reap().unwrap(), 0);
        assert!(store.get(&kl).unwrap().is_some());
        clock.set(back + ttl_left);
        assert_eq!(
            store.get(&kc).unwrap(),
            None,
            "dead one TTL after the correction"
        );

        // A lease granted after the correction does not run out before its own end.
        let k3 = key("granted-behind");
        let granted = idemstore::Clock::now(clock);
        std::mem::forget(started(store, &k3, &f));
        clock.set(granted + LEASE - NS);
        assert!(in_flight(store, &k3, &f) >= NS);
    });
}

fn durability_none_is_accepted(place: &Place) {
    // Settings other than the defaults open fine on both backends.
    with_store_with(
        place,
        |b| b.durability(Durability::None),
        |t| use_store(&t.store),
    );
}

idemstore_testkit::engine_tests! {
    every:
        key_parts_cannot_run_into_each_other,
        response_at_the_limit_is_stored,
        too_large_complete_stores_nothing_and_releases_the_lease,
        too_large_checkpoint_stores_nothing_and_keeps_the_lease,
        default_limit_is_four_mebibytes,
        zero_ttl_or_lease_is_invalid_config,
        clones_and_leases_used_after_close_get_closed,
        durations_that_overflow_system_time_do_not_panic,
        a_clock_going_backwards_does_not_resurrect_a_dead_record,
        durability_none_is_accepted,
    ;
    // Not on PostgreSQL yet: its engine keeps the store's time from going back (a floor per
    // process) but has no clock corrections, so after the clock is set back by an hour its
    // records wait out that hour instead of dying one TTL after the correction.
    redb:
        a_clock_going_backwards_does_not_expire_anything_early,
    ;
}
