//! The PostgreSQL test cluster: its conninfo from `IDEMSTORE_PG` (as `.ci/pg run --` sets it),
//! or a loud skip; under `CI=true` a missing cluster fails the test instead. Also a conninfo
//! with a parameter added, and (feature `postgres`) a wait for server sessions to end.

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

/// `conninfo` with `key=value` added: after a space for a libpq `key=value` string, as a query
/// parameter for a `postgres://` or `postgresql://` URL. A key the conninfo already has is
/// given twice; the later one counts. `value` must need no quoting or escaping.
pub fn with_param(conninfo: &str, key: &str, value: &str) -> String {
    let url = conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://");
    if !url {
        format!("{conninfo} {key}={value}")
    } else if conninfo.contains('?') {
        format!("{conninfo}&{key}={value}")
    } else {
        format!("{conninfo}?{key}={value}")
    }
}

/// Waits (at most 10 s) until no server session matches the SQL condition `sessions` on
/// `pg_stat_activity`, with `params`, as seen by `client`.
///
/// # Panics
///
/// Naming `what`, when sessions still match after 10 s; when the query fails.
#[cfg(feature = "postgres")]
pub fn wait_until_gone(
    client: &mut postgres::Client,
    sessions: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
    what: &str,
) {
    let query = format!("SELECT count(*) FROM pg_stat_activity WHERE {sessions}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: i64 = client
            .query_one(&query, params)
            .unwrap_or_else(|e| panic!("count the sessions of {what}: {e}"))
            .get(0);
        if left == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} did not end");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::with_param;

    #[test]
    fn a_param_is_added_to_either_form_of_conninfo() {
        assert_eq!(
            with_param("host=h user=u", "application_name", "t1"),
            "host=h user=u application_name=t1"
        );
        assert_eq!(
            with_param("postgresql://u@h/db", "application_name", "t1"),
            "postgresql://u@h/db?application_name=t1"
        );
        assert_eq!(
            with_param(
                "postgres://u@h/db?sslmode=disable",
                "application_name",
                "t1"
            ),
            "postgres://u@h/db?sslmode=disable&application_name=t1"
        );
    }
}
