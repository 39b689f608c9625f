//! The `Idempotency-Key` header: parsing and formatting.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::{Error, Result};
use crate::key::{Key, MAX_KEY_PART_BYTES};

/// `Idempotency-Key`, the request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// `Idempotent-Replayed`, added (`true`) to a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

fn malformed(reason: impl Into<String>) -> Error {
    Error::MalformedIdempotencyKey {
        reason: reason.into(),
    }
}

/// Reads the idempotency key of a request from its headers.
///
/// # Accepted forms
///
/// The IETF draft (`draft-ietf-httpapi-idempotency-key-header`) defines the header as a
/// structured-field *Item* whose value is a *String* (RFC 8941, section 3.3.3):
///
/// * **Quoted (the standard form)**: `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`.
///   Inside the quotes: printable ASCII (0x20–0x7E), with `\"` and `\\` as the only escapes.
///   Spaces and tabs around the item are ignored. Parameters (`"k";a=1`) are **not**
///   accepted: the draft defines none, and a key must be unambiguous.
/// * **Bare (lenient)**: `Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`, what many
///   clients (Stripe's SDKs among them) send. Accepted when it is a run of visible ASCII
///   (0x21–0x7E) without `"`, `\`, `,` or `;` (those would make it ambiguous with the
///   structured forms). It is the same key as its quoted form.
///
/// The key, after unescaping, must then pass [`Key::new`]'s rules: 1–255 bytes, not only
/// spaces.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use idemstore::http::{idempotency_key, IDEMPOTENCY_KEY};
///
/// let mut headers = HeaderMap::new();
/// headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(r#""a \"quoted\" key""#));
/// assert_eq!(idempotency_key(&headers)?, r#"a "quoted" key"#);
///
/// headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("8e03978e-40d5-43e8-bc93-6894a57f9324"));
/// assert_eq!(idempotency_key(&headers)?, "8e03978e-40d5-43e8-bc93-6894a57f9324");
/// # Ok::<(), idemstore::Error>(())
/// ```
///
/// # Errors
/// * [`Error::MissingIdempotencyKey`] when there is no such header (HTTP 400).
/// * [`Error::MalformedIdempotencyKey`] (HTTP 400) when there is more than one
///   `Idempotency-Key` field, or the value is not one of the forms above: an unterminated
///   string, a bad escape, a byte outside printable ASCII, something after the closing
///   quote, an empty key, only spaces, or more than 255 bytes.
pub fn idempotency_key(headers: &HeaderMap) -> Result<String> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let first = values.next().ok_or(Error::MissingIdempotencyKey)?;
    if values.next().is_some() {
        return Err(malformed(
            "the request has more than one Idempotency-Key header; send exactly one",
        ));
    }
    parse_idempotency_key(first.as_bytes())
}

/// Parses one `Idempotency-Key` field value (see [`idempotency_key`] for the forms).
///
/// # Errors
/// [`Error::MalformedIdempotencyKey`] as for [`idempotency_key`].
pub fn parse_idempotency_key(raw: &[u8]) -> Result<String> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    let value = &raw[start..end];
    let key = match value.first() {
        None => return Err(malformed("the header is empty")),
        Some(b'"') => parse_sf_string(value)?,
        Some(_) => parse_bare(value)?,
    };
    if key.len() > MAX_KEY_PART_BYTES {
        return Err(malformed(format!(
            "the key is {} bytes long, at most {MAX_KEY_PART_BYTES} are allowed",
            key.len()
        )));
    }
    Key::new("", &key).map_err(|e| match e {
        Error::InvalidKey { reason } => malformed(reason),
        other => other,
    })?;
    Ok(key)
}

/// An sf-string, the whole of `value` (which starts with `"`).
fn parse_sf_string(value: &[u8]) -> Result<String> {
    let mut out = String::new();
    let mut i = 1;
    loop {
        let Some(&b) = value.get(i) else {
            return Err(malformed("the quoted string has no closing quote"));
        };
        match b {
            b'\\' => match value.get(i + 1) {
                Some(&e @ (b'"' | b'\\')) => {
                    out.push(char::from(e));
                    i += 2;
                }
                _ => {
                    return Err(malformed(
                        "a backslash in the quoted string must be followed by \" or \\",
                    ));
                }
            },
            b'"' => {
                if i + 1 != value.len() {
                    return Err(malformed(
                        "something follows the closing quote (parameters and lists are not \
                         accepted)",
                    ));
                }
                return Ok(out);
            }
            0x20..=0x7e => {
                out.push(char::from(b));
                i += 1;
            }
            _ => {
                return Err(malformed(format!(
                    "byte {i} of the header is not printable ASCII (0x20-0x7E)"
                )));
            }
        }
        if out.len() > MAX_KEY_PART_BYTES {
            return Err(malformed(format!(
                "the key is longer than {MAX_KEY_PART_BYTES} bytes"
            )));
        }
    }
}

/// The lenient bare form.
fn parse_bare(value: &[u8]) -> Result<String> {
    if let Some(pos) = value
        .iter()
        .position(|b| !(0x21..=0x7e).contains(b) || matches!(b, b'"' | b'\\' | b',' | b';'))
    {
        return Err(malformed(format!(
            "an unquoted key may hold only visible ASCII without '\"', '\\', ',' or ';' \
             (byte {pos} is not); quote it as a structured-field string"
        )));
    }
    // Only ASCII here, so this cannot fail.
    String::from_utf8(value.to_vec()).map_err(|_| malformed("the key is not ASCII"))
}

/// Formats `key` as the header's standard form, a structured-field string: `"key"` with `"`
/// and `\` escaped. For clients.
///
/// ```
/// use idemstore::http::format_idempotency_key;
/// let v = format_idempotency_key("0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
/// assert_eq!(v, "\"0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11\"");
/// # Ok::<(), idemstore::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidKey`] when `key` breaks [`Key::new`]'s rules.
pub fn format_idempotency_key(key: &str) -> Result<HeaderValue> {
    Key::new("", key)?;
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    HeaderValue::from_str(&out).map_err(|_| Error::InvalidKey {
        reason: "the key cannot be a header value".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        parse_idempotency_key(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    fn bad(raw: &[u8]) -> String {
        match parse_idempotency_key(raw) {
            Err(Error::MalformedIdempotencyKey { reason }) => reason,
            other => panic!("{raw:?}: expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn quoted_and_bare_forms() {
        assert_eq!(ok(r#""abc""#), "abc");
        assert_eq!(ok(" \t\"abc\" "), "abc");
        assert_eq!(ok(r#""a b""#), "a b");
        assert_eq!(ok(r#""a\"b\\c""#), r#"a"b\c"#);
        assert_eq!(ok("abc-123_~!"), "abc-123_~!");
        assert_eq!(ok("  abc  "), "abc");
    }

    #[test]
    fn malformed_forms() {
        assert!(bad(b"").contains("empty"));
        assert!(bad(b"   ").contains("empty"));
        assert!(bad(br#""""#).contains("empty"));
        assert!(bad(br#""   ""#).contains("spaces"));
        assert!(bad(br#""abc"#).contains("closing quote"));
        assert!(bad(br#""a\b""#).contains("backslash"));
        assert!(bad(br#""abc";x=1"#).contains("follows"));
        assert!(bad(br#""a", "b""#).contains("follows"));
        assert!(bad(b"\"a\x01b\"").contains("printable"));
        assert!(bad("\"é\"".as_bytes()).contains("printable"));
        assert!(bad(b"a b").contains("unquoted"));
        assert!(bad(b"a,b").contains("unquoted"));
        assert!(bad(b"a;b").contains("unquoted"));
        assert!(bad(b"ab\"").contains("unquoted"));
    }

    #[test]
    fn length_limit() {
        let max = "k".repeat(255);
        assert_eq!(ok(&max), max);
        assert_eq!(ok(&format!("\"{max}\"")), max);
        assert!(bad(format!("\"{max}k\"").as_bytes()).contains("longer"));
        assert!(bad("k".repeat(256).as_bytes()).contains("255"));
        // Escapes count as one byte of the key.
        let escaped = "\\\"".repeat(255);
        assert_eq!(ok(&format!("\"{escaped}\"")).len(), 255);
    }

    #[test]
    fn format_round_trips() {
        for key in ["abc", r#"a "q" \ b"#, " x ", &"z".repeat(255)] {
            let v = format_idempotency_key(key).unwrap();
            assert_eq!(parse_idempotency_key(v.as_bytes()).unwrap(), key);
        }
        assert!(format_idempotency_key("").is_err());
        assert!(format_idempotency_key("a\nb").is_err());
    }
}
