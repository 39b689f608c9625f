//! The state table: every row of the `begin` table and of the lease-operation table, dead records,
//! the stats counters, reaping and scopes, on every engine (redb in memory, redb on a file,
//! PostgreSQL: `memory::`, `redb::` and `postgres::` in the test names).

use std::time::{Duration, Instant};

use idemstore::{Begin, Error, Key, Lease};
use idemstore_testkit::engine::Place;
use idemstore_testkit::store::*;

const NS: Duration = Duration::from_nanos(1);

// ---------------------------------------------------------------------------------------------
// begin: absent or dead

fn begin_on_absent_key_starts_a_fresh_lease(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("absent");
        assert_eq!(store.get(&k).unwrap(), None);
        let t0 = clock_now(clock);

        let lease = started(store, &k, &fp("body"));
        assert!(lease.recovered().is_none(), "{:?}", t.engine);
        assert_eq!(lease.key(), &k);
        assert!(lease.token() > 0);
        assert_eq!(lease.expires_at(), t0 + LEASE);

        let e = get_in_flight(store, &k);
        assert_eq!(e.token, lease.token());
        assert_eq!(e.attempt, 1);
        assert_eq!(e.checkpoint, None);
        assert_eq!(e.created_at, t0);
        assert_eq!(e.lease_expires_at, t0 + LEASE);
        assert_eq!(e.expires_at, t0 + TTL, "max(created + ttl, lease end)");

        // A second fresh key gets a strictly greater token.
        let other = started(store, &key("absent-2"), &fp("body"));
        assert!(other.token() > lease.token());
        let _ = other.abandon();
        let _ = lease.abandon();
    });
}

fn begin_on_dead_completed_record_starts_fresh_at_completed_at_plus_ttl(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("dead-completed");
        let f = fp("body");
        let lease = started(store, &k, &f);
        let old_token = lease.token();
        clock.advance(Duration::from_secs(7));
        let done = lease.complete(b"first").unwrap();
        assert_eq!(done.expires_at(), done.completed_at() + TTL);

        // One nanosecond before death: alive, replayed.
        clock.set(done.completed_at() + TTL - NS);
        assert_eq!(replay(store, &k, &f).response(), b"first");
        assert!(store.get(&k).unwrap().is_some());

        // At completed_at + ttl: dead = absent, for get and for begin (any fingerprint).
        clock.set(done.completed_at() + TTL);
        assert_eq!(store.get(&k).unwrap(), None);
        let fresh = started(store, &k, &fp("another body"));
        assert!(fresh.recovered().is_none());
        assert!(fresh.token() > old_token);
        let e = get_in_flight(store, &k);
        assert_eq!(e.attempt, 1);
        assert_eq!(e.created_at, done.completed_at() + TTL);
        fresh.complete(b"second").unwrap();
        assert_eq!(replay(store, &k, &fp("another body")).response(), b"second");
    });
}

fn in_flight_record_dies_at_created_plus_ttl_when_that_is_later(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("dead-in-flight-ttl");
        let f = fp("body");
        let t0 = clock_now(clock);
        let lease = started(store, &k, &f);
        // The holder crashes: its lease simply runs out (forget, so no release is written).
        std::mem::forget(lease);

        clock.set(t0 + TTL - NS);
        let e = get_in_flight(store, &k);
        assert_eq!(e.expires_at, t0 + TTL);

        clock.set(t0 + TTL);
        assert_eq!(store.get(&k).unwrap(), None);
        // Dead: a different fingerprint is not a mismatch any more, it is a fresh start.
        let fresh = started(store, &k, &fp("other"));
        assert!(fresh.recovered().is_none());
        assert_eq!(get_in_flight(store, &k).attempt, 1);
        drop(fresh);
    });
}

fn in_flight_record_dies_at_lease_end_when_that_is_later(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("dead-in-flight-lease");
        let f = fp("body");
        let t0 = clock_now(clock);
        let mut lease = started(store, &k, &f);
        lease.extend(TTL * 2).unwrap();
        assert_eq!(lease.expires_at(), t0 + TTL * 2);
        assert_eq!(get_in_flight(store, &k).expires_at, t0 + TTL * 2);
        std::mem::forget(lease);

        // Past created + ttl, but the lease is still live: alive, and 409.
        clock.set(t0 + TTL * 2 - NS);
        assert_eq!(in_flight(store, &k, &f), NS);
        mismatch(store, &k, &fp("other"));

        clock.set(t0 + TTL * 2);
        assert_eq!(store.get(&k).unwrap(), None);
        let fresh = started(store, &k, &f);
        assert!(fresh.recovered().is_none());
        drop(fresh);
    });
}

fn takeover_keeps_created_at_so_death_is_max_of_both_deadlines(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("takeover-death");
        let f = fp("body");
        let t0 = clock_now(clock);
        std::mem::forget(started(store, &k, &f));

        // Take over 10 s before created + ttl: the new lease ends 20 s after it.
        clock.set(t0 + TTL - Duration::from_secs(10));
        let second = started(store, &k, &f);
        assert!(second.recovered().is_some());
        let e = get_in_flight(store, &k);
        assert_eq!(e.created_at, t0, "a takeover keeps created_at");
        assert_eq!(e.expires_at, t0 + TTL + Duration::from_secs(20));
        std::mem::forget(second);

        clock.set(t0 + TTL + Duration::from_secs(20) - NS);
        assert!(store.get(&k).unwrap().is_some());
        clock.set(t0 + TTL + Duration::from_secs(20));
        assert_eq!(store.get(&k).unwrap(), None);
    });
}

// ---------------------------------------------------------------------------------------------
// begin: in flight

fn in_flight_with_other_fingerprint_is_a_mismatch_and_changes_nothing(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("inflight-mismatch");
        let mut lease = started(store, &k, &fp("body"));
        lease.checkpoint(b"cp").unwrap();
        let before = store.get(&k).unwrap();

        // Live lease.
        mismatch(store, &k, &fp("other body"));
        assert_eq!(store.get(&k).unwrap(), before);

        // Expired lease ("any"): still a mismatch, no takeover.
        clock.advance(LEASE + Duration::from_secs(1));
        mismatch(store, &k, &fp("other body"));
        assert_eq!(store.get(&k).unwrap(), before);

        // The lease is still the current one.
        lease.complete(b"done").unwrap();
    });
}

fn in_flight_same_fingerprint_live_lease_answers_retry_after_time_left(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("inflight-live");
        let f = fp("body");
        let lease = started(store, &k, &f);
        let before = store.get(&k).unwrap();

        assert_eq!(in_flight(store, &k, &f), LEASE);
        clock.advance(Duration::from_secs(10));
        assert_eq!(in_flight(store, &k, &f), LEASE - Duration::from_secs(10));
        clock.advance(Duration::from_millis(19_999));
        assert_eq!(in_flight(store, &k, &f), Duration::from_millis(1));
        clock.set(lease.expires_at() - NS);
        assert_eq!(in_flight(store, &k, &f), NS);
        assert_eq!(store.get(&k).unwrap(), before, "409 changes nothing");

        lease.complete(b"ok").unwrap();
    });
}

fn in_flight_same_fingerprint_expired_lease_is_taken_over_with_recovery(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("inflight-expired");
        let f = fp("body");
        let t0 = clock_now(clock);
        let mut first = started(store, &k, &f);
        first.checkpoint(b"step-1").unwrap();
        first.checkpoint(b"step-2").unwrap();
        let first_token = first.token();

        // Exactly at lease end the lease is expired (live means now < lease_expires_at).
        clock.set(first.expires_at());
        let second = started(store, &k, &f);
        let rec = second.recovered().expect("a takeover recovers");
        assert_eq!(rec.previous_token(), first_token);
        assert_eq!(rec.attempt(), 2);
        assert_eq!(
            rec.checkpoint(),
            Some(&b"step-2"[..]),
            "the last checkpoint"
        );
        assert!(second.token() > first_token, "token rises");
        assert_eq!(second.expires_at(), t0 + LEASE + LEASE, "lease renewed");

        let e = get_in_flight(store, &k);
        assert_eq!(e.token, second.token());
        assert_eq!(e.attempt, 2);
        assert_eq!(e.checkpoint.as_deref(), Some(&b"step-2"[..]));
        assert_eq!(e.created_at, t0);
        assert_eq!(e.lease_expires_at, t0 + LEASE + LEASE);

        // The new lease is live: 409 for the others.
        assert_eq!(in_flight(store, &k, &f), LEASE);

        // A second takeover: attempt 3, previous token is the second one.
        let second_token = second.token();
        std::mem::forget(second);
        clock.advance(LEASE);
        let third = started(store, &k, &f);
        let rec = third.recovered().unwrap();
        assert_eq!(rec.previous_token(), second_token);
        assert_eq!(rec.attempt(), 3);
        assert_eq!(rec.checkpoint(), Some(&b"step-2"[..]));
        assert!(third.token() > second_token);
        third.complete(b"finally").unwrap();
        assert_eq!(replay(store, &k, &f).response(), b"finally");
        drop(first);
    });
}

fn takeover_without_checkpoint_recovers_none(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("no-checkpoint");
        let f = fp("body");
        std::mem::forget(started(store, &k, &f));
        clock.advance(LEASE);
        let lease = started(store, &k, &f);
        let rec = lease.recovered().unwrap();
        assert_eq!(rec.attempt(), 2);
        assert_eq!(rec.checkpoint(), None);
        drop(lease);
    });
}

// ---------------------------------------------------------------------------------------------
// begin: completed, alive

fn completed_same_fingerprint_replays_byte_for_byte_and_changes_nothing(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("replay");
        let f = fp("body");
        let response: Vec<u8> = (0..=255u8).rev().chain([0, 0, 13, 10]).collect();
        let lease = started(store, &k, &f);
        let token = lease.token();
        clock.advance(Duration::from_secs(3));
        let done = lease.complete(&response).unwrap();
        let before = store.get(&k).unwrap();

        for _ in 0..3 {
            clock.advance(Duration::from_secs(100));
            let r = replay(store, &k, &f);
            assert_eq!(r.response(), &response[..]);
            assert_eq!(r.token(), token);
            assert_eq!(r.completed_at(), done.completed_at());
            assert_eq!(r.expires_at(), done.expires_at());
            assert_eq!(r, done);
        }
        assert_eq!(store.get(&k).unwrap(), before);
    });
}

fn completed_other_fingerprint_is_a_mismatch_and_changes_nothing(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let k = key("completed-mismatch");
        started(store, &k, &fp("body")).complete(b"ok").unwrap();
        let before = store.get(&k).unwrap();
        mismatch(store, &k, &fp("other body"));
        assert_eq!(store.get(&k).unwrap(), before);
        assert_eq!(replay(store, &k, &fp("body")).response(), b"ok");
    });
}

// ---------------------------------------------------------------------------------------------
// Lease operations

fn complete_turns_in_flight_into_completed_at_now(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("complete");
        let lease = started(store, &k, &fp("body"));
        let token = lease.token();
        clock.advance(Duration::from_secs(12));
        let now = clock_now(clock);
        let done = lease.complete(b"the response").unwrap();
        assert_eq!(done.response(), b"the response");
        assert_eq!(done.token(), token);
        assert_eq!(done.completed_at(), now);
        assert_eq!(done.expires_at(), now + TTL);
        assert_eq!(get_completed(store, &k), done);
    });
}

fn complete_after_the_lease_ran_out_without_takeover_is_allowed(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("late-complete");
        let f = fp("body");
        let lease = started(store, &k, &f);
        clock.set(lease.expires_at() + Duration::from_secs(5));
        let now = clock_now(clock);
        let done = lease.complete(b"late but fine").unwrap();
        assert_eq!(done.completed_at(), now);
        assert_eq!(replay(store, &k, &f).response(), b"late but fine");
    });
}

fn extend_sets_lease_end_to_now_plus_duration(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("extend");
        let f = fp("body");
        let t0 = clock_now(clock);
        let mut lease = started(store, &k, &f);
        let before = get_in_flight(store, &k);

        clock.advance(Duration::from_secs(10));
        lease.extend(Duration::from_secs(100)).unwrap();
        let end = t0 + Duration::from_secs(110);
        assert_eq!(lease.expires_at(), end);
        let e = get_in_flight(store, &k);
        assert_eq!(e.lease_expires_at, end);
        assert_eq!(
            (e.token, e.attempt, e.created_at),
            (before.token, before.attempt, before.created_at)
        );
        assert_eq!(in_flight(store, &k, &f), Duration::from_secs(100));

        // now + duration, even if that is earlier than the current end.
        lease.extend(Duration::from_secs(1)).unwrap();
        assert_eq!(lease.expires_at(), t0 + Duration::from_secs(11));
        assert_eq!(
            get_in_flight(store, &k).lease_expires_at,
            t0 + Duration::from_secs(11)
        );

        // After the lease ran out, but before anybody took over: still the holder.
        clock.advance(Duration::from_secs(50));
        lease.extend(Duration::from_secs(30)).unwrap();
        assert_eq!(in_flight(store, &k, &f), Duration::from_secs(30));
        lease.complete(b"ok").unwrap();
    });
}

fn checkpoint_stores_the_recovery_point_and_nothing_else(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("checkpoint");
        let f = fp("body");
        let mut lease = started(store, &k, &f);
        let before = get_in_flight(store, &k);
        clock.advance(Duration::from_secs(5));

        lease.checkpoint(b"one").unwrap();
        let e = get_in_flight(store, &k);
        assert_eq!(e.checkpoint.as_deref(), Some(&b"one"[..]));
        assert_eq!(
            InFlightView {
                checkpoint: None,
                ..e
            },
            before,
            "only the checkpoint changed"
        );
        lease.checkpoint(&[0, 255, 0]).unwrap();
        assert_eq!(
            get_in_flight(store, &k).checkpoint.as_deref(),
            Some(&[0, 255, 0][..])
        );
        lease.checkpoint(b"").unwrap();
        assert_eq!(
            get_in_flight(store, &k).checkpoint.as_deref(),
            Some(&b""[..])
        );
        assert_eq!(lease.expires_at(), before.lease_expires_at);
        lease.complete(b"ok").unwrap();
    });
}

fn abandon_deletes_the_record_and_the_retry_runs_from_scratch(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let k = key("abandon");
        let f = fp("body");
        let mut lease = started(store, &k, &f);
        lease.checkpoint(b"cp").unwrap();
        let token = lease.token();
        lease.abandon().unwrap();
        assert_eq!(store.get(&k).unwrap(), None);

        // Absent: any fingerprint starts fresh, without recovery.
        let fresh = started(store, &k, &fp("different"));
        assert!(fresh.recovered().is_none());
        assert!(fresh.token() > token);
        assert_eq!(get_in_flight(store, &k).checkpoint, None);
        fresh.abandon().unwrap();
        let again = started(store, &k, &f);
        assert!(again.recovered().is_none());
        drop(again);
    });
}

fn drop_releases_the_lease_keeps_the_checkpoint_and_allows_immediate_takeover(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("drop");
        let f = fp("body");
        let mut lease = started(store, &k, &f);
        lease.checkpoint(b"half done").unwrap();
        let token = lease.token();
        clock.advance(Duration::from_secs(4));
        let now = clock_now(clock);
        drop(lease);

        let e = get_in_flight(store, &k);
        assert_eq!(e.token, token);
        assert_eq!(e.lease_expires_at, now, "released: lease_expires_at = now");
        assert_eq!(e.checkpoint.as_deref(), Some(&b"half done"[..]));
        assert_eq!(e.attempt, 1);

        // Still alive: another fingerprint is a mismatch.
        mismatch(store, &k, &fp("other"));

        // Same fingerprint: taken over at once, no waiting.
        let next = started(store, &k, &f);
        let rec = next.recovered().expect("recovered after a drop");
        assert_eq!(rec.previous_token(), token);
        assert_eq!(rec.attempt(), 2);
        assert_eq!(rec.checkpoint(), Some(&b"half done"[..]));
        next.complete(b"ok").unwrap();
    });
}

fn drop_after_the_lease_ran_out_sets_lease_end_to_now_and_allows_takeover(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("late-drop");
        let f = fp("body");
        let mut lease = started(store, &k, &f);
        lease.checkpoint(b"late cp").unwrap();
        let token = lease.token();
        clock.set(lease.expires_at() + Duration::from_secs(10));
        let now = clock_now(clock);
        drop(lease);
        let e = get_in_flight(store, &k);
        assert_eq!(e.lease_expires_at, now, "lease_expires_at = now");
        assert_eq!(e.token, token);
        let next = started(store, &k, &f);
        let rec = next.recovered().unwrap();
        assert_eq!(rec.previous_token(), token);
        assert_eq!(rec.checkpoint(), Some(&b"late cp"[..]));
        next.complete(b"ok").unwrap();
    });
}

/// Begins `k`, lets the lease run out and takes it over: returns (fenced old, current new).
fn fenced_pair(t: &TestStore, k: &Key) -> (Lease, Lease) {
    let f = fp("body");
    let mut old = started(&t.store, k, &f);
    old.checkpoint(b"old checkpoint").unwrap();
    t.clock.set(old.expires_at());
    let new = started(&t.store, k, &f);
    assert_eq!(new.recovered().unwrap().previous_token(), old.token());
    (old, new)
}

#[track_caller]
fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, Error>, token: u64) {
    match r {
        Err(Error::LeaseLost { token: t }) => assert_eq!(t, token),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

fn every_operation_of_a_fenced_lease_is_refused_and_changes_nothing(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;

        // complete
        let k = key("fenced-complete");
        let (old, new) = fenced_pair(t, &k);
        let before = store.get(&k).unwrap();
        let old_token = old.token();
        assert_lease_lost(old.complete(b"stale"), old_token);
        assert_eq!(store.get(&k).unwrap(), before);
        new.complete(b"fresh").unwrap();
        assert_eq!(replay(store, &k, &fp("body")).response(), b"fresh");

        // extend
        let k = key("fenced-extend");
        let (mut old, new) = fenced_pair(t, &k);
        let before = store.get(&k).unwrap();
        let old_end = old.expires_at();
        assert_lease_lost(old.extend(Duration::from_secs(500)), old.token());
        assert_eq!(store.get(&k).unwrap(), before);
        assert_eq!(
            old.expires_at(),
            old_end,
            "a refused extend keeps the old end"
        );
        drop(old);
        assert_eq!(store.get(&k).unwrap(), before, "dropping a fenced lease");
        new.complete(b"ok").unwrap();

        // checkpoint
        let k = key("fenced-checkpoint");
        let (mut old, mut new) = fenced_pair(t, &k);
        new.checkpoint(b"new checkpoint").unwrap();
        let before = store.get(&k).unwrap();
        assert_lease_lost(old.checkpoint(b"stale checkpoint"), old.token());
        assert_eq!(store.get(&k).unwrap(), before);
        std::mem::forget(old);
        new.complete(b"ok").unwrap();

        // abandon
        let k = key("fenced-abandon");
        let (old, new) = fenced_pair(t, &k);
        let before = store.get(&k).unwrap();
        let old_token = old.token();
        assert_lease_lost(old.abandon(), old_token);
        assert_eq!(store.get(&k).unwrap(), before);
        assert!(before.is_some());
        new.complete(b"ok").unwrap();

        // drop: the new holder's live lease is not released by the stale one.
        let k = key("fenced-drop");
        let (old, new) = fenced_pair(t, &k);
        let before = store.get(&k).unwrap();
        drop(old);
        assert_eq!(store.get(&k).unwrap(), before);
        assert_eq!(in_flight(store, &k, &fp("body")), LEASE);
        new.complete(b"ok").unwrap();
    });
}

fn a_fenced_lease_cannot_touch_the_record_after_the_new_holder_completed_it(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let k = key("fenced-after-complete");
        let f = fp("body");
        let (mut old, new) = fenced_pair(t, &k);
        new.complete(b"winner").unwrap();
        let before = store.get(&k).unwrap();
        assert_lease_lost(old.extend(Duration::from_secs(1)), old.token());
        assert_lease_lost(old.checkpoint(b"x"), old.token());
        let old_token = old.token();
        assert_lease_lost(old.complete(b"loser"), old_token);
        assert_eq!(store.get(&k).unwrap(), before);
        assert_eq!(replay(store, &k, &f).response(), b"winner");
    });
}

fn a_lease_of_an_abandoned_then_restarted_key_is_fenced(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let k = key("fenced-by-restart");
        let f = fp("body");
        // Two leases on one key can only coexist through a takeover; abandon the new one,
        // start again: the old one must still be refused.
        let (old, new) = fenced_pair(t, &k);
        new.abandon().unwrap();
        let newest = started(store, &k, &f);
        let before = store.get(&k).unwrap();
        let old_token = old.token();
        assert_lease_lost(old.abandon(), old_token);
        assert_eq!(store.get(&k).unwrap(), before);
        newest.complete(b"ok").unwrap();
    });
}

fn lease_operations_on_a_dead_record_are_lease_lost(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let f = fp("body");
        let t0 = clock_now(clock);
        let ka = key("dead-complete");
        let kb = key("dead-extend");
        let kc = key("dead-checkpoint");
        let kd = key("dead-abandon");
        let ke = key("dead-drop");
        let a = started(store, &ka, &f);
        let mut b = started(store, &kb, &f);
        let mut c = started(store, &kc, &f);
        let d = started(store, &kd, &f);
        let e = started(store, &ke, &f);

        // All five die at t0 + ttl (created + ttl > lease end).
        clock.set(t0 + TTL);
        let (ta, td) = (a.token(), d.token());
        assert_lease_lost(a.complete(b"too late"), ta);
        assert_lease_lost(b.extend(Duration::from_secs(100)), b.token());
        assert_lease_lost(c.checkpoint(b"too late"), c.token());
        assert_lease_lost(d.abandon(), td);
        drop(e);
        for k in [&ka, &kb, &kc, &kd, &ke] {
            assert_eq!(store.get(k).unwrap(), None, "{k:?} stays dead");
        }
        // Nothing came back: every key starts fresh.
        for k in [&ka, &kb, &kc, &kd, &ke] {
            let l = started(store, k, &fp("new"));
            assert!(l.recovered().is_none());
            l.abandon().unwrap();
        }
        drop((b, c));
    });
}

// ---------------------------------------------------------------------------------------------
// Stats

fn stats_count_each_outcome(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let f = fp("body");
        let s0 = store.stats();
        assert_eq!(
            (
                s0.started,
                s0.replayed,
                s0.in_flight_conflicts,
                s0.mismatches,
                s0.takeovers,
                s0.completed,
                s0.abandoned,
                s0.reaped
            ),
            (0, 0, 0, 0, 0, 0, 0, 0)
        );

        // 3 fresh starts, 1 takeover (also a start), 2 completions, 1 abandon.
        let a = started(store, &key("s-a"), &f);
        let b = started(store, &key("s-b"), &f);
        let c = started(store, &key("s-c"), &f);
        a.complete(b"a").unwrap();
        c.abandon().unwrap();
        // 2 replays, 2 mismatches (completed and in flight), 1 conflict.
        replay(store, &key("s-a"), &f);
        replay(store, &key("s-a"), &f);
        mismatch(store, &key("s-a"), &fp("x"));
        mismatch(store, &key("s-b"), &fp("x"));
        in_flight(store, &key("s-b"), &f);
        clock.advance(LEASE);
        let b2 = started(store, &key("s-b"), &f);
        assert!(b2.recovered().is_some());
        b2.complete(b"b").unwrap();
        // A refused fenced op counts as nothing of the above.
        assert!(b.complete(b"stale").is_err());

        let s = store.stats();
        assert_eq!(s.started, 4, "{s:?}");
        assert_eq!(s.takeovers, 1, "{s:?}");
        assert_eq!(s.completed, 2, "{s:?}");
        assert_eq!(s.abandoned, 1, "{s:?}");
        assert_eq!(s.replayed, 2, "{s:?}");
        assert_eq!(s.mismatches, 2, "{s:?}");
        assert_eq!(s.in_flight_conflicts, 1, "{s:?}");
        assert_eq!(s.reaped, 0, "{s:?}");

        clock.advance(TTL + LEASE);
        assert_eq!(store.reap().unwrap(), 2);
        assert_eq!(store.stats().reaped, 2);
    });
}

// ---------------------------------------------------------------------------------------------
// Reaping

fn reap_deletes_exactly_the_dead_records(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let f = fp("body");
        let t0 = clock_now(clock);
        assert_eq!(
            store.reap().unwrap(),
            0,
            "nothing to reap in an empty store"
        );

        // Dies at t0 + ttl: completed at t0.
        started(store, &key("completed-dies"), &f)
            .complete(b"x")
            .unwrap();
        // Dies at t0 + ttl: in flight, crashed holder.
        std::mem::forget(started(store, &key("inflight-dies"), &f));
        // Lives to t0 + 3 ttl: in flight, lease extended far (its death moved).
        let mut long = started(store, &key("inflight-long"), &f);
        long.extend(TTL * 3).unwrap();
        std::mem::forget(long);

        clock.advance(TTL / 2);
        // Lives to t0 + 1.5 ttl: completed later.
        started(store, &key("completed-lives"), &f)
            .complete(b"y")
            .unwrap();
        // Lives to t0 + 1.5 ttl: in flight, lease expired long before (alive, takeover-able).
        std::mem::forget(started(store, &key("inflight-lives"), &f));

        clock.set(t0 + TTL - NS);
        assert_eq!(store.reap().unwrap(), 0, "nothing is dead yet");

        clock.set(t0 + TTL);
        assert_eq!(store.reap().unwrap(), 2);
        assert_eq!(store.reap().unwrap(), 0, "already deleted");
        assert_eq!(store.get(&key("completed-dies")).unwrap(), None);
        assert_eq!(store.get(&key("inflight-dies")).unwrap(), None);
        assert_eq!(
            get_completed(store, &key("completed-lives")).response(),
            b"y"
        );
        get_in_flight(store, &key("inflight-lives"));
        get_in_flight(store, &key("inflight-long"));
        // The reaped keys are absent for begin too.
        let l = started(store, &key("completed-dies"), &fp("other"));
        assert!(l.recovered().is_none());
        l.abandon().unwrap();

        clock.set(t0 + TTL + TTL / 2);
        assert_eq!(store.reap().unwrap(), 2);
        get_in_flight(store, &key("inflight-long"));

        clock.set(t0 + TTL * 3);
        assert_eq!(store.reap().unwrap(), 1);
        assert_eq!(store.stats().reaped, 5);
    });
}

fn reap_follows_moved_deadlines(place: &Place) {
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let f = fp("body");
        let t0 = clock_now(clock);
        let k = key("moved");
        // In flight first (dies at t0 + ttl), then completed late (dies at completion + ttl).
        let lease = started(store, &k, &f);
        clock.set(t0 + TTL / 2);
        lease.complete(b"done").unwrap();
        clock.set(t0 + TTL);
        assert_eq!(
            store.reap().unwrap(),
            0,
            "the old deadline no longer applies"
        );
        assert_eq!(replay(store, &k, &f).response(), b"done");
        clock.set(t0 + TTL + TTL / 2);
        assert_eq!(store.reap().unwrap(), 1);
        assert_eq!(store.get(&k).unwrap(), None);
    });
}

fn reaper_thread_deletes_dead_records(place: &Place) {
    with_store_with(
        place,
        |b| b.reap_interval(Some(Duration::from_millis(20))),
        |t| {
            let (store, clock) = (&t.store, &t.clock);
            let f = fp("body");
            for i in 0..3 {
                started(store, &key(&format!("r-{i}")), &f)
                    .complete(b"x")
                    .unwrap();
            }
            clock.advance(TTL / 2);
            started(store, &key("r-live"), &f)
                .complete(b"live")
                .unwrap();
            clock.advance(TTL / 2);

            let deadline = Instant::now() + Duration::from_secs(10);
            while store.stats().reaped < 3 {
                assert!(
                    Instant::now() < deadline,
                    "{:?}: the reaper did not delete the dead records: {:?}",
                    t.engine,
                    store.stats()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // Give it a few more passes: it must not delete the live one.
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(store.stats().reaped, 3);
            assert_eq!(store.reap().unwrap(), 0, "the thread already deleted them");
            assert_eq!(replay(store, &key("r-live"), &f).response(), b"live");
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Scopes

fn the_same_id_in_two_scopes_is_two_independent_records(place: &Place) {
    with_store(place, |t| {
        let store = &t.store;
        let a = Key::new("tenant-a", "same-id").unwrap();
        let b = Key::new("tenant-b", "same-id").unwrap();
        let f = fp("body");

        started(store, &a, &f).complete(b"response of a").unwrap();
        // b is absent although a is completed with the same id and fingerprint.
        assert_eq!(store.get(&b).unwrap(), None);
        let lb = started(store, &b, &f);
        assert!(lb.recovered().is_none());
        // While b is in flight, a still replays.
        assert_eq!(replay(store, &a, &f).response(), b"response of a");
        lb.complete(b"response of b").unwrap();
        assert_eq!(replay(store, &a, &f).response(), b"response of a");
        assert_eq!(replay(store, &b, &f).response(), b"response of b");

        // A fingerprint used in one scope does not count as a mismatch in another.
        let c = Key::new("", "same-id").unwrap();
        let lc = started(store, &c, &fp("other"));
        mismatch(store, &c, &f);
        lc.abandon().unwrap();
        assert_eq!(replay(store, &a, &f).response(), b"response of a");
    });
}

fn begin_outcomes_are_exhaustive_over_the_table(place: &Place) {
    // A compact walk through the table in one sequence, checking the variant of every answer.
    with_store(place, |t| {
        let (store, clock) = (&t.store, &t.clock);
        let k = key("walk");
        let (f, g) = (fp("f"), fp("g"));
        let kinds = |b: Begin| match b {
            Begin::Started(l) => {
                let r = l.recovered().is_some();
                std::mem::forget(l);
                if r { "takeover" } else { "started" }
            }
            Begin::Replay(_) => "replay",
            Begin::InFlight { .. } => "in-flight",
            Begin::Mismatch => "mismatch",
        };
        let mut seen = vec![];
        seen.push(kinds(store.begin(&k, &f).unwrap())); // absent
        seen.push(kinds(store.begin(&k, &g).unwrap())); // in flight, differs
        seen.push(kinds(store.begin(&k, &f).unwrap())); // in flight, live
        clock.advance(LEASE);
        seen.push(kinds(store.begin(&k, &f).unwrap())); // in flight, expired
        assert_eq!(seen, ["started", "mismatch", "in-flight", "takeover"]);
    });
}

fn clock_now(clock: &idemstore::ManualClock) -> std::time::SystemTime {
    use idemstore::Clock;
    clock.now()
}

idemstore_testkit::engine_tests! {
    every:
        begin_on_absent_key_starts_a_fresh_lease,
        begin_on_dead_completed_record_starts_fresh_at_completed_at_plus_ttl,
        in_flight_record_dies_at_created_plus_ttl_when_that_is_later,
        in_flight_record_dies_at_lease_end_when_that_is_later,
        takeover_keeps_created_at_so_death_is_max_of_both_deadlines,
        in_flight_with_other_fingerprint_is_a_mismatch_and_changes_nothing,
        in_flight_same_fingerprint_live_lease_answers_retry_after_time_left,
        in_flight_same_fingerprint_expired_lease_is_taken_over_with_recovery,
        takeover_without_checkpoint_recovers_none,
        completed_same_fingerprint_replays_byte_for_byte_and_changes_nothing,
        completed_other_fingerprint_is_a_mismatch_and_changes_nothing,
        complete_turns_in_flight_into_completed_at_now,
        complete_after_the_lease_ran_out_without_takeover_is_allowed,
        extend_sets_lease_end_to_now_plus_duration,
        checkpoint_stores_the_recovery_point_and_nothing_else,
        abandon_deletes_the_record_and_the_retry_runs_from_scratch,
        drop_releases_the_lease_keeps_the_checkpoint_and_allows_immediate_takeover,
        drop_after_the_lease_ran_out_sets_lease_end_to_now_and_allows_takeover,
        every_operation_of_a_fenced_lease_is_refused_and_changes_nothing,
        a_fenced_lease_cannot_touch_the_record_after_the_new_holder_completed_it,
        a_lease_of_an_abandoned_then_restarted_key_is_fenced,
        lease_operations_on_a_dead_record_are_lease_lost,
        stats_count_each_outcome,
        reap_deletes_exactly_the_dead_records,
        reap_follows_moved_deadlines,
        reaper_thread_deletes_dead_records,
        the_same_id_in_two_scopes_is_two_independent_records,
        begin_outcomes_are_exhaustive_over_the_table,
    ;
}
