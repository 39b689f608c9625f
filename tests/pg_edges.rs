//! The PostgreSQL engine's edges, each a finding of the audit of 2026-12-04 that failed
//! before its fix: a locked key fails a write after one lock timeout, not two; reads beyond
//! the readers' connections are served; the schema check refuses a unique death-time
//! index, a generated column and an unlogged table; the reaper at the last representable
//! instant keeps a live lease; a closed store and a refused open leave no server session; a
//! session ended during a batch's lock wait is a known outcome. Runs against the cluster
//! named by `IDEMSTORE_PG` (`.ci/pg run -- cargo test ...`).
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use idemstore::{Begin, Error, Fingerprint, Key, Store};
use idemstore_testkit::engine::{Engine, Place, pg};
use idemstore_testkit::store::started;

fn key(id: &str) -> Key {
    Key::new("tenant", id).unwrap()
}

/// README: "the store's writes of that key wait for it at most 5 s (the writers'
/// lock_timeout), then fail". A writer whose connection was kept from an earlier batch waits
/// twice: the lock timeout on the kept connection is taken for a broken connection and the
/// batch runs again on a new one, which waits another 5 s.
#[test]
fn a_locked_key_fails_a_write_after_one_lock_timeout_not_two() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    // One writer: its connection is kept after the first batch.
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let (conninfo, _) = place.postgres().unwrap();
    let mut client = pg::connect(conninfo);
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("held"), &fp);
    let mut tx = client.transaction().unwrap();
    lease.complete_in(&mut tx, b"done").unwrap();
    let since = Instant::now();
    let err = store.begin(&key("held"), &fp).unwrap_err();
    let waited = since.elapsed();
    assert!(
        matches!(
            err,
            Error::Storage {
                outcome_unknown: false,
                ..
            }
        ),
        "{err:?}"
    );
    tx.rollback().unwrap();
    store.close().unwrap();
    assert!(
        waited < Duration::from_secs(8),
        "a write of a locked key waited {waited:?}, documented: at most 5 s"
    );
}

/// More concurrent reads than the readers' connections: a read that finds no kept
/// connection waits in the pool, but the others' connections go back to `Kept`, never to
/// the pool, so it times out (10 s) although connections are free.
#[test]
fn concurrent_reads_beyond_the_readers_connections_do_not_time_out() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    // One reader connection.
    let store = Arc::new(
        place
            .open(Store::builder().postgres_pool_size(2).reap_interval(None))
            .unwrap(),
    );
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("r"), &fp);
    lease.complete(b"done").unwrap();
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let stop = Arc::new(AtomicBool::new(false));
    let since = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (store, barrier, stop) =
                (Arc::clone(&store), Arc::clone(&barrier), Arc::clone(&stop));
            std::thread::spawn(move || {
                barrier.wait();
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    if let Err(e) = store.get(&key("r")) {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e.to_string());
                    }
                }
                Ok(())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = since.elapsed();
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    for r in &results {
        assert!(r.is_ok(), "a read failed after {elapsed:?}: {r:?}");
    }
    assert!(
        elapsed < Duration::from_secs(6),
        "reads stalled: {elapsed:?}"
    );
}

/// Creates idemstore's objects in a schema of the test's own by hand, the records table as
/// `records_table` (`TABLE` or `UNLOGGED TABLE`) with columns `records_ddl` and the dies_at
/// index by `index_ddl`, then opens a store there: the open must refuse the schema as not
/// idemstore's (`what` says what is wrong with it). Returns at once after the loud skip.
fn refused_shape(records_table: &str, records_ddl: &str, index_ddl: &str, what: &str) {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let (conninfo, schema) = place.postgres().unwrap();
    let s = format!("\"{schema}\"");
    let mut client = pg::connect(conninfo);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE {s}.idemstore_version (version int NOT NULL);
             INSERT INTO {s}.idemstore_version VALUES (1);
             CREATE {records_table} {s}.idemstore_records ({records_ddl});
             {index};
             CREATE SEQUENCE {s}.idemstore_tokens AS bigint START 1 MINVALUE 1 CACHE 1 NO CYCLE;",
            index = index_ddl.replace("{s}", &s),
        ))
        .unwrap();
    match place.open(Store::builder().postgres_pool_size(2).reap_interval(None)) {
        Err(Error::IncompatibleFormat { .. }) => {}
        Err(e) => panic!("{what}: unexpected error {e:?}"),
        Ok(store) => {
            let begun = store.begin(&key("g"), &Fingerprint::of(b"x"));
            store.close().unwrap();
            panic!("{what} was accepted; a begin then gave {begun:?}");
        }
    }
}

const COLUMNS: &str =
    "key bytea PRIMARY KEY, token bigint NOT NULL, dies_at bigint NOT NULL, record bytea NOT NULL";
const DIES_AT_INDEX: &str =
    "CREATE INDEX idemstore_records_dies_at ON {s}.idemstore_records (dies_at)";

/// A dies_at index that is UNIQUE is a wrong shape: two records with the same death time
/// could not both be stored.
#[test]
fn a_unique_dies_at_index_is_refused() {
    refused_shape(
        "TABLE",
        COLUMNS,
        "CREATE UNIQUE INDEX idemstore_records_dies_at ON {s}.idemstore_records (dies_at)",
        "a unique dies_at index",
    );
}

/// A generated dies_at column is a wrong shape: every write of a row would fail.
#[test]
fn a_generated_column_is_refused() {
    refused_shape(
        "TABLE",
        "key bytea PRIMARY KEY, token bigint NOT NULL, \
         dies_at bigint NOT NULL GENERATED ALWAYS AS (token) STORED, record bytea NOT NULL",
        DIES_AT_INDEX,
        "a generated dies_at column",
    );
}

/// An UNLOGGED records table is emptied by the server's crash recovery: every lease and
/// completion would be lost.
#[test]
fn an_unlogged_records_table_is_refused() {
    refused_shape(
        "UNLOGGED TABLE",
        COLUMNS,
        DIES_AT_INDEX,
        "an unlogged records table",
    );
}

/// A death time beyond `i64::MAX` is stored as `i64::MAX`; the clock may read exactly
/// `i64::MAX` ns (it is representable: below 2^63), and then the reaper's
/// `dies_at <= now` deletes a live lease, and a second `begin` starts a second lease.
#[test]
fn the_reaper_at_the_last_representable_nanosecond_keeps_a_live_lease() {
    use idemstore::ManualClock;
    use std::time::UNIX_EPOCH;
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let last = i64::MAX as u64;
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_nanos(last - 1_000));
    let store = place
        .open(
            Store::builder()
                .postgres_pool_size(2)
                .reap_interval(None)
                .lease(Duration::from_secs(10))
                .ttl(Duration::from_secs(100))
                .clock(clock.clone()),
        )
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("edge"), &fp);
    clock.advance(Duration::from_nanos(1_000));
    let reaped = store.reap();
    let second = store.begin(&key("edge"), &fp);
    let in_flight = matches!(second, Ok(Begin::InFlight { .. }));
    drop(second);
    drop(lease);
    store.close().unwrap();
    assert!(
        in_flight,
        "the lease (10 s left) was reaped ({reaped:?}) and the key started again"
    );
}

/// Counts the sessions named `name` on the cluster, waiting up to 5 s for them to go.
fn sessions_left(client: &mut postgres::Client, name: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .unwrap()
            .get(0);
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A closed store (and a refused open) leaves no server session behind.
#[test]
fn a_closed_store_and_a_refused_open_leave_no_session() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let (conninfo, schema) = place.postgres().unwrap();
    let name = format!("audit-{schema}");
    let named = idemstore_testkit::pg::with_param(conninfo, "application_name", &name);
    let mut client = pg::connect(conninfo);
    let store = Store::builder()
        .postgres_schema(schema)
        .postgres_pool_size(6)
        .reap_interval(Some(Duration::from_millis(20)))
        .open_postgres(&named)
        .unwrap();
    let store = Arc::new(store);
    let fp = Fingerprint::of(b"b");
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for j in 0..20 {
                    let k = key(&format!("{i}-{j}"));
                    if let Ok(Begin::Started(l)) = store.begin(&k, &fp) {
                        l.complete(b"x").unwrap();
                    }
                    // Reads from at most 3 threads (the readers' connections; see
                    // concurrent_reads_beyond_the_readers_connections_do_not_time_out).
                    if i < 3 {
                        store.get(&k).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    assert_eq!(sessions_left(&mut client, &name), 0, "sessions after close");

    // A refused open: a newer version row.
    client
        .execute(
            &format!("UPDATE \"{schema}\".idemstore_version SET version = 2"),
            &[],
        )
        .unwrap();
    let refused = Store::builder()
        .postgres_schema(schema)
        .postgres_pool_size(6)
        .open_postgres(&named);
    assert!(
        matches!(refused, Err(Error::IncompatibleFormat { .. })),
        "{refused:?}"
    );
    assert_eq!(
        sessions_left(&mut client, &name),
        0,
        "sessions after a refused open"
    );
}

/// A batch's first round trip (BEGIN, locks, reads, nextval) writes nothing, so a failure in
/// it has a known outcome ("Failed::BeforeWriting"). But it is mapped with `write_failed`,
/// and a session ended while the batch waits for a key's lock comes back as
/// `outcome_unknown: true`.
#[test]
fn a_session_ended_during_a_batchs_lock_wait_is_a_known_outcome() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let (conninfo, schema) = place.postgres().unwrap();
    let name = format!("audit-{schema}");
    let named = idemstore_testkit::pg::with_param(conninfo, "application_name", &name);
    let store = Arc::new(
        Store::builder()
            .postgres_schema(schema)
            .postgres_pool_size(2)
            .reap_interval(None)
            .open_postgres(&named)
            .unwrap(),
    );
    let mut client = pg::connect(conninfo);
    let mut admin = pg::connect(conninfo);
    let fp = Fingerprint::of(b"body");
    let lease = started(&store, &key("held"), &fp);
    let mut tx = client.transaction().unwrap();
    lease.complete_in(&mut tx, b"done").unwrap();
    let waiting = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.begin(&key("held"), &fp))
    };
    // End every session of the store that waits for a lock, until the begin returns.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !waiting.is_finished() && Instant::now() < deadline {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&name],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = waiting.join().unwrap();
    tx.rollback().unwrap();
    Arc::try_unwrap(store).ok().unwrap().close().ok();
    match result {
        Err(Error::Storage {
            outcome_unknown: false,
            ..
        }) => {}
        other => panic!("expected a known-outcome storage error, got {other:?}"),
    }
}

/// The store's calls made on a thread that drives an async runtime (async code that calls
/// the synchronous API directly) block that thread, as they do on the embedded engine, and
/// never break the store: before, `begin` there panicked inside the writer's connection
/// check ("Cannot start a runtime from within a runtime"), which lost that connection from
/// the writers' pool, so every later write waited for the pool's timeout.
#[test]
fn calls_on_a_runtime_thread_work_and_leave_the_store_working() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    // One writer: a lost connection would stop every later write.
    let store = place
        .open(Store::builder().postgres_pool_size(2).reap_interval(None))
        .unwrap();
    let fp = Fingerprint::of(b"body");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let on_runtime = store.clone();
    runtime.block_on(async move {
        let lease = started(&on_runtime, &key("on-runtime"), &fp);
        lease.complete(b"done").unwrap();
        assert!(matches!(
            on_runtime.begin(&key("on-runtime"), &fp).unwrap(),
            Begin::Replay(_)
        ));
        assert!(on_runtime.get(&key("on-runtime")).unwrap().is_some());
        // A lease dropped there releases its key.
        let lease = started(&on_runtime, &key("dropped"), &fp);
        drop(lease);
    });
    let since = Instant::now();
    let lease = started(&store, &key("dropped"), &fp);
    assert_eq!(lease.recovered().map(|r| r.attempt()), Some(2));
    lease.complete(b"after").unwrap();
    assert!(
        since.elapsed() < Duration::from_secs(3),
        "a write after the calls on the runtime took {:?}",
        since.elapsed()
    );
    store.close().unwrap();
}
