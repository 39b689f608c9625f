//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in idemstore.
///
/// Messages are sentences that say what happened and what to do about it. The storage
/// engine's own error, where there is one, is reachable through
/// [`std::error::Error::source`]; its types are never part of a variant, so a redb upgrade
/// cannot break code that matches on this enum.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A [`Key`](crate::Key) part broke its rules (`reason` says which): an id of 1–255 printable
    /// ASCII bytes, not only spaces; a scope of at most 255 bytes.
    InvalidKey {
        /// Which rule was broken.
        reason: String,
    },
    /// A builder setting or an argument is out of range (`reason` says which).
    InvalidConfig {
        /// Which setting, and what is allowed.
        reason: String,
    },
    /// A response or checkpoint is larger than the store's `max_response_bytes`.
    /// Nothing was stored.
    ResponseTooLarge {
        /// Size of the rejected bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The lease is no longer the current one for its key: it was taken over by another
    /// holder, or the record was abandoned, completed or expired. Nothing was changed.
    LeaseLost {
        /// The fencing token of the lease that was refused.
        token: u64,
    },
    /// The file is already open, in this process or another one.
    AlreadyOpen {
        /// The file that could not be opened.
        path: PathBuf,
    },
    /// The file is not an idemstore file of a format version this build can read.
    /// It was not modified.
    IncompatibleFormat {
        /// What was found.
        reason: String,
    },
    /// Stored data failed validation (a damaged file or record).
    Corrupt {
        /// What failed to validate.
        reason: String,
    },
    /// The storage engine or the file system failed.
    ///
    /// When `outcome_unknown` is set, this failed a write whose outcome is unknown: the
    /// change may or may not be durable. A redb store then refuses further writes until it
    /// is reopened: with [`Error::Poisoned`] after a failed commit, or with a storage error
    /// when the storage engine itself latched an I/O failure. A PostgreSQL store goes on
    /// (later calls get fresh connections; a `begin` shows what was committed). Otherwise
    /// nothing was written (an open, a read, a thread that could not start).
    #[non_exhaustive]
    Storage {
        /// What idemstore was doing.
        context: String,
        /// The underlying error.
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
        /// Whether a write failed with an unknown outcome (it may have been made durable).
        outcome_unknown: bool,
    },
    /// An earlier write failed with an unknown outcome; the store refuses writes until it is
    /// closed and reopened (reopening reads what is really on disk).
    Poisoned,
    /// The clock read a time the store cannot represent (before 1970, or from year 2262 on).
    /// Nothing was stored; the call can be retried once the clock is right.
    Clock {
        /// What the clock read.
        reason: String,
    },
    /// The store was closed; this handle (a clone of the store or a lease) can no longer be used.
    Closed,
    /// The request carries no `Idempotency-Key` header, and the endpoint needs one (HTTP 400).
    MissingIdempotencyKey,
    /// The `Idempotency-Key` header is not a valid key: not a structured-field string, more
    /// than one value, empty, too long, or not printable ASCII (HTTP 400; `reason` says which).
    MalformedIdempotencyKey {
        /// What is wrong with the header.
        reason: String,
    },
    /// An outbox operation id is already recorded for a request with another fingerprint:
    /// one operation id (and its key) must stand for one request only.
    OperationConflict {
        /// The operation id that was reused.
        operation: String,
    },
    /// An outbox operation was recorded, never finished, and its entry expired: whether the
    /// server ran it is unknown, and a resend (the server may have forgotten its key) could
    /// run it again. Reconcile it by other means first; [`Outbox::purge`] returns the entry
    /// and removes it, after which the operation id can be recorded anew.
    ///
    /// [`Outbox::purge`]: crate::client::Outbox::purge
    OperationExpired {
        /// The operation id.
        operation: String,
        /// The key it was recorded with.
        key: String,
    },
}

impl Error {
    pub(crate) fn storage(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Storage {
            context: context.into(),
            source: Arc::new(source),
            outcome_unknown: false,
        }
    }

    /// A failed write whose outcome is unknown (a commit that failed, or a connection lost
    /// after a batch was sent): [`Error::Storage`] with `outcome_unknown` set.
    pub(crate) fn write_failed(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::storage(context, source).outcome_unknown()
    }

    /// This error, marked as the failure of a write whose outcome is unknown when it is
    /// [`Error::Storage`]; any other error unchanged.
    pub(crate) fn outcome_unknown(mut self) -> Self {
        if let Error::Storage {
            outcome_unknown, ..
        } = &mut self
        {
            *outcome_unknown = true;
        }
        self
    }

    /// This error with `advice` (what to check or do) after its context when it is
    /// [`Error::Storage`]; any other error unchanged.
    #[cfg(feature = "postgres")]
    pub(crate) fn advised(mut self, advice: &str) -> Self {
        if let Error::Storage { context, .. } = &mut self {
            context.push_str("; ");
            context.push_str(advice);
        }
        self
    }

    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        Error::Corrupt {
            reason: reason.into(),
        }
    }

    /// Names the log entry a [`Error::Corrupt`] was found in (other errors are unchanged).
    pub(crate) fn at_log_entry(self, seq: u64) -> Self {
        match self {
            Error::Corrupt { reason } => Error::Corrupt {
                reason: format!("log entry {seq}: {reason}"),
            },
            other => other,
        }
    }

    pub(crate) fn config(reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey { reason } => write!(f, "invalid idempotency key: {reason}"),
            Error::InvalidConfig { reason } => write!(f, "invalid configuration: {reason}"),
            Error::ResponseTooLarge { len, max } => write!(
                f,
                "{len} bytes exceed the store's limit of {max} bytes; nothing was stored \
                 (raise max_response_bytes or store a smaller response)"
            ),
            Error::LeaseLost { token } => write!(
                f,
                "lease with fencing token {token} is no longer current (taken over, finished or \
                 expired); nothing was changed, do not report success for this attempt"
            ),
            Error::AlreadyOpen { path } => write!(
                f,
                "{} is already open in this or another process; close the other store first",
                path.display()
            ),
            Error::IncompatibleFormat { reason } => write!(
                f,
                "not a store this version of idemstore can open: {reason}; nothing was modified"
            ),
            Error::Corrupt { reason } => write!(
                f,
                "stored data is corrupt: {reason}; restore the store from a backup, or keep it \
                 for inspection and open a new store (retries of its keys will then run again)"
            ),
            Error::Storage {
                context,
                outcome_unknown: true,
                ..
            } => write!(
                f,
                "storage failed while {context}; the write's outcome is unknown (it may be \
                 durable): ask again with begin (a redb store first needs to be reopened)"
            ),
            Error::Storage { context, .. } => write!(f, "storage failed while {context}"),
            Error::Poisoned => write!(
                f,
                "an earlier write failed with an unknown outcome; the store refuses writes until \
                 it is closed and reopened"
            ),
            Error::Clock { reason } => write!(f, "unusable clock reading: {reason}"),
            Error::Closed => write!(f, "the store was closed; open it again to use it"),
            Error::MissingIdempotencyKey => write!(
                f,
                "the request has no Idempotency-Key header; generate a UUID v4 once per \
                 operation and send it as Idempotency-Key: \"<uuid>\" on every attempt"
            ),
            Error::MalformedIdempotencyKey { reason } => write!(
                f,
                "the Idempotency-Key header is malformed: {reason}; send one quoted string of \
                 1-255 printable ASCII characters, such as a UUID v4"
            ),
            Error::OperationExpired { operation, key } => write!(
                f,
                "operation {operation:?} was recorded (with key {key:?}) and never finished, \
                 and its outbox entry expired: whether the server ran it is unknown, and a \
                 resend could run it again; reconcile it by other means (ask the server), then \
                 call purge, which removes the entry, before recording the operation again"
            ),
            Error::OperationConflict { operation } => write!(
                f,
                "operation {operation:?} is already recorded in the outbox for a different \
                 request; an operation id and its key stand for one request: use a new \
                 operation id for a new operation"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Storage { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_error_exposes_source() {
        let e = Error::storage("reading", std::io::Error::other("disk on fire"));
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.to_string().contains("disk on fire"));
    }

    #[test]
    fn only_a_failed_write_speaks_of_an_unknown_outcome() {
        let read = Error::storage("opening /x", std::io::Error::other("denied"));
        assert_eq!(read.to_string(), "storage failed while opening /x");
        assert!(matches!(
            read.clone(),
            Error::Storage {
                outcome_unknown: false,
                ..
            }
        ));

        let write = Error::write_failed("committing a write", std::io::Error::other("EIO"));
        let text = write.to_string();
        assert!(text.contains("outcome is unknown"), "{text}");
        assert!(text.contains("reopen"), "{text}");
        assert!(matches!(
            write.clone(),
            Error::Storage {
                outcome_unknown: true,
                ..
            }
        ));
        // Marking a batch failure: storage errors only.
        let marked = Error::storage("writing a record", std::io::Error::other("EIO"));
        assert!(matches!(
            marked.outcome_unknown(),
            Error::Storage {
                outcome_unknown: true,
                ..
            }
        ));
        assert!(matches!(Error::Poisoned.outcome_unknown(), Error::Poisoned));
    }

    #[test]
    fn no_message_advises_deleting_the_store() {
        let e = Error::corrupt("a checksum failed");
        let text = e.to_string();
        assert!(!text.contains("delete"), "{text}");
        assert!(text.contains("backup"), "{text}");
        assert!(text.contains("run again"), "{text}");
    }

    #[test]
    fn clones_keep_the_variant_and_share_the_cause() {
        let e = Error::LeaseLost { token: 7 };
        assert!(matches!(e.clone(), Error::LeaseLost { token: 7 }));
        // Every caller of a failed batch gets the engine's own error, kind included.
        let full = Error::write_failed(
            "committing a write",
            std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
        );
        let copy = full.clone();
        let kind = std::error::Error::source(&copy)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        assert_eq!(kind, Some(std::io::ErrorKind::StorageFull));
    }

    #[test]
    fn client_and_http_variants_clone_and_explain() {
        let e = Error::MalformedIdempotencyKey {
            reason: "too long".into(),
        };
        assert!(
            matches!(e.clone(), Error::MalformedIdempotencyKey { reason } if reason == "too long")
        );
        assert!(e.to_string().contains("too long"));
        let e = Error::OperationConflict {
            operation: "order-7".into(),
        };
        assert!(
            matches!(e.clone(), Error::OperationConflict { operation } if operation == "order-7")
        );
        assert!(e.to_string().contains("new operation id"));
        assert!(matches!(
            Error::MissingIdempotencyKey.clone(),
            Error::MissingIdempotencyKey
        ));
        assert!(Error::MissingIdempotencyKey.to_string().contains("UUID v4"));
    }
}
