//! [`Lease`]: the exclusive, fenced right to execute the request of one key.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{duration_nanos, from_nanos};
use crate::committer::Submitter;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::machine::Hold;
use crate::outcome::{Completed, Recovered};
use crate::stats::bump;
use crate::store::Inner;

/// The exclusive right to execute the request of one key, until [`expires_at`](Lease::expires_at).
///
/// Returned inside [`Begin::Started`](crate::Begin::Started). It is `Send`: move it to the
/// thread that does the work.
///
/// # Lease semantics
///
/// * Every operation checks that the record is still in flight under this lease's fencing
///   [`token`](Lease::token); otherwise it returns [`Error::LeaseLost`] and changes nothing.
///   So a holder that stalled past its lease and was taken over can never overwrite the new
///   holder's work.
/// * [`complete`](Lease::complete) is allowed after the lease's time ran out, as long as
///   nobody took over.
/// * For long work, call [`extend`](Lease::extend) as a heartbeat, and store recovery points
///   with [`checkpoint`](Lease::checkpoint): a holder that takes over receives the last one
///   in [`recovered`](Lease::recovered).
/// * Dropping a lease without completing or abandoning it releases it (best effort): the next
///   `begin` with the same fingerprint takes over at once. A crash behaves the same once the
///   lease runs out.
///
/// Every successful operation is durable when it returns (with the default durability).
#[must_use = "complete, abandon or extend the lease; dropping it releases the key for a retry"]
pub struct Lease {
    /// The store's inside (not the public handle).
    inner: Arc<Inner>,
    key: Key,
    encoded: Vec<u8>,
    token: u64,
    expires_at: u64,
    recovered: Option<Recovered>,
    finished: bool,
}

impl Lease {
    pub(crate) fn new(
        inner: Arc<Inner>,
        key: Key,
        encoded: Vec<u8>,
        token: u64,
        expires_at: u64,
        recovered: Option<Recovered>,
    ) -> Lease {
        Lease {
            inner,
            key,
            encoded,
            token,
            expires_at,
            recovered,
            finished: false,
        }
    }

    /// The fencing token: strictly greater than every token granted before it, across restarts.
    /// Pass it to downstream systems that can reject stale writers.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The key this lease is for.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// When the lease runs out (after which a retry may take over).
    pub fn expires_at(&self) -> SystemTime {
        from_nanos(self.expires_at)
    }

    /// `Some` when this lease took over from an earlier attempt that did not finish
    /// (crashed, stalled past its lease, or dropped its lease): what that attempt left.
    pub fn recovered(&self) -> Option<&Recovered> {
        self.recovered.as_ref()
    }

    fn check_size(&self, len: usize) -> Result<()> {
        let max = self.inner.settings.max_response_bytes;
        if len > max {
            return Err(Error::ResponseTooLarge { len, max });
        }
        Ok(())
    }

    /// Sends one operation of this lease to the committer (`operation` names it in logs),
    /// and counts and logs a lost lease.
    fn submit<T>(
        &self,
        operation: &'static str,
        send: impl FnOnce(&Submitter, Vec<u8>, u64) -> Result<T>,
    ) -> Result<T> {
        let reply = self
            .inner
            .submitter()
            .and_then(|s| send(&s, self.encoded.clone(), self.token));
        if let Err(Error::LeaseLost { .. }) = &reply {
            bump(&self.inner.stats.leases_lost, 1);
            if operation == "release" {
                // A stale holder dropping its lease: expected after a takeover.
                tracing::debug!(token = self.token, operation, "lease lost");
            } else {
                tracing::warn!(
                    token = self.token,
                    operation,
                    "lease lost: another holder took over, or the record expired or was abandoned; nothing was changed"
                );
            }
        }
        reply
    }

    /// Stores `response` as the request's outcome: in flight → completed. Every later `begin`
    /// with the same fingerprint replays these bytes until the record expires.
    ///
    /// # Errors
    /// * [`Error::ResponseTooLarge`]: nothing stored; the lease is released as on drop, so the
    ///   next `begin` takes over (with the last checkpoint).
    /// * [`Error::LeaseLost`]: another holder took over, or the record expired or was
    ///   abandoned. Do not report success for this attempt.
    /// * [`Error::Storage`] / [`Error::Poisoned`] / [`Error::Closed`]: the outcome is unknown or
    ///   the store unusable; reopen the store and ask again with `begin`.
    pub fn complete(mut self, response: &[u8]) -> Result<Completed> {
        self.check_size(response.len())?;
        let response = response.to_vec();
        let result = self.submit("complete", |s, key, token| s.complete(key, token, response));
        self.finished = true;
        let done = result?;
        bump(&self.inner.stats.completed, 1);
        Ok(done)
    }

    /// Completes the lease inside the caller's own PostgreSQL transaction `tx`: the
    /// completion is written (fenced, like [`complete`](Lease::complete)) with `tx`'s other
    /// writes and becomes durable when the caller commits `tx`, together with them. So no
    /// crash can leave the side effect written and the key in flight, nor the key completed
    /// and the side effect lost.
    ///
    /// ```no_run
    /// # fn run(client: &mut postgres::Client, lease: idemstore::Lease) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = client.transaction()?;
    /// tx.execute("INSERT INTO bookings (slot, user_id) VALUES ($1, $2)", &[&7i32, &42i64])?;
    /// let done = lease.complete_in(&mut tx, b"booked slot 7")?; // LeaseLost: roll back
    /// tx.commit()?; // the booking and the completion are durable together
    /// # Ok(()) }
    /// ```
    ///
    /// The lease is consumed, and from here on nothing of it writes on its own (its drop
    /// never waits on the caller's open transaction): if the caller rolls back, the key stays
    /// in flight and is taken over once the lease runs out, as after a crash.
    ///
    /// Until `tx` ends it holds the key's lock, so the store's writes of that key (a retry's
    /// `begin`, from any thread or replica) wait for it: keep the transaction short, and make
    /// no store call for the key on the thread that holds `tx` before it ends. A write waits
    /// at most 5 s, then fails with [`Error::Storage`] (nothing written, `outcome_unknown`
    /// not set), as do the other writes committed in the same batch. The store must be
    /// open on the same database ([`Builder::open_postgres`]); `tx` is a `postgres` 0.19
    /// transaction.
    ///
    /// At any isolation level the completion is fenced against the latest committed state of
    /// the key's record, not against an older snapshot of `tx`'s: at REPEATABLE READ or
    /// SERIALIZABLE, a record changed since `tx`'s snapshot (a takeover, an `extend` of this
    /// lease) fails the completion with a serialization failure ([`Error::Storage`]: roll
    /// back and retry). So at those levels let `tx` take its snapshot (its first statement)
    /// after `begin` returned, and make no `extend` until it ends; a snapshot older than the
    /// claim holds no record of the lease, and the completion is refused saying so.
    ///
    /// [`Builder::open_postgres`]: crate::Builder::open_postgres
    ///
    /// # Errors
    /// * [`Error::ResponseTooLarge`]: nothing written; the lease is released as on drop
    ///   (before anything ran in `tx`).
    /// * [`Error::LeaseLost`]: another holder took over, or the record expired or was
    ///   abandoned: roll `tx` back.
    /// * [`Error::Storage`]: a statement failed, and `tx` is aborted (roll it back; if the
    ///   connection was lost, whether `tx` committed is unknown); at REPEATABLE READ or
    ///   SERIALIZABLE also a record changed since `tx`'s snapshot, or a snapshot older than
    ///   the claim.
    /// * [`Error::InvalidConfig`] for a store not opened on PostgreSQL; [`Error::Closed`].
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn complete_in(
        mut self,
        tx: &mut postgres::Transaction<'_>,
        response: &[u8],
    ) -> Result<Completed> {
        self.check_size(response.len())?;
        let pg = self.inner.postgres()?;
        self.finished = true;
        let result = pg.complete_in(
            tx,
            &self.encoded,
            self.token,
            response.to_vec(),
            &self.inner.settings,
        );
        match &result {
            Ok(_) => bump(&self.inner.stats.completed, 1),
            Err(Error::LeaseLost { .. }) => {
                bump(&self.inner.stats.leases_lost, 1);
                tracing::warn!(
                    token = self.token,
                    operation = "complete_in",
                    "lease lost: another holder took over, or the record expired or was abandoned; nothing was changed"
                );
            }
            Err(_) => {}
        }
        result
    }

    /// Moves the lease's end to `now + by`: a heartbeat for long work.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero duration; [`Error::LeaseLost`]; storage errors as
    /// for [`complete`](Lease::complete).
    pub fn extend(&mut self, by: Duration) -> Result<()> {
        if by.is_zero() {
            return Err(Error::config(
                "extend needs a duration greater than zero (drop the lease to release it)",
            ));
        }
        let by = duration_nanos(by);
        self.expires_at = self.submit("extend", |s, key, token| {
            s.hold(key, token, Hold::Extend(by))
        })?;
        Ok(())
    }

    /// Stores `bytes` as a recovery point; a holder that takes over receives the last one.
    ///
    /// # Errors
    /// [`Error::ResponseTooLarge`] (nothing stored, the lease is kept); [`Error::LeaseLost`];
    /// storage errors as for [`complete`](Lease::complete).
    pub fn checkpoint(&mut self, bytes: &[u8]) -> Result<()> {
        self.check_size(bytes.len())?;
        let hold = Hold::Checkpoint(bytes.to_vec());
        self.submit("checkpoint", |s, key, token| s.hold(key, token, hold))
            .map(|_| ())
    }

    /// Deletes the record: the key is absent again and a retry runs from scratch. Use it when
    /// nothing happened (for example, validation failed).
    ///
    /// # Errors
    /// [`Error::LeaseLost`]; storage errors as for [`complete`](Lease::complete).
    pub fn abandon(mut self) -> Result<()> {
        let result = self.submit("abandon", |s, key, token| s.abandon(key, token));
        self.finished = true;
        result?;
        bump(&self.inner.stats.abandoned, 1);
        Ok(())
    }
}

impl Drop for Lease {
    /// Releases the lease (best effort, errors ignored): `lease_expires_at = now`, the
    /// checkpoint is kept, and the next `begin` takes over at once.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self
            .submit("release", |s, key, token| s.hold(key, token, Hold::Release))
            .is_ok()
        {
            bump(&self.inner.stats.released, 1);
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("expires_at", &self.expires_at())
            .field("recovered", &self.recovered)
            .finish()
    }
}
