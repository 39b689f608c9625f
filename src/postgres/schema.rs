//! idemstore's objects in their PostgreSQL schema: created on first open, checked on every
//! later one.
//!
//! In the schema (default `idemstore`), all created in one transaction:
//!
//! | object | definition |
//! |---|---|
//! | `idemstore_version` | table `(version int not null)`, one row: the format version |
//! | `idemstore_records` | table `(key bytea primary key, token bigint not null, dies_at bigint not null, record bytea not null)` |
//! | `idemstore_records_dies_at` | index on `idemstore_records (dies_at)`, the reaper's path to the dead |
//! | `idemstore_tokens` | sequence `as bigint start 1 cache 1 no cycle`: every fencing token |
//!
//! Other tables in the schema are left alone; only these names are checked. A schema that
//! holds some of them but not all, or one of a wrong kind or shape (columns, types, `not
//! null`, the primary key, the index, a sequence that caches values per session), or a
//! version other than [`FORMAT_VERSION`], is refused with [`Error::IncompatibleFormat`]
//! before anything is written.

use postgres::types::Type;

use super::error::{read_failed, write_failed};
use crate::error::{Error, Result};

/// The format version of the tables this build creates and reads.
pub(crate) const FORMAT_VERSION: i32 = 1;

/// The default schema.
pub(crate) const DEFAULT_SCHEMA: &str = "idemstore";

const VERSION_TABLE: &str = "idemstore_version";
const RECORDS_TABLE: &str = "idemstore_records";
const DIES_AT_INDEX: &str = "idemstore_records_dies_at";
const TOKEN_SEQUENCE: &str = "idemstore_tokens";
const OUR_NAMES: [&str; 4] = [VERSION_TABLE, RECORDS_TABLE, DIES_AT_INDEX, TOKEN_SEQUENCE];

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); a longer one would be cut
/// silently, so two long schema names could meet in one.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// The advisory lock (a transaction lock) that serialises creating and checking the schema
/// across the replicas that open it at the same time. A constant: the schema's name goes into
/// the key by [`lock_key`].
const SCHEMA_LOCK_TAG: &[u8] = b"idemstore schema creation\0";

/// The qualified, quoted names of idemstore's objects in one schema, for statement texts.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The schema as given (unquoted), for catalog queries and messages.
    pub schema: String,
    /// `"schema"` quoted.
    pub quoted_schema: String,
    /// `"schema"."idemstore_version"`.
    pub version: String,
    /// `"schema"."idemstore_records"`.
    pub records: String,
    /// `"schema"."idemstore_tokens"`.
    pub tokens: String,
}

impl Names {
    /// The names in `schema`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `schema` is empty, longer than 63 bytes or holds a NUL.
    pub(crate) fn new(schema: &str) -> Result<Names> {
        if schema.is_empty() {
            return Err(Error::config("the PostgreSQL schema name is empty"));
        }
        if schema.len() > MAX_IDENTIFIER_BYTES {
            return Err(Error::config(format!(
                "the PostgreSQL schema name is {} bytes long; PostgreSQL keeps at most {MAX_IDENTIFIER_BYTES}",
                schema.len()
            )));
        }
        if schema.contains('\0') {
            return Err(Error::config("the PostgreSQL schema name holds a NUL byte"));
        }
        let quoted_schema = quote_identifier(schema);
        let qualified = |name: &str| format!("{quoted_schema}.{}", quote_identifier(name));
        Ok(Names {
            schema: schema.to_owned(),
            version: qualified(VERSION_TABLE),
            records: qualified(RECORDS_TABLE),
            tokens: qualified(TOKEN_SEQUENCE),
            quoted_schema,
        })
    }
}

/// `name` as a quoted SQL identifier: in double quotes, each double quote doubled, so any
/// name (upper case, spaces, quotes, a keyword) stands for itself.
pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The 64-bit key of a transaction-level advisory lock on `bytes` within `schema`: the first
/// eight bytes of SHA-256 over the schema's name, a NUL and the bytes. Stable across builds,
/// platforms and replicas (every replica must compute the same key for the same key bytes);
/// the schema's name keeps two stores in one database from waiting on each other.
pub(crate) fn lock_key(schema: &str, bytes: &[u8]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(schema.as_bytes());
    hasher.update([0u8]);
    hasher.update(bytes);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Creates idemstore's objects in the schema of `names` if none of them exists, or checks
/// those that exist; in one transaction that first takes an advisory lock, so replicas that
/// open the store at the same time wait for one another and all but the first only check.
///
/// # Errors
///
/// [`Error::IncompatibleFormat`], with nothing written, when the schema holds a newer (or
/// unknown) format version, a foreign table, index or sequence of one of idemstore's names,
/// or only some of them; [`Error::Storage`] when the database fails or refuses (for example
/// the user may not create the schema).
pub(crate) fn create_or_check(client: &mut postgres::Client, names: &Names) -> Result<()> {
    let mut tx = client
        .transaction()
        .map_err(|e| read_failed("starting the PostgreSQL schema check", e))?;
    tx.query_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&lock_key(&names.schema, SCHEMA_LOCK_TAG), Type::INT8)],
    )
    .map_err(|e| read_failed("locking the PostgreSQL schema for its check", e))?;
    // Read after the lock: a replica that created the objects meanwhile has committed.
    let found = tx
        .query_typed(
            "SELECT c.relname, c.relkind::text, c.oid, c.relpersistence::text \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2)",
            &[
                (&names.schema, Type::TEXT),
                (&&OUR_NAMES[..], Type::TEXT_ARRAY),
            ],
        )
        .map_err(|e| read_failed("reading the PostgreSQL catalog", e))?;
    let found: Vec<(String, String, u32, String)> = found
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    if found.is_empty() {
        create(&mut tx, names)?;
        return tx
            .commit()
            .map_err(|e| write_failed("committing the new PostgreSQL schema", e));
    }
    let refuse = |reason: String| {
        Err(Error::IncompatibleFormat {
            reason: format!("PostgreSQL schema {:?}: {reason}", names.schema),
        })
    };
    let lookup = |name: &str| found.iter().find(|(n, _, _, _)| n == name);
    let missing: Vec<&str> = OUR_NAMES
        .iter()
        .copied()
        .filter(|name| lookup(name).is_none())
        .collect();
    if !missing.is_empty() {
        return refuse(format!(
            "it holds some of idemstore's objects but not {}; not an idemstore schema",
            missing.join(", ")
        ));
    }
    for (name, kind) in [
        (VERSION_TABLE, "r"),
        (RECORDS_TABLE, "r"),
        (DIES_AT_INDEX, "i"),
        (TOKEN_SEQUENCE, "S"),
    ] {
        let (_, found_kind, _, persistence) = lookup(name).expect("checked above");
        if found_kind != kind {
            return refuse(format!(
                "{name} is a {}, idemstore's is a {}",
                relkind_name(found_kind),
                relkind_name(kind)
            ));
        }
        // An unlogged (or temporary) table or sequence is emptied or reset by the server's
        // crash recovery: every lease, completion and token would be lost.
        if persistence != "p" {
            return refuse(format!(
                "{name} is not a permanent object (UNLOGGED or TEMPORARY): the server's crash \
                 recovery would lose what it holds"
            ));
        }
    }
    let version_oid = lookup(VERSION_TABLE).expect("checked above").2;
    let records_oid = lookup(RECORDS_TABLE).expect("checked above").2;
    let mismatch = match check_columns(
        &mut tx,
        VERSION_TABLE,
        version_oid,
        &[("version", "integer")],
    )? {
        None => check_columns(
            &mut tx,
            RECORDS_TABLE,
            records_oid,
            &[
                ("key", "bytea"),
                ("token", "bigint"),
                ("dies_at", "bigint"),
                ("record", "bytea"),
            ],
        )?,
        found => found,
    };
    let mismatch = match mismatch {
        None => check_indexes(&mut tx, records_oid)?,
        found => found,
    };
    let mismatch = match mismatch {
        None => check_sequence(&mut tx, names)?,
        found => found,
    };
    if let Some(reason) = mismatch {
        return refuse(reason);
    }

    let versions = tx
        .query_typed(&format!("SELECT version FROM {}", names.version), &[])
        .map_err(|e| read_failed("reading the PostgreSQL schema's format version", e))?;
    match versions.as_slice() {
        [row] => {
            let version: i32 = row.get(0);
            if version > FORMAT_VERSION {
                return refuse(format!(
                    "its format version is {version}, newer than this build's {FORMAT_VERSION}; \
                     open it with a newer idemstore"
                ));
            }
            if version != FORMAT_VERSION {
                return refuse(format!(
                    "its format version is {version}; this build reads version {FORMAT_VERSION} only"
                ));
            }
        }
        rows => {
            return refuse(format!(
                "{VERSION_TABLE} holds {} rows, idemstore's holds exactly one",
                rows.len()
            ));
        }
    }
    // Nothing was written: ending the transaction only releases the lock.
    tx.rollback()
        .map_err(|e| read_failed("ending the PostgreSQL schema check", e))
}

/// Creates the schema (if needed) and all of idemstore's objects in it, in `tx`.
fn create(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<()> {
    let Names {
        quoted_schema,
        version,
        records,
        tokens,
        ..
    } = names;
    let index = quote_identifier(DIES_AT_INDEX);
    // `cache 1`: a sequence that hands each session a block of values would give a later
    // lease on another replica a smaller token.
    let ddl = format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted_schema};
         CREATE TABLE {version} (version int NOT NULL);
         INSERT INTO {version} (version) VALUES ({FORMAT_VERSION});
         CREATE TABLE {records} (
             key bytea PRIMARY KEY,
             token bigint NOT NULL,
             dies_at bigint NOT NULL,
             record bytea NOT NULL
         );
         CREATE INDEX {index} ON {records} (dies_at);
         CREATE SEQUENCE {tokens} AS bigint START 1 MINVALUE 1 CACHE 1 NO CYCLE;"
    );
    tx.batch_execute(&ddl)
        .map_err(|e| write_failed("creating idemstore's PostgreSQL tables", e))
}

/// Checks that the table `oid` has exactly `expected` columns (name, type), in order, all
/// `not null`.
fn check_columns(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    oid: u32,
    expected: &[(&str, &str)],
) -> Result<Mismatch> {
    let rows = tx
        .query_typed(
            "SELECT attname::text, pg_catalog.format_type(atttypid, atttypmod), attnotnull, \
                    attgenerated::text = '' AND attidentity::text = '' \
             FROM pg_catalog.pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[(&oid, Type::OID)],
        )
        .map_err(catalog_failed)?;
    let found: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let matches = found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|((name, ty, not_null, _), (want_name, want_ty))| {
                name == want_name && ty == want_ty && *not_null
            });
    if matches {
        // Generated and identity columns take no value from an INSERT.
        if let Some((name, ..)) = found.iter().find(|(.., plain)| !plain) {
            return Ok(Some(format!(
                "column {name} of table {table} is a generated or identity column; \
                 idemstore's columns are plain"
            )));
        }
        return Ok(None);
    }
    let show = |columns: Vec<String>| columns.join(", ");
    Ok(Some(format!(
        "table {table} has columns ({}), idemstore's has ({})",
        show(
            found
                .iter()
                .map(|(n, t, nn, _)| format!("{n} {t}{}", if *nn { " not null" } else { "" }))
                .collect()
        ),
        show(
            expected
                .iter()
                .map(|(n, t)| format!("{n} {t} not null"))
                .collect()
        ),
    )))
}

/// Checks that the records table `oid` has its primary key on `key` alone and the index
/// of idemstore's name on `dies_at` alone.
fn check_indexes(tx: &mut postgres::Transaction<'_>, oid: u32) -> Result<Mismatch> {
    let rows = tx
        .query_typed(
            "SELECT c.relname::text, i.indisprimary, i.indisvalid, i.indpred IS NULL, \
                    i.indexprs IS NULL, \
                    ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) AS k(n) \
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n), \
                    i.indisunique, i.indimmediate \
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1",
            &[(&oid, Type::OID)],
        )
        .map_err(catalog_failed)?;
    let on = |want: &str, primary: bool| {
        rows.iter().any(|row| {
            let columns: Vec<String> = row.get(5);
            let named = row.get::<_, String>(0) == DIES_AT_INDEX;
            row.get::<_, bool>(1) == primary
                && (primary || named)
                && row.get::<_, bool>(2)
                && row.get::<_, bool>(3)
                && row.get::<_, bool>(4)
                && columns == [want]
                // The primary key checked at once (`ON CONFLICT` needs it); death times shared.
                && (if primary {
                    row.get::<_, bool>(7)
                } else {
                    !row.get::<_, bool>(6)
                })
        })
    };
    if !on("key", true) {
        return Ok(Some(format!(
            "table {RECORDS_TABLE} has no primary key on key alone"
        )));
    }
    if !on("dies_at", false) {
        return Ok(Some(format!(
            "index {DIES_AT_INDEX} is not an index on {RECORDS_TABLE} (dies_at)"
        )));
    }
    Ok(None)
}

/// Checks that the token sequence counts up by one in bigint, hands out one value at a time
/// (no per-session cache) and never wraps.
fn check_sequence(tx: &mut postgres::Transaction<'_>, names: &Names) -> Result<Mismatch> {
    let Some(row) = tx
        .query_typed_opt(
            "SELECT data_type::text, increment_by, cache_size, cycle FROM pg_catalog.pg_sequences \
             WHERE schemaname = $1 AND sequencename = $2",
            &[(&names.schema, Type::TEXT), (&TOKEN_SEQUENCE, Type::TEXT)],
        )
        .map_err(catalog_failed)?
    else {
        return Ok(Some(format!("sequence {TOKEN_SEQUENCE} cannot be read")));
    };
    let (data_type, increment, cache, cycle): (String, i64, i64, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if data_type != "bigint" || increment != 1 || cache != 1 || cycle {
        return Ok(Some(format!(
            "sequence {TOKEN_SEQUENCE} is {data_type}, increment {increment}, cache {cache}{}; \
             idemstore's is bigint, increment 1, cache 1, no cycle",
            if cycle { ", cycle" } else { "" }
        )));
    }
    Ok(None)
}

/// Why a schema's object is not idemstore's; `None` when it is.
type Mismatch = Option<String>;

fn catalog_failed(e: postgres::Error) -> Error {
    read_failed("reading the PostgreSQL catalog", e)
}

fn relkind_name(kind: &str) -> &'static str {
    match kind {
        "r" => "table",
        "i" => "index",
        "S" => "sequence",
        "v" => "view",
        "m" => "materialized view",
        "p" => "partitioned table",
        "f" => "foreign table",
        "c" => "composite type",
        "t" => "TOAST table",
        "I" => "partitioned index",
        _ => "relation of another kind",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::postgres::testdb::TestDb;

    fn open(db: &TestDb) -> Result<()> {
        create_or_check(&mut db.client(), &db.names)
    }

    fn count(client: &mut postgres::Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).unwrap().get(0)
    }

    /// Everything about the schema's relations that a refused open must leave as it was:
    /// names, kinds, columns, sequence settings and the row count of each table.
    fn snapshot(db: &mut TestDb) -> String {
        let schema = db.names.schema.clone();
        let admin = db.admin();
        let rels = admin
            .query(
                "SELECT c.relname::text, c.relkind::text, \
                        coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
                                  || CASE WHEN a.attnotnull THEN ' nn' ELSE '' END, ',' ORDER BY a.attnum) \
                                  FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
                                  AND NOT a.attisdropped), '') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 ORDER BY c.relname",
                &[&schema],
            )
            .unwrap();
        let mut out = String::new();
        for row in rels {
            let (name, kind, columns): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            out.push_str(&format!("{name} {kind} ({columns})"));
            let qualified = format!("{}.{}", quote_identifier(&schema), quote_identifier(&name));
            if kind == "r" {
                let rows = count(admin, &format!("SELECT count(*) FROM {qualified}"));
                out.push_str(&format!(" rows={rows}"));
            }
            if kind == "S" {
                let row = admin
                    .query_one(
                        "SELECT increment_by, cache_size FROM pg_sequences \
                         WHERE schemaname = $1 AND sequencename = $2",
                        &[&schema, &name],
                    )
                    .unwrap();
                let (inc, cache): (i64, i64) = (row.get(0), row.get(1));
                out.push_str(&format!(" inc={inc} cache={cache}"));
            }
            out.push('\n');
        }
        out
    }

    fn refused(result: Result<()>) -> String {
        match result {
            Err(Error::IncompatibleFormat { reason }) => reason,
            other => panic!("expected IncompatibleFormat, got {other:?}"),
        }
    }

    #[test]
    fn schema_names_are_checked_and_quoted() {
        assert!(matches!(Names::new(""), Err(Error::InvalidConfig { .. })));
        assert!(matches!(
            Names::new(&"s".repeat(64)),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(Names::new(&"s".repeat(63)).is_ok());
        assert!(matches!(
            Names::new("a\0b"),
            Err(Error::InvalidConfig { .. })
        ));
        let names = Names::new("My \"odd\" schema").unwrap();
        assert_eq!(names.quoted_schema, "\"My \"\"odd\"\" schema\"");
        assert_eq!(
            names.records,
            "\"My \"\"odd\"\" schema\".\"idemstore_records\""
        );
    }

    #[test]
    fn lock_keys_are_stable_and_depend_on_the_schema() {
        // The same key bytes must give the same lock on every replica and every build.
        assert_eq!(lock_key("idemstore", b"k"), lock_key("idemstore", b"k"));
        assert_ne!(lock_key("idemstore", b"k"), lock_key("idemstore", b"l"));
        assert_ne!(lock_key("idemstore", b"k"), lock_key("other", b"k"));
        // The schema and the key are separated: ("ab", "c") is not ("a", "bc").
        assert_ne!(lock_key("ab", b"c"), lock_key("a", b"bc"));
    }

    #[test]
    fn first_open_creates_the_tables_the_version_row_and_the_sequence() {
        let Some(mut db) = TestDb::new() else { return };
        open(&db).unwrap();
        let names = db.names.clone();
        let admin = db.admin();
        let version: i32 = admin
            .query_one(&format!("SELECT version FROM {}", names.version), &[])
            .unwrap()
            .get(0);
        assert_eq!(version, FORMAT_VERSION);
        assert_eq!(
            count(admin, &format!("SELECT count(*) FROM {}", names.version)),
            1
        );
        assert_eq!(
            count(admin, &format!("SELECT count(*) FROM {}", names.records)),
            0
        );
        let first = count(
            admin,
            &format!("SELECT nextval('{}')", names.tokens.replace('\'', "''")),
        );
        assert_eq!(first, 1);
        let indexed = admin
            .query_one(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = $2",
                &[&names.schema, &DIES_AT_INDEX],
            )
            .unwrap()
            .get::<_, String>(0);
        assert!(indexed.contains("(dies_at)"), "{indexed}");
    }

    #[test]
    fn a_second_open_checks_and_changes_nothing() {
        let Some(mut db) = TestDb::new() else { return };
        open(&db).unwrap();
        let records = db.names.records.clone();
        db.admin()
            .execute(
                &format!("INSERT INTO {records} VALUES ('\\x01', 5, 10, '\\x02')"),
                &[],
            )
            .unwrap();
        let before = snapshot(&mut db);
        open(&db).unwrap();
        open(&db).unwrap();
        assert_eq!(snapshot(&mut db), before);
        assert!(
            before.contains("idemstore_records r") && before.contains("rows=1"),
            "{before}"
        );
    }

    #[test]
    fn a_newer_version_is_refused_untouched() {
        let Some(mut db) = TestDb::new() else { return };
        open(&db).unwrap();
        let version = db.names.version.clone();
        db.admin()
            .execute(
                &format!("UPDATE {version} SET version = {}", FORMAT_VERSION + 1),
                &[],
            )
            .unwrap();
        let before = snapshot(&mut db);
        let reason = refused(open(&db));
        assert!(reason.contains("newer"), "{reason}");
        assert_eq!(snapshot(&mut db), before);
        let still: i32 = db
            .admin()
            .query_one(&format!("SELECT version FROM {version}"), &[])
            .unwrap()
            .get(0);
        assert_eq!(still, FORMAT_VERSION + 1);
    }

    #[test]
    fn foreign_objects_of_our_names_are_refused_untouched() {
        // Each case: statements run in a fresh schema (`{s}` is its quoted name); `ours` runs
        // idemstore's own creation first.
        let cases: [(&str, bool, &str, &str); 8] = [
            (
                "a foreign table alone",
                false,
                "CREATE TABLE {s}.idemstore_records (id int, data text); \
              INSERT INTO {s}.idemstore_records VALUES (1, 'theirs')",
                "not an idemstore schema",
            ),
            (
                "our tables without a version row",
                true,
                "DELETE FROM {s}.idemstore_version",
                "0 rows",
            ),
            (
                "two version rows",
                true,
                "INSERT INTO {s}.idemstore_version VALUES (1)",
                "2 rows",
            ),
            (
                "a column of another type",
                true,
                "ALTER TABLE {s}.idemstore_records ALTER COLUMN token TYPE numeric",
                "columns",
            ),
            (
                "a nullable column",
                true,
                "ALTER TABLE {s}.idemstore_records ALTER COLUMN record DROP NOT NULL",
                "columns",
            ),
            (
                "an extra column",
                true,
                "ALTER TABLE {s}.idemstore_records ADD COLUMN note text",
                "columns",
            ),
            (
                "a sequence caching values per session",
                true,
                "ALTER SEQUENCE {s}.idemstore_tokens CACHE 20",
                "cache 20",
            ),
            (
                "a view of our version table's name",
                false,
                "CREATE TABLE {s}.idemstore_records (key bytea PRIMARY KEY, token bigint NOT NULL, \
              dies_at bigint NOT NULL, record bytea NOT NULL); \
              CREATE INDEX idemstore_records_dies_at ON {s}.idemstore_records (dies_at); \
              CREATE SEQUENCE {s}.idemstore_tokens CACHE 1; \
              CREATE VIEW {s}.idemstore_version AS SELECT 1 AS version",
                "is a view",
            ),
        ];
        for (what, ours, setup, expect) in cases {
            let Some(mut db) = TestDb::new() else { return };
            let s = db.names.quoted_schema.clone();
            if ours {
                open(&db).unwrap();
            } else {
                db.admin()
                    .batch_execute(&format!("CREATE SCHEMA {s}"))
                    .unwrap();
            }
            db.admin().batch_execute(&setup.replace("{s}", &s)).unwrap();
            let before = snapshot(&mut db);
            let reason = refused(open(&db));
            assert!(reason.contains(expect), "{what}: {reason}");
            assert!(reason.contains(&db.names.schema), "{what}: {reason}");
            assert_eq!(snapshot(&mut db), before, "{what}: the schema was changed");
        }
    }

    #[test]
    fn other_tables_in_the_schema_are_left_alone() {
        let Some(mut db) = TestDb::new() else { return };
        let s = db.names.quoted_schema.clone();
        db.admin()
            .batch_execute(&format!(
                "CREATE SCHEMA {s}; CREATE TABLE {s}.bookings (slot int); \
                 INSERT INTO {s}.bookings VALUES (7); CREATE TABLE {s}.idemstore_notes (x text)"
            ))
            .unwrap();
        open(&db).unwrap();
        open(&db).unwrap();
        let after = snapshot(&mut db);
        assert!(
            after.contains("bookings r (slot integer) rows=1"),
            "{after}"
        );
        assert!(
            after.contains("idemstore_notes r (x text) rows=0"),
            "{after}"
        );
        assert!(
            after.contains("idemstore_version r (version integer nn) rows=1"),
            "{after}"
        );
    }

    #[test]
    fn replicas_opening_at_once_create_once() {
        let Some(mut db) = TestDb::new() else { return };
        let barrier = Arc::new(Barrier::new(4));
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let mut client = db.client();
                    let names = db.names.clone();
                    let barrier = Arc::clone(&barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        create_or_check(&mut client, &names)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for result in results {
            result.unwrap();
        }
        let version = db.names.version.clone();
        assert_eq!(
            count(db.admin(), &format!("SELECT count(*) FROM {version}")),
            1
        );
    }

    #[test]
    fn a_schema_name_needing_quotes_works() {
        let Some(mut db) = TestDb::new() else { return };
        let odd = Names::new(&format!("{} \"Odd\" name", db.names.schema)).unwrap();
        let result = create_or_check(&mut db.client(), &odd)
            .and_then(|()| create_or_check(&mut db.client(), &odd));
        let version: std::result::Result<i32, _> = db
            .admin()
            .query_one(&format!("SELECT version FROM {}", odd.version), &[])
            .map(|row| row.get(0));
        db.admin()
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                odd.quoted_schema
            ))
            .unwrap();
        result.unwrap();
        assert_eq!(version.unwrap(), FORMAT_VERSION);
    }
}
