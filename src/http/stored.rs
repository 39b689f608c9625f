//! [`StoredResponse`]: a whole HTTP response as the bytes given to
//! [`Lease::complete`](crate::Lease::complete), and back.

use std::fmt;

use http::header::CONNECTION;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::header::IDEMPOTENT_REPLAYED;
use crate::error::{Error, Result};

/// The first four bytes of an encoded response: `"IDR"` and format version 1.
const MAGIC: [u8; 4] = *b"IDR\x01";

/// Headers never stored: the hop-by-hop headers of RFC 9110, section 7.6.1, their legacy
/// relatives, and `Set-Cookie`.
const DROPPED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
    "set-cookie",
];

/// A response to replay: status, headers, body.
///
/// # Which headers are stored
///
/// All of them (a repeated name keeps all its values, in order), **except**:
///
/// * the hop-by-hop headers, which describe one connection and not the response:
///   `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE`,
///   `Trailer`, `Proxy-Authenticate`, `Proxy-Authorization`, and every header that the
///   response's `Connection` header names (RFC 9110, section 7.6.1);
/// * `Set-Cookie`: a session or CSRF cookie belongs to the first client that got it, and
///   replaying it could hand it to whoever retries with the key;
/// * `Idempotent-Replayed`, which [`into_replay`](StoredResponse::into_replay) adds itself.
///
/// `Content-Length` is kept (the body is stored whole, so it stays true). `Date` is kept
/// as it was: a replay says when the response was made.
///
/// # Encoding (format version 1)
///
/// All integers big-endian. The whole input must be consumed; anything else (a wrong
/// magic, a truncation, trailing bytes, an invalid status, header name or value, the
/// values of a name apart, more fields than a header map holds) decodes to
/// [`Error::Corrupt`], never a panic.
///
/// | bytes | field |
/// |---|---|
/// | 4 | magic and version: `b"IDR"`, then `0x01` |
/// | 2 | status code, `u16`, 100–999 |
/// | 4 | `h`, the number of header fields, `u32` |
/// | `h` × (4 + n + 4 + v) | each field: name length `n` (`u32`), the name (lowercase, as the `http` crate stores it), value length `v` (`u32`), the value bytes; the fields of one name follow one another, in order |
/// | 8 | `b`, the body length, `u64` |
/// | `b` | the body |
///
/// ```
/// use http::{Response, StatusCode};
/// use idemstore::http::StoredResponse;
///
/// let response = Response::builder()
///     .status(StatusCode::CREATED)
///     .header("content-type", "application/json")
///     .header("set-cookie", "session=secret")
///     .body(br#"{"id":"pay_1"}"#.to_vec())
///     .unwrap();
/// let bytes = StoredResponse::from_response(&response).encode();
///
/// let replay = StoredResponse::decode(&bytes)?.into_replay();
/// assert_eq!(replay.status(), 201);
/// assert_eq!(replay.headers()["idempotent-replayed"], "true");
/// assert!(replay.headers().get("set-cookie").is_none());
/// assert_eq!(replay.body(), response.body());
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Whether a header of a response with `headers` is stored.
fn is_stored(name: &HeaderName, headers: &HeaderMap) -> bool {
    if DROPPED.contains(&name.as_str()) || *name == IDEMPOTENT_REPLAYED {
        return false;
    }
    // Headers named as connection options are hop-by-hop too.
    !headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|option| option.trim().eq_ignore_ascii_case(name.as_str()))
        })
    })
}

impl StoredResponse {
    /// Takes `status`, the storable headers of `headers` (see above) and `body`.
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: impl Into<Vec<u8>>,
    ) -> StoredResponse {
        let mut kept = HeaderMap::new();
        for (name, value) in headers {
            if is_stored(name, headers) {
                kept.append(name.clone(), value.clone());
            }
        }
        StoredResponse {
            status,
            headers: kept,
            body: body.into(),
        }
    }

    /// The storable form of `response` (see above).
    pub fn from_response<B: AsRef<[u8]>>(response: &Response<B>) -> StoredResponse {
        StoredResponse::new(
            response.status(),
            response.headers(),
            response.body().as_ref(),
        )
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The bytes to give [`Lease::complete`](crate::Lease::complete) (format above).
    pub fn encode(&self) -> Vec<u8> {
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 8 + n.as_str().len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(18 + headers_len + self.body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        // Header names and values are far below 4 GiB each (the http crate limits names to
        // 64 KiB; a value that large could not be sent), and so is their count.
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&(name.as_str().len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(&(self.body.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes bytes made by [`encode`](StoredResponse::encode).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for anything that is not exactly one encoded response of format
    /// version 1 (see the table above). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<StoredResponse> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.take(4, "magic")?;
        if magic[..3] != MAGIC[..3] {
            return Err(corrupt("not an encoded response (wrong magic)"));
        }
        if magic[3] != MAGIC[3] {
            return Err(corrupt(&format!(
                "format version {} is not supported (this build reads {})",
                magic[3], MAGIC[3]
            )));
        }
        let status = u16::from_be_bytes(r.array("status")?);
        let status = StatusCode::from_u16(status)
            .map_err(|_| corrupt(&format!("invalid status {status}")))?;
        let count = u32::from_be_bytes(r.array("header count")?);
        // Each field takes at least 8 bytes: don't trust a count the input cannot hold.
        if u64::from(count) * 8 > r.remaining() as u64 {
            return Err(corrupt("header count larger than the input"));
        }
        // A map sized for the count could be larger than the http crate allows (it panics):
        // it grows as fields come instead, and one it cannot hold is refused.
        let mut headers = HeaderMap::try_with_capacity((count as usize).min(64))
            .map_err(|_| corrupt("too many header fields"))?;
        let mut previous: Option<HeaderName> = None;
        for _ in 0..count {
            let len = u32::from_be_bytes(r.array("header name length")?);
            let name = r.take_len(len, "header name")?;
            let raw = name;
            let name = HeaderName::from_bytes(raw).map_err(|_| corrupt("invalid header name"))?;
            if name.as_str().as_bytes() != raw {
                // One encoding per response: names are stored as the http crate keeps them.
                return Err(corrupt("header name not in lowercase form"));
            }
            if previous.as_ref() != Some(&name) && headers.contains_key(&name) {
                // One encoding per response: a name's values are stored together, as the
                // http crate iterates them.
                return Err(corrupt(
                    "the values of a header name are not stored together",
                ));
            }
            let len = u32::from_be_bytes(r.array("header value length")?);
            let value = r.take_len(len, "header value")?;
            let value =
                HeaderValue::from_bytes(value).map_err(|_| corrupt("invalid header value"))?;
            headers
                .try_append(name.clone(), value)
                .map_err(|_| corrupt("too many header fields"))?;
            previous = Some(name);
        }
        let len = u64::from_be_bytes(r.array("body length")?);
        let body = r.take_len(len, "body")?.to_vec();
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes after the body"));
        }
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }

    /// The response, as stored.
    pub fn into_response(self) -> Response<Vec<u8>> {
        let mut response = Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }

    /// The response as a replay: as stored, plus `Idempotent-Replayed: true`.
    pub fn into_replay(self) -> Response<Vec<u8>> {
        let mut response = self.into_response();
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

impl fmt::Debug for StoredResponse {
    /// Shows the status, header names and body length (bodies may hold personal data).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .finish()
    }
}

fn corrupt(what: &str) -> Error {
    Error::corrupt(format!("stored response: {what}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(corrupt(&format!("truncated in the {what}")));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn take_len(&mut self, n: impl TryInto<usize>, what: &str) -> Result<&'a [u8]> {
        let n = n
            .try_into()
            .map_err(|_| corrupt(&format!("truncated in the {what}")))?;
        self.take(n, what)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        StoredResponse::new(StatusCode::CREATED, &headers, b"hi".to_vec())
    }

    #[test]
    fn encoding_byte_by_byte() {
        let mut headers = HeaderMap::new();
        headers.insert("x-k", HeaderValue::from_static("v"));
        let bytes = StoredResponse::new(StatusCode::OK, &headers, b"ab".to_vec()).encode();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"IDR\x01");
        expected.extend_from_slice(&200u16.to_be_bytes());
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(&3u32.to_be_bytes());
        expected.extend_from_slice(b"x-k");
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(b"v");
        expected.extend_from_slice(&2u64.to_be_bytes());
        expected.extend_from_slice(b"ab");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn round_trip_keeps_repeated_headers_in_order() {
        let s = sample();
        let back = StoredResponse::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        let values: Vec<_> = back.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    StoredResponse::decode(&bytes[..len]),
                    Err(Error::Corrupt { .. })
                ),
                "prefix of {len} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(StoredResponse::decode(&longer).is_err());
    }

    #[test]
    fn invalid_fields_are_errors() {
        let mut one = HeaderMap::new();
        one.insert("content-type", HeaderValue::from_static("text/plain"));
        let good = StoredResponse::new(StatusCode::OK, &one, b"hi".to_vec()).encode();
        let mut v = good.clone();
        v[3] = 2;
        assert!(
            StoredResponse::decode(&v)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        let mut v = good.clone();
        v[4..6].copy_from_slice(&1000u16.to_be_bytes());
        assert!(StoredResponse::decode(&v).is_err());
        let mut v = good.clone();
        v[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(StoredResponse::decode(&v).is_err());
        // "content-type" starts at byte 14: a space is not allowed in a name.
        let mut v = good.clone();
        v[14] = b' ';
        assert!(StoredResponse::decode(&v).is_err());
        // Upper case would decode to the same name: refused, so each response has one encoding.
        let mut v = good.clone();
        v[14] = b'C';
        assert!(
            StoredResponse::decode(&v)
                .unwrap_err()
                .to_string()
                .contains("lowercase")
        );
        // A header value with a newline.
        let mut v = good;
        let at = 14 + "content-type".len() + 4;
        v[at] = b'\n';
        assert!(StoredResponse::decode(&v).is_err());
        assert!(StoredResponse::decode(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn hop_by_hop_and_cookies_are_dropped() {
        let mut headers = HeaderMap::new();
        for name in DROPPED {
            headers.insert(name, HeaderValue::from_static("x"));
        }
        headers.insert(CONNECTION, HeaderValue::from_static("close, X-Private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        headers.insert("location", HeaderValue::from_static("/p/1"));
        let s = StoredResponse::new(StatusCode::OK, &headers, Vec::new());
        let names: Vec<_> = s.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["location"]);
    }
}
