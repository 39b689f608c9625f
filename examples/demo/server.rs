//! The server (the child process): `POST /payments` behind the idempotency guard, charging
//! through a ledger file, with checkpoints so that a takeover never charges again.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use idemstore::http::{Decision, RequestGuard, complete, error_response, problem_response};
use idemstore::{Error as StoreError, Store};

use crate::{BACKEND_ENV, IGNORE_ENV, LEASE, LEDGER_ENV, SERVER_ENV, SERVER_THREADS, STORE_ENV};

/// The payment processor: an append-only ledger file, one line per booked charge,
/// `ref payment amount token`, fsync'd before `charge` returns. It books a reference once.
pub(crate) struct Ledger {
    pub(crate) file: Mutex<(File, BTreeSet<String>)>,
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
pub(crate) fn event(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child process: serve until killed.
pub(crate) fn server_main() -> ExitCode {
    match serve_forever() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the charges go: the ledger file (redb backend) or the ledger table (PostgreSQL).
#[derive(Clone)]
pub(crate) enum Books {
    File(Arc<Ledger>),
    #[cfg(feature = "postgres")]
    Table(Arc<crate::pg::LedgerTable>),
}

impl Books {
    /// Books `reference` once (the axum service's charge, referenced by the idempotency
    /// key); `Ok(false)` when it was booked before.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn charge_once(
        &self,
        reference: &str,
        payment: &str,
        amount: u64,
    ) -> Result<bool, Box<dyn Error + Send + Sync>> {
        match self {
            Books::File(ledger) => Ok(ledger.charge(reference, payment, amount, 0)?),
            #[cfg(feature = "postgres")]
            Books::Table(table) => table.charge_once(reference, payment, amount),
        }
    }
}

/// The store and the books this server process uses, from its environment.
fn open_store_and_books() -> Result<(Store, Books), Box<dyn Error + Send + Sync>> {
    let backend = std::env::var(BACKEND_ENV).unwrap_or_default();
    if backend == "postgres" {
        #[cfg(feature = "postgres")]
        return crate::pg::open_store_and_books();
        #[cfg(not(feature = "postgres"))]
        return Err("the postgres backend needs the `postgres` feature".into());
    }
    let store_path = std::env::var(STORE_ENV)?;
    let ledger_path = std::env::var(LEDGER_ENV)?;
    let store = Store::builder().lease(LEASE).open(&store_path)?;
    let ledger = Arc::new(Ledger::open(Path::new(&ledger_path))?);
    Ok((store, Books::File(ledger)))
}

pub(crate) fn serve_forever() -> Result<(), Box<dyn Error + Send + Sync>> {
    let (store, books) = open_store_and_books()?;
    let axum = std::env::var(SERVER_ENV).is_ok_and(|v| v == "axum");
    // The server on one runtime thread; handlers (store calls, fsyncs, sleeps) on its
    // blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(SERVER_THREADS)
        .thread_name("demo-server")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        event(format!("LISTENING {}", listener.local_addr()?));
        if axum {
            #[cfg(feature = "tower")]
            return crate::service_axum::serve(listener, store, books).await;
            #[cfg(not(feature = "tower"))]
            return Err("the axum server needs the `tower` feature".into());
        }
        let guard = RequestGuard::new(store);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("demo server: accept failed: {e}");
                    continue;
                }
            };
            let (guard, books) = (guard.clone(), books.clone());
            let service = hyper::service::service_fn(move |request| {
                let (guard, books) = (guard.clone(), books.clone());
                async move { Ok::<_, Infallible>(serve(guard, books, request).await) }
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
pub(crate) async fn serve(
    guard: RequestGuard,
    books: Books,
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
                tokio::task::spawn_blocking(move || match &books {
                    Books::File(ledger) => payments(&guard, ledger, &req),
                    #[cfg(feature = "postgres")]
                    Books::Table(table) => crate::pg::payments(&guard, table, &req),
                })
                .await
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "the handler panicked"))
            }
        }
    };
    response.map(|body| Full::new(Bytes::from(body)))
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    let mut response = Response::new(body.as_bytes().to_vec());
    *response.status_mut() = status;
    response
}

/// The key's scope: the tenant header.
pub(crate) fn tenant(headers: &http::HeaderMap) -> String {
    headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("public")
        .to_owned()
}

/// The payment id and amount of a request body.
pub(crate) fn payment_of(body: &[u8]) -> Option<(String, u64)> {
    let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    Some((
        body["payment"].as_str()?.to_owned(),
        body["amount"].as_u64()?,
    ))
}

/// The 201 answer of a payment charged under `reference`.
pub(crate) fn receipt(payment: &str, reference: &str, amount: u64) -> Response<Vec<u8>> {
    let response = Response::builder()
        .status(StatusCode::CREATED)
        .header(CONTENT_TYPE, "application/json")
        .body(
            serde_json::json!({
                "payment": payment,
                "charge": reference,
                "amount": amount,
                "status": "succeeded",
            })
            .to_string()
            .into_bytes(),
        );
    response.unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response build failed"))
}

/// Whether this server was started broken on purpose (`--ignore-checkpoints`).
pub(crate) fn broken_on_purpose() -> bool {
    std::env::var_os(IGNORE_ENV).is_some_and(|v| v == "1")
}

pub(crate) fn header_ms(req: &Request<Vec<u8>>, name: &str) -> Option<u64> {
    req.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// `POST /payments`: the handler behind the idempotency guard.
pub(crate) fn payments(
    guard: &RequestGuard,
    ledger: &Ledger,
    req: &Request<Vec<u8>>,
) -> Response<Vec<u8>> {
    let scope = tenant(req.headers());
    let Some((payment, amount)) = payment_of(req.body()) else {
        return text(StatusCode::BAD_REQUEST, "need payment and amount");
    };
    let payment = payment.as_str();
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
    if broken_on_purpose() {
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
    let response = receipt(payment, &reference, amount);
    match complete(lease, &response) {
        Ok(_) => response,
        Err(e) => failed("complete", e),
    }
}
