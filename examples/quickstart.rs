//! A walkthrough of idemstore's answers: Started → Replay → InFlight → Mismatch → a takeover
//! that resumes from a checkpoint. Run with `cargo run --example quickstart`.
//!
//! It uses a store file in a temporary directory and a `ManualClock`, so it runs in a blink
//! and shows lease expiry without sleeping.

use std::time::{Duration, UNIX_EPOCH};

use idemstore::{Begin, Fingerprint, Key, ManualClock, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("idemstore-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("idempotency.redb");
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let store = Store::builder()
        .lease(Duration::from_secs(30))
        .clock(clock.clone())
        .open(&path)?;
    println!("store file: {}\n", path.display());

    // A client sends POST /v1/charges with Idempotency-Key: 0f8c1e8e-...
    let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
    let body = br#"{"amount":1000,"currency":"eur"}"#;
    let fp = Fingerprint::builder()
        .part(b"POST")
        .part(b"/v1/charges")
        .part(body)
        .finish();

    // 1. First request: we hold the lease and run the handler.
    let Begin::Started(lease) = store.begin(&key, &fp)? else {
        return Err("a new key must start".into());
    };
    println!(
        "1. Started   token={} recovered={:?}  -> run the handler (charge the card once)",
        lease.token(),
        lease.recovered()
    );
    let done = lease.complete(br#"201 {"id":"ch_1","status":"succeeded"}"#)?;
    println!(
        "   completed -> stored {} bytes, durable on disk",
        done.response().len()
    );

    // 2. The client timed out and retries with the same key and body: replay.
    match store.begin(&key, &fp)? {
        Begin::Replay(done) => println!(
            "2. Replay    -> {} (Idempotent-Replayed: true), nothing charged",
            String::from_utf8_lossy(done.response())
        ),
        other => return Err(format!("expected Replay, got {other:?}").into()),
    }

    // 3. Another key in flight; a concurrent duplicate arrives.
    let key2 = Key::new("tenant-42", "5b7d2a40-9c1e-4f0b-8d3a-2e6f1c9a7b10")?;
    let fp2 = Fingerprint::of(br#"{"amount":250}"#);
    let Begin::Started(mut lease2) = store.begin(&key2, &fp2)? else {
        return Err("a new key must start".into());
    };
    match store.begin(&key2, &fp2)? {
        Begin::InFlight { retry_after } => println!(
            "3. InFlight  -> 409 Conflict, Retry-After: {}s",
            retry_after.as_secs()
        ),
        other => return Err(format!("expected InFlight, got {other:?}").into()),
    }

    // 4. The same key reused for a different payload.
    match store.begin(&key, &Fingerprint::of(b"another body"))? {
        Begin::Mismatch => println!("4. Mismatch  -> 422: key reused for a different request"),
        other => return Err(format!("expected Mismatch, got {other:?}").into()),
    }

    // 5. The holder of key2 saves a checkpoint, then stalls past its lease (or crashes).
    lease2.checkpoint(b"step 1 of 2 done: funds reserved")?;
    let stale_token = lease2.token();
    clock.advance(Duration::from_secs(31));
    let Begin::Started(takeover) = store.begin(&key2, &fp2)? else {
        return Err("an expired lease must be taken over".into());
    };
    let rec = takeover
        .recovered()
        .ok_or("a takeover must say what it recovered")?;
    println!(
        "5. Started   token={} took over token={} (attempt {}), resumes from checkpoint {:?}",
        takeover.token(),
        rec.previous_token(),
        rec.attempt(),
        String::from_utf8_lossy(rec.checkpoint().unwrap_or_default())
    );
    // The stalled holder wakes up: fencing refuses its write.
    match lease2.complete(b"late") {
        Err(e) => println!("   stale holder token={stale_token} -> {e}"),
        Ok(_) => return Err("a fenced lease must not complete".into()),
    }
    takeover.complete(br#"201 {"id":"ch_2"}"#)?;

    let s = store.stats();
    println!(
        "\nstats: started={} replayed={} in_flight_conflicts={} mismatches={} takeovers={} completed={} leases_lost={}",
        s.started,
        s.replayed,
        s.in_flight_conflicts,
        s.mismatches,
        s.takeovers,
        s.completed,
        s.leases_lost
    );
    store.close()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
