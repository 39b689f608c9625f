//! [`IdempotencyLayer`] and its settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method};
use tower_layer::Layer;

use super::heartbeat::Heartbeat;
use super::problem::{ProblemKind, Problems};
use super::service::IdempotencyService;
use super::wait::InFlightWaits;
use crate::http::DEFAULT_RETRY_AFTER_HINT;
use crate::store::Store;

/// The default [`IdempotencyLayer::max_body_bytes`]: 1 MiB.
const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The default [`IdempotencyLayer::heartbeat_limit`]: 10 minutes.
const DEFAULT_HEARTBEAT_LIMIT: Duration = Duration::from_secs(600);

/// Chooses a request's scope.
type ScopeFn = Arc<dyn Fn(&Parts) -> String + Send + Sync>;

/// A [`tower_layer::Layer`] (the `Layer` of tower 0.5) that makes the HTTP handlers under it
/// idempotent on a [`Store`]; see [the module documentation](super) for what it answers.
///
/// ```
/// use idemstore::tower::IdempotencyLayer;
///
/// let store = idemstore::Store::builder().open_in_memory()?;
/// let layer = IdempotencyLayer::new(store)
///     .scope(|parts: &http::request::Parts| {
///         // The authenticated caller, so that two clients never share keys.
///         parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
///     })
///     .fingerprint_headers(["content-type"])
///     .max_body_bytes(1 << 20);
/// # drop(layer);
/// # Ok::<(), idemstore::Error>(())
/// ```
///
/// Cheap to clone; clones share the store and the [waiting](IdempotencyLayer::wait_in_flight)
/// of duplicates.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service (axum: Router::layer or route_layer)"]
pub struct IdempotencyLayer {
    config: Config,
}

/// What the service of a layer needs, shared by its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub store: Store,
    pub scope: ScopeFn,
    pub headers: Vec<HeaderName>,
    pub max_body_bytes: usize,
    pub methods: Vec<Method>,
    pub problems: Problems,
    pub retry_after_hint: Duration,
    pub wait_in_flight: Option<Duration>,
    pub heartbeat: Heartbeat,
    pub waits: Arc<InFlightWaits>,
}

impl Config {
    /// Whether requests of `method` need a key.
    pub(crate) fn guards(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The store's largest response.
    pub(crate) fn max_response_bytes(&self) -> usize {
        self.store.inner().settings.max_response_bytes
    }
}

impl IdempotencyLayer {
    /// A layer on `store`, with one scope for all requests, POST and PATCH guarded, the
    /// method, path and query and body fingerprinted, bodies up to 1 MiB, no waiting (409
    /// for duplicates), and a heartbeat for up to 10 minutes.
    pub fn new(store: Store) -> IdempotencyLayer {
        let lease = Duration::from_nanos(store.inner().settings.lease);
        IdempotencyLayer {
            config: Config {
                store,
                scope: Arc::new(|_: &Parts| String::new()),
                headers: Vec::new(),
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                methods: vec![Method::POST, Method::PATCH],
                problems: Problems::default(),
                retry_after_hint: DEFAULT_RETRY_AFTER_HINT,
                wait_in_flight: None,
                heartbeat: Heartbeat {
                    lease,
                    limit: DEFAULT_HEARTBEAT_LIMIT,
                },
                waits: Arc::default(),
            },
        }
    }

    /// How the scope of a request's key is chosen (the tenant, the API user, the endpoint),
    /// so that two clients can never see each other's responses. Default: one scope (`""`)
    /// for all requests.
    ///
    /// A scope is at most 255 bytes; a longer one is the service's fault: the request gets a
    /// [500 problem](ProblemKind::ServerError) (and an error is logged).
    pub fn scope<F, S>(mut self, scope: F) -> IdempotencyLayer
    where
        F: Fn(&Parts) -> S + Clone + Send + Sync + 'static,
        S: Into<String>,
    {
        self.config.scope = Arc::new(move |parts: &Parts| scope(parts).into());
        self
    }

    /// Headers fingerprinted besides the method, the path and query, and the body, in this
    /// order: the ones that change what a request means (`content-type`, an API version).
    /// Default: none.
    ///
    /// # Panics
    /// When a name is not a valid header name (a mistake in the service's code).
    pub fn fingerprint_headers<I, N>(mut self, names: I) -> IdempotencyLayer
    where
        I: IntoIterator<Item = N>,
        N: TryInto<HeaderName>,
        N::Error: fmt::Display,
    {
        self.config.headers = names
            .into_iter()
            .map(|name| {
                name.try_into()
                    .unwrap_or_else(|e| panic!("fingerprint_headers: not a header name: {e}"))
            })
            .collect();
        self
    }

    /// The largest request body accepted, in bytes. Default 1 MiB. A body of exactly this
    /// size is accepted; one byte more gets a [413 problem](ProblemKind::BodyTooLarge) and
    /// the handler does not run.
    pub fn max_body_bytes(mut self, max: usize) -> IdempotencyLayer {
        self.config.max_body_bytes = max;
        self
    }

    /// The methods whose requests need an `Idempotency-Key` and are handled at most once.
    /// Default: POST and PATCH. Requests of other methods pass through untouched.
    pub fn guarded_methods(
        mut self,
        methods: impl IntoIterator<Item = Method>,
    ) -> IdempotencyLayer {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// The `type` link of each problem answer. Default:
    /// [`ProblemKind::default_type_uri`], into idemstore's documentation.
    ///
    /// ```
    /// use idemstore::tower::IdempotencyLayer;
    ///
    /// let store = idemstore::Store::builder().open_in_memory()?;
    /// let layer = IdempotencyLayer::new(store)
    ///     .problem_types(|kind| format!("https://api.example.com/problems#{}", kind.anchor()));
    /// # drop(layer);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    pub fn problem_types<F>(mut self, links: F) -> IdempotencyLayer
    where
        F: Fn(ProblemKind) -> String + Send + Sync + 'static,
    {
        self.config.problems = Problems::new(Some(Arc::new(links)));
        self
    }

    /// How long a 409 tells a duplicate to wait (`Retry-After`) while the first request
    /// runs: about how long the handler usually takes. Default 1 s. Never more than the
    /// running request's lease has left, sent in whole seconds, rounded up, at least 1.
    pub fn retry_after_hint(mut self, hint: Duration) -> IdempotencyLayer {
        self.config.retry_after_hint = hint;
        self
    }

    /// Lets a duplicate wait up to `max` for the request it duplicates, then answers it with
    /// that request's response (a replay) instead of 409. Default: off (409 at once).
    ///
    /// Waiting works between requests handled by this layer (and its clones) in this
    /// process: a duplicate is woken the moment the first request's response is stored, no
    /// polling. A duplicate of a request running in *another* process (another replica on a
    /// shared store, or a process that crashed while its lease is live) is not waited for:
    /// it gets 409 with `Retry-After` at once. A duplicate that waited `max` in vain gets
    /// 409 too. A request with the same key and another fingerprint never waits (422).
    pub fn wait_in_flight(mut self, max: Duration) -> IdempotencyLayer {
        self.config.wait_in_flight = Some(max);
        self
    }

    /// How long the layer keeps a running handler's lease alive. Default 10 minutes.
    ///
    /// While a handler runs, the layer extends its lease by the store's lease duration every
    /// third of it, so a retry gets 409 (or waits) instead of taking the key over. A handler
    /// still running after `limit` is no longer extended: one lease later a retry may take
    /// the key over and run the request again, and this handler's response is then not
    /// stored (the lease was lost; it is still sent to its client).
    pub fn heartbeat_limit(mut self, limit: Duration) -> IdempotencyLayer {
        self.config.heartbeat.limit = limit;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.config.store
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService::new(inner, Arc::new(self.config.clone()))
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.config.store)
            .field("fingerprint_headers", &self.config.headers)
            .field("max_body_bytes", &self.config.max_body_bytes)
            .field("guarded_methods", &self.config.methods)
            .field("retry_after_hint", &self.config.retry_after_hint)
            .field("wait_in_flight", &self.config.wait_in_flight)
            .field("heartbeat_limit", &self.config.heartbeat.limit)
            .finish_non_exhaustive()
    }
}
