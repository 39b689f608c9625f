//! Runs the demo (`examples/demo/`) small: a few clients, a server child process that is
//! SIGKILLed and restarted, a stalled handler taken over. The verdict computed from the
//! ledger must hold; and with the service broken on purpose (takeovers ignore their
//! checkpoint) it must fail, so the verdict is not a formality.
//!
//! The demo runs as the built example program (cargo builds it before it runs this test);
//! it re-executes itself as the server.
//!
//! Its other modes run small too, when the features they need are on (the example is built
//! with the test's features): the service on axum behind the tower layer (feature `tower`),
//! and two replicas on PostgreSQL (feature `postgres`; the cluster named by `IDEMSTORE_PG`,
//! `.ci/pg run -- cargo test --all-features --test demo`; skipped loudly without it, failed
//! under `CI=true`).

use std::ffi::OsStr;
use std::process::Command;

use idemstore_testkit::programs::{Program, example};

/// Runs the demo small (90 payments, 4 clients, seed 7, quiet): whether it exited with
/// success, and what it printed.
fn run_demo(ignore_checkpoints: bool) -> Result<(bool, String), String> {
    let broken: &[&str] = if ignore_checkpoints {
        &["--ignore-checkpoints"]
    } else {
        &[]
    };
    run_demo_with(90, broken)
}

/// Runs the demo with `payments` payments, 4 clients, seed 7, quiet, and `extra` flags:
/// whether it exited with success, and what it printed.
fn run_demo_with(payments: usize, extra: &[&str]) -> Result<(bool, String), String> {
    let mut command = Command::new(example("demo"));
    let payments = payments.to_string();
    command.args([
        "--payments",
        &payments,
        "--clients",
        "4",
        "--seed",
        "7",
        "--quiet",
    ]);
    command.args(extra);
    let output = command
        .output()
        .map_err(|e| format!("the demo failed to run: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok((output.status.success(), stdout))
}

/// The value of the report's row `label` (a label, spaces, a number).
fn row(table: &str, label: &str) -> Option<u64> {
    table.lines().find_map(|line| {
        let rest = line.trim().strip_prefix(label)?;
        rest.trim().parse().ok()
    })
}

/// The verdict held: the exit code and the verdict line agree.
fn verdict_ok(success: bool, table: &str) -> bool {
    success && table.contains("VERDICT: OK")
}

/// Every payment charged once, with at least one takeover (the stalled handler's).
#[test]
fn demo_verdict_holds() {
    let (success, table) = run_demo(false).unwrap();
    let charges = row(&table, "charges executed (ledger lines)");
    let takeovers = row(&table, "lease takeovers");
    assert!(
        verdict_ok(success, &table) && charges == Some(90) && takeovers.is_some_and(|t| t > 0),
        "{table}\n(expected the verdict to hold, 90 charges, at least one takeover)"
    );
}

/// A takeover that ignores its checkpoint charges again, and the verdict says so.
#[test]
fn demo_verdict_fails_without_checkpoints() {
    let (success, table) = run_demo(true).unwrap();
    remove_kept(&table);
    let charges = row(&table, "charges executed (ledger lines)");
    assert!(
        !success && table.contains("VERDICT: VIOLATED") && charges.is_some_and(|c| c > 90),
        "{table}\n(expected double charges and a failed verdict)"
    );
}

/// The service on axum behind the tower layer: clients hang up while the handler runs, the
/// server is killed and restarted, and every payment is still charged once.
#[cfg(feature = "tower")]
#[test]
fn demo_on_axum_verdict_holds() {
    let (success, table) = run_demo_with(60, &["--server", "axum"]).unwrap();
    let charges = row(&table, "charges executed (ledger lines)");
    let disconnects = row(&table, "client disconnects mid-handler (handler ran on)");
    let runs = row(&table, "handler runs (the layer's)");
    assert!(
        verdict_ok(success, &table)
            && charges == Some(60)
            && disconnects.is_some_and(|d| d > 0)
            && runs.is_some_and(|r| r >= 60),
        "{table}\n(expected the verdict to hold, 60 charges, some disconnects mid-handler)"
    );
}

/// Removes what a failed run kept: its folder, and its schema when there is one.
fn remove_kept(table: &str) {
    if let Some(dir) = table
        .lines()
        .find_map(|line| line.strip_prefix("files kept in "))
    {
        let dir = dir.split(" (").next().unwrap_or(dir);
        let _ = std::fs::remove_dir_all(dir.trim());
    }
    #[cfg(feature = "postgres")]
    if let Some(schema) = table.lines().find_map(|line| {
        let rest = line.strip_prefix("schema ")?;
        Some(rest.split(' ').next()?.to_owned())
    }) && let Some(conninfo) = idemstore_testkit::pg::conninfo()
        && let Ok(mut client) = postgres::Client::connect(&conninfo, postgres::NoTls)
    {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
}

/// Two replicas on one PostgreSQL database, clients spread over both, one replica killed:
/// the ledger table holds one charge per payment, and the stalled handler was taken over.
#[cfg(feature = "postgres")]
#[test]
fn demo_on_postgres_replicas_verdict_holds() {
    if idemstore_testkit::pg::conninfo().is_none() {
        return;
    }
    let (success, table) =
        run_demo_with(60, &["--backend", "postgres", "--replicas", "2"]).unwrap();
    let charges = row(&table, "charges executed (ledger rows)");
    let replicas = row(&table, "service replicas sharing the store");
    let takeovers = row(&table, "lease takeovers");
    if !success {
        remove_kept(&table);
    }
    assert!(
        verdict_ok(success, &table)
            && charges == Some(60)
            && replicas == Some(2)
            && takeovers.is_some_and(|t| t > 0),
        "{table}\n(expected the verdict to hold, 60 charge rows, 2 replicas, a takeover)"
    );
}

/// On PostgreSQL, a service that commits the charge on its own before completing (not with
/// `complete_in` in the same transaction) charges again when a stalled attempt is taken
/// over, and the verdict computed from the table says so.
#[cfg(feature = "postgres")]
#[test]
fn demo_on_postgres_fails_when_the_charge_commits_alone() {
    if idemstore_testkit::pg::conninfo().is_none() {
        return;
    }
    let (success, table) = run_demo_with(
        60,
        &[
            "--backend",
            "postgres",
            "--replicas",
            "2",
            "--ignore-checkpoints",
        ],
    )
    .unwrap();
    remove_kept(&table);
    let charges = row(&table, "charges executed (ledger rows)");
    assert!(
        !success && table.contains("VERDICT: VIOLATED") && charges.is_some_and(|c| c > 60),
        "{table}\n(expected double charges and a failed verdict)"
    );
}

/// Both new modes at once: two axum replicas behind the layer on PostgreSQL.
#[cfg(all(feature = "postgres", feature = "tower"))]
#[test]
fn demo_on_postgres_replicas_with_axum_verdict_holds() {
    if idemstore_testkit::pg::conninfo().is_none() {
        return;
    }
    let (success, table) = run_demo_with(
        60,
        &[
            "--backend",
            "postgres",
            "--replicas",
            "2",
            "--server",
            "axum",
        ],
    )
    .unwrap();
    let charges = row(&table, "charges executed (ledger rows)");
    let disconnects = row(&table, "client disconnects mid-handler (handler ran on)");
    if !success {
        remove_kept(&table);
    }
    assert!(
        verdict_ok(success, &table) && charges == Some(60) && disconnects.is_some_and(|d| d > 0),
        "{table}\n(expected the verdict to hold, 60 charge rows, some disconnects)"
    );
}

/// Sends `bytes` to the demo server on a raw connection (shutting the writing side if
/// `half_close`, as a client whose upload was cut) and reads the answer until it closes.
fn raw(addr: &str, bytes: &[u8], half_close: bool) -> String {
    let answer = idemstore_testkit::http::exchange(addr, bytes, half_close).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A 400 problem+json, or what came instead.
#[track_caller]
fn expect_400_problem(what: &str, answer: &str) {
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.starts_with("http/1.1 400")
            && lower.contains("content-type: application/problem+json")
            && answer.contains("\"status\":400"),
        "{what}: expected a 400 problem, got {answer:?}"
    );
}

/// The demo's server reads a request whole before it runs it, and answers a header byte
/// outside ASCII: an upload cut short (declared length or inside a chunk) and an odd header
/// are 400 problems, nothing is charged, and the full request then runs once.
#[test]
fn demo_server_refuses_cut_uploads_and_odd_header_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger) = (dir.path().join("store.redb"), dir.path().join("ledger"));
    // The demo's server role: the demo executable with its files in the environment.
    let server = Program::start(
        "demo",
        [] as [&str; 0],
        &[
            ("IDEMSTORE_DEMO_ROLE", OsStr::new("server")),
            ("IDEMSTORE_DEMO_STORE", store.as_os_str()),
            ("IDEMSTORE_DEMO_LEDGER", ledger.as_os_str()),
        ],
    );
    let addr = server
        .first_line()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("the server printed {:?}", server.first_line()))
        .to_owned();
    let body = format!(
        r#"{{"payment":"p-1","amount":5,"memo":"{}"}}"#,
        "m".repeat(3000)
    );
    let head = |extra: &str| {
        format!(
            "POST /payments HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nX-Tenant: t\r\n\
             Idempotency-Key: \"k-1\"\r\n{extra}\r\n"
        )
    };
    for (declared, sent) in [(body.len(), 2000), (body.len(), 1024)] {
        let mut bytes = head(&format!("Content-Length: {declared}\r\n")).into_bytes();
        bytes.extend_from_slice(&body.as_bytes()[..sent]);
        expect_400_problem(
            &format!("{sent} of {declared} bytes"),
            &raw(&addr, &bytes, true),
        );
    }
    let mut chunked = head("Transfer-Encoding: chunked\r\n").into_bytes();
    chunked.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    chunked.extend_from_slice(&body.as_bytes()[..1500]);
    expect_400_problem("a chunk cut short", &raw(&addr, &chunked, true));
    let mut odd = head("X-Note: caf\u{e9}\r\nContent-Length: 2\r\n").into_bytes();
    odd.extend_from_slice(b"{}");
    expect_400_problem("a non-ASCII header byte", &raw(&addr, &odd, false));
    let charged = std::fs::read_to_string(&ledger).unwrap_or_default();
    assert!(
        charged.is_empty(),
        "charged on a refused request: {charged:?}"
    );
    let mut whole = head(&format!("Content-Length: {}\r\n", body.len())).into_bytes();
    whole.extend_from_slice(body.as_bytes());
    let answer = raw(&addr, &whole, false);
    let charged = std::fs::read_to_string(&ledger).unwrap_or_default();
    assert!(
        answer.starts_with("HTTP/1.1 201") && charged.lines().count() == 1,
        "the whole request: expected 201 and one charge, got {answer:?}, ledger {charged:?}"
    );
    drop(server);
}
