//! Requests per second over loopback HTTP, a new `Idempotency-Key` per request, at 1, 16 and
//! 64 connections, in one run:
//!
//! * `layer`: axum with [`IdempotencyLayer`] on a durable store;
//! * `glue`: the same handler calling the store by hand, `spawn_blocking` around `begin` and
//!   `complete` (what a careful user writes without the layer);
//! * `none`: the handler without idempotency (the ceiling of the HTTP stack);
//! * `store`: the library alone, as many threads as connections each running begin +
//!   complete (no HTTP), for the layer's share of the library's cycle rate.
//!
//! ```sh
//! cargo run --release --example compare_http --features tower               # 5 rounds of 3 s
//! cargo run --release --example compare_http --features tower -- --smoke    # a few seconds
//! cargo run --release --example compare_http --features tower -- --rounds 3 --seconds 5 --connections 1,64
//! ```
//!
//! Each cell is the median of its rounds; rows of a round run one after the other, each on a
//! fresh store file in a temporary directory. The server and the load run in this process, on
//! separate tokio runtimes (the server's with the default worker count).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use idemstore::http::{
    StoredResponse, error_response, idempotency_key, in_flight, mismatch, replay,
};
use idemstore::tower::IdempotencyLayer;
use idemstore::{Begin, Fingerprint, Key, Store};

struct Args {
    seconds: f64,
    rounds: usize,
    connections: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        rounds: 5,
        connections: vec![1, 16, 64],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => {
                a.seconds = 0.4;
                a.rounds = 1;
                a.connections = vec![1, 16];
            }
            "--seconds" => {
                a.seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s: &f64| *s > 0.0)
                    .expect("--seconds needs a number above 0");
            }
            "--rounds" => {
                a.rounds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|r| *r > 0)
                    .expect("--rounds needs a number above 0");
            }
            "--connections" => {
                a.connections = it
                    .next()
                    .map(|s| s.split(',').map(|c| c.parse().expect("a number")).collect())
                    .filter(|c: &Vec<usize>| !c.is_empty() && c.iter().all(|&n| n > 0))
                    .expect("--connections needs a list like 1,16,64");
            }
            "-h" | "--help" => {
                println!(
                    "usage: compare_http [--smoke] [--seconds S] [--rounds R] [--connections 1,16,64]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; try --help"),
        }
    }
    a
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Layer,
    Glue,
    None,
    Store,
}

const ROWS: [Row; 4] = [Row::Layer, Row::Glue, Row::None, Row::Store];

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Layer => "axum + IdempotencyLayer",
            Row::Glue => "axum + hand-written spawn_blocking glue",
            Row::None => "axum, no idempotency",
            Row::Store => "library alone (begin + complete, threads)",
        }
    }
}

/// The work every row's handler does: read the body, answer 201 with a small JSON body.
async fn work(body: &[u8]) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        format!("{{\"payment\":\"ok\",\"bytes\":{}}}", body.len()),
    )
}

async fn handler(body: Bytes) -> impl IntoResponse {
    work(&body).await
}

/// What a careful user writes without the layer: the key, the fingerprint, `begin` and
/// `complete` on the blocking pool, the response stored whole.
async fn glue(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let vec_response = |r: http::Response<Vec<u8>>| r.map(Body::from);
    let id = match idempotency_key(&headers) {
        Ok(id) => id,
        Err(e) => return vec_response(error_response(&e)),
    };
    let key = match Key::new("", &id) {
        Ok(key) => key,
        Err(e) => return vec_response(error_response(&e)),
    };
    let fp = Fingerprint::builder()
        .part("POST")
        .part("/payments")
        .part(&body)
        .finish();
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.begin(&key, &fp)).await {
        Ok(Ok(Begin::Started(lease))) => {
            let response = work(&body).await.into_response();
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let stored = StoredResponse::new(parts.status, &parts.headers, bytes.to_vec()).encode();
            match tokio::task::spawn_blocking(move || lease.complete(&stored)).await {
                Ok(Ok(_)) => Response::from_parts(parts, Body::from(bytes)),
                Ok(Err(e)) => vec_response(error_response(&e)),
                Err(_) => vec_response(error_response(&idemstore::Error::Closed)),
            }
        }
        Ok(Ok(Begin::Replay(done))) => match replay(&done) {
            Ok(r) => vec_response(r),
            Err(e) => vec_response(error_response(&e)),
        },
        Ok(Ok(Begin::InFlight { retry_after })) => vec_response(in_flight(retry_after)),
        Ok(Ok(_)) => vec_response(mismatch()),
        Ok(Err(e)) => vec_response(error_response(&e)),
        Err(_) => vec_response(error_response(&idemstore::Error::Closed)),
    }
}

fn app(row: Row, store: Store) -> Router {
    match row {
        Row::Layer => Router::new()
            .route("/payments", post(handler))
            .layer(IdempotencyLayer::new(store)),
        Row::Glue => Router::new()
            .route("/payments", post(glue))
            .with_state(store),
        Row::None | Row::Store => Router::new().route("/payments", post(handler)),
    }
}

/// Runs `connections` HTTP/1.1 connections against `addr` for `seconds`, each sending one
/// request after the other with a new key; returns requests/s (201 answers only).
async fn load(addr: SocketAddr, connections: usize, seconds: f64, round: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("\"r{round}-c{c}-{n:012}-7d1c-4a2e-9b55-3f0e2a1c6d8b\"");
                n += 1;
                let request = Request::post("/payments")
                    .header("host", "bench")
                    .header("idempotency-key", key)
                    .body(Full::new(Bytes::from_static(br#"{"amount":1000}"#)))
                    .expect("request");
                sender.ready().await.expect("connection ready");
                let response = sender.send_request(request).await.expect("response");
                let status = response.status();
                let _ = response.into_body().collect().await.expect("body");
                assert_eq!(status, StatusCode::CREATED, "every request is a new key");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Connections up, then count for `seconds`.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start_count = done.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let counted = done.load(Ordering::Relaxed) - start_count;
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task");
    }
    counted as f64 / elapsed
}

/// The library alone: `threads` threads each running begin + complete with new keys for
/// `seconds`; cycles/s.
fn store_cycles(store: &Store, threads: usize, seconds: f64, round: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let response =
        StoredResponse::new(StatusCode::CREATED, &HeaderMap::new(), b"{}".to_vec()).encode();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (store, stop, done, response) =
                (store.clone(), stop.clone(), done.clone(), response.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = Key::new("", &format!("s{round}-t{t}-{n}")).expect("key");
                    n += 1;
                    let fp = Fingerprint::of(key.id().as_bytes());
                    match store.begin(&key, &fp).expect("begin") {
                        Begin::Started(lease) => {
                            lease.complete(&response).expect("complete");
                        }
                        other => panic!("a new key got {other:?}"),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let start_count = done.load(Ordering::Relaxed);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let counted = done.load(Ordering::Relaxed) - start_count;
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a store thread");
    }
    counted as f64 / elapsed
}

/// One cell: a fresh store, the row's server, the load.
fn measure(row: Row, connections: usize, seconds: f64, round: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("bench.redb")).expect("open");
    let rate = if row == Row::Store {
        store_cycles(&store, connections, seconds, round)
    } else {
        let server = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = app(row, store.clone());
        server.spawn(async move { axum::serve(listener, router).await });
        let client = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("client runtime");
        let rate = client.block_on(load(addr, connections, seconds, round));
        drop(client);
        server.shutdown_timeout(Duration::from_secs(5));
        rate
    };
    store.close().expect("close");
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let a = args();
    eprintln!(
        "{} round(s) of {} s per cell, connections {:?}",
        a.rounds, a.seconds, a.connections
    );
    // samples[row][connections] = one rate per round
    let mut samples = vec![vec![Vec::new(); a.connections.len()]; ROWS.len()];
    for round in 0..a.rounds {
        for (ci, &connections) in a.connections.iter().enumerate() {
            for (ri, &row) in ROWS.iter().enumerate() {
                let rate = measure(row, connections, a.seconds, round);
                eprintln!(
                    "round {round}: {:<44} {connections:>3} conn: {rate:>9.0}/s",
                    row.name()
                );
                samples[ri][ci].push(rate);
            }
        }
    }
    let medians: Vec<Vec<f64>> = samples
        .into_iter()
        .map(|row| row.into_iter().map(median).collect())
        .collect();
    let header: Vec<String> = a.connections.iter().map(|c| format!("{c} conn")).collect();
    println!(
        "\nrequests/s, new key per request, median of {} round(s)\n",
        a.rounds
    );
    println!("| | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(a.connections.len()));
    for (ri, row) in ROWS.iter().enumerate() {
        let cells: Vec<String> = medians[ri].iter().map(|r| format!("{r:.0}")).collect();
        println!("| {} | {} |", row.name(), cells.join(" | "));
    }
    let ratio = |num: usize, den: usize| -> Vec<String> {
        (0..a.connections.len())
            .map(|ci| format!("{:.2}x", medians[num][ci] / medians[den][ci]))
            .collect()
    };
    println!("| layer / glue | {} |", ratio(0, 1).join(" | "));
    println!("| layer / none | {} |", ratio(0, 2).join(" | "));
    println!("| layer / library alone | {} |", ratio(0, 3).join(" | "));
}
