//! [`Key`]: the `(scope, id)` pair a record is stored under, and its byte encoding.

use std::fmt;

use crate::error::{Error, Result};

/// Longest `scope` and longest `id`, in bytes.
pub const MAX_KEY_PART_BYTES: usize = 255;

/// An idempotency key: the client's `id` within a server-chosen `scope`.
///
/// `id` is what the client sent in the `Idempotency-Key` header (usually a UUID v4): 1–255
/// bytes of printable ASCII (0x20–0x7E), not only spaces. `scope` separates clients (tenant,
/// API user, endpoint) so that two clients can never see each other's responses: 0–255 bytes
/// of any UTF-8.
///
/// The two parts are stored length-prefixed, so `("a", "bc")` and `("ab", "c")` are different keys.
///
/// ```
/// use idemstore::Key;
/// let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
/// assert_eq!(key.scope(), "tenant-42");
/// assert!(Key::new("tenant-42", "").is_err());
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    scope: String,
    id: String,
}

impl Key {
    /// Builds a key after checking both parts.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] with the reason when `id` is empty, longer than 255 bytes, holds a
    /// byte outside printable ASCII or only spaces, or when `scope` is longer than 255 bytes.
    pub fn new(scope: &str, id: &str) -> Result<Key> {
        let invalid = |reason: String| Err(Error::InvalidKey { reason });
        if scope.len() > MAX_KEY_PART_BYTES {
            return invalid(format!(
                "scope is {} bytes long, at most {MAX_KEY_PART_BYTES} are allowed",
                scope.len()
            ));
        }
        if id.is_empty() {
            return invalid("id is empty; send a UUID v4 in the Idempotency-Key header".into());
        }
        if id.len() > MAX_KEY_PART_BYTES {
            return invalid(format!(
                "id is {} bytes long, at most {MAX_KEY_PART_BYTES} are allowed",
                id.len()
            ));
        }
        if let Some(pos) = id.bytes().position(|b| !(0x20..=0x7e).contains(&b)) {
            return invalid(format!(
                "id byte {pos} is not printable ASCII (0x20-0x7E allowed)"
            ));
        }
        if id.bytes().all(|b| b == b' ') {
            return invalid("id consists only of spaces".into());
        }
        Ok(Key {
            scope: scope.to_owned(),
            id: id.to_owned(),
        })
    }

    /// The server-chosen scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The client's idempotency key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored form: `scope length (1 byte) | scope | id`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.scope.len() + self.id.len());
        // Both lengths were checked in `new`, so the cast cannot truncate.
        out.push(self.scope.len() as u8);
        out.extend_from_slice(self.scope.as_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out
    }

    /// Inverse of [`Key::encode`], validating as [`Key::new`] does.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Key> {
        let (&len, rest) = bytes
            .split_first()
            .ok_or_else(|| Error::corrupt("empty stored key"))?;
        let len = usize::from(len);
        if rest.len() < len {
            return Err(Error::corrupt("stored key shorter than its scope length"));
        }
        let (scope, id) = rest.split_at(len);
        let scope =
            std::str::from_utf8(scope).map_err(|_| Error::corrupt("stored scope is not UTF-8"))?;
        let id = std::str::from_utf8(id).map_err(|_| Error::corrupt("stored id is not UTF-8"))?;
        Key::new(scope, id).map_err(|e| Error::corrupt(format!("stored key: {e}")))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("scope", &self.scope)
            .field("id", &self.id)
            .finish()
    }
}

impl fmt::Display for Key {
    /// `scope/id`, for diagnostics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(Key::new("", "a").is_ok());
        assert!(Key::new("", "").is_err());
        assert!(Key::new("", "   ").is_err());
        assert!(Key::new("", " a ").is_ok());
        assert!(Key::new("", "a\n").is_err());
        assert!(Key::new("", "é").is_err());
        assert!(Key::new("", &"x".repeat(255)).is_ok());
        assert!(Key::new("", &"x".repeat(256)).is_err());
        assert!(Key::new(&"é".repeat(127), "a").is_ok());
        assert!(Key::new(&"s".repeat(256), "a").is_err());
    }

    #[test]
    fn encoding_is_unambiguous_and_round_trips() {
        let a = Key::new("a", "bc").unwrap();
        let b = Key::new("ab", "c").unwrap();
        assert_ne!(a.encode(), b.encode());
        assert_eq!(Key::decode(&a.encode()).unwrap(), a);
        assert_eq!(Key::decode(&b.encode()).unwrap(), b);
        assert!(Key::decode(&[]).is_err());
        assert!(Key::decode(&[5, b'a']).is_err());
    }
}
