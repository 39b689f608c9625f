//! The HTTP edge without a server: `RequestGuard` on an in-memory store with a manual clock,
//! the `Idempotency-Key` header, fingerprints, problem bodies, and the `StoredResponse` codec.
#![cfg(feature = "http")]

use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{CONTENT_TYPE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use idemstore::http::{
    Decision, IDEMPOTENCY_KEY, RequestGuard, StoredResponse, complete, error_response,
    idempotency_key, request_fingerprint,
};
use idemstore::{Error, Fingerprint, Key, ManualClock, Store};
use proptest::prelude::*;

const KEY: &str = "\"0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11\"";

fn clock() -> ManualClock {
    ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

fn guard(clock: &ManualClock) -> RequestGuard {
    let store = Store::builder()
        .ttl(Duration::from_secs(3600))
        .lease(Duration::from_secs(30))
        .reap_interval(None)
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    RequestGuard::new(store).fingerprint_headers([CONTENT_TYPE])
}

fn request(key: Option<&str>, body: &str) -> Request<Vec<u8>> {
    let mut b = Request::post("/payments?currency=eur").header(CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        b = b.header(IDEMPOTENCY_KEY, key);
    }
    b.body(body.as_bytes().to_vec()).unwrap()
}

fn created(n: u32) -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(CONTENT_TYPE, "application/json")
        .header("location", format!("/payments/{n}"))
        .header(SET_COOKIE, "session=s3cret")
        .header("connection", "keep-alive")
        .body(format!("{{\"id\":{n}}}").into_bytes())
        .unwrap()
}

fn run(guard: &RequestGuard, req: &Request<Vec<u8>>) -> idemstore::Lease {
    match guard.begin("tenant-1", req).unwrap() {
        Decision::Run(lease) => lease,
        other => panic!("expected Run, got {other:?}"),
    }
}

fn reject(guard: &RequestGuard, req: &Request<Vec<u8>>) -> Response<Vec<u8>> {
    match guard.begin("tenant-1", req).unwrap() {
        Decision::Reject(r) => r,
        other => panic!("expected Reject, got {other:?}"),
    }
}

fn body(r: &Response<Vec<u8>>) -> &str {
    std::str::from_utf8(r.body()).unwrap()
}

fn assert_problem(r: &Response<Vec<u8>>, status: u16, anchor: &str) {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
    let b = body(r);
    let prefix = format!(
        "{{\"type\":\"https://docs.rs/idemstore/latest/idemstore/http/index.html#{anchor}\",\"title\":\""
    );
    assert!(b.starts_with(&prefix), "{b}");
    assert!(
        b.contains(&format!(",\"status\":{status},\"detail\":\"")),
        "{b}"
    );
    assert!(b.ends_with("\"}"), "{b}");
}

#[test]
fn first_runs_then_every_retry_replays_the_whole_response() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), r#"{"amount":1}"#);
    let first = created(1);
    let done = complete(run(&guard, &req), &first).unwrap();
    assert_eq!(
        StoredResponse::decode(done.response()).unwrap(),
        StoredResponse::from_response(&first)
    );
    for _ in 0..3 {
        clock.advance(Duration::from_secs(60));
        let Decision::Replay(replay) = guard.begin("tenant-1", &req).unwrap() else {
            panic!("expected a replay");
        };
        assert_eq!(replay.status(), 201);
        assert_eq!(replay.body(), first.body());
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(replay.headers()["location"], "/payments/1");
        assert_eq!(replay.headers()[CONTENT_TYPE], "application/json");
        assert!(replay.headers().get(SET_COOKIE).is_none());
        assert!(replay.headers().get("connection").is_none());
        assert_eq!(replay.headers().len(), 3);
    }
    let stats = guard.store().stats();
    assert_eq!((stats.started, stats.replayed), (1, 3));
}

#[test]
fn a_request_in_flight_gets_409_with_a_short_retry_after_hint_by_default() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), "{}");
    let lease = run(&guard, &req);
    clock.advance(Duration::from_millis(500));
    let conflict = reject(&guard, &req);
    assert_problem(&conflict, 409, "request-in-flight");
    assert_eq!(
        conflict.headers()["retry-after"],
        "1",
        "29.5 s of lease left, but the default hint is 1 s"
    );
    assert!(
        body(&conflict).contains("in 1 second(s)"),
        "{}",
        body(&conflict)
    );
    complete(lease, &created(1)).unwrap();
    assert!(matches!(
        guard.begin("tenant-1", &req).unwrap(),
        Decision::Replay(_)
    ));
}

#[test]
fn the_retry_after_hint_is_configurable_never_past_the_lease_whole_seconds_at_least_1() {
    let clock = clock();
    let retry_after = |hint: Duration, advance_ms: u64| {
        let guard = guard(&clock).retry_after_hint(hint);
        let req = request(Some(KEY), "{}");
        let lease = run(&guard, &req);
        clock.advance(Duration::from_millis(advance_ms));
        let conflict = reject(&guard, &req);
        drop(lease);
        conflict.headers()["retry-after"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    // The lease is 30 s.
    assert_eq!(
        retry_after(Duration::from_millis(2500), 0),
        "3",
        "rounded up"
    );
    assert_eq!(retry_after(Duration::from_secs(5), 10_500), "5");
    assert_eq!(
        retry_after(Duration::from_secs(60), 10_500),
        "20",
        "19.5 s of lease left caps a longer hint"
    );
    assert_eq!(
        retry_after(Duration::from_secs(5), 29_500),
        "1",
        "0.5 s left"
    );
    assert_eq!(retry_after(Duration::ZERO, 0), "1", "never 0");
    assert_eq!(Duration::from_secs(1), Duration::from_secs(1));
}

#[test]
fn a_key_reused_for_another_request_is_422() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), r#"{"amount":1}"#);
    // In flight and completed alike.
    let lease = run(&guard, &req);
    assert_problem(
        &reject(&guard, &request(Some(KEY), r#"{"amount":2}"#)),
        422,
        "idempotency-key-reused",
    );
    complete(lease, &created(1)).unwrap();
    let variants = [
        request(Some(KEY), r#"{"amount":2}"#),
        Request::put("/payments?currency=eur")
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY, KEY)
            .body(br#"{"amount":1}"#.to_vec())
            .unwrap(),
        Request::post("/payments?currency=usd")
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY, KEY)
            .body(br#"{"amount":1}"#.to_vec())
            .unwrap(),
        Request::post("/payments?currency=eur")
            .header(CONTENT_TYPE, "text/plain")
            .header(IDEMPOTENCY_KEY, KEY)
            .body(br#"{"amount":1}"#.to_vec())
            .unwrap(),
    ];
    for other in &variants {
        assert_problem(&reject(&guard, other), 422, "idempotency-key-reused");
    }
    // Headers not named for the fingerprint don't matter; an absolute URI is its path.
    let same = Request::post("http://api.example/payments?currency=eur")
        .header(CONTENT_TYPE, "application/json")
        .header(IDEMPOTENCY_KEY, KEY)
        .header("x-request-id", "abc")
        .body(br#"{"amount":1}"#.to_vec())
        .unwrap();
    assert!(matches!(
        guard.begin("tenant-1", &same).unwrap(),
        Decision::Replay(_)
    ));
    assert_eq!(guard.store().stats().mismatches, 5);
}

#[test]
fn missing_and_malformed_keys_are_400_and_touch_nothing() {
    let clock = clock();
    let guard = guard(&clock);
    assert_problem(
        &reject(&guard, &request(None, "{}")),
        400,
        "missing-idempotency-key",
    );
    for bad in ["\"abc", "\"\"", "a b", "\"a\";p=1", "\"a\\x\""] {
        let r = reject(&guard, &request(Some(bad), "{}"));
        assert_problem(&r, 400, "malformed-idempotency-key");
    }
    let long = format!("\"{}\"", "k".repeat(256));
    let r = reject(&guard, &request(Some(&long), "{}"));
    assert_problem(&r, 400, "malformed-idempotency-key");
    assert!(body(&r).contains("255"));
    let mut twice = request(Some(KEY), "{}");
    twice
        .headers_mut()
        .append(IDEMPOTENCY_KEY, HeaderValue::from_static("\"other\""));
    let r = reject(&guard, &twice);
    assert!(body(&r).contains("more than one"), "{}", body(&r));
    assert_eq!(guard.store().stats().started, 0);
}

#[test]
fn scopes_keep_clients_apart() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), "{}");
    let a = run(&guard, &req);
    let Decision::Run(b) = guard.begin("tenant-2", &req).unwrap() else {
        panic!("another scope is another key");
    };
    assert_eq!(
        b.key(),
        &Key::new("tenant-2", &KEY[1..KEY.len() - 1]).unwrap()
    );
    drop((a, b));
}

/// Records the level and text of every event on this thread.
struct Events(Mutex<Vec<(tracing::Level, String)>>);

struct Text<'a>(&'a mut String);

impl tracing::field::Visit for Text<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for &'static Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = String::new();
        event.record(&mut Text(&mut text));
        let level = *event.metadata().level();
        self.0.lock().unwrap().push((level, text));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_scope_the_store_refuses_is_the_servers_fault_a_500_that_says_nothing_of_it() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), "{}");
    let events: &'static Events = Box::leak(Box::new(Events(Mutex::new(Vec::new()))));
    let scope = "s".repeat(256);
    let err = tracing::subscriber::with_default(events, || guard.begin(&scope, &req))
        .expect_err("a 256-byte scope is refused");
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    let r = error_response(&err);
    assert_problem(&r, 500, "internal-server-error");
    for leak in ["scope", "256", "255", "malformed", "Idempotency-Key header"] {
        assert!(!body(&r).contains(leak), "{leak:?} in {}", body(&r));
    }
    let logged = events.0.lock().unwrap().clone();
    assert!(
        logged.iter().any(
            |(level, text)| *level == tracing::Level::ERROR && text.contains("scope_bytes=256")
        ),
        "{logged:?}"
    );
    assert!(
        logged.iter().all(|(_, text)| !text.contains(&scope)),
        "the scope itself is not logged: {logged:?}"
    );
    assert_eq!(guard.store().stats().started, 0, "nothing begun");
    // The id keeps its own 400, and a 255-byte scope is fine.
    assert_problem(
        &reject(&guard, &request(Some("\"abc"), "{}")),
        400,
        "malformed-idempotency-key",
    );
    assert!(matches!(
        guard.begin(&"s".repeat(255), &req),
        Ok(Decision::Run(_))
    ));
    assert_eq!(
        error_response(&Error::InvalidKey { reason: "x".into() }).status(),
        400
    );
}

#[test]
fn after_the_ttl_the_key_runs_again_and_a_dropped_lease_is_taken_over() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), "{}");
    complete(run(&guard, &req), &created(1)).unwrap();
    clock.advance(Duration::from_secs(3600));
    let lease = run(&guard, &req);
    assert!(lease.recovered().is_none());
    drop(lease); // the handler failed without completing
    let lease = run(&guard, &req);
    assert_eq!(lease.recovered().map(|r| r.attempt()), Some(2));
    complete(lease, &created(2)).unwrap();
    let Decision::Replay(r) = guard.begin("tenant-1", &req).unwrap() else {
        panic!("replay");
    };
    assert_eq!(r.body(), created(2).body());
}

#[test]
fn store_failures_are_errors_answered_with_500() {
    let clock = clock();
    let guard = guard(&clock);
    let req = request(Some(KEY), "{}");
    // A response completed by other code, not in StoredResponse form.
    let key = Key::new("tenant-1", &KEY[1..KEY.len() - 1]).unwrap();
    let fp = request_fingerprint(&req, &[CONTENT_TYPE]);
    let idemstore::Begin::Started(lease) = guard.store().begin(&key, &fp).unwrap() else {
        panic!("started");
    };
    lease.complete(b"plain bytes").unwrap();
    let err = guard.begin("tenant-1", &req).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_problem(&error_response(&err), 500, "idempotency-store-failed");

    guard.store().clone().close().unwrap();
    let err = guard
        .begin("tenant-1", &request(Some("\"k2\""), "{}"))
        .unwrap_err();
    assert!(matches!(err, Error::Closed));
    let r = error_response(&err);
    assert_eq!(r.status(), 500);
    assert!(
        !body(&r).contains("closed"),
        "internal errors are not leaked"
    );
}

#[test]
fn the_fingerprint_is_the_documented_framing() {
    let req = Request::post("/p?q=1")
        .header("x-a", "1")
        .header("x-a", "2")
        .body(b"body".to_vec())
        .unwrap();
    let expected = Fingerprint::builder()
        .part(b"POST")
        .part(b"/p?q=1")
        .part(b"body")
        .part(b"x-a")
        .part(2u64.to_be_bytes())
        .part(b"1")
        .part(b"2")
        .part(b"x-missing")
        .part(0u64.to_be_bytes())
        .finish();
    assert_eq!(
        request_fingerprint(
            &req,
            &[
                http::HeaderName::from_static("x-a"),
                http::HeaderName::from_static("x-missing")
            ]
        ),
        expected
    );
    assert_eq!(
        request_fingerprint(&req, &[]),
        Fingerprint::builder()
            .part(b"POST")
            .part(b"/p?q=1")
            .part(b"body")
            .finish()
    );
}

#[test]
fn header_parsing_of_a_header_map() {
    let mut h = HeaderMap::new();
    assert!(matches!(
        idempotency_key(&h),
        Err(Error::MissingIdempotencyKey)
    ));
    h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(" \"k-1\"\t"));
    assert_eq!(idempotency_key(&h).unwrap(), "k-1");
    h.insert(
        IDEMPOTENCY_KEY,
        HeaderValue::from_bytes(b"\"\xc3\xa9\"").unwrap(),
    );
    let err = idempotency_key(&h).unwrap_err();
    assert!(matches!(err, Error::MalformedIdempotencyKey { .. }));
    assert!(err.to_string().contains("printable ASCII"));
}

/// A response with more values of one header than a header map can be sized for at once
/// (the http crate holds them, but panics when asked for that capacity) is stored and
/// replayed whole, never a panic; a crafted count that large is an error.
#[test]
fn many_values_of_one_header_replay_whole_and_a_huge_count_is_corrupt() {
    let guard = RequestGuard::new(Store::builder().open_in_memory().unwrap());
    let req = request(Some(KEY), "{}");
    let Decision::Run(lease) = guard.begin("t", &req).unwrap() else {
        panic!("a new key runs")
    };
    let mut response = Response::new(b"ok".to_vec());
    for i in 0..30_000u32 {
        response
            .headers_mut()
            .append("x-trace", HeaderValue::from(i));
    }
    complete(lease, &response).unwrap();
    match guard.begin("t", &req).unwrap() {
        Decision::Replay(replay) => {
            let values = replay.headers().get_all("x-trace");
            assert_eq!(values.iter().count(), 30_000);
            assert_eq!(values.iter().next_back().unwrap(), "29999");
        }
        _ => panic!("expected the replay"),
    }

    let count: u32 = 40_000;
    let mut bytes = b"IDR\x01".to_vec();
    bytes.extend_from_slice(&200u16.to_be_bytes());
    bytes.extend_from_slice(&count.to_be_bytes());
    for i in 0..count {
        // 40,000 distinct names: more than a header map holds.
        let name = format!("x-{i}");
        bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&1u32.to_be_bytes());
        bytes.push(b'v');
    }
    bytes.extend_from_slice(&0u64.to_be_bytes());
    assert!(matches!(
        StoredResponse::decode(&bytes),
        Err(Error::Corrupt { .. })
    ));
}

/// One encoding per response: the values of a name are stored together, so bytes that
/// interleave names (a, b, a) are refused rather than decoded into what re-encodes
/// differently.
#[test]
fn interleaved_header_names_are_not_an_encoding() {
    let encoded = |fields: &[(&str, &str)]| {
        let mut bytes = b"IDR\x01".to_vec();
        bytes.extend_from_slice(&200u16.to_be_bytes());
        bytes.extend_from_slice(&(fields.len() as u32).to_be_bytes());
        for (name, value) in fields {
            bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&(value.len() as u32).to_be_bytes());
            bytes.extend_from_slice(value.as_bytes());
        }
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes
    };
    let grouped = encoded(&[("x-a", "1"), ("x-a", "3"), ("x-b", "2")]);
    assert_eq!(StoredResponse::decode(&grouped).unwrap().encode(), grouped);
    assert!(matches!(
        StoredResponse::decode(&encoded(&[("x-a", "1"), ("x-b", "2"), ("x-a", "3")])),
        Err(Error::Corrupt { .. })
    ));
}

/// A 409's `Retry-After` for any duration: whole seconds rounded up, saturating.
#[test]
fn retry_after_saturates_for_a_huge_duration() {
    let r = idemstore::http::in_flight(Duration::MAX);
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["retry-after"], u64::MAX.to_string().as_str());
}

/// An absolute URI's empty path is `/`, before a query too: a proxy that rewrites the
/// request to origin form changes no fingerprint.
#[test]
fn an_absolute_uri_without_a_path_fingerprints_as_its_origin_form() {
    let fp = |uri: &str| request_fingerprint(&Request::post(uri).body(b"x").unwrap(), &[]);
    assert_eq!(fp("http://api.example"), fp("/"));
    assert_eq!(fp("http://api.example?q=1"), fp("/?q=1"));
    assert_eq!(fp("http://api.example/a?q=1"), fp("/a?q=1"));
    assert_ne!(fp("/a?q=1"), fp("/a?q=2"));
}

fn arbitrary_response() -> impl Strategy<Value = StoredResponse> {
    (
        100u16..=999,
        prop::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,20}"), 0..6),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(status, headers, body)| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value.trim()).unwrap(),
                );
            }
            StoredResponse::new(StatusCode::from_u16(status).unwrap(), &map, body)
        })
}

proptest! {
    #[test]
    fn stored_responses_round_trip(r in arbitrary_response()) {
        let bytes = r.encode();
        prop_assert_eq!(StoredResponse::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = StoredResponse::decode(&bytes);
        let mut framed = b"IDR\x01".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = StoredResponse::decode(&framed);
    }

    #[test]
    fn corrupting_an_encoding_never_panics(
        r in arbitrary_response(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = r.encode();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(decoded) = StoredResponse::decode(&bytes) {
            // Whatever decodes re-encodes to the same bytes: nothing was silently dropped.
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }
}

/// `use idemstore::*` brings the core API and the `http` module (its types stay in it), and
/// the `http` crate stays reachable.
mod glob {
    use idemstore::*;

    #[test]
    fn glob_import_brings_the_core_and_the_http_module() {
        let r = ::http::Response::new(Vec::<u8>::new());
        let stored: self::http::StoredResponse = self::http::StoredResponse::from_response(&r);
        assert_eq!(stored.status(), 200);
        let _: fn(Store) -> self::http::RequestGuard = self::http::RequestGuard::new;
        assert_eq!(self::http::PROBLEM_JSON, "application/problem+json");
        let _: fn(&str, &str) -> Result<Key> = Key::new;
    }
}
