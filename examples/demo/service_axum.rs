//! The service on axum (`--server axum`): `POST /payments` behind
//! `idemstore::tower::IdempotencyLayer`, on either backend.
//!
//! The layer holds the lease, keeps it alive while the handler runs, runs the handler to its
//! end when the client goes away, and stores its response. The handler never sees the
//! lease, so it cannot checkpoint: it gives the payment processor the idempotency key as the
//! charge reference, and a handler re-run by a takeover after a crash (the one case where
//! the layer runs it twice) books nothing twice.

use std::error::Error;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use idemstore::Store;
use idemstore::tower::IdempotencyLayer;
use tokio::net::TcpListener;

use crate::server::{Books, event, payment_of, receipt, tenant};

/// Serves `POST /payments` on `listener` until the process is killed.
pub(crate) async fn serve(
    listener: TcpListener,
    store: Store,
    books: Books,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let layer = IdempotencyLayer::new(store)
        .scope(|parts: &Parts| tenant(&parts.headers))
        .fingerprint_headers(["content-type"])
        .max_body_bytes(64 << 10);
    let app = Router::new()
        .route("/payments", post(create_payment))
        .route_layer(layer)
        .with_state(books);
    axum::serve(listener, app).await?;
    Ok(())
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// Runs once per key (again only when a takeover follows a crash): charges, works a little
/// (slower or stalled when the demo's headers ask), answers 201.
async fn create_payment(State(books): State<Books>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((payment, amount)) = payment_of(&body) else {
        return (StatusCode::BAD_REQUEST, "need payment and amount").into_response();
    };
    // The layer refused the request unless it carries one well-formed key.
    let Ok(key) = idemstore::http::idempotency_key(&headers) else {
        return (StatusCode::BAD_REQUEST, "need an Idempotency-Key").into_response();
    };
    event(format!("RUN {payment}"));
    let reference = format!("ch_{}_{key}", tenant(&headers));
    let charge = {
        let (reference, payment) = (reference.clone(), payment.clone());
        tokio::task::spawn_blocking(move || books.charge_once(&reference, &payment, amount)).await
    };
    match charge {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => event(format!("DEDUPED {reference}")),
        Ok(Err(e)) => {
            // Unknown whether it was booked: the 503 is stored (the layer never re-runs a
            // handler that answered); the client's retry gets it replayed, and its outbox
            // keeps the payment pending. The verdict reports it.
            event(format!("ERROR ledger: {e}"));
            return (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable").into_response();
        }
        Err(e) => {
            event(format!("ERROR ledger task: {e}"));
            return (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable").into_response();
        }
    }
    let number: u64 = payment.trim_start_matches("pay-").parse().unwrap_or(0);
    let work = 3 + number % 12 + header_ms(&headers, "x-demo-slow-ms").unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(work)).await;
    if let Some(stall) = header_ms(&headers, "x-demo-stall-ms") {
        tokio::time::sleep(Duration::from_millis(stall.min(10_000))).await;
    }
    receipt(&payment, &reference, amount).map(axum::body::Body::from)
}
