//! What the store answers: [`Begin`], [`Completed`], [`Recovered`], [`Entry`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::from_nanos;
use crate::lease::Lease;
use crate::record::{Record, State};

/// The answer of [`Store::begin`](crate::Store::begin).
///
/// | variant | HTTP |
/// |---|---|
/// | `Started` | run the handler, then `lease.complete(response)` |
/// | `Replay` | the stored response (add `Idempotent-Replayed: true`) |
/// | `InFlight` | 409 Conflict, `Retry-After: retry_after` |
/// | `Mismatch` | 422 Unprocessable Content |
#[derive(Debug)]
#[must_use = "a Started lease must be completed, abandoned or dropped; other variants are the answer to send"]
pub enum Begin {
    /// This caller holds the lease and runs the request.
    Started(Lease),
    /// The request already completed: here is its response, byte for byte.
    Replay(Completed),
    /// Another caller holds a live lease on the key.
    InFlight {
        /// Time left on that lease.
        retry_after: Duration,
    },
    /// The key was used for a request with another fingerprint.
    Mismatch,
}

/// A completed request: its stored response and when it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct Completed {
    pub(crate) response: Arc<Vec<u8>>,
    pub(crate) token: u64,
    pub(crate) completed_at: u64,
    pub(crate) expires_at: u64,
}

impl Completed {
    /// The response bytes given to [`Lease::complete`], exactly.
    pub fn response(&self) -> &[u8] {
        &self.response
    }

    /// Takes the response bytes (without a copy, unless a clone of this `Completed` still
    /// shares them).
    pub fn into_response(self) -> Vec<u8> {
        Arc::try_unwrap(self.response).unwrap_or_else(|shared| shared.as_ref().clone())
    }

    /// The fencing token of the lease that completed the request.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the request completed.
    pub fn completed_at(&self) -> SystemTime {
        from_nanos(self.completed_at)
    }

    /// When the record dies (`completed_at + ttl`); from then on the key is absent.
    pub fn expires_at(&self) -> SystemTime {
        from_nanos(self.expires_at)
    }
}

impl fmt::Debug for Completed {
    /// Shows the response length, not its bytes (responses may hold personal data).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completed")
            .field("response_len", &self.response.len())
            .field("token", &self.token)
            .field("completed_at", &self.completed_at())
            .field("expires_at", &self.expires_at())
            .finish()
    }
}

/// What a lease that took over an expired (or released) one learns about the earlier attempt.
#[derive(Clone, PartialEq, Eq)]
pub struct Recovered {
    pub(crate) previous_token: u64,
    pub(crate) attempt: u32,
    pub(crate) checkpoint: Option<Vec<u8>>,
}

impl Recovered {
    /// The fencing token of the lease that was taken over.
    pub fn previous_token(&self) -> u64 {
        self.previous_token
    }

    /// This attempt's number: 2 on the first takeover.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The last checkpoint stored by an earlier holder, if any.
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.checkpoint.as_deref()
    }
}

impl fmt::Debug for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovered")
            .field("previous_token", &self.previous_token)
            .field("attempt", &self.attempt)
            .field("checkpoint_len", &self.checkpoint.as_ref().map(Vec::len))
            .finish()
    }
}

/// What [`Store::get`](crate::Store::get) finds under a live key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A request is (or was, until its lease ran out) being executed.
    #[non_exhaustive]
    InFlight {
        /// The current lease's fencing token.
        token: u64,
        /// When the current lease runs out.
        lease_expires_at: SystemTime,
        /// Attempt number (1 for the first).
        attempt: u32,
        /// The last checkpoint stored.
        checkpoint: Option<Vec<u8>>,
        /// When the first attempt began.
        created_at: SystemTime,
        /// When the record dies if nobody completes it.
        expires_at: SystemTime,
    },
    /// The request completed.
    Completed(Completed),
}

impl Entry {
    pub(crate) fn from_record(record: Record) -> Entry {
        let token = record.token;
        let dies_at = record.dies_at();
        match record.state {
            State::InFlight {
                created_at,
                lease_expires_at,
                attempt,
                checkpoint,
                ..
            } => Entry::InFlight {
                token,
                lease_expires_at: from_nanos(lease_expires_at),
                attempt,
                checkpoint,
                created_at: from_nanos(created_at),
                expires_at: from_nanos(dies_at),
            },
            State::Completed {
                completed_at,
                expires_at,
                response,
            } => Entry::Completed(Completed {
                response,
                token,
                completed_at,
                expires_at,
            }),
        }
    }
}
