//! `Key::new` and the fingerprint builder on arbitrary input.
//!
//! * `Key::new(scope, id)` never panics; it accepts exactly the keys that obey the documented key rules (`id`:
//!   1–255 bytes of printable ASCII 0x20–0x7E, not only spaces; `scope`: 0–255 bytes of any
//!   UTF-8, which `&str` already is), checked here independently; a refusal is
//!   `Error::InvalidKey`; an accepted key gives its parts back unchanged; keys split
//!   differently (`("a", "bc")` vs `("ab", "c")`) are different.
//! * `Fingerprint::builder().part(..)…finish()` equals SHA-256 over each part framed as its
//!   length (8 bytes, big-endian) followed by its bytes, computed here by hand with `sha2`;
//!   `Fingerprint::of(x)` is exactly SHA-256(x); `from_bytes`/`as_bytes` round-trip; `Display`
//!   is the lowercase hex of the bytes; equality is the equality of the bytes.
#![no_main]

use idemstore::{Error, Fingerprint, Key};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// The key rules as `Key::new` documents them, written from the docs, not from the code.
fn spec_accepts(scope: &str, id: &str) -> bool {
    let id_ok = (1..=255).contains(&id.len())
        && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && id.bytes().any(|b| b != b' ');
    let scope_ok = scope.len() <= 255;
    id_ok && scope_ok
}

/// A string from the input: a length byte, then that many bytes; invalid UTF-8 is replaced, so
/// both ASCII-only and multi-byte strings come out (lengths up to 255 + growth from replacement
/// characters, so the 255-byte limits are crossed both ways).
fn string(u: &mut Unstructured<'_>, long: bool) -> String {
    let len = usize::from(u.arbitrary::<u8>().unwrap_or(0)) + if long { 200 } else { 0 };
    let bytes = u.bytes(len.min(u.len())).unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

fn check_key(scope: &str, id: &str) {
    match Key::new(scope, id) {
        Ok(key) => {
            assert!(
                spec_accepts(scope, id),
                "Key::new accepted a key the documented rules refuse: scope {scope:?}, id {id:?}"
            );
            assert_eq!(key.scope(), scope);
            assert_eq!(key.id(), id);
            assert_eq!(key, key.clone());
            // The same characters split at another place: another key.
            if !id.is_empty() {
                let (first, rest) = id.split_at(1);
                let moved = format!("{scope}{first}");
                if let Ok(other) = Key::new(&moved, rest) {
                    assert_ne!(key, other, "keys split differently compare equal");
                }
            }
        }
        Err(Error::InvalidKey { reason }) => {
            assert!(
                !spec_accepts(scope, id),
                "Key::new refused a key the documented rules allow ({reason}): scope {scope:?}, id {id:?}"
            );
            assert!(!reason.is_empty(), "InvalidKey without a reason");
        }
        Err(other) => panic!("Key::new failed with {other:?}, not InvalidKey"),
    }
}

/// SHA-256 over the documented framing, by hand.
fn framed(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn check_fingerprint(parts: &[&[u8]]) {
    let mut builder = Fingerprint::builder();
    for p in parts {
        builder = builder.part(p);
    }
    let fp = builder.finish();
    assert_eq!(
        fp.as_bytes(),
        &framed(parts),
        "builder differs from SHA-256 over the documented framing"
    );
    // The framing, concatenated, is what `of` hashes.
    let mut concat = Vec::new();
    for p in parts {
        concat.extend_from_slice(&(p.len() as u64).to_be_bytes());
        concat.extend_from_slice(p);
    }
    assert_eq!(Fingerprint::of(&concat), fp);

    // `of` is plain SHA-256.
    let whole: Vec<u8> = parts.concat();
    let of = Fingerprint::of(&whole);
    let digest: [u8; 32] = Sha256::digest(&whole).into();
    assert_eq!(of.as_bytes(), &digest, "Fingerprint::of is not SHA-256");

    // Bytes, hex and equality.
    assert_eq!(Fingerprint::from_bytes(*fp.as_bytes()), fp);
    let hex: String = fp.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(fp.to_string(), hex);
    assert_eq!(fp == of, fp.as_bytes() == of.as_bytes());
    // Parts can't run into each other: one part holding everything differs from several
    // (unless there is exactly one part).
    if parts.len() != 1 {
        assert_ne!(
            Fingerprint::builder().part(&whole).finish(),
            fp,
            "parts ran into each other"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let flags = u.arbitrary::<u8>().unwrap_or(0);
    let scope = string(&mut u, flags & 1 != 0);
    let id = string(&mut u, flags & 2 != 0);
    check_key(&scope, &id);
    // The remaining input as fingerprint parts: a length byte, then the bytes.
    let mut parts: Vec<&[u8]> = Vec::new();
    while !u.is_empty() && parts.len() < 16 {
        let len = usize::from(u.arbitrary::<u8>().unwrap_or(0));
        parts.push(u.bytes(len.min(u.len())).unwrap_or_default());
    }
    check_fingerprint(&parts);
});
