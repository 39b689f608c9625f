//! The example HTTP service (`examples/http_service.rs`), run as a child process on a free
//! port of 127.0.0.1 (cargo builds the example before it runs this test) and driven by a real
//! HTTP client (`ureq`): the six behaviours of the store's contract at the HTTP edge.
#![cfg(feature = "http")]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use idemstore::Store;
use idemstore_testkit::http::RawReply;
use idemstore_testkit::programs::HttpService;

/// How the service runs (the example's flags, with its defaults).
#[derive(Clone, Debug)]
struct Config {
    ttl: Duration,
    lease: Duration,
    retry_after_hint: Duration,
    /// The store file; `None`: one in the test's temporary directory.
    db: Option<PathBuf>,
    /// The ledger file; `None`: one in the test's temporary directory.
    ledger: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            retry_after_hint: Duration::from_secs(1),
            db: None,
            ledger: None,
        }
    }
}

/// The example service in a child process, on its store and ledger files.
struct Service {
    http: Option<HttpService>,
    config: Config,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(config: Config) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let db = config
            .db
            .clone()
            .unwrap_or_else(|| dir.path().join("service.redb"));
        let ledger = config
            .ledger
            .clone()
            .unwrap_or_else(|| dir.path().join("ledger"));
        let config = Config {
            db: Some(db.clone()),
            ledger: Some(ledger),
            ..config
        };
        let mut service = Service {
            http: None,
            config,
            db,
            _dir: dir,
        };
        service.run();
        service
    }

    fn run(&mut self) {
        let c = &self.config;
        let ms = |d: Duration| d.as_millis().to_string();
        let path = |p: &Option<PathBuf>| p.as_ref().unwrap().display().to_string();
        self.http = Some(HttpService::start([
            "--ttl-ms".into(),
            ms(c.ttl),
            "--lease-ms".into(),
            ms(c.lease),
            "--retry-after-ms".into(),
            ms(c.retry_after_hint),
            "--db".into(),
            path(&c.db),
            "--ledger".into(),
            path(&c.ledger),
        ]));
    }

    fn http(&self) -> &HttpService {
        self.http.as_ref().expect("the service runs")
    }

    fn addr(&self) -> &str {
        self.http().addr()
    }

    fn url(&self) -> String {
        self.http().url()
    }

    fn charges(&self) -> BTreeMap<String, u32> {
        self.http().charges()
    }

    fn charges_for(&self, key: &str) -> u32 {
        self.http().charges_for(key)
    }

    /// What the store holds for `key`: the service is killed (the file is its alone while it
    /// runs), the file read, and the service started again on the same files.
    fn entry_across_a_restart(&mut self, key: &idemstore::Key) -> Option<idemstore::Entry> {
        if let Some(http) = self.http.take() {
            http.kill();
        }
        let store = Store::builder().reap_interval(None).open(&self.db).unwrap();
        let entry = store.get(key).unwrap();
        store.close().unwrap();
        self.run();
        entry
    }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build(),
    )
}

fn post(service: &Service, key: Option<&str>, body: &str) -> Reply {
    post_with(service, key, body, &[])
}

fn post_with(service: &Service, key: Option<&str>, body: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = agent()
        .post(format!("{}/payments", service.url()))
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let response = req.send(body).expect("the service answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .read_to_string()
        .expect("a readable body");
    Reply {
        status,
        headers,
        body,
    }
}

fn start(config: Config) -> Service {
    Service::start(config)
}

fn assert_problem(reply: &Reply, status: u16, type_fragment: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert!(
        reply.body.contains(&format!("\"status\":{status}")),
        "{}",
        reply.body
    );
    assert!(reply.body.contains(type_fragment), "{}", reply.body);
    assert!(reply.body.contains("\"title\":"), "{}", reply.body);
    assert!(reply.body.contains("\"detail\":"), "{}", reply.body);
}

const KEY: &str = "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"";
const KEY_ID: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

#[test]
fn first_request_creates_and_a_retry_replays_the_same_response() {
    let dir = tempfile::tempdir().unwrap();
    let service = start(Config {
        db: Some(dir.path().join("service.redb")),
        ..Config::default()
    });
    let first = post(&service, Some(KEY), r#"{"amount":1000}"#);
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.body.starts_with(r#"{"id":"pay_1""#), "{}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert!(first.header("set-cookie").is_some());

    let retry = post(&service, Some(KEY), r#"{"amount":1000}"#);
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.header("location"), first.header("location"));
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(retry.header("set-cookie"), None, "cookies are not replayed");

    // The bare form of the same key is the same key.
    let bare = post(&service, Some(KEY_ID), r#"{"amount":1000}"#);
    assert_eq!(bare.body, first.body);
    assert_eq!(service.charges_for(KEY_ID), 1);
}

#[test]
fn a_concurrent_duplicate_gets_409_with_retry_after_then_the_replay() {
    let service = start(Config {
        lease: Duration::from_secs(5),
        ..Config::default()
    });
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            post_with(
                &service,
                Some(KEY),
                r#"{"amount":5}"#,
                &[("x-demo-work-ms", "1500")],
            )
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while service.charges_for(KEY_ID) == 0 {
            assert!(Instant::now() < deadline, "the first request never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The first request holds the key (in flight): a duplicate is told so.
        let duplicate = post(&service, Some(KEY), r#"{"amount":5}"#);
        assert_problem(&duplicate, 409, "request-in-flight");
        let retry_after: u64 = duplicate
            .header("retry-after")
            .expect("409 carries Retry-After")
            .parse()
            .expect("whole seconds");
        assert!((1..=5).contains(&retry_after), "retry-after {retry_after}");

        let first = slow.join().unwrap();
        assert_eq!(first.status, 201);
        let after = post(&service, Some(KEY), r#"{"amount":5}"#);
        assert_eq!(after.status, 201);
        assert_eq!(after.body, first.body);
        assert_eq!(after.header("idempotent-replayed"), Some("true"));
    });
    assert_eq!(service.charges_for(KEY_ID), 1);
}

#[test]
fn a_duplicate_of_a_quick_request_is_told_to_wait_the_hint_not_the_whole_lease() {
    let retry_after = |config: Config| {
        let service = start(config);
        std::thread::scope(|s| {
            let slow =
                s.spawn(|| post_with(&service, Some(KEY), "{}", &[("x-demo-work-ms", "1500")]));
            let deadline = Instant::now() + Duration::from_secs(10);
            while service.charges_for(KEY_ID) == 0 {
                assert!(Instant::now() < deadline, "the first request never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            let duplicate = post(&service, Some(KEY), "{}");
            assert_problem(&duplicate, 409, "request-in-flight");
            assert_eq!(slow.join().unwrap().status, 201);
            duplicate.header("retry-after").map(str::to_owned)
        })
    };
    let lease = Duration::from_secs(30);
    assert_eq!(
        retry_after(Config {
            lease,
            ..Config::default()
        }),
        Some("1".to_owned()),
        "a 30 s lease, the default 1 s hint"
    );
    assert_eq!(
        retry_after(Config {
            lease,
            retry_after_hint: Duration::from_millis(2200),
            ..Config::default()
        }),
        Some("3".to_owned()),
        "a configured hint, rounded up"
    );
}

#[test]
fn the_same_key_with_another_body_is_422() {
    let service = start(Config::default());
    assert_eq!(post(&service, Some(KEY), r#"{"amount":1}"#).status, 201);
    let other = post(&service, Some(KEY), r#"{"amount":2}"#);
    assert_problem(&other, 422, "idempotency-key-reused");
    assert_eq!(other.header("idempotent-replayed"), None);
    assert_eq!(service.charges_for(KEY_ID), 1);
}

#[test]
fn a_missing_or_malformed_key_is_400_and_charges_nothing() {
    let service = start(Config::default());
    let missing = post(&service, None, r#"{"amount":1}"#);
    assert_problem(&missing, 400, "missing-idempotency-key");
    let unterminated = post(&service, Some("\"abc"), r#"{"amount":1}"#);
    assert_problem(&unterminated, 400, "malformed-idempotency-key");
    let too_long = format!("\"{}\"", "k".repeat(256));
    let long = post(&service, Some(&too_long), r#"{"amount":1}"#);
    assert_problem(&long, 400, "malformed-idempotency-key");
    assert!(long.body.contains("255"), "{}", long.body);
    assert!(service.charges().is_empty());
}

#[test]
fn after_the_ttl_the_same_key_runs_again() {
    let service = start(Config {
        ttl: Duration::from_millis(800),
        ..Config::default()
    });
    let first = post(&service, Some(KEY), r#"{"amount":7}"#);
    assert_eq!(first.status, 201);
    let replay = post(&service, Some(KEY), r#"{"amount":7}"#);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    std::thread::sleep(Duration::from_millis(1000));
    let again = post(&service, Some(KEY), r#"{"amount":7}"#);
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_ne!(again.body, first.body, "a new payment");
    assert_eq!(service.charges_for(KEY_ID), 2);
}

#[test]
fn a_burst_of_identical_requests_charges_once() {
    let service = start(Config::default());
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| post(&service, Some(KEY), r#"{"amount":3}"#)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let fresh = replies
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(fresh, 1, "exactly one request ran");
    for r in &replies {
        assert!(r.status == 201 || r.status == 409, "status {}", r.status);
    }
    assert_eq!(service.charges_for(KEY_ID), 1);
}

#[test]
fn unknown_routes_are_404_problems_and_charges_are_listed() {
    let service = start(Config::default());
    assert_eq!(post(&service, Some(KEY), "{}").status, 201);
    let response = agent()
        .get(format!("{}/charges", service.url()))
        .call()
        .unwrap();
    assert_eq!(
        response.into_body().read_to_string().unwrap(),
        format!("public/{KEY_ID} 1\n")
    );
    let missing = agent()
        .get(format!("{}/nope", service.url()))
        .call()
        .unwrap();
    assert_eq!(missing.status(), 404);
    drop(service);
}

#[test]
fn a_scope_the_store_refuses_is_a_500_that_says_nothing_of_the_scope() {
    let service = start(Config::default());
    let tenant = "t".repeat(300);
    let reply = post_with(
        &service,
        Some(KEY),
        r#"{"amount":1}"#,
        &[("x-tenant", &tenant)],
    );
    assert_problem(&reply, 500, "internal-server-error");
    for leak in ["scope", "300", "255", "malformed"] {
        assert!(!reply.body.contains(leak), "{leak:?} in {}", reply.body);
    }
    assert!(service.charges().is_empty());
}

// ---------------------------------------------------------------- raw bytes on the wire

/// Writes `bytes` to the service, then (if `half_close`) shuts the writing side, as a client
/// whose upload was cut short; reads whatever comes back until the server closes.
fn raw(service: &Service, bytes: &[u8], half_close: bool) -> Option<RawReply> {
    idemstore_testkit::http::raw(service.addr(), bytes, half_close).unwrap()
}

fn head_of(extra_headers: &str) -> String {
    format!(
        "POST /payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nIdempotency-Key: {KEY}\r\n{extra_headers}\r\n"
    )
}

fn assert_raw_problem(reply: &Option<RawReply>, status: u16) {
    let reply = reply
        .as_ref()
        .expect("an HTTP answer, not a dropped connection");
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(
        reply
            .head
            .contains("content-type: application/problem+json"),
        "{reply:?}"
    );
    assert!(
        reply.body.contains(&format!("\"status\":{status}")),
        "{reply:?}"
    );
}

/// After a refused attempt, nothing is begun: the full request runs, charged once.
fn assert_full_retry_runs_once(service: &mut Service, body: &str) {
    let key = idemstore::Key::new("public", KEY_ID).unwrap();
    assert!(service.charges().is_empty(), "nothing charged");
    assert_eq!(service.entry_across_a_restart(&key), None, "nothing begun");
    let full = post(service, Some(KEY), body);
    assert_eq!(full.status, 201, "{}", full.body);
    assert_eq!(full.header("idempotent-replayed"), None);
    assert_eq!(service.charges_for(KEY_ID), 1);
}

fn amount_body(len: usize) -> String {
    let pad = len - r#"{"amount":1,"memo":""}"#.len();
    format!(r#"{{"amount":1,"memo":"{}"}}"#, "m".repeat(pad))
}

#[test]
fn an_upload_cut_short_is_a_400_problem_and_the_full_retry_runs_once() {
    for (declared, sent) in [(2000, 1500), (3000, 1024), (500, 300)] {
        let mut service = start(Config::default());
        let body = amount_body(declared);
        let mut bytes = head_of(&format!("Content-Length: {declared}\r\n")).into_bytes();
        bytes.extend_from_slice(&body.as_bytes()[..sent]);
        let reply = raw(&service, &bytes, true);
        assert_raw_problem(&reply, 400);
        assert_full_retry_runs_once(&mut service, &body);
    }
}

#[test]
fn a_chunked_upload_cut_inside_a_chunk_is_a_400_problem_and_the_full_retry_runs_once() {
    let mut service = start(Config::default());
    let body = amount_body(3000);
    let mut bytes = head_of("Transfer-Encoding: chunked\r\n").into_bytes();
    bytes.extend_from_slice(format!("{:x}\r\n", 1000).as_bytes());
    bytes.extend_from_slice(&body.as_bytes()[..1000]);
    bytes.extend_from_slice(format!("\r\n{:x}\r\n", 2000).as_bytes());
    bytes.extend_from_slice(&body.as_bytes()[1000..1700]);
    let reply = raw(&service, &bytes, true);
    assert_raw_problem(&reply, 400);
    assert_full_retry_runs_once(&mut service, &body);
}

#[test]
fn a_whole_chunked_upload_runs() {
    let service = start(Config::default());
    let body = amount_body(3000);
    let mut bytes = head_of("Transfer-Encoding: chunked\r\n").into_bytes();
    for part in [&body[..1000], &body[1000..]] {
        bytes.extend_from_slice(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes());
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(&service, &bytes, false).expect("an answer");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(service.charges_for(KEY_ID), 1);
}

#[test]
fn a_byte_outside_ascii_in_a_header_value_is_a_400_problem() {
    for header in [
        b"X-Note: caf\xc3\xa9\r\n".as_slice(),
        b"User-Agent: \xff\r\n",
        b"X-Tenant: t\xe9nant\r\n",
    ] {
        let service = start(Config::default());
        let mut bytes = head_of("Content-Length: 12\r\n").into_bytes();
        // The odd header goes before the blank line.
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(b"\r\n{\"amount\":1}");
        let reply = raw(&service, &bytes, false);
        assert_raw_problem(&reply, 400);
        assert!(service.charges().is_empty());
    }
    // In the Idempotency-Key itself.
    let service = start(Config::default());
    let reply = raw(
        &service,
        b"POST /payments HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIdempotency-Key: \"k\xc3\xa9\"\r\n\
          Content-Length: 2\r\n\r\n{}",
        false,
    );
    assert_raw_problem(&reply, 400);
    assert!(service.charges().is_empty());
}

#[test]
fn a_byte_outside_ascii_in_a_header_name_gets_a_400_answer() {
    let service = start(Config::default());
    let reply = raw(
        &service,
        b"POST /payments HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-N\xc3\xa9: 1\r\n\
          Idempotency-Key: \"k\"\r\nContent-Length: 2\r\n\r\n{}",
        false,
    );
    let reply = reply.expect("an HTTP answer, not a dropped connection");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(service.charges().is_empty());
}

// ---------------------------------------------------------------- kill -9 and a restart

const CHILD_LEASE: Duration = Duration::from_millis(1500);

/// The service on `store` and `ledger`, with a short lease, in a child process.
fn child(store: &std::path::Path, ledger: &std::path::Path) -> HttpService {
    HttpService::start([
        "--lease-ms".into(),
        CHILD_LEASE.as_millis().to_string(),
        "--db".into(),
        store.display().to_string(),
        "--ledger".into(),
        ledger.display().to_string(),
    ])
}

fn ledger_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kill_9_mid_request_and_a_restart_on_the_same_file_charge_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger) = (dir.path().join("service.redb"), dir.path().join("ledger"));
    let body = r#"{"amount":4200}"#;
    let send = |url: &str| {
        agent()
            .post(format!("{url}/payments"))
            .header("content-type", "application/json")
            .header("idempotency-key", KEY)
            .header("x-demo-work-ms", "3000")
            .send(body)
    };

    let first = child(&store, &ledger);
    std::thread::scope(|s| {
        let url = first.url();
        let in_flight = s.spawn(move || send(&url));
        // Mid-request: charged, its response not yet stored.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ledger_lines(&ledger).is_empty() {
            assert!(Instant::now() < deadline, "the first attempt never charged");
            std::thread::sleep(Duration::from_millis(5));
        }
        first.kill();
        assert!(
            in_flight.join().unwrap().is_err(),
            "the client got no answer"
        );
    });
    assert_eq!(ledger_lines(&ledger).len(), 1);

    // The same store and ledger; the client retries with the same key until it gets a
    // final answer (409s until the dead process's lease runs out, then a takeover).
    let second = child(&store, &ledger);
    let policy = idemstore::client::RetryPolicy::new()
        .base(Duration::from_millis(100))
        .max_elapsed(Some(Duration::from_secs(30)));
    let outcome = policy.run(KEY, |_| match send(&second.url()) {
        Ok(response) => idemstore::client::Sent::from_http(response),
        Err(e) => idemstore::client::Sent::ConnectionFailed(e.to_string()),
    });
    let idemstore::client::RetryOutcome::Succeeded {
        status: 201, value, ..
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    let answer = value.into_body().read_to_string().unwrap();
    let charges = ledger_lines(&ledger);
    assert_eq!(charges.len(), 1, "charged once: {charges:?}");
    let reference = charges[0].split(' ').next().unwrap();
    assert!(
        answer.contains(&format!("\"id\":\"{reference}\"")),
        "the answer names the one charge {reference}: {answer}"
    );
    drop(second);
}

#[test]
fn a_takeover_after_the_intent_checkpoint_charges_under_the_same_reference_once() {
    // As after a crash between the charge and its "charged" checkpoint: the processor booked
    // pay_9, the lease holds "intent pay_9" and was left behind.
    let dir = tempfile::tempdir().unwrap();
    let (db, ledger) = (dir.path().join("service.redb"), dir.path().join("ledger"));
    std::fs::write(&ledger, format!("pay_9 public/{KEY_ID}\n")).unwrap();
    let config = Config {
        db: Some(db.clone()),
        ledger: Some(ledger.clone()),
        ..Config::default()
    };
    let body = r#"{"amount":9}"#;
    let request = http::Request::post("/payments")
        .header("content-type", "application/json")
        .body(body.as_bytes().to_vec())
        .unwrap();
    let fp = idemstore::http::request_fingerprint(&request, &[http::header::CONTENT_TYPE]);
    let key = idemstore::Key::new("public", KEY_ID).unwrap();
    // The service's store, with its settings, before the service starts on it.
    let store = Store::builder()
        .ttl(config.ttl)
        .lease(config.lease)
        .open(&db)
        .unwrap();
    let idemstore::Begin::Started(mut lease) = store.begin(&key, &fp).unwrap() else {
        panic!("a new key");
    };
    lease.checkpoint(b"intent pay_9").unwrap();
    drop(lease); // released: the next attempt takes over at once
    store.close().unwrap();
    let service = start(config);

    let reply = post(&service, Some(KEY), body);
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert!(reply.body.starts_with(r#"{"id":"pay_9""#), "{}", reply.body);
    assert_eq!(service.charges_for(KEY_ID), 1, "booked once");
    assert_eq!(ledger_lines(&ledger).len(), 1);
}
