//! The record codec (`src/record.rs`, reached through the hidden `idemstore::__fuzz` hooks).
//!
//! * Raw bytes: decoding never panics; a refusal is `Error::Corrupt`; bytes that decode
//!   re-encode to exactly themselves (the format has one encoding per record and room); the reaper's
//!   partial read (`peek_dies_at`) agrees with the full decode.
//! * Structured records: the encoding of arbitrary field values is byte for byte the layout
//!   documented in `src/record.rs` (built here by hand), decodes back to itself, and dies
//!   when the state table says (completed: `expires_at`; in flight: `max(ttl_deadline,
//!   lease_expires_at)`). Every strict prefix of it is refused, and it with a byte appended
//!   (an in-flight record with room: a non-zero byte); only a record with room cut inside
//!   its room decodes, to itself with less room.
//!
//! The first input byte picks the mode (even: raw, odd: structured).
#![no_main]

use idemstore::__fuzz as codec;
use idemstore::Error;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn check_raw(bytes: &[u8]) {
    match codec::record_roundtrip(bytes) {
        Ok(again) => assert_eq!(again, bytes, "encode(decode(x)) != x"),
        Err(Error::Corrupt { .. }) => {}
        Err(other) => panic!("decode refused with {other:?}, not Corrupt"),
    }
    assert!(
        codec::peek_matches_decode(bytes),
        "peek_dies_at disagrees with decode"
    );
}

/// The documented layout: version 2, or 3 for an in-flight record with room.
fn documented(
    version: u8,
    fp: &[u8; 32],
    token: u64,
    (written_at, epoch): (u64, u32),
    state_tag: u8,
    rest: &[u8],
) -> Vec<u8> {
    let mut v = vec![version, state_tag];
    v.extend_from_slice(fp);
    v.extend_from_slice(&token.to_be_bytes());
    v.extend_from_slice(&written_at.to_be_bytes());
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(rest);
    v
}

fn check_structured(u: &mut Unstructured<'_>) -> Result<()> {
    let fp: [u8; 32] = u.arbitrary()?;
    let token: u64 = u.arbitrary()?;
    let (a, b, c): (u64, u64, u64) = u.arbitrary()?;
    let stamp: (u64, u32) = u.arbitrary()?;
    let in_flight: bool = u.arbitrary()?;
    let mut room = 0;
    let (encoded, expected, dies_at) = if in_flight {
        let attempt: u32 = u.arbitrary()?;
        let checkpoint: Option<&[u8]> = if u.arbitrary()? {
            let len = usize::from(u.arbitrary::<u8>()?);
            Some(u.bytes(len.min(u.len()))?)
        } else {
            None
        };
        room = usize::from(u.arbitrary::<u8>()? % 4) * 100;
        let encoded =
            codec::encode_in_flight(fp, token, stamp, a, b, c, attempt, checkpoint, room);
        let mut rest = Vec::new();
        rest.extend_from_slice(&a.to_be_bytes());
        rest.extend_from_slice(&b.to_be_bytes());
        rest.extend_from_slice(&c.to_be_bytes());
        rest.extend_from_slice(&attempt.to_be_bytes());
        match checkpoint {
            None => rest.push(0),
            Some(cp) => {
                rest.push(1);
                rest.extend_from_slice(&(cp.len() as u32).to_be_bytes());
                rest.extend_from_slice(cp);
            }
        }
        rest.resize(rest.len() + room, 0);
        let version = if room > 0 { 3 } else { 2 };
        (
            encoded,
            documented(version, &fp, token, stamp, 1, &rest),
            b.max(c),
        )
    } else {
        let response = u.bytes(u.len())?;
        let encoded = codec::encode_completed(fp, token, stamp, a, b, response);
        let mut rest = Vec::new();
        rest.extend_from_slice(&a.to_be_bytes());
        rest.extend_from_slice(&b.to_be_bytes());
        rest.extend_from_slice(&(response.len() as u32).to_be_bytes());
        rest.extend_from_slice(response);
        (encoded, documented(2, &fp, token, stamp, 2, &rest), b)
    };
    assert_eq!(
        encoded, expected,
        "encoding differs from the documented layout"
    );
    check_raw(&encoded);
    assert_eq!(
        codec::record_roundtrip(&encoded).ok().as_deref(),
        Some(encoded.as_slice()),
        "a structured record does not decode"
    );
    assert_eq!(codec::record_dies_at(&encoded), Some(dies_at), "death time");
    let without_room = encoded.len() - room;
    for cut in without_room + 1..encoded.len() {
        assert_eq!(
            codec::record_roundtrip(&encoded[..cut]).ok().as_deref(),
            Some(&encoded[..cut]),
            "a record cut inside its room does not decode"
        );
    }
    for cut in 0..=without_room.min(encoded.len() - 1) {
        assert!(
            codec::record_roundtrip(&encoded[..cut]).is_err(),
            "a {cut}-byte prefix of a {}-byte record decodes",
            encoded.len()
        );
    }
    let mut long = encoded;
    long.push(if long[0] == 3 { 1 } else { 0 });
    assert!(
        codec::record_roundtrip(&long).is_err(),
        "a record with a trailing byte decodes"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        check_raw(data);
        return;
    };
    if mode % 2 == 0 {
        check_raw(rest);
    } else {
        let _ = check_structured(&mut Unstructured::new(rest));
    }
});
