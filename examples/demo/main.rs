//! A payment service embedding idemstore, under a hostile network and a server crash:
//! every payment must be charged exactly once.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --payments 2000 --clients 32 --seed 7 --keep
//! ```
//!
//! # What runs
//!
//! * **The service** runs in a *child process* (this same executable, re-run with
//!   `IDEMSTORE_DEMO_ROLE=server`): `POST /payments` on hyper, behind
//!   [`RequestGuard`](idemstore::http::RequestGuard), on a store file. It charges a card by
//!   appending a line to a **ledger file** with an fsync (the "payment processor"), and it
//!   uses lease **checkpoints** so that an attempt that takes over a crashed or stalled one
//!   never charges again:
//!
//!   1. checkpoint `intent ch_<token>`: the charge reference this chain of attempts will use;
//!   2. append `ch_<token> payment amount` to the ledger, fsync (the processor books a
//!      reference once; a repeated reference is ignored, as real processors do with their
//!      own idempotency keys);
//!   3. checkpoint `charged ch_<token>`;
//!   4. "send the receipt" (a few milliseconds of work), then complete the lease with the
//!      201 response.
//!
//!   A takeover whose checkpoint says `charged` skips straight to step 4; one that says
//!   `intent` repeats step 2 with the *same* reference (booked at most once); one with no
//!   checkpoint starts over with a new reference (nothing was charged yet).
//! * **Clients**: `--clients` threads, each a tenant with its own durable
//!   [`Outbox`](idemstore::client::Outbox) file. For each payment it records the operation
//!   (persisting the key before the first send), then sends with
//!   [`RetryPolicy`](idemstore::client::RetryPolicy): the same key on every attempt.
//! * **The network and the world** misbehave, from a seeded generator (`--seed`): responses
//!   dropped after the server processed the request; a slow server and client timeouts; the
//!   connection refused; duplicate deliveries (a second copy of the request in flight at
//!   once); bursts of concurrent duplicates; a handler that stalls past its lease (a retry
//!   takes over, resuming from the checkpoint, and the stalled holder is fenced off); a
//!   buggy client reusing a key for another amount (422); clients that "crash" after
//!   sending and resume from their outbox; and the **server killed with SIGKILL** mid-flight
//!   and restarted on the same store and ledger files, after which retries take over the
//!   leases the dead process held.
//!
//! At the end it counts the ledger's lines and checks, from the data: charges executed ==
//! logical payments, each payment id exactly once in the ledger, every payment answered
//! 2xx with the ledger's charge reference, every misuse answered 422, and the store holding
//! one completed record per payment. The exit code is 1 if any of it fails.
//!
//! # Why real HTTP on 127.0.0.1, and a child process
//!
//! The failures that make idempotency hard are those of a real transport: a connection
//! refused while the server is down, a response lost after the work was done, a client
//! timeout while the server keeps working. Real sockets give them without simulating
//! anything, and the 409/422/`Retry-After` answers are the ones `idemstore::http` produces
//! for any HTTP service. The crash has to be real too: a SIGKILLed process runs no
//! destructor, flushes nothing and releases no lease, which a thread cannot imitate.
//!
//! Flags: `--payments N` (default 1000), `--clients N` (16), `--seed S` (42), `--keep`
//! (keep the store, ledger and outbox files and print where they are; look inside with
//! `cargo run --features cli --bin idemstore -- stats FILE`), `--quiet` (no progress bar),
//! `--ignore-checkpoints` (breaks the service on purpose: a takeover ignores its checkpoint
//! and charges again, and the verdict fails with exit code 1: the check is not a formality).
//!
//! # Replicas on PostgreSQL (`--backend postgres --replicas N`, feature `postgres`)
//!
//! ```text
//! .ci/pg run -- cargo run --release --features postgres --example demo -- --backend postgres --replicas 2
//! ```
//!
//! The store is on PostgreSQL (`Builder::open_postgres`, the conninfo from `IDEMSTORE_PG`),
//! in a schema of the run's own (dropped at the end unless `--keep`), and N service
//! processes share it, each on its own port. Each attempt of a client goes to the next
//! replica in turn, so a retry usually lands on another one; one replica is SIGKILLed
//! mid-flight and restarted. The ledger is a table in the same schema: the handler inserts
//! the charge row and completes the lease with `Lease::complete_in` in the *same*
//! transaction, so the charge and the stored response commit together or not at all, and
//! no checkpoint is needed: a takeover finds either a completed key (a replay) or nothing
//! charged (the crashed or fenced attempt's transaction rolled back). The verdict counts the
//! ledger table's rows per payment. `--ignore-checkpoints` breaks this service on purpose
//! too: the charge commits in a transaction of its own before the lease is completed, so a
//! stalled attempt that is fenced off leaves its charge behind, and the verdict fails.
//!
//! # The service on axum (`--server axum`, feature `tower`)
//!
//! ```text
//! cargo run --release --features tower --example demo -- --server axum
//! ```
//!
//! The service is axum 0.8 behind `idemstore::tower::IdempotencyLayer` instead of the
//! hand-written hyper service, on either backend. The layer keeps the lease alive while the
//! handler runs (a stalled handler is answered 409 to its retries, not taken over) and runs
//! the handler to its end when the client goes away, so the clients add a fault: some close
//! the socket while the handler runs, and their retry gets the stored answer. The handler
//! cannot see the lease (the layer holds it), so it passes the idempotency key to the
//! payment processor as the charge reference: a handler re-run by a takeover after the
//! crash books nothing twice.

mod clients;
#[cfg(feature = "postgres")]
mod pg;
mod process;
mod report;
mod run;
mod server;
#[cfg(feature = "tower")]
mod service_axum;

use std::process::ExitCode;
use std::time::Duration;

use run::run;
use server::server_main;

/// The environment variable that makes this executable the server.
pub(crate) const ROLE_ENV: &str = "IDEMSTORE_DEMO_ROLE";
pub(crate) const STORE_ENV: &str = "IDEMSTORE_DEMO_STORE";
pub(crate) const LEDGER_ENV: &str = "IDEMSTORE_DEMO_LEDGER";
pub(crate) const IGNORE_ENV: &str = "IDEMSTORE_DEMO_IGNORE_CHECKPOINTS";
/// The server's HTTP stack: `hyper` (unset) or `axum`.
pub(crate) const SERVER_ENV: &str = "IDEMSTORE_DEMO_SERVER";
/// The store's engine: `redb` (unset) or `postgres`.
pub(crate) const BACKEND_ENV: &str = "IDEMSTORE_DEMO_BACKEND";
/// The run's PostgreSQL schema (the store's tables and the ledger table).
pub(crate) const SCHEMA_ENV: &str = "IDEMSTORE_DEMO_PG_SCHEMA";
/// The PostgreSQL conninfo, as `.ci/pg` sets it.
pub(crate) const PG_ENV: &str = "IDEMSTORE_PG";

/// The lease a request holds; a takeover waits for it to run out after a crash.
pub(crate) const LEASE: Duration = Duration::from_millis(1000);
/// How long the client waits for an answer.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_millis(400);
/// A slow request: longer than the client's timeout, shorter than the lease (409, then replay).
pub(crate) const SLOW_MS: u64 = 600;
/// A stalled handler: longer than the lease (a retry takes over, the staller is fenced off).
pub(crate) const STALL_MS: u64 = 2500;
/// Concurrent copies of a request in a burst.
pub(crate) const BURST: usize = 6;
/// How long the server stays down after the crash.
pub(crate) const DOWNTIME: Duration = Duration::from_millis(300);
/// Server worker threads.
pub(crate) const SERVER_THREADS: usize = 40;
/// A client that disconnects mid-handler closes its socket this long after sending...
pub(crate) const DISCONNECT_AFTER: Duration = Duration::from_millis(40);
/// ...while the handler works this long.
pub(crate) const DISCONNECT_SLOW_MS: u64 = 150;

/// Where the store lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A redb file (one process).
    Redb,
    /// A schema in a PostgreSQL database (any number of processes).
    Postgres,
}

/// What serves HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerKind {
    /// hyper, with the hand-written service around `RequestGuard` and lease checkpoints.
    Hyper,
    /// axum, behind `idemstore::tower::IdempotencyLayer`.
    Axum,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Postgres => "postgres",
        }
    }
}

impl ServerKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ServerKind::Hyper => "hyper",
            ServerKind::Axum => "axum",
        }
    }
}

/// How big the simulation is.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// Logical payments.
    pub(crate) payments: usize,
    /// Client threads (one tenant and one outbox each).
    pub(crate) clients: usize,
    /// Seed of every random choice.
    pub(crate) seed: u64,
    /// Keep the files afterwards.
    pub(crate) keep: bool,
    /// No progress bar and no narration.
    pub(crate) quiet: bool,
    /// The server ignores the checkpoint a takeover receives (to see the verdict fail).
    pub(crate) ignore_checkpoints: bool,
    /// Where the store lives.
    pub(crate) backend: Backend,
    /// Service processes sharing the store (more than one needs PostgreSQL).
    pub(crate) replicas: usize,
    /// What serves HTTP.
    pub(crate) server: ServerKind,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            payments: 1000,
            clients: 16,
            seed: 42,
            keep: false,
            quiet: false,
            ignore_checkpoints: false,
            backend: Backend::Redb,
            replicas: 1,
            server: ServerKind::Hyper,
        }
    }
}

const USAGE: &str = "\
usage: demo [--payments N] [--clients N] [--seed S] [--keep] [--quiet] [--ignore-checkpoints]
            [--backend redb|postgres] [--replicas N] [--server hyper|axum]
  --payments N   logical payments to make (default 1000)
  --clients N    client threads, each a tenant with its own outbox (default 16)
  --seed S       seed of the injected failures (default 42)
  --keep         keep the store, ledger and outbox files, and print where they are
  --quiet        no progress bar
  --ignore-checkpoints
                 break the service on purpose: a takeover ignores the checkpoint it
                 receives and charges again (on postgres: the charge commits on its
                 own, before the completion); the verdict then fails (exit code 1)
  --backend B    the store's engine: redb (default, a file) or postgres (a schema of the
                 run's own in the database named by IDEMSTORE_PG; feature `postgres`)
  --replicas N   service processes sharing the store (default 1; more needs postgres)
  --server S     hyper (default: the hand-written service with checkpoints) or axum
                 (behind idemstore::tower::IdempotencyLayer; feature `tower`)";

/// How to build the demo with the features a mode needs.
const FEATURE_HINT: &str = "cargo run --release --features postgres,tower --example demo -- ...";

fn parse_args() -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let v = args
                .next()
                .ok_or(format!("{name} needs a value\n{USAGE}"))?;
            v.parse()
                .map_err(|_| format!("{name}: not a number: {v}\n{USAGE}"))
        };
        match flag.as_str() {
            "--payments" => options.payments = number("--payments")? as usize,
            "--clients" => options.clients = number("--clients")? as usize,
            "--seed" => options.seed = number("--seed")?,
            "--keep" => options.keep = true,
            "--quiet" => options.quiet = true,
            "--ignore-checkpoints" => options.ignore_checkpoints = true,
            "--replicas" => options.replicas = number("--replicas")? as usize,
            "--backend" => {
                options.backend = match args.next().as_deref() {
                    Some("redb") => Backend::Redb,
                    Some("postgres") => Backend::Postgres,
                    other => {
                        return Err(format!(
                            "--backend: redb or postgres, not {other:?}\n{USAGE}"
                        ));
                    }
                }
            }
            "--server" => {
                options.server = match args.next().as_deref() {
                    Some("hyper") => ServerKind::Hyper,
                    Some("axum") => ServerKind::Axum,
                    other => {
                        return Err(format!("--server: hyper or axum, not {other:?}\n{USAGE}"));
                    }
                }
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if options.payments == 0 || options.clients == 0 || options.replicas == 0 {
        return Err(format!(
            "--payments, --clients and --replicas must be at least 1\n{USAGE}"
        ));
    }
    if options.replicas > 1 && options.backend == Backend::Redb {
        return Err(format!(
            "--replicas {} needs --backend postgres: a redb file is open in one process only\n{USAGE}",
            options.replicas
        ));
    }
    if options.backend == Backend::Postgres && cfg!(not(feature = "postgres")) {
        return Err(format!(
            "--backend postgres: this demo was built without the `postgres` feature; run\n  {FEATURE_HINT}"
        ));
    }
    if options.server == ServerKind::Axum && cfg!(not(feature = "tower")) {
        return Err(format!(
            "--server axum: this demo was built without the `tower` feature; run\n  {FEATURE_HINT}"
        ));
    }
    if options.ignore_checkpoints && options.server == ServerKind::Axum {
        return Err(format!(
            "--ignore-checkpoints breaks the hyper service's checkpoints; the axum service has none\n{USAGE}"
        ));
    }
    Ok(options)
}

/// Whether this process was started as the demo's server.
pub(crate) fn is_server() -> bool {
    std::env::var_os(ROLE_ENV).is_some_and(|v| v == "server")
}

fn main() -> ExitCode {
    if is_server() {
        return server_main();
    }
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match parse_args() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(report) => {
            print!("{}", report.table());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("demo failed to run: {e}");
            ExitCode::FAILURE
        }
    }
}
