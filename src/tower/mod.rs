//! An async layer: [`IdempotencyLayer`] makes any HTTP handler idempotent on tokio (axum 0.8,
//! hyper 1, any tower 0.5 service), without ever blocking the runtime.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use idemstore::tower::IdempotencyLayer;
//!
//! async fn create_payment(body: String) -> (http::StatusCode, String) {
//!     (http::StatusCode::CREATED, format!("charged: {body}")) // runs once per key
//! }
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let store = idemstore::Store::open("idempotency.redb")?;
//! let layer = IdempotencyLayer::new(store)
//!     .scope(|parts: &http::request::Parts| {
//!         parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
//!     })
//!     .fingerprint_headers(["content-type"])
//!     .max_body_bytes(1 << 20);
//! let app = Router::new().route("/payments", post(create_payment)).layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! It works as axum's `Router::layer` (every route) or `route_layer` (the routes added
//! before it), and around a plain hyper 1 service (`hyper::service::service_fn` through
//! `hyper_util::service::TowerToHyperService`). The service under it gets requests whose
//! body is a [`Body`].
//!
//! **Under axum's `Router::nest`**, put the layer on the outer router. A router nested at
//! `/v1` hands its layers the path without `/v1`, so one layer inside two nested routers
//! would see `/v1/payments` and `/v2/payments` as the same request: a key sent to both
//! would get the first one's response replayed instead of 422. Inside a nested router, give
//! each its own layer with its own [`scope`](IdempotencyLayer::scope) instead.
//!
//! # What it answers
//!
//! Requests of methods it does not guard (by default all but POST and PATCH) pass through
//! untouched. A guarded request:
//!
//! | request | answer |
//! |---|---|
//! | no `Idempotency-Key` | 400, [missing key](crate::http#missing-idempotency-key) |
//! | a malformed key, or two | 400, [malformed key](crate::http#malformed-idempotency-key) |
//! | a body larger than [`max_body_bytes`](IdempotencyLayer::max_body_bytes) | 413, [too large](#request-body-too-large); the handler does not run |
//! | a body that fails before its end (a cut upload) | 400, [incomplete](#request-body-incomplete); the handler does not run |
//! | a new key (or an expired one) | the handler runs once; its response is stored and sent |
//! | a key whose earlier attempt stopped without an answer (its process crashed; its lease ran out) | the handler runs again (the store's takeover) |
//! | the same key and request, done | the stored response, byte for byte, with `Idempotent-Replayed: true` |
//! | the same key and request, running | 409 with `Retry-After`, [in flight](crate::http#request-in-flight); or, with [`wait_in_flight`](IdempotencyLayer::wait_in_flight), the response once it is stored |
//! | the same key, another request | 422, [reused](crate::http#idempotency-key-reused) |
//! | the store fails before the handler runs | 500, [store failed](crate::http#idempotency-store-failed); a retry is safe |
//! | the key's record is damaged, or its response was not stored by this layer | 500, [unreadable](#stored-record-unreadable); a retry gets the same |
//!
//! "The same request" is the same fingerprint: method, path and query, body, and the
//! [`fingerprint_headers`](IdempotencyLayer::fingerprint_headers), as
//! [`request_fingerprint`](crate::http::request_fingerprint) computes it. A response is
//! stored whole, as a [`StoredResponse`](crate::http::StoredResponse): status, headers (the
//! hop-by-hop ones and `Set-Cookie` dropped) and body; a replay has no trailers. The first
//! client gets the handler's response as it was, trailers included.
//!
//! To store a response, the layer reads its body before it sends the head, up to the store's
//! [`max_response_bytes`](crate::Builder::max_response_bytes). A body that turns out larger
//! (or announces a larger `Content-Length`) is not read further: the first client gets it
//! as it comes, what was read and then the rest, so a long download or a stream of events
//! is never held in memory whole.
//!
//! # The handler runs to its end
//!
//! Once the store granted the request its lease, the handler runs to its end and the layer
//! stores its response whatever happens to the client: a client that disconnects
//! mid-handler does not cancel it (the rest of the work moves to a task of its own when the
//! request's future is dropped), and its retry gets the replay, never a second execution.
//! For the same reason, an answer that cannot be stored is replaced by one that can:
//!
//! * a response larger than the store's
//!   [`max_response_bytes`](crate::Builder::max_response_bytes) is sent to the first client
//!   (streamed, once the problem below is stored), and retries get a 500 problem,
//!   [response not stored](#request-executed-response-not-stored);
//! * a response whose body fails while it is read: the first client and the retries get that
//!   problem;
//! * a handler that panics, or a service that returns an error: retries get a 500 problem,
//!   [handler failed](#request-executed-handler-failed) (the request may have partly run).
//!
//! Only a failure of the store itself while it records the response (an I/O error, an
//! unknown outcome) leaves the key in flight: a retry after the lease runs out then runs the
//! handler again, as after a crash.
//!
//! # Heartbeat
//!
//! While the handler runs, the layer extends its lease by the store's
//! [`lease`](crate::Builder::lease) duration every third of it, so that a retry is answered
//! 409 (or waits), not given the key. It does so for up to
//! [`heartbeat_limit`](IdempotencyLayer::heartbeat_limit) (10 minutes by default); a
//! handler running longer can lose its key to a retry once the last extension runs out.
//!
//! # Waiting for a running duplicate
//!
//! Off by default. With [`wait_in_flight(max)`](IdempotencyLayer::wait_in_flight), a
//! duplicate of a request this layer is handling waits up to `max` and gets its response
//! (a replay), woken the moment it is stored. Only requests in this process are waited
//! for: a duplicate of a request running in another process gets 409 at once.
//!
//! # Never blocking the runtime
//!
//! The store is synchronous: a write returns once it is on disk. The layer runs every store
//! call on tokio's blocking pool (`spawn_blocking`): `begin`, `complete`, the heartbeat's
//! `extend`, and the release of a lease that is dropped without an answer (it is handed to
//! the blocking pool in its `Drop`). So a runtime thread, even the only one of a
//! `current_thread` runtime, goes on serving other requests while a commit waits for its
//! fsync. The blocking pool's threads wait in the store's group commit together, so
//! concurrent requests share fsyncs. A request whose key or body is refused never reaches
//! the store.
//!
//! The blocking pool was chosen over an awaitable hand-off to the store's commit thread:
//! `begin` also reads the file (a read transaction, which may wait on the disk), so a
//! hand-off alone would still run that read on the runtime thread; a store on another engine
//! has no commit thread to hand off to; and the pool needs nothing of the store's inside. Its
//! price is two thread wake-ups per store call: small beside an fsync for a few concurrent
//! requests, while with many the commit batches fill more slowly than when the callers are
//! threads of their own (`examples/compare_http.rs` measures both).
//!
//! # Problem types
//!
//! Every refusal is an RFC 9457 problem (`application/problem+json`, members `type`,
//! `title`, `status`, `detail`), whose `type` links to a section of the
//! [`idemstore::http`](crate::http#problem-types) documentation or to one of these (a
//! service sets its own links with [`problem_types`](IdempotencyLayer::problem_types);
//! [`ProblemKind`] lists them all).
//!
//! ### Request body too large
//! Status 413. The body is larger than the endpoint accepts. Nothing was executed.
//!
//! ### Request body incomplete
//! Status 400. The body ended before it was complete (the upload was cut, the connection
//! broke). Nothing was executed: send the whole request again with the same key.
//!
//! ### Request executed, response not stored
//! Status 500. The request was executed, but its response could not be stored (it was
//! larger than the store's response limit, or its body failed while it was read). Every
//! retry with the key gets this answer until the record expires: the request is never
//! executed again. Look its outcome up by other means.
//!
//! ### Request executed, handler failed
//! Status 500. The handler started and failed before it answered (it panicked, or the
//! service returned an error); it may have partly run. Every retry with the key gets this
//! answer until the record expires: the request is never executed again.
//!
//! ### Stored record unreadable
//! Status 500. A record for the key exists but cannot be read: it is damaged (it fails its
//! checksum), or its response is not one this layer stored (another writer of the store used
//! the same scope). The request may have been executed, so it is not executed again: every
//! retry with the key gets this answer (for a response not stored by this layer, until the
//! record expires). Look its outcome up by other means.
//!
//! The module is behind the `tower` cargo feature (with `http`, tokio's `rt`, `sync` and
//! `time`, and tower's `Layer` and `Service` traits).

mod blocking;
mod body;
mod detach;
mod heartbeat;
mod layer;
mod panic;
mod problem;
mod service;
mod wait;

pub use body::Body;
pub use layer::IdempotencyLayer;
pub use problem::ProblemKind;
pub use service::{IdempotencyService, ResponseFuture};
