//! The store on PostgreSQL (feature `postgres`): the state table end to end, replicas that
//! share one database, and completion inside the caller's own transaction. Runs against the
//! cluster named by `IDEMSTORE_PG` (`.ci/pg run -- cargo test ...`); skipped loudly without
//! it, and failed under `CI=true`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, UNIX_EPOCH};

use idemstore::{Begin, Builder, Error, Fingerprint, Key, ManualClock, Store};
use idemstore_testkit::child::{Child, emit};
use idemstore_testkit::engine::{Engine, Place, pg};
use idemstore_testkit::pg as testkit_pg;

/// A schema of the test's own on the test cluster (dropped at the end), or `None` after the
/// loud skip.
struct Db {
    place: Place,
}

impl Db {
    fn new() -> Option<Db> {
        Place::new(Engine::Postgres).map(|place| Db { place })
    }

    fn builder(&self) -> Builder {
        Store::builder().postgres_pool_size(4).reap_interval(None)
    }

    fn open(&self, builder: Builder) -> Store {
        self.place.open(builder).expect("open on PostgreSQL")
    }

    fn schema(&self) -> &str {
        self.place.postgres().expect("a PostgreSQL place").1
    }

    fn conninfo(&self) -> &str {
        self.place.postgres().expect("a PostgreSQL place").0
    }

    fn client(&self) -> postgres::Client {
        pg::connect(self.conninfo())
    }
}

/// Whether `err` is a storage failure known to have written nothing.
fn wrote_nothing(err: &Error) -> bool {
    matches!(
        err,
        Error::Storage {
            outcome_unknown: false,
            ..
        }
    )
}

fn key(id: &str) -> Key {
    Key::new("tenant", id).unwrap()
}

#[test]
fn every_row_of_the_state_table() {
    let Some(db) = Db::new() else { return };
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let store = db.open(
        db.builder()
            .ttl(Duration::from_secs(100))
            .lease(Duration::from_secs(10))
            .clock(clock.clone()),
    );
    let (fp, other) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));

    let Begin::Started(lease) = store.begin(&key("k"), &fp).unwrap() else {
        panic!("absent → Started")
    };
    assert!(lease.recovered().is_none());
    let first = lease.token();
    assert!(matches!(
        store.begin(&key("k"), &other).unwrap(),
        Begin::Mismatch
    ));
    match store.begin(&key("k"), &fp).unwrap() {
        Begin::InFlight { retry_after } => assert_eq!(retry_after, Duration::from_secs(10)),
        other => panic!("expected InFlight, got {other:?}"),
    }
    std::mem::forget(lease); // a crashed holder
    clock.advance(Duration::from_secs(11));
    let Begin::Started(mut lease) = store.begin(&key("k"), &fp).unwrap() else {
        panic!("expired lease → takeover")
    };
    let recovered = lease.recovered().expect("a takeover");
    assert_eq!(
        (recovered.previous_token(), recovered.attempt()),
        (first, 2)
    );
    assert!(lease.token() > first);
    lease.checkpoint(b"step 1").unwrap();
    lease.extend(Duration::from_secs(30)).unwrap();
    let done = lease.complete(b"response").unwrap();
    assert_eq!(done.response(), b"response");
    match store.begin(&key("k"), &fp).unwrap() {
        Begin::Replay(r) => assert_eq!((r.response(), r.token()), (&b"response"[..], done.token())),
        other => panic!("expected Replay, got {other:?}"),
    }
    assert!(matches!(
        store.begin(&key("k"), &other).unwrap(),
        Begin::Mismatch
    ));
    assert!(store.get(&key("k")).unwrap().is_some());

    // Abandon: absent again. Release on drop: taken over at once, checkpoint kept.
    let Begin::Started(lease) = store.begin(&key("a"), &fp).unwrap() else {
        panic!()
    };
    lease.abandon().unwrap();
    assert!(store.get(&key("a")).unwrap().is_none());
    let Begin::Started(mut lease) = store.begin(&key("d"), &fp).unwrap() else {
        panic!()
    };
    lease.checkpoint(b"cp").unwrap();
    drop(lease);
    let Begin::Started(lease) = store.begin(&key("d"), &fp).unwrap() else {
        panic!()
    };
    assert_eq!(lease.recovered().unwrap().checkpoint(), Some(&b"cp"[..]));
    drop(lease);

    // Expired: absent for every operation, then reaped.
    clock.advance(Duration::from_secs(200));
    assert!(store.get(&key("k")).unwrap().is_none());
    assert_eq!(store.reap().unwrap(), 2);
    let summary = store.summary().unwrap();
    assert_eq!(summary.records(), 0);
    store.close().unwrap();
}

#[test]
fn replicas_agree_exactly_one_start_and_rising_tokens() {
    let Some(db) = Db::new() else { return };
    let replicas: Vec<Store> = (0..3).map(|_| db.open(db.builder())).collect();
    let fp = Fingerprint::of(b"charge 100");
    let barrier = Arc::new(Barrier::new(replicas.len() * 4));
    let handles: Vec<_> = replicas
        .iter()
        .flat_map(|r| (0..4).map(move |_| r.clone()))
        .map(|store| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                match store.begin(&key("dup"), &fp).unwrap() {
                    Begin::Started(lease) => {
                        std::thread::sleep(Duration::from_millis(50));
                        lease.complete(b"charged").unwrap();
                        1
                    }
                    _ => 0,
                }
            })
        })
        .collect();
    let started: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(started, 1, "exactly one Started across replicas");

    // Tokens rise whichever replica grants them.
    let mut last = 0;
    for i in 0..30 {
        let store = &replicas[i % replicas.len()];
        let Begin::Started(lease) = store.begin(&key(&format!("t{i}")), &fp).unwrap() else {
            panic!()
        };
        assert!(lease.token() > last);
        last = lease.token();
        lease.complete(b"ok").unwrap();
    }
    for r in replicas {
        r.close().unwrap();
    }
}

#[test]
fn completion_inside_the_callers_transaction() {
    let Some(db) = Db::new() else { return };
    let store = db.open(db.builder());
    let mut client = db.client();
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{}\".bookings (slot int PRIMARY KEY)",
            db.schema()
        ))
        .unwrap();
    let fp = Fingerprint::of(b"book slot 7");

    // Rolled back: neither the booking nor the completion; the key stays in flight.
    let Begin::Started(lease) = store.begin(&key("b"), &fp).unwrap() else {
        panic!()
    };
    let mut tx = client.transaction().unwrap();
    tx.execute(
        &format!("INSERT INTO \"{}\".bookings VALUES (7)", db.schema()),
        &[],
    )
    .unwrap();
    lease.complete_in(&mut tx, b"booked").unwrap();
    tx.rollback().unwrap();
    assert!(matches!(
        store.begin(&key("b"), &fp).unwrap(),
        Begin::InFlight { .. }
    ));

    // Committed: both.
    let store = db.open(db.builder().lease(Duration::from_millis(200)));
    std::thread::sleep(Duration::from_millis(300));
    let Begin::Started(lease) = store.begin(&key("c"), &fp).unwrap() else {
        panic!()
    };
    let mut tx = client.transaction().unwrap();
    tx.execute(
        &format!("INSERT INTO \"{}\".bookings VALUES (8)", db.schema()),
        &[],
    )
    .unwrap();
    let done = lease.complete_in(&mut tx, b"booked 8").unwrap();
    tx.commit().unwrap();
    match store.begin(&key("c"), &fp).unwrap() {
        Begin::Replay(r) => assert_eq!(r.response(), done.response()),
        other => panic!("expected Replay, got {other:?}"),
    }

    // Fenced: a stale holder's complete_in is LeaseLost.
    let Begin::Started(stale) = store.begin(&key("s"), &fp).unwrap() else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(300));
    let Begin::Started(fresh) = store.begin(&key("s"), &fp).unwrap() else {
        panic!()
    };
    let mut tx = client.transaction().unwrap();
    assert!(matches!(
        stale.complete_in(&mut tx, b"stale"),
        Err(Error::LeaseLost { .. })
    ));
    tx.rollback().unwrap();
    fresh.complete(b"fresh").unwrap();
    store.close().unwrap();
}

/// A transaction left open after `complete_in` holds its key's lock: a write of that key
/// (here a retry made on the very thread that holds the transaction, which would otherwise
/// wait forever) fails after a bounded wait, with a known outcome and advice; other keys
/// are written meanwhile, and once the caller commits the key replays.
#[test]
fn a_key_locked_by_an_open_complete_in_fails_its_writes_after_a_bounded_wait() {
    let Some(db) = Db::new() else { return };
    let store = db.open(db.builder());
    let mut client = db.client();
    let fp = Fingerprint::of(b"body");
    let Begin::Started(lease) = store.begin(&key("held"), &fp).unwrap() else {
        panic!()
    };
    let mut tx = client.transaction().unwrap();
    lease.complete_in(&mut tx, b"done").unwrap();

    let started = std::time::Instant::now();
    let err = store.begin(&key("held"), &fp).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
        "waited {waited:?}"
    );
    assert!(wrote_nothing(&err), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("55P03") && text.contains("complete_in"),
        "{text}"
    );
    // Another key is written while the transaction is still open.
    let Begin::Started(other) = store.begin(&key("other"), &fp).unwrap() else {
        panic!()
    };
    other.complete(b"other").unwrap();

    tx.commit().unwrap();
    match store.begin(&key("held"), &fp).unwrap() {
        Begin::Replay(done) => assert_eq!(done.response(), b"done"),
        other => panic!("expected the replay, got {other:?}"),
    }
    store.close().unwrap();
}

/// The writer keeps its connection, so a pool of one would leave reads waiting for it: refused
/// before anything connects.
#[test]
fn a_pool_of_one_connection_is_refused() {
    let err = Store::builder()
        .postgres_pool_size(1)
        .open_postgres("host=127.0.0.1 port=1 user=nobody dbname=none")
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { .. }) && err.to_string().contains("at least 2"),
        "{err}"
    );
}

/// A server that cannot be reached fails the open at once, and the error says where it
/// tried, why it failed (the operating system's words) and what to check, with the client's
/// error as its cause.
#[test]
fn an_unreachable_server_fails_the_open_at_once_and_says_why() {
    // A port nothing listens on: taken from the system, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let err = Store::builder()
        .open_postgres(&format!(
            "host=127.0.0.1 port={port} user=nobody dbname=none password=secret"
        ))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    for part in [
        &format!("127.0.0.1:{port}") as &str,
        "database \"none\", user \"nobody\"",
        "Connection refused",
        "check that the server is running",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    assert!(!text.contains("secret"), "{text}");
    assert!(wrote_nothing(&err), "{err:?}");
    let cause = std::error::Error::source(&err).expect("a cause");
    assert!(
        cause.downcast_ref::<postgres::Error>().is_some(),
        "{cause:?}"
    );
}

/// The smallest pool: one connection is the writer's own, the other serves the reads, and a
/// walk (the summary) still finds it free after the reads kept nothing.
#[test]
fn a_pool_of_two_serves_writes_reads_and_a_walk() {
    let Some(db) = Db::new() else { return };
    let store = db.open(db.builder().postgres_pool_size(2));
    let fp = Fingerprint::of(b"p");
    let Begin::Started(lease) = store.begin(&key("two"), &fp).unwrap() else {
        panic!()
    };
    lease.complete(b"done").unwrap();
    assert!(store.get(&key("two")).unwrap().is_some());
    let started = std::time::Instant::now();
    let summary = store.summary().unwrap();
    assert_eq!(summary.completed, 1, "{summary:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the walk waited for a connection"
    );
    store.close().unwrap();
}

/// Connections the store keeps between calls (the readers' and the writers') are used without
/// the pool's check: when the server ends them meanwhile, the next read and the next batch
/// notice, run on a checked connection, and answer as if nothing happened.
#[test]
fn kept_connections_the_server_ended_are_replaced_without_an_error() {
    let Some(db) = Db::new() else { return };
    // Its connections under a name of their own (the schema's, unique), so that ending them
    // ends no other test's: the store's default name is `idemstore` for every store.
    let name = db.schema().to_owned();
    let store = db
        .builder()
        .postgres_schema(db.schema())
        .open_postgres(&testkit_pg::with_param(
            db.conninfo(),
            "application_name",
            &name,
        ))
        .expect("open on PostgreSQL");
    let fp = Fingerprint::of(b"p");
    let Begin::Started(lease) = store.begin(&key("kept"), &fp).unwrap() else {
        panic!()
    };
    lease.complete(b"done").unwrap();
    // Reads and writes have each kept a connection by now.
    assert!(store.get(&key("kept")).unwrap().is_some());
    let mut client = db.client();
    let ended: Vec<i32> = client
        .query(
            "SELECT pid FROM (SELECT pid, pg_terminate_backend(pid) AS ended \
             FROM pg_stat_activity WHERE application_name = $1) AS t WHERE ended",
            &[&name],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        ended.len() >= 2,
        "the store's connections were ended ({ended:?})"
    );
    testkit_pg::wait_until_gone(
        &mut client,
        "pid = ANY($1)",
        &[&ended],
        "the store's ended sessions",
    );
    let entry = store.get(&key("kept")).unwrap();
    assert!(
        entry.is_some(),
        "the read ran again on a checked connection"
    );
    match store.begin(&key("kept"), &fp).unwrap() {
        Begin::Replay(done) => assert_eq!(done.response(), b"done"),
        other => panic!("expected Replay, got {other:?}"),
    }
    let Begin::Started(lease) = store.begin(&key("after"), &fp).unwrap() else {
        panic!()
    };
    lease.complete(b"after").unwrap();
    store.close().unwrap();
}

/// The role variable of [`a_closed_store_leaves_no_thread_behind_child`]: the conninfo and
/// the schema, separated by a newline.
const THREADS_CHILD: &str = "IDEMSTORE_PG_THREADS_CHILD";

/// A closed store leaves none of its threads behind: the committer's, the reaper's, and
/// those on which its connection pools open connections (r2d2's, which end on their own
/// once the pools are gone, and which the close now waits for). Counted in a child process,
/// where no other test's store runs.
#[test]
fn a_closed_store_leaves_no_thread_behind() {
    let Some(db) = Db::new() else { return };
    let role = format!("{}\n{}", db.conninfo(), db.schema());
    let mut child = Child::spawn(
        "threads",
        "a_closed_store_leaves_no_thread_behind_child",
        &[(THREADS_CHILD, &role)],
    );
    let during = child.expect(Duration::from_secs(60), "the threads while open");
    let after = child.expect(Duration::from_secs(60), "the threads after the close");
    assert!(during.contains("idemstore-pg-"), "{during}");
    assert_eq!(after, "threads: ", "while open: {during}");
    let on_a_runtime = child.expect(
        Duration::from_secs(60),
        "the threads after a drop on an async runtime and the runtime's shutdown",
    );
    assert_eq!(on_a_runtime, "threads: ");
}

/// The child of [`a_closed_store_leaves_no_thread_behind`]: opens a store, uses it, closes
/// it, and names idemstore's threads while open and after the close.
#[test]
#[ignore = "run by a_closed_store_leaves_no_thread_behind"]
fn a_closed_store_leaves_no_thread_behind_child() {
    let Ok(role) = std::env::var(THREADS_CHILD) else {
        return;
    };
    let (conninfo, schema) = role.split_once('\n').expect("conninfo and schema");
    let threads = || {
        let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim_end().to_owned())
            .filter(|name| name.starts_with("idemstore"))
            .collect();
        names.sort();
        format!("threads: {}", names.join(","))
    };
    // A thread that signalled its end (from its thread-local storage's destructor) is still
    // listed for a moment after: the list settles within a second.
    let settled = || {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let now = threads();
            if now == "threads: " || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let store = Store::builder()
        .postgres_schema(schema)
        .postgres_pool_size(4)
        .reap_interval(Some(Duration::from_millis(50)))
        .open_postgres(conninfo)
        .expect("open");
    let fp = Fingerprint::of(b"body");
    let Begin::Started(lease) = store.begin(&key("k"), &fp).expect("begin") else {
        panic!("a new key")
    };
    lease.complete(b"done").expect("complete");
    assert!(store.get(&key("k")).expect("get").is_some());
    std::thread::sleep(Duration::from_millis(100));
    emit(threads());
    store.close().expect("close");
    emit(settled());
    // Opened and dropped by async code (an async `main` that keeps its store in its
    // router): the synchronous client's connections open and close off the runtime's thread.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let store = Store::builder()
            .postgres_schema(schema)
            .postgres_pool_size(4)
            .open_postgres(conninfo)
            .expect("open on a runtime's thread");
        let reply = tokio::task::spawn_blocking(move || {
            let got = store.get(&key("k")).expect("get");
            (store, got)
        });
        let (store, got) = reply.await.expect("the blocking call");
        assert!(got.is_some());
        drop(store);
    });
    drop(runtime);
    emit(settled());
}
