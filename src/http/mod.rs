//! The HTTP edge, on the [`http`](https://docs.rs/http) crate's types, framework-agnostic:
//! the `Idempotency-Key` header, request fingerprints, the 400/409/422 answers as
//! `application/problem+json`, and whole-response replay.
//!
//! It follows the IETF draft *The Idempotency-Key HTTP Header Field*
//! (`draft-ietf-httpapi-idempotency-key-header`) and the store's state machine:
//!
//! | situation | [`RequestGuard::begin`] decides | response |
//! |---|---|---|
//! | no `Idempotency-Key` | [`Decision::Reject`] | 400, [missing](#missing-idempotency-key) |
//! | malformed or longer than 255 bytes | [`Decision::Reject`] | 400, [malformed](#malformed-idempotency-key) |
//! | new key (or expired) | [`Decision::Run`] with a [`Lease`] | your handler's, then [`complete`] stores it |
//! | same key, same request, done | [`Decision::Replay`] | the stored response + `Idempotent-Replayed: true` |
//! | same key, same request, in progress | [`Decision::Reject`] | 409 + `Retry-After` (the [hint](RequestGuard::retry_after_hint), at most the lease's time left), [in flight](#request-in-flight) |
//! | same key, another request | [`Decision::Reject`] | 422, [reused](#idempotency-key-reused) |
//! | a `scope` the store refuses (over 255 bytes) | `Err(`[`Error::InvalidConfig`]`)`, logged | 500, [server error](#internal-server-error) via [`error_response`] |
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use idemstore::http::{complete, Decision, RequestGuard};
//! use idemstore::Store;
//!
//! let guard = RequestGuard::new(Store::builder().open_in_memory()?);
//! let request = Request::post("/payments")
//!     .header("idempotency-key", "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")
//!     .body(br#"{"amount":1000}"#.to_vec())
//!     .unwrap();
//!
//! let handle = |request: &Request<Vec<u8>>| -> idemstore::Result<Response<Vec<u8>>> {
//!     Ok(match guard.begin("tenant-42", request)? {
//!         Decision::Run(lease) => {
//!             let response = Response::builder()
//!                 .status(StatusCode::CREATED)
//!                 .body(br#"{"id":"pay_1"}"#.to_vec())
//!                 .unwrap(); // charge the card here, once
//!             complete(lease, &response)?;
//!             response
//!         }
//!         Decision::Replay(response) | Decision::Reject(response) => response,
//!     })
//! };
//!
//! let first = handle(&request)?;
//! let retry = handle(&request)?;
//! assert_eq!(first.status(), 201);
//! assert_eq!(retry.status(), 201);
//! assert_eq!(retry.body(), first.body());
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # Ok::<(), idemstore::Error>(())
//! ```
//!
//! # Using idemstore from async code
//!
//! [`Store`] is synchronous on purpose: every write that says "started" or "completed" is
//! fsync'd before it returns (that is what makes the guarantees hold across a crash), and
//! an fsync blocks a thread whatever the API looks like. An async facade would only hide a
//! `spawn_blocking`; idemstore lets you place it. So, in an async server (axum, actix,
//! hyper on tokio), call [`RequestGuard::begin`], [`complete`] and the other store calls on
//! the blocking pool. The [`Lease`] is `Send`: it moves into the async handler and back.
//!
//! ```ignore
//! // axum on tokio (not a dependency of idemstore, hence not compiled here).
//! async fn create_payment(State(guard): State<RequestGuard>, req: Request<Bytes>) -> Response<Vec<u8>> {
//!     let (parts, body) = req.into_parts();
//!     let req = Request::from_parts(parts, body.to_vec());
//!     let g = guard.clone();
//!     let decision = tokio::task::spawn_blocking(move || g.begin("tenant-42", &req)).await;
//!     match decision {
//!         Ok(Ok(Decision::Run(lease))) => {
//!             let response = charge_the_card().await; // async work, lease held
//!             let stored = response.clone();
//!             match tokio::task::spawn_blocking(move || complete(lease, &stored)).await {
//!                 Ok(Ok(_)) => response,
//!                 Ok(Err(e)) => error_response(&e), // log e: outcome unknown
//!                 Err(_) => error_response(&idemstore::Error::Closed),
//!             }
//!         }
//!         Ok(Ok(Decision::Replay(r) | Decision::Reject(r))) => r,
//!         Ok(Err(e)) => error_response(&e),
//!         Err(_) => error_response(&idemstore::Error::Closed),
//!     }
//! }
//! ```
//!
//! Concurrent `begin`s share fsyncs (group commit), so the blocking pool's threads are
//! what bounds throughput, as with any blocking database driver. The example service
//! (`examples/http_service.rs`) does this with hyper on a one-thread tokio runtime: it reads
//! each body whole first (a body cut short is answered 400 and nothing begins), then runs the
//! guard, the work and [`complete`] in one `spawn_blocking`.
//!
//! # Request fingerprints
//!
//! [`request_fingerprint`] (used by [`RequestGuard`]) hashes, with
//! [`Fingerprint::builder`](crate::Fingerprint::builder) (each part framed by its length):
//!
//! 1. the method (`"POST"`);
//! 2. the path and query (`"/payments?currency=eur"`; for an absolute URI, only its path and
//!    query, so a proxy rewriting the authority changes nothing);
//! 3. the body;
//! 4. for each header you name, in the order you name them: its lowercase name, the number
//!    of its values as 8 big-endian bytes, then each value in order.
//!
//! Name the headers that change what the request means (`Content-Type`, an API version
//! header); never name ones that vary between retries (`Date`, tracing ids).
//!
//! # Problem types
//!
//! Every refusal is an RFC 9457 problem (`application/problem+json`, members `type`, `title`,
//! `status`, `detail`), whose `type` links to one of these sections.
//!
//! ### Missing Idempotency-Key
//! Status 400. The endpoint needs a key and the request has none. Generate a UUID v4 for the
//! operation, persist it, and send it (see [`crate::client`]).
//!
//! ### Malformed Idempotency-Key
//! Status 400. The header is not one quoted string of 1–255 printable ASCII characters (or the
//! lenient bare form, see [`idempotency_key`]), or there is more than one.
//!
//! ### Request in flight
//! Status 409, with `Retry-After` in whole seconds: the guard's
//! [`retry_after_hint`](RequestGuard::retry_after_hint) (default 1 s), or the time left on the
//! running request's lease if that is shorter, rounded up, at least 1. Retry then, with the same
//! key and the same request: you get its response once it is done.
//!
//! ### Idempotency-Key reused
//! Status 422. The key was used for a request with another fingerprint. A client bug: do not retry;
//! a new operation needs a new key.
//!
//! ### Idempotency store failed
//! Status 500. The store could not answer (I/O failure, closed store). Retrying later with the same
//! key is safe.
//!
//! ### Internal server error
//! Status 500. The service is at fault, not the request: for one, it chose a scope the store
//! refuses. The answer says nothing more (the service logs the cause). Retrying later with
//! the same key is safe.
//!
//! The module is behind the `http` cargo feature (on by default).

mod header;
mod problem;
mod stored;

use std::time::Duration;

use http::{HeaderName, Request, Response};

pub use header::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, format_idempotency_key, idempotency_key,
    parse_idempotency_key,
};
pub use problem::{
    PROBLEM_JSON, Problem, error_response, in_flight, malformed_key, mismatch, missing_key,
    problem_response,
};
pub use stored::StoredResponse;

#[cfg(feature = "tower")]
pub(crate) use problem::retry_after_secs;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::lease::Lease;
use crate::outcome::{Begin, Completed};
use crate::store::Store;

/// The fingerprint of a request: method, path and query, body, and the named headers
/// (see [Request fingerprints](self#request-fingerprints)).
///
/// ```
/// use http::{header::CONTENT_TYPE, Request};
/// use idemstore::http::request_fingerprint;
///
/// let a = Request::post("/payments").header(CONTENT_TYPE, "application/json").body(b"{}").unwrap();
/// let b = Request::post("/payments").header(CONTENT_TYPE, "text/plain").body(b"{}").unwrap();
/// assert_eq!(request_fingerprint(&a, &[]), request_fingerprint(&b, &[]));
/// assert_ne!(request_fingerprint(&a, &[CONTENT_TYPE]), request_fingerprint(&b, &[CONTENT_TYPE]));
/// ```
pub fn request_fingerprint<B: AsRef<[u8]>>(
    request: &Request<B>,
    headers: &[HeaderName],
) -> Fingerprint {
    // The path as the origin form has it: an absolute URI's empty path is `/` there, also
    // before a query (`http://host?q` is `/?q`), so a proxy's rewrite changes nothing.
    let path = match request.uri().path_and_query() {
        Some(pq) => match pq.query() {
            Some(query) => std::borrow::Cow::Owned(format!("{}?{query}", pq.path())),
            None => std::borrow::Cow::Borrowed(pq.path()),
        },
        None => std::borrow::Cow::Borrowed(""),
    };
    let mut fp = Fingerprint::builder()
        .part(request.method().as_str())
        .part(path.as_bytes())
        .part(request.body().as_ref());
    for name in headers {
        let values = request.headers().get_all(name);
        fp = fp
            .part(name.as_str())
            .part((values.iter().count() as u64).to_be_bytes());
        for value in values {
            fp = fp.part(value.as_bytes());
        }
    }
    fp.finish()
}

/// What [`RequestGuard::begin`] decided for a request.
#[derive(Debug)]
#[must_use = "run the handler and complete the lease, or send the response"]
pub enum Decision {
    /// Run the handler, then store its response with [`complete`]. Dropping the lease
    /// releases the key for a retry; [`Lease::abandon`] forgets it (nothing happened).
    Run(Lease),
    /// The stored response, with `Idempotent-Replayed: true`: send it as is.
    Replay(Response<Vec<u8>>),
    /// A problem response to send as is: 400 (missing or malformed key), 409 (in flight,
    /// with `Retry-After`) or 422 (key reused for another request).
    Reject(Response<Vec<u8>>),
}

/// Puts a [`Store`] in front of HTTP handlers: reads the key, fingerprints the request, asks
/// the store, and turns every answer but "run it" into the response to send.
///
/// Cheap to clone (it holds a clone of the store).
#[derive(Clone, Debug)]
pub struct RequestGuard {
    store: Store,
    headers: Vec<HeaderName>,
    retry_after_hint: Duration,
}

/// The default [`RequestGuard::retry_after_hint`].
pub(crate) const DEFAULT_RETRY_AFTER_HINT: Duration = Duration::from_secs(1);

impl RequestGuard {
    /// A guard on `store`, fingerprinting method, path and query, and body.
    pub fn new(store: Store) -> RequestGuard {
        RequestGuard {
            store,
            headers: Vec::new(),
            retry_after_hint: DEFAULT_RETRY_AFTER_HINT,
        }
    }

    /// How long a 409 tells a duplicate to wait (`Retry-After`) while the first request
    /// runs: about how long your handler usually takes. Default 1 s.
    ///
    /// The answer is never more than the running request's lease has left (a retry then may
    /// take over), and is sent as whole seconds, rounded up, at least 1. The lease itself is
    /// the store's [`lease`](crate::Builder::lease) setting; a hint as long as the lease
    /// makes every duplicate wait until the lease runs out, however quick the request.
    pub fn retry_after_hint(mut self, hint: Duration) -> RequestGuard {
        self.retry_after_hint = hint;
        self
    }

    /// Also fingerprints these headers (in this order). Default: none.
    pub fn fingerprint_headers(
        mut self,
        names: impl IntoIterator<Item = HeaderName>,
    ) -> RequestGuard {
        self.headers = names.into_iter().collect();
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Decides what to do with `request`, whose key lives in `scope` (chosen by the server
    /// from the authenticated caller, so that two clients never share keys).
    ///
    /// # Errors
    /// Only the server's side: the store's errors ([`Error::Storage`], [`Error::Poisoned`],
    /// [`Error::Closed`], [`Error::Corrupt`], also for a stored response that is not a
    /// [`StoredResponse`]) and [`Error::InvalidConfig`] for a `scope` the store refuses (over
    /// 255 bytes; logged at error level, with its length only). Answer them with
    /// [`error_response`]: a 500 that tells the client nothing about the cause. The client's
    /// mistakes are `Ok(Decision::Reject(..))`.
    pub fn begin<B: AsRef<[u8]>>(&self, scope: &str, request: &Request<B>) -> Result<Decision> {
        let id = match idempotency_key(request.headers()) {
            Ok(id) => id,
            Err(e @ (Error::MissingIdempotencyKey | Error::MalformedIdempotencyKey { .. })) => {
                return Ok(Decision::Reject(error_response(&e)));
            }
            Err(e) => return Err(e),
        };
        // `id` passed `idempotency_key`, which checks it as `Key::new` does: a refusal here
        // is the scope's, chosen by the service, so a server error rather than a 400.
        let key = Key::new(scope, &id).map_err(|e| {
            tracing::error!(
                scope_bytes = scope.len(),
                error = %e,
                "the service chose a scope the store refuses; answering 500"
            );
            Error::InvalidConfig {
                reason: format!("the scope passed to RequestGuard::begin is refused: {e}"),
            }
        })?;
        let fp = request_fingerprint(request, &self.headers);
        Ok(match self.store.begin(&key, &fp)? {
            Begin::Started(lease) => Decision::Run(lease),
            Begin::Replay(done) => Decision::Replay(replay(&done)?),
            Begin::InFlight { retry_after } => {
                Decision::Reject(in_flight(retry_after.min(self.retry_after_hint)))
            }
            Begin::Mismatch => Decision::Reject(mismatch()),
        })
    }
}

/// Stores `response` (as a [`StoredResponse`]: status, storable headers, body) as the
/// outcome of the lease's request, durably. Send `response` itself to this first client
/// (its `Set-Cookie` included).
///
/// # Errors
/// As [`Lease::complete`]: [`Error::ResponseTooLarge`] (nothing stored, the key is released
/// for a retry), [`Error::LeaseLost`] (another holder took over: do not report success),
/// storage errors (unknown outcome).
pub fn complete<B: AsRef<[u8]>>(lease: Lease, response: &Response<B>) -> Result<Completed> {
    lease.complete(&StoredResponse::from_response(response).encode())
}

/// The replay of a completed request: its stored response plus `Idempotent-Replayed: true`.
///
/// # Errors
/// [`Error::Corrupt`] when the stored bytes are not a [`StoredResponse`] (the key was
/// completed by other code with other bytes).
pub fn replay(done: &Completed) -> Result<Response<Vec<u8>>> {
    Ok(StoredResponse::decode(done.response())?.into_replay())
}
