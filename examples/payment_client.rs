//! A payment client that charges each payment exactly once, through lost responses,
//! timeouts, connection failures and a restart, against the example service.
//!
//! ```text
//! cargo build --example http_service && cargo run --example payment_client
//! ```
//!
//! It starts the `http_service` example (`examples/http_service.rs`, built beside this one)
//! as a child process on a free port, counts the charges server-side with its
//! `GET /charges`, and sends six payments with [`Outbox`] + [`RetryPolicy`], with
//! failures injected on the client side:
//!
//! | payment | injected failure | what saves it |
//! |---|---|---|
//! | order-1 | none | |
//! | order-2 | the first response is lost (sent, processed, dropped) | the retry carries the same key: replay |
//! | order-3 | the first attempt times out while the server still works on it | the retry gets 409 + `Retry-After`, waits, then the replay |
//! | order-4 | the first connection fails before sending | an ordinary retry |
//! | order-5 | sent, response lost, then the client "crashes" | after the restart, `Outbox::pending` resumes it with its key: replay |
//! | order-6 | recorded, then the crash, before it was ever sent | resumed after the restart: its first real send |
//!
//! Then it checks the server's ledger: each payment charged once. It exits non-zero if not.
//! For contrast it also shows two client mistakes: a new key per retry (charged twice), and
//! reusing a key for another payment (422, detected, not retried).

use std::process::ExitCode;
use std::time::Duration;

use http::Request;
use idemstore::client::{Outbox, RetryOutcome, RetryPolicy, Sent, new_key};
use idemstore::http::{format_idempotency_key, request_fingerprint};
use idemstore_testkit::programs::HttpService;

/// What goes wrong on one attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// The request reaches the server, the response is lost on the way back.
    DropResponse,
    /// The server is slow (800 ms of work) and the client's 300 ms timeout fires.
    Timeout,
    /// The connection fails before anything is sent.
    ConnectionRefused,
}

struct Client {
    agent: ureq::Agent,
    url: String,
    policy: RetryPolicy,
}

impl Client {
    fn request(&self, body: &str) -> Request<Vec<u8>> {
        Request::post("/payments")
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .expect("a valid request")
    }

    /// One attempt, with `fault` injected. The value is `(status, body, replayed)`.
    fn attempt(&self, key: &str, body: &str, fault: Fault) -> Sent<(u16, String, bool)> {
        if fault == Fault::ConnectionRefused {
            return Sent::ConnectionFailed("injected: connection refused".into());
        }
        let Ok(header) = format_idempotency_key(key) else {
            return Sent::ConnectionFailed(format!("invalid key {key:?}"));
        };
        let mut req = self
            .agent
            .post(format!("{}/payments", self.url))
            .header("content-type", "application/json")
            .header("idempotency-key", header.to_str().unwrap_or_default());
        if fault == Fault::Timeout {
            req = req.header("x-demo-work-ms", "800");
        }
        match req.send(body) {
            Ok(response) => {
                if fault == Fault::DropResponse {
                    return Sent::Timeout;
                }
                match Sent::from_http(response) {
                    Sent::Response {
                        status,
                        retry_after,
                        replayed,
                        value,
                    } => {
                        let text = value.into_body().read_to_string().unwrap_or_default();
                        Sent::response(status, (status, text, replayed))
                            .retry_after(retry_after)
                            .replayed(replayed)
                    }
                    Sent::Timeout => Sent::Timeout,
                    Sent::ConnectionFailed(e) => Sent::ConnectionFailed(e),
                }
            }
            Err(ureq::Error::Timeout(_)) => Sent::Timeout,
            Err(e) => Sent::ConnectionFailed(e.to_string()),
        }
    }

    /// Sends with retries, the same key on every attempt, and logs each attempt.
    fn send(
        &self,
        label: &str,
        key: &str,
        body: &str,
        faults: &[Fault],
    ) -> RetryOutcome<(u16, String, bool)> {
        self.policy.run(key, |attempt| {
            let fault = faults
                .get(attempt.number() as usize - 1)
                .copied()
                .unwrap_or(Fault::None);
            let sent = self.attempt(attempt.key(), body, fault);
            let what = match &sent {
                Sent::Response {
                    status,
                    retry_after,
                    replayed,
                    ..
                } => format!(
                    "HTTP {status}{}{}",
                    if *replayed { " (replayed)" } else { "" },
                    retry_after
                        .map_or(String::new(), |d| format!(", Retry-After {}s", d.as_secs()))
                ),
                Sent::Timeout => "no response (timeout)".into(),
                Sent::ConnectionFailed(e) => format!("connection failed: {e}"),
            };
            let injected = if fault == Fault::None {
                String::new()
            } else {
                format!("  [injected: {fault:?}]")
            };
            println!(
                "  {label} attempt {} key {}…: {what}{injected}",
                attempt.number(),
                &attempt.key()[..8]
            );
            sent
        })
    }
}

fn body_of(order: &str, amount: u32) -> String {
    serde_json::json!({ "order": order, "amount": amount }).to_string()
}

/// Sends one recorded operation and finishes it on a final answer.
fn run_operation(
    client: &Client,
    outbox: &Outbox,
    order: &str,
    key: &str,
    body: &str,
    faults: &[Fault],
) -> Result<(), Box<dyn std::error::Error>> {
    let outcome = client.send(order, key, body, faults);
    if outcome.is_final() {
        outbox.finish(order)?;
    }
    match outcome {
        RetryOutcome::Succeeded { attempts, .. } => {
            println!("  {order}: succeeded after {attempts} attempt(s)")
        }
        other => println!("  {order}: stopped: {other:?}"),
    }
    Ok(())
}

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    Ok(if run()? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The whole demonstration; `Ok(true)` when every payment was charged exactly once.
fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!(
        "idemstore-payment-client-{}-{}",
        std::process::id(),
        new_key()
    ));
    std::fs::create_dir_all(&dir)?;
    let service = HttpService::start([
        "--lease-ms".into(),
        "2000".into(),
        "--db".into(),
        dir.join("service.redb").into_os_string(),
    ]);
    let outbox_path = dir.join("outbox.redb");
    let _ = std::fs::remove_file(&outbox_path);

    let client = Client {
        agent: ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_millis(300)))
                .build(),
        ),
        url: service.url(),
        policy: RetryPolicy::new()
            .base(Duration::from_millis(50))
            .cap(Duration::from_secs(1))
            .max_attempts(6)
            .max_elapsed(Some(Duration::from_secs(8))),
    };
    println!(
        "service on {}, outbox at {}\n",
        service.url(),
        outbox_path.display()
    );

    let orders: Vec<(String, u32)> = (1..=6).map(|i| (format!("order-{i}"), 100 * i)).collect();
    let faults: [&[Fault]; 4] = [
        &[],
        &[Fault::DropResponse],
        &[Fault::Timeout],
        &[Fault::ConnectionRefused],
    ];

    // Phase 1: orders 1-4, each recorded durably before its first send.
    let outbox = Outbox::open(&outbox_path)?;
    for ((order, amount), faults) in orders.iter().zip(faults) {
        let body = body_of(order, *amount);
        let fp = request_fingerprint(&client.request(&body), &[]);
        let op = outbox.record(order, &fp)?;
        run_operation(&client, &outbox, order, op.key(), &body, faults)?;
    }

    // Phase 2: order-5 is sent but its response is lost; order-6 is recorded but never
    // sent. Then the client process "crashes": all in-memory state is gone.
    for (order, amount) in &orders[4..] {
        let body = body_of(order, *amount);
        let fp = request_fingerprint(&client.request(&body), &[]);
        let op = outbox.record(order, &fp)?;
        if order == "order-5" {
            let sent = client.attempt(op.key(), &body, Fault::DropResponse);
            println!(
                "  order-5 attempt 1 key {}…: {sent:?}  [injected: DropResponse]",
                &op.key()[..8]
            );
        }
    }
    println!("  -- client crashes (outbox dropped, keys only on disk) --");
    drop(outbox);

    // Phase 3: the restarted client resumes what is pending, with the recorded keys.
    let outbox = Outbox::open(&outbox_path)?;
    let pending = outbox.pending()?;
    println!(
        "  -- restarted: {} pending: {} --",
        pending.len(),
        pending
            .iter()
            .map(|p| p.operation())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for op in pending {
        let amount = orders
            .iter()
            .find(|(o, _)| o == op.operation())
            .map_or(0, |(_, a)| *a);
        let body = body_of(op.operation(), amount);
        run_operation(&client, &outbox, op.operation(), op.key(), &body, &[])?;
    }
    let still_pending = outbox.pending()?.len();

    // The verdict, from the server's ledger.
    println!("\ncharges per payment (server side):");
    let charges = service.charges();
    let mut ok = still_pending == 0;
    for (order, _) in &orders {
        let key = outbox
            .get(order)?
            .map(|e| e.key().to_owned())
            .unwrap_or_default();
        let n = charges.get(&format!("public/{key}")).copied().unwrap_or(0);
        let verdict = if n == 1 { "ok" } else { "WRONG" };
        println!("  {order}: charged {n} time(s)  {verdict}");
        ok &= n == 1;
    }
    ok &= charges.values().sum::<u32>() == orders.len() as u32;

    // Two mistakes, for contrast (not part of the verdict).
    println!("\nfor contrast, two client mistakes:");
    let body = body_of("order-7", 700);
    let naive_keys = [new_key(), new_key()];
    let _ = client.attempt(&naive_keys[0], &body, Fault::DropResponse);
    let _ = client.attempt(&naive_keys[1], &body, Fault::None);
    let naive: u32 = naive_keys.iter().map(|k| service.charges_for(k)).sum();
    println!(
        "  a new key per retry: order-7 charged {naive} times (the outbox keeps one key per operation)"
    );
    let reused = outbox
        .get("order-1")?
        .map(|e| e.key().to_owned())
        .unwrap_or_default();
    let outcome = client.send("misuse", &reused, &body_of("order-8", 800), &[]);
    println!(
        "  order-1's key reused for order-8: {} after {} attempt(s), nothing charged",
        match outcome {
            RetryOutcome::Mismatch { .. } => "422 Mismatch, stopped",
            _ => "UNEXPECTED",
        },
        outcome.attempts()
    );
    ok &= matches!(outcome, RetryOutcome::Mismatch { .. }) && service.charges_for(&reused) == 1;

    service.kill();
    let _ = std::fs::remove_dir_all(&dir);
    if ok {
        println!("\nVERDICT: every payment charged exactly once");
    } else {
        println!("\nVERDICT: VIOLATED: a payment was charged more or less than once");
    }
    Ok(ok)
}
