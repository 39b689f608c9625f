//! [`IdempotencyService`]: reads the key and the body, then runs the rest ([`execute`]: ask
//! the store, run the handler, store its response) so that a client going away never cuts
//! it short: it is polled in place, and moved to a task of its own if the request's future
//! is dropped first ([`Detach`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::blocking::{self, HeldLease};
use super::body::{Body, ReadBody, ReadError, read_limited, read_response};
use super::detach::Detach;
use super::layer::Config;
use super::panic::CatchPanic;
use super::wait::{Turn, leader_done};
use crate::error::Error;
use crate::http::{StoredResponse, idempotency_key, replay, request_fingerprint};
use crate::key::Key;
use crate::outcome::Begin;

/// The service an [`IdempotencyLayer`](super::IdempotencyLayer) wraps around `S`.
///
/// `S` gets requests whose body is a [`Body`]: read whole for guarded methods, the original
/// one for the others. It must be `Clone + Send + 'static` with a `Send` future (as axum's
/// routes and hyper's `service_fn` closures are), because the handler of a guarded request
/// runs as a task of its own on the current tokio runtime.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> IdempotencyService<S> {
        IdempotencyService { inner, config }
    }
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("store", &self.config.store)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// The future of an [`IdempotencyService`] call.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        /// A method the layer does not guard: the inner future, untouched.
        Pass { #[pin] future: F },
        /// A guarded request.
        Guarded { future: BoxFuture<Result<Response<Body<B>>, E>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Body<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Pass { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Body::inner))),
            KindProj::Guarded { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<Body<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: std::fmt::Display,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    type Response = Response<Body<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.config.guards(request.method()) {
            return ResponseFuture {
                kind: Kind::Pass {
                    future: self.inner.call(request.map(Body::inner)),
                },
            };
        }
        // The clone that was made ready goes with the request; this one waits for the next
        // `poll_ready`.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            kind: Kind::Guarded {
                future: Box::pin(guarded(Arc::clone(&self.config), inner, request)),
            },
        }
    }
}

/// A problem answer as the service's response.
fn answer<B>(response: Response<Vec<u8>>) -> Response<Body<B>> {
    response.map(Body::full)
}

/// A guarded request, in the client's future: the key, the scope, the body; then the rest
/// in its own task.
async fn guarded<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
) -> Result<Response<Body<ResBody>>, S::Error>
where
    S: Service<Request<Body<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: std::fmt::Display,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    let problems = &config.problems;
    let (parts, body) = request.into_parts();
    let id = match idempotency_key(&parts.headers) {
        Ok(id) => id,
        Err(Error::MissingIdempotencyKey) => return Ok(answer(problems.missing_key())),
        Err(Error::MalformedIdempotencyKey { reason }) => {
            return Ok(answer(problems.malformed_key(&reason)));
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the Idempotency-Key header failed");
            return Ok(answer(problems.server_error()));
        }
    };
    let scope = (config.scope)(&parts);
    // `id` passed the header's checks, which are `Key::new`'s: a refusal is the scope's.
    let key = match Key::new(&scope, &id) {
        Ok(key) => key,
        Err(e) => {
            tracing::error!(
                scope_bytes = scope.len(),
                error = %e,
                "the layer's scope function chose a scope the store refuses; answering 500"
            );
            return Ok(answer(problems.server_error()));
        }
    };
    let body = match read_limited(body, config.max_body_bytes).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => {
            return Ok(answer(problems.body_too_large(config.max_body_bytes)));
        }
        Err(ReadError::Failed(e)) => {
            tracing::debug!(error = %e, "request body failed before its end; nothing runs");
            return Ok(answer(problems.body_incomplete()));
        }
    };
    let request = Request::from_parts(parts, body);
    let fp = request_fingerprint(&request, &config.headers);
    // From here on the work runs to its end: polled here, and if this future is dropped
    // (the client went away), as a task of its own that still asks the store, runs the
    // handler and stores the response.
    Detach::new(execute(config, inner, key, fp, request)).await
}

/// Asks the store what to do with the request and does it: runs the handler (with its
/// heartbeat) and stores its response, replays, or refuses.
async fn execute<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    key: Key,
    fp: crate::Fingerprint,
    request: Request<Bytes>,
) -> Result<Response<Body<ResBody>>, S::Error>
where
    S: Service<Request<Body<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    // Held until the response is stored: duplicates in this process wait on it.
    let mut _leader = None;
    if let Some(max) = config.wait_in_flight {
        match config.waits.turn(&key, &fp) {
            Turn::Lead(leader) => _leader = Some(leader),
            Turn::Follow(done) => {
                // Woken when the leader is done; after `max`, the store answers 409.
                let _ = tokio::time::timeout(max, leader_done(done)).await;
            }
            Turn::Skip => {}
        }
    }
    let problems = &config.problems;
    let begun = match blocking::begin(&config.store, &key, fp).await {
        Ok(begun) => begun,
        Err(e @ Error::Corrupt { .. }) => {
            tracing::error!(error = %e, "the key's stored record is damaged; answering 500");
            return Ok(answer(problems.record_unreadable()));
        }
        Err(e) => {
            tracing::error!(error = %e, "the idempotency store failed in begin; answering 500");
            return Ok(answer(problems.store_failed()));
        }
    };
    match begun {
        Begin::Started(lease) => {
            run(
                &config,
                inner,
                HeldLease::new(lease, &config.store),
                request,
            )
            .await
        }
        Begin::Replay(done) => Ok(match replay(&done) {
            Ok(response) => answer(response),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "the key's stored response is not one this layer stored; answering 500"
                );
                answer(problems.record_unreadable())
            }
        }),
        Begin::InFlight { retry_after } => Ok(answer(
            problems.in_flight(retry_after.min(config.retry_after_hint)),
        )),
        Begin::Mismatch => Ok(answer(problems.mismatch())),
    }
}

/// What the handler ends with: its response's head and as much of its body as the store
/// could hold (or the body's failure), or the service's error.
type Handled<E, B> = Result<(http::response::Parts, ReadBody<B>), E>;

/// Runs the handler under `lease` and stores what it answered.
async fn run<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    mut lease: HeldLease,
    request: Request<Bytes>,
) -> Result<Response<Body<ResBody>>, S::Error>
where
    S: Service<Request<Body<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::fmt::Display,
{
    let problems = &config.problems;
    let max = config.max_response_bytes();
    // Run here, in the request's own task (which a client going away does not cancel); a
    // panic is caught and answered like a failed handler, a panic of `call` itself included
    // (a service or middleware that does its work before it returns a future): `call` runs
    // inside the caught future. The service was made ready by the `poll_ready` before.
    let handler = CatchPanic::new(async move {
        let (parts, body) = inner.call(request.map(Body::full)).await?.into_parts();
        Ok::<_, S::Error>((parts, read_response(body, max).await))
    });
    let handled: Result<Handled<S::Error, ResBody>, _> =
        config.heartbeat.run(handler, &mut lease).await;
    match handled {
        Ok(Ok((parts, ReadBody::Whole { bytes, trailers }))) => {
            let stored = StoredResponse::new(parts.status, &parts.headers, bytes.to_vec()).encode();
            if stored.len() > max {
                too_large(stored.len(), max);
                store_fallback(config, lease, problems.response_not_stored()).await;
            } else {
                finish(lease, stored).await;
            }
            Ok(Response::from_parts(
                parts,
                Body::read_whole(bytes, trailers),
            ))
        }
        Ok(Ok((parts, ReadBody::Over { read, rest }))) => {
            too_large(read.len(), max);
            store_fallback(config, lease, problems.response_not_stored()).await;
            // The rest of the body is passed on as it comes.
            Ok(Response::from_parts(parts, Body::prefixed(read, rest)))
        }
        Ok(Ok((_, ReadBody::Failed(e)))) => {
            tracing::error!(error = %e, "a response body failed while it was read; answering 500");
            let response = problems.response_not_stored();
            store_fallback(config, lease, response.clone()).await;
            Ok(answer(response))
        }
        Ok(Err(service_error)) => {
            tracing::error!("the service returned an error after the handler started");
            store_fallback(config, lease, problems.handler_failed()).await;
            Err(service_error)
        }
        Err(panicked) => {
            tracing::error!(error = %panicked, "the handler panicked; answering 500");
            let response = problems.handler_failed();
            store_fallback(config, lease, response.clone()).await;
            Ok(answer(response))
        }
    }
}

/// Logs that a response of at least `len` bytes is larger than the store holds (`max`).
fn too_large(len: usize, max: usize) {
    tracing::error!(
        len,
        max,
        "a response is larger than the store holds; retries of its key get a 500 problem \
         saying the request was executed"
    );
}

/// Completes the lease with `stored`; a failure is logged (the client still gets the
/// handler's response: the request was executed).
async fn finish(lease: HeldLease, stored: Vec<u8>) {
    match lease.complete(stored).await {
        Ok(_) => {}
        Err(e @ Error::LeaseLost { .. }) => tracing::warn!(
            error = %e,
            "the handler's response was not stored: its lease was taken over (it ran past \
             the heartbeat limit, or a heartbeat came too late)"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "the handler's response could not be stored (outcome unknown); a retry after the \
             lease runs out may run the request again"
        ),
    }
}

/// Completes the lease with `problem` in place of a response that cannot be stored, so that
/// retries get it instead of running the request again; a bare 500 when even the problem is
/// larger than the store's response limit.
async fn store_fallback(config: &Config, lease: HeldLease, problem: Response<Vec<u8>>) {
    let mut stored = StoredResponse::from_response(&problem).encode();
    if stored.len() > config.max_response_bytes() {
        stored =
            StoredResponse::new(problem.status(), &http::HeaderMap::new(), Vec::new()).encode();
    }
    if stored.len() > config.max_response_bytes() {
        tracing::error!(
            max = config.max_response_bytes(),
            "the store's response limit is too small for any answer; the key is released and \
             a retry runs the request again"
        );
        return;
    }
    finish(lease, stored).await;
}
