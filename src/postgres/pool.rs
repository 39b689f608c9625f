//! The connection pool: r2d2 over the `postgres` client, without TLS.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postgres::{Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use super::error::{chain, pool_failed, read_failed, session_ended};
use crate::error::{Error, Result};

/// The pool of connections to one database.
pub(crate) type Pool = r2d2::Pool<Readers>;

/// A connection checked out of a [`Pool`]; it goes back when dropped (or is discarded when
/// its connection was found closed).
pub(crate) type Conn = r2d2::PooledConnection<Readers>;

/// The most connections the default pool size asks for.
const MAX_DEFAULT_POOL_SIZE: u32 = 16;

/// How long opening a connection, or waiting for a free one, may take before the call fails.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The default pool size: two connections per core (half of them the writers', each with a
/// batch in flight, the other half the readers'), at least 2 and at most 16, so that several
/// replicas of a service stay well under PostgreSQL's default `max_connections` of 100.
pub(crate) fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(2, MAX_DEFAULT_POOL_SIZE)
}

/// The connection settings of `conninfo` (a libpq-style `key=value` string or a
/// `postgresql://` URL), with idemstore's defaults where it says nothing: connecting times out
/// after [`CONNECTION_TIMEOUT`], and the connections are named `idemstore` in
/// `pg_stat_activity`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a malformed `conninfo` (the message names the bad part, never
/// a password).
pub(crate) fn parse_conninfo(conninfo: &str) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = conninfo.parse().map_err(|e| {
        // The parse error names the bad part; the string itself may hold a password.
        Error::config(format!(
            "the PostgreSQL connection string is malformed: {}",
            chain(&e)
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECTION_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("idemstore");
    }
    Ok(config)
}

/// Opens a pool of `size` connections to the database of `config` and waits until all of
/// them are connected.
///
/// Each connection is checked with an empty query when it is checked out, so one the server
/// closed while it sat idle (a restart, `pg_terminate_backend`) is replaced before a caller
/// sees it; one that broke during a call is discarded when it is returned.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a `size` of 0; [`Error::Storage`] when the connections cannot
/// be opened in time (the server is unreachable, or refuses the user).
pub(crate) fn open_pool(
    config: &tokio_postgres::Config,
    size: u32,
    workers: &Workers,
) -> Result<Pool> {
    if size == 0 {
        return Err(Error::config("the PostgreSQL pool size must be at least 1"));
    }
    let manager = Readers {
        manager: PostgresConnectionManager::new(postgres::Config::from(config.clone()), NoTls),
        target: target(config),
    };
    build(manager, size, workers)
}

/// The readers' connections: the `postgres` client's, whose failures to connect name the
/// server and keep their causes ([`ConnectFailed`]).
#[derive(Debug)]
pub(crate) struct Readers {
    manager: PostgresConnectionManager<NoTls>,
    /// Where the connections go ([`target`]).
    target: String,
}

impl r2d2::ManageConnection for Readers {
    type Connection = Client;
    type Error = ConnectFailed;

    fn connect(&self) -> std::result::Result<Client, ConnectFailed> {
        self.manager.connect().map_err(|e| {
            ConnectFailed(read_failed(
                &format!("connecting to PostgreSQL at {}", self.target),
                e,
            ))
        })
    }

    fn is_valid(&self, conn: &mut Client) -> std::result::Result<(), ConnectFailed> {
        self.manager.is_valid(conn).map_err(|e| {
            ConnectFailed(read_failed(
                &format!("checking a PostgreSQL connection to {}", self.target),
                e,
            ))
        })
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        self.manager.has_broken(conn)
    }
}

/// Why a pool's connection could not be opened or checked: an [`Error::Storage`] whose
/// context names the server and every cause. r2d2 keeps only the text of the last failed
/// attempt (for the error of a checkout that timed out), so that text is the context alone,
/// without the "storage failed while" of the error's own message.
#[derive(Debug)]
pub(crate) struct ConnectFailed(pub(crate) Error);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Error::Storage { context, .. } => f.write_str(context),
            other => other.fmt(f),
        }
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

/// Where `config` connects, for messages: each host with its port, then the database and
/// the user when the connection string names them (never the password).
pub(crate) fn target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let hosts: Vec<String> = if config.get_hosts().is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    } else {
        config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(dir) => dir.display().to_string(),
            })
            .collect()
    };
    let mut text = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            // The client's rule: one port for every host, or one per host; 5432 by default.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            if host.starts_with('/') {
                format!("the socket in {host} (port {port})")
            } else if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    if text.is_empty() {
        text.push_str("no host (the connection string names none)");
    }
    if let Some(db) = config.get_dbname() {
        text.push_str(&format!(", database {db:?}"));
    }
    if let Some(user) = config.get_user() {
        text.push_str(&format!(", user {user:?}"));
    }
    text
}

/// How many threads a store's pools share ([`Workers`]).
const WORKER_THREADS: usize = 2;

/// The threads on which a store's pools open connections (in the background, to replace one
/// that was discarded) and close idle ones: one set for all of a store's pools, r2d2's own
/// thread pool.
///
/// Such a thread ends once the last pool using it is gone; dropping the `Workers` (after the
/// pools: it is the store's last field) waits for that, so a closed store leaves no thread
/// behind. A connection being opened at that moment is waited for (it times out after
/// [`CONNECTION_TIMEOUT`]). Dropped on a thread of an async runtime, where nothing may block,
/// it does not wait: the threads end on their own (the store drops its connections and these
/// on a thread of its own there, so this is for a store's failed open).
pub(crate) struct Workers {
    pool: Option<Arc<ScheduledThreadPool>>,
    /// The start of the jobs that leave the end signals.
    start: Arc<Start>,
    /// Disconnected once every thread has ended: each thread's local storage holds a sender
    /// ([`EndSignal`]), dropped when the thread ends.
    ended: crossbeam_channel::Receiver<()>,
}

thread_local! {
    /// A worker thread's [`EndSignal`], dropped when the thread ends.
    static END_SIGNAL: std::cell::RefCell<Option<EndSignal>> =
        const { std::cell::RefCell::new(None) };
}

/// How far the jobs that leave the end signals are ([`Workers::new`]).
#[derive(Default)]
struct Start {
    /// Jobs that have started.
    arrived: std::sync::atomic::AtomicUsize,
    /// Set when the `Workers` are dropped: a job stops waiting for the others.
    abandoned: std::sync::atomic::AtomicBool,
}

/// Held in a worker thread's local storage: its sender closes when the thread ends.
struct EndSignal(#[allow(dead_code)] crossbeam_channel::Sender<()>);

impl Workers {
    /// Starts the threads.
    pub(crate) fn new() -> Workers {
        let pool = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(WORKER_THREADS)
                .thread_name_pattern("idemstore-pg-{}")
                // Once the pools are gone their pending jobs (the idle reaper's next run,
                // a retry to open a connection) have nothing left to do.
                .on_drop_behavior(OnPoolDropBehavior::DiscardPendingScheduled)
                .build(),
        );
        let (signal, ended) = crossbeam_channel::bounded(0);
        // One job per thread leaves the thread's end signal in its local storage, then holds
        // its thread until every job has started, so that no thread runs two of them. It
        // stops waiting when the store is dropped first (the jobs not started yet are then
        // discarded, and their threads end without a signal to give).
        let start = Arc::new(Start::default());
        for _ in 0..WORKER_THREADS {
            let (signal, start) = (signal.clone(), Arc::clone(&start));
            pool.execute(move || {
                END_SIGNAL.with(|slot| *slot.borrow_mut() = Some(EndSignal(signal)));
                start
                    .arrived
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                while start.arrived.load(std::sync::atomic::Ordering::Acquire) < WORKER_THREADS
                    && !start.abandoned.load(std::sync::atomic::Ordering::Acquire)
                {
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
        }
        Workers {
            pool: Some(pool),
            start,
            ended,
        }
    }

    /// The threads, for a pool's builder.
    fn threads(&self) -> Arc<ScheduledThreadPool> {
        Arc::clone(
            self.pool
                .as_ref()
                .expect("the threads are there until drop"),
        )
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // The last handle: the threads are told to end once idle.
        self.start
            .abandoned
            .store(true, std::sync::atomic::Ordering::Release);
        drop(self.pool.take());
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let deadline = std::time::Instant::now() + CONNECTION_TIMEOUT + Duration::from_secs(1);
        // Nothing is ever sent: the channel disconnects when the last thread has ended.
        if let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
            self.ended.recv_deadline(deadline)
        {
            tracing::warn!(
                "idemstore: a PostgreSQL pool thread was still busy when the store closed; \
                 it ends on its own"
            );
        }
    }
}

/// Builds a pool of `size` connections of `manager`, with idemstore's settings: a connection
/// is checked when it is checked out, waiting for one times out after
/// [`CONNECTION_TIMEOUT`], and the pool's background errors go to `tracing`; its background
/// work runs on `workers`. Waits until every connection is open.
///
/// One connection is opened first, on this thread: a server that refuses or cannot be
/// reached fails the call at once, with the client's error as its cause (the pool would keep
/// trying for [`CONNECTION_TIMEOUT`] and keep only the text of the last failure).
///
/// # Errors
///
/// [`Error::Storage`] when a connection cannot be opened, or not all of them in time.
pub(crate) fn build<M>(manager: M, size: u32, workers: &Workers) -> Result<r2d2::Pool<M>>
where
    M: r2d2::ManageConnection<Error = ConnectFailed>,
{
    match manager.connect() {
        Ok(probe) => drop(probe),
        Err(ConnectFailed(e)) => return Err(e.advised(ADVICE)),
    }
    r2d2::Pool::builder()
        .max_size(size)
        .connection_timeout(CONNECTION_TIMEOUT)
        .test_on_check_out(true)
        .error_handler(Box::new(TraceErrors))
        .thread_pool(workers.threads())
        .build(manager)
        .map_err(|e| pool_failed("connecting to PostgreSQL", e))
}

/// What to check when no connection can be opened.
const ADVICE: &str = "check that the server is running and reachable there, and that it \
                      accepts this user and database (pg_hba.conf, the password)";

/// Checks a connection out of `pool`.
///
/// # Errors
///
/// [`Error::Storage`] (nothing was sent) when no connection could be had within the pool's
/// timeout.
pub(crate) fn connection(pool: &Pool) -> Result<Conn> {
    pool.get()
        .map_err(|e| pool_failed("getting a PostgreSQL connection from the pool", e))
}

/// Connections kept out of the pool between reads. A checkout from the pool tests its
/// connection with a round trip first; a kept connection is used as it is, and a read that
/// finds it broken (the server restarted or closed it meanwhile) runs again on a connection
/// from the pool, checked on checkout ([`Kept::read`]: only for statements that write
/// nothing, so that running one twice is harmless). A read that must not run twice takes a
/// connection with [`Kept::checkout`] and gives it back with [`Kept::keep`].
pub(crate) struct Kept {
    conns: Mutex<KeptConns>,
    /// The most connections kept.
    max: usize,
}

/// The connections [`Kept`] holds, and how many callers wait for one from the pool.
struct KeptConns {
    conns: Vec<Conn>,
    waiting: usize,
}

impl Kept {
    /// Keeps up to `max` connections.
    pub(crate) fn new(max: usize) -> Kept {
        Kept {
            conns: Mutex::new(KeptConns {
                conns: Vec::with_capacity(max),
                waiting: 0,
            }),
            max,
        }
    }

    /// Runs `read` on a kept connection, or on one from `pool`; `context` names the read in
    /// its error.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`]: no connection could be had, or the read failed on a checked one.
    pub(crate) fn read<T>(
        &self,
        pool: &Pool,
        context: &str,
        mut read: impl FnMut(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        if let Some(mut conn) = self.live() {
            match read(&mut conn) {
                Err(e) if broken(&conn, &e) => tracing::debug!(
                    error = %chain(&e),
                    "idemstore: a kept PostgreSQL connection failed; the read runs on another one"
                ),
                result => {
                    self.keep(conn);
                    return result.map_err(|e| read_failed(context, e));
                }
            }
        }
        let mut conn = self.wait_for_one(pool)?;
        let result = read(&mut conn);
        self.keep(conn);
        result.map_err(|e| read_failed(context, e))
    }

    /// A kept connection, or else one from `pool`, waited for as one of the callers that
    /// [`Kept::keep`] hands its connection to (through the pool) instead of keeping it: a
    /// connection kept while a caller waits on the pool would leave that caller waiting
    /// until the pool's timeout.
    fn wait_for_one(&self, pool: &Pool) -> Result<Conn> {
        {
            let mut kept = self.conns.lock();
            while let Some(conn) = kept.conns.pop() {
                if !conn.is_closed() {
                    return Ok(conn);
                }
            }
            kept.waiting += 1;
        }
        let got = connection(pool);
        self.conns.lock().waiting -= 1;
        got
    }

    /// A kept connection that is not known to be closed, or else one from `pool` (checked on
    /// checkout), for a read that is not run again when it fails.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] (nothing was sent) when no connection could be had in time.
    pub(crate) fn checkout(&self, pool: &Pool) -> Result<Conn> {
        self.wait_for_one(pool)
    }

    /// A kept connection not known to be closed (one that is goes back to the pool).
    fn live(&self) -> Option<Conn> {
        self.conns.lock().conns.pop().filter(|c| !c.is_closed())
    }

    /// Keeps `conn` for the next read, unless it is closed, enough are kept, or a caller
    /// waits for a connection from the pool (then it goes back to the pool, to that caller).
    pub(crate) fn keep(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        let mut kept = self.conns.lock();
        if kept.waiting == 0 && kept.conns.len() < self.max {
            kept.conns.push(conn);
            return;
        }
        drop(kept);
        drop(conn);
    }
}

/// Whether `error` on `conn` says the connection itself is gone (not that the statement
/// failed): closed, or the server shutting down or terminating the session.
fn broken(conn: &Conn, error: &postgres::Error) -> bool {
    conn.is_closed() || session_ended(error)
}

/// Sends the pool's background connection errors to `tracing` (r2d2 would log them through
/// the `log` crate, which idemstore does not use).
#[derive(Debug)]
struct TraceErrors;

impl<E: std::error::Error> r2d2::HandleError<E> for TraceErrors {
    fn handle_error(&self, error: E) {
        tracing::warn!(
            error = %chain(&error),
            "idemstore: a PostgreSQL connection of the pool failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::postgres::error::write_failed;
    use crate::postgres::schema::create_or_check;
    use crate::postgres::sql::{Statements, Upsert};
    use crate::postgres::testdb::TestDb;

    fn backend_pid(conn: &mut Conn) -> i32 {
        conn.query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0)
    }

    /// Ends the server sessions `pids` and waits until they are gone.
    fn terminate(db: &mut TestDb, pids: &[i32]) {
        let admin = db.admin();
        for pid in pids {
            let ended: bool = admin
                .query_one("SELECT pg_terminate_backend($1)", &[pid])
                .unwrap()
                .get(0);
            assert!(ended, "backend {pid} was not there to end");
        }
        db.wait_until_gone("pid = ANY($1)", &[&pids], &format!("backends {pids:?}"));
    }

    #[test]
    fn the_default_size_is_bounded() {
        let n = default_pool_size();
        assert!((2..=MAX_DEFAULT_POOL_SIZE).contains(&n), "{n}");
    }

    #[test]
    fn bad_settings_are_refused_before_connecting() {
        assert!(matches!(
            open_pool(
                &parse_conninfo("host=127.0.0.1").unwrap(),
                0,
                &Workers::new()
            ),
            Err(Error::InvalidConfig { .. })
        ));
        let e = parse_conninfo("host=127.0.0.1 port=not-a-port password=hunter2").unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
        assert!(e.to_string().contains("port"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(matches!(
            parse_conninfo("postgresql://[bad"),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn idemstore_defaults_fill_what_the_conninfo_leaves_out() {
        let config = parse_conninfo("host=127.0.0.1").unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&CONNECTION_TIMEOUT));
        assert_eq!(config.get_application_name(), Some("idemstore"));
        let config =
            parse_conninfo("host=127.0.0.1 connect_timeout=3 application_name=shop").unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_application_name(), Some("shop"));
    }

    #[test]
    fn an_unreachable_server_fails_the_open_in_bounded_time() {
        // Port 1 on loopback: nothing listens there, the connection is refused.
        let started = Instant::now();
        let config = parse_conninfo("host=127.0.0.1 port=1 user=nobody dbname=none").unwrap();
        let e = open_pool(&config, 1, &Workers::new()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Storage {
                    outcome_unknown: false,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("connecting to PostgreSQL at 127.0.0.1:1")
                && text.contains("Connection refused"),
            "{text}"
        );
        // At once: the first attempt's failure, not the pool's timeout.
        assert!(started.elapsed() < CONNECTION_TIMEOUT / 2);
    }

    /// Dropped at once, before their jobs have all started (an open that fails at its first
    /// connection), the threads end at once: no job waits for one that was discarded.
    #[test]
    fn workers_dropped_at_once_end_at_once() {
        let started = Instant::now();
        for _ in 0..200 {
            drop(Workers::new());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_target_names_hosts_ports_database_and_user_never_the_password() {
        let target = |conninfo: &str| target(&parse_conninfo(conninfo).unwrap());
        assert_eq!(
            target("host=db port=6000 user=shop dbname=orders password=secret"),
            "db:6000, database \"orders\", user \"shop\""
        );
        assert_eq!(target("host=a,b,::1 port=1,2,3"), "a:1, b:2, [::1]:3");
        assert_eq!(
            target("host=/run/postgresql"),
            "the socket in /run/postgresql (port 5432)"
        );
        assert_eq!(target("hostaddr=10.0.0.7"), "10.0.0.7:5432");
        assert_eq!(
            target("user=u"),
            "no host (the connection string names none), user \"u\""
        );
    }

    #[test]
    fn a_connection_killed_mid_batch_is_an_unknown_outcome_and_the_pool_recovers() {
        let Some(mut db) = TestDb::new() else { return };
        let pool = db.pool(2);
        let sql = Statements::new(&db.names);
        create_or_check(&mut connection(&pool).unwrap(), &db.names).unwrap();
        let row = Upsert {
            key: b"k",
            token: 1,
            dies_at: 10,
            record: b"r",
        };

        let mut conn = connection(&pool).unwrap();
        let pid = backend_pid(&mut conn);
        let mut tx = conn.transaction().unwrap();
        sql.lock_keys(&mut tx, &[row.key]).unwrap();
        sql.upsert(&mut tx, &[row]).unwrap();
        terminate(&mut db, &[pid]);
        let e = tx
            .commit()
            .map_err(|e| write_failed("committing a batch", e))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Storage {
                    outcome_unknown: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<postgres::Error>())
                .is_some()
        );
        drop(conn);

        // The broken connection was discarded: every later call works, on new sessions.
        for _ in 0..4 {
            let mut conn = connection(&pool).unwrap();
            assert_ne!(backend_pid(&mut conn), pid);
            let mut tx = conn.transaction().unwrap();
            // The killed batch never committed.
            assert!(sql.load_locked(&mut tx, &[row.key]).unwrap().is_empty());
            tx.commit().unwrap();
        }
    }

    #[test]
    fn idle_connections_the_server_ended_are_replaced_unseen() {
        let Some(mut db) = TestDb::new() else { return };
        let pool = db.pool(2);
        let (mut a, mut b) = (connection(&pool).unwrap(), connection(&pool).unwrap());
        let pids = [backend_pid(&mut a), backend_pid(&mut b)];
        drop((a, b));
        // A server restart or an administrator ends every idle session of the pool.
        terminate(&mut db, &pids);
        let (mut a, mut b) = (connection(&pool).unwrap(), connection(&pool).unwrap());
        for conn in [&mut a, &mut b] {
            let pid = backend_pid(conn);
            assert!(!pids.contains(&pid), "{pid} in {pids:?}");
        }
    }
}
