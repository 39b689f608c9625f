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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use idemstore::client::{Outbox, RetryOutcome, RetryPolicy, Sent};
use idemstore::http::{
    Decision, RequestGuard, complete, error_response, format_idempotency_key, problem_response,
};
use idemstore::{Error as StoreError, Fingerprint, Store};
use indicatif::{ProgressBar, ProgressStyle};

/// The environment variable that makes this executable the server.
pub const ROLE_ENV: &str = "IDEMSTORE_DEMO_ROLE";
const STORE_ENV: &str = "IDEMSTORE_DEMO_STORE";
const LEDGER_ENV: &str = "IDEMSTORE_DEMO_LEDGER";
const IGNORE_ENV: &str = "IDEMSTORE_DEMO_IGNORE_CHECKPOINTS";

/// The lease a request holds; a takeover waits for it to run out after a crash.
const LEASE: Duration = Duration::from_millis(1000);
/// How long the client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(400);
/// A slow request: longer than the client's timeout, shorter than the lease (409, then replay).
const SLOW_MS: u64 = 600;
/// A stalled handler: longer than the lease (a retry takes over, the staller is fenced off).
const STALL_MS: u64 = 2500;
/// Concurrent copies of a request in a burst.
const BURST: usize = 6;
/// How long the server stays down after the crash.
const DOWNTIME: Duration = Duration::from_millis(300);
/// Server worker threads.
const SERVER_THREADS: usize = 40;

// ---------------------------------------------------------------------------------------
// Options and entry points
// ---------------------------------------------------------------------------------------

/// How big the simulation is.
#[derive(Clone, Debug)]
pub struct Options {
    /// Logical payments.
    pub payments: usize,
    /// Client threads (one tenant and one outbox each).
    pub clients: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Keep the files afterwards.
    pub keep: bool,
    /// No progress bar and no narration.
    pub quiet: bool,
    /// The server ignores the checkpoint a takeover receives (to see the verdict fail).
    pub ignore_checkpoints: bool,
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
pub fn is_server() -> bool {
    std::env::var_os(ROLE_ENV).is_some_and(|v| v == "server")
}

#[allow(dead_code)] // the test has its own main
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

// ---------------------------------------------------------------------------------------
// A small deterministic generator (SplitMix64)
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------------------
// The server (child process)
// ---------------------------------------------------------------------------------------

/// The payment processor: an append-only ledger file, one line per booked charge,
/// `ref payment amount token`, fsync'd before `charge` returns. It books a reference once.
struct Ledger {
    file: Mutex<(File, BTreeSet<String>)>,
}

impl Ledger {
    fn open(path: &Path) -> std::io::Result<Ledger> {
        let mut booked = BTreeSet::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Some(reference) = line.split(' ').next() {
                    booked.insert(reference.to_owned());
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ledger {
            file: Mutex::new((file, booked)),
        })
    }

    /// Books `reference` once; `Ok(false)` when it was booked before (nothing charged now).
    fn charge(
        &self,
        reference: &str,
        payment: &str,
        amount: u64,
        token: u64,
    ) -> std::io::Result<bool> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, booked) = &mut *guard;
        if booked.contains(reference) {
            return Ok(false);
        }
        file.write_all(format!("{reference} {payment} {amount} {token}\n").as_bytes())?;
        file.sync_data()?;
        booked.insert(reference.to_owned());
        Ok(true)
    }
}

/// Prints one event line for the parent (stdout is a pipe it reads).
fn event(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child process: serve until killed.
pub fn server_main() -> ExitCode {
    match serve_forever() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve_forever() -> Result<(), Box<dyn Error + Send + Sync>> {
    let store_path = std::env::var(STORE_ENV)?;
    let ledger_path = std::env::var(LEDGER_ENV)?;
    let store = Store::builder().lease(LEASE).open(&store_path)?;
    let guard = RequestGuard::new(store);
    let ledger = Arc::new(Ledger::open(Path::new(&ledger_path))?);
    // hyper on one runtime thread; handlers (store calls, fsyncs, sleeps) on its blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(SERVER_THREADS)
        .thread_name("demo-server")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        event(format!("LISTENING {}", listener.local_addr()?));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("demo server: accept failed: {e}");
                    continue;
                }
            };
            let (guard, ledger) = (guard.clone(), ledger.clone());
            let service = hyper::service::service_fn(move |request| {
                let (guard, ledger) = (guard.clone(), ledger.clone());
                async move { Ok::<_, Infallible>(serve(guard, ledger, request).await) }
            });
            tokio::spawn(async move {
                // Half-closed connections are kept: a client may shut its writing side and
                // still wait for the answer (to an upload cut short, for one).
                let _ = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Answers one request; every request gets an HTTP answer, and a handler only ever sees a
/// body read whole.
async fn serve(
    guard: RequestGuard,
    ledger: Arc<Ledger>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let bad_request = |detail: &str| {
        problem_response(
            StatusCode::BAD_REQUEST,
            "about:blank",
            "Bad Request",
            detail,
        )
    };
    let response = if parts.headers.values().any(|v| !v.as_bytes().is_ascii()) {
        bad_request("A header value holds a byte outside ASCII; nothing was done.")
    } else if parts.method != "POST" || parts.uri.path() != "/payments" {
        text(StatusCode::NOT_FOUND, "try POST /payments")
    } else {
        match Limited::new(body, 64 * 1024).collect().await {
            // Cut short (fewer bytes than declared, or inside a chunk), or too long.
            Err(e) => bad_request(&format!(
                "The request body could not be read whole ({e}); nothing was done."
            )),
            Ok(body) => {
                let req = Request::from_parts(parts, body.to_bytes().to_vec());
                tokio::task::spawn_blocking(move || payments(&guard, &ledger, &req))
                    .await
                    .unwrap_or_else(|_| {
                        text(StatusCode::INTERNAL_SERVER_ERROR, "the handler panicked")
                    })
            }
        }
    };
    response.map(|body| Full::new(Bytes::from(body)))
}

fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    let mut response = Response::new(body.as_bytes().to_vec());
    *response.status_mut() = status;
    response
}

fn header_ms(req: &Request<Vec<u8>>, name: &str) -> Option<u64> {
    req.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// The value of a top-level JSON field in our own flat bodies (`"name":"v"` or `"name":12`).
fn json_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("\"{name}\":"))? + name.len() + 3;
    let rest = &body[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split([',', '}']).next()
    }
}

/// `POST /payments`: the handler behind the idempotency guard.
fn payments(guard: &RequestGuard, ledger: &Ledger, req: &Request<Vec<u8>>) -> Response<Vec<u8>> {
    let scope = req
        .headers()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("public")
        .to_owned();
    let body = String::from_utf8_lossy(req.body()).into_owned();
    let (Some(payment), Some(amount)) = (
        json_field(&body, "payment"),
        json_field(&body, "amount").and_then(|a| a.parse::<u64>().ok()),
    ) else {
        return text(StatusCode::BAD_REQUEST, "need payment and amount");
    };
    let mut lease = match guard.begin(&scope, req) {
        Ok(Decision::Run(lease)) => lease,
        Ok(Decision::Replay(response) | Decision::Reject(response)) => return response,
        Err(e) => {
            event(format!("ERROR begin: {e}"));
            return error_response(&e);
        }
    };
    let token = lease.token();
    let mut resumed = lease.recovered().map(|r| {
        let checkpoint = r
            .checkpoint()
            .map(|c| String::from_utf8_lossy(c).into_owned());
        (r.previous_token(), r.attempt(), checkpoint)
    });
    let failed = |what: &str, e: StoreError| {
        if matches!(e, StoreError::LeaseLost { .. }) {
            event(format!("FENCED {token} {what}"));
        } else {
            event(format!("ERROR {what}: {e}"));
        }
        error_response(&e)
    };
    // Where the previous attempt got to, from its checkpoint.
    if std::env::var_os(IGNORE_ENV).is_some_and(|v| v == "1") {
        // Broken on purpose (--ignore-checkpoints): forget what the previous attempt did.
        if let Some((_, _, checkpoint)) = resumed.as_mut() {
            *checkpoint = None;
        }
    }
    let (reference, charged) = match &resumed {
        Some((previous, attempt, Some(cp))) if cp.starts_with("charged ") => {
            event(format!("TAKEOVER charged {previous} {token} {attempt}"));
            (cp["charged ".len()..].to_owned(), true)
        }
        Some((previous, attempt, Some(cp))) if cp.starts_with("intent ") => {
            event(format!("TAKEOVER intent {previous} {token} {attempt}"));
            (cp["intent ".len()..].to_owned(), false)
        }
        other => {
            if let Some((previous, attempt, _)) = other {
                event(format!("TAKEOVER none {previous} {token} {attempt}"));
            }
            let reference = format!("ch_{token}");
            if let Err(e) = lease.checkpoint(format!("intent {reference}").as_bytes()) {
                return failed("checkpoint", e);
            }
            (reference, false)
        }
    };
    if !charged {
        match ledger.charge(&reference, payment, amount, token) {
            Ok(true) => {}
            Ok(false) => event(format!("DEDUPED {reference}")),
            Err(e) => {
                // Unknown whether it is on disk: keep the lease's `intent` checkpoint and
                // release it (drop), so a retry repeats the charge with the same reference.
                event(format!("ERROR ledger: {e}"));
                return text(StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable");
            }
        }
        if let Err(e) = lease.checkpoint(format!("charged {reference}").as_bytes()) {
            return failed("checkpoint", e);
        }
    }
    // The receipt: a little work after the charge, during which a crash leaves the lease
    // with its `charged` checkpoint. Demo headers make it slow or stall it past the lease.
    let work = 3 + token % 12 + header_ms(req, "x-demo-slow-ms").unwrap_or(0);
    std::thread::sleep(Duration::from_millis(work));
    if let Some(stall) = header_ms(req, "x-demo-stall-ms") {
        std::thread::sleep(Duration::from_millis(stall.min(10_000)));
    }
    let response = Response::builder()
        .status(StatusCode::CREATED)
        .header(CONTENT_TYPE, "application/json")
        .body(
            format!(
                "{{\"payment\":\"{payment}\",\"charge\":\"{reference}\",\"amount\":{amount},\"status\":\"succeeded\"}}"
            )
            .into_bytes(),
        );
    let Ok(response) = response else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "response build failed");
    };
    match complete(lease, &response) {
        Ok(_) => response,
        Err(e) => failed("complete", e),
    }
}

// ---------------------------------------------------------------------------------------
// The parent: starting, watching and killing the server
// ---------------------------------------------------------------------------------------

/// What the server processes reported (read from their stdout).
#[derive(Default)]
pub(crate) struct ServerEvents {
    takeover_charged: AtomicU64,
    takeover_intent: AtomicU64,
    takeover_scratch: AtomicU64,
    fenced: AtomicU64,
    deduped: AtomicU64,
    errors: AtomicU64,
}

/// A running server child; killed when dropped.
pub(crate) struct ServerProcess {
    child: Child,
    url: String,
    reader: Option<JoinHandle<()>>,
}

impl ServerProcess {
    /// The server's `http://` address.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn start(
        store: &Path,
        ledger: &Path,
        log: &Path,
        events: Arc<ServerEvents>,
        errors: Arc<Mutex<Vec<String>>>,
        ignore_checkpoints: bool,
    ) -> Result<ServerProcess, Box<dyn Error>> {
        let log = OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_ENV, "server")
            .env(STORE_ENV, store)
            .env(LEDGER_ENV, ledger)
            .env(IGNORE_ENV, if ignore_checkpoints { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split(' ');
                match (words.next(), words.next()) {
                    (Some("LISTENING"), Some(addr)) => {
                        let _ = tx.send(addr.to_owned());
                    }
                    (Some("TAKEOVER"), Some("charged")) => {
                        events.takeover_charged.fetch_add(1, SeqCst);
                    }
                    (Some("TAKEOVER"), Some("intent")) => {
                        events.takeover_intent.fetch_add(1, SeqCst);
                    }
                    (Some("TAKEOVER"), Some(_)) => {
                        events.takeover_scratch.fetch_add(1, SeqCst);
                    }
                    (Some("FENCED"), _) => {
                        events.fenced.fetch_add(1, SeqCst);
                    }
                    (Some("DEDUPED"), _) => {
                        events.deduped.fetch_add(1, SeqCst);
                    }
                    (Some("ERROR"), _) => {
                        events.errors.fetch_add(1, SeqCst);
                        errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("server: {line}"));
                    }
                    _ => {}
                }
            }
        });
        let mut server = ServerProcess {
            child,
            url: String::new(),
            reader: Some(reader),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "the server did not start (see server.log)")?;
        server.url = format!("http://{addr}");
        Ok(server)
    }

    /// SIGKILL: no destructor runs, nothing is flushed, no lease is released.
    fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------

/// Client-side counts.
#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    lost: AtomicU64,
    timeouts: AtomicU64,
    refused: AtomicU64,
    duplicates: AtomicU64,
    bursts: AtomicU64,
    burst_copies: AtomicU64,
    executed: AtomicU64,
    replays: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    server_errors: AtomicU64,
    other: AtomicU64,
    misuses: AtomicU64,
    client_crashes: AtomicU64,
    resumed: AtomicU64,
    gave_up: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, SeqCst);
}

/// State shared by the client threads and the orchestrator.
struct World {
    url: RwLock<String>,
    counts: Counts,
    /// Payments with a final answer.
    done: AtomicU64,
    /// Requests on the wire right now.
    on_wire: AtomicI64,
    /// When the last request asking the server to stall was sent.
    last_stall: Mutex<Option<Instant>>,
    /// Charge references seen in 2xx answers, per payment.
    references: Mutex<HashMap<String, BTreeSet<String>>>,
    /// 2xx answers that executed the payment (not replays), per payment.
    fresh: Mutex<HashMap<String, u32>>,
    problems: Arc<Mutex<Vec<String>>>,
    progress: ProgressBar,
    seed: u64,
}

impl World {
    fn problem(&self, p: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }
}

/// What came back for one request.
enum Answer {
    Http {
        status: u16,
        replayed: bool,
        retry_after: Option<Duration>,
        body: String,
    },
    Timeout,
    Refused(String),
}

/// Per-request demo switches.
#[derive(Clone, Copy, Default)]
struct Extra {
    slow: bool,
    stall: bool,
}

/// One HTTP request. Every answer that arrives is counted, whether or not the client
/// later "loses" it.
fn send_once(
    world: &World,
    agent: &ureq::Agent,
    scope: &str,
    key: &str,
    body: &str,
    extra: Extra,
) -> Answer {
    bump(&world.counts.attempts);
    let url = world.url.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Ok(header) = format_idempotency_key(key) else {
        return Answer::Refused(format!("invalid key {key:?}"));
    };
    let mut req = agent
        .post(format!("{url}/payments"))
        .header("content-type", "application/json")
        .header("x-tenant", scope)
        .header("idempotency-key", header.to_str().unwrap_or_default());
    if extra.slow {
        req = req.header("x-demo-slow-ms", SLOW_MS.to_string());
    }
    if extra.stall {
        req = req.header("x-demo-stall-ms", STALL_MS.to_string());
        *world.last_stall.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    world.on_wire.fetch_add(1, SeqCst);
    let result = req.send(body);
    world.on_wire.fetch_sub(1, SeqCst);
    let answer = match result {
        Ok(response) => match Sent::from_http(response) {
            Sent::Response {
                status,
                retry_after,
                replayed,
                value,
            } => {
                let body = value.into_body().read_to_string().unwrap_or_default();
                Answer::Http {
                    status,
                    replayed,
                    retry_after,
                    body,
                }
            }
            Sent::Timeout => Answer::Timeout,
            Sent::ConnectionFailed(e) => Answer::Refused(e),
        },
        Err(ureq::Error::Timeout(_)) => Answer::Timeout,
        Err(e) => Answer::Refused(e.to_string()),
    };
    let c = &world.counts;
    match &answer {
        Answer::Http {
            status,
            replayed,
            body,
            ..
        } => match status {
            200..=299 => {
                let payment = json_field(body, "payment").unwrap_or("?").to_owned();
                let reference = json_field(body, "charge").unwrap_or("?").to_owned();
                if *replayed {
                    bump(&c.replays);
                } else {
                    bump(&c.executed);
                    *world
                        .fresh
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(payment.clone())
                        .or_default() += 1;
                }
                world
                    .references
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(payment)
                    .or_default()
                    .insert(reference);
            }
            409 => bump(&c.conflicts),
            422 => bump(&c.mismatches),
            500..=599 => bump(&c.server_errors),
            _ => bump(&c.other),
        },
        Answer::Timeout => bump(&c.timeouts),
        Answer::Refused(_) => bump(&c.refused),
    }
    answer
}

fn to_sent(answer: Answer) -> Sent<String> {
    match answer {
        Answer::Http {
            status,
            retry_after,
            replayed,
            body,
        } => Sent::response(status, body)
            .retry_after(retry_after)
            .replayed(replayed),
        Answer::Timeout => Sent::Timeout,
        Answer::Refused(e) => Sent::ConnectionFailed(e),
    }
}

fn body_of(payment: &str, amount: u64) -> String {
    format!("{{\"payment\":\"{payment}\",\"amount\":{amount}}}")
}

fn policy(seed: u64) -> RetryPolicy {
    RetryPolicy::new()
        .base(Duration::from_millis(25))
        .cap(Duration::from_millis(800))
        .max_attempts(12)
        .max_elapsed(Some(Duration::from_secs(8)))
        .jitter_seed(seed)
}

/// Sends one payment with retries, injecting per-attempt failures. `first` applies to the
/// first attempt only (slow or stalled server).
fn send_with_retries(
    world: &World,
    agent: &ureq::Agent,
    rng: &mut Rng,
    scope: &str,
    key: &str,
    body: &str,
    first: Extra,
) -> RetryOutcome<String> {
    let seed = rng.next();
    policy(seed).run(key, |attempt| {
        let extra = if attempt.number() == 1 {
            first
        } else {
            Extra {
                slow: rng.chance(2),
                stall: false,
            }
        };
        // The connection is refused before anything is sent.
        // (Not on a stalled attempt: the stall must reach the server, alone.)
        if !extra.stall && rng.chance(3) {
            bump(&world.counts.attempts);
            bump(&world.counts.refused);
            return Sent::ConnectionFailed("injected: connection refused".into());
        }
        let drop_response = rng.chance(12);
        let answer = if !extra.stall && rng.chance(6) {
            // Duplicate delivery: the network delivers a second copy at the same time.
            bump(&world.counts.duplicates);
            std::thread::scope(|s| {
                let copy = s.spawn(|| {
                    send_once(world, agent, scope, attempt.key(), body, Extra::default())
                });
                let answer = send_once(world, agent, scope, attempt.key(), body, extra);
                let _ = copy.join();
                answer
            })
        } else {
            send_once(world, agent, scope, attempt.key(), body, extra)
        };
        if drop_response && matches!(answer, Answer::Http { .. }) {
            // Processed by the server, lost on the way back.
            bump(&world.counts.lost);
            return Sent::Timeout;
        }
        to_sent(answer)
    })
}

/// Records a final outcome; `true` when the payment succeeded.
fn settle(world: &World, outbox: &Outbox, payment: &str, outcome: &RetryOutcome<String>) -> bool {
    match outcome {
        RetryOutcome::Succeeded { .. } => {
            if let Err(e) = outbox.finish(payment) {
                world.problem(format!("{payment}: outbox finish failed: {e}"));
            }
            world.done.fetch_add(1, SeqCst);
            world.progress.inc(1);
            true
        }
        RetryOutcome::GaveUp { .. } => {
            // Unknown outcome: keep it pending, resume later with the same key.
            bump(&world.counts.gave_up);
            false
        }
        other => {
            world.problem(format!("{payment}: unexpected final answer {other:?}"));
            if let Err(e) = outbox.finish(payment) {
                world.problem(format!("{payment}: outbox finish failed: {e}"));
            }
            world.done.fetch_add(1, SeqCst);
            world.progress.inc(1);
            true
        }
    }
}

fn amount_of(index: usize, seed: u64) -> u64 {
    100 + Rng::new(seed ^ index as u64).next() % 9900
}

/// One client: its payments are `index, index + clients, ...`.
fn client(
    world: &World,
    dir: &Path,
    index: usize,
    clients: usize,
    payments: usize,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let scope = format!("client-{index:02}");
    let outbox_path = dir.join(format!("{scope}.outbox.redb"));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CLIENT_TIMEOUT))
            .build(),
    );
    let mut rng = Rng::new(world.seed.wrapping_mul(1000).wrapping_add(index as u64));
    let outbox = Outbox::open(&outbox_path)?;
    let shift = (world.seed % 97) as usize;
    for j in (index..payments).step_by(clients) {
        let payment = format!("pay-{j:06}");
        let amount = amount_of(j, world.seed);
        let body = body_of(&payment, amount);
        // Persist the key before the first byte is sent.
        let op = outbox.record(&payment, &Fingerprint::of(&body))?;
        let key = op.key().to_owned();
        let n = j + shift;
        if n % 40 == 7 {
            // A burst: several copies of the same request at the same instant.
            bump(&world.counts.bursts);
            let barrier = Barrier::new(BURST);
            std::thread::scope(|s| {
                for _ in 0..BURST {
                    s.spawn(|| {
                        barrier.wait();
                        bump(&world.counts.burst_copies);
                        send_once(world, &agent, &scope, &key, &body, Extra::default());
                    });
                }
            });
        }
        if n % 45 == 5 {
            // The client sends once, the answer is lost, and the client process "crashes":
            // only its outbox remembers the payment. Resumed after the "restart" below.
            bump(&world.counts.client_crashes);
            let _ = send_once(world, &agent, &scope, &key, &body, Extra::default());
            bump(&world.counts.lost);
            continue;
        }
        let first = Extra {
            slow: rng.chance(4),
            stall: n % 100 == 11,
        };
        let outcome = send_with_retries(world, &agent, &mut rng, &scope, &key, &body, first);
        let succeeded = settle(world, &outbox, &payment, &outcome);
        if succeeded && n % 50 == 3 {
            // A buggy client reuses the key for another amount: 422, never retried, nothing charged.
            let wrong = body_of(&payment, amount + 1);
            let misuse = policy(rng.next()).run(&key, |_| {
                to_sent(send_once(
                    world,
                    &agent,
                    &scope,
                    &key,
                    &wrong,
                    Extra::default(),
                ))
            });
            bump(&world.counts.misuses);
            if !matches!(misuse, RetryOutcome::Mismatch { .. }) {
                world.problem(format!(
                    "{payment}: key reuse answered {misuse:?}, expected a 422 (and no retry after it)"
                ));
            }
        }
    }
    // The client restarts: everything in memory is gone, the outbox file remains. Resume
    // every pending payment with the key it was first sent with.
    drop(outbox);
    for _round in 0..6 {
        let outbox = Outbox::open(&outbox_path)?;
        let pending = outbox.pending()?;
        if pending.is_empty() {
            return Ok(());
        }
        for op in pending {
            bump(&world.counts.resumed);
            let j: usize = op.operation().trim_start_matches("pay-").parse()?;
            let body = body_of(op.operation(), amount_of(j, world.seed));
            let outcome = send_with_retries(
                world,
                &agent,
                &mut rng,
                &scope,
                op.key(),
                &body,
                Extra::default(),
            );
            settle(world, &outbox, op.operation(), &outcome);
        }
    }
    let left = Outbox::open(&outbox_path)?.pending()?.len();
    if left > 0 {
        world.problem(format!(
            "{scope}: {left} payment(s) still pending after 6 resume rounds"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The run, and its report
// ---------------------------------------------------------------------------------------

/// Everything counted, and the verdict's inputs.
pub struct Report {
    options: Options,
    elapsed: Duration,
    rows: Vec<(String, u64)>,
    /// Ledger lines (charges executed).
    pub charges: u64,
    /// Takeovers reported by the server.
    pub takeovers: u64,
    /// What failed; empty when every check held.
    pub failures: Vec<String>,
    checks: Vec<String>,
    kept: Option<PathBuf>,
}

impl Report {
    /// Where the files were kept (with `--keep`, or after a failed check).
    pub fn kept(&self) -> Option<&Path> {
        self.kept.as_deref()
    }

    /// Whether every check held.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The summary table and the verdict, as printed at the end.
    pub fn table(&self) -> String {
        let mut out = format!(
            "\nidemstore demo: {} payments from {} clients, seed {}, {:.1} s\n\n",
            self.options.payments,
            self.options.clients,
            self.options.seed,
            self.elapsed.as_secs_f64()
        );
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, value) in &self.rows {
            out.push_str(&format!("  {label:<width$}  {value:>7}\n"));
        }
        out.push('\n');
        for check in &self.checks {
            out.push_str(&format!("  ok    {check}\n"));
        }
        for failure in &self.failures {
            out.push_str(&format!("  FAIL  {failure}\n"));
        }
        if let Some(dir) = &self.kept {
            out.push_str(&format!(
                "\nfiles kept in {}\n  look inside the store: cargo run --features cli --bin idemstore -- stats {}\n",
                dir.display(),
                dir.join("payments.redb").display()
            ));
        }
        out.push_str(if self.ok() {
            "\nVERDICT: OK: charges executed == logical payments; every payment charged exactly once\n"
        } else {
            "\nVERDICT: VIOLATED: see FAIL above\n"
        });
        out
    }
}

/// Runs the whole simulation.
pub fn run(options: &Options) -> Result<Report, Box<dyn Error>> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "idemstore-demo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    let store_path = dir.join("payments.redb");
    let ledger_path = dir.join("ledger.txt");
    let log_path = dir.join("server.log");

    let progress = if options.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(options.payments as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} payments  {msg}",
            )?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    };
    let say = |line: String| {
        if !options.quiet {
            progress.println(line);
        }
    };
    let events = Arc::new(ServerEvents::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    let server = ServerProcess::start(
        &store_path,
        &ledger_path,
        &log_path,
        events.clone(),
        problems.clone(),
        options.ignore_checkpoints,
    )?;
    say(format!(
        "server (pid {}) on {}, store {}",
        server.child.id(),
        server.url,
        store_path.display()
    ));
    progress.set_message("server up");
    let world = Arc::new(World {
        url: RwLock::new(server.url().to_owned()),
        counts: Counts::default(),
        done: AtomicU64::new(0),
        on_wire: AtomicI64::new(0),
        last_stall: Mutex::new(None),
        references: Mutex::new(HashMap::new()),
        fresh: Mutex::new(HashMap::new()),
        problems: problems.clone(),
        progress: progress.clone(),
        seed: options.seed,
    });

    let mut handles = Vec::new();
    for index in 0..options.clients.min(options.payments) {
        let (world, dir) = (world.clone(), dir.clone());
        let (clients, payments) = (options.clients.min(options.payments), options.payments);
        handles.push(
            std::thread::Builder::new()
                .name(format!("client-{index}"))
                .spawn(move || {
                    if let Err(e) = client(&world, &dir, index, clients, payments) {
                        world.problem(format!("client {index} failed: {e}"));
                    }
                })?,
        );
    }

    // The crash: SIGKILL the server once a seeded share (30-50%) of the payments is done.
    let crash_at = (options.payments as u64 * Rng::new(options.seed).range(30, 50) / 100).max(1);
    while world.done.load(SeqCst) < crash_at && handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let on_wire = world.on_wire.load(SeqCst);
    server.kill();
    progress.set_message("server KILLED (SIGKILL)");
    say(format!(
        "server killed with SIGKILL after {} payments, {on_wire} request(s) on the wire",
        world.done.load(SeqCst)
    ));
    std::thread::sleep(DOWNTIME);
    let server = ServerProcess::start(
        &store_path,
        &ledger_path,
        &log_path,
        events.clone(),
        problems.clone(),
        options.ignore_checkpoints,
    )?;
    *world.url.write().unwrap_or_else(|e| e.into_inner()) = server.url().to_owned();
    progress.set_message("server restarted");
    say(format!(
        "server restarted (pid {}) on {}, same store and ledger files",
        server.child.id(),
        server.url
    ));
    for h in handles {
        let _ = h.join();
    }
    // Let a stalled handler wake up (and be fenced off) before the final stop.
    let last_stall = *world.last_stall.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = last_stall {
        let until = at + Duration::from_millis(STALL_MS + 300);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    drop(server);
    progress.finish_and_clear();

    // The evidence: the ledger file, the store file, and what the clients saw.
    let ledger = std::fs::read_to_string(&ledger_path)?;
    let mut per_payment: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut charges = 0u64;
    let mut failures = problems.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for line in ledger.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() != 4 {
            failures.push(format!("malformed ledger line {line:?}"));
            continue;
        }
        charges += 1;
        per_payment
            .entry(fields[1].to_owned())
            .or_default()
            .push(fields[0].to_owned());
    }
    let summary = {
        let store = Store::builder().reap_interval(None).open(&store_path)?;
        let summary = store.summary()?;
        store.close()?;
        summary
    };

    let n = options.payments as u64;
    let mut checks = Vec::new();
    let mut check = |ok: bool, text: String, failures: &mut Vec<String>| {
        if ok {
            checks.push(text);
        } else {
            failures.push(text);
        }
    };
    check(
        charges == n,
        format!("charges executed (ledger lines) {charges} == logical payments {n}"),
        &mut failures,
    );
    let twice: Vec<_> = per_payment
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .map(|(p, _)| p.clone())
        .collect();
    let missing = (0..options.payments)
        .filter(|j| !per_payment.contains_key(&format!("pay-{j:06}")))
        .count();
    check(
        twice.is_empty() && missing == 0 && per_payment.len() as u64 == n,
        format!(
            "each payment id exactly once in the ledger ({} charged twice or more{}, {missing} never)",
            twice.len(),
            if twice.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    twice.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )
            }
        ),
        &mut failures,
    );
    let references = world
        .references
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let wrong_reference = (0..options.payments)
        .map(|j| format!("pay-{j:06}"))
        .filter(|p| {
            let seen = references.get(p);
            let booked = per_payment.get(p);
            match (seen, booked) {
                (Some(seen), Some(booked)) => {
                    seen.len() != 1 || booked.len() != 1 || seen.first() != booked.first()
                }
                _ => true,
            }
        })
        .count();
    check(
        wrong_reference == 0,
        format!(
            "every payment answered 2xx, every 2xx carrying its ledger charge reference ({wrong_reference} not)"
        ),
        &mut failures,
    );
    let executed_twice = world
        .fresh
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|&&k| k > 1)
        .count();
    check(
        executed_twice == 0,
        format!(
            "at most one executing (non-replayed) 2xx per payment ({executed_twice} with more)"
        ),
        &mut failures,
    );
    let c = &world.counts;
    let misuses = c.misuses.load(SeqCst);
    check(
        c.mismatches.load(SeqCst) >= misuses,
        format!("every key reuse for another amount answered 422 ({misuses} reuses)"),
        &mut failures,
    );
    check(
        summary.completed == n && summary.in_flight == 0,
        format!(
            "the store file holds {} completed records (one per payment), {} in flight",
            summary.completed, summary.in_flight
        ),
        &mut failures,
    );

    let get = |a: &AtomicU64| a.load(SeqCst);
    let takeovers = get(&events.takeover_charged)
        + get(&events.takeover_intent)
        + get(&events.takeover_scratch);
    let rows = vec![
        ("logical payments".to_owned(), n),
        (
            "HTTP attempts (all requests sent)".to_owned(),
            get(&c.attempts),
        ),
        (
            "  responses lost after processing (injected)".to_owned(),
            get(&c.lost),
        ),
        (
            "  client timeouts (slow or stalled server)".to_owned(),
            get(&c.timeouts),
        ),
        (
            "  connection failures (injected, server down)".to_owned(),
            get(&c.refused),
        ),
        (
            "  duplicate deliveries (a 2nd copy in flight)".to_owned(),
            get(&c.duplicates),
        ),
        (
            format!("  bursts of {BURST} concurrent duplicates"),
            get(&c.bursts),
        ),
        (
            "answers received: 201 that ran the payment".to_owned(),
            get(&c.executed),
        ),
        (
            "                  replays (Idempotent-Replayed)".to_owned(),
            get(&c.replays),
        ),
        (
            "                  409 in flight (+ Retry-After)".to_owned(),
            get(&c.conflicts),
        ),
        (
            "                  422 key reused for another amount".to_owned(),
            get(&c.mismatches),
        ),
        ("                  5xx".to_owned(), get(&c.server_errors)),
        (
            "server killed (SIGKILL mid-flight) and restarted".to_owned(),
            1,
        ),
        ("lease takeovers".to_owned(), takeovers),
        (
            "  resumed from checkpoint \"charged\"".to_owned(),
            get(&events.takeover_charged),
        ),
        (
            "  resumed from checkpoint \"intent\"".to_owned(),
            get(&events.takeover_intent),
        ),
        (
            "  from scratch (nothing was charged yet)".to_owned(),
            get(&events.takeover_scratch),
        ),
        (
            "stale holders fenced off (LeaseLost)".to_owned(),
            get(&events.fenced),
        ),
        (
            "repeated charge references ignored by ledger".to_owned(),
            get(&events.deduped),
        ),
        (
            "client crashes, resumed from the outbox".to_owned(),
            get(&c.client_crashes),
        ),
        (
            "retry runs that gave up, resumed later".to_owned(),
            get(&c.gave_up),
        ),
        ("charges executed (ledger lines)".to_owned(), charges),
    ];
    let kept = if options.keep || !failures.is_empty() {
        Some(dir.clone())
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        None
    };
    Ok(Report {
        options: options.clone(),
        elapsed: started.elapsed(),
        rows,
        charges,
        takeovers,
        failures,
        checks,
        kept,
    })
}
