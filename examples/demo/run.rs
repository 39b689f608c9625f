//! The whole simulation: the server, the clients, the crash and the restart, then the
//! checks on the ledger and the store.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use idemstore::Store;
use idemstore_testkit::rng::{RngExt, rng};
use indicatif::{ProgressBar, ProgressStyle};

use crate::clients::{Counts, World, client};
use crate::process::{ServerConfig, ServerEvents, ServerProcess};
use crate::report::Report;

use crate::{BURST, Backend, DOWNTIME, Options, STALL_MS, ServerKind};

/// Runs the whole simulation.
pub(crate) fn run(options: &Options) -> Result<Report, Box<dyn Error>> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "idemstore-demo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    let store_path = dir.join("payments.redb");
    let ledger_path = dir.join("ledger.txt");
    let log_path = dir.join("server.log");

    let progress = if options.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(options.payments as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} payments  {msg}",
            )?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    };
    let say = |line: String| {
        if !options.quiet {
            progress.println(line);
        }
    };
    let events = Arc::new(ServerEvents::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    #[cfg(feature = "postgres")]
    let schema = match options.backend {
        Backend::Postgres => {
            let conninfo = crate::pg::conninfo()?;
            let suffix = dir
                .file_name()
                .map(|n| n.to_string_lossy().replace('-', "_"))
                .unwrap_or_default();
            let suffix = suffix.trim_start_matches("idemstore_demo_").to_owned();
            Some(crate::pg::RunSchema::create(conninfo, &suffix)?)
        }
        Backend::Redb => None,
    };
    #[cfg(feature = "postgres")]
    let postgres = schema
        .as_ref()
        .map(|s| (s.conninfo.as_str(), s.schema.as_str()));
    #[cfg(not(feature = "postgres"))]
    let postgres = None;
    let config = ServerConfig {
        store: &store_path,
        ledger: &ledger_path,
        log: &log_path,
        ignore_checkpoints: options.ignore_checkpoints,
        backend: options.backend,
        server: options.server,
        postgres,
    };
    let where_store = match postgres {
        Some((_, schema)) => format!("store in schema {schema}"),
        None => format!("store {}", store_path.display()),
    };
    let mut servers = Vec::new();
    for index in 0..options.replicas {
        // One at a time: the first creates the store's tables, the others find them.
        let server = ServerProcess::start(&config, events.clone(), problems.clone())?;
        let name = if options.replicas == 1 {
            "server".to_owned()
        } else {
            format!("replica {index}")
        };
        say(format!(
            "{name} (pid {}) on {}, {where_store}",
            server.child.id(),
            server.url,
        ));
        servers.push(server);
    }
    progress.set_message("server up");
    let world = Arc::new(World {
        urls: RwLock::new(servers.iter().map(|s| s.url().to_owned()).collect()),
        next: AtomicUsize::new(0),
        disconnect_mid_handler: options.server == ServerKind::Axum,
        counts: Counts::default(),
        done: AtomicU64::new(0),
        on_wire: AtomicI64::new(0),
        last_stall: Mutex::new(None),
        references: Mutex::new(HashMap::new()),
        fresh: Mutex::new(HashMap::new()),
        problems: problems.clone(),
        progress: progress.clone(),
        seed: options.seed,
    });

    let mut handles = Vec::new();
    for index in 0..options.clients.min(options.payments) {
        let (world, dir) = (world.clone(), dir.clone());
        let (clients, payments) = (options.clients.min(options.payments), options.payments);
        handles.push(
            std::thread::Builder::new()
                .name(format!("client-{index}"))
                .spawn(move || {
                    if let Err(e) = client(&world, &dir, index, clients, payments) {
                        world.problem(format!("client {index} failed: {e}"));
                    }
                })?,
        );
    }

    // The crash: SIGKILL a server once a seeded share (30-50%) of the payments is done.
    let crash_at = (options.payments as u64 * rng(options.seed).random_range(30..=50) / 100).max(1);
    let victim = rng(options.seed ^ 0x5eed).random_range(0..options.replicas);
    while world.done.load(SeqCst) < crash_at && handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let on_wire = world.on_wire.load(SeqCst);
    let (name, others) = if options.replicas == 1 {
        ("server".to_owned(), String::new())
    } else {
        (
            format!("replica {victim}"),
            format!(", the other {} serving on", options.replicas - 1),
        )
    };
    servers.remove(victim).kill();
    progress.set_message(format!("{name} KILLED (SIGKILL)"));
    say(format!(
        "{name} killed with SIGKILL after {} payments, {on_wire} request(s) on the wire{others}",
        world.done.load(SeqCst)
    ));
    std::thread::sleep(DOWNTIME);
    let server = ServerProcess::start(&config, events.clone(), problems.clone())?;
    world.urls.write().unwrap_or_else(|e| e.into_inner())[victim] = server.url().to_owned();
    progress.set_message(format!("{name} restarted"));
    say(format!(
        "{name} restarted (pid {}) on {}, same {}",
        server.child.id(),
        server.url,
        if postgres.is_some() {
            "database"
        } else {
            "store and ledger files"
        }
    ));
    servers.insert(victim, server);
    for h in handles {
        let _ = h.join();
    }
    // Let a stalled handler wake up (and be fenced off) before the final stop.
    let last_stall = *world.last_stall.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = last_stall {
        let until = at + Duration::from_millis(STALL_MS + 300);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    drop(servers);
    progress.finish_and_clear();

    // The evidence: the ledger (file or table), the store, and what the clients saw.
    let mut per_payment: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut charges = 0u64;
    let mut failures = problems.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut booked = |reference: &str, payment: &str| {
        charges += 1;
        per_payment
            .entry(payment.to_owned())
            .or_default()
            .push(reference.to_owned());
    };
    #[cfg(feature = "postgres")]
    if let Some(schema) = &schema {
        for (reference, payment) in schema.charges()? {
            booked(&reference, &payment);
        }
    }
    if postgres.is_none() {
        let ledger = std::fs::read_to_string(&ledger_path)?;
        for line in ledger.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() != 4 {
                failures.push(format!("malformed ledger line {line:?}"));
                continue;
            }
            booked(fields[0], fields[1]);
        }
    }
    #[cfg(feature = "postgres")]
    let summary = match &schema {
        Some(schema) => schema.summary()?,
        None => redb_summary(&store_path)?,
    };
    #[cfg(not(feature = "postgres"))]
    let summary = redb_summary(&store_path)?;

    let n = options.payments as u64;
    let mut checks = Vec::new();
    let mut check = |ok: bool, text: String, failures: &mut Vec<String>| {
        if ok {
            checks.push(text);
        } else {
            failures.push(text);
        }
    };
    let ledger_unit = if postgres.is_some() {
        "ledger rows"
    } else {
        "ledger lines"
    };
    check(
        charges == n,
        format!("charges executed ({ledger_unit}) {charges} == logical payments {n}"),
        &mut failures,
    );
    let twice: Vec<_> = per_payment
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .map(|(p, _)| p.clone())
        .collect();
    let missing = (0..options.payments)
        .filter(|j| !per_payment.contains_key(&format!("pay-{j:06}")))
        .count();
    check(
        twice.is_empty() && missing == 0 && per_payment.len() as u64 == n,
        format!(
            "each payment id exactly once in the ledger ({} charged twice or more{}, {missing} never)",
            twice.len(),
            if twice.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    twice.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )
            }
        ),
        &mut failures,
    );
    let references = world
        .references
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let wrong_reference = (0..options.payments)
        .map(|j| format!("pay-{j:06}"))
        .filter(|p| {
            let seen = references.get(p);
            let booked = per_payment.get(p);
            match (seen, booked) {
                (Some(seen), Some(booked)) => {
                    seen.len() != 1 || booked.len() != 1 || seen.first() != booked.first()
                }
                _ => true,
            }
        })
        .count();
    check(
        wrong_reference == 0,
        format!(
            "every payment answered 2xx, every 2xx carrying its ledger charge reference ({wrong_reference} not)"
        ),
        &mut failures,
    );
    let executed_twice = world
        .fresh
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|&&k| k > 1)
        .count();
    check(
        executed_twice == 0,
        format!(
            "at most one executing (non-replayed) 2xx per payment ({executed_twice} with more)"
        ),
        &mut failures,
    );
    let c = &world.counts;
    let misuses = c.misuses.load(SeqCst);
    check(
        c.mismatches.load(SeqCst) >= misuses,
        format!("every key reuse for another amount answered 422 ({misuses} reuses)"),
        &mut failures,
    );
    check(
        summary.completed == n && summary.in_flight == 0,
        format!(
            "the store {} holds {} completed records (one per payment), {} in flight",
            if postgres.is_some() { "schema" } else { "file" },
            summary.completed,
            summary.in_flight
        ),
        &mut failures,
    );

    let get = |a: &AtomicU64| a.load(SeqCst);
    let takeovers = get(&events.takeover_charged)
        + get(&events.takeover_intent)
        + get(&events.takeover_scratch);
    let mut rows = vec![
        ("logical payments".to_owned(), n),
        (
            "HTTP attempts (all requests sent)".to_owned(),
            get(&c.attempts),
        ),
        (
            "  responses lost after processing (injected)".to_owned(),
            get(&c.lost),
        ),
        (
            "  client timeouts (slow or stalled server)".to_owned(),
            get(&c.timeouts),
        ),
        (
            "  connection failures (injected, server down)".to_owned(),
            get(&c.refused),
        ),
        (
            "  duplicate deliveries (a 2nd copy in flight)".to_owned(),
            get(&c.duplicates),
        ),
        (
            format!("  bursts of {BURST} concurrent duplicates"),
            get(&c.bursts),
        ),
        (
            "answers received: 201 that ran the payment".to_owned(),
            get(&c.executed),
        ),
        (
            "                  replays (Idempotent-Replayed)".to_owned(),
            get(&c.replays),
        ),
        (
            "                  409 in flight (+ Retry-After)".to_owned(),
            get(&c.conflicts),
        ),
        (
            "                  422 key reused for another amount".to_owned(),
            get(&c.mismatches),
        ),
        ("                  5xx".to_owned(), get(&c.server_errors)),
    ];
    let mut row = |label: &str, value: u64| rows.push((label.to_owned(), value));
    if options.replicas > 1 {
        row(
            "service replicas sharing the store",
            options.replicas as u64,
        );
        row("replica killed (SIGKILL mid-flight) and restarted", 1);
    } else {
        row("server killed (SIGKILL mid-flight) and restarted", 1);
    }
    match (options.server, options.backend) {
        (ServerKind::Hyper, Backend::Redb) => {
            row("lease takeovers", takeovers);
            row(
                "  resumed from checkpoint \"charged\"",
                get(&events.takeover_charged),
            );
            row(
                "  resumed from checkpoint \"intent\"",
                get(&events.takeover_intent),
            );
            row(
                "  from scratch (nothing was charged yet)",
                get(&events.takeover_scratch),
            );
            row("stale holders fenced off (LeaseLost)", get(&events.fenced));
        }
        (ServerKind::Hyper, Backend::Postgres) => {
            row("lease takeovers", takeovers);
            row(
                "  from scratch (the dead attempt's transaction rolled back)",
                get(&events.takeover_scratch),
            );
            row(
                "stale holders fenced off (LeaseLost, charge rolled back)",
                get(&events.fenced),
            );
        }
        (ServerKind::Axum, _) => {
            row(
                "client disconnects mid-handler (handler ran on)",
                get(&c.disconnects),
            );
            row("handler runs (the layer's)", get(&events.runs));
        }
    }
    row(
        "repeated charge references ignored by ledger",
        get(&events.deduped),
    );
    row(
        "client crashes, resumed from the outbox",
        get(&c.client_crashes),
    );
    row("retry runs that gave up, resumed later", get(&c.gave_up));
    row(&format!("charges executed ({ledger_unit})"), charges);
    let keep = options.keep || !failures.is_empty();
    #[cfg(feature = "postgres")]
    let kept_schema = match &schema {
        Some(schema) if keep => Some(schema.schema.clone()),
        Some(schema) => {
            schema.drop_schema()?;
            None
        }
        None => None,
    };
    #[cfg(not(feature = "postgres"))]
    let kept_schema = None;
    let kept = if keep {
        Some(dir.clone())
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        None
    };
    Ok(Report {
        options: options.clone(),
        elapsed: started.elapsed(),
        rows,
        failures,
        checks,
        kept,
        kept_schema,
    })
}

/// The redb store's own count of its records.
fn redb_summary(path: &std::path::Path) -> Result<idemstore::admin::Summary, Box<dyn Error>> {
    let store = Store::builder().reap_interval(None).open(path)?;
    let summary = store.summary()?;
    store.close()?;
    Ok(summary)
}
