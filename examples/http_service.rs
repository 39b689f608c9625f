//! A real HTTP payment service on idemstore: `POST /payments` runs once per idempotency key.
//!
//! ```text
//! cargo run --example http_service -- --addr 127.0.0.1:8080 --ttl-ms 86400000
//! curl -i -X POST localhost:8080/payments -H 'Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"' \
//!      -H 'Content-Type: application/json' -d '{"amount":1000}'
//! ```
//!
//! The first line printed is the bound address (`--addr 127.0.0.1:0` picks a free port).
//! Flags: `--addr`, `--ttl-ms` (key TTL), `--lease-ms`, `--retry-after-ms` (what a 409 tells
//! a duplicate to wait; default 1 s), `--threads`, `--db PATH` (the store file; default a file
//! in the temporary directory), `--ledger PATH` (the payment processor's book of charges; default
//! in memory).
//!
//! | request | answer |
//! |---|---|
//! | first `POST /payments` with a key | 201, the card is charged once |
//! | the same request again | the same 201 body, `Idempotent-Replayed: true`, nothing charged |
//! | the same request while the first still runs | 409 + `Retry-After` |
//! | the same key with another body | 422 |
//! | no key | 400 |
//! | a body cut short, a header value with a byte outside ASCII | 400 problem, nothing begun |
//! | the same request after the TTL | runs again (a new payment) |
//! | `GET /charges` | one line per key: `scope/key charges` (for demos and tests) |
//!
//! The server is hyper 1 (HTTP/1.1) on a small tokio runtime: one thread accepts and speaks
//! HTTP, and each `POST /payments` runs on the runtime's blocking pool (`--threads` threads),
//! because the store is synchronous: every "started" and "completed" is fsync'd before it
//! returns. Concurrent requests still share fsyncs through the store's group commit.
//!
//! Two things a copy must keep:
//! * **A request is read whole before anything runs.** An upload cut short (fewer bytes than
//!   its `Content-Length`, or a chunked body that ends inside a chunk) is answered 400 and
//!   nothing is begun, so the client's full retry runs normally. Reading it whole first is
//!   also what the fingerprint needs.
//! * **Every request gets an HTTP answer.** A header value with a byte outside ASCII is
//!   answered with a 400 problem (hyper hands such values on; a request line or header name
//!   that breaks HTTP's syntax gets hyper's own bare 400). Why not `tiny_http`: it closes the
//!   connection without a word on a non-ASCII header byte, before the application sees the
//!   request, and it hands a `Content-Length` body that ended early to the handler as if
//!   it were whole.
//!
//! For demos, the handler sleeps `X-Demo-Work-Ms` milliseconds (at most 10 s) while it holds
//! the lease, to make a request slow enough to meet its own retry. The scope is taken from an
//! `X-Tenant` header (default `public`); a real service takes it from the authenticated caller.
//!
//! Its tests (`tests/http_service.rs`) and the `payment_client` example run it as a child
//! process, on `--addr 127.0.0.1:0`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use idemstore::Store;
use idemstore::http::{Decision, RequestGuard, complete, error_response, problem_response};
use tokio::sync::oneshot;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How long a shutdown waits for the requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// How the service runs.
#[derive(Clone, Debug)]
struct Config {
    /// Address to bind; port 0 picks a free one.
    addr: String,
    /// How long a key is remembered.
    ttl: Duration,
    /// The lease a request holds while it runs; after a crash, a retry takes over once it
    /// runs out.
    lease: Duration,
    /// What a 409 tells a duplicate to wait (`Retry-After`), about how long a payment takes;
    /// never more than the running request's lease has left.
    retry_after_hint: Duration,
    /// Threads that run requests (the runtime's blocking pool).
    threads: usize,
    /// The store file; `None` keeps the store in memory.
    db: Option<PathBuf>,
    /// The payment processor's book of charges; `None` keeps it in memory.
    ledger: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            addr: "127.0.0.1:0".into(),
            // The store's and the guard's defaults.
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            retry_after_hint: Duration::from_secs(1),
            threads: 8,
            db: None,
            ledger: None,
        }
    }
}

/// The payment processor: a book of charges, one line `reference scope/key` each, appended
/// and fsync'd before [`Ledger::charge`] returns (with a file; else in memory). Like a real
/// processor with its own idempotency keys, it books a reference once.
struct Ledger {
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    file: Option<File>,
    references: BTreeSet<String>,
    charges: BTreeMap<String, u32>,
}

impl Ledger {
    /// The book in `path` (created if missing), or in memory.
    fn open(path: Option<&Path>) -> std::io::Result<Ledger> {
        let mut book = Book::default();
        if let Some(path) = path {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for line in text.lines() {
                        if let Some((reference, key)) = line.split_once(' ') {
                            book.book(reference, key);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            book.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
        }
        Ok(Ledger {
            book: Mutex::new(book),
        })
    }

    /// Charges the card of `scope_key` under `reference`, durably; `Ok(false)` when the
    /// reference was booked before (nothing charged now).
    fn charge(&self, reference: &str, scope_key: &str) -> std::io::Result<bool> {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        if book.references.contains(reference) {
            return Ok(false);
        }
        if let Some(file) = &mut book.file {
            file.write_all(format!("{reference} {scope_key}\n").as_bytes())?;
            file.sync_data()?;
        }
        book.book(reference, scope_key);
        Ok(true)
    }

    fn snapshot(&self) -> BTreeMap<String, u32> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.charges.clone()
    }
}

impl Book {
    fn book(&mut self, reference: &str, scope_key: &str) {
        if self.references.insert(reference.to_owned()) {
            *self.charges.entry(scope_key.to_owned()).or_default() += 1;
        }
    }
}

/// A running service. Dropping it stops it: it stops accepting connections, lets the
/// requests in progress finish (for up to 15 s) and waits for the server thread.
struct Service {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// What every request needs.
struct App {
    guard: RequestGuard,
    ledger: Ledger,
}

impl Service {
    /// Opens the store, binds the address and starts the server thread.
    fn start(config: Config) -> Result<Service, Box<dyn Error + Send + Sync>> {
        let builder = Store::builder().ttl(config.ttl).lease(config.lease);
        let store = match &config.db {
            Some(path) => builder.open(path)?,
            None => builder.open_in_memory()?,
        };
        let guard = RequestGuard::new(store)
            .fingerprint_headers([CONTENT_TYPE])
            .retry_after_hint(config.retry_after_hint);
        let app = Arc::new(App {
            guard,
            ledger: Ledger::open(config.ledger.as_deref())?,
        });
        let listener = std::net::TcpListener::bind(config.addr.as_str())?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(config.threads.max(1))
            .thread_name("http-service-request")
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let server = {
            std::thread::Builder::new()
                .name("http-service".into())
                .spawn(move || {
                    runtime.block_on(serve(listener, app, stopped));
                    runtime.shutdown_timeout(SHUTDOWN_GRACE);
                })?
        };
        Ok(Service {
            addr,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// The bound address.
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` and the bound address.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Accepts connections until `stopped`, then waits (bounded) for the open ones.
async fn serve(listener: std::net::TcpListener, app: Arc<App>, mut stopped: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => return eprintln!("http_service: listening failed: {e}"),
    };
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("http_service: accept failed: {e}");
                    continue;
                }
            },
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(answer(app, request).await) }
        });
        // Half-closed connections are kept: a client may shut its writing side and still
        // wait for the answer (to an upload cut short, for one).
        let connection = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that goes away mid-request; nothing was run for it.
                eprintln!("http_service: connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// Answers one request: every request gets an HTTP answer.
async fn answer(app: Arc<App>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let response = if let Some((name, _)) = parts
        .headers
        .iter()
        .find(|(_, value)| !value.as_bytes().is_ascii())
    {
        bad_request(&format!(
            "The {name} header holds a byte outside ASCII. Header values must be ASCII; \
             nothing was done."
        ))
    } else {
        match (parts.method.as_str(), parts.uri.path()) {
            ("POST", "/payments") => match read_body(body).await {
                Ok(body) => {
                    let request = Request::from_parts(parts, body);
                    let app = app.clone();
                    // The store is synchronous (fsync), and the work sleeps: off the runtime.
                    tokio::task::spawn_blocking(move || payments(&app, &request))
                        .await
                        .unwrap_or_else(|e| {
                            eprintln!("http_service: the handler panicked: {e}");
                            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
                        })
                }
                Err(response) => *response,
            },
            ("GET", "/charges") => {
                let mut body = String::new();
                for (key, n) in app.ledger.snapshot() {
                    body.push_str(&format!("{key} {n}\n"));
                }
                text(StatusCode::OK, body)
            }
            _ => problem_response(
                StatusCode::NOT_FOUND,
                "about:blank",
                "Not Found",
                "Try POST /payments or GET /charges.",
            ),
        }
    };
    response.map(|body| Full::new(Bytes::from(body)))
}

/// Reads the whole body, or answers why not: a body that ended before its declared end
/// (the client went away, or its upload was cut) is never handled as if it were whole.
async fn read_body(body: Incoming) -> Result<Vec<u8>, Box<Response<Vec<u8>>>> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<LengthLimitError>() => Err(Box::new(problem_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "about:blank",
            "Payload Too Large",
            "The body is over 64 KiB; nothing was done.",
        ))),
        Err(e) => Err(Box::new(bad_request(&format!(
            "The request body could not be read whole ({e}); nothing was done. Send the whole \
             request again with the same Idempotency-Key."
        )))),
    }
}

fn bad_request(detail: &str) -> Response<Vec<u8>> {
    problem_response(
        StatusCode::BAD_REQUEST,
        "about:blank",
        "Bad Request",
        detail,
    )
}

/// `POST /payments`, behind the idempotency guard.
fn payments(app: &App, req: &Request<Vec<u8>>) -> Response<Vec<u8>> {
    let (guard, ledger) = (&app.guard, &app.ledger);
    let scope = req
        .headers()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("public");
    match guard.begin(scope, req) {
        Ok(Decision::Run(mut lease)) => {
            let key = lease.key().id().to_owned();
            let scope_key = format!("{scope}/{key}");
            // The side effect that must happen once per key, even across a crash: the
            // charge's reference is checkpointed before the charge ("intent"), its success
            // after ("charged"). An attempt that takes over from one that crashed or stalled
            // gets that checkpoint in `recovered()` and resumes: with the same reference
            // (which the processor books once) or, if charged, without charging.
            let previous = lease
                .recovered()
                .and_then(|r| r.checkpoint())
                .map(|c| String::from_utf8_lossy(c).into_owned());
            let resumed = previous.as_deref().and_then(|c| c.split_once(' '));
            let (payment, charged) = match resumed {
                Some(("charged", payment)) => (payment.to_owned(), true),
                Some(("intent", payment)) => (payment.to_owned(), false),
                // A first attempt, or one taken over before it chose a reference.
                _ => {
                    let payment = format!("pay_{}", lease.token());
                    if let Err(e) = lease.checkpoint(format!("intent {payment}").as_bytes()) {
                        eprintln!("http_service: checkpointing {scope_key} failed: {e}");
                        return error_response(&e);
                    }
                    (payment, false)
                }
            };
            if let Some(recovered) = lease.recovered() {
                eprintln!(
                    "http_service: {scope_key}: attempt {} took over from token {} ({})",
                    recovered.attempt(),
                    recovered.previous_token(),
                    previous.as_deref().unwrap_or("no checkpoint"),
                );
            }
            if !charged {
                if let Err(e) = ledger.charge(&payment, &scope_key) {
                    // Unknown whether it was booked: drop the lease (released, its `intent`
                    // checkpoint kept), so a retry charges again under the same reference.
                    eprintln!("http_service: the processor failed: {e}");
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "payment processor unavailable",
                    );
                }
                if let Err(e) = lease.checkpoint(format!("charged {payment}").as_bytes()) {
                    eprintln!("http_service: checkpointing {scope_key} failed: {e}");
                    return error_response(&e);
                }
            }
            // The receipt: work after the charge (a crash now leaves `charged`).
            if let Some(ms) = req
                .headers()
                .get("x-demo-work-ms")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            }
            let body = serde_json::json!({
                "id": payment,
                "status": "succeeded",
                "request": String::from_utf8_lossy(req.body()),
            })
            .to_string();
            let response = Response::builder()
                .status(StatusCode::CREATED)
                .header(CONTENT_TYPE, "application/json")
                .header(LOCATION, format!("/payments/{payment}"))
                // Not replayed: a cookie belongs to the first client only.
                .header(SET_COOKIE, format!("last_payment={payment}; HttpOnly"))
                .body(body.into_bytes());
            let Ok(response) = response else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "response build failed");
            };
            match complete(lease, &response) {
                Ok(_) => response,
                Err(e) => {
                    // The charge happened but its response is not stored: log loudly.
                    eprintln!("http_service: completing {scope}/{key} failed: {e}");
                    error_response(&e)
                }
            }
        }
        Ok(Decision::Replay(response) | Decision::Reject(response)) => response,
        Err(e) => {
            eprintln!("http_service: the store failed: {e}");
            error_response(&e)
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Vec<u8>> {
    let mut response = Response::new(body.into().into_bytes());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    response
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        addr: "127.0.0.1:8080".into(),
        db: Some(std::env::temp_dir().join(format!(
            "idemstore-http-service-{}.redb",
            std::process::id()
        ))),
        ..Config::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let ms = |v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{flag}: not a number of milliseconds: {v}"))
        };
        match flag.as_str() {
            "--addr" => config.addr = value()?,
            "--ttl-ms" => config.ttl = ms(value()?)?,
            "--lease-ms" => config.lease = ms(value()?)?,
            "--retry-after-ms" => config.retry_after_hint = ms(value()?)?,
            "--threads" => {
                config.threads = value()?
                    .parse()
                    .map_err(|_| "--threads: not a number".to_string())?
            }
            "--db" => config.db = Some(PathBuf::from(value()?)),
            "--ledger" => config.ledger = Some(PathBuf::from(value()?)),
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --addr, --ttl-ms, --lease-ms, --retry-after-ms, --threads, --db, --ledger"
                ));
            }
        }
    }
    Ok(config)
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let config = parse_args()?;
    let service = Service::start(config.clone())?;
    // First line: the bound address, for scripts that start the service on port 0.
    println!("{}", service.addr());
    if let Some(db) = &config.db {
        println!("store file: {}", db.display());
    }
    println!(
        "try: curl -i -X POST {}/payments -H 'Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"' -d '{{\"amount\":1000}}'",
        service.url(),
    );
    // Serve until the process is killed.
    loop {
        std::thread::park();
    }
}
