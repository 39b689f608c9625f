//! The connection pool: r2d2 over the `postgres` client, without TLS.

use std::time::Duration;

use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use super::error::pool_failed;
use crate::error::{Error, Result};

/// The pool of connections to one database.
pub(crate) type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// A connection checked out of a [`Pool`]; it goes back when dropped (or is discarded when
/// its connection was found closed).
pub(crate) type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// The most connections the default pool size asks for.
const MAX_DEFAULT_POOL_SIZE: u32 = 16;

/// How long opening a connection, or waiting for a free one, may take before the call fails.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The default pool size: two connections per core (one for the committer's batch in flight
/// and room for the readers beside it), at least 2 and at most 16, so that several replicas
/// of a service stay well under PostgreSQL's default `max_connections` of 100.
pub(crate) fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(2, MAX_DEFAULT_POOL_SIZE)
}

/// Opens a pool of `size` connections to the database named by `conninfo` (a libpq-style
/// `key=value` string or a `postgresql://` URL) and waits until all of them are connected.
///
/// Unless `conninfo` says otherwise, connecting times out after [`CONNECTION_TIMEOUT`] and the
/// connections are named `idemstore` in `pg_stat_activity`. Each connection is checked with an
/// empty query when it is checked out, so one the server closed while it sat idle (a restart,
/// `pg_terminate_backend`) is replaced before a caller sees it; one that broke during a call is
/// discarded when it is returned.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a malformed `conninfo` or a `size` of 0; [`Error::Storage`] when
/// the connections cannot be opened in time (the server is unreachable, or refuses the user).
pub(crate) fn open_pool(conninfo: &str, size: u32) -> Result<Pool> {
    if size == 0 {
        return Err(Error::config("the PostgreSQL pool size must be at least 1"));
    }
    let mut config: postgres::Config = conninfo.parse().map_err(|e| {
        // The parse error names the bad part; the string itself may hold a password.
        Error::config(format!(
            "the PostgreSQL connection string is malformed: {e}"
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECTION_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("idemstore");
    }
    let manager = PostgresConnectionManager::new(config, NoTls);
    r2d2::Pool::builder()
        .max_size(size)
        .connection_timeout(CONNECTION_TIMEOUT)
        .test_on_check_out(true)
        .error_handler(Box::new(TraceErrors))
        .build(manager)
        .map_err(|e| pool_failed("connecting to PostgreSQL", e))
}

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

/// Sends the pool's background connection errors to `tracing` (r2d2 would log them through
/// the `log` crate, which idemstore does not use).
#[derive(Debug)]
struct TraceErrors;

impl r2d2::HandleError<postgres::Error> for TraceErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::warn!(%error, "idemstore: a PostgreSQL connection of the pool failed");
    }
}
