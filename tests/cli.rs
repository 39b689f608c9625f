//! The `idemstore` command-line tool, run as a process on store files made here: every
//! subcommand, `--help`, and the refusals (missing, empty, foreign, busy file).
//!
//! Needs the `cli` feature (`cargo test --features cli`); without it this file is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};
use idemstore::http::StoredResponse;
use idemstore::{Begin, Fingerprint, Key, Lease, ManualClock, Store};

fn idemstore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemstore"))
        .args(args)
        .output()
        .expect("run the idemstore binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn started(store: &Store, scope: &str, id: &str) -> Lease {
    let key = Key::new(scope, id).unwrap();
    match store.begin(&key, &Fingerprint::of(id)).unwrap() {
        Begin::Started(lease) => lease,
        other => panic!("expected Started, got {other:?}"),
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// A store file with five records:
///
/// | scope/id | state |
/// |---|---|
/// | `old/expired` | completed two days ago with a one-day TTL: dead |
/// | `tenant-b/stuck` | in flight since 10 minutes, its 1-minute lease ran out |
/// | `tenant-a/done-http` | completed, an HTTP `StoredResponse` |
/// | `tenant-a/done-raw` | completed, raw bytes |
/// | `tenant-b/running` | in flight, live lease, checkpoint `charged ch_1` |
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let now = SystemTime::now();
    let at = |t: SystemTime| ManualClock::new(t);
    let builder = |clock: ManualClock| {
        Store::builder()
            .ttl(DAY)
            .lease(Duration::from_secs(60))
            .reap_interval(None)
            .clock(clock)
    };

    let store = builder(at(now - 2 * DAY)).open(&path).unwrap();
    started(&store, "old", "expired").complete(b"old").unwrap();
    store.close().unwrap();

    let store = builder(at(now - Duration::from_secs(600)))
        .open(&path)
        .unwrap();
    std::mem::forget(started(&store, "tenant-b", "stuck")); // a crashed holder
    store.close().unwrap();

    let store = Store::builder()
        .ttl(DAY)
        .reap_interval(None)
        .open(&path)
        .unwrap();
    let response = Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(br#"{"id":"pay_1"}"#.to_vec())
        .unwrap();
    started(&store, "tenant-a", "done-http")
        .complete(&StoredResponse::from_response(&response).encode())
        .unwrap();
    started(&store, "tenant-a", "done-raw")
        .complete(b"\x00\xffbinary")
        .unwrap();
    let mut running = started(&store, "tenant-b", "running");
    running.checkpoint(b"charged ch_1").unwrap();
    std::mem::forget(running);
    store.close().unwrap();
    (dir, path)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn stats_counts_records_by_state() {
    let (_dir, path) = fixture();
    let o = idemstore(&["stats", path_str(&path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("format version  4"), "{out}");
    assert!(out.contains("last token      5"), "{out}");
    assert!(out.contains("records         5 (4 live, 1 dead)"), "{out}");
    assert!(
        out.contains("in flight     2 (1 with an expired lease"),
        "{out}"
    );
    assert!(out.contains("completed     2 ("), "{out}");
    assert!(
        out.contains("dead          1 (0 in flight, 1 completed"),
        "{out}"
    );
    assert!(out.contains("bytes)"), "file size shown: {out}");
}

#[test]
fn get_shows_one_record_or_exits_1() {
    let (_dir, path) = fixture();
    let p = path_str(&path);

    let o = idemstore(&["get", p, "--scope", "tenant-a", "done-http"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("state        completed"), "{out}");
    assert!(out.contains("http status  201 Created"), "{out}");
    assert!(out.contains(r#"body text    {"id":"pay_1"}"#), "{out}");
    assert!(
        out.contains(&format!("fingerprint  {}", Fingerprint::of("done-http"))),
        "{out}"
    );

    let o = idemstore(&["get", p, "--scope", "tenant-b", "running"]);
    let out = stdout(&o);
    assert!(out.contains("state        in flight"), "{out}");
    assert!(out.contains("text         charged ch_1"), "{out}");

    // A dead record is shown, flagged.
    let o = idemstore(&["get", p, "--scope", "old", "expired"]);
    assert!(stdout(&o).contains("dead (expired, not yet reaped)"));

    let o = idemstore(&["get", p, "--scope", "tenant-a", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no record"), "{}", stderr(&o));

    let o = idemstore(&["get", p, "done-http"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--scope"), "{}", stderr(&o));
}

/// The data lines of `list` (the first line is the header).
fn rows(o: &Output) -> Vec<String> {
    stdout(o).lines().skip(1).map(str::to_owned).collect()
}

#[test]
fn list_filters_by_state_and_age() {
    let (_dir, path) = fixture();
    let p = path_str(&path);

    let o = idemstore(&["list", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = rows(&o);
    assert_eq!(all.len(), 5, "{all:#?}");
    assert!(stdout(&o).starts_with("STATE"));
    // In the order their keys were claimed, oldest first.
    assert!(all[0].starts_with("dead") && all[0].ends_with(r#""old"/"expired""#));
    assert!(all[1].starts_with("in-flight") && all[1].ends_with(r#""tenant-b"/"stuck""#));
    assert!(all[4].starts_with("in-flight") && all[4].ends_with(r#""tenant-b"/"running""#));

    let ids = |args: &[&str]| -> Vec<String> {
        let o = idemstore(args);
        assert!(o.status.success(), "{}", stderr(&o));
        rows(&o)
            .iter()
            .map(|r| r.rsplit(' ').next().unwrap().replace('"', ""))
            .collect()
    };
    assert_eq!(
        ids(&["list", p, "--state", "in-flight"]),
        ["tenant-b/stuck", "tenant-b/running"]
    );
    assert_eq!(
        ids(&["list", p, "--state", "completed"]),
        ["tenant-a/done-http", "tenant-a/done-raw"]
    );
    assert_eq!(ids(&["list", p, "--state", "dead"]), ["old/expired"]);
    assert_eq!(
        ids(&["list", p, "--older-than", "5m"]),
        ["old/expired", "tenant-b/stuck"]
    );
    assert_eq!(
        ids(&["list", p, "--state", "in-flight", "--older-than", "1h"]),
        Vec::<String>::new()
    );
    let stuck = ids(&["list", p, "--state", "in-flight", "--older-than", "5m"]);
    assert_eq!(stuck, ["tenant-b/stuck"]);

    let o = idemstore(&["list", p, "--state", "sleeping"]);
    assert_eq!(o.status.code(), Some(2));
    let o = idemstore(&["list", p, "--older-than", "5 fortnights"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a duration"), "{}", stderr(&o));
}

/// `list` quotes the two parts of a key: a scope and an id that contain the separator or
/// spaces or quotes stay apart and readable.
#[test]
fn list_shows_keys_unambiguously() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::builder().reap_interval(None).open(&path).unwrap();
    for (scope, id) in [("a/b", "c"), ("a", "b/c"), ("", "x \"y\"")] {
        started(&store, scope, id).complete(b"done").unwrap();
    }
    store.close().unwrap();
    let o = idemstore(&["list", path_str(&path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = rows(&o);
    assert!(all[0].ends_with(r#" "a/b"/"c""#), "{all:#?}");
    assert!(all[1].ends_with(r#" "a"/"b/c""#), "{all:#?}");
    assert!(all[2].ends_with(r#" ""/"x \"y\"""#), "{all:#?}");
}

#[test]
fn reap_deletes_only_dead_records() {
    let (_dir, path) = fixture();
    let p = path_str(&path);
    let o = idemstore(&["reap", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("deleted 1 dead record(s)"),
        "{}",
        stdout(&o)
    );
    let o = idemstore(&["stats", p]);
    assert!(stdout(&o).contains("records         4 (4 live, 0 dead)"));
    let o = idemstore(&["reap", p]);
    assert!(stdout(&o).contains("deleted 0 dead record(s)"));
}

#[test]
fn dump_writes_one_json_object_per_record() {
    let (_dir, path) = fixture();
    let o = idemstore(&["dump", path_str(&path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for line in &lines {
        assert!(
            line.starts_with("{\"scope\":") && line.ends_with('}'),
            "{line}"
        );
        assert!(line.contains("\"fingerprint\":\""), "{line}");
    }
    // Each line is one JSON object with the fields `dump --help` lists.
    for line in &lines {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let fields = [
            "scope",
            "id",
            "state",
            "dead",
            "token",
            "fingerprint",
            "expires_at",
        ];
        for field in fields {
            assert!(record.get(field).is_some(), "{field} in {line}");
        }
        let timestamp = record["expires_at"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(timestamp).is_ok(), "{line}");
    }
    let raw = lines
        .iter()
        .find(|l| l.contains("\"id\":\"done-raw\""))
        .unwrap();
    // b"\x00\xffbinary" in standard base64.
    assert!(
        raw.contains("\"response_base64\":\"AP9iaW5hcnk=\""),
        "{raw}"
    );
    assert!(
        raw.contains("\"state\":\"completed\",\"dead\":false"),
        "{raw}"
    );
    assert!(raw.contains("\"response_bytes\":8"), "{raw}");
    let running = lines
        .iter()
        .find(|l| l.contains("\"id\":\"running\""))
        .unwrap();
    // "charged ch_1" in base64.
    assert!(
        running.contains("\"checkpoint_base64\":\"Y2hhcmdlZCBjaF8x\""),
        "{running}"
    );
    assert!(running.contains("\"attempt\":1"), "{running}");
    let stuck = lines
        .iter()
        .find(|l| l.contains("\"id\":\"stuck\""))
        .unwrap();
    assert!(stuck.contains("\"checkpoint_base64\":null"), "{stuck}");
    let old = lines
        .iter()
        .find(|l| l.contains("\"id\":\"expired\""))
        .unwrap();
    assert!(old.contains("\"dead\":true"), "{old}");
}

#[test]
fn help_for_the_tool_and_every_command() {
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let o = idemstore(args);
        assert!(o.status.success());
        let out = stdout(&o);
        for command in ["stats", "get", "list", "reap", "dump", "EXIT CODES"] {
            assert!(out.contains(command), "{command} in {out}");
        }
    }
    for command in ["stats", "get", "list", "reap", "dump"] {
        for o in [
            idemstore(&[command, "--help"]),
            idemstore(&["help", command]),
        ] {
            assert!(o.status.success());
            assert!(
                stdout(&o).starts_with(&format!("idemstore {command}")),
                "{}",
                stdout(&o)
            );
        }
    }
    let o = idemstore(&[]);
    assert_eq!(o.status.code(), Some(2));
    let o = idemstore(&["frobnicate", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown command"), "{}", stderr(&o));
    let o = idemstore(&["stats"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn looking_never_writes_to_the_file() {
    let (_dir, path) = fixture();
    let file = path_str(&path);
    let before = std::fs::read(&path).unwrap();
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    for args in [
        vec!["stats", file],
        vec!["get", file, "--scope", "tenant-a", "done-raw"],
        vec!["list", file],
        vec!["dump", file],
    ] {
        let o = idemstore(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(
            std::fs::read(&path).unwrap() == before,
            "{args:?} changed the file"
        );
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified
    );
    // A file without write permission can still be looked at (run as root, as CI is, this
    // only shows that nothing asks for write permission first).
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&path, perms).unwrap();
    let o = idemstore(&["stats", file]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_missing_or_empty_file_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.redb");
    for command in ["stats", "list", "reap", "dump"] {
        let o = idemstore(&[command, path_str(&missing)]);
        assert_eq!(o.status.code(), Some(2), "{command}");
        assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));
        assert!(!missing.exists(), "{command} created the file");
    }
    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"").unwrap();
    let o = idemstore(&["stats", path_str(&empty)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    let o = idemstore(&["stats", path_str(dir.path())]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("directory"), "{}", stderr(&o));
}

#[test]
fn a_foreign_file_is_refused_and_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"not a database at all").unwrap();
    let o = idemstore(&["stats", path_str(&text)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not an idemstore store"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&text).unwrap(), b"not a database at all");

    // A redb file of someone else's.
    let other = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&other).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("orders");
            txn.open_table(table).unwrap().insert("o-1", 7).unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    let o = idemstore(&["dump", path_str(&other)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not an idemstore store"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&other).unwrap(), before, "file modified");
}

/// A file cut short (a partial copy, an upload that stopped) is refused by the read-only
/// commands with the reason, not only with what the tool was doing, and with what recovers
/// it; the file is not modified.
#[test]
fn a_cut_file_is_refused_with_the_reason_and_what_recovers_it() {
    let (_dir, path) = fixture();
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let before = std::fs::read(&path).unwrap();
    for command in ["stats", "list", "dump"] {
        let o = idemstore(&[command, path_str(&path)]);
        assert_eq!(o.status.code(), Some(2), "{command}");
        let err = stderr(&o);
        assert!(err.contains("not closed cleanly"), "{command}: {err}");
        assert!(err.contains("idemstore reap"), "{command}: {err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{command} modified the file"
        );
    }
    // The read-write open it points to finds the damage.
    let o = idemstore(&["reap", path_str(&path)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "reap modified the file"
    );
}

#[test]
fn a_busy_file_is_refused() {
    let (_dir, path) = fixture();
    let store = Store::open(&path).unwrap(); // a running service holds it
    let o = idemstore(&["stats", path_str(&path)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is busy"), "{}", stderr(&o));
    store.close().unwrap();
    assert!(idemstore(&["stats", path_str(&path)]).status.success());
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let (_dir, path) = fixture();
    for args in [
        &["list", path_str(&path)][..],
        &["dump", path_str(&path)],
        &["get", path_str(&path), "--scope", "tenant-a", "done-http"],
        &["--help"],
    ] {
        // The reader goes away before the tool writes (as `idemstore dump FILE | head -0`).
        let mut child = Command::new(env!("CARGO_BIN_EXE_idemstore"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
    }
}
