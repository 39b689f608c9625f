//! Runs the demo (`examples/demo/`) small: a few clients, a server child process that is
//! SIGKILLed and restarted, a stalled handler taken over. The verdict computed from the
//! ledger must hold; and with the service broken on purpose (takeovers ignore their
//! checkpoint) it must fail, so the verdict is not a formality.
//!
//! The demo runs as the built example program (cargo builds it before it runs this test);
//! it re-executes itself as the server.

use std::ffi::OsStr;
use std::process::Command;

use idemstore_testkit::programs::{Program, example};

/// Runs the demo small (90 payments, 4 clients, seed 7, quiet): whether it exited with
/// success, and what it printed.
fn run_demo(ignore_checkpoints: bool) -> Result<(bool, String), String> {
    let mut command = Command::new(example("demo"));
    command.args([
        "--payments",
        "90",
        "--clients",
        "4",
        "--seed",
        "7",
        "--quiet",
    ]);
    if ignore_checkpoints {
        command.arg("--ignore-checkpoints");
    }
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
    if let Some(dir) = table
        .lines()
        .find_map(|line| line.strip_prefix("files kept in "))
    {
        let _ = std::fs::remove_dir_all(dir.trim());
    }
    let charges = row(&table, "charges executed (ledger lines)");
    assert!(
        !success && table.contains("VERDICT: VIOLATED") && charges.is_some_and(|c| c > 90),
        "{table}\n(expected double charges and a failed verdict)"
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
