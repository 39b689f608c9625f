//! [`Fingerprint`]: SHA-256 of what makes two requests "the same request".

use std::fmt;

use sha2::{Digest, Sha256};

/// A 32-byte SHA-256 digest of the parts of a request that define it (method, path, body,
/// chosen headers). A retry must carry the same fingerprint as the first attempt, or the
/// store answers [`Begin::Mismatch`](crate::Begin::Mismatch) (HTTP 422).
///
/// * [`Fingerprint::of`] is exactly `SHA-256(bytes)`, so any client can compute it.
/// * [`Fingerprint::builder`] hashes several parts, each framed as its length (8 bytes,
///   big-endian) followed by its bytes, so parts can't run into each other.
///
/// Stored fingerprints are compared in constant time.
///
/// ```
/// use idemstore::Fingerprint;
/// let a = Fingerprint::builder().part(b"POST").part(b"/v1/charges").part(b"{}").finish();
/// let b = Fingerprint::builder().part(b"POST").part(b"/v1/charge").part(b"s{}").finish();
/// assert_ne!(a, b);
/// assert_eq!(
///     Fingerprint::of(b"").to_string(),
///     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
/// );
/// ```
#[derive(Clone, Copy, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// `SHA-256(bytes)`.
    pub fn of(bytes: impl AsRef<[u8]>) -> Fingerprint {
        Fingerprint(Sha256::digest(bytes.as_ref()).into())
    }

    /// Starts a fingerprint over several length-framed parts.
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder {
            hasher: Sha256::new(),
        }
    }

    /// Wraps a digest computed elsewhere.
    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality: the time taken does not depend on where the digests differ.
    pub(crate) fn ct_eq(&self, other: &[u8; 32]) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

impl std::hash::Hash for Fingerprint {
    /// Hashes the digest bytes (equal fingerprints hash equally).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Fingerprint) -> bool {
        self.ct_eq(&other.0)
    }
}

impl fmt::Display for Fingerprint {
    /// Lowercase hex, 64 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Builds a [`Fingerprint`] from length-framed parts; made by [`Fingerprint::builder`].
#[derive(Clone)]
#[must_use = "call finish() to get the fingerprint"]
pub struct FingerprintBuilder {
    hasher: Sha256,
}

impl FingerprintBuilder {
    /// Adds one part: its length as 8 big-endian bytes, then its bytes.
    pub fn part(mut self, bytes: impl AsRef<[u8]>) -> FingerprintBuilder {
        let bytes = bytes.as_ref();
        self.hasher.update((bytes.len() as u64).to_be_bytes());
        self.hasher.update(bytes);
        self
    }

    /// The digest over every part added.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.finalize().into())
    }
}

impl fmt::Debug for FingerprintBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintBuilder")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_frames_parts() {
        let manual = {
            let mut v = Vec::new();
            v.extend_from_slice(&3u64.to_be_bytes());
            v.extend_from_slice(b"abc");
            v.extend_from_slice(&0u64.to_be_bytes());
            Fingerprint::of(&v)
        };
        assert_eq!(
            Fingerprint::builder().part(b"abc").part(b"").finish(),
            manual
        );
        assert_ne!(
            Fingerprint::builder().part(b"ab").part(b"c").finish(),
            Fingerprint::builder().part(b"a").part(b"bc").finish()
        );
    }

    #[test]
    fn bytes_round_trip_and_hex() {
        let f = Fingerprint::of(b"abc");
        assert_eq!(Fingerprint::from_bytes(*f.as_bytes()), f);
        assert_eq!(
            f.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!f.ct_eq(Fingerprint::of(b"abd").as_bytes()));
    }
}
