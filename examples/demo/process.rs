//! The parent's side of the server: starting it, reading its events, killing it.

use std::error::Error;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{
    BACKEND_ENV, Backend, IGNORE_ENV, LEDGER_ENV, PG_ENV, ROLE_ENV, SCHEMA_ENV, SERVER_ENV,
    STORE_ENV, ServerKind,
};

/// How to start a server process.
pub(crate) struct ServerConfig<'a> {
    /// The redb store file (redb backend).
    pub(crate) store: &'a Path,
    /// The ledger file (redb backend).
    pub(crate) ledger: &'a Path,
    /// Where the servers' stderr goes (appended).
    pub(crate) log: &'a Path,
    pub(crate) ignore_checkpoints: bool,
    pub(crate) backend: Backend,
    pub(crate) server: ServerKind,
    /// The conninfo and schema (postgres backend).
    pub(crate) postgres: Option<(&'a str, &'a str)>,
}

/// What the server processes reported (read from their stdout).
#[derive(Default)]
pub(crate) struct ServerEvents {
    pub(crate) takeover_charged: AtomicU64,
    pub(crate) takeover_intent: AtomicU64,
    pub(crate) takeover_scratch: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) deduped: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Handler runs (the axum service reports them).
    pub(crate) runs: AtomicU64,
}

/// A running server child; killed when dropped.
pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) reader: Option<JoinHandle<()>>,
}

impl ServerProcess {
    /// The server's `http://` address.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn start(
        config: &ServerConfig<'_>,
        events: Arc<ServerEvents>,
        errors: Arc<Mutex<Vec<String>>>,
    ) -> Result<ServerProcess, Box<dyn Error>> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.log)?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(ROLE_ENV, "server")
            .env(STORE_ENV, config.store)
            .env(LEDGER_ENV, config.ledger)
            .env(BACKEND_ENV, config.backend.name())
            .env(SERVER_ENV, config.server.name())
            .env(
                IGNORE_ENV,
                if config.ignore_checkpoints { "1" } else { "0" },
            );
        if let Some((conninfo, schema)) = config.postgres {
            command.env(PG_ENV, conninfo).env(SCHEMA_ENV, schema);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split(' ');
                match (words.next(), words.next()) {
                    (Some("LISTENING"), Some(addr)) => {
                        let _ = tx.send(addr.to_owned());
                    }
                    (Some("TAKEOVER"), Some("charged")) => {
                        events.takeover_charged.fetch_add(1, SeqCst);
                    }
                    (Some("TAKEOVER"), Some("intent")) => {
                        events.takeover_intent.fetch_add(1, SeqCst);
                    }
                    (Some("TAKEOVER"), Some(_)) => {
                        events.takeover_scratch.fetch_add(1, SeqCst);
                    }
                    (Some("FENCED"), _) => {
                        events.fenced.fetch_add(1, SeqCst);
                    }
                    (Some("RUN"), _) => {
                        events.runs.fetch_add(1, SeqCst);
                    }
                    (Some("DEDUPED"), _) => {
                        events.deduped.fetch_add(1, SeqCst);
                    }
                    (Some("ERROR"), _) => {
                        events.errors.fetch_add(1, SeqCst);
                        errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("server: {line}"));
                    }
                    _ => {}
                }
            }
        });
        let mut server = ServerProcess {
            child,
            url: String::new(),
            reader: Some(reader),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "the server did not start (see server.log)")?;
        server.url = format!("http://{addr}");
        Ok(server)
    }

    /// SIGKILL: no destructor runs, nothing is flushed, no lease is released.
    pub(crate) fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
