//! The stored record of one key, and its versioned binary codec.
//!
//! # Record format, versions 2 and 3
//!
//! Every integer is big-endian. Times are nanoseconds since the Unix epoch (`u64`).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | codec version: `2`, or `3` for an in-flight record followed by room (below) |
//! | 1 | 1 | state: `1` in-flight, `2` completed |
//! | 2 | 32 | request fingerprint (SHA-256) |
//! | 34 | 8 | fencing token |
//! | 42 | 8 | `written_at`: the store's time when this record was written |
//! | 50 | 4 | clock epoch in which it was written (see [`crate::timeline`]) |
//!
//! In-flight (state 1) continues with:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 54 | 8 | `created_at`: when the first attempt began |
//! | 62 | 8 | `ttl_deadline`: `created_at + ttl`, with the ttl in force then |
//! | 70 | 8 | `lease_expires_at` |
//! | 78 | 4 | attempt number (1 for the first attempt) |
//! | 82 | 1 | `1` if a checkpoint follows, else `0` |
//! | 83 | 4 | checkpoint length `n` (only if present) |
//! | 87 | n | checkpoint bytes (only if present) |
//!
//! Completed (state 2) continues with:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 54 | 8 | `completed_at` |
//! | 62 | 8 | `expires_at`: `completed_at + ttl`, with the ttl in force then |
//! | 70 | 4 | response length `n` |
//! | 74 | n | response bytes |
//!
//! A record of version 2 ends exactly after its last field. Version 3 is only ever an
//! in-flight record, followed by one or more zero bytes: **room** reserved for its response,
//! so that completing the request rewrites its log entry without growing it (an entry that
//! grows in a full B-tree leaf splits the leaf into two half-full ones; see
//! [`room_for`](Record::room_for)).
//! Anything else (short, long, unknown version or state, a flag other than 0/1, a completed
//! record of version 3, a room byte other than zero) decodes to [`Error::Corrupt`]. Decoding
//! never panics. Each record and room has exactly one encoding.
//!
//! # Log entry
//!
//! In the log table a record is framed with its key and a checksum:
//!
//! | size | field |
//! |---|---|
//! | 2 | key length `k` (`u16` BE) |
//! | k | the encoded [`crate::Key`] |
//! | rest − 4 | the record |
//! | 4 | CRC-32 (IEEE) of every byte before it, `u32` BE |
//!
//! Every read of an entry (replay, `get`, a takeover, the reaper, scans, the CLI) verifies the
//! checksum first, so a byte damaged on disk is [`Error::Corrupt`], never replayed.

use crate::error::{Error, Result};
use crate::timeline::Stamp;
use std::sync::Arc;

/// The length of the log entry of `key` and `record`, with `room` bytes reserved after an
/// in-flight record (ignored for a completed one).
pub(crate) fn entry_len(key: &[u8], record: &Record, room: usize) -> usize {
    2 + key.len() + record.encoded_len() + record.room(room) + 4
}

/// Writes the log entry of `key` (an encoded [`crate::Key`]) and `record`, written at
/// `stamp`, with `room` bytes reserved after an in-flight record, into `out`, which is
/// exactly [`entry_len`] bytes long (a buffer the storage engine reserved: a large response is
/// copied once, straight into the page that stores it).
pub(crate) fn write_entry(key: &[u8], record: &Record, stamp: Stamp, room: usize, out: &mut [u8]) {
    let mut w = Writer { out, pos: 0 };
    // Encoded keys are at most 511 bytes (two parts of at most 255 and a length byte).
    w.put(&(key.len() as u16).to_be_bytes());
    w.put(key);
    record.encode_to(stamp, record.room(room), &mut w);
    let end = w.pos;
    let crc = crc32fast::hash(&w.out[..end]);
    w.put(&crc.to_be_bytes());
}

/// [`write_entry`] into a new vector.
#[cfg(test)]
pub(crate) fn encode_entry(key: &[u8], record: &Record, stamp: Stamp, room: usize) -> Vec<u8> {
    let mut out = vec![0; entry_len(key, record, room)];
    write_entry(key, record, stamp, room, &mut out);
    out
}

/// Verifies a log entry's checksum and splits it into the encoded key and the record bytes.
///
/// # Errors
/// [`Error::Corrupt`] if the checksum does not match or the entry is shorter than its framing.
pub(crate) fn split_entry(entry: &[u8]) -> Result<(&[u8], &[u8])> {
    let (body, crc) = entry
        .split_last_chunk::<4>()
        .ok_or_else(|| Error::corrupt("a log entry is shorter than its checksum"))?;
    if crc32fast::hash(body) != u32::from_be_bytes(*crc) {
        return Err(Error::corrupt(
            "a log entry fails its checksum (its bytes were damaged on disk)",
        ));
    }
    let (len, rest) = body
        .split_first_chunk::<2>()
        .ok_or_else(|| Error::corrupt("a log entry is shorter than its key length"))?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return Err(Error::corrupt("a log entry is shorter than its key"));
    }
    Ok(rest.split_at(len))
}

/// Codec version of a record without room.
pub(crate) const RECORD_VERSION: u8 = 2;
/// Codec version of an in-flight record followed by room for its response.
const ROOMY_VERSION: u8 = 3;
const STATE_IN_FLIGHT: u8 = 1;
const STATE_COMPLETED: u8 = 2;
const HEADER_LEN: usize = 54;

/// One key's record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub fingerprint: [u8; 32],
    pub token: u64,
    pub state: State,
}

/// The two stored states of a key (absent is "no record").
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
        /// Shared with the [`Completed`](crate::Completed) answers made from it (no copy).
        response: Arc<Vec<u8>>,
    },
}

impl Record {
    /// The instant from which the record counts as absent: completed records die
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

    /// Moves every time of the record `by` nanoseconds back (saturating): a record written
    /// while the clock ran ahead, seen after the clock was corrected ([`crate::timeline`]).
    pub fn shift_back(&mut self, by: u64) {
        let back = |t: &mut u64| *t = t.saturating_sub(by);
        match &mut self.state {
            State::InFlight {
                created_at,
                ttl_deadline,
                lease_expires_at,
                ..
            } => {
                back(created_at);
                back(ttl_deadline);
                back(lease_expires_at);
            }
            State::Completed {
                completed_at,
                expires_at,
                ..
            } => {
                back(completed_at);
                back(expires_at);
            }
        }
    }

    /// The death time and write stamp of an encoded record, reading only its fixed-size
    /// fields (the reaper's check, without copying the response).
    pub fn peek(bytes: &[u8]) -> Result<(u64, Stamp)> {
        let mut r = Reader { bytes, pos: 0 };
        if !matches!(r.u8()?, RECORD_VERSION | ROOMY_VERSION) {
            return Err(Error::corrupt("record codec version"));
        }
        let tag = r.u8()?;
        // Fingerprint and token.
        r.take(40)?;
        let stamp = Stamp {
            at: r.u64()?,
            epoch: r.u32()?,
        };
        // created_at / completed_at
        r.take(8)?;
        let deadline = r.u64()?;
        let dies_at = match tag {
            // max(ttl_deadline, lease_expires_at)
            STATE_IN_FLIGHT => deadline.max(r.u64()?),
            // expires_at
            STATE_COMPLETED => deadline,
            other => return Err(Error::corrupt(format!("record state tag {other}"))),
        };
        Ok((dies_at, stamp))
    }

    /// The fencing token of an encoded record, reading only its header.
    pub fn peek_token(bytes: &[u8]) -> Result<u64> {
        let mut r = Reader { bytes, pos: 0 };
        if !matches!(r.u8()?, RECORD_VERSION | ROOMY_VERSION) {
            return Err(Error::corrupt("record codec version"));
        }
        r.take(33)?;
        r.u64()
    }

    /// The room this record takes when `room` is asked for: `room` for an in-flight record,
    /// none for a completed one (it does not grow again).
    fn room(&self, room: usize) -> usize {
        match self.state {
            State::InFlight { .. } => room,
            State::Completed { .. } => 0,
        }
    }

    /// The room an in-flight record needs so that its completed form, with a response of
    /// `response_len` bytes, is no longer than it and its room: the completed record's length
    /// less this one's (0 for a completed record, or when the completed form is not longer).
    pub fn room_for(&self, response_len: usize) -> usize {
        match self.state {
            State::InFlight { .. } => {
                (HEADER_LEN + 20 + response_len).saturating_sub(self.encoded_len())
            }
            State::Completed { .. } => 0,
        }
    }

    /// The length of the encoding, without room.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match &self.state {
                State::InFlight { checkpoint, .. } => {
                    29 + checkpoint.as_ref().map_or(0, |c| 4 + c.len())
                }
                State::Completed { response, .. } => 20 + response.len(),
            }
    }

    /// Encodes the record (format above), written at `stamp`.
    #[cfg(any(test, fuzzing))]
    pub fn encode(&self, stamp: Stamp) -> Vec<u8> {
        self.encode_with_room(stamp, 0)
    }

    /// Encodes the record (format above), written at `stamp`, followed by `room` bytes of
    /// room if it is in flight.
    #[cfg(any(test, fuzzing))]
    pub fn encode_with_room(&self, stamp: Stamp, room: usize) -> Vec<u8> {
        let room = self.room(room);
        let mut out = vec![0; self.encoded_len() + room];
        self.encode_to(
            stamp,
            room,
            &mut Writer {
                out: &mut out,
                pos: 0,
            },
        );
        out
    }

    /// Encodes the record into `out`, followed by `room` zero bytes (an in-flight record
    /// only: `room` is 0 for a completed one).
    fn encode_to(&self, stamp: Stamp, room: usize, out: &mut Writer<'_>) {
        out.put(&[
            if room > 0 {
                ROOMY_VERSION
            } else {
                RECORD_VERSION
            },
            match self.state {
                State::InFlight { .. } => STATE_IN_FLIGHT,
                State::Completed { .. } => STATE_COMPLETED,
            },
        ]);
        out.put(&self.fingerprint);
        out.put(&self.token.to_be_bytes());
        out.put(&stamp.at.to_be_bytes());
        out.put(&stamp.epoch.to_be_bytes());
        match &self.state {
            State::InFlight {
                created_at,
                ttl_deadline,
                lease_expires_at,
                attempt,
                checkpoint,
            } => {
                out.put(&created_at.to_be_bytes());
                out.put(&ttl_deadline.to_be_bytes());
                out.put(&lease_expires_at.to_be_bytes());
                out.put(&attempt.to_be_bytes());
                match checkpoint {
                    None => out.put(&[0]),
                    Some(c) => {
                        out.put(&[1]);
                        out.put(&len_u32(c.len()).to_be_bytes());
                        out.put(c);
                    }
                }
            }
            State::Completed {
                completed_at,
                expires_at,
                response,
            } => {
                out.put(&completed_at.to_be_bytes());
                out.put(&expires_at.to_be_bytes());
                out.put(&len_u32(response.len()).to_be_bytes());
                out.put(response.as_slice());
            }
        }
        // The buffer may be one the storage engine reserved: its bytes are not zeroed.
        out.zeros(room);
    }

    /// Decodes a record and the stamp it was written at; bad bytes give [`Error::Corrupt`],
    /// never a panic.
    pub fn decode(bytes: &[u8]) -> Result<(Record, Stamp)> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if !matches!(version, RECORD_VERSION | ROOMY_VERSION) {
            return Err(Error::corrupt(format!(
                "record codec version {version}, this build reads versions {RECORD_VERSION} \
                 and {ROOMY_VERSION}"
            )));
        }
        let tag = r.u8()?;
        if version == ROOMY_VERSION && tag != STATE_IN_FLIGHT {
            return Err(Error::corrupt(format!(
                "a record of codec version {ROOMY_VERSION} in state {tag}, not in flight"
            )));
        }
        let fingerprint: [u8; 32] = r
            .take(32)?
            .try_into()
            .map_err(|_| Error::corrupt("record fingerprint"))?;
        let token = r.u64()?;
        let stamp = Stamp {
            at: r.u64()?,
            epoch: r.u32()?,
        };
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
                    response: Arc::new(r.take(n)?.to_vec()),
                }
            }
            other => return Err(Error::corrupt(format!("record state tag {other}"))),
        };
        let rest = &bytes[r.pos..];
        match version {
            RECORD_VERSION if !rest.is_empty() => {
                return Err(Error::corrupt(format!(
                    "{} trailing bytes after the record",
                    rest.len()
                )));
            }
            ROOMY_VERSION if rest.is_empty() || rest.iter().any(|&b| b != 0) => {
                return Err(Error::corrupt(
                    "the room after an in-flight record is missing or not zeros",
                ));
            }
            _ => {}
        }
        Ok((
            Record {
                fingerprint,
                token,
                state,
            },
            stamp,
        ))
    }
}

/// Writes into a buffer of exactly the right length.
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    fn zeros(&mut self, n: usize) {
        self.out[self.pos..self.pos + n].fill(0);
        self.pos += n;
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
                    response: Arc::new(b"hello".to_vec()),
                },
            },
        ] {
            let stamp = Stamp { at: 77, epoch: 3 };
            let bytes = r.encode(stamp);
            assert_eq!(bytes.len(), r.encoded_len());
            assert_eq!(Record::decode(&bytes).unwrap(), (r.clone(), stamp));
            assert_eq!(Record::peek(&bytes).unwrap(), (r.dies_at(), stamp));
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

    #[test]
    fn an_in_flight_record_with_room_round_trips_and_its_room_must_be_zeros() {
        let stamp = Stamp { at: 77, epoch: 3 };
        for r in [in_flight(None), in_flight(Some(b"step 2".to_vec()))] {
            for room in [1, 191, 1024] {
                let bytes = r.encode_with_room(stamp, room);
                assert_eq!(bytes[0], ROOMY_VERSION);
                assert_eq!(bytes.len(), r.encoded_len() + room);
                assert_eq!(Record::decode(&bytes).unwrap(), (r.clone(), stamp));
                assert_eq!(Record::peek(&bytes).unwrap(), (r.dies_at(), stamp));
                assert_eq!(Record::peek_token(&bytes).unwrap(), r.token);
                // Cut short of the room's first byte: refused (version 3 without room too).
                for cut in 0..=r.encoded_len() {
                    assert!(matches!(
                        Record::decode(&bytes[..cut]),
                        Err(Error::Corrupt { .. })
                    ));
                }
                // Cut inside the room: the same record, with less room.
                for cut in r.encoded_len() + 1..bytes.len() {
                    assert_eq!(Record::decode(&bytes[..cut]).unwrap(), (r.clone(), stamp));
                }
                for at in r.encoded_len()..bytes.len() {
                    let mut bad = bytes.clone();
                    bad[at] = 1;
                    assert!(matches!(Record::decode(&bad), Err(Error::Corrupt { .. })));
                }
            }
        }
    }

    #[test]
    fn a_completed_record_takes_no_room_and_version_3_of_it_is_refused() {
        let done = Record {
            fingerprint: [1; 32],
            token: 9,
            state: State::Completed {
                completed_at: 5,
                expires_at: 50,
                response: Arc::new(b"hello".to_vec()),
            },
        };
        let stamp = Stamp { at: 77, epoch: 3 };
        assert_eq!(done.encode_with_room(stamp, 100), done.encode(stamp));
        assert_eq!(done.room_for(1000), 0);
        let mut bytes = done.encode(stamp);
        bytes[0] = ROOMY_VERSION;
        assert!(matches!(Record::decode(&bytes), Err(Error::Corrupt { .. })));
        bytes.push(0);
        assert!(matches!(Record::decode(&bytes), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn room_for_a_response_makes_the_completed_entry_fit_exactly() {
        let done = |response: Vec<u8>| Record {
            fingerprint: [7; 32],
            token: 42,
            state: State::Completed {
                completed_at: 2,
                expires_at: 3,
                response: Arc::new(response),
            },
        };
        for (claim, response) in [
            (in_flight(None), 200),
            (in_flight(None), 9),
            (in_flight(Some(vec![5; 40])), 300),
        ] {
            let room = claim.room_for(response);
            assert_eq!(
                entry_len(b"k", &claim, room),
                entry_len(b"k", &done(vec![0; response]), 0),
                "room {room} for a {response}-byte response"
            );
        }
        // A completed form shorter than the claim needs no room.
        assert_eq!(in_flight(Some(vec![5; 40])).room_for(0), 0);
        assert_eq!(in_flight(None).room_for(3), 0);
    }

    #[test]
    fn entries_carry_a_checksum_that_catches_any_flipped_byte() {
        let r = in_flight(Some(b"step 2".to_vec()));
        let entry = encode_entry(b"key", &r, Stamp { at: 5, epoch: 1 }, 0);
        let (key, record) = split_entry(&entry).unwrap();
        assert_eq!((key, Record::decode(record).unwrap().0), (&b"key"[..], r));
        for i in 0..entry.len() {
            for bit in 0..8 {
                let mut bad = entry.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    matches!(split_entry(&bad), Err(Error::Corrupt { .. })),
                    "flip of bit {bit} of byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn shifting_back_moves_every_time() {
        let mut r = in_flight(None);
        r.shift_back(50);
        assert_eq!(r.dies_at(), 150);
        r.shift_back(u64::MAX);
        assert_eq!(r.dies_at(), 0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn encode_decode_identity(token: u64, a: u64, b: u64, resp in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = Record { fingerprint: [9; 32], token, state: State::Completed { completed_at: a, expires_at: b, response: Arc::new(resp) } };
            let stamp = Stamp { at: a, epoch: 0 };
            prop_assert_eq!(Record::decode(&r.encode(stamp)).unwrap(), (r, stamp));
        }
    }
}
