//! One suite, every engine: where a test's store lives ([`Place`]), on which engine
//! ([`Engine`]), and the [`engine_tests!`](crate::engine_tests) macro that runs each listed
//! test function once per engine, as its own `#[test]`.
//!
//! A test is a plain function `fn name(place: &Place)`; it opens its store (as often as it
//! likes: the same place again is the same file or the same PostgreSQL schema) with
//! [`Place::open`]. The macro turns a list of them into `mod memory { #[test] fn name() }`,
//! `mod redb { … }` and `mod postgres { … }`, so `cargo test postgres::` runs the PostgreSQL
//! half and a failure names its engine.
//!
//! PostgreSQL (feature `postgres`): the cluster named by `IDEMSTORE_PG` (`.ci/pg run --`
//! sets it), a fresh schema of a random name per place, dropped (with everything in it) when
//! the place is dropped. Without `IDEMSTORE_PG` the PostgreSQL tests say loudly on stderr that
//! they are skipped and return; with `CI=true` they fail instead, so CI never passes them
//! unrun.

use std::path::{Path, PathBuf};

use idemstore::{Builder, Result, Store};
use tempfile::TempDir;

/// The engines a store can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// redb on an in-memory backend: nothing survives a close.
    Memory,
    /// redb on a file in a temporary directory.
    Redb,
    /// PostgreSQL: a schema of its own on the test cluster.
    #[cfg(feature = "postgres")]
    Postgres,
}

impl Engine {
    /// Whether a store opened again at the same place sees what the last one stored (every
    /// engine but [`Engine::Memory`]).
    pub fn durable(self) -> bool {
        self != Engine::Memory
    }
}

/// Where one test's store lives: nothing (in memory), a temporary directory and a file name
/// (redb), or a conninfo and a fresh schema (PostgreSQL). Cleaned up when dropped.
pub struct Place {
    engine: Engine,
    at: At,
}

enum At {
    Memory,
    File {
        path: PathBuf,
        // Held for its `Drop`: removes the directory.
        _dir: TempDir,
    },
    #[cfg(feature = "postgres")]
    Postgres(Box<pg::Schema>),
}

impl Place {
    /// A new, empty place on `engine`, or `None` when the engine is not available here (no
    /// `IDEMSTORE_PG` outside CI), after saying so on stderr.
    ///
    /// # Panics
    ///
    /// When the temporary directory cannot be made, and for PostgreSQL with `CI=true` and no
    /// `IDEMSTORE_PG`, or when the cluster cannot be reached.
    pub fn new(engine: Engine) -> Option<Place> {
        let at = match engine {
            Engine::Memory => At::Memory,
            Engine::Redb => {
                let dir = tempfile::tempdir().expect("temporary directory");
                At::File {
                    path: dir.path().join("idem.redb"),
                    _dir: dir,
                }
            }
            #[cfg(feature = "postgres")]
            Engine::Postgres => At::Postgres(Box::new(pg::Schema::new()?)),
        };
        Some(Place { engine, at })
    }

    /// The engine of this place.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Opens a store here with `builder`: a new one in memory; otherwise the file or the
    /// schema, created on the first open and found again by every later one.
    ///
    /// # Errors
    ///
    /// As [`Builder::open_in_memory`], [`Builder::open`] or `Builder::open_postgres`.
    pub fn open(&self, builder: Builder) -> Result<Store> {
        match &self.at {
            At::Memory => builder.open_in_memory(),
            At::File { path, .. } => builder.open(path),
            #[cfg(feature = "postgres")]
            At::Postgres(schema) => builder
                .postgres_schema(schema.name.clone())
                .open_postgres(&schema.conninfo),
        }
    }

    /// Whether an open created anything here yet: the file (redb), the schema (PostgreSQL);
    /// always false in memory.
    ///
    /// # Panics
    ///
    /// When the PostgreSQL catalogue cannot be read.
    pub fn created(&self) -> bool {
        match &self.at {
            At::Memory => false,
            At::File { path, .. } => path.exists(),
            #[cfg(feature = "postgres")]
            At::Postgres(schema) => schema.exists(),
        }
    }

    /// The store file, for a redb place on a file.
    pub fn path(&self) -> Option<&Path> {
        match &self.at {
            At::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The cluster's conninfo and the schema's name, for a PostgreSQL place.
    #[cfg(feature = "postgres")]
    pub fn postgres(&self) -> Option<(&str, &str)> {
        match &self.at {
            At::Postgres(s) => Some((&s.conninfo, &s.name)),
            _ => None,
        }
    }
}

/// Runs `test` on a new place on `engine`; returns at once (after saying so) when the engine
/// is not available here. What the macro's tests call.
pub fn run(engine: Engine, test: impl FnOnce(&Place)) {
    if let Some(place) = Place::new(engine) {
        test(&place);
    }
}

/// The PostgreSQL side: the skip-or-fail rule and the schema of one place.
#[cfg(feature = "postgres")]
pub mod pg {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The test cluster's conninfo, or a loud skip (see [`crate::pg::conninfo`]).
    pub use crate::pg::conninfo;

    /// A new connection to the test cluster.
    ///
    /// # Panics
    ///
    /// When the cluster cannot be reached.
    pub fn connect(conninfo: &str) -> postgres::Client {
        postgres::Client::connect(conninfo, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to IDEMSTORE_PG ({conninfo}): {e}"))
    }

    /// A schema name of its own (the schema is created by the store's first open), dropped
    /// with everything in it when this is dropped.
    pub struct Schema {
        /// The test cluster.
        pub conninfo: String,
        /// The schema's name: lowercase letters, digits and underscores, no quoting needed.
        pub name: String,
        admin: postgres::Client,
    }

    impl Schema {
        /// A fresh schema name on the test cluster, or `None` when the tests skip (see
        /// [`conninfo`]).
        ///
        /// # Panics
        ///
        /// As [`conninfo`], and when the cluster cannot be reached.
        pub fn new() -> Option<Schema> {
            static SERIAL: AtomicU64 = AtomicU64::new(0);
            let conninfo = conninfo()?;
            let admin = connect(&conninfo);
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u64(SERIAL.fetch_add(1, Ordering::Relaxed));
            let name = format!("idemstore_it_{:016x}", h.finish());
            Some(Schema {
                conninfo,
                name,
                admin,
            })
        }
    }

    impl Schema {
        /// Whether the schema exists on the cluster.
        ///
        /// # Panics
        ///
        /// When the catalogue cannot be read.
        pub fn exists(&self) -> bool {
            let row = connect(&self.conninfo)
                .query_one(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                    &[&self.name],
                )
                .expect("read pg_namespace");
            row.get::<_, i64>(0) > 0
        }

        /// The connection that drops the schema at the end, for a test's checks and set-ups.
        pub fn admin(&mut self) -> &mut postgres::Client {
            &mut self.admin
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
            if let Err(e) = self.admin.batch_execute(&sql) {
                let _ = writeln!(
                    std::io::stderr(),
                    "could not drop test schema {}: {e}",
                    self.name
                );
            }
        }
    }
}

/// Runs each listed test function (`fn name(place: &Place)`) once per engine, each run a
/// `#[test]` of its own: `memory::name`, `redb::name` and `postgres::name`.
///
/// ```ignore
/// fn replays_the_response(place: &Place) { /* … */ }
/// fn survives_a_reopen(place: &Place) { /* … */ }
///
/// idemstore_testkit::engine_tests! {
///     every: replays_the_response;
///     durable: survives_a_reopen;
/// }
/// ```
///
/// `every:` runs on every engine; `durable:` on the engines where a store opened again at
/// the same place sees the data (redb on a file, PostgreSQL), for tests that reopen;
/// `redb:` on redb's two (in memory, on a file) only, for behaviour the PostgreSQL engine
/// does not have (the call site says which and why). Each list is optional, in this order;
/// one invocation per file (it defines the three modules).
#[macro_export]
macro_rules! engine_tests {
    (
        $(every: $($every:ident),+ $(,)? ;)?
        $(durable: $($durable:ident),+ $(,)? ;)?
        $(redb: $($redb:ident),+ $(,)? ;)?
    ) => {
        mod memory {
            $($(
                #[test]
                fn $every() {
                    $crate::engine::run($crate::engine::Engine::Memory, super::$every);
                }
            )+)?
            $($(
                #[test]
                fn $redb() {
                    $crate::engine::run($crate::engine::Engine::Memory, super::$redb);
                }
            )+)?
        }
        mod redb {
            $($(
                #[test]
                fn $every() {
                    $crate::engine::run($crate::engine::Engine::Redb, super::$every);
                }
            )+)?
            $($(
                #[test]
                fn $redb() {
                    $crate::engine::run($crate::engine::Engine::Redb, super::$redb);
                }
            )+)?
            $($(
                #[test]
                fn $durable() {
                    $crate::engine::run($crate::engine::Engine::Redb, super::$durable);
                }
            )+)?
        }
        mod postgres {
            $($(
                #[test]
                fn $every() {
                    $crate::engine::run($crate::engine::Engine::Postgres, super::$every);
                }
            )+)?
            $($(
                #[test]
                fn $durable() {
                    $crate::engine::run($crate::engine::Engine::Postgres, super::$durable);
                }
            )+)?
        }
    };
}
