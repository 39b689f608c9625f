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
//! in the temporary directory).
//!
//! | request | answer |
//! |---|---|
//! | first `POST /payments` with a key | 201, the card is charged once |
//! | the same request again | the same 201 body, `Idempotent-Replayed: true`, nothing charged |
//! | the same request while the first still runs | 409 + `Retry-After` |
//! | the same key with another body | 422 |
//! | no key | 400 |
//! | the same request after the TTL | runs again (a new payment) |
//! | `GET /charges` | one line per key: `scope/key charges` (for demos and tests) |
//!
//! Why a synchronous server: the store is synchronous (every "started" and "completed" is
//! fsync'd before it returns), so a thread-per-request server calls it directly. `tiny_http`
//! with a small pool of worker threads needs no async runtime and no `spawn_blocking`;
//! concurrent requests still share fsyncs through the store's group commit. In an async
//! server, call the same functions through `spawn_blocking` (see `idemstore::http`).
//!
//! For demos, the handler sleeps `X-Demo-Work-Ms` milliseconds (at most 10 s) while it holds
//! the lease, to make a request slow enough to meet its own retry. The scope is taken from an
//! `X-Tenant` header (default `public`); a real service takes it from the authenticated caller.
//!
//! Tests and the `payment_client` example include this file as a module and call
//! [`Service::start`].

use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{Request, Response, StatusCode};
use idemstore::Store;
use idemstore::http::{Decision, RequestGuard, complete, error_response, problem_response};

/// Largest request body accepted.
const MAX_BODY: u64 = 64 * 1024;

/// How the service runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to bind; port 0 picks a free one.
    pub addr: String,
    /// How long a key is remembered.
    pub ttl: Duration,
    /// The lease a request holds while it runs; after a crash, a retry takes over once it
    /// runs out.
    pub lease: Duration,
    /// What a 409 tells a duplicate to wait (`Retry-After`), about how long a payment takes;
    /// never more than the running request's lease has left.
    pub retry_after_hint: Duration,
    /// Worker threads.
    pub threads: usize,
    /// The store file; `None` keeps the store in memory.
    pub db: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            addr: "127.0.0.1:0".into(),
            ttl: idemstore::DEFAULT_TTL,
            lease: idemstore::DEFAULT_LEASE,
            retry_after_hint: idemstore::http::DEFAULT_RETRY_AFTER_HINT,
            threads: 8,
            db: None,
        }
    }
}

/// The payment processor's side: how often each key was charged.
#[derive(Default)]
struct Ledger {
    next_payment: AtomicU64,
    charges: Mutex<BTreeMap<String, u32>>,
}

impl Ledger {
    /// Charges the card for `scope/key`; returns the new payment's number.
    fn charge(&self, scope: &str, key: &str) -> u64 {
        let mut charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
        *charges.entry(format!("{scope}/{key}")).or_default() += 1;
        self.next_payment.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn snapshot(&self) -> BTreeMap<String, u32> {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A running service. Dropping it stops it (as [`Service::shutdown`] does).
pub struct Service {
    addr: SocketAddr,
    guard: RequestGuard,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Service {
    /// Opens the store, binds the address and starts the worker threads.
    pub fn start(config: Config) -> Result<Service, Box<dyn Error + Send + Sync>> {
        let builder = Store::builder().ttl(config.ttl).lease(config.lease);
        let store = match &config.db {
            Some(path) => builder.open(path)?,
            None => builder.open_in_memory()?,
        };
        let guard = RequestGuard::new(store)
            .fingerprint_headers([CONTENT_TYPE])
            .retry_after_hint(config.retry_after_hint);
        let server = Arc::new(tiny_http::Server::http(config.addr.as_str())?);
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or("the server is not listening on an IP address")?;
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for i in 0..config.threads.max(1) {
            let (server, guard, ledger, stop) =
                (server.clone(), guard.clone(), ledger.clone(), stop.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("http-worker-{i}"))
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            match server.recv_timeout(Duration::from_millis(50)) {
                                Ok(Some(request)) => serve(&guard, &ledger, request),
                                Ok(None) => {}
                                Err(e) => eprintln!("http_service: accept failed: {e}"),
                            }
                        }
                    })?,
            );
        }
        Ok(Service {
            addr,
            guard,
            ledger,
            stop,
            workers,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` and the bound address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The store behind the service.
    pub fn store(&self) -> &Store {
        self.guard.store()
    }

    /// Charges per `scope/key`, as the payment processor saw them.
    pub fn charges(&self) -> BTreeMap<String, u32> {
        self.ledger.snapshot()
    }

    /// How often `key` (in scope `public`) was charged.
    pub fn charges_for(&self, key: &str) -> u32 {
        self.charges()
            .get(&format!("public/{key}"))
            .copied()
            .unwrap_or(0)
    }

    /// Stops the workers (each finishes its request) and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Answers one request.
fn serve(guard: &RequestGuard, ledger: &Ledger, mut request: tiny_http::Request) {
    let response = match (request.method().as_str(), request.url()) {
        ("POST", "/payments") => match read_request(&mut request) {
            Ok(req) => payments(guard, ledger, &req),
            Err(response) => *response,
        },
        ("GET", "/charges") => {
            let mut body = String::new();
            for (key, n) in ledger.snapshot() {
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
    };
    if let Err(e) = request.respond(to_tiny(response)) {
        eprintln!("http_service: sending a response failed: {e}");
    }
}

/// `POST /payments`, behind the idempotency guard.
fn payments(guard: &RequestGuard, ledger: &Ledger, req: &Request<Vec<u8>>) -> Response<Vec<u8>> {
    let scope = req
        .headers()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("public");
    match guard.begin(scope, req) {
        Ok(Decision::Run(lease)) => {
            let key = lease.key().id().to_owned();
            // The side effect that must happen once per key.
            let payment = ledger.charge(scope, &key);
            if let Some(ms) = req
                .headers()
                .get("x-demo-work-ms")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            }
            let body = format!(
                "{{\"id\":\"pay_{payment}\",\"status\":\"succeeded\",\"request\":{}}}",
                json_string(&String::from_utf8_lossy(req.body()))
            );
            let response = Response::builder()
                .status(StatusCode::CREATED)
                .header(CONTENT_TYPE, "application/json")
                .header(LOCATION, format!("/payments/pay_{payment}"))
                // Not replayed: a cookie belongs to the first client only.
                .header(SET_COOKIE, format!("last_payment=pay_{payment}; HttpOnly"))
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

/// Reads a tiny_http request into an `http::Request`.
fn read_request(
    request: &mut tiny_http::Request,
) -> Result<Request<Vec<u8>>, Box<Response<Vec<u8>>>> {
    let mut body = Vec::new();
    let read = std::io::Read::read_to_end(
        &mut std::io::Read::take(request.as_reader(), MAX_BODY + 1),
        &mut body,
    );
    if read.is_err() {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "could not read the body",
        )));
    }
    if body.len() as u64 > MAX_BODY {
        return Err(Box::new(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body over 64 KiB",
        )));
    }
    let mut builder = Request::builder()
        .method(request.method().as_str())
        .uri(request.url());
    for h in request.headers() {
        builder = builder.header(h.field.as_str().as_str(), h.value.as_str());
    }
    builder
        .body(body)
        .map_err(|_| Box::new(text(StatusCode::BAD_REQUEST, "malformed request")))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Vec<u8>> {
    let mut response = Response::new(body.into().into_bytes());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    response
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An `http::Response` as a tiny_http response (tiny_http sets `Content-Length` itself).
fn to_tiny(response: Response<Vec<u8>>) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let (parts, body) = response.into_parts();
    let mut out = tiny_http::Response::from_data(body).with_status_code(parts.status.as_u16());
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH {
            continue;
        }
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_str().as_bytes(), value.as_bytes()) {
            out.add_header(h);
        }
    }
    out
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
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --addr, --ttl-ms, --lease-ms, --retry-after-ms, --threads, --db"
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
