//! Runs the demo (`examples/demo.rs`) small: a few clients, a server child process that is
//! SIGKILLed and restarted, a stalled handler taken over. The verdict computed from the
//! ledger must hold; and with the service broken on purpose (takeovers ignore their
//! checkpoint) it must fail, so the verdict is not a formality.
//!
//! A custom harness (`harness = false`): the demo re-executes its own executable as the
//! server, so this test binary must act as the server when asked to, before anything else.

#[path = "../examples/demo.rs"]
#[allow(dead_code)]
mod demo;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn options(ignore_checkpoints: bool) -> demo::Options {
    demo::Options {
        payments: 90,
        clients: 4,
        seed: 7,
        keep: false,
        quiet: true,
        ignore_checkpoints,
    }
}

/// Every payment charged once, with at least one takeover (the stalled handler's).
fn demo_verdict_holds() -> Result<(), String> {
    let report = demo::run(&options(false)).map_err(|e| format!("the demo failed to run: {e}"))?;
    if report.ok() && report.charges == 90 && report.takeovers > 0 {
        Ok(())
    } else {
        Err(format!(
            "{}\n(expected the verdict to hold, 90 charges, at least one takeover)",
            report.table()
        ))
    }
}

/// A takeover that ignores its checkpoint charges again, and the verdict says so.
fn demo_verdict_fails_without_checkpoints() -> Result<(), String> {
    let report = demo::run(&options(true)).map_err(|e| format!("the demo failed to run: {e}"))?;
    if let Some(dir) = report.kept() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if !report.ok() && report.charges > 90 {
        Ok(())
    } else {
        Err(format!(
            "{}\n(expected double charges and a failed verdict)",
            report.table()
        ))
    }
}

/// Sends `bytes` to the demo server on a raw connection (shutting the writing side if
/// `half_close`, as a client whose upload was cut) and reads the answer until it closes.
fn raw(url: &str, bytes: &[u8], half_close: bool) -> Result<String, String> {
    let addr = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream.write_all(bytes).map_err(|e| format!("write: {e}"))?;
    if half_close {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A 400 problem+json, or what came instead.
fn expect_400_problem(what: &str, answer: &str) -> Result<(), String> {
    let lower = answer.to_ascii_lowercase();
    if lower.starts_with("http/1.1 400")
        && lower.contains("content-type: application/problem+json")
        && answer.contains("\"status\":400")
    {
        Ok(())
    } else {
        Err(format!("{what}: expected a 400 problem, got {answer:?}"))
    }
}

/// The demo's server reads a request whole before it runs it, and answers a header byte
/// outside ASCII: an upload cut short (declared length or inside a chunk) and an odd header
/// are 400 problems, nothing is charged, and the full request then runs once.
fn demo_server_refuses_cut_uploads_and_odd_header_bytes() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (store, ledger) = (dir.path().join("store.redb"), dir.path().join("ledger"));
    let server = demo::ServerProcess::start(
        &store,
        &ledger,
        &dir.path().join("server.log"),
        Default::default(),
        Default::default(),
        false,
    )
    .map_err(|e| format!("the server did not start: {e}"))?;
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
            &raw(server.url(), &bytes, true)?,
        )?;
    }
    let mut chunked = head("Transfer-Encoding: chunked\r\n").into_bytes();
    chunked.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    chunked.extend_from_slice(&body.as_bytes()[..1500]);
    expect_400_problem("a chunk cut short", &raw(server.url(), &chunked, true)?)?;
    let mut odd = head("X-Note: caf\u{e9}\r\nContent-Length: 2\r\n").into_bytes();
    odd.extend_from_slice(b"{}");
    expect_400_problem("a non-ASCII header byte", &raw(server.url(), &odd, false)?)?;
    let charged = std::fs::read_to_string(&ledger).unwrap_or_default();
    if !charged.is_empty() {
        return Err(format!("charged on a refused request: {charged:?}"));
    }
    let mut whole = head(&format!("Content-Length: {}\r\n", body.len())).into_bytes();
    whole.extend_from_slice(body.as_bytes());
    let answer = raw(server.url(), &whole, false)?;
    let charged = std::fs::read_to_string(&ledger).unwrap_or_default();
    if answer.starts_with("HTTP/1.1 201") && charged.lines().count() == 1 {
        Ok(())
    } else {
        Err(format!(
            "the whole request: expected 201 and one charge, got {answer:?}, ledger {charged:?}"
        ))
    }
}

type Test = (&'static str, fn() -> Result<(), String>);

const TESTS: [Test; 3] = [
    ("demo_verdict_holds", demo_verdict_holds),
    (
        "demo_verdict_fails_without_checkpoints",
        demo_verdict_fails_without_checkpoints,
    ),
    (
        "demo_server_refuses_cut_uploads_and_odd_header_bytes",
        demo_server_refuses_cut_uploads_and_odd_header_bytes,
    ),
];

fn main() -> ExitCode {
    if demo::is_server() {
        return demo::server_main();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let selected: Vec<&Test> = TESTS
        .iter()
        .filter(|(name, _)| filter.is_none_or(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, test) in &selected {
        match test() {
            Ok(()) => println!("test {name} ... ok"),
            Err(detail) => {
                println!("test {name} ... FAILED");
                failed.push((name, detail));
            }
        }
    }
    for (name, detail) in &failed {
        println!("\n---- {name} ----\n{detail}");
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        TESTS.len() - selected.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
