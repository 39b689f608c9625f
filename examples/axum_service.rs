//! A payments service on axum: `POST /payments` charges once per `Idempotency-Key`, whatever
//! the retries, the duplicates racing it, or a client hanging up mid-charge.
//!
//! ```sh
//! cargo run --example axum_service --features tower -- payments.redb 127.0.0.1:3000
//! curl -i localhost:3000/payments -H 'Idempotency-Key: "k-1"' -H 'x-tenant: acme' \
//!      -H 'content-type: application/json' -d '{"amount":1000}'   # 201, charged
//! # the same command again: the same 201, with Idempotent-Replayed: true, nothing charged
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use http::StatusCode;
use http::request::Parts;
use idemstore::Store;
use idemstore::tower::IdempotencyLayer;

/// The card network: counts charges.
#[derive(Clone, Default)]
struct Payments {
    charged: Arc<AtomicU64>,
}

/// Runs once per key: the layer stores its answer and replays it to every retry.
async fn create_payment(State(payments): State<Payments>, body: String) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_millis(200)).await; // the card network
    let n = payments.charged.fetch_add(1, Ordering::SeqCst) + 1;
    let reply = format!("{{\"payment\":\"pay_{n}\",\"request\":{body}}}");
    (StatusCode::CREATED, reply)
}

async fn charges(State(payments): State<Payments>) -> String {
    format!("{} charge(s)\n", payments.charged.load(Ordering::SeqCst))
}

/// The key's scope: the caller (here a header; in a real service, the authenticated user).
fn tenant(parts: &Parts) -> String {
    let tenant = parts.headers.get("x-tenant").and_then(|v| v.to_str().ok());
    tenant.unwrap_or("anonymous").to_owned()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "payments.redb".into());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());

    let store = Store::open(&path)?;
    let idempotent = IdempotencyLayer::new(store)
        .scope(tenant)
        .fingerprint_headers(["content-type"])
        .max_body_bytes(64 << 10)
        .wait_in_flight(Duration::from_secs(5)); // duplicates wait for the first, then replay
    let app = Router::new()
        .route("/payments", post(create_payment))
        .route_layer(idempotent) // only the routes above need a key
        .route("/charges", get(charges))
        .with_state(Payments::default());

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("payments service on http://{addr}, keys in {path}");
    axum::serve(listener, app).await?;
    Ok(())
}
