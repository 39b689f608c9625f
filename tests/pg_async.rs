//! The PostgreSQL engine as async services and replicas use it: calls, leases and their
//! drops on a runtime's threads (including its shutdown) work and leave the store serving;
//! `complete_in` in the caller's REPEATABLE READ transaction stays fenced; input edges;
//! the tower layer's shutdown; two replicas reaping at once.
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use idemstore::{Begin, Error, Fingerprint, Key, Store};
use idemstore_testkit::engine::{Engine, Place, pg};
use idemstore_testkit::store::{clock, started};

fn key(id: &str) -> Key {
    Key::new("tenant", id).unwrap()
}

/// A lease dropped by async code (a handler's future cancelled when the client hangs up)
/// releases the key; it must not panic the runtime's thread (the synchronous client's
/// runtime cannot start there).
#[test]
fn a_lease_dropped_on_a_runtime_thread_releases_without_panicking() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("dropped"), &fp);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async move { drop(lease) })
    }));
    let again = store.begin(&key("dropped"), &fp).unwrap();
    let taken_over = matches!(&again, Begin::Started(l) if l.recovered().is_some());
    drop(again);
    store.close().unwrap();
    assert!(
        dropped.is_ok(),
        "dropping a lease on a runtime thread panicked"
    );
    assert!(taken_over, "the dropped lease was not released");
}

/// A lease extended and checkpointed on a runtime's thread: the call led the batch on this
/// thread when a writer was free, and the writer's connection panicked there (its own
/// runtime cannot start inside another); with every writer busy the same call worked (as a
/// follower). It must work, or fail, either way: never panic.
#[test]
fn lease_operations_on_a_runtime_thread_do_not_panic() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let Begin::Started(mut lease) = store.begin(&key("ops"), &fp).unwrap() else {
        panic!()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            lease.extend(Duration::from_secs(60))?;
            lease.checkpoint(b"half")?;
            Ok::<_, Error>(())
        })
    }));
    drop(lease);
    store.close().unwrap();
    assert!(
        result.is_ok(),
        "a lease operation on a runtime thread panicked"
    );
}

/// The caller's transaction at REPEATABLE READ whose snapshot was taken before a takeover:
/// complete_in reads the row in that snapshot, so a stale holder whose successor took over
/// and abandoned the key completes it ("once another holder took over, the old lease gets
/// LeaseLost and changes nothing").
#[test]
fn complete_in_at_repeatable_read_is_fenced_against_a_takeover_after_the_snapshot() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let clock = clock();
    let store = place
        .open(
            Store::builder()
                .postgres_pool_size(2)
                .reap_interval(None)
                .lease(Duration::from_secs(10))
                .clock(clock.clone()),
        )
        .unwrap();
    let (conninfo, _) = place.postgres().unwrap();
    let mut client = pg::connect(conninfo);
    let fp = Fingerprint::of(b"body");
    let stale = started(&store, &key("rr"), &fp);
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    // The caller's own work: the snapshot is taken here.
    tx.query_one("SELECT 1", &[]).unwrap();
    // The stale holder stalls past its lease; a retry takes over, finds nothing was done,
    // and abandons the key.
    clock.advance(Duration::from_secs(11));
    let successor = started(&store, &key("rr"), &fp);
    successor.abandon().unwrap();
    let completed = stale.complete_in(&mut tx, b"stale");
    let refused = format!("{completed:?}");
    let committed = completed.is_ok() && tx.commit().is_ok();
    let after = store.get(&key("rr")).unwrap();
    store.close().unwrap();
    eprintln!("the stale complete_in: {refused}");
    assert!(
        !committed,
        "the taken-over lease completed the key ({completed:?}); the key now reads {after:?}"
    );
}

/// A Started lease under REPEATABLE READ: the caller opened its transaction and read
/// (snapshot) before `begin` claimed the key; complete_in cannot see the claim's row. It
/// says so and writes nothing, rather than answering `LeaseLost` for a live lease.
#[test]
fn complete_in_at_repeatable_read_with_a_snapshot_older_than_the_claim_says_so() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let (conninfo, _) = place.postgres().unwrap();
    let mut client = pg::connect(conninfo);
    let fp = Fingerprint::of(b"body");
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    tx.query_one("SELECT 1", &[]).unwrap();
    let lease = started(&store, &key("rr2"), &fp);
    let token = lease.token();
    let completed = lease.complete_in(&mut tx, b"done");
    let _ = tx.rollback();
    let after = store.get(&key("rr2")).unwrap();
    store.close().unwrap();
    match &completed {
        Err(
            e @ Error::Storage {
                outcome_unknown: false,
                ..
            },
        ) => {
            let text = std::error::Error::source(e).map(ToString::to_string);
            assert!(
                text.as_deref()
                    .is_some_and(|t| t.contains("repeatable read") && t.contains("after `begin`")),
                "{text:?}"
            );
        }
        other => panic!("a live lease's complete_in in a snapshot older than its claim: {other:?}"),
    }
    assert!(
        matches!(after, Some(idemstore::Entry::InFlight { token: t, .. }) if t == token),
        "the key stays in flight under the lease: {after:?}"
    );
}

/// A service's runtime shut down (the end of an async main, a graceful shutdown) while a
/// task holds a lease: the task is dropped on the runtime's thread, and so is its lease,
/// whose release must reach the store (the next begin takes over at once, as documented for
/// a dropped lease), not panic inside the runtime's shutdown.
#[test]
fn a_lease_held_by_a_task_is_released_when_the_runtime_shuts_down() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("shutdown"), &fp);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _lease = lease;
        held_tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    held_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let again = store.begin(&key("shutdown"), &fp).unwrap();
    let answer = format!("{again:?}");
    let taken_over = matches!(&again, Begin::Started(l) if l.recovered().is_some());
    drop(again);
    store.close().unwrap();
    assert!(
        taken_over,
        "the lease dropped at the runtime's shutdown was not released: {answer}"
    );
}

/// complete_in of a lost lease: LeaseLost, the caller's transaction still usable; a
/// rollback leaves the key in flight until the lease runs out, then a takeover.
#[test]
fn complete_in_lost_and_rolled_back() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let clock = clock();
    let open = || {
        place
            .open(
                Store::builder()
                    .postgres_pool_size(2)
                    .reap_interval(None)
                    .lease(Duration::from_secs(10))
                    .clock(clock.clone()),
            )
            .unwrap()
    };
    let (a, b) = (open(), open());
    let (conninfo, _) = place.postgres().unwrap();
    let mut client = pg::connect(conninfo);
    let fp = Fingerprint::of(b"body");
    let stale = started(&a, &key("lost"), &fp);
    clock.advance(Duration::from_secs(11));
    let current = started(&b, &key("lost"), &fp);
    let mut tx = client.transaction().unwrap();
    let lost = stale.complete_in(&mut tx, b"stale");
    assert!(matches!(lost, Err(Error::LeaseLost { .. })), "{lost:?}");
    let one: i32 = tx.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
    tx.rollback().unwrap();
    // The current holder completes in a transaction that rolls back.
    let mut tx = client.transaction().unwrap();
    current.complete_in(&mut tx, b"rolled back").unwrap();
    tx.rollback().unwrap();
    let in_flight = a.begin(&key("lost"), &fp).unwrap();
    assert!(matches!(in_flight, Begin::InFlight { .. }), "{in_flight:?}");
    clock.advance(Duration::from_secs(11));
    let taken = a.begin(&key("lost"), &fp).unwrap();
    assert!(
        matches!(&taken, Begin::Started(l) if l.recovered().is_some()),
        "{taken:?}"
    );
    drop(taken);
    a.close().unwrap();
    b.close().unwrap();
}

/// A begin made on a runtime's thread (a current-thread service calling the store directly)
/// answers; and whatever it did, the store keeps serving other threads.
#[test]
fn a_begin_on_a_runtime_thread_answers_and_the_store_keeps_serving() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let on_runtime = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            match store.begin(&key("on-runtime"), &fp)? {
                Begin::Started(lease) => lease.complete(b"done").map(|_| ()),
                other => panic!("{other:?}"),
            }
        })
    }));
    let s2 = store.clone();
    let after = bounded(Duration::from_secs(10), move || {
        s2.begin(&key("after"), &Fingerprint::of(b"x"))
            .map(|b| format!("{b:?}"))
    });
    store.close().unwrap();
    assert!(after.is_ok(), "{after:?}");
    assert!(
        matches!(on_runtime, Ok(Ok(()))),
        "begin and complete on a runtime thread: {:?}",
        on_runtime.as_ref().map_err(|_| "panicked")
    );
}

/// A read made on a runtime's thread (documented to panic: the synchronous client cannot
/// block there) aborted the whole process: the client panicked inside the pool's checkout
/// (its connection check), and r2d2 then dropped that connection while unwinding, whose
/// close panicked again ("panic in a destructor during cleanup"). It must answer (or at
/// least fail) and leave the store serving.
#[test]
fn a_read_that_panicked_on_a_runtime_thread_leaves_the_readers_usable() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let on_runtime = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async { store.get(&key("r")).map(|e| e.is_none()) })
    }));
    let s2 = store.clone();
    let since = Instant::now();
    let after = bounded(Duration::from_secs(15), move || {
        s2.get(&key("r")).map(|e| e.is_none())
    });
    let waited = since.elapsed();
    store.close().unwrap();
    eprintln!(
        "on the runtime: {:?}",
        on_runtime.as_ref().map_err(|_| "panicked")
    );
    assert!(
        matches!(after, Ok(true)),
        "a later read, after {waited:?}: {after:?}"
    );
}

/// Edges of the inputs on PostgreSQL: a NUL byte and 255 bytes of scope, a 255-byte id, a
/// lease extended by Duration::MAX, a response of exactly max_response_bytes and one more,
/// a checkpoint of the limit: answers or errors, never a panic.
#[test]
fn input_edges_answer_without_panicking() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place
        .open(
            Store::builder()
                .postgres_pool_size(2)
                .reap_interval(None)
                .max_response_bytes(1024),
        )
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let scope = format!("a\0b{}", "s".repeat(252));
    let id = "i".repeat(255);
    let k = Key::new(&scope, &id).unwrap();
    let Begin::Started(mut lease) = store.begin(&k, &fp).unwrap() else {
        panic!()
    };
    let extended = lease.extend(Duration::MAX);
    let in_flight = store.begin(&k, &fp).unwrap();
    let checkpoint = lease.checkpoint(&[0u8; 1024]);
    let too_big = lease.checkpoint(&[0u8; 1025]);
    let done = lease.complete(&[0u8; 1024]);
    let replay = store.begin(&k, &fp).unwrap();
    let entry = store.get(&k).unwrap();
    let reaped = store.reap();
    store.close().unwrap();
    eprintln!("extend MAX: {extended:?}; then begin: {in_flight:?}");
    eprintln!("checkpoints: {checkpoint:?} {too_big:?}; complete: {done:?}");
    eprintln!(
        "replay: {}; entry: {entry:?}; reaped: {reaped:?}",
        matches!(replay, Begin::Replay(_))
    );
    assert!(extended.is_ok() && checkpoint.is_ok() && done.is_ok());
    assert!(matches!(too_big, Err(Error::ResponseTooLarge { .. })));
    assert!(matches!(replay, Begin::Replay(_)));
}

/// A `#[tokio::main(flavor = "current_thread")]` service on the tower layer, on a store on
/// PostgreSQL opened in its async main, shut down while a request's handler still runs (the
/// store dropped at the end of main): the handler's lease is released, so the client's retry
/// on another replica runs at once instead of getting 409 for a whole lease.
#[test]
fn the_layer_releases_a_running_handlers_lease_when_the_service_shuts_down() {
    use bytes::Bytes;
    use http_body_util::Full;
    use idemstore::tower::IdempotencyLayer;
    use tower::{Layer, ServiceExt};
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let (conninfo, schema) = place
        .postgres()
        .map(|(c, s)| (c.to_owned(), s.to_owned()))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (running_tx, running_rx) = std::sync::mpsc::channel::<()>();
    runtime.block_on(async move {
        let store = Store::builder()
            .postgres_schema(schema.clone())
            .postgres_pool_size(2)
            .reap_interval(None)
            .open_postgres(&conninfo)
            .unwrap();
        let handler = tower::service_fn(
            move |_request: http::Request<idemstore::tower::Body<Full<Bytes>>>| {
                let running = running_tx.clone();
                async move {
                    running.send(()).unwrap();
                    std::future::pending::<()>().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        "never",
                    ))))
                }
            },
        );
        let service = IdempotencyLayer::new(store.clone()).layer(handler);
        let request = http::Request::post("/payments")
            .header("Idempotency-Key", "shutdown-1")
            .body(Full::new(Bytes::from("pay")))
            .unwrap();
        let call = tokio::spawn(service.oneshot(request));
        // Until the handler runs.
        while !call.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if running_rx.try_recv().is_ok() {
                break;
            }
        }
        // Graceful shutdown does not wait for it; main returns, the store is dropped.
        drop(store);
    });
    drop(runtime);
    // The retry, on a replica.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let other = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let since = Instant::now();
    let status = runtime.block_on(async {
        let handler = tower::service_fn(
            |_request: http::Request<idemstore::tower::Body<Full<Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    "ran",
                ))))
            },
        );
        let request = http::Request::post("/payments")
            .header("Idempotency-Key", "shutdown-1")
            .body(Full::new(Bytes::from("pay")))
            .unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            IdempotencyLayer::new(other.clone())
                .layer(handler)
                .oneshot(request),
        )
        .await;
        answer.map(|r| r.map(|r| r.status()))
    });
    let waited = since.elapsed();
    drop(runtime);
    other.close().unwrap();
    assert!(
        matches!(status, Ok(Ok(s)) if s == 200),
        "the retry got {status:?} after {waited:?}: the running handler's lease was not released"
    );
}

/// Two replicas reap at once while one of them claims, and the other is closed meanwhile:
/// every dead record is deleted exactly once, no live one is, and the live replica goes on.
#[test]
fn two_replicas_reap_at_once_and_one_closes_while_the_other_works() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let clock = clock();
    let open = || {
        place
            .open(
                Store::builder()
                    .postgres_pool_size(4)
                    .reap_interval(None)
                    .ttl(Duration::from_secs(60))
                    .clock(clock.clone()),
            )
            .unwrap()
    };
    let (a, b) = (open(), open());
    let fp = Fingerprint::of(b"body");
    for i in 0..300 {
        let l = started(&a, &key(&format!("dead-{i}")), &fp);
        l.complete(b"x").unwrap();
    }
    clock.advance(Duration::from_secs(61));
    let (ra, rb, live) = std::thread::scope(|s| {
        let ra = s.spawn(|| {
            let mut n = 0;
            for _ in 0..5 {
                n += a.reap().unwrap();
            }
            n
        });
        let rb = s.spawn(|| {
            let mut n = 0;
            for _ in 0..5 {
                n += b.reap().unwrap();
            }
            n
        });
        let live = s.spawn(|| {
            let mut started = 0;
            for i in 0..100 {
                if let Begin::Started(l) = a.begin(&key(&format!("live-{i}")), &fp).unwrap() {
                    l.complete(b"y").unwrap();
                    started += 1;
                }
            }
            started
        });
        (ra.join().unwrap(), rb.join().unwrap(), live.join().unwrap())
    });
    b.close().unwrap();
    let mut replays = 0;
    for i in 0..100 {
        if let Begin::Replay(_) = a.begin(&key(&format!("live-{i}")), &fp).unwrap() {
            replays += 1;
        }
    }
    let more = a.reap().unwrap();
    a.close().unwrap();
    assert_eq!(
        (ra + rb + more, live, replays),
        (300, 100, 100),
        "reaped {ra}+{rb}+{more}"
    );
}

/// Times out a probe.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let since = Instant::now();
    let h = std::thread::spawn(f);
    while !h.is_finished() {
        assert!(since.elapsed() < limit, "did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    h.join().unwrap()
}

/// A measurement, not a check (`.ci/pg run -- cargo test --release --all-features --test
/// pg_async -- --ignored --nocapture what_a_call_from_spawn_blocking_costs`): a read and a
/// claim-and-complete cycle made on a plain thread, and the same made inside the caller's own
/// `spawn_blocking`: on a multi-threaded runtime the store blocks in place (`block_in_place`);
/// on a current-thread runtime tokio cannot tell the thread from the runtime's own, and the
/// store moves each read to a thread of its own and hands each write to its committer thread.
#[test]
#[ignore = "a measurement; run by hand"]
fn what_a_call_from_spawn_blocking_costs() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let store = place.open(Store::builder().reap_interval(None)).unwrap();
    let fp = Fingerprint::of(b"body");
    let read = key("read");
    let lease = started(&store, &read, &fp);
    lease.complete(b"x").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let calls = |store: Store, tag: String| {
        let read = read.clone();
        move || {
            let since = Instant::now();
            for _ in 0..2000 {
                store.get(&read).unwrap();
            }
            let get = since.elapsed() / 2000;
            let since = Instant::now();
            for i in 0..500 {
                let lease = started(&store, &key(&format!("{tag}-{i}")), &fp);
                lease.complete(b"x").unwrap();
            }
            (get, since.elapsed() / 500)
        }
    };
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for round in 0..3 {
        let plain = calls(store.clone(), format!("plain-{round}"))();
        let multi = runtime
            .block_on(runtime.spawn_blocking(calls(store.clone(), format!("multi-{round}"))))
            .unwrap();
        let single = current
            .block_on(current.spawn_blocking(calls(store.clone(), format!("single-{round}"))))
            .unwrap();
        eprintln!(
            "round {round}: get {:?} on a plain thread, {:?} / {:?} in spawn_blocking of a \
             multi-threaded / current-thread runtime; begin + complete {:?} / {:?} / {:?}",
            plain.0, multi.0, single.0, plain.1, multi.1, single.1
        );
    }
    store.close().unwrap();
}
