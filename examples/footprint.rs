//! Disk and memory footprint, and open times: store N completed records with 200-byte
//! responses, then report bytes on disk per record, and what opening the file again costs —
//! in time, and in peak resident memory (VmHWM from /proc/self/status, Linux) of a fresh
//! process that opens it, with the default 32 MiB page cache.
//!
//! ```sh
//! cargo run --release --example footprint                # 1,000,000 records
//! cargo run --release --example footprint -- 10000000    # ten million (5.2 GB, a few minutes)
//! cargo run --release --example footprint -- 100000 --keep /tmp/f.redb   # keep the file
//! ```
//!
//! Records are written by 64 threads with `Durability::None` (the figure of interest is the
//! footprint, not the speed; the clean close makes them durable before the file is measured),
//! or with `IDEMSTORE_DURABILITY=immediate`, one fsync per group commit as in production.
//!
//! Each open is measured in a new process (this program run again), so its peak RSS is the
//! open's own:
//!
//! 1. redb alone: the file opened by redb without, then with its integrity check on open (as
//!    the store opens it), and closed; the first of these also reads redb's statistics of the
//!    log and the expiry index, for how full their B-tree leaves are (both are read whole by
//!    every open);
//! 2. a clean reopen: the store loads the key index's snapshot written at the close; then
//!    every 100th record is replayed, so the peak includes a working read path;
//! 3. a reopen after a crash: a process opens the store, completes 10,000 new records and
//!    exits without closing it; the next open recovers the file, loads the snapshot and
//!    replays the log written after it;
//! 4. a full rebuild: the snapshot's header is removed from the file first, so the open reads
//!    the whole log, as every open did before there were snapshots.
//!
//! For the store's opens (2 to 4) the table splits the time into the check of every page
//! and the key index step (the snapshot, then the pass over the log), from the store's own
//! `tracing` events ("every page of the file checked", "key index ready").
//!
//! With `IDEMSTORE_COLD=1` (as root), the page cache is dropped before each open
//! (`/proc/sys/vm/drop_caches`), so the opens read the file from the disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use idemstore::{Begin, Durability, Fingerprint, Key, Store};

/// Records written by the process that "crashes" in step 3.
const CRASH_RECORDS: u64 = 10_000;

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn key(i: u64) -> Key {
    // UUID-shaped, spread over the key space like real idempotency keys.
    let z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7);
    Key::new(
        "tenant-1",
        &format!("{:016x}-{:08x}-4000-8000", z, i as u32),
    )
    .expect("key")
}

const RESPONSE: [u8; 200] = [b'x'; 200];

/// Writes the records `range` with `threads` threads.
fn write(store: &Store, range: std::ops::Range<u64>, threads: u64) {
    let n = range.end;
    std::thread::scope(|s| {
        for t in 0..threads {
            let range = range.clone();
            s.spawn(move || {
                for i in (range.start + t..range.end).step_by(threads as usize) {
                    let k = key(i);
                    match store.begin(&k, &Fingerprint::of(k.id())) {
                        Ok(Begin::Started(lease)) => {
                            lease.complete(&RESPONSE).expect("complete");
                        }
                        other => panic!("fresh key did not start: {other:?}"),
                    }
                    if t == 0 && (i - range.start).is_multiple_of(1_000_000) && i > range.start {
                        eprintln!("  {i} / {n} records…");
                    }
                }
            });
        }
    });
}

/// Field `name` of the latest captured event whose message contains `event` (`?` if none):
/// the page check's end ("every page of the file checked": how long it took) and "key index
/// ready" (how long building the index took, and from what).
fn field(event: &str, name: &str) -> String {
    idemstore_testkit::events::installed()
        .latest(event)
        .and_then(|e| e.field(name).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn drop_caches_if_cold() {
    if std::env::var("IDEMSTORE_COLD").as_deref() == Ok("1") {
        let _ = Command::new("sync").status();
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
            eprintln!("IDEMSTORE_COLD=1: dropping the page cache failed ({e}); the open is warm");
        }
    }
}

/// A step run in a child process: prints `key=value` lines on stdout.
fn child(step: &str, path: &Path, n: u64) -> Result<(), idemstore::Error> {
    idemstore_testkit::events::installed();
    drop_caches_if_cold();
    let started = Instant::now();
    match step {
        "integrity" | "plain" => {
            let db = redb::Builder::new()
                .set_cache_size(32 << 20)
                .set_check_integrity_on_open(step == "integrity")
                .open(path)
                .expect("redb open");
            println!("open_ms={}", started.elapsed().as_millis());
            if step == "plain" {
                // How full the B-tree leaves of the two tables every open reads are.
                use redb::{ReadableDatabase, ReadableTableMetadata};
                let txn = db.begin_read().expect("read");
                let log: redb::TableDefinition<u64, &[u8]> =
                    redb::TableDefinition::new("idemstore_log");
                let deaths: redb::TableDefinition<(u64, u64), ()> =
                    redb::TableDefinition::new("idemstore_log_expiry");
                for (name, stats) in [
                    ("log", txn.open_table(log).expect("log").stats()),
                    ("expiry", txn.open_table(deaths).expect("expiry").stats()),
                ] {
                    let stats = stats.expect("table stats");
                    println!("{name}_leaf_pages={}", stats.leaf_pages());
                    println!("{name}_stored_bytes={}", stats.stored_bytes());
                }
            }
            drop(db);
        }
        "crash" => {
            // Durable commits, and an exit without a close: no snapshot of the new entries,
            // and a file redb has to recover.
            let store = Store::builder()
                .durability(Durability::Immediate)
                .reap_interval(None)
                .open(path)?;
            write(&store, n..n + CRASH_RECORDS, 16);
            println!("open_and_write_ms={}", started.elapsed().as_millis());
            std::process::exit(0);
        }
        "reopen" | "rebuild" => {
            let store = Store::builder().reap_interval(None).open(path)?;
            println!("open_ms={}", started.elapsed().as_millis());
            const CHECKED: &str = "every page of the file checked";
            const READY: &str = "key index ready";
            println!("check_ms={}", field(CHECKED, "elapsed_ms"));
            println!("index_ms={}", field(READY, "elapsed_ms"));
            println!("snapshot_ms={}", field(READY, "snapshot_ms"));
            println!("index_source={}", field(READY, "source"));
            println!("index_bytes={}", field(READY, "index_bytes"));
            println!("entries={}", field(READY, "entries"));
            let replayed = Instant::now();
            for i in (0..n).step_by(100) {
                let k = key(i);
                match store.begin(&k, &Fingerprint::of(k.id()))? {
                    Begin::Replay(done) => assert_eq!(done.response(), &RESPONSE[..]),
                    other => panic!("expected a replay, got {other:?}"),
                }
            }
            println!("replay_ms={}", replayed.elapsed().as_millis());
            let closing = Instant::now();
            store.close()?;
            println!("close_ms={}", closing.elapsed().as_millis());
        }
        other => panic!("unknown step {other}"),
    }
    if let Some(kib) = peak_rss_kib() {
        println!("peak_kib={kib}");
    }
    Ok(())
}

/// Runs `step` in a new process; its `key=value` lines.
fn run_child(step: &str, path: &Path, n: u64) -> Vec<(String, String)> {
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--step",
            step,
            path.to_str().expect("utf-8 path"),
            &n.to_string(),
        ])
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "step {step} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn get<'a>(kv: &'a [(String, String)], k: &str) -> &'a str {
    kv.iter()
        .find(|(key, _)| key == k)
        .map_or("?", |(_, v)| v.as_str())
}

fn mib(kib: &str) -> String {
    kib.parse::<f64>()
        .map_or("?".into(), |k| format!("{:.1} MiB", k / 1024.0))
}

fn secs(ms: &str) -> String {
    ms.parse::<f64>()
        .map_or("?".into(), |m| format!("{:.2} s", m / 1000.0))
}

/// The file's length, and the bytes the file system allocated for it (Unix): redb grows a
/// file by whole regions, whose unwritten tail takes no space on disk.
fn file_size(path: &Path) -> (u64, Option<u64>) {
    let meta = std::fs::metadata(path).expect("metadata");
    #[cfg(unix)]
    let on_disk = Some(std::os::unix::fs::MetadataExt::blocks(&meta) * 512);
    #[cfg(not(unix))]
    let on_disk = None;
    (meta.len(), on_disk)
}

/// Removes the key index snapshot's header, so that the next open rebuilds the index from the
/// whole log (the open removes the rest).
fn remove_snapshot(path: &Path) {
    let db = redb::Database::create(path).expect("redb open");
    let txn = db.begin_write().expect("write");
    {
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("idemstore_meta");
        let mut meta = txn.open_table(def).expect("meta table");
        meta.remove("index_snapshot").expect("remove");
    }
    txn.commit().expect("commit");
}

fn main() -> Result<(), idemstore::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--step") {
        let n = args[3].parse().expect("count");
        return child(&args[1], Path::new(&args[2]), n);
    }
    let n: u64 = args
        .first()
        .map(|a| a.parse().expect("the record count is a number"))
        .unwrap_or(1_000_000);
    let keep = args
        .iter()
        .position(|a| a == "--keep")
        .map(|i| PathBuf::from(&args[i + 1]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = keep.unwrap_or_else(|| dir.path().join("footprint.redb"));
    let start = Instant::now();
    let close_time: Duration;
    let peak_before_close: Option<u64>;
    {
        let durability = match std::env::var("IDEMSTORE_DURABILITY").as_deref() {
            Ok("immediate") => Durability::Immediate,
            _ => Durability::None,
        };
        let store = Store::builder()
            .durability(durability)
            .reap_interval(None)
            .open(&path)?;
        write(&store, 0..n, 64);
        peak_before_close = peak_rss_kib();
        let closing = Instant::now();
        store.close()?;
        close_time = closing.elapsed();
    }
    let written = start.elapsed();
    let writer_peak = peak_rss_kib();
    let (bytes, on_disk) = file_size(&path);

    eprintln!("  measuring the opens…");
    let plain = run_child("plain", &path, n);
    let integrity = run_child("integrity", &path, n);
    let reopen = run_child("reopen", &path, n);
    run_child("crash", &path, n);
    let crashed = run_child("reopen", &path, n + CRASH_RECORDS);
    remove_snapshot(&path);
    let rebuild = run_child("rebuild", &path, n + CRASH_RECORDS);
    let (bytes_after, on_disk_after) = file_size(&path);

    let cold = std::env::var("IDEMSTORE_COLD").as_deref() == Ok("1");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| records | {n} (200-byte responses, written in {written:.1?}) |");
    let mebibytes = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| file size | {:.1} MiB = {:.0} bytes per record; on disk {} |",
        mebibytes(bytes),
        bytes as f64 / n as f64,
        on_disk.map_or("?".into(), |d| format!(
            "{:.1} MiB = {:.0} bytes per record",
            mebibytes(d),
            d as f64 / n as f64
        ))
    );
    for (table, what) in [("log", "the log"), ("expiry", "the expiry index")] {
        let pages = get(&plain, &format!("{table}_leaf_pages"));
        let number = |k: &str| get(&plain, k).parse::<f64>().unwrap_or(f64::NAN);
        let full = number(&format!("{table}_stored_bytes"))
            / (number(&format!("{table}_leaf_pages")) * 4096.0);
        println!(
            "| {what}'s B-tree leaves | {pages} pages of 4 KiB, {:.0} % full |",
            100.0 * full
        );
    }
    println!("| close after writing (writes the key index's snapshot) | {close_time:.2?} |");
    if let Some(kib) = writer_peak {
        println!(
            "| peak RSS of the writing process (64 threads) | {:.1} MiB ({} before its close) |",
            kib as f64 / 1024.0,
            peak_before_close.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1024.0))
        );
    }
    println!(
        "| opens ({}) | time | of which the page check | of which the key index (snapshot read) | peak RSS of the process |",
        if cold { "cold page cache" } else { "warm" }
    );
    println!(
        "| redb's open alone, no integrity check | {} | — | — | {} |",
        secs(get(&plain, "open_ms")),
        mib(get(&plain, "peak_kib"))
    );
    println!(
        "| redb's open with its integrity check (as the store opens) | {} | — | — | {} |",
        secs(get(&integrity, "open_ms")),
        mib(get(&integrity, "peak_kib"))
    );
    for (what, kv) in [
        ("clean reopen (snapshot)", &reopen),
        (
            "reopen after a crash (snapshot + 10,000 later records)",
            &crashed,
        ),
        ("full rebuild (no snapshot)", &rebuild),
    ] {
        println!(
            "| {what} | {} | {} | {} ({}; {}) | {} |",
            secs(get(kv, "open_ms")),
            secs(get(kv, "check_ms")),
            secs(get(kv, "index_ms")),
            secs(get(kv, "snapshot_ms")),
            get(kv, "index_source"),
            mib(get(kv, "peak_kib"))
        );
    }
    let index_bytes: f64 = get(&reopen, "index_bytes").parse().unwrap_or(f64::NAN);
    let entries: f64 = get(&reopen, "entries").parse().unwrap_or(f64::NAN);
    println!(
        "| key index | {:.1} MiB = {:.1} bytes per record |",
        index_bytes / (1 << 20) as f64,
        index_bytes / entries
    );
    println!(
        "| replay of every 100th record / close, after the clean reopen | {} / {} |",
        secs(get(&reopen, "replay_ms")),
        secs(get(&reopen, "close_ms"))
    );
    println!(
        "| file size after these opens (a crash, its recovery, a rebuild) | {:.1} MiB; on disk {} |",
        mebibytes(bytes_after),
        on_disk_after.map_or("?".into(), |d| format!("{:.1} MiB", mebibytes(d)))
    );
    Ok(())
}
