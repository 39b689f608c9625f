//! The PostgreSQL engine's SQL layer (feature `postgres`): several replicas of a service
//! share one database.
//!
//! - `schema`: idemstore's tables, index and sequence, created on first open and checked
//!   on every later one;
//! - `sql`: the statements of a write batch (key locks, load, tokens, upsert, delete, the
//!   server's clock), of the reads and of the reaper;
//! - `pool`: the r2d2 connection pool, and the connections the readers keep;
//! - `pipeline`: a writer's connection (from an r2d2 pool of the writers' own), on which a
//!   batch's statements are sent together (two round trips per batch);
//! - `engine`: the store's side (reads, `complete_in`) and the committer's (a batch as one
//!   transaction on a writer's connection);
//! - `off_runtime`: one-time work of the synchronous client (the open, closing the
//!   connections) moved off a thread that drives an async runtime;
//! - `error`: the client's errors as [`crate::Error`], and which of them leave a write's
//!   outcome unknown or can be retried.

pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod off_runtime;
pub(crate) mod pipeline;
pub(crate) mod pool;
pub(crate) mod schema;
pub(crate) mod sql;

#[cfg(test)]
mod testdb;
