//! The example programs, run as child processes by the tests that check them: cargo builds
//! every example before it runs the integration tests, into `target/<profile>/examples/`,
//! beside the `deps/` folder that holds the test binaries.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The path of the built example program `name`.
///
/// # Panics
///
/// When it is not built, with the command that builds it.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this executable");
    let dir = exe.parent().expect("the executable's folder");
    // A test binary is in `deps/`; an example (one example running another) in `examples/`.
    let examples = if dir.ends_with("examples") {
        dir.to_path_buf()
    } else {
        dir.parent().expect("the profile folder").join("examples")
    };
    let path = examples.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the example `{name}` is not built at {}: `cargo test` builds it when run without a \
         target filter; else run `cargo build --example {name}` first",
        path.display()
    );
    path
}

/// An example program running as a child process; killed (SIGKILL: no destructor runs, no
/// lease is released) when dropped.
pub struct Program {
    child: Child,
    first_line: String,
}

impl Program {
    /// Starts the example `name` with `args` (and `env`), and waits for the first line it
    /// prints (a server prints its address there); the rest of its output is passed on to
    /// this process's stdout.
    ///
    /// # Panics
    ///
    /// When it is not built, does not start, or ends before printing a line.
    pub fn start<A, K, V>(name: &str, args: A, env: &[(K, V)]) -> Program
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut command = Command::new(example(name));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("the example `{name}` does not start: {e}"));
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first_line = match lines.next() {
            Some(Ok(line)) => line,
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!("the example `{name}` printed no line ({other:?}), then {status:?}")
            }
        };
        // Keep reading: a closed pipe would make its next `println!` panic.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                println!("{line}");
            }
        });
        Program { child, first_line }
    }

    /// The first line the program printed.
    pub fn first_line(&self) -> &str {
        &self.first_line
    }

    /// SIGKILL, and waits for the process to end.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `http_service` example running as a child process on a free port of 127.0.0.1.
pub struct HttpService {
    program: Program,
    addr: String,
}

impl HttpService {
    /// Starts it with `args` (its flags: `--db`, `--ledger`, `--lease-ms`, …) and waits until
    /// it listens.
    ///
    /// # Panics
    ///
    /// As [`Program::start`].
    pub fn start<A>(args: A) -> HttpService
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> = ["--addr", "127.0.0.1:0"]
            .iter()
            .map(Into::into)
            .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
            .collect();
        let program = Program::start("http_service", args, &[] as &[(&str, &str)]);
        let addr = program.first_line().trim().to_owned();
        HttpService { program, addr }
    }

    /// The bound address, `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://` and the bound address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Charges per `scope/key`, as the service's payment processor saw them (`GET /charges`).
    ///
    /// # Panics
    ///
    /// When the service does not answer.
    pub fn charges(&self) -> BTreeMap<String, u32> {
        let body = crate::http::get(&self.addr, "/charges").expect("GET /charges");
        body.lines()
            .filter_map(|line| {
                let (key, n) = line.rsplit_once(' ')?;
                Some((key.to_owned(), n.parse().ok()?))
            })
            .collect()
    }

    /// How often `key` (in scope `public`) was charged.
    pub fn charges_for(&self, key: &str) -> u32 {
        self.charges()
            .get(&format!("public/{key}"))
            .copied()
            .unwrap_or(0)
    }

    /// SIGKILL: no destructor runs, no lease is released.
    pub fn kill(self) {
        self.program.kill();
    }
}
