//! The tower layer over loopback, with a real HTTP client: every row of the state machine
//! through HTTP, concurrent duplicates, bodies (limits, cut uploads), clients that go away,
//! restarts, the heartbeat, and a `current_thread` runtime that keeps answering while the
//! store's writes are slow.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemstore::backends::InMemoryBackend;
use idemstore::http::request_fingerprint;
use idemstore::tower::{IdempotencyLayer, ProblemKind};
use idemstore::{Begin, Error, Key, ManualClock, Store};
use idemstore_testkit::engine::{Engine, Place};
use idemstore_testkit::fault::{Call, Faults, FaultyBackend};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tower::Layer;

// ---------------------------------------------------------------------------------------------
// Harness

/// Serves `app` on a loopback port; the server runs until the runtime ends.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// What came back: status, headers, body.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `type` of a problem answer.
    fn problem_type(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{self:?}"
        );
        let text = self.text();
        let start = text.find("\"type\":\"").expect("a type member") + 8;
        let end = start + text[start..].find('"').unwrap();
        text[start..end].to_owned()
    }
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(key) = key {
        request = request.header("idempotency-key", format!("\"{key}\""));
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn post_key(client: &HttpClient, addr: SocketAddr, key: &str, body: &str) -> Answer {
    send(
        client,
        addr,
        Method::POST,
        "/payments",
        Some(key),
        body.to_owned(),
    )
    .await
}

/// A payment handler that counts its executions and answers 201 with a body naming the
/// execution.
fn payments(count: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let count = count.clone();
            async move {
                let n = count.fetch_add(1, SeqCst) + 1;
                (
                    StatusCode::CREATED,
                    [("content-type", "application/json"), ("x-execution", "yes")],
                    format!(
                        "{{\"execution\":{n},\"body\":\"{}\"}}",
                        String::from_utf8_lossy(&body)
                    ),
                )
            }
        }),
    )
}

/// A handler that says when it started and then waits for a permit of `gate`.
fn gated(count: Arc<AtomicUsize>, started: Arc<Notify>, gate: Arc<Semaphore>) -> Router {
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let (count, started, gate) = (count.clone(), started.clone(), gate.clone());
            async move {
                let n = count.fetch_add(1, SeqCst) + 1;
                started.notify_one();
                gate.acquire().await.unwrap().forget();
                (
                    StatusCode::CREATED,
                    format!("execution {n} of {}", String::from_utf8_lossy(&body)),
                )
            }
        }),
    )
}

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Reads what the server sends on `stream` until it closes the connection or 10 s pass.
fn read_until_closed(stream: &mut std::net::TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The state machine through HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_state_table() {
    let clock = ManualClock::new(start());
    let store = Store::builder()
        .clock(clock.clone())
        .ttl(Duration::from_secs(3600))
        .lease(Duration::from_secs(30))
        .open_in_memory()
        .unwrap();
    let (count, started, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Notify::new()),
        Arc::new(Semaphore::new(0)),
    );
    let app = gated(count.clone(), started.clone(), gate.clone())
        .layer(IdempotencyLayer::new(store.clone()).retry_after_hint(Duration::from_secs(3)));
    let addr = serve(app).await;
    let http = client();

    // Absent: the handler runs. While it runs: the same request is 409 with Retry-After,
    // another request with the key is 422.
    let first = tokio::spawn({
        let http = http.clone();
        async move { post_key(&http, addr, "k1", "amount=100").await }
    });
    started.notified().await;
    let busy = post_key(&http, addr, "k1", "amount=100").await;
    assert_eq!(busy.status, 409, "{busy:?}");
    assert_eq!(busy.headers["retry-after"], "3");
    assert_eq!(
        busy.problem_type(),
        ProblemKind::InFlight.default_type_uri()
    );
    let reused = post_key(&http, addr, "k1", "amount=999").await;
    assert_eq!(reused.status, 422, "{reused:?}");
    assert_eq!(
        reused.problem_type(),
        ProblemKind::Mismatch.default_type_uri()
    );
    gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.text(), "execution 1 of amount=100");
    assert!(!first.replayed());

    // Completed, same request: the stored response, byte for byte, marked replayed.
    let replay = post_key(&http, addr, "k1", "amount=100").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, first.body);
    assert_eq!(
        replay.headers["content-type"],
        first.headers["content-type"]
    );
    assert!(replay.replayed());
    // Completed, another request: 422.
    let reused = post_key(&http, addr, "k1", "amount=5").await;
    assert_eq!(reused.status, 422);
    assert_eq!(count.load(SeqCst), 1);

    // In flight with an expired lease (its holder stalled or crashed): taken over.
    let key = Key::new("", "k2").unwrap();
    let request = Request::post("/payments")
        .body(b"amount=7".to_vec())
        .unwrap();
    let fp = request_fingerprint(&request, &[]);
    let Begin::Started(stale) = store.begin(&key, &fp).unwrap() else {
        panic!("expected Started")
    };
    let busy = post_key(&http, addr, "k2", "amount=7").await;
    assert_eq!(busy.status, 409);
    clock.advance(Duration::from_secs(31));
    gate.add_permits(1);
    let taken = post_key(&http, addr, "k2", "amount=7").await;
    assert_eq!(taken.status, 201, "{taken:?}");
    assert_eq!(taken.text(), "execution 2 of amount=7");
    assert_eq!(store.stats().takeovers, 1);
    assert!(matches!(
        stale.complete(b"late"),
        Err(Error::LeaseLost { .. })
    ));
    let replay = post_key(&http, addr, "k2", "amount=7").await;
    assert_eq!(replay.body, taken.body);
    assert!(replay.replayed());

    // Dead (past its ttl): absent again, the handler runs.
    clock.advance(Duration::from_secs(3601));
    gate.add_permits(1);
    let again = post_key(&http, addr, "k1", "amount=100").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.text(), "execution 3 of amount=100");
    assert!(!again.replayed());
    assert_eq!(count.load(SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_methods_scopes_and_problem_links() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(count.clone())
        .route("/payments", get(|| async { "list" }))
        .layer(
            IdempotencyLayer::new(store)
                .scope(|parts: &http::request::Parts| {
                    parts
                        .headers
                        .get("x-tenant")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                })
                .problem_types(|kind| format!("https://api.example.com/problems/{kind}")),
        );
    let addr = serve(app).await;
    let http = client();

    let missing = send(&http, addr, Method::POST, "/payments", None, "x").await;
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.problem_type(),
        "https://api.example.com/problems/missing-idempotency-key"
    );
    let malformed = Request::post(format!("http://{addr}/payments"))
        .header("idempotency-key", "\"unterminated")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let malformed = http.request(malformed).await.unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(count.load(SeqCst), 0);

    // GET is not guarded: no key needed, untouched.
    let list = send(&http, addr, Method::GET, "/payments", None, "").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.text(), "list");

    // Scopes keep tenants apart: the same key in two tenants runs twice.
    for tenant in ["acme", "globex"] {
        let request = Request::post(format!("http://{addr}/payments"))
            .header("idempotency-key", "\"shared\"")
            .header("x-tenant", tenant)
            .body(Full::new(Bytes::from_static(b"same")))
            .unwrap();
        let response = http.request(request).await.unwrap();
        assert_eq!(response.status(), 201);
        assert!(response.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(count.load(SeqCst), 2);

    // A scope the store refuses (over 255 bytes) is the service's fault: 500.
    let request = Request::post(format!("http://{addr}/payments"))
        .header("idempotency-key", "\"k\"")
        .header("x-tenant", "t".repeat(300))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let response = http.request(request).await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(count.load(SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Concurrent duplicates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicates_wait_and_get_one_execution() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let slow_count = count.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move |body: Bytes| {
                let count = slow_count.clone();
                async move {
                    let n = count.fetch_add(1, SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    (StatusCode::CREATED, format!("execution {n}: {body:?}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store).wait_in_flight(Duration::from_secs(10)));
    let addr = serve(app).await;
    let http = client();
    let answers: Vec<Answer> = futures_join_all((0..32).map(|_| {
        let http = http.clone();
        async move { post_key(&http, addr, "dup", "amount=1").await }
    }))
    .await;
    assert_eq!(count.load(SeqCst), 1, "one execution");
    for answer in &answers {
        assert_eq!(answer.status, 201, "{answer:?}");
        assert_eq!(answer.body, answers[0].body);
    }
    assert_eq!(answers.iter().filter(|a| a.replayed()).count(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_waiting_duplicates_get_409() {
    let store = Store::builder().open_in_memory().unwrap();
    let (count, started, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Notify::new()),
        Arc::new(Semaphore::new(0)),
    );
    let app = gated(count.clone(), started.clone(), gate.clone())
        .layer(IdempotencyLayer::new(store).wait_in_flight(Duration::from_millis(200)));
    let addr = serve(app).await;
    let http = client();
    let first = tokio::spawn({
        let http = http.clone();
        async move { post_key(&http, addr, "w", "a").await }
    });
    started.notified().await;
    // Waits up to 200 ms, in vain: 409.
    let t = Instant::now();
    let busy = post_key(&http, addr, "w", "a").await;
    assert_eq!(busy.status, 409);
    assert!(
        t.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t.elapsed()
    );
    // Another fingerprint does not wait: 422 at once.
    let reused = post_key(&http, addr, "w", "b").await;
    assert_eq!(reused.status, 422);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(count.load(SeqCst), 1);
}

/// `join_all` without the futures crate: spawn each and await in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_exact_size_accepted_one_more_byte_is_413() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let app =
        payments(count.clone()).layer(IdempotencyLayer::new(store.clone()).max_body_bytes(64));
    let addr = serve(app).await;
    let http = client();
    let exact = post_key(&http, addr, "exact", &"x".repeat(64)).await;
    assert_eq!(exact.status, 201);
    let over = post_key(&http, addr, "over", &"x".repeat(65)).await;
    assert_eq!(over.status, 413, "{over:?}");
    assert_eq!(
        over.problem_type(),
        ProblemKind::BodyTooLarge.default_type_uri()
    );
    assert_eq!(count.load(SeqCst), 1);
    assert!(store.get(&Key::new("", "over").unwrap()).unwrap().is_none());

    // Without a Content-Length (chunked), the limit holds as the bytes arrive.
    let addr_copy = addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr_copy).unwrap();
        let chunk = "y".repeat(40);
        write!(
            s,
            "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \"chunked\"\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             28\r\n{chunk}\r\n28\r\n{chunk}\r\n0\r\n\r\n"
        )
        .unwrap();
        read_until_closed(&mut s)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_never_runs_the_handler() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(count.clone()).layer(IdempotencyLayer::new(store.clone()));
    let addr = serve(app).await;
    for (key, request) in [
        (
            "cut-length",
            "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \"cut-length\"\r\n\
             Content-Length: 100\r\n\r\n0123456789"
                .to_owned(),
        ),
        (
            "cut-chunked",
            "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \"cut-chunked\"\r\n\
             Transfer-Encoding: chunked\r\n\r\n10\r\n01234"
                .to_owned(),
        ),
    ] {
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            // The client stops sending (its upload is cut) but can still read.
            s.shutdown(std::net::Shutdown::Write).unwrap();
            read_until_closed(&mut s)
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{key}: {answer}");
        assert!(
            answer.contains(ProblemKind::BodyIncomplete.anchor()),
            "{answer}"
        );
        assert!(store.get(&Key::new("", key).unwrap()).unwrap().is_none());
    }
    assert_eq!(count.load(SeqCst), 0);
    // The whole request then runs once.
    let whole = post_key(&client(), addr, "cut-length", &"0".repeat(100)).await;
    assert_eq!(whole.status, 201);
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_too_large_to_store_is_never_run_again() {
    let store = Store::builder()
        .max_response_bytes(1024)
        .open_in_memory()
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let count = counter.clone();
                async move {
                    count.fetch_add(1, SeqCst);
                    "z".repeat(4096)
                }
            }),
        )
        .layer(IdempotencyLayer::new(store));
    let addr = serve(app).await;
    let http = client();
    let first = post_key(&http, addr, "big", "").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 4096);
    for _ in 0..2 {
        let retry = post_key(&http, addr, "big", "").await;
        assert_eq!(retry.status, 500, "{retry:?}");
        assert!(retry.replayed());
        assert_eq!(
            retry.problem_type(),
            ProblemKind::ResponseNotStored.default_type_uri()
        );
    }
    assert_eq!(count.load(SeqCst), 1);
}

/// A completed record that cannot be read, because its response is not one the layer stored
/// (another writer of the store used the scope) or because a byte of it was damaged on
/// disk, is never run again and never sent as a response: 500, with the kind that says a
/// retry gets the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_read_is_never_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    // No page cache: the damaged byte is read from the file.
    let store = Store::builder().cache_bytes(0).open(&path).unwrap();
    let request = http::Request::post("/payments").body(b"".to_vec()).unwrap();
    let fp = request_fingerprint(&request, &[]);
    let marker = b"RESPONSE-MARKER-0123456789-RESPONSE-MARKER".repeat(4);
    for (id, response) in [
        ("foreign", &b"raw bytes, not a StoredResponse"[..]),
        ("damaged", &marker),
    ] {
        match store.begin(&Key::new("", id).unwrap(), &fp).unwrap() {
            Begin::Started(lease) => lease.complete(response).unwrap(),
            other => panic!("{other:?}"),
        };
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        let image = std::fs::read(&path).unwrap();
        let at = image
            .windows(marker.len())
            .position(|w| w == marker.as_slice())
            .expect("the response is in the file");
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start((at + marker.len() / 2) as u64))
            .unwrap();
        f.write_all(b"X").unwrap();
        f.sync_all().unwrap();
    }
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(count.clone()).layer(IdempotencyLayer::new(store));
    let addr = serve(app).await;
    let http = client();
    for id in ["foreign", "damaged", "foreign", "damaged"] {
        let answer = post_key(&http, addr, id, "").await;
        assert_eq!(answer.status, 500, "{id}");
        assert_eq!(
            answer.problem_type(),
            ProblemKind::RecordUnreadable.default_type_uri(),
            "{id}"
        );
    }
    assert_eq!(count.load(SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_never_run_again() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let count = counter.clone();
                async move {
                    if count.fetch_add(1, SeqCst) < 10 {
                        panic!("the handler failed midway (test)");
                    }
                    "unreachable"
                }
            }),
        )
        .layer(IdempotencyLayer::new(store));
    let addr = serve(app).await;
    let http = client();
    let first = post_key(&http, addr, "p", "").await;
    assert_eq!(first.status, 500);
    assert_eq!(
        first.problem_type(),
        ProblemKind::HandlerFailed.default_type_uri()
    );
    let retry = post_key(&http, addr, "p", "").await;
    assert_eq!(retry.status, 500);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(count.load(SeqCst), 1);
}

/// A response body larger than the store holds is not read whole before the head is sent:
/// the first client gets it as it comes (here the handler's body waits on the client's
/// first bytes), trailers included, and a retry gets the stored problem. A body small enough
/// is stored, and its first client gets its trailers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_passes_through_and_small_ones_keep_their_trailers() {
    use http_body_util::channel::Channel;
    use tower::ServiceExt;
    let store = Store::builder()
        .max_response_bytes(4096)
        .open_in_memory()
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    // The handler's body: what the test sends through `senders`.
    let senders = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let inner = tower::service_fn({
        let (count, senders) = (count.clone(), senders.clone());
        move |_request: Request<idemstore::tower::Body<Full<Bytes>>>| {
            count.fetch_add(1, SeqCst);
            let (tx, body) = Channel::<Bytes, Infallible>::new(4);
            senders.lock().push(tx);
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }
    });
    let service = IdempotencyLayer::new(store).layer(inner);
    let request = |key: &str| {
        Request::post("/payments")
            .header("idempotency-key", format!("\"{key}\""))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let trailers = || {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        trailers
    };

    // Larger than the store holds: 8 KiB sent, then the body waits until the head arrived.
    let first = tokio::spawn(service.clone().oneshot(request("stream")));
    let mut tx = loop {
        if let Some(tx) = senders.lock().pop() {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for _ in 0..2 {
        tx.send_data(Bytes::from(vec![b'z'; 4096])).await.unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the head waited for the whole body")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    tx.send_data(Bytes::from(vec![b'z'; 4096])).await.unwrap();
    tx.send_trailers(trailers()).await.unwrap();
    drop(tx);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers()));
    assert_eq!(collected.to_bytes(), vec![b'z'; 3 * 4096]);
    let retry = service.clone().oneshot(request("stream")).await.unwrap();
    let (parts, body) = retry.into_parts();
    let retry = Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    };
    assert_eq!(retry.status, 500);
    assert!(retry.replayed());
    assert_eq!(
        retry.problem_type(),
        ProblemKind::ResponseNotStored.default_type_uri()
    );
    assert_eq!(count.load(SeqCst), 1);

    // Small enough: stored; the first client gets the trailers, the replay the body.
    let first = tokio::spawn(service.clone().oneshot(request("small")));
    let mut tx = loop {
        if let Some(tx) = senders.lock().pop() {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tx.send_data(Bytes::from_static(b"small")).await.unwrap();
    tx.send_trailers(trailers()).await.unwrap();
    drop(tx);
    let collected = first
        .await
        .unwrap()
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(collected.trailers(), Some(&trailers()));
    assert_eq!(collected.to_bytes(), "small");
    let replay = service.clone().oneshot(request("small")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(
        replay.into_body().collect().await.unwrap().to_bytes(),
        "small"
    );
    assert_eq!(count.load(SeqCst), 2);
}

/// A service (or a middleware under the layer) that does its work in `call` itself, before
/// it returns a future, and panics there: the retry gets the stored problem, and the work
/// is not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_panics_in_call_is_never_run_again() {
    use tower::ServiceExt;
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let inner = tower::service_fn(
        move |_request: Request<idemstore::tower::Body<Full<Bytes>>>| {
            if counter.fetch_add(1, SeqCst) < 10 {
                panic!("the work done in call failed midway (test)");
            }
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"charged")))) }
        },
    );
    let service = IdempotencyLayer::new(store).layer(inner);
    let request = || {
        Request::post("/payments")
            .header("idempotency-key", "\"sync-panic\"")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = service.clone().oneshot(request()).await.unwrap();
        let (parts, body) = response.into_parts();
        answers.push(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        });
    }
    let (first, retry) = (&answers[0], &answers[1]);
    assert_eq!(first.status, 500);
    assert_eq!(
        first.problem_type(),
        ProblemKind::HandlerFailed.default_type_uri()
    );
    assert_eq!(retry.status, 500, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(count.load(SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Clients that go away, restarts, long handlers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_handler_gets_the_replay_on_retry() {
    let store = Store::builder().open_in_memory().unwrap();
    let (count, started, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Notify::new()),
        Arc::new(Semaphore::new(0)),
    );
    let app = gated(count.clone(), started.clone(), gate.clone())
        .layer(IdempotencyLayer::new(store.clone()));
    let addr = serve(app).await;

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \"gone\"\r\n\
          Content-Length: 6\r\n\r\ncharge",
    )
    .await
    .unwrap();
    started.notified().await;
    drop(stream); // the client goes away mid-handler
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);

    // The handler ran to its end and its response was stored.
    let key = Key::new("", "gone").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        store.get(&key).unwrap(),
        Some(idemstore::Entry::Completed(_))
    ) {
        assert!(Instant::now() < deadline, "the response was never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retry = post_key(&client(), addr, "gone", "charge").await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed());
    assert_eq!(retry.text(), "execution 1 of charge");
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_file_replays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.redb");
    let count = Arc::new(AtomicUsize::new(0));
    let first = {
        let store = Store::open(&path).unwrap();
        let addr = serve(payments(count.clone()).layer(IdempotencyLayer::new(store.clone()))).await;
        let first = post_key(&client(), addr, "r", "amount=3").await;
        // Closed while the old server still holds clones: they get Closed from now on.
        store.close().unwrap();
        first
    };
    assert_eq!(first.status, 201);
    let store = Store::open(&path).unwrap();
    let addr = serve(payments(count.clone()).layer(IdempotencyLayer::new(store))).await;
    let retry = post_key(&client(), addr, "r", "amount=3").await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["x-execution"], "yes");
    assert_eq!(count.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_keeps_a_long_handler_from_being_taken_over() {
    let lease = Duration::from_millis(300);
    let store = Store::builder().lease(lease).open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let count = counter.clone();
                async move {
                    let n = count.fetch_add(1, SeqCst) + 1;
                    tokio::time::sleep(lease * 4).await;
                    format!("execution {n}")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()));
    let addr = serve(app).await;
    let http = client();
    let first = tokio::spawn({
        let http = http.clone();
        async move { post_key(&http, addr, "long", "").await }
    });
    // Retries while the handler runs, up to three times its lease: each is 409, never a
    // takeover.
    let t0 = tokio::time::Instant::now();
    for i in 1..=4u32 {
        tokio::time::sleep_until(t0 + Duration::from_millis(100) + Duration::from_millis(200) * i)
            .await;
        let retry = post_key(&http, addr, "long", "").await;
        assert_eq!(retry.status, 409, "retry {i}: {retry:?}");
    }
    let first = first.await.unwrap();
    assert_eq!(first.text(), "execution 1");
    assert_eq!(count.load(SeqCst), 1);
    assert_eq!(store.stats().takeovers, 0);
    let replay = post_key(&http, addr, "long", "").await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
}

// ---------------------------------------------------------------------------------------------
// axum's route_layer and a plain hyper service

/// The layer on a store on PostgreSQL (skipped loudly without a test cluster, failed under
/// CI): the same answers as on redb, a second replica's layer included. The stores are
/// opened and closed outside the runtime: the synchronous PostgreSQL client runs a runtime
/// of its own, which tokio refuses to start on a runtime thread.
#[test]
fn the_layer_on_a_store_on_postgres() {
    let Some(place) = Place::new(Engine::Postgres) else {
        return;
    };
    let open = || place.open(Store::builder().reap_interval(None)).unwrap();
    let (a, b) = (open(), open());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    runtime.block_on({
        let (a, b, count) = (a.clone(), b.clone(), count.clone());
        async move {
            let one = serve(payments(count.clone()).layer(IdempotencyLayer::new(a))).await;
            let two = serve(payments(count.clone()).layer(IdempotencyLayer::new(b))).await;
            let http = client();
            let first = post_key(&http, one, "pg-1", "a").await;
            assert_eq!(first.status, 201);
            assert!(!first.replayed());
            // The retry lands on the other replica: the stored response, not a second run.
            let retry = post_key(&http, two, "pg-1", "a").await;
            assert_eq!(retry.status, 201);
            assert!(retry.replayed());
            assert_eq!(retry.body, first.body);
            let reused = post_key(&http, one, "pg-1", "b").await;
            assert_eq!(reused.status, 422);
            let missing = send(&http, two, Method::POST, "/payments", None, "a".to_owned()).await;
            assert_eq!(missing.status, 400);
        }
    });
    assert_eq!(count.load(SeqCst), 1);
    a.close().unwrap();
    b.close().unwrap();
    drop(runtime);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_layer_guards_only_its_routes() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(count.clone())
        .route_layer(IdempotencyLayer::new(store))
        .route("/open", post(|| async { "not guarded" }));
    let addr = serve(app).await;
    let http = client();
    let open = send(&http, addr, Method::POST, "/open", None, "x").await;
    assert_eq!(open.status, 200);
    assert_eq!(open.text(), "not guarded");
    let guarded = send(&http, addr, Method::POST, "/payments", None, "x").await;
    assert_eq!(guarded.status, 400);
    let once = post_key(&http, addr, "rl", "x").await;
    let twice = post_key(&http, addr, "rl", "x").await;
    assert_eq!(once.body, twice.body);
    assert!(twice.replayed());
    assert_eq!(count.load(SeqCst), 1);
}

/// Under `Router::nest`: a layer on the outer router sees the whole path (one key sent to
/// two nested routes is 422 the second time); layers inside nested routers see the path
/// without the prefix, so each gets its own scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_routers_fingerprint_the_whole_path_from_outside() {
    let routes = || {
        (
            Router::new().route("/payments", post(|| async { "v1 charged" })),
            Router::new().route("/payments", post(|| async { "v2 refunded" })),
        )
    };
    let (v1, v2) = routes();
    let outside = Router::new()
        .nest("/v1", v1)
        .nest("/v2", v2)
        .layer(IdempotencyLayer::new(
            Store::builder().open_in_memory().unwrap(),
        ));
    let store = Store::builder().open_in_memory().unwrap();
    let (v1, v2) = routes();
    let scoped =
        |name: &'static str| IdempotencyLayer::new(store.clone()).scope(move |_| name.to_owned());
    let inside = Router::new()
        .nest("/v1", v1.layer(scoped("v1")))
        .nest("/v2", v2.layer(scoped("v2")));
    let http = client();
    for (app, second) in [(outside, 422), (inside, 200)] {
        let addr = serve(app).await;
        let one = send(&http, addr, Method::POST, "/v1/payments", Some("same"), "x").await;
        assert_eq!(
            (one.status, one.text().as_str()),
            (StatusCode::OK, "v1 charged")
        );
        let two = send(&http, addr, Method::POST, "/v2/payments", Some("same"), "x").await;
        assert_eq!(two.status, second, "{two:?}");
        assert!(!two.replayed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_hyper_service() {
    let store = Store::builder().open_in_memory().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let handler = tower::service_fn(
        move |request: Request<idemstore::tower::Body<hyper::body::Incoming>>| {
            let count = counter.clone();
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let n = count.fetch_add(1, SeqCst) + 1;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "hyper execution {n}: {}",
                    String::from_utf8_lossy(&body)
                )))))
            }
        },
    );
    let service =
        hyper_util::service::TowerToHyperService::new(IdempotencyLayer::new(store).layer(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let http = client();
    let first = post_key(&http, addr, "h", "hello").await;
    assert_eq!(first.text(), "hyper execution 1: hello");
    let retry = post_key(&http, addr, "h", "hello").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    let missing = send(&http, addr, Method::POST, "/", None, "x").await;
    assert_eq!(missing.status, 400);
    assert_eq!(count.load(SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Never blocking the runtime

/// A store on an in-memory backend whose syncs the returned handle can slow down (a slow
/// disk), fast while it opens.
fn slow_store(max_response_bytes: usize) -> (Store, Faults) {
    let (backend, faults) = FaultyBackend::new(InMemoryBackend::new());
    let store = Store::builder()
        .max_response_bytes(max_response_bytes)
        .open_backend(backend)
        .unwrap();
    (store, faults)
}

/// While the heartbeat's extension waits on a slow store (every sync takes 1 s), the
/// handler is still polled: its own timers fire on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_never_stalls_the_handler() {
    use tower::ServiceExt;
    let (backend, faults) = FaultyBackend::new(InMemoryBackend::new());
    // A beat every 100 ms.
    let store = Store::builder()
        .lease(Duration::from_millis(300))
        .open_backend(backend)
        .unwrap();
    let longest_gap = Arc::new(parking_lot::Mutex::new(Duration::ZERO));
    let inner = tower::service_fn({
        let (faults, longest_gap) = (faults.clone(), longest_gap.clone());
        move |_request: Request<idemstore::tower::Body<Full<Bytes>>>| {
            let (faults, longest_gap) = (faults.clone(), longest_gap.clone());
            async move {
                faults.set_sync_delay(Duration::from_secs(1));
                let mut last = Instant::now();
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let gap = last.elapsed();
                    let mut longest = longest_gap.lock();
                    *longest = (*longest).max(gap);
                    last = Instant::now();
                }
                faults.set_sync_delay(Duration::ZERO);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        }
    });
    let service = IdempotencyLayer::new(store).layer(inner);
    let request = Request::post("/payments")
        .header("idempotency-key", "\"beat\"")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let longest = *longest_gap.lock();
    // 30 ms sleeps; an extension awaited in place of the handler would make a gap of a
    // whole commit (two syncs: 2 s).
    assert!(
        longest < Duration::from_millis(600),
        "the handler stalled for {longest:?} while its lease was extended"
    );
}

/// On a `current_thread` runtime (one thread for everything), with every sync of the store
/// taking 400 ms: while guarded requests wait on their begin and complete, and while a lease
/// that cannot be completed is released, a pinger on another route never waits long between
/// two answers. A store call on the runtime's thread would stall it for a whole sync.
#[test]
fn a_current_thread_runtime_keeps_answering_while_writes_are_slow() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (store, slow) = slow_store(4 << 20);
        // This store cannot hold even a bare answer: its lease is dropped, and released.
        let (tiny, tiny_slow) = slow_store(8);
        let count = Arc::new(AtomicUsize::new(0));
        let app = payments(count.clone())
            .layer(IdempotencyLayer::new(store.clone()))
            .route(
                "/tiny",
                post(|| async { "a response no store of 8 bytes holds" })
                    .layer(IdempotencyLayer::new(tiny.clone())),
            )
            .route("/ping", get(|| async { "pong" }));
        let addr = serve(app).await;
        let http = client();
        assert_eq!(
            send(&http, addr, Method::GET, "/ping", None, "")
                .await
                .text(),
            "pong"
        );
        slow.set_sync_delay(Duration::from_millis(400));
        tiny_slow.set_sync_delay(Duration::from_millis(400));

        // The pinger: the longest time between two of its answers.
        let stop = Arc::new(AtomicBool::new(false));
        let pinger = tokio::spawn({
            let (http, stop) = (http.clone(), stop.clone());
            async move {
                let (mut worst, mut pings) = (Duration::ZERO, 0u32);
                let mut last = Instant::now();
                while !stop.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let pong = send(&http, addr, Method::GET, "/ping", None, "").await;
                    assert_eq!(pong.text(), "pong");
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                    pings += 1;
                }
                (worst, pings)
            }
        });

        let before = (slow.calls(Call::Sync), tiny_slow.calls(Call::Sync));
        for path in ["/payments", "/tiny"] {
            let request = Request::post(format!("http://{addr}{path}"))
                .header("idempotency-key", "\"slow\"")
                .body(Full::new(Bytes::from_static(b"amount=1")))
                .unwrap();
            let status = http.request(request).await.unwrap().status();
            assert!(status.is_success(), "{path}: {status}");
        }
        // The tiny store's lease was released (best effort, after the answer was sent): its
        // key is then taken over at once.
        let key = Key::new("", "slow").unwrap();
        let request = Request::post("/tiny").body(b"amount=1".to_vec()).unwrap();
        let fp = request_fingerprint(&request, &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (t, k) = (tiny.clone(), key.clone());
            let begun = tokio::task::spawn_blocking(move || t.begin(&k, &fp))
                .await
                .unwrap();
            match begun.unwrap() {
                Begin::Started(lease) => {
                    assert!(
                        lease.recovered().is_some(),
                        "a takeover of the released lease"
                    );
                    tokio::task::spawn_blocking(move || lease.abandon())
                        .await
                        .unwrap()
                        .unwrap();
                    break;
                }
                Begin::InFlight { .. } => {
                    assert!(Instant::now() < deadline, "the lease was never released");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        stop.store(true, SeqCst);
        let (worst, pings) = pinger.await.unwrap();
        // begin + complete on one store, begin + release + the check's begin and abandon on the
        // other: many slow syncs, and the pinger answered all along.
        let slow_syncs = slow.calls(Call::Sync) - before.0 + tiny_slow.calls(Call::Sync) - before.1;
        assert!(slow_syncs >= 6, "{slow_syncs} syncs");
        assert!(pings >= 20, "{pings} pings in {slow_syncs} syncs of 400 ms");
        assert!(
            worst < Duration::from_millis(200),
            "the runtime stalled {worst:?} while a write was pending"
        );
        assert_eq!(count.load(SeqCst), 1);
        slow.set_sync_delay(Duration::ZERO);
        tiny_slow.set_sync_delay(Duration::ZERO);
    });
}
