//! Problem responses (RFC 9457, `application/problem+json`) for the idempotency answers.

use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::error::Error;

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

const DOCS: &str = "https://docs.rs/idemstore/latest/idemstore/http/index.html";

/// The problem types this module answers with: each `type` URI points at its section of this
/// module's documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Problem {
    /// 400: no `Idempotency-Key` header on a request that needs one.
    MissingKey,
    /// 400: the `Idempotency-Key` header is malformed or too long.
    MalformedKey,
    /// 409: a request with this key is still being processed.
    InFlight,
    /// 422: the key was already used for a request with another fingerprint.
    Mismatch,
    /// 500: the idempotency store failed.
    StoreFailed,
    /// 500: the service itself is at fault (it chose a scope the store refuses, for one).
    ServerError,
}

impl Problem {
    /// The problem's HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Problem::MissingKey | Problem::MalformedKey => StatusCode::BAD_REQUEST,
            Problem::InFlight => StatusCode::CONFLICT,
            Problem::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::StoreFailed | Problem::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem's `type` URI.
    pub fn type_uri(self) -> String {
        let anchor = match self {
            Problem::MissingKey => "missing-idempotency-key",
            Problem::MalformedKey => "malformed-idempotency-key",
            Problem::InFlight => "request-in-flight",
            Problem::Mismatch => "idempotency-key-reused",
            Problem::StoreFailed => "idempotency-store-failed",
            Problem::ServerError => "internal-server-error",
        };
        format!("{DOCS}#{anchor}")
    }

    /// The problem's short, fixed `title`.
    pub fn title(self) -> &'static str {
        match self {
            Problem::MissingKey => "Idempotency-Key header missing",
            Problem::MalformedKey => "Idempotency-Key header malformed",
            Problem::InFlight => "A request with this Idempotency-Key is in progress",
            Problem::Mismatch => "Idempotency-Key reused for a different request",
            Problem::StoreFailed => "Idempotency store failed",
            Problem::ServerError => "Internal server error",
        }
    }

    /// The full response: status, `Content-Type: application/problem+json`, and a JSON body
    /// with `type`, `title`, `status` and `detail`.
    pub fn response(self, detail: &str) -> Response<Vec<u8>> {
        problem_response(self.status(), &self.type_uri(), self.title(), detail)
    }
}

/// The JSON body of a problem response.
struct ProblemBody<'a> {
    type_uri: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// Written out rather than derived, so the `http` feature needs no proc-macro crates: the
/// members in the order RFC 9457 lists them.
impl serde::Serialize for ProblemBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut body = serializer.serialize_struct("Problem", 4)?;
        body.serialize_field("type", self.type_uri)?;
        body.serialize_field("title", self.title)?;
        body.serialize_field("status", &self.status)?;
        body.serialize_field("detail", self.detail)?;
        body.end()
    }
}

/// Any RFC 9457 problem response: `{"type":…,"title":…,"status":…,"detail":…}` with
/// `Content-Type: application/problem+json`.
///
/// ```
/// use http::StatusCode;
/// let r = idemstore::http::problem_response(StatusCode::NOT_FOUND, "about:blank", "Not Found", "no such payment");
/// assert_eq!(r.status(), 404);
/// assert_eq!(r.headers()["content-type"], "application/problem+json");
/// assert_eq!(
///     std::str::from_utf8(r.body()).unwrap(),
///     r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"no such payment"}"#
/// );
/// ```
pub fn problem_response(
    status: StatusCode,
    type_uri: &str,
    title: &str,
    detail: &str,
) -> Response<Vec<u8>> {
    let body = ProblemBody {
        type_uri,
        title,
        status: status.as_u16(),
        detail,
    };
    // Strings and a number: serde_json cannot fail on them (it fails only on maps with
    // non-string keys and on a `Serialize` that reports an error), so no case is lost here.
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// 400: the request has no `Idempotency-Key`.
pub fn missing_key() -> Response<Vec<u8>> {
    Problem::MissingKey.response(
        "This endpoint needs an Idempotency-Key header. Generate a UUID v4 once per operation \
         and send it, quoted, on every attempt: Idempotency-Key: \"<uuid>\".",
    )
}

/// 400: the `Idempotency-Key` header is malformed; `reason` says how.
pub fn malformed_key(reason: &str) -> Response<Vec<u8>> {
    Problem::MalformedKey.response(&format!(
        "The Idempotency-Key header is malformed: {reason}. Send one quoted string of 1-255 \
         printable ASCII characters, such as a UUID v4."
    ))
}

/// Seconds for `Retry-After`: `d` rounded up, so a client never comes back too early, and at
/// least 1 (a 0 would ask for an immediate retry, which would only meet the same request).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// 409: a request with the same key is being processed; come back after `retry_after`
/// (sent in `Retry-After` as whole seconds, rounded up, at least 1).
/// [`RequestGuard::begin`](super::RequestGuard::begin) passes its
/// [hint](super::RequestGuard::retry_after_hint), capped by the lease's time left.
///
/// ```
/// use std::time::Duration;
/// let r = idemstore::http::in_flight(Duration::from_millis(1500));
/// assert_eq!(r.status(), 409);
/// assert_eq!(r.headers()["retry-after"], "2");
/// ```
pub fn in_flight(retry_after: Duration) -> Response<Vec<u8>> {
    let secs = retry_after_secs(retry_after);
    let mut response = Problem::InFlight.response(&format!(
        "A request with this Idempotency-Key is still being processed. Retry with the same key \
         and the same request in {secs} second(s) to get its response."
    ));
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// 422: the key was used for a different request (another method, path, body or
/// fingerprinted header).
pub fn mismatch() -> Response<Vec<u8>> {
    Problem::Mismatch.response(
        "This Idempotency-Key was already used for a different request. Do not retry: use a \
         new key for a new operation, and the same request for a retry of the same operation.",
    )
}

/// The response for an error of this crate met while handling a request: 400 for
/// [`Error::MissingIdempotencyKey`], [`Error::MalformedIdempotencyKey`] and
/// [`Error::InvalidKey`] (the client's key); a 500 [server error](Problem::ServerError) for
/// [`Error::InvalidConfig`] (the service's fault, such as a scope the store refuses, which
/// [`RequestGuard::begin`](super::RequestGuard::begin) reports so); otherwise a 500
/// [store failure](Problem::StoreFailed). The client may retry a 500 with the same key. The
/// text of a 500 says nothing about the error (log it yourself).
pub fn error_response(error: &Error) -> Response<Vec<u8>> {
    match error {
        Error::MissingIdempotencyKey => missing_key(),
        Error::MalformedIdempotencyKey { reason } | Error::InvalidKey { reason } => {
            malformed_key(reason)
        }
        Error::InvalidConfig { .. } => Problem::ServerError.response(
            "The service failed to handle this request; the fault is on the server's side. \
             Retrying later with the same Idempotency-Key is safe.",
        ),
        _ => Problem::StoreFailed.response(
            "The idempotency store failed while handling this request. Retry later with the \
             same Idempotency-Key.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes() {
        let detail = "a\"b\\c\nd\u{1}é\u{7f}\u{1f}";
        let r = problem_response(StatusCode::BAD_REQUEST, "about:blank", "t\"", detail);
        let text = std::str::from_utf8(r.body()).unwrap();
        // The escapes JSON needs, non-ASCII text as it is.
        assert!(text.contains(r#""a\"b\\c\nd\u0001é"#), "{text}");
        let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(parsed["detail"], detail);
        assert_eq!(parsed["title"], "t\"");
        assert_eq!(parsed["type"], "about:blank");
        assert_eq!(parsed["status"], 400);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn statuses() {
        assert_eq!(missing_key().status(), 400);
        assert_eq!(malformed_key("x").status(), 400);
        assert_eq!(mismatch().status(), 422);
        assert_eq!(error_response(&Error::Poisoned).status(), 500);
        assert_eq!(error_response(&Error::MissingIdempotencyKey).status(), 400);
        let misconfigured = error_response(&Error::InvalidConfig {
            reason: "scope is 300 bytes long".into(),
        });
        assert_eq!(misconfigured.status(), 500);
        assert!(!String::from_utf8_lossy(misconfigured.body()).contains("300"));
    }
}
