//! Arbitrary bytes as a store file: a clean refusal or a working store, never a panic.
//!
//! The bytes are written to a temporary file and opened with `Store::open`'s builder. The
//! open must return `Ok` or a typed `Error`, never panic, and never hang. On `Err`, the file
//! must be unchanged, unless it is a redb file that needs crash recovery (such a
//! file is repaired before it can be checked; redb's own read-only open tells which). On `Ok`,
//! a `begin` / `complete` / replay / `close` round must answer with values or typed errors.
//!
//! Input: the first byte picks the mode.
//! * even: the rest of the input is the file, as is;
//! * odd: a real redb file is built once (an idemstore store with a few records when
//!   `mode & 2 == 0`, else a redb file of another program) and the rest of the input patches
//!   it: an optional truncation, then `(offset: u24 LE, xor mask: u8)` triples. This reaches
//!   the damaged-file paths that raw bytes almost never do.
//!
//! Panics inside the storage engine that idemstore catches and turns into `Error::Corrupt`
//! (its guards around the engine on damaged files) are part of the contract, so this target
//! lets panics unwind; one that escapes idemstore on the calling thread is a crash, and one
//! that kills the committer thread shows as `Error::Closed` before `close`, also a failure.
//! Set `IDEMSTORE_FUZZ_STRICT_PANICS=1` to make every panic a crash (to find engine panics).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemstore::{Begin, Error, Fingerprint, Key, Store};
use idemstore_testkit::store::scratch_dir;
use libfuzzer_sys::fuzz_target;

const KEY: (&str, &str) = ("fuzz", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11");

/// Engine panics caught by idemstore's guard (reported, not a failure).
static CAUGHT: AtomicU64 = AtomicU64::new(0);

fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("IDEMSTORE_FUZZ_STRICT_PANICS").is_some() {
            return; // keep libfuzzer-sys's hook: every panic aborts
        }
        // Every panic unwinds: idemstore's guards turn it into `Error::Corrupt`. One that
        // escapes on the fuzzing thread reaches libfuzzer-sys, which aborts; one that kills
        // the committer thread shows as `Error::Closed` before `close`, which `exercise`
        // refuses.
        std::panic::set_hook(Box::new(|info| {
            let n = CAUGHT.fetch_add(1, Ordering::Relaxed);
            if n < 3 {
                eprintln!(
                    "note: engine panic (idemstore should catch it): {info}\n{}",
                    std::backtrace::Backtrace::capture()
                );
            }
        }));
    });
}

fn builder() -> idemstore::Builder {
    Store::builder()
        .reap_interval(None)
        .cache_bytes(1 << 20)
        .lease(Duration::from_secs(30))
}

/// The two base files of the patch mode, built once.
fn bases() -> &'static [Vec<u8>; 2] {
    static BASES: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    BASES.get_or_init(|| {
        let dir = scratch_dir("idemstore-fuzz");
        let ours = dir.path().join("ours.redb");
        let store = builder().open(&ours).expect("create a store");
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let key = Key::new("base", id).expect("key");
            let fp = Fingerprint::of(id.as_bytes());
            if let Begin::Started(mut lease) = store.begin(&key, &fp).expect("begin") {
                match i {
                    0 => drop(lease.complete(b"response a").expect("complete")),
                    1 => lease.checkpoint(b"checkpoint b").expect("checkpoint"),
                    _ => lease.abandon().expect("abandon"),
                }
            }
        }
        store.close().expect("close");
        let foreign = dir.path().join("foreign.redb");
        {
            let db = redb::Database::create(&foreign).expect("redb file");
            let txn = db.begin_write().expect("write");
            {
                let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("counts");
                let mut t = txn.open_table(def).expect("table");
                t.insert("x", 1).expect("insert");
            }
            txn.commit().expect("commit");
        }
        [
            std::fs::read(&ours).expect("read"),
            std::fs::read(&foreign).expect("read"),
        ]
    })
}

fn file_bytes(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut file = bases()[usize::from(mode & 2 != 0)].clone();
    let mut patch = rest;
    if mode & 4 != 0
        && let [a, b, c, tail @ ..] = patch
    {
        let cut = u32::from_le_bytes([*a, *b, *c, 0]) as usize;
        file.truncate(cut % (file.len() + 1));
        patch = tail;
    }
    for t in patch.chunks_exact(4) {
        if file.is_empty() {
            break;
        }
        let at = u32::from_le_bytes([t[0], t[1], t[2], 0]) as usize % file.len();
        file[at] ^= t[3];
    }
    file
}

/// Writes `bytes` to a scratch copy and opens it with redb read-only (which never writes).
fn read_only<T>(
    dir: &Path,
    bytes: &[u8],
    f: impl FnOnce(redb::ReadOnlyDatabase) -> T,
) -> Option<T> {
    let copy = dir.join("copy.redb");
    std::fs::write(&copy, bytes).expect("write the copy");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        redb::Builder::new()
            .set_cache_size(1 << 20)
            .open_read_only(&copy)
    }));
    match result {
        Ok(Ok(db)) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(db))).ok(),
        _ => None,
    }
}

/// Whether redb itself would have to repair the file before reading it (a crash left it
/// mid-commit).
fn needs_recovery(dir: &Path, bytes: &[u8]) -> bool {
    let copy = dir.join("copy.redb");
    std::fs::write(&copy, bytes).expect("write the copy");
    let result = std::panic::catch_unwind(|| {
        matches!(
            redb::Builder::new()
                .set_cache_size(1 << 20)
                .open_read_only(&copy),
            Err(redb::DatabaseError::RepairAborted)
        )
    });
    result.unwrap_or(false)
}

/// Whether the file is an idemstore store (its meta table holds idemstore's marker), damaged
/// or not: only such a file (or one that needs recovery) may be modified by a refused open.
fn is_ours(dir: &Path, bytes: &[u8]) -> bool {
    use redb::ReadableDatabase;
    let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("idemstore_meta");
    read_only(dir, bytes, |db| {
        let txn = db.begin_read().ok()?;
        let table = txn.open_table(meta).ok()?;
        let magic = table.get("magic").ok()??;
        Some(magic.value() == b"idemstore")
    })
    .flatten()
    .unwrap_or(false)
}

fn exercise(store: Store) {
    let key = Key::new(KEY.0, KEY.1).expect("key");
    let fp = Fingerprint::of(b"POST /v1/charges");
    let typed = |what: &str, e: Error| match e {
        Error::Corrupt { .. }
        | Error::Storage { .. }
        | Error::Poisoned
        | Error::IncompatibleFormat { .. } => {}
        other => panic!("{what}: unexpected error {other:?}"),
    };
    match store.begin(&key, &fp) {
        Ok(Begin::Started(lease)) => match lease.complete(b"201 created") {
            Ok(done) => {
                assert_eq!(done.response(), b"201 created");
                match store.begin(&key, &fp) {
                    Ok(Begin::Replay(again)) => assert_eq!(again.response(), b"201 created"),
                    Ok(other) => panic!("after complete, begin answered {other:?}"),
                    Err(e) => typed("begin after complete", e),
                }
            }
            Err(e) => typed("complete", e),
        },
        // A damaged file may hold a record under this key already.
        Ok(_) => {}
        Err(e) => typed("begin", e),
    }
    let _ = store.get(&key).map_err(|e| typed("get", e));
    let _ = store.reap().map_err(|e| typed("reap", e));
    if let Err(e) = store.close() {
        typed("close", e);
    }
}

fuzz_target!(|data: &[u8]| {
    install_panic_hook();
    let bytes = file_bytes(data);
    let dir = scratch_dir("idemstore-fuzz");
    let path: PathBuf = dir.path().join("store.redb");
    std::fs::write(&path, &bytes).expect("write the file");
    match builder().open(&path) {
        Ok(store) => exercise(store),
        Err(e) => {
            let shown = e.to_string();
            match e {
                Error::IncompatibleFormat { .. }
                | Error::Corrupt { .. }
                | Error::Storage { .. } => {}
                other => panic!("open failed with an unexpected error: {other:?}"),
            }
            let after = std::fs::read(&path).expect("read the file back");
            if after != bytes {
                assert!(
                    needs_recovery(dir.path(), &bytes) || is_ours(dir.path(), &bytes),
                    "open refused a file that is not a store ({shown}) and modified it, though it \
                     needed no recovery"
                );
            }
        }
    }
});
