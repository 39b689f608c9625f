//! Test support for idemstore, shared by its tests, benches, examples and fuzz targets. Not
//! published: nothing here is part of the library.
//!
//! * [`engine`]: the engines a test runs on (redb in memory, redb on a file, PostgreSQL),
//!   where its store lives, and the `engine_tests!` macro that runs each test on each;
//! * [`store`]: the test builders (a `ManualClock`, no reaper thread), a store at a place of
//!   any engine, and `begin`/`get` helpers that expect one answer;
//! * [`model`]: the operation enum, the reference model of the store's contract and the
//!   checker that runs both side by side (the proptest model test and a fuzz target);
//! * [`fault`]: the fault-injecting redb storage backend and the crash images it keeps;
//! * [`crash`]: the check that a crash image opens as a store holding what was acknowledged;
//! * [`events`]: a process-wide capture of the `tracing` events idemstore emits;
//! * [`rng`]: the seeded random generator;
//! * [`http`]: raw HTTP on the loopback;
//! * [`programs`]: where the built example programs are, for tests that run them;
//! * [`pg`]: the PostgreSQL test cluster's conninfo, or a loud skip;
//! * `peers` (feature `peers`): the peers and baselines of the benchmarks.

pub mod child;
pub mod crash;
pub mod engine;
pub mod events;
pub mod fault;
pub mod http;
pub mod model;
#[cfg(feature = "peers")]
pub mod peers;
pub mod pg;
pub mod programs;
pub mod rng;
pub mod store;
