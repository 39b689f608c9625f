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
    match std::env::var(PG_ENV) {
        Ok(c) if !c.trim().is_empty() => Some(c),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{PG_ENV} is not set but CI=true: run the tests under .ci/pg run --"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {PG_ENV} not set (run under .ci/pg run --)"
            );
            None
        }
    }
}
