//! [`ProblemKind`]: every problem answer of the layer, and the `type` links a service sets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};

use crate::http::{Problem, problem_response, retry_after_secs};

const DOCS: &str = "https://docs.rs/idemstore/latest/idemstore/tower/index.html";

/// A problem the layer answers with (RFC 9457 `application/problem+json`).
///
/// Each has a status, a fixed title, and a `type` link: by default into the documentation
/// of [`idemstore::http`](crate::http#problem-types) or of [this module](super#problem-types);
/// a service links its own pages with
/// [`IdempotencyLayer::problem_types`](super::IdempotencyLayer::problem_types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: a guarded request without `Idempotency-Key`.
    MissingKey,
    /// 400: the `Idempotency-Key` header is malformed, or there is more than one.
    MalformedKey,
    /// 413: the request body is larger than
    /// [`max_body_bytes`](super::IdempotencyLayer::max_body_bytes). The handler did not run.
    BodyTooLarge,
    /// 400: the request body failed before its end (a cut upload). The handler did not run.
    BodyIncomplete,
    /// 409, with `Retry-After`: a request with this key is running.
    InFlight,
    /// 422: the key was used for a different request.
    Mismatch,
    /// 500: the request was executed, but its response could not be stored (larger than
    /// the store's response limit, or its body failed while it was read). Every retry with
    /// the key gets this answer: the request is never executed again.
    ResponseNotStored,
    /// 500: the handler started and then failed without a response (it panicked, or the
    /// service returned an error). Every retry with the key gets this answer: the request
    /// may have partly run, so it is never executed again.
    HandlerFailed,
    /// 500: the idempotency store failed before the handler started. A retry with the same
    /// key is safe.
    StoreFailed,
    /// 500: the key's record exists but cannot be read: it is damaged, or its response is
    /// not one this layer stored (another writer used the scope). The request may have been
    /// executed, so it is not executed again: a retry gets the same answer.
    RecordUnreadable,
    /// 500: the service is at fault (its scope function chose a scope the store refuses).
    /// A retry with the same key is safe.
    ServerError,
}

impl ProblemKind {
    /// The kind of the `idemstore::http` module that this kind is, if any.
    fn http(self) -> Option<Problem> {
        Some(match self {
            ProblemKind::MissingKey => Problem::MissingKey,
            ProblemKind::MalformedKey => Problem::MalformedKey,
            ProblemKind::InFlight => Problem::InFlight,
            ProblemKind::Mismatch => Problem::Mismatch,
            ProblemKind::StoreFailed => Problem::StoreFailed,
            ProblemKind::ServerError => Problem::ServerError,
            ProblemKind::BodyTooLarge
            | ProblemKind::BodyIncomplete
            | ProblemKind::ResponseNotStored
            | ProblemKind::HandlerFailed
            | ProblemKind::RecordUnreadable => return None,
        })
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::BodyIncomplete => StatusCode::BAD_REQUEST,
            ProblemKind::ResponseNotStored
            | ProblemKind::HandlerFailed
            | ProblemKind::RecordUnreadable => StatusCode::INTERNAL_SERVER_ERROR,
            other => other
                .http()
                .map_or(StatusCode::INTERNAL_SERVER_ERROR, Problem::status),
        }
    }

    /// The fixed `title`.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::BodyIncomplete => "Request body incomplete",
            ProblemKind::ResponseNotStored => "Request executed, response not stored",
            ProblemKind::HandlerFailed => "Request executed, handler failed",
            ProblemKind::RecordUnreadable => "Stored record unreadable",
            other => other.http().map_or("Internal server error", Problem::title),
        }
    }

    /// A short name of the kind, also the anchor of its default `type` link
    /// (`"idempotency-key-reused"`, `"request-body-too-large"`, ...): handy to build links
    /// to a service's own pages.
    pub fn anchor(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "missing-idempotency-key",
            ProblemKind::MalformedKey => "malformed-idempotency-key",
            ProblemKind::BodyTooLarge => "request-body-too-large",
            ProblemKind::BodyIncomplete => "request-body-incomplete",
            ProblemKind::InFlight => "request-in-flight",
            ProblemKind::Mismatch => "idempotency-key-reused",
            ProblemKind::ResponseNotStored => "request-executed-response-not-stored",
            ProblemKind::HandlerFailed => "request-executed-handler-failed",
            ProblemKind::StoreFailed => "idempotency-store-failed",
            ProblemKind::RecordUnreadable => "stored-record-unreadable",
            ProblemKind::ServerError => "internal-server-error",
        }
    }

    /// The default `type` link: the section of the `idemstore::http` documentation for the
    /// kinds it shares, of this module's documentation for the others.
    pub fn default_type_uri(self) -> String {
        match self.http() {
            Some(problem) => problem.type_uri(),
            None => format!("{DOCS}#{}", self.anchor()),
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.anchor())
    }
}

/// Chooses a problem's `type` link.
pub(crate) type TypeLinks = Arc<dyn Fn(ProblemKind) -> String + Send + Sync>;

/// Builds the layer's problem answers, with the service's `type` links if it set them.
#[derive(Clone, Default)]
pub(crate) struct Problems {
    links: Option<TypeLinks>,
}

impl Problems {
    pub(crate) fn new(links: Option<TypeLinks>) -> Problems {
        Problems { links }
    }

    /// The answer of `kind` with `detail`.
    pub(crate) fn response(&self, kind: ProblemKind, detail: &str) -> Response<Vec<u8>> {
        let uri = match &self.links {
            Some(links) => links(kind),
            None => kind.default_type_uri(),
        };
        problem_response(kind.status(), &uri, kind.title(), detail)
    }

    pub(crate) fn missing_key(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::MissingKey,
            "This endpoint needs an Idempotency-Key header. Generate a UUID v4 once per \
             operation and send it, quoted, on every attempt: Idempotency-Key: \"<uuid>\".",
        )
    }

    pub(crate) fn malformed_key(&self, reason: &str) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::MalformedKey,
            &format!(
                "The Idempotency-Key header is malformed: {reason}. Send one quoted string of \
                 1-255 printable ASCII characters, such as a UUID v4."
            ),
        )
    }

    pub(crate) fn body_too_large(&self, limit: usize) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::BodyTooLarge,
            &format!(
                "The request body is larger than the {limit} bytes this endpoint accepts. \
                 Nothing was executed."
            ),
        )
    }

    pub(crate) fn body_incomplete(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::BodyIncomplete,
            "The request body ended before it was complete (the upload was cut). Nothing was \
             executed: send the whole request again with the same Idempotency-Key.",
        )
    }

    /// 409 with `Retry-After`: `retry_after` in whole seconds, rounded up, at least 1.
    pub(crate) fn in_flight(&self, retry_after: Duration) -> Response<Vec<u8>> {
        let secs = retry_after_secs(retry_after);
        let mut response = self.response(
            ProblemKind::InFlight,
            &format!(
                "A request with this Idempotency-Key is still being processed. Retry with the \
                 same key and the same request in {secs} second(s) to get its response."
            ),
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
        response
    }

    pub(crate) fn mismatch(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::Mismatch,
            "This Idempotency-Key was already used for a different request. Do not retry: use \
             a new key for a new operation, and the same request for a retry of the same \
             operation.",
        )
    }

    pub(crate) fn response_not_stored(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::ResponseNotStored,
            "The request was executed, but its response could not be stored. It will not be \
             executed again with this Idempotency-Key; look its outcome up by other means.",
        )
    }

    pub(crate) fn handler_failed(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::HandlerFailed,
            "The request started executing and the service failed before it answered; it may \
             have partly run. It will not be executed again with this Idempotency-Key; look \
             its outcome up by other means.",
        )
    }

    pub(crate) fn store_failed(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::StoreFailed,
            "The idempotency store failed before the request was executed. Retry later with \
             the same Idempotency-Key.",
        )
    }

    pub(crate) fn record_unreadable(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::RecordUnreadable,
            "A record for this Idempotency-Key exists but cannot be read (it is damaged, or \
             was not stored by this service). The request may have been executed: retrying \
             with this key gets the same answer; look its outcome up by other means.",
        )
    }

    pub(crate) fn server_error(&self) -> Response<Vec<u8>> {
        self.response(
            ProblemKind::ServerError,
            "The service failed to handle this request; the fault is on the server's side. \
             Retrying later with the same Idempotency-Key is safe.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rustdoc ids of the `###` headings of a module's documentation.
    fn sections(module_doc: &str) -> Vec<String> {
        module_doc
            .lines()
            .filter_map(|line| line.strip_prefix("//! ### "))
            .map(|heading| {
                heading
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                    .collect::<String>()
                    .to_lowercase()
                    .replace(' ', "-")
            })
            .collect()
    }

    /// Every kind's default `type` link goes to a section that exists: of this module's
    /// documentation, or of `idemstore::http`'s for the kinds it shares.
    #[test]
    fn every_default_type_link_names_a_section_of_the_docs() {
        let ours = sections(include_str!("mod.rs"));
        let http = sections(include_str!("../http/mod.rs"));
        let all = [
            ProblemKind::MissingKey,
            ProblemKind::MalformedKey,
            ProblemKind::BodyTooLarge,
            ProblemKind::BodyIncomplete,
            ProblemKind::InFlight,
            ProblemKind::Mismatch,
            ProblemKind::ResponseNotStored,
            ProblemKind::HandlerFailed,
            ProblemKind::StoreFailed,
            ProblemKind::RecordUnreadable,
            ProblemKind::ServerError,
        ];
        for kind in all {
            // A new kind must be added to the list above.
            match kind {
                ProblemKind::MissingKey
                | ProblemKind::MalformedKey
                | ProblemKind::BodyTooLarge
                | ProblemKind::BodyIncomplete
                | ProblemKind::InFlight
                | ProblemKind::Mismatch
                | ProblemKind::ResponseNotStored
                | ProblemKind::HandlerFailed
                | ProblemKind::StoreFailed
                | ProblemKind::RecordUnreadable
                | ProblemKind::ServerError => {}
            }
            let uri = kind.default_type_uri();
            let (page, anchor) = uri.rsplit_once('#').expect("an anchor");
            let sections = if page.ends_with("/http/index.html") {
                &http
            } else {
                &ours
            };
            assert!(
                sections.iter().any(|s| s == anchor),
                "{kind:?}: {uri} names no section ({sections:?})"
            );
        }
    }
}
