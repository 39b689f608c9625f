//! The client half of idempotency: keys, a durable outbox, and retries that reuse the key.
//!
//! A server can only deduplicate what the client lets it recognise. The client's duties are
//! three, and this module has one tool for each:
//!
//! 1. **One fresh, unguessable key per logical operation**: [`new_key`] (a UUID v4 from the
//!    operating system's CSPRNG).
//! 2. **Persist the key before sending**: [`Outbox`] records the operation (your operation
//!    id, its key, the request's fingerprint, the time) in a redb file with a durable commit
//!    *before* the first byte goes out. After a crash or restart, [`Outbox::pending`] lists the
//!    operations that never got a final answer, each with the key it was first sent with.
//! 3. **Retry with backoff, always with the same key**: [`RetryPolicy::run`] calls your send
//!    closure with the one key of the operation on every attempt, backs off exponentially with
//!    full jitter, honours `Retry-After`, retries what is safe to retry (timeouts, connection
//!    errors, 409, 429, 5xx) unless the answer is a replay (the server's stored, final
//!    answer), and stops hard on a 422 or another 4xx, returning a
//!    [`RetryOutcome`] that says why it stopped.
//!
//! ```
//! use idemstore::client::{Outbox, RetryOutcome, RetryPolicy, Sent};
//! use idemstore::Fingerprint;
//! use std::time::Duration;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let outbox = Outbox::open(dir.path().join("outbox.redb"))?;
//! let body = br#"{"order":"o-17","amount":1000}"#;
//!
//! // 1 + 2: a new key for the operation "o-17", durable before anything is sent.
//! let op = outbox.record("o-17", &Fingerprint::of(body))?;
//!
//! // 3: send (here a fake server that times out once), reusing op.key() on every attempt.
//! let mut keys_sent = Vec::new();
//! let policy = RetryPolicy::new().base(Duration::from_millis(1)).jitter_seed(7);
//! let outcome = policy.run(op.key(), |attempt| {
//!     keys_sent.push(attempt.key().to_owned());
//!     if attempt.number() == 1 { Sent::Timeout } else { Sent::response(201, "charged") }
//! });
//! assert!(matches!(outcome, RetryOutcome::Succeeded { status: 201, attempts: 2, .. }));
//! assert!(keys_sent.iter().all(|k| k == op.key()));
//!
//! // A final answer: the operation is done. (After GaveUp, leave it pending and resume later.)
//! outbox.finish("o-17")?;
//! assert!(outbox.pending()?.is_empty());
//! # Ok::<(), idemstore::Error>(())
//! ```
//!
//! # Key generation and persist-before-send
//!
//! * Generate the key on the client, once per *logical operation* ("pay invoice 17"), not
//!   per HTTP attempt and not per process run. [`Outbox::record`] does it for you and returns
//!   the same key every time it is asked about the same operation id, until the entry expires.
//! * Write the key to durable storage **before** sending. If the process dies between sending
//!   and storing, the retry after the restart would carry a new key, and the server would run
//!   the operation twice. The outbox commits (fsync) before `record` returns.
//! * Never derive the key from the request's data (two genuinely different operations with
//!   equal payloads, such as two identical coffee orders, would be merged into one).
//! * Finish an operation ([`Outbox::finish`]) only once it got a *final* answer: success, 422 or
//!   another 4xx. After [`RetryOutcome::GaveUp`], keep it pending and resume it later with
//!   the same key.
//! * Keep the outbox's TTL no longer than the server's key TTL (both default to 24 hours). A
//!   request resent after the server forgot its key runs again; the outbox therefore drops
//!   entries older than its TTL, and [`Outbox::purge`] returns what it dropped so you can
//!   reconcile unfinished ones by other means (look the operation up on the server). Until
//!   then, [`Outbox::record`] refuses such an operation
//!   ([`Error::OperationExpired`](crate::Error::OperationExpired)) rather than give it a
//!   second key.
//!
//! # Common mistakes, and what the API does about each
//!
//! ## Reusing a key for another operation
//! *What goes wrong:* the server replays operation A's response for operation B, and B
//! never happens.
//!
//! *Detected:* the server's [`Store::begin`](crate::Store::begin) compares request
//! fingerprints and answers [`Begin::Mismatch`](crate::Begin::Mismatch), HTTP 422. The retry
//! helper stops at once with [`RetryOutcome::Mismatch`] instead of retrying. On the client,
//! [`Outbox::record`] refuses an operation id already recorded for another fingerprint
//! ([`Error::OperationConflict`](crate::Error::OperationConflict)).
//!
//! ## A new key per retry
//! *What goes wrong:* every retry is a new request to the server: double charges.
//!
//! *Prevented:* [`RetryPolicy::run`] takes the key once and hands the same key to every
//! attempt. The [`Outbox`] keeps one key per operation id across restarts: `record`, called
//! again for the same operation, returns the key it already has.
//!
//! ## Sequential or guessable keys (`1`, `2`, `order-17`)
//! *What goes wrong:* keys of two clients or two sessions collide, and a guessed key can fish
//! for someone else's stored response.
//!
//! *Prevented, partly:* [`new_key`] is a UUID v4 from the OS CSPRNG (122 random bits), and
//! the server scopes keys per tenant ([`Key`](crate::Key)'s `scope`), so keys of different
//! clients never meet. To be honest about the limit: [`Key::new`](crate::Key::new) does
//! **not** reject sequential or low-entropy ids (it cannot tell `"42"` from a random string).
//! A server that wants to insist on UUIDs must check the format itself.
//!
//! ## Not persisting the key before sending
//! *What goes wrong:* a crash between sending and storing loses the key; the retry after the
//! restart carries a new one.
//!
//! *Prevented:* [`Outbox::record`] is durable when it returns; send only after it returned.
//!
//! ## Ignoring a 422, or treating a 409 as final
//! *What goes wrong:* retrying a 422 hides a client bug; giving up on a 409 reports an
//! operation that is running elsewhere as failed.
//!
//! *Prevented:* a 422 is never retried ([`RetryOutcome::Mismatch`]); a 409 is retried after
//! its `Retry-After`.
//!
//! # Using idemstore from async code
//!
//! Everything here is synchronous (blocking file I/O with fsync, and [`RetryPolicy::run`]
//! sleeps with `std::thread::sleep`). From an async runtime, run outbox calls on the blocking
//! pool (`tokio::task::spawn_blocking`), and use [`RetryPolicy::delays`] to drive an async
//! retry loop with the runtime's sleep, or [`RetryPolicy::run_with`] with your own
//! [`Sleeper`] inside `spawn_blocking`. See [`crate::http`] for the server side.
//!
//! `Outbox` and the whole module are behind the `client` cargo feature (on by default).

mod outbox;
mod retry;

pub use outbox::{Outbox, OutboxBuilder, OutboxEntry};
pub use retry::{
    Attempt, Delays, GiveUp, RetryOutcome, RetryPolicy, Sent, Sleeper, StatusClass, ThreadSleeper,
    classify_status, parse_retry_after,
};

/// A new idempotency key: a UUID v4 (122 bits from the operating system's CSPRNG) in its
/// lowercase hyphenated form, 36 characters, such as `"0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11"`.
///
/// Call it once per logical operation and persist the result before sending (or let
/// [`Outbox::record`] do both).
///
/// ```
/// let key = idemstore::client::new_key();
/// assert_eq!(key.len(), 36);
/// assert_eq!(&key[14..15], "4"); // version 4
/// assert_ne!(key, idemstore::client::new_key());
/// ```
///
/// # Panics
/// Never in practice; the `uuid` crate panics only if the operating system cannot supply
/// random bytes at all.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_key_is_a_v4_uuid() {
        let key = new_key();
        let parsed = uuid::Uuid::parse_str(&key).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(key, key.to_lowercase());
        assert!(crate::Key::new("", &key).is_ok());
    }
}
