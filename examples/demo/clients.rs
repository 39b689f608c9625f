//! The clients: threads sending payments with an outbox and retries, through a network and
//! a world that misbehave on purpose.

use std::collections::{BTreeSet, HashMap};
use std::error::Error;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

use idemstore::Fingerprint;
use idemstore::client::{Outbox, RetryOutcome, RetryPolicy, Sent};
use idemstore::http::format_idempotency_key;
use idemstore_testkit::rng::{RngExt, TestRng, rng};
use indicatif::ProgressBar;

use crate::{BURST, CLIENT_TIMEOUT, DISCONNECT_AFTER, DISCONNECT_SLOW_MS, SLOW_MS, STALL_MS};

/// Client-side counts.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) attempts: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) bursts: AtomicU64,
    pub(crate) burst_copies: AtomicU64,
    pub(crate) executed: AtomicU64,
    pub(crate) replays: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) mismatches: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) misuses: AtomicU64,
    pub(crate) client_crashes: AtomicU64,
    pub(crate) resumed: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) disconnects: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, SeqCst);
}

/// State shared by the client threads and the orchestrator.
pub(crate) struct World {
    /// The replicas' `http://` addresses; each request goes to the next one in turn.
    pub(crate) urls: RwLock<Vec<String>>,
    /// The turn.
    pub(crate) next: AtomicUsize,
    /// Whether some attempts disconnect while the handler runs (the axum service).
    pub(crate) disconnect_mid_handler: bool,
    pub(crate) counts: Counts,
    /// Payments with a final answer.
    pub(crate) done: AtomicU64,
    /// Requests on the wire right now.
    pub(crate) on_wire: AtomicI64,
    /// When the last request asking the server to stall was sent.
    pub(crate) last_stall: Mutex<Option<Instant>>,
    /// Charge references seen in 2xx answers, per payment.
    pub(crate) references: Mutex<HashMap<String, BTreeSet<String>>>,
    /// 2xx answers that executed the payment (not replays), per payment.
    pub(crate) fresh: Mutex<HashMap<String, u32>>,
    pub(crate) problems: Arc<Mutex<Vec<String>>>,
    pub(crate) progress: ProgressBar,
    pub(crate) seed: u64,
}

impl World {
    /// The replica the next request goes to (round-robin).
    pub(crate) fn url(&self) -> String {
        let urls = self.urls.read().unwrap_or_else(|e| e.into_inner());
        urls[self.next.fetch_add(1, SeqCst) % urls.len()].clone()
    }

    pub(crate) fn problem(&self, p: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }
}

/// What came back for one request.
pub(crate) enum Answer {
    Http {
        status: u16,
        replayed: bool,
        retry_after: Option<Duration>,
        body: String,
    },
    Timeout,
    Refused(String),
}

/// Per-request demo switches.
#[derive(Clone, Copy, Default)]
pub(crate) struct Extra {
    pub(crate) slow: bool,
    pub(crate) stall: bool,
}

/// One HTTP request. Every answer that arrives is counted, whether or not the client
/// later "loses" it.
pub(crate) fn send_once(
    world: &World,
    agent: &ureq::Agent,
    scope: &str,
    key: &str,
    body: &str,
    extra: Extra,
) -> Answer {
    bump(&world.counts.attempts);
    let url = world.url();
    let Ok(header) = format_idempotency_key(key) else {
        return Answer::Refused(format!("invalid key {key:?}"));
    };
    let mut req = agent
        .post(format!("{url}/payments"))
        .header("content-type", "application/json")
        .header("x-tenant", scope)
        .header("idempotency-key", header.to_str().unwrap_or_default());
    if extra.slow {
        req = req.header("x-demo-slow-ms", SLOW_MS.to_string());
    }
    if extra.stall {
        req = req.header("x-demo-stall-ms", STALL_MS.to_string());
        *world.last_stall.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    world.on_wire.fetch_add(1, SeqCst);
    let result = req.send(body);
    world.on_wire.fetch_sub(1, SeqCst);
    let answer = match result {
        Ok(response) => match Sent::from_http(response) {
            Sent::Response {
                status,
                retry_after,
                replayed,
                value,
            } => {
                let body = value.into_body().read_to_string().unwrap_or_default();
                Answer::Http {
                    status,
                    replayed,
                    retry_after,
                    body,
                }
            }
            Sent::Timeout => Answer::Timeout,
            Sent::ConnectionFailed(e) => Answer::Refused(e),
        },
        Err(ureq::Error::Timeout(_)) => Answer::Timeout,
        Err(e) => Answer::Refused(e.to_string()),
    };
    let c = &world.counts;
    match &answer {
        Answer::Http {
            status,
            replayed,
            body,
            ..
        } => match status {
            200..=299 => {
                let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                let payment = json["payment"].as_str().unwrap_or("?").to_owned();
                let reference = json["charge"].as_str().unwrap_or("?").to_owned();
                if *replayed {
                    bump(&c.replays);
                } else {
                    bump(&c.executed);
                    *world
                        .fresh
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(payment.clone())
                        .or_default() += 1;
                }
                world
                    .references
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(payment)
                    .or_default()
                    .insert(reference);
            }
            409 => bump(&c.conflicts),
            422 => bump(&c.mismatches),
            500..=599 => bump(&c.server_errors),
            _ => bump(&c.other),
        },
        Answer::Timeout => bump(&c.timeouts),
        Answer::Refused(_) => bump(&c.refused),
    }
    answer
}

/// A client that goes away mid-handler: sends the request (asking for a slower handler),
/// waits a little, and closes the socket before the answer comes. It never learns the
/// outcome.
pub(crate) fn disconnect_mid_handler(
    world: &World,
    scope: &str,
    key: &str,
    body: &str,
) -> Sent<String> {
    bump(&world.counts.attempts);
    bump(&world.counts.disconnects);
    let url = world.url();
    let addr = url.trim_start_matches("http://");
    let Ok(header) = format_idempotency_key(key) else {
        return Sent::ConnectionFailed(format!("invalid key {key:?}"));
    };
    let request = format!(
        "POST /payments HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         X-Tenant: {scope}\r\nIdempotency-Key: {}\r\nX-Demo-Slow-Ms: {DISCONNECT_SLOW_MS}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        header.to_str().unwrap_or_default(),
        body.len()
    );
    match std::net::TcpStream::connect(addr) {
        Ok(mut stream) => {
            if stream.write_all(request.as_bytes()).is_err() {
                bump(&world.counts.refused);
                return Sent::ConnectionFailed("the connection broke while sending".into());
            }
            world.on_wire.fetch_add(1, SeqCst);
            std::thread::sleep(DISCONNECT_AFTER);
            world.on_wire.fetch_sub(1, SeqCst);
            // Closed with the request running: no answer will be read.
            drop(stream);
            Sent::Timeout
        }
        Err(e) => {
            bump(&world.counts.refused);
            Sent::ConnectionFailed(e.to_string())
        }
    }
}

pub(crate) fn to_sent(answer: Answer) -> Sent<String> {
    match answer {
        Answer::Http {
            status,
            retry_after,
            replayed,
            body,
        } => Sent::response(status, body)
            .retry_after(retry_after)
            .replayed(replayed),
        Answer::Timeout => Sent::Timeout,
        Answer::Refused(e) => Sent::ConnectionFailed(e),
    }
}

pub(crate) fn body_of(payment: &str, amount: u64) -> String {
    serde_json::json!({ "payment": payment, "amount": amount }).to_string()
}

pub(crate) fn policy(seed: u64) -> RetryPolicy {
    RetryPolicy::new()
        .base(Duration::from_millis(25))
        .cap(Duration::from_millis(800))
        .max_attempts(12)
        .max_elapsed(Some(Duration::from_secs(8)))
        .jitter_seed(seed)
}

/// Sends one payment with retries, injecting per-attempt failures. `first` applies to the
/// first attempt only (slow or stalled server).
pub(crate) fn send_with_retries(
    world: &World,
    agent: &ureq::Agent,
    rng: &mut TestRng,
    scope: &str,
    key: &str,
    body: &str,
    first: Extra,
) -> RetryOutcome<String> {
    let seed = rng.random::<u64>();
    policy(seed).run(key, |attempt| {
        let extra = if attempt.number() == 1 {
            first
        } else {
            Extra {
                slow: rng.random_range(0..100) < 2,
                stall: false,
            }
        };
        // The connection is refused before anything is sent.
        // (Not on a stalled attempt: the stall must reach the server, alone.)
        if !extra.stall && rng.random_range(0..100) < 3 {
            bump(&world.counts.attempts);
            bump(&world.counts.refused);
            return Sent::ConnectionFailed("injected: connection refused".into());
        }
        if world.disconnect_mid_handler && !extra.stall && rng.random_range(0..100) < 8 {
            return disconnect_mid_handler(world, scope, attempt.key(), body);
        }
        let drop_response = rng.random_range(0..100) < 12;
        let answer = if !extra.stall && rng.random_range(0..100) < 6 {
            // Duplicate delivery: the network delivers a second copy at the same time.
            bump(&world.counts.duplicates);
            std::thread::scope(|s| {
                let copy = s.spawn(|| {
                    send_once(world, agent, scope, attempt.key(), body, Extra::default())
                });
                let answer = send_once(world, agent, scope, attempt.key(), body, extra);
                let _ = copy.join();
                answer
            })
        } else {
            send_once(world, agent, scope, attempt.key(), body, extra)
        };
        if drop_response && matches!(answer, Answer::Http { .. }) {
            // Processed by the server, lost on the way back.
            bump(&world.counts.lost);
            return Sent::Timeout;
        }
        to_sent(answer)
    })
}

/// Records a final outcome; `true` when the payment succeeded.
pub(crate) fn settle(
    world: &World,
    outbox: &Outbox,
    payment: &str,
    outcome: &RetryOutcome<String>,
) -> bool {
    match outcome {
        RetryOutcome::Succeeded { .. } => {
            if let Err(e) = outbox.finish(payment) {
                world.problem(format!("{payment}: outbox finish failed: {e}"));
            }
            world.done.fetch_add(1, SeqCst);
            world.progress.inc(1);
            true
        }
        RetryOutcome::GaveUp { .. } => {
            // Unknown outcome: keep it pending, resume later with the same key.
            bump(&world.counts.gave_up);
            false
        }
        other => {
            world.problem(format!("{payment}: unexpected final answer {other:?}"));
            if let Err(e) = outbox.finish(payment) {
                world.problem(format!("{payment}: outbox finish failed: {e}"));
            }
            world.done.fetch_add(1, SeqCst);
            world.progress.inc(1);
            true
        }
    }
}

pub(crate) fn amount_of(index: usize, seed: u64) -> u64 {
    100 + rng(seed ^ index as u64).random::<u64>() % 9900
}

/// One client: its payments are `index, index + clients, ...`.
pub(crate) fn client(
    world: &World,
    dir: &Path,
    index: usize,
    clients: usize,
    payments: usize,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let scope = format!("client-{index:02}");
    let outbox_path = dir.join(format!("{scope}.outbox.redb"));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CLIENT_TIMEOUT))
            .build(),
    );
    let mut rng = rng(world.seed.wrapping_mul(1000).wrapping_add(index as u64));
    let outbox = Outbox::open(&outbox_path)?;
    let shift = (world.seed % 97) as usize;
    for j in (index..payments).step_by(clients) {
        let payment = format!("pay-{j:06}");
        let amount = amount_of(j, world.seed);
        let body = body_of(&payment, amount);
        // Persist the key before the first byte is sent.
        let op = outbox.record(&payment, &Fingerprint::of(&body))?;
        let key = op.key().to_owned();
        let n = j + shift;
        if n % 40 == 7 {
            // A burst: several copies of the same request at the same instant.
            bump(&world.counts.bursts);
            let barrier = Barrier::new(BURST);
            std::thread::scope(|s| {
                for _ in 0..BURST {
                    s.spawn(|| {
                        barrier.wait();
                        bump(&world.counts.burst_copies);
                        send_once(world, &agent, &scope, &key, &body, Extra::default());
                    });
                }
            });
        }
        if n % 45 == 5 {
            // The client sends once, the answer is lost, and the client process "crashes":
            // only its outbox remembers the payment. Resumed after the "restart" below.
            bump(&world.counts.client_crashes);
            let _ = send_once(world, &agent, &scope, &key, &body, Extra::default());
            bump(&world.counts.lost);
            continue;
        }
        let first = Extra {
            slow: rng.random_range(0..100) < 4,
            stall: n % 100 == 11,
        };
        let outcome = send_with_retries(world, &agent, &mut rng, &scope, &key, &body, first);
        let succeeded = settle(world, &outbox, &payment, &outcome);
        if succeeded && n % 50 == 3 {
            // A buggy client reuses the key for another amount: 422, never retried, nothing charged.
            let wrong = body_of(&payment, amount + 1);
            let misuse = policy(rng.random::<u64>()).run(&key, |_| {
                to_sent(send_once(
                    world,
                    &agent,
                    &scope,
                    &key,
                    &wrong,
                    Extra::default(),
                ))
            });
            bump(&world.counts.misuses);
            if !matches!(misuse, RetryOutcome::Mismatch { .. }) {
                world.problem(format!(
                    "{payment}: key reuse answered {misuse:?}, expected a 422 (and no retry after it)"
                ));
            }
        }
    }
    // The client restarts: everything in memory is gone, the outbox file remains. Resume
    // every pending payment with the key it was first sent with.
    drop(outbox);
    for _round in 0..6 {
        let outbox = Outbox::open(&outbox_path)?;
        let pending = outbox.pending()?;
        if pending.is_empty() {
            return Ok(());
        }
        for op in pending {
            bump(&world.counts.resumed);
            let j: usize = op.operation().trim_start_matches("pay-").parse()?;
            let body = body_of(op.operation(), amount_of(j, world.seed));
            let outcome = send_with_retries(
                world,
                &agent,
                &mut rng,
                &scope,
                op.key(),
                &body,
                Extra::default(),
            );
            settle(world, &outbox, op.operation(), &outcome);
        }
    }
    let left = Outbox::open(&outbox_path)?.pending()?.len();
    if left > 0 {
        world.problem(format!(
            "{scope}: {left} payment(s) still pending after 6 resume rounds"
        ));
    }
    Ok(())
}
