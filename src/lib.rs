//! # idemstore
//!
//! An embedded, synchronous, framework-agnostic store that makes mutating requests
//! idempotent, on a single [redb](https://docs.rs/redb) file.
//!
//! For every request that carries an `Idempotency-Key`, ask [`Store::begin`] what to do:
//! run the request ([`Begin::Started`] with a fenced [`Lease`]), replay the stored response
//! ([`Begin::Replay`]), answer "in progress" ([`Begin::InFlight`], HTTP 409) or refuse a key
//! reused for another payload ([`Begin::Mismatch`], HTTP 422).
//!
//! ```
//! use idemstore::{Begin, Fingerprint, Key, Store};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path().join("idempotency.redb"))?;
//! let key = Key::new("tenant-42", "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11")?;
//! let body = br#"{"amount":100}"#;
//! let fp = Fingerprint::builder().part(b"POST").part(b"/v1/charges").part(body).finish();
//!
//! let response = match store.begin(&key, &fp)? {
//!     Begin::Started(lease) => {
//!         let response = b"201 charge ch_1".to_vec(); // run the request here
//!         lease.complete(&response)?.response().to_vec()
//!     }
//!     Begin::Replay(done) => done.response().to_vec(),
//!     Begin::InFlight { retry_after } => panic!("409, retry in {retry_after:?}"),
//!     Begin::Mismatch => panic!("422"),
//!     _ => unreachable!(),
//! };
//! assert_eq!(response, b"201 charge ch_1");
//! store.close()?;
//! # Ok::<(), idemstore::Error>(())
//! ```
//!
//! The layout of the source follows the design: `machine` holds the pure state
//! transitions, `record` the stored codec, `storage` the redb tables, `timeline` the store's
//! time, `committer` the group commit thread, `reaper` the TTL reaper, `clock`,
//! `fingerprint`, `key` and `error` the rest. The public modules beside the core are
//! [`admin`] (views for tools), and with their features `client`, `http` and `tower` (an
//! async layer for axum, hyper and any tower service, which never blocks the runtime).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod clock;
mod committer;
mod config;
mod error;
mod fingerprint;
mod handoff;
mod index;
mod key;
mod lease;
mod machine;
#[cfg(any(feature = "postgres", feature = "tower"))]
mod may_block;
mod outcome;
mod periodic;
#[cfg(feature = "postgres")]
mod postgres;
mod reaper;
mod record;
mod redb_file;
mod saver;
mod stats;
mod storage;
mod store;
mod timeline;

pub mod admin;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Durability, MAX_RESPONSE_LIMIT};
pub use error::{Error, Result};
pub use fingerprint::{Fingerprint, FingerprintBuilder};
pub use key::{Key, MAX_KEY_PART_BYTES};
pub use lease::Lease;
pub use outcome::{Begin, Completed, Entry, Recovered};
pub use stats::Stats;
pub use store::{Builder, Store};

/// redb's storage-backend trait and backends, for [`Builder::open_backend`] (fault injection,
/// crash images), with the off-by-default feature `test-backend`. They are redb's types and
/// follow redb's major version: not part of idemstore's stable API.
#[cfg(feature = "test-backend")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-backend")))]
pub use redb::{StorageBackend, backends};

/// Hooks for the fuzz targets in `fuzz/`, built only under `cfg(fuzzing)` (cargo-fuzz sets
/// it): a user's build never contains them.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz;

/// The README's examples, compiled and run as doc tests (they use every feature).
#[cfg(all(doctest, feature = "postgres", feature = "tower", feature = "client"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
