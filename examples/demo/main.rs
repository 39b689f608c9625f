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

mod clients;
mod process;
mod report;
mod run;
mod server;

use std::process::ExitCode;
use std::time::Duration;

use run::run;
use server::server_main;

/// The environment variable that makes this executable the server.
pub(crate) const ROLE_ENV: &str = "IDEMSTORE_DEMO_ROLE";
pub(crate) const STORE_ENV: &str = "IDEMSTORE_DEMO_STORE";
pub(crate) const LEDGER_ENV: &str = "IDEMSTORE_DEMO_LEDGER";
pub(crate) const IGNORE_ENV: &str = "IDEMSTORE_DEMO_IGNORE_CHECKPOINTS";

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
        }
    }
}

const USAGE: &str = "\
usage: demo [--payments N] [--clients N] [--seed S] [--keep] [--quiet] [--ignore-checkpoints]
  --payments N   logical payments to make (default 1000)
  --clients N    client threads, each a tenant with its own outbox (default 16)
  --seed S       seed of the injected failures (default 42)
  --keep         keep the store, ledger and outbox files, and print where they are
  --quiet        no progress bar
  --ignore-checkpoints
                 break the service on purpose: a takeover ignores the checkpoint it
                 receives and charges again; the verdict then fails (exit code 1)";

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
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if options.payments == 0 || options.clients == 0 {
        return Err(format!(
            "--payments and --clients must be at least 1\n{USAGE}"
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
