//! `idemstore`: look inside an idemstore store file.
//!
//! ```text
//! cargo run --features cli --bin idemstore -- stats idempotency.redb
//! cargo install --path . --features cli   # then: idemstore --help
//! ```
//!
//! Commands: `stats`, `get`, `list`, `reap`, `dump` (see `idemstore --help`, or [`HELP`]).
//! Exit codes: 0 done; 1 `get` found no record; 2 a usage error or a file that cannot be
//! opened (missing, busy, foreign, damaged).
//!
//! `stats`, `get`, `list` and `dump` open the file read-only ([`StoreFile`]) and never write
//! to it; `reap` opens it as a service does (exclusively, with no reaper thread). Either
//! way a file held open by a running service is refused as busy: stop the service first.
//! The tool never creates a file.
//!
//! Built only with the `cli` feature, which brings the tool's own dependencies (lexopt for
//! the arguments, serde_json, base64 and humantime for what it prints and reads), so the
//! library's dependency tree stays lean. The help texts are written here by hand: they
//! explain the states, fields and exit codes, which no generated help would.

mod text;

use std::ffi::OsString;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use idemstore::admin::{RecordView, StoreFile};
use idemstore::http::StoredResponse;
use idemstore::{Entry, Error, Key, Store};

use text::{
    base64, human_bytes, human_duration, json_string, parse_duration, printable, relative, rfc3339,
};

/// The tool's help.
const HELP: &str = "\
idemstore: look inside an idemstore store file (an embedded idempotency-key store on redb)

USAGE:
    idemstore <COMMAND> FILE [OPTIONS]
    idemstore help [COMMAND]        (or: idemstore COMMAND --help)

COMMANDS:
    stats FILE                      record counts by state (live and dead), file size,
                                    format version, last fencing token
    get FILE --scope S ID           one record, dead or alive, with its response
    list FILE [--state S] [--older-than D]
                                    one line per record; S: in-flight, completed or dead
    reap FILE                       delete the dead (expired) records now
    dump FILE                       every record as JSON, one object per line; responses
                                    and checkpoints in base64

The file must not be open elsewhere: a running service holds its store open, and the tool
then refuses the file as busy (stop the service first). The tool never creates a file.
Only `reap` changes records: the other commands open the file read-only and never write to it.

EXIT CODES:
    0  done
    1  `get` found no record under the key
    2  usage error, or the file is missing, empty, busy, not an idemstore store, or damaged
";

const HELP_STATS: &str = "\
idemstore stats FILE

Counts the records of the store FILE by state:
    in flight     a request holds (or held) a lease; those whose lease ran out wait for a
                  retry to take over (the holder crashed, stalled or dropped it)
    completed     the response is stored and replayed to retries
    dead          expired: absent for every operation already, deleted by the next reaper
                  pass (or by `idemstore reap`)
and prints the file size, the format version and the last fencing token granted.
Reads every record once.
";

const HELP_GET: &str = "\
idemstore get FILE --scope SCOPE ID

Shows the record stored under (SCOPE, ID), also when it is dead (expired, not yet reaped):
its state, fencing token, fingerprint, times, and the stored response (or the in-flight
checkpoint). A response stored by idemstore::http (a StoredResponse) is decoded into status,
headers and body; any response is also printed in base64. The scope is the one the service
chose (tenant, API user; \"\" for none); ID is the client's Idempotency-Key value, unquoted
(after `--` when it starts with `-`).

Exit code 1 when there is no record under the key.
";

const HELP_LIST: &str = "\
idemstore list FILE [--state in-flight|completed|dead] [--older-than DURATION]

One line per record, in the order the keys were claimed (oldest first): state, age, fencing
token, details, and the key as \"scope\"/\"id\" (each part a JSON string, so a / or a space inside
either part stays unambiguous).
    --state S          only records in state S; `in-flight` and `completed` are live
                       records, `dead` the expired ones not yet reaped (default: all)
    --older-than D     only records older than D: begun that long ago (in flight) or
                       completed that long ago; D like 90s, 5m, 1h30m, 2d, 500ms,
                       1h 30min, 2weeks (humantime's syntax)
The age of an in-flight record is the time since its first attempt began.
";

const HELP_REAP: &str = "\
idemstore reap FILE

Deletes every dead record now (what the service's reaper thread does every reap interval),
in small transactions, and prints how many it deleted. Dead records are already absent for
every operation, so this changes no answer of the store; it frees space in the file.
";

const HELP_DUMP: &str = "\
idemstore dump FILE

Every record, dead ones included, as JSON Lines (one object per line, in the order the keys
were claimed, oldest first).
Fields of every object:
    scope, id           strings
    state               \"in_flight\" or \"completed\"
    dead                true when expired (absent for every operation, not yet reaped)
    token               the fencing token (number)
    fingerprint         the request fingerprint, 64 lowercase hex digits
    expires_at          when the record dies (RFC 3339, UTC)
In flight:   attempt, created_at, lease_expires_at, checkpoint_base64 (null when none)
Completed:   completed_at, response_bytes, response_base64
Binary data (responses, checkpoints) is standard base64 with padding (RFC 4648).
";

/// A failure that ends the tool with exit code 2 and a message.
struct Fail(String);

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail(s)
    }
}

impl From<&str> for Fail {
    fn from(s: &str) -> Fail {
        Fail(s.to_owned())
    }
}

type Outcome = Result<ExitCode, Fail>;

/// Standard output, buffered. The first write error stops further output; a closed pipe
/// (`idemstore dump FILE | head`) ends the output quietly instead of panicking as
/// `println!` would.
struct Out {
    w: std::io::BufWriter<std::io::StdoutLock<'static>>,
    error: Option<std::io::Error>,
}

impl Out {
    fn new() -> Out {
        Out {
            w: std::io::BufWriter::new(std::io::stdout().lock()),
            error: None,
        }
    }

    /// Writes one line; `false` once output failed (stop producing more).
    fn line(&mut self, args: std::fmt::Arguments<'_>) -> bool {
        if self.error.is_none()
            && let Err(e) = writeln!(self.w, "{args}")
        {
            self.error = Some(e);
        }
        self.error.is_none()
    }

    /// Flushes; a closed pipe is not an error of the tool.
    fn finish(mut self) -> Result<(), Fail> {
        match self.error.take().or_else(|| self.w.flush().err()) {
            Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(Fail(format!("writing to stdout: {e}")))
            }
            _ => Ok(()),
        }
    }
}

/// `println!` into an [`Out`].
macro_rules! out {
    ($o:expr, $($arg:tt)*) => {
        $o.line(format_args!($($arg)*))
    };
}

fn main() -> ExitCode {
    match run(lexopt::Parser::from_env()) {
        Ok(code) => code,
        Err(Fail(message)) => {
            eprintln!("idemstore: {message}");
            ExitCode::from(2)
        }
    }
}

fn command_help(command: &str) -> Option<&'static str> {
    Some(match command {
        "stats" => HELP_STATS,
        "get" => HELP_GET,
        "list" => HELP_LIST,
        "reap" => HELP_REAP,
        "dump" => HELP_DUMP,
        _ => return None,
    })
}

/// Prints a help (or version) text on standard output.
fn print_text(text: &str) -> Outcome {
    let mut o = Out::new();
    out!(o, "{}", text.trim_end());
    o.finish()?;
    Ok(ExitCode::SUCCESS)
}

/// An option as the user wrote it, for messages.
fn shown(arg: &lexopt::Arg<'_>) -> String {
    match arg {
        lexopt::Arg::Short(c) => format!("-{c}"),
        lexopt::Arg::Long(name) => format!("--{name}"),
        lexopt::Arg::Value(v) => v.to_string_lossy().into_owned(),
    }
}

fn run(mut args: lexopt::Parser) -> Outcome {
    use lexopt::Arg::{Long, Short, Value};
    let command = match args.next().map_err(|e| Fail(e.to_string()))? {
        None => {
            eprint!("{HELP}");
            return Ok(ExitCode::from(2));
        }
        Some(Short('h') | Long("help")) => return print_text(HELP),
        Some(Short('V') | Long("version")) => {
            return print_text(&format!("idemstore {}", env!("CARGO_PKG_VERSION")));
        }
        Some(Value(command)) => command.to_string_lossy().into_owned(),
        Some(other) => return Err(unknown_command(&shown(&other))),
    };
    if command == "help" {
        let text = match args.next().map_err(|e| Fail(e.to_string()))? {
            None => HELP,
            Some(Value(c)) => {
                let c = c.to_string_lossy();
                command_help(&c).ok_or_else(|| unknown_command(&c))?
            }
            Some(other) => return Err(unknown_command(&shown(&other))),
        };
        if let Some(extra) = args.next().map_err(|e| Fail(e.to_string()))? {
            let extra = shown(&extra);
            return Err(Fail(format!(
                "`help` takes at most one command, got also {extra:?}"
            )));
        }
        return print_text(text);
    }
    let help = command_help(&command).ok_or_else(|| unknown_command(&command))?;
    let usage = |message: &str| Fail(format!("{message}\n\n{help}"));
    let text = |v: Result<OsString, lexopt::Error>| -> Result<String, Fail> {
        v.and_then(lexopt::ValueExt::string)
            .map_err(|e| usage(&e.to_string()))
    };
    let mut options = Options::default();
    let mut positional: Vec<OsString> = Vec::new();
    while let Some(arg) = args.next().map_err(|e| usage(&e.to_string()))? {
        match arg {
            Short('h') | Long("help") => return print_text(help),
            Long("scope") if command == "get" => options.scope = Some(text(args.value())?),
            Long("state") if command == "list" => {
                let v = text(args.value())?;
                options.state = Some(match v.as_str() {
                    "in-flight" | "in_flight" => StateFilter::InFlight,
                    "completed" => StateFilter::Completed,
                    "dead" => StateFilter::Dead,
                    _ => {
                        return Err(usage(&format!(
                            "--state {v:?}: use in-flight, completed or dead"
                        )));
                    }
                });
            }
            Long("older-than") if command == "list" => {
                let v = text(args.value())?;
                options.older_than = Some(parse_duration(&v).map_err(|e| usage(&e))?);
            }
            Value(v) => positional.push(v),
            option => {
                let option = shown(&option);
                return Err(usage(&format!("unknown option {option} for `{command}`")));
            }
        }
    }
    let expected = if command == "get" { 2 } else { 1 };
    if positional.len() != expected {
        return Err(usage(&format!(
            "`{command}` takes {}, got {} argument(s)",
            if expected == 2 { "FILE and ID" } else { "FILE" },
            positional.len()
        )));
    }
    let mut positional = positional.into_iter();
    let path = PathBuf::from(positional.next().unwrap_or_default());
    let id = positional
        .next()
        .map(|id| text(Ok(id)))
        .transpose()?
        .unwrap_or_default();
    if command == "get" && options.scope.is_none() {
        return Err(usage(
            "`get` needs --scope SCOPE (use --scope \"\" for keys without a scope)",
        ));
    }
    if command == "reap" {
        let store = open_store(&path)?;
        let result = reap(&store);
        let closed = store
            .close()
            .map_err(|e| Fail(format!("closing {}: {e}", path.display())));
        let code = result?;
        closed?;
        return Ok(code);
    }
    let file = open_read_only(&path)?;
    match command.as_str() {
        "stats" => stats(&file, &path),
        "get" => get(&file, options.scope.as_deref().unwrap_or(""), &id),
        "list" => list(&file, &options),
        "dump" => dump(&file),
        _ => Err(unknown_command(&command)),
    }
}

fn unknown_command(command: &str) -> Fail {
    Fail(format!(
        "unknown command {command:?}; commands: stats, get, list, reap, dump (idemstore --help)"
    ))
}

#[derive(Default)]
struct Options {
    scope: Option<String>,
    state: Option<StateFilter>,
    older_than: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StateFilter {
    InFlight,
    Completed,
    Dead,
}

/// Checks that `path` names an existing, non-empty file: the tool never creates a store.
fn existing(path: &Path) -> Result<(), Fail> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Fail(format!(
                "{shown}: no such file (the tool never creates a store; give the path of an existing one)"
            )));
        }
        Err(e) => return Err(Fail(format!("{shown}: {e}"))),
        Ok(m) if m.is_dir() => {
            return Err(Fail(format!(
                "{shown} is a directory; give the path of a store file"
            )));
        }
        // A service would turn an empty file into a new store; the tool does not.
        Ok(m) if m.len() == 0 => {
            return Err(Fail(format!(
                "{shown} is empty: not a store yet (the tool never creates one)"
            )));
        }
        Ok(_) => {}
    }
    Ok(())
}

/// Why `path` could not be opened, for the user.
fn open_fail(path: &Path, e: Error) -> Fail {
    let shown = path.display();
    match e {
        Error::AlreadyOpen { .. } => Fail(format!(
            "{shown} is busy: another process (a running service?) has it open, and a store \
             file is opened by one process at a time; stop that process and try again"
        )),
        Error::IncompatibleFormat { reason } => Fail(format!(
            "{shown} is not an idemstore store this version can read: {reason}; the file was \
             not modified"
        )),
        other => Fail(format!("{shown}: {}", with_causes(&other))),
    }
}

/// `e`'s message and those of its causes, joined by ": " (a storage error's message says
/// what idemstore was doing; why it failed is in its source).
fn with_causes(e: &Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// Opens an existing store file read-only, for the commands that only look.
fn open_read_only(path: &Path) -> Result<StoreFile, Fail> {
    existing(path)?;
    StoreFile::open(path).map_err(|e| open_fail(path, e))
}

/// Opens an existing store file for writing (`reap`), never creating one.
fn open_store(path: &Path) -> Result<Store, Fail> {
    existing(path)?;
    Store::builder()
        .reap_interval(None)
        .open(path)
        .map_err(|e| open_fail(path, e))
}

fn storage_fail(e: Error) -> Fail {
    Fail(with_causes(&e))
}

fn stats(store: &StoreFile, path: &Path) -> Outcome {
    let s = store.summary().map_err(storage_fail)?;
    let mut o = Out::new();
    let size = s
        .file_bytes
        .map_or("-".into(), |n| format!("{} ({n} bytes)", human_bytes(n)));
    out!(o, "file            {}", path.display());
    out!(o, "file size       {size}");
    out!(o, "format version  {}", s.format_version);
    out!(o, "last token      {}", s.last_token);
    out!(
        o,
        "records         {} ({} live, {} dead)",
        s.records(),
        s.live(),
        s.dead()
    );
    out!(
        o,
        "  in flight     {} ({} with an expired lease, waiting for a retry to take over)",
        s.in_flight,
        s.lease_expired
    );
    out!(
        o,
        "  completed     {} ({} of stored responses)",
        s.completed,
        human_bytes(s.response_bytes)
    );
    out!(
        o,
        "  dead          {} ({} in flight, {} completed; absent already, deleted by the next reap)",
        s.dead(),
        s.dead_in_flight,
        s.dead_completed
    );
    o.finish()?;
    Ok(ExitCode::SUCCESS)
}

fn get(store: &StoreFile, scope: &str, id: &str) -> Outcome {
    let key = Key::new(scope, id).map_err(storage_fail)?;
    let Some(view) = store.inspect(&key).map_err(storage_fail)? else {
        eprintln!(
            "idemstore: no record under scope {} id {}",
            json_string(scope),
            json_string(id)
        );
        return Ok(ExitCode::from(1));
    };
    let mut o = Out::new();
    let now = SystemTime::now();
    let at = |t: SystemTime| format!("{} ({})", rfc3339(t), relative(t, now));
    out!(o, "scope        {}", json_string(view.key.scope()));
    out!(o, "id           {}", json_string(view.key.id()));
    out!(o, "fingerprint  {}", view.fingerprint);
    match &view.entry {
        Entry::InFlight {
            token,
            lease_expires_at,
            attempt,
            checkpoint,
            created_at,
            expires_at,
            ..
        } => {
            out!(o, "state        {}", state_name(&view));
            out!(o, "token        {token}");
            out!(o, "attempt      {attempt}");
            out!(o, "created      {}", at(*created_at));
            out!(
                o,
                "lease until  {}{}",
                at(*lease_expires_at),
                if *lease_expires_at <= now && !view.dead {
                    ": expired, the next retry takes over"
                } else {
                    ""
                }
            );
            out!(o, "dies         {}", at(*expires_at));
            match checkpoint {
                None => {
                    out!(o, "checkpoint   none");
                }
                Some(c) => {
                    out!(o, "checkpoint   {}", human_bytes(c.len() as u64));
                    print_bytes(&mut o, c);
                }
            }
        }
        Entry::Completed(done) => {
            out!(o, "state        {}", state_name(&view));
            out!(o, "token        {}", done.token());
            out!(o, "completed    {}", at(done.completed_at()));
            out!(o, "dies         {}", at(done.expires_at()));
            out!(
                o,
                "response     {}",
                human_bytes(done.response().len() as u64)
            );
            if let Ok(stored) = StoredResponse::decode(done.response()) {
                out!(o, "  http status  {}", stored.status());
                for (name, value) in stored.headers() {
                    out!(
                        o,
                        "  header       {name}: {}",
                        printable(&String::from_utf8_lossy(value.as_bytes()))
                    );
                }
                out!(
                    o,
                    "  http body    {}",
                    human_bytes(stored.body().len() as u64)
                );
                if let Ok(body) = std::str::from_utf8(stored.body()) {
                    out!(o, "  body text    {}", printable(body));
                }
                out!(o, "  base64       {}", base64(done.response()));
            } else {
                print_bytes(&mut o, done.response());
            }
        }
    }
    o.finish()?;
    Ok(ExitCode::SUCCESS)
}

/// Prints bytes as text (when they are UTF-8) and as base64.
fn print_bytes(o: &mut Out, bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        out!(o, "  text         {}", printable(text));
    }
    out!(o, "  base64       {}", base64(bytes));
}

fn state_name(view: &RecordView) -> &'static str {
    match (&view.entry, view.dead) {
        (Entry::InFlight { .. }, false) => "in flight",
        (Entry::InFlight { .. }, true) => "in flight, dead (expired, not yet reaped)",
        (_, false) => "completed",
        (_, true) => "completed, dead (expired, not yet reaped)",
    }
}

/// When the record's age starts: its first attempt (in flight) or its completion.
fn since(view: &RecordView) -> SystemTime {
    match &view.entry {
        Entry::InFlight { created_at, .. } => *created_at,
        Entry::Completed(done) => done.completed_at(),
    }
}

fn list(store: &StoreFile, options: &Options) -> Outcome {
    let now = SystemTime::now();
    let mut shown = 0u64;
    let mut o = Out::new();
    out!(
        o,
        "{:<10} {:>8} {:>8}  {:<44} KEY (\"scope\"/\"id\")",
        "STATE",
        "AGE",
        "TOKEN",
        "DETAIL"
    );
    store
        .scan(|view| {
            let state = match (&view.entry, view.dead) {
                (_, true) => StateFilter::Dead,
                (Entry::InFlight { .. }, false) => StateFilter::InFlight,
                (_, false) => StateFilter::Completed,
            };
            if options.state.is_some_and(|s| s != state) {
                return ControlFlow::Continue(());
            }
            let age = now.duration_since(since(view)).unwrap_or(Duration::ZERO);
            if options.older_than.is_some_and(|min| age < min) {
                return ControlFlow::Continue(());
            }
            let (token, detail) = match &view.entry {
                Entry::InFlight {
                    token,
                    lease_expires_at,
                    attempt,
                    checkpoint,
                    ..
                } => {
                    let lease = if *lease_expires_at <= now {
                        format!("lease expired {}", relative(*lease_expires_at, now))
                    } else {
                        format!("lease ends {}", relative(*lease_expires_at, now))
                    };
                    let checkpoint = checkpoint.as_ref().map_or(String::new(), |c| {
                        format!(", checkpoint {}", human_bytes(c.len() as u64))
                    });
                    (*token, format!("attempt {attempt}, {lease}{checkpoint}"))
                }
                Entry::Completed(done) => (
                    done.token(),
                    format!("response {}", human_bytes(done.response().len() as u64)),
                ),
            };
            let state = match state {
                StateFilter::InFlight => "in-flight",
                StateFilter::Completed => "completed",
                StateFilter::Dead => "dead",
            };
            let ok = out!(
                o,
                "{state:<10} {:>8} {token:>8}  {detail:<44} {}/{}",
                human_duration(age),
                json_string(view.key.scope()),
                json_string(view.key.id())
            );
            shown += 1;
            if ok {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .map_err(storage_fail)?;
    o.finish()?;
    eprintln!("{shown} record(s)");
    Ok(ExitCode::SUCCESS)
}

fn reap(store: &Store) -> Outcome {
    let deleted = store.reap().map_err(storage_fail)?;
    let mut o = Out::new();
    out!(o, "deleted {deleted} dead record(s)");
    o.finish()?;
    Ok(ExitCode::SUCCESS)
}

fn dump(store: &StoreFile) -> Outcome {
    let mut o = Out::new();
    let mut failed = None;
    store
        .scan(|view| match serde_json::to_string(&DumpLine::of(view)) {
            Ok(line) if out!(o, "{line}") => ControlFlow::Continue(()),
            Ok(_) => ControlFlow::Break(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        })
        .map_err(storage_fail)?;
    if let Some(e) = failed {
        return Err(Fail(format!("writing a record as JSON: {e}")));
    }
    o.finish()?;
    Ok(ExitCode::SUCCESS)
}

/// One record as one JSON object of `dump` (see `idemstore dump --help`), fields in this
/// order.
#[derive(serde::Serialize)]
struct DumpLine<'a> {
    scope: &'a str,
    id: &'a str,
    state: &'static str,
    dead: bool,
    token: u64,
    /// 64 lowercase hex digits.
    fingerprint: String,
    expires_at: String,
    #[serde(flatten)]
    detail: DumpDetail,
}

/// The fields of `dump` that depend on the record's state.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum DumpDetail {
    InFlight {
        attempt: u32,
        created_at: String,
        lease_expires_at: String,
        /// `null` when there is none.
        checkpoint_base64: Option<String>,
    },
    Completed {
        completed_at: String,
        response_bytes: usize,
        response_base64: String,
    },
}

impl DumpLine<'_> {
    fn of(view: &RecordView) -> DumpLine<'_> {
        let (state, token, expires_at, detail) = match &view.entry {
            Entry::InFlight {
                token,
                lease_expires_at,
                attempt,
                checkpoint,
                created_at,
                expires_at,
                ..
            } => (
                "in_flight",
                *token,
                *expires_at,
                DumpDetail::InFlight {
                    attempt: *attempt,
                    created_at: rfc3339(*created_at),
                    lease_expires_at: rfc3339(*lease_expires_at),
                    checkpoint_base64: checkpoint.as_deref().map(base64),
                },
            ),
            Entry::Completed(done) => (
                "completed",
                done.token(),
                done.expires_at(),
                DumpDetail::Completed {
                    completed_at: rfc3339(done.completed_at()),
                    response_bytes: done.response().len(),
                    response_base64: base64(done.response()),
                },
            ),
        };
        DumpLine {
            scope: view.key.scope(),
            id: view.key.id(),
            state,
            dead: view.dead,
            token,
            fingerprint: view.fingerprint.to_string(),
            expires_at: rfc3339(expires_at),
            detail,
        }
    }
}
