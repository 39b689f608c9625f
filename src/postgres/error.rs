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

/// Whether the batch that failed with `e` can simply be run again from its start: a deadlock
/// (SQLSTATE 40P01) or a serialization failure (40001). The server rolled the transaction
/// back, so nothing of it was written.
pub(crate) fn is_retryable(e: &postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

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

/// A failure of a read, or of a call known to have written nothing: [`Error::Storage`] with a
/// known outcome.
pub(crate) fn read_failed(context: &str, e: postgres::Error) -> Error {
    Error::storage(context, e)
}

/// A failure of (a statement of) a write transaction: [`Error::Storage`], with
/// `outcome_unknown` set unless the server's answer shows that nothing was committed.
pub(crate) fn write_failed(context: &str, e: postgres::Error) -> Error {
    if is_outcome_unknown(&e) {
        Error::write_failed(context, e)
    } else {
        Error::storage(context, e)
    }
}

/// The pool could not hand out a connection (the server unreachable or refusing, or every
/// connection busy until the timeout): nothing was sent, the outcome is known.
pub(crate) fn pool_failed(context: &str, e: r2d2::Error) -> Error {
    Error::storage(context, e)
}
