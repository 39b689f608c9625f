//! The check of a crash image: what a fault or a power cut left on disk must open as a store
//! holding what was acknowledged.
//!
//! [`ImageChecker::check`] takes an image (from [`Faults`]) and checks
//! that redb's integrity check passes on it, that it opens as a store, that the state of the
//! test's keys is one the test accepts (every acknowledged change there, the failed one wholly
//! there or wholly absent), and that the next token granted exceeds every token acknowledged or
//! stored.
//!
//! One exception: redb writes its magic number last when it creates a file, so a crash during
//! the creation of the store can leave a non-empty file without it. Nothing was acknowledged
//! then; the store must refuse such a file (`IncompatibleFormat`) and leave it unchanged.

use std::path::PathBuf;

use idemstore::{Begin, Builder, Entry, Error, Fingerprint, Key, Store};

use crate::fault::{Faults, FaultyBackend};

/// The first bytes of every redb file, written last when a file is created.
pub const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// The state of the test's keys, as `get` sees them.
pub type Snapshot = Vec<Option<Entry>>;

/// `get` of every key of `keys`.
///
/// # Errors
///
/// The first error `get` returns.
pub fn snapshot(store: &Store, keys: &[Key]) -> Result<Snapshot, Error> {
    keys.iter().map(|k| store.get(k)).collect()
}

/// The highest token held by an entry of `state`, 0 if none.
pub fn tokens_in(state: &[Option<Entry>]) -> u64 {
    state
        .iter()
        .flatten()
        .map(|e| match e {
            Entry::Completed(done) => done.token(),
            Entry::InFlight { token, .. } => *token,
        })
        .max()
        .unwrap_or(0)
}

/// Whether the state found in a reopened image is one the test accepts; `Err` says why not.
pub type Accept<'a> = dyn Fn(&[Option<Entry>]) -> Result<(), String> + 'a;

/// What a reopened image must show.
pub struct Expect<'a> {
    /// The keys whose state is read.
    pub keys: &'a [Key],
    /// Every token acknowledged before the crash; the next one granted must exceed it (and
    /// every token stored).
    pub min_token: u64,
    /// The crash hit while the store was being created: an image without redb's magic number
    /// is possible (and must be refused).
    pub creating: bool,
    /// Whether the state found is one the test accepts; `Err` says why not.
    pub accept: &'a Accept<'a>,
}

/// A store opened on a crash image that passed the check.
pub struct Reopened {
    /// The store, open on a copy of the image.
    pub store: Store,
    /// The backend's handle, when the copy is in memory (else on a file).
    pub faults: Option<Faults>,
    /// The state of the keys as found.
    pub state: Snapshot,
    /// The token the check's own claim was granted (abandoned since).
    pub probe_token: u64,
    file: Option<PathBuf>,
}

impl Reopened {
    /// Closes the store (and removes its file, if on a file).
    ///
    /// # Panics
    ///
    /// When the close fails.
    pub fn close(self) {
        self.store.close().expect("close the reopened image");
        if let Some(file) = self.file {
            std::fs::remove_file(file).expect("remove the image file");
        }
    }
}

/// Opens crash images: every `file_every`-th one through `Builder::open` of a real file (the
/// production path: the read-only check, then recovery), the others on an in-memory
/// [`FaultyBackend`] (no fsync: fast).
pub struct ImageChecker {
    dir: tempfile::TempDir,
    file_every: u64,
    /// Images checked.
    pub checked: u64,
    /// Images opened through a file.
    pub via_file: u64,
    /// Images of a store whose creation was cut short, refused as not a redb file.
    pub refused_half_created: u64,
}

impl ImageChecker {
    /// A checker opening every `file_every`-th image through a file (0: never).
    ///
    /// # Panics
    ///
    /// When no temporary directory can be made.
    pub fn new(file_every: u64) -> ImageChecker {
        ImageChecker {
            dir: tempfile::tempdir().expect("tempdir"),
            file_every,
            checked: 0,
            via_file: 0,
            refused_half_created: 0,
        }
    }

    /// Checks that the crash left in `image` is a store holding what `expect` accepts (see
    /// the module doc), opening it with `builder()`. `None` when the image is a half-created
    /// file, refused as it must be.
    ///
    /// # Panics
    ///
    /// When any of it does not hold, with `what` in the message.
    pub fn check(
        &mut self,
        what: &str,
        image: &[u8],
        builder: &dyn Fn() -> Builder,
        expect: &Expect<'_>,
    ) -> Option<Reopened> {
        self.checked += 1;
        let path = self.dir.path().join(format!("image-{}.redb", self.checked));
        if !image.is_empty() && !image.starts_with(&REDB_MAGIC) {
            assert!(
                expect.creating,
                "{what}: an image without redb's magic number after the store was created"
            );
            std::fs::write(&path, image).expect("write the image");
            match builder().open(&path) {
                Err(Error::IncompatibleFormat { .. }) => {}
                other => {
                    panic!("{what}: half-created file: expected IncompatibleFormat, got {other:?}")
                }
            }
            assert!(
                std::fs::read(&path).expect("read the image") == image,
                "{what}: refused file modified"
            );
            std::fs::remove_file(&path).expect("remove the image");
            self.refused_half_created += 1;
            return None;
        }
        integrity(what, image);

        let via_file = self.file_every > 0 && self.checked.is_multiple_of(self.file_every);
        let (store, faults, file) = if via_file {
            self.via_file += 1;
            std::fs::write(&path, image).expect("write the image");
            (builder().open(&path), None, Some(path))
        } else {
            let (backend, faults) = FaultyBackend::in_memory(image);
            (builder().open_backend(backend), Some(faults), None)
        };
        let store = store.unwrap_or_else(|e| panic!("{what}: the store does not reopen: {e:?}"));
        let state = snapshot(&store, expect.keys).unwrap_or_else(|e| panic!("{what}: get: {e:?}"));
        if let Err(why) = (expect.accept)(&state) {
            panic!("{what}: {why}");
        }
        let floor = expect.min_token.max(tokens_in(&state));
        let probe = Key::new("testkit", "probe").expect("key");
        let probe_token = match store.begin(&probe, &Fingerprint::of(b"probe")) {
            Ok(Begin::Started(lease)) => {
                let token = lease.token();
                assert!(
                    token > floor,
                    "{what}: token {token} granted after reopen, {floor} acknowledged or stored"
                );
                lease
                    .abandon()
                    .unwrap_or_else(|e| panic!("{what}: abandon: {e:?}"));
                token
            }
            other => panic!("{what}: begin on a fresh key after reopen: {other:?}"),
        };
        Some(Reopened {
            store,
            faults,
            state,
            probe_token,
            file,
        })
    }
}

/// redb's own integrity check, on a copy of `image` (an empty image passes).
///
/// # Panics
///
/// When redb cannot open the image or finds it damaged, with `what` in the message.
pub fn integrity(what: &str, image: &[u8]) {
    if image.is_empty() {
        return;
    }
    let mut db = redb::Builder::new()
        .create_with_backend(crate::fault::memory(image))
        .unwrap_or_else(|e| panic!("{what}: redb cannot open the image: {e}"));
    match db.check_integrity() {
        Ok(true) => {}
        other => panic!("{what}: redb integrity check: {other:?}"),
    }
}
