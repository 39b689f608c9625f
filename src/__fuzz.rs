//! Hooks for the fuzz targets in `fuzz/` (`record_codec`): thin wrappers around the
//! crate-private record codec (`crate::record`).
//!
//! **Not part of the API.** Hidden from the docs, exempt from semver: it may change or go
//! away in any release. Do not use it outside the fuzz targets.

use crate::error::Result;
use crate::record::{Record, State};
use crate::timeline::Stamp;

/// Decodes `bytes` as a record and encodes the result again, with the room that followed it:
/// `Ok(encode(decode(bytes)))`, or the decoding error (always
/// [`Error::Corrupt`](crate::Error::Corrupt)).
///
/// # Errors
/// As the codec's decoding.
pub fn record_roundtrip(bytes: &[u8]) -> Result<Vec<u8>> {
    Record::decode(bytes).map(|(r, stamp)| {
        let room = bytes.len() - r.encoded_len();
        r.encode_with_room(stamp, room)
    })
}

/// Whether the reaper's partial read of a record agrees with a full decode: when `bytes`
/// decode, their peeked death time is the record's. `true` for bytes that don't decode.
pub fn peek_matches_decode(bytes: &[u8]) -> bool {
    match Record::decode(bytes) {
        Ok((r, stamp)) => Record::peek(bytes).ok() == Some((r.dies_at(), stamp)),
        Err(_) => true,
    }
}

/// The death time of the record `bytes` decode to, `None` if they don't decode.
pub fn record_dies_at(bytes: &[u8]) -> Option<u64> {
    Record::decode(bytes).ok().map(|(r, _)| r.dies_at())
}

/// Encodes an in-flight record with these fields, written at `written_at` in clock epoch
/// `epoch`, followed by `room` bytes of room for its response.
#[allow(clippy::too_many_arguments)]
pub fn encode_in_flight(
    fingerprint: [u8; 32],
    token: u64,
    (written_at, epoch): (u64, u32),
    created_at: u64,
    ttl_deadline: u64,
    lease_expires_at: u64,
    attempt: u32,
    checkpoint: Option<&[u8]>,
    room: usize,
) -> Vec<u8> {
    Record {
        fingerprint,
        token,
        state: State::InFlight {
            created_at,
            ttl_deadline,
            lease_expires_at,
            attempt,
            checkpoint: checkpoint.map(<[u8]>::to_vec),
        },
    }
    .encode_with_room(
        Stamp {
            at: written_at,
            epoch,
        },
        room,
    )
}

/// Encodes a completed record with these fields, written at `written_at` in clock epoch
/// `epoch`.
pub fn encode_completed(
    fingerprint: [u8; 32],
    token: u64,
    (written_at, epoch): (u64, u32),
    completed_at: u64,
    expires_at: u64,
    response: &[u8],
) -> Vec<u8> {
    Record {
        fingerprint,
        token,
        state: State::Completed {
            completed_at,
            expires_at,
            response: std::sync::Arc::new(response.to_vec()),
        },
    }
    .encode(Stamp {
        at: written_at,
        epoch,
    })
}
