//! How the Postgres client's errors become [`Error`]s.
//!
//! The client's error is kept whole as the [`Error::Storage`] source (reachable through
//! `source()`, downcastable to `postgres::Error`), so no Postgres type appears in a variant.
//! What is decided here is whether a failed write has an unknown outcome:
//!
//! - The server answered with an error (a constraint, a deadlock, a syntax error): the
//!   statement failed and the transaction is aborted, so a batch that has not committed wrote
//!   nothing, and an error answer to `COMMIT` means it rolled back. The outcome is known.
//! - Anything else (the connection closed or reset, an I/O error, a timeout, a protocol
//!   error), and the server's errors that end the session or speak of the server itself
//!   (classes 08 connection exception, 57 operator intervention, such as
//!   `pg_terminate_backend` or a shutdown, 58 system error, XX internal error, and any
//!   `FATAL`/`PANIC`): the transaction may have committed before the answer was lost (a
//!   `COMMIT` that reached the server). The outcome is unknown, and the store must never
//!   report `Ok` for it.

use postgres::error::{Severity, SqlState};

use crate::error::Error;

/// Whether a write transaction that failed with `e` may nevertheless have committed (see the
/// module documentation).
pub(crate) fn is_outcome_unknown(e: &postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return true;
    };
    let class = &db.code().code()[..2];
    matches!(class, "08" | "57" | "58" | "XX")
        || matches!(
            db.parsed_severity(),
            Some(Severity::Fatal | Severity::Panic)
        )
}

/// Whether `e` says the session itself is gone, not that a statement failed: the
/// connection closed, or the server shutting down or terminating the session (class 57P).
pub(crate) fn session_ended(e: &postgres::Error) -> bool {
    e.is_closed() || e.code().is_some_and(|code| code.code().starts_with("57P"))
}

/// A failure of a read, or of a call known to have written nothing: [`Error::Storage`] with a
/// known outcome.
pub(crate) fn read_failed(context: &str, e: postgres::Error) -> Error {
    Error::storage(described(context, &e), e)
}

/// A failure of (a statement of) a write transaction: [`Error::Storage`], with
/// `outcome_unknown` set unless the server's answer shows that nothing was committed.
pub(crate) fn write_failed(context: &str, e: postgres::Error) -> Error {
    let context = described(context, &e);
    if is_outcome_unknown(&e) {
        Error::write_failed(context, e)
    } else {
        Error::storage(context, e)
    }
}

/// `context` and what the client's error says, its causes included: the client's own
/// message is only a kind ("db error", "error communicating with the server"); the server's
/// message and SQLSTATE, or the I/O error, sit in its source.
fn described(context: &str, e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let advice = if db.code() == &SqlState::LOCK_NOT_AVAILABLE {
            format!(
                "; a key of the batch stayed locked for over {} s, most likely by a \
                 transaction that called complete_in on it and is still open: commit or roll \
                 it back (and make no store call for its key before it ends)",
                super::pipeline::KEY_LOCK_TIMEOUT.as_secs()
            )
        } else {
            String::new()
        };
        return format!(
            "{context}: {} (SQLSTATE {}){advice}",
            db.message(),
            db.code().code()
        );
    }
    format!("{context}: {}", chain(e))
}

/// An error and its causes, joined by ": ".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// The pool could not hand out a connection (the server unreachable or refusing, or every
/// connection busy until the timeout): nothing was sent, the outcome is known. The context
/// says which: r2d2's message ends with the last failure to connect, if there was one.
pub(crate) fn pool_failed(context: &str, e: r2d2::Error) -> Error {
    let text = e.to_string();
    let advice = if text.contains(": ") {
        "check that the PostgreSQL server is running and reachable"
    } else {
        "every connection stayed busy: raise postgres_pool_size, or end sooner the \
         transactions that hold the store's rows (complete_in)"
    };
    Error::storage(
        format!(
            "{context} (none could be had within {} s): {text}; {advice}",
            super::pool::CONNECTION_TIMEOUT.as_secs()
        ),
        e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::schema::lock_key;
    use crate::postgres::testdb::TestDb;

    #[test]
    fn a_deadlock_is_a_known_failure_that_wrote_nothing() {
        let Some(db) = TestDb::new() else { return };
        let (mut a, mut b) = (db.client(), db.client());
        let (one, two) = (
            lock_key(&db.names.schema, b"one"),
            lock_key(&db.names.schema, b"two"),
        );
        let lock = "SELECT pg_advisory_xact_lock($1)";
        let mut ta = a.transaction().unwrap();
        let mut tb = b.transaction().unwrap();
        ta.execute(lock, &[&one]).unwrap();
        tb.execute(lock, &[&two]).unwrap();
        // Each waits for the other's lock: the server ends one of them within its
        // deadlock_timeout (1 s by default), and the other then gets its lock.
        let (ra, rb) = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| ta.execute(lock, &[&two]).map(|_| ta));
            let rb = tb.execute(lock, &[&one]).map(|_| tb);
            (waiting.join().unwrap(), rb)
        });
        let e = match (ra, rb) {
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
            (ra, rb) => panic!(
                "expected one deadlock, got {:?} and {:?}",
                ra.err(),
                rb.err()
            ),
        };
        assert!(!is_outcome_unknown(&e), "{e}");
        let mapped = write_failed("running a batch", e);
        assert!(matches!(
            mapped,
            Error::Storage {
                outcome_unknown: false,
                ..
            }
        ));
        let cause = std::error::Error::source(&mapped)
            .and_then(|s| s.downcast_ref::<postgres::Error>())
            .expect("the client's error is the source");
        assert_eq!(cause.code(), Some(&SqlState::T_R_DEADLOCK_DETECTED));
        let text = mapped.to_string();
        assert!(
            text.contains("deadlock detected (SQLSTATE 40P01)"),
            "{text}"
        );
    }

    #[test]
    fn a_server_error_is_a_known_failure() {
        let Some(db) = TestDb::new() else { return };
        let mut client = db.client();
        let e = client.execute("SELEKT 1", &[]).unwrap_err();
        assert!(!is_outcome_unknown(&e));
        let text = write_failed("writing a batch", e).to_string();
        assert_eq!(
            text,
            "storage failed while writing a batch: syntax error at or near \"SELEKT\" \
             (SQLSTATE 42601)"
        );
    }
}
