//! Model test: random sequences of operations run against the store and against the plain
//! model of the store's contract in `idemstore_testkit::model`, compared after every step (outcome, retry_after,
//! replayed bytes, tokens, recovered(), LeaseLost, `get` of every key, `reap()`, stats).
//!
//! Runs on every engine (`memory::`, `redb::`, `postgres::` in the test names), each case on
//! a new, empty store: cases 512 (or `PROPTEST_CASES` when it is larger) in memory, a
//! quarter of that on a redb file and on PostgreSQL, where `Reopen` closes the store and
//! opens the same file or schema again.

use std::cell::RefCell;

use idemstore_testkit::engine::{Engine, Place};
use idemstore_testkit::model::{Assume, By, Coverage, Op, Size, Tick, check_on};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// The clock moves an operation may make on `engine`.
fn ticks(engine: Engine) -> Vec<Tick> {
    // No step back on PostgreSQL: its engine has no clock corrections (a step back larger
    // than the tolerance), and keeps its time from going back only within one open store, not
    // across a reopen (a step back of a millisecond, then `Reopen`, is read at the earlier
    // time). See `redb:` below; `tests/limits.rs` steps back within one store on every engine.
    if engine == Engine::Postgres {
        Tick::ALL
            .into_iter()
            .filter(|t| !matches!(t, Tick::BackMs | Tick::BackLease))
            .collect()
    } else {
        Tick::ALL.to_vec()
    }
}

fn op(keys: u8, engine: Engine) -> impl Strategy<Value = Op> {
    let size = proptest::sample::select(Size::ALL.to_vec());
    prop_oneof![
        6 => (0..keys, 0..2u8).prop_map(|(key, fp)| Op::Begin { key, fp }),
        3 => (any::<u8>(), size.clone()).prop_map(|(lease, size)| Op::Complete { lease, size }),
        1 => (any::<u8>(), proptest::sample::select(By::ALL.to_vec()))
            .prop_map(|(lease, by)| Op::Extend { lease, by }),
        1 => (any::<u8>(), size).prop_map(|(lease, size)| Op::Checkpoint { lease, size }),
        1 => any::<u8>().prop_map(|lease| Op::Abandon { lease }),
        1 => any::<u8>().prop_map(|lease| Op::Drop { lease }),
        5 => proptest::sample::select(ticks(engine)).prop_map(Op::Advance),
        1 => Just(Op::Reap),
        1 => any::<u8>().prop_map(|settings| Op::Reopen { settings }),
    ]
}

/// 3–5 keys, up to 40 operations.
fn case(engine: Engine) -> impl Strategy<Value = Vec<Op>> {
    (3..=5u8).prop_flat_map(move |keys| proptest::collection::vec(op(keys, engine), 1..=40))
}

/// Runs `ops` on a new, empty store of `place`'s engine (the model's tokens start at 1).
fn run(place: &Place, ops: &[Op]) -> Coverage {
    let fresh = Place::new(place.engine()).expect("the engine of a place is available");
    let assume = match fresh.engine() {
        Engine::Memory => Assume::MEMORY,
        Engine::Redb => Assume::FILE,
        Engine::Postgres => Assume::POSTGRES,
    };
    check_on(&|b| fresh.open(b), assume, ops)
}

fn store_matches_the_model(place: &Place) {
    let engine = place.engine();
    let cases = match engine {
        Engine::Memory => Config::default().cases.max(512),
        _ => Config::default().cases.max(512) / 4,
    };
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let total = RefCell::new(Coverage::default());
    let result = runner.run(&case(engine), |ops| {
        let c = run(place, &ops);
        total.borrow_mut().add(&c);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generator must reach every row of the state table, or the comparison proves little.
    let c = total.into_inner();
    println!("{engine:?}, {cases} cases: {c:?}");
    assert!(c.started > 0 && c.takeovers > 0, "{c:?}");
    // A takeover of a checkpointed lease is rare: the full run in memory must reach it; the
    // quarter-size runs need not (the fixed sequence below covers it on every engine).
    assert!(
        c.takeovers_with_checkpoint > 0 || engine != Engine::Memory,
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
    assert!(c.leases_lost > 0 && c.reaped > 0, "{c:?}");
    assert_eq!(c.reopens > 0, engine.durable(), "{c:?}");
}

// Fixed sequences for the edges, so they are covered on every run whatever the generator does.

fn begin(key: u8, fp: u8) -> Op {
    Op::Begin { key, fp }
}

fn takeover_fences_the_old_holder_and_hands_over_the_checkpoint(place: &Place) {
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
    let c = run(place, &ops);
    assert_eq!((c.takeovers, c.leases_lost, c.replays), (1, 1, 1), "{c:?}");
}

fn drop_releases_at_once_and_too_large_complete_releases(place: &Place) {
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
    let c = run(place, &ops);
    assert_eq!((c.takeovers, c.mismatches, c.abandoned), (2, 1, 1), "{c:?}");
}

fn deadlines_ttl_boundaries_reap_and_reopen(place: &Place) {
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
    let c = run(place, &ops);
    assert!(c.reaped >= 2 && c.reopens == 2, "{c:?}");
}

fn a_clock_moved_back_is_absorbed_or_taken_as_a_correction(place: &Place) {
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
    let c = run(place, &ops);
    assert_eq!((c.replays, c.in_flight, c.takeovers), (0, 2, 1), "{c:?}");
    assert!(c.clock_behind >= 1, "{c:?}");
    assert_eq!(c.corrections, 1, "{c:?}");
}

fn decoded_bytes_run_too(place: &Place) {
    // The fuzz target's entry point: any bytes make a valid sequence.
    let bytes: Vec<u8> = (0u16..400)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let ops = Op::decode(&bytes);
    assert_eq!(ops.len(), 200);
    run(place, &ops);
}

idemstore_testkit::engine_tests! {
    every:
        store_matches_the_model,
        takeover_fences_the_old_holder_and_hands_over_the_checkpoint,
        drop_releases_at_once_and_too_large_complete_releases,
    ;
    durable:
        deadlines_ttl_boundaries_reap_and_reopen,
    ;
    // Not on PostgreSQL yet: its engine has no clock corrections (a step back of more than
    // the tolerance leaves the store's time where it was until the clock catches up); the
    // decoded sequence steps back by a lease.
    redb:
        a_clock_moved_back_is_absorbed_or_taken_as_a_correction,
        decoded_bytes_run_too,
    ;
}
