//! The PostgreSQL test cluster: its conninfo from `IDEMSTORE_PG` (as `.ci/pg run --` sets it),
//! or a loud skip; under `CI=true` a missing cluster fails the test instead.

use std::io::Write;

/// The environment variable naming the test cluster (a libpq conninfo).
pub const PG_ENV: &str = "IDEMSTORE_PG";

/// The test cluster's conninfo, or `None` after saying on stderr that the test is skipped.
///
/// # Panics
/// When `IDEMSTORE_PG` is unset (or empty) and `CI` is `true`: CI must run the PostgreSQL
/// tests, never skip them.
pub fn conninfo() -> Option<String> {
    cluster_env(PG_ENV, "")
}

/// The value of `.ci/pg run --`'s variable `name`, or `None` after saying on stderr that the
/// test is skipped (and `why`, when not empty).
///
/// # Panics
/// When `name` is unset (or empty) and `CI` is `true`: CI must run the PostgreSQL tests,
/// never skip them.
pub fn cluster_env(name: &str, why: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(c) if !c.trim().is_empty() => Some(c),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{name} is not set but CI=true: run the tests under .ci/pg run --"
            );
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            };
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {name} not set (run under .ci/pg run --){why}"
            );
            None
        }
    }
}
