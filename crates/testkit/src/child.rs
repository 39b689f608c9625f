//! Child processes of a test: the test binary itself run again with one (ignored) test
//! selected and an environment variable naming its role, talking to its parent in lines (the
//! parent's commands on the child's stdin, the child's answers on its stdout).
//!
//! The child's answers are what follows [`MARK`] on its stdout lines (the test harness
//! prints its own lines there too); [`emit`] writes one. Its stderr goes to a file, shown
//! when the parent gives up on it. A [`Child`] still running when dropped is killed.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The prefix of a child's answer lines.
pub const MARK: &str = "@@child ";

/// Child side: prints one answer line to the parent (and flushes it at once).
///
/// # Panics
///
/// When stdout is gone (the parent died): the child has nobody to talk to.
pub fn emit(line: impl Display) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}{line}").expect("write to the parent");
    out.flush().expect("flush to the parent");
}

/// Child side: the parent's commands, one line each, until it closes the child's stdin.
pub fn commands() -> impl Iterator<Item = String> {
    std::io::stdin().lines().map_while(Result::ok)
}

/// A running child process and the answer lines it printed so far.
pub struct Child {
    process: std::process::Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: tempfile::NamedTempFile,
    name: String,
}

impl Child {
    /// Runs the test binary again with only the ignored test `test` selected, with `env`
    /// added to its environment. `name` names the child in failure messages.
    ///
    /// # Panics
    ///
    /// When the process cannot be started.
    pub fn spawn(name: &str, test: &str, env: &[(&str, &str)]) -> Child {
        let stderr = tempfile::NamedTempFile::new().expect("a file for the child's stderr");
        let mut command = Command::new(std::env::current_exe().expect("current exe"));
        command
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                stderr.reopen().expect("reopen the child's stderr file"),
            ));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = command.spawn().expect("spawn the child");
        let stdout = process.stdout.take().expect("the child's stdout");
        let stdin = process.stdin.take();
        let (rx, _reader) = marked_lines(stdout, MARK);
        Child {
            process,
            stdin,
            lines: rx,
            stderr,
            name: name.to_owned(),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Sends one command line.
    ///
    /// # Panics
    ///
    /// When the child no longer reads its stdin (it died).
    pub fn send(&mut self, line: impl Display) {
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}").and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = sent {
            self.fail(&format!("sending a command failed ({e})"));
        }
    }

    /// Closes the child's stdin: the end of its commands.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next answer line, waiting at most `timeout`; `None` when none came (or the child
    /// ended).
    pub fn recv(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Every answer line already received, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The next answer line, within `timeout`.
    ///
    /// # Panics
    ///
    /// When none came in time, with `what` and the child's stderr in the message.
    pub fn expect(&mut self, timeout: Duration, what: &str) -> String {
        match self.recv(timeout) {
            Some(line) => line,
            None => self.fail(&format!(
                "no answer in {timeout:?} while waiting for {what}"
            )),
        }
    }

    /// Answer lines up to and including the first one `done` accepts, within `timeout`.
    ///
    /// # Panics
    ///
    /// When no such line came in time, with `what` and the child's stderr in the message.
    pub fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let last = done(&line);
                    lines.push(line);
                    if last {
                        return lines;
                    }
                }
                Err(_) => self.fail(&format!(
                    "no answer in {timeout:?} while waiting for {what} (got {lines:?})"
                )),
            }
        }
    }

    /// Sends `signal` (a name `kill -s` knows, such as `STOP`) to the child.
    ///
    /// # Panics
    ///
    /// When `kill` fails.
    pub fn signal(&mut self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            self.fail(&format!("kill -s {signal} failed ({status:?})"));
        }
    }

    /// SIGKILLs the child (it must still be running), waits for it, and returns the answer
    /// lines it printed before it died that were not read yet.
    ///
    /// # Panics
    ///
    /// When the child had already ended by itself.
    pub fn kill(mut self) -> Vec<String> {
        if let Ok(Some(status)) = self.process.try_wait() {
            self.fail(&format!("it ended by itself ({status})"));
        }
        self.process.kill().expect("kill the child");
        let status = self.process.wait().expect("wait for the child");
        assert!(!status.success(), "{}: killed, yet it succeeded", self.name);
        // The reader sees EOF now; what it read before is all there is.
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        lines
    }

    /// Closes the child's stdin and waits (at most `timeout`) for it to exit successfully;
    /// returns the answer lines not read yet.
    ///
    /// # Panics
    ///
    /// When it does not end in time or fails.
    pub fn finish(mut self, timeout: Duration) -> Vec<String> {
        self.close_stdin();
        let deadline = Instant::now() + timeout;
        loop {
            match self.process.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => self.fail(&format!("it failed ({status})")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => self.fail(&format!("it did not end within {timeout:?}")),
                Err(e) => self.fail(&format!("waiting for it failed ({e})")),
            }
        }
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        lines
    }

    /// Kills the child and panics with `why` and the child's stderr.
    ///
    /// # Panics
    ///
    /// Always.
    pub fn fail(&mut self, why: &str) -> ! {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let err = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
        panic!("child {}: {why}; its stderr:\n{err}", self.name);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// Reads a child's stdout on a thread of its own, all the time (a full pipe would stall the
/// child), until EOF: sends what follows `mark` in each whole line (not always at the line's
/// start: the test harness prints `test NAME ... ` before the test runs, without a line
/// break). A last line cut short by a kill is dropped. Returns the lines and the thread.
pub fn marked_lines(
    stdout: impl std::io::Read + Send + 'static,
    mark: &'static str,
) -> (mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.last() != Some(&b'\n') {
                break;
            }
            let line = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
            if let Some(pos) = line.find(mark)
                && tx.send(line[pos + mark.len()..].to_owned()).is_err()
            {
                break;
            }
        }
    });
    (rx, reader)
}
