//! A clock that was wrong once does not freeze the store: after a forward jump of any size is
//! corrected, every lease runs out within one lease duration of the correction and every
//! record dies within one TTL of it, the records written during the glitch included; and the
//! reaper deletes them. Tested in one process with a `ManualClock`, and across a crash: a child
//! process writes under a clock 20 years ahead and aborts, the parent reopens with the right
//! clock.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use idemstore::{Begin, ManualClock, Store};
use idemstore_testkit::engine::Place;
use idemstore_testkit::store::{LEASE, TTL, builder, clock, fp, key, start, started, with_store};

const GLITCH: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
const CHILD_ENV: &str = "IDEMSTORE_CLOCK_GLITCH_CHILD";
const CHILD_TEST: &str = "glitched_child_writes_and_aborts";

fn retry_after(store: &Store, id: &str) -> Duration {
    match store.begin(&key(id), &fp("body")).expect("begin") {
        Begin::InFlight { retry_after } => retry_after,
        other => panic!("{id}: expected InFlight, got {other:?}"),
    }
}

/// What the glitched writer leaves: `held` in flight (its holder gone), `done` completed.
fn write_under_glitch(store: &Store) {
    std::mem::forget(started(store, &key("held"), &fp("body")));
    started(store, &key("done"), &fp("body"))
        .complete(b"written during the glitch")
        .expect("complete");
}

/// After the correction at `corrected`: the crashed holder's lease runs out within one lease
/// and the key is taken over; the completion is replayed until one TTL after the correction,
/// then it is absent and the reaper deletes the dead records.
fn check_recovers(store: &Store, clock: &ManualClock, corrected: SystemTime) {
    let left = retry_after(store, "held");
    assert!(
        left <= LEASE,
        "a lease written during the glitch waits {left:?}, more than one lease"
    );
    match store.begin(&key("done"), &fp("body")).expect("begin") {
        Begin::Replay(done) => {
            assert_eq!(done.response(), b"written during the glitch");
            let dies = done.expires_at().duration_since(corrected).expect("after");
            assert!(
                dies <= TTL,
                "the completion lives {dies:?} past the correction"
            );
        }
        other => panic!("expected the replay, got {other:?}"),
    }
    clock.set(corrected + LEASE);
    match store.begin(&key("held"), &fp("body")).expect("begin") {
        Begin::Started(lease) => {
            assert!(lease.recovered().is_some(), "a takeover");
            lease.abandon().expect("abandon");
        }
        other => panic!("one lease after the correction: expected a takeover, got {other:?}"),
    }
    clock.set(corrected + TTL);
    assert_eq!(store.get(&key("done")).expect("get"), None);
    assert!(matches!(
        store.begin(&key("done"), &fp("body")).expect("begin"),
        Begin::Started(_)
    ));
    clock.set(corrected + TTL + TTL);
    assert!(
        store.reap().expect("reap") >= 1,
        "the reaper deletes what died"
    );
    assert_eq!(store.summary().expect("summary").records(), 0);
}

#[test]
fn a_forward_jump_corrected_in_the_same_process_recovers_within_a_lease_and_a_ttl() {
    for file in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = clock();
        let b = builder(&clock);
        let store = if file {
            b.open(dir.path().join("s.redb"))
        } else {
            b.open_in_memory()
        }
        .expect("open");
        clock.set(start() + GLITCH);
        write_under_glitch(&store);
        // NTP fixes the clock.
        let corrected = start() + Duration::from_secs(1);
        clock.set(corrected);
        check_recovers(&store, &clock, corrected);
        store.close().expect("close");
    }
}

#[test]
fn a_glitch_persisted_by_a_crashed_process_is_corrected_at_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("glitched.redb");
    let status = Command::new(std::env::current_exe().expect("current exe"))
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run the child");
    assert!(
        !status.success(),
        "the child must abort, not exit: {status:?}"
    );
    assert!(path.exists());
    let clock = clock();
    let corrected = start();
    let store = builder(&clock).open(&path).expect("reopen");
    check_recovers(&store, &clock, corrected);
    store.close().expect("close");
}

/// The child of [`a_glitch_persisted_by_a_crashed_process_is_corrected_at_reopen`]: writes under a
/// clock 20 years ahead, then aborts (no clean close). Ignored: only the parent runs it.
#[test]
#[ignore = "run by a_glitch_persisted_by_a_crashed_process_is_corrected_at_reopen"]
fn glitched_child_writes_and_aborts() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let clock = ManualClock::new(start() + GLITCH);
    let store = builder(&clock).open(Path::new(&path)).expect("open");
    write_under_glitch(&store);
    // The latest time is persisted by write batches at most once a second: move on and
    // write once more, so the glitched time certainly reached the file.
    clock.advance(Duration::from_secs(2));
    std::mem::forget(started(&store, &key("later"), &fp("body")));
    std::process::abort();
}

/// On the embedded engines: once a clock that ran far ahead is corrected, the store's time
/// follows it. A lease taken after the correction runs out one lease later (a crashed
/// holder's key is taken over then, not when real time reaches the wrong reading), and a
/// completion made then lives one TTL. (PostgreSQL keeps no clock epochs, so its time stays
/// at the latest reading instead, lest a dead record come back: see `limits`.)
fn the_store_time_follows_a_corrected_clock(place: &Place) {
    with_store(place, |t| {
        t.clock.set(start() + GLITCH);
        started(&t.store, &key("glitched"), &fp("body"))
            .complete(b"written during the glitch")
            .expect("complete");
        let corrected = start() + Duration::from_secs(1);
        t.clock.set(corrected);
        std::mem::forget(started(&t.store, &key("held"), &fp("body")));
        let left = retry_after(&t.store, "held");
        assert!(left <= LEASE, "{:?}: waits {left:?}", t.engine);
        t.clock.set(corrected + LEASE);
        match t.store.begin(&key("held"), &fp("body")).expect("begin") {
            Begin::Started(lease) => {
                assert!(lease.recovered().is_some(), "a takeover");
                let done = lease.complete(b"after").expect("complete");
                let lives = done
                    .expires_at()
                    .duration_since(corrected)
                    .expect("after the correction");
                assert!(lives <= LEASE + TTL, "{:?}: lives {lives:?}", t.engine);
            }
            other => panic!(
                "{:?}: one lease after the correction, expected a takeover, got {other:?}",
                t.engine
            ),
        }
    });
}

idemstore_testkit::engine_tests! {
    redb: the_store_time_follows_a_corrected_clock;
}
