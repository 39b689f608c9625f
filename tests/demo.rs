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

use std::process::ExitCode;

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

type Test = (&'static str, fn() -> Result<(), String>);

const TESTS: [Test; 2] = [
    ("demo_verdict_holds", demo_verdict_holds),
    (
        "demo_verdict_fails_without_checkpoints",
        demo_verdict_fails_without_checkpoints,
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
