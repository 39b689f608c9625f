//! Model test: random sequences of operations run against the store and against the plain
//! model of the store's contract in `idemstore_testkit::model`, compared after every step (outcome, retry_after,
//! replayed bytes, tokens, recovered(), LeaseLost, `get` of every key, `reap()`, stats).
//!
//! Cases: 512, or `PROPTEST_CASES` when it is larger. A quarter of the cases run on a file
//! store (where `Reopen` closes and reopens the file); the rest in memory, for speed.

use std::cell::RefCell;

use idemstore_testkit::model::{Backend, By, Coverage, Op, Size, Tick, check};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn op(keys: u8) -> impl Strategy<Value = Op> {
    let size = proptest::sample::select(Size::ALL.to_vec());
    prop_oneof![
        6 => (0..keys, 0..2u8).prop_map(|(key, fp)| Op::Begin { key, fp }),
        3 => (any::<u8>(), size.clone()).prop_map(|(lease, size)| Op::Complete { lease, size }),
        1 => (any::<u8>(), proptest::sample::select(By::ALL.to_vec()))
            .prop_map(|(lease, by)| Op::Extend { lease, by }),
        1 => (any::<u8>(), size).prop_map(|(lease, size)| Op::Checkpoint { lease, size }),
        1 => any::<u8>().prop_map(|lease| Op::Abandon { lease }),
        1 => any::<u8>().prop_map(|lease| Op::Drop { lease }),
        5 => proptest::sample::select(Tick::ALL.to_vec()).prop_map(Op::Advance),
        1 => Just(Op::Reap),
        1 => any::<u8>().prop_map(|settings| Op::Reopen { settings }),
    ]
}

/// `(on a file, operations)`: 3–5 keys, up to 40 operations.
fn case() -> impl Strategy<Value = (bool, Vec<Op>)> {
    (proptest::bool::weighted(0.25), 3..=5u8)
        .prop_flat_map(|(file, keys)| (Just(file), proptest::collection::vec(op(keys), 1..=40)))
}

fn run(file: bool, ops: &[Op]) -> Coverage {
    if file {
        let dir = tempfile::tempdir().expect("tempdir");
        check(&Backend::File(dir.path().join("model.redb")), ops)
    } else {
        check(&Backend::Memory, ops)
    }
}

#[test]
fn store_matches_the_model() {
    let cases = Config::default().cases.max(512);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let total = RefCell::new(Coverage::default());
    let result = runner.run(&case(), |(file, ops)| {
        let c = run(file, &ops);
        total.borrow_mut().add(&c);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generator must reach every row of SPEC §3, or the comparison proves little.
    let c = total.into_inner();
    println!("{cases} cases: {c:?}");
    assert!(
        c.started > 0 && c.takeovers > 0 && c.takeovers_with_checkpoint > 0,
        "{c:?}"
    );
    assert!(
        c.replays > 0 && c.in_flight > 0 && c.mismatches > 0,
        "{c:?}"
    );
    assert!(
        c.completed > 0 && c.abandoned > 0 && c.released > 0,
        "{c:?}"
    );
    assert!(c.leases_lost > 0 && c.reaped > 0 && c.reopens > 0, "{c:?}");
}

// Fixed sequences for the edges, so they are covered on every run whatever the generator does.

fn begin(key: u8, fp: u8) -> Op {
    Op::Begin { key, fp }
}

#[test]
fn takeover_fences_the_old_holder_and_hands_over_the_checkpoint() {
    let ops = [
        begin(0, 0),
        Op::Checkpoint {
            lease: 0,
            size: Size::Some,
        },
        Op::Advance(Tick::LeaseMinusMs),
        begin(0, 0), // InFlight, 1 ms left
        Op::Advance(Tick::Ms),
        begin(0, 0), // exactly at lease_expires_at: takeover
        Op::Complete {
            lease: 0,
            size: Size::One,
        }, // old holder: LeaseLost
        Op::Extend {
            lease: 0,
            by: By::Lease,
        },
        Op::Complete {
            lease: 0,
            size: Size::Max,
        },
        begin(0, 0), // Replay
        begin(0, 1), // Mismatch
    ];
    for backend in [false, true] {
        let c = run(backend, &ops);
        assert_eq!((c.takeovers, c.leases_lost, c.replays), (1, 1, 1), "{c:?}");
    }
}

#[test]
fn drop_releases_at_once_and_too_large_complete_releases() {
    let ops = [
        begin(1, 0),
        Op::Checkpoint {
            lease: 0,
            size: Size::TooLarge,
        },
        Op::Checkpoint {
            lease: 0,
            size: Size::Empty,
        },
        Op::Drop { lease: 0 },
        begin(1, 1), // Mismatch: released, not dead
        begin(1, 0), // takeover at once, empty checkpoint recovered
        Op::Complete {
            lease: 0,
            size: Size::TooLarge,
        }, // ResponseTooLarge, released
        begin(1, 0), // takeover again, attempt 3
        Op::Abandon { lease: 0 },
        begin(1, 1), // absent: a new record with the other fingerprint
    ];
    let c = run(false, &ops);
    assert_eq!((c.takeovers, c.mismatches, c.abandoned), (2, 1, 1), "{c:?}");
}

#[test]
fn deadlines_ttl_boundaries_reap_and_reopen() {
    let ops = [
        begin(0, 0),
        Op::Complete {
            lease: 0,
            size: Size::Some,
        },
        begin(2, 0),
        Op::Extend {
            lease: 0,
            by: By::TwoTtl,
        },
        Op::Reopen { settings: 1 }, // held lease dropped (released), ttl 20 s from now on
        begin(3, 1),
        Op::Advance(Tick::Ttl), // 20 s: key 0 (10 s ttl) dead, key 2 alive (extended)
        Op::Reap,
        begin(0, 1),
        Op::Advance(Tick::BackMs),
        Op::Advance(Tick::TtlPlusMs),
        Op::Reap,
        Op::Reopen { settings: 0 },
        begin(3, 1),
        begin(2, 0),
    ];
    let c = run(true, &ops);
    assert!(c.reaped >= 2 && c.reopens == 2, "{c:?}");
}

#[test]
fn a_clock_moved_back_is_absorbed_or_taken_as_a_correction() {
    // A step back of a millisecond is absorbed: a record seen dead stays dead. A step back
    // of more than a second is a correction: the store's time follows the clock, the record
    // written by the clock that was ahead is moved back with it (its lease has its full time
    // left after the correction, not the whole glitch on top), and nothing dead comes back.
    let ops = [
        begin(0, 0),
        Op::Complete {
            lease: 0,
            size: Size::One,
        },
        Op::Advance(Tick::Ttl), // key 0 dead
        Op::Advance(Tick::BackMs),
        begin(0, 0), // still dead: a new record
        Op::Advance(Tick::BackLease),
        begin(0, 0), // InFlight, the lease's whole time left after the correction
        Op::Advance(Tick::LeaseMinusMs),
        begin(0, 0), // still InFlight
        Op::Advance(Tick::Ms),
        begin(0, 0), // the lease ran out one lease after the correction: takeover
    ];
    for file in [false, true] {
        let c = run(file, &ops);
        assert_eq!((c.replays, c.in_flight, c.takeovers), (0, 2, 1), "{c:?}");
        assert!(c.clock_behind >= 1, "{c:?}");
        assert_eq!(c.corrections, 1, "{c:?}");
    }
}

#[test]
fn decoded_bytes_run_too() {
    // The fuzz target's entry point: any bytes make a valid sequence.
    let bytes: Vec<u8> = (0u16..400)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let ops = Op::decode(&bytes);
    assert_eq!(ops.len(), 200);
    run(true, &ops);
}
