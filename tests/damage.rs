//! Damaged bytes are never taken for good ones: a damaged newest commit after a crash is
//! refused at open (never silently rolled back to the commit before it), and a response
//! damaged while the store runs is `Corrupt`, never replayed.

use std::path::Path;

use idemstore::{Begin, Durability, Entry, Error, Store};
use idemstore_testkit::store::{builder, clock, fp, key, started};

/// Copies the file as it is on disk now. Taken while the store is still open after an
/// acknowledged (fsync'd) write, this is the image a power cut at that instant leaves.
fn image(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read the store file")
}

/// What opening a damaged crash image gave for the last acknowledged completion.
#[derive(Debug, Default)]
struct Sweep {
    /// Offsets flipped.
    flipped: usize,
    /// Open refused the file (any error).
    refused: usize,
    /// Opened, and the completion read back exactly (the flip hit nothing that matters).
    intact: usize,
    /// Opened, and reading the completion gave `Corrupt`.
    corrupt_on_read: usize,
    /// Opened, and the acknowledged completion was gone or changed with no error: the loss
    /// this test exists to rule out.
    silent_losses: Vec<(usize, String)>,
}

/// Writes 20 completed keys, then one more whose completion is the newest commit; returns the
/// crash image after that completion and the bytes that commit changed (their offsets).
fn crash_image(dir: &Path, durability: Durability) -> (Vec<u8>, Vec<usize>) {
    let path = dir.join("crashed.redb");
    let clock = clock();
    let store = builder(&clock)
        .durability(durability)
        .open(&path)
        .expect("open");
    for i in 0..20 {
        let k = key(&format!("k-{i}"));
        started(&store, &k, &fp("body"))
            .complete(b"older")
            .expect("complete");
    }
    let last = key("last");
    let lease = started(&store, &last, &fp("body"));
    let before = image(&path);
    lease
        .complete(b"the last acknowledged response")
        .expect("complete");
    let after = image(&path);
    // The store is never closed: the image is that of a crash right after the completion.
    std::mem::forget(store);
    let changed = (0..after.len())
        .filter(|&i| before.get(i) != Some(&after[i]))
        .collect();
    (after, changed)
}

fn sweep(image: &[u8], offsets: &[usize], dir: &Path) -> Sweep {
    let mut sweep = Sweep::default();
    let path = dir.join("flipped.redb");
    for &offset in offsets {
        let mut damaged = image.to_vec();
        damaged[offset] ^= 0x5A;
        std::fs::write(&path, &damaged).expect("write the damaged image");
        sweep.flipped += 1;
        let clock = clock();
        match builder(&clock).open(&path) {
            Err(_) => sweep.refused += 1,
            Ok(store) => {
                match store.get(&key("last")) {
                    Ok(Some(Entry::Completed(done)))
                        if done.response() == b"the last acknowledged response" =>
                    {
                        sweep.intact += 1
                    }
                    Err(Error::Corrupt { .. }) => sweep.corrupt_on_read += 1,
                    other => sweep.silent_losses.push((offset, format!("{other:?}"))),
                }
                let _ = store.close();
            }
        }
    }
    sweep
}

/// No flip of a byte of the newest commit (or the header) in a crash image may make the store
/// open with the last acknowledged completion missing or changed: either the open is refused
/// (`Corrupt`), or the completion reads back.
#[test]
fn a_damaged_newest_commit_is_refused_never_silently_rolled_back() {
    let sweep = sweep_crash_image(Durability::Immediate);
    assert!(
        sweep.silent_losses.is_empty(),
        "{} of {} flips opened with the last acknowledged completion lost, first: {:?}",
        sweep.silent_losses.len(),
        sweep.flipped,
        &sweep.silent_losses[..sweep.silent_losses.len().min(5)]
    );
}

/// The documented risk of `Durability::ImmediateOnePhase`: the same sweep finds silent losses
/// (this is what the default's two-phase commit prevents).
#[test]
fn one_phase_commits_lose_the_newest_commit_silently_when_it_is_damaged() {
    let sweep = sweep_crash_image(Durability::ImmediateOnePhase);
    assert!(
        !sweep.silent_losses.is_empty(),
        "no silent loss with one-phase commits: {sweep:?}"
    );
}

/// Flips, one at a time, every byte that the newest commit changed in a crash image, and the
/// file header, and opens each result.
fn sweep_crash_image(durability: Durability) -> Sweep {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, changed) = crash_image(dir.path(), durability);
    assert!(!changed.is_empty(), "the last commit changed no byte");
    let mut offsets = changed;
    // The header and both commit slots live in the first page.
    offsets.extend(0..4096.min(image.len()));
    offsets.sort_unstable();
    offsets.dedup();
    let sweep = sweep(&image, &offsets, dir.path());
    eprintln!(
        "{durability:?}: byte flips over a crash image: {} offsets, {} refused at open, {} \
         intact, {} corrupt on read, {} silent losses",
        sweep.flipped,
        sweep.refused,
        sweep.intact,
        sweep.corrupt_on_read,
        sweep.silent_losses.len()
    );
    sweep
}

/// A response byte damaged on disk while the store runs (another handle writes the file) is
/// `Corrupt` on the next replay and `get`, never replayed as it is.
#[test]
fn a_response_damaged_while_the_store_runs_is_corrupt_never_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let clock = clock();
    // A small page cache, so the read goes to the file and not to a cached page.
    let store: Store = builder(&clock).cache_bytes(0).open(&path).expect("open");
    let k = key("k");
    let marker = b"RESPONSE-MARKER-0123456789-RESPONSE-MARKER".repeat(4);
    started(&store, &k, &fp("body"))
        .complete(&marker)
        .expect("complete");
    let bytes = image(&path);
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_slice())
        .expect("the response is in the file");
    // Another handle changes one byte in the middle of the stored response.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("second handle");
        f.seek(SeekFrom::Start((at + marker.len() / 2) as u64))
            .expect("seek");
        f.write_all(b"X").expect("damage");
        f.sync_all().expect("sync");
    }
    match store.begin(&k, &fp("body")) {
        Err(Error::Corrupt { .. }) => {}
        Ok(Begin::Replay(done)) => {
            panic!(
                "a damaged response was replayed ({} bytes, intact: {})",
                done.response().len(),
                done.response() == marker.as_slice()
            )
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(store.get(&k), Err(Error::Corrupt { .. })));
    let _ = store.close();
}
