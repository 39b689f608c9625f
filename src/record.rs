//! The stored record of one key, and its versioned binary codec.
//!
//! # Record format, version 1
//!
//! Every integer is big-endian. Times are nanoseconds since the Unix epoch (`u64`).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | codec version, `1` |
//! | 1 | 1 | state: `1` in-flight, `2` completed |
//! | 2 | 32 | request fingerprint (SHA-256) |
//! | 34 | 8 | fencing token |
//!
//! In-flight (state 1) continues with:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 42 | 8 | `created_at`: when the first attempt began |
//! | 50 | 8 | `ttl_deadline`: `created_at + ttl`, with the ttl in force then |
//! | 58 | 8 | `lease_expires_at` |
//! | 66 | 4 | attempt number (1 for the first attempt) |
//! | 70 | 1 | `1` if a checkpoint follows, else `0` |
//! | 71 | 4 | checkpoint length `n` (only if present) |
//! | 75 | n | checkpoint bytes (only if present) |
//!
//! Completed (state 2) continues with:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 42 | 8 | `completed_at` |
//! | 50 | 8 | `expires_at`: `completed_at + ttl`, with the ttl in force then |
//! | 58 | 4 | response length `n` |
//! | 62 | n | response bytes |
//!
//! In the log table a record is preceded by its key (see [`encode_entry`]).
//!
//! A record ends exactly after its last field; anything else (short, long, unknown version or
//! state, a flag other than 0/1) decodes to [`Error::Corrupt`]. Decoding never panics.

use crate::error::{Error, Result};

/// Encodes a log entry: the record of `key` (an encoded [`crate::Key`]) as stored in the log
/// table: key length (`u16` BE), key, then the record.
pub(crate) fn encode_entry(key: &[u8], record: &Record) -> Vec<u8> {
    let body = record.encode();
    let mut entry = Vec::with_capacity(2 + key.len() + body.len());
    // Encoded keys are at most 511 bytes (two parts of at most 255 and a length byte).
    entry.extend_from_slice(&(key.len() as u16).to_be_bytes());
    entry.extend_from_slice(key);
    entry.extend_from_slice(&body);
    entry
}

/// Splits a log entry into the encoded key and the record bytes.
///
/// # Errors
/// [`Error::Corrupt`] if the entry is shorter than its key length says.
pub(crate) fn split_entry(entry: &[u8]) -> Result<(&[u8], &[u8])> {
    let (len, rest) = entry
        .split_first_chunk::<2>()
        .ok_or_else(|| Error::corrupt("a log entry is shorter than its key length"))?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return Err(Error::corrupt("a log entry is shorter than its key"));
    }
    Ok(rest.split_at(len))
}

/// Codec version written by this build.
pub(crate) const RECORD_VERSION: u8 = 1;
const STATE_IN_FLIGHT: u8 = 1;
const STATE_COMPLETED: u8 = 2;
const HEADER_LEN: usize = 42;

/// One key's record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub fingerprint: [u8; 32],
    pub token: u64,
    pub state: State,
}

/// The two stored states of SPEC §3 (absent is "no record").
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    InFlight {
        created_at: u64,
        ttl_deadline: u64,
        lease_expires_at: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
    },
    Completed {
        completed_at: u64,
        expires_at: u64,
        response: Vec<u8>,
    },
}

impl Record {
    /// The instant from which the record counts as absent (SPEC §3): completed records die
    /// at `expires_at`, in-flight ones at `max(ttl_deadline, lease_expires_at)`.
    pub fn dies_at(&self) -> u64 {
        match &self.state {
            State::InFlight {
                ttl_deadline,
                lease_expires_at,
                ..
            } => (*ttl_deadline).max(*lease_expires_at),
            State::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// Whether the record is dead (= absent) at `now`.
    pub fn is_dead(&self, now: u64) -> bool {
        now >= self.dies_at()
    }

    /// The death time of an encoded record, reading only its fixed-size fields (the reaper's
    /// check, without copying the response).
    pub fn peek_dies_at(bytes: &[u8]) -> Result<u64> {
        let mut r = Reader { bytes, pos: 0 };
        if r.u8()? != RECORD_VERSION {
            return Err(Error::corrupt("record codec version"));
        }
        let tag = r.u8()?;
        // Fingerprint, token, and created_at / completed_at.
        r.take(48)?;
        let deadline = r.u64()?;
        match tag {
            // max(ttl_deadline, lease_expires_at)
            STATE_IN_FLIGHT => Ok(deadline.max(r.u64()?)),
            // expires_at
            STATE_COMPLETED => Ok(deadline),
            other => Err(Error::corrupt(format!("record state tag {other}"))),
        }
    }

    /// Encodes the record (format above).
    pub fn encode(&self) -> Vec<u8> {
        let payload = match &self.state {
            State::InFlight { checkpoint, .. } => {
                29 + checkpoint.as_ref().map_or(0, |c| 4 + c.len())
            }
            State::Completed { response, .. } => 20 + response.len(),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload);
        out.push(RECORD_VERSION);
        out.push(match self.state {
            State::InFlight { .. } => STATE_IN_FLIGHT,
            State::Completed { .. } => STATE_COMPLETED,
        });
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.token.to_be_bytes());
        match &self.state {
            State::InFlight {
                created_at,
                ttl_deadline,
                lease_expires_at,
                attempt,
                checkpoint,
            } => {
                out.extend_from_slice(&created_at.to_be_bytes());
                out.extend_from_slice(&ttl_deadline.to_be_bytes());
                out.extend_from_slice(&lease_expires_at.to_be_bytes());
                out.extend_from_slice(&attempt.to_be_bytes());
                match checkpoint {
                    None => out.push(0),
                    Some(c) => {
                        out.push(1);
                        out.extend_from_slice(&len_u32(c.len()).to_be_bytes());
                        out.extend_from_slice(c);
                    }
                }
            }
            State::Completed {
                completed_at,
                expires_at,
                response,
            } => {
                out.extend_from_slice(&completed_at.to_be_bytes());
                out.extend_from_slice(&expires_at.to_be_bytes());
                out.extend_from_slice(&len_u32(response.len()).to_be_bytes());
                out.extend_from_slice(response);
            }
        }
        out
    }

    /// Decodes a record; bad bytes give [`Error::Corrupt`], never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Record> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(Error::corrupt(format!(
                "record codec version {version}, this build reads version {RECORD_VERSION}"
            )));
        }
        let tag = r.u8()?;
        let fingerprint: [u8; 32] = r
            .take(32)?
            .try_into()
            .map_err(|_| Error::corrupt("record fingerprint"))?;
        let token = r.u64()?;
        let state = match tag {
            STATE_IN_FLIGHT => {
                let created_at = r.u64()?;
                let ttl_deadline = r.u64()?;
                let lease_expires_at = r.u64()?;
                let attempt = r.u32()?;
                let checkpoint = match r.u8()? {
                    0 => None,
                    1 => {
                        let n = r.u32()? as usize;
                        Some(r.take(n)?.to_vec())
                    }
                    other => {
                        return Err(Error::corrupt(format!("record checkpoint flag {other}")));
                    }
                };
                State::InFlight {
                    created_at,
                    ttl_deadline,
                    lease_expires_at,
                    attempt,
                    checkpoint,
                }
            }
            STATE_COMPLETED => {
                let completed_at = r.u64()?;
                let expires_at = r.u64()?;
                let n = r.u32()? as usize;
                State::Completed {
                    completed_at,
                    expires_at,
                    response: r.take(n)?.to_vec(),
                }
            }
            other => return Err(Error::corrupt(format!("record state tag {other}"))),
        };
        if r.pos != bytes.len() {
            return Err(Error::corrupt(format!(
                "{} trailing bytes after the record",
                bytes.len() - r.pos
            )));
        }
        Ok(Record {
            fingerprint,
            token,
            state,
        })
    }
}

/// Lengths are limited to `max_response_bytes`, itself at most `u32::MAX` (checked when the
/// store is built), so this never saturates in practice.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| Error::corrupt("record is truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn in_flight(checkpoint: Option<Vec<u8>>) -> Record {
        Record {
            fingerprint: [7; 32],
            token: 42,
            state: State::InFlight {
                created_at: 1,
                ttl_deadline: 100,
                lease_expires_at: 200,
                attempt: 3,
                checkpoint,
            },
        }
    }

    #[test]
    fn death_time() {
        assert_eq!(in_flight(None).dies_at(), 200);
        assert!(!in_flight(None).is_dead(199));
        assert!(in_flight(None).is_dead(200));
    }

    #[test]
    fn round_trips() {
        for r in [
            in_flight(None),
            in_flight(Some(vec![])),
            in_flight(Some(b"step 2".to_vec())),
            Record {
                fingerprint: [1; 32],
                token: u64::MAX,
                state: State::Completed {
                    completed_at: 5,
                    expires_at: u64::MAX,
                    response: b"hello".to_vec(),
                },
            },
        ] {
            let bytes = r.encode();
            assert_eq!(Record::decode(&bytes).unwrap(), r);
            assert_eq!(Record::peek_dies_at(&bytes).unwrap(), r.dies_at());
            for cut in 0..bytes.len() {
                assert!(matches!(
                    Record::decode(&bytes[..cut]),
                    Err(Error::Corrupt { .. })
                ));
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(Record::decode(&long).is_err());
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn encode_decode_identity(token: u64, a: u64, b: u64, resp in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = Record { fingerprint: [9; 32], token, state: State::Completed { completed_at: a, expires_at: b, response: resp } };
            prop_assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }
}
