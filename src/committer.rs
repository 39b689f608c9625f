//! Group commit: the one thread that writes.
//!
//! Every state change (a claiming `begin`, the lease operations, release on drop, reaper
//! batches) is sent here over a crossbeam channel. The committer takes what is already queued (at most
//! [`MAX_BATCH`] operations), applies them in arrival order inside one redb write transaction
//! (each sees the state the ones before it left), commits once (one fsync for the whole
//! batch) and then answers every caller. A lone caller is committed at once: there is no timer.
//! Between batches the committer yields the CPU a bounded number of times while the callers
//! it just answered queue their next operation, so batches stay full under load. With the
//! queue empty it sleeps on a doorbell the callers ring, and each caller sleeps until its
//! answer arrives; neither wait spins (see [`crate::handoff`] for why).
//!
//! A commit that fails answers every caller of the batch with [`Error::Storage`] (an unknown
//! outcome); the engine decides what follows (redb poisons the store: later writes get
//! [`Error::Poisoned`] until it is reopened).
//!
//! The committer is the same for every engine: it collects batches and answers them, and
//! [`apply`] runs each command's state transition ([`crate::machine`]) on the engine's
//! [`Tables`]. An engine provides a [`BatchWriter`]: one transaction per batch. An engine
//! whose database orders concurrent transactions itself (PostgreSQL, through its key locks)
//! may ask for more committer threads ([`BatchWriter::siblings`]): they share the queue,
//! each with a batch in flight; redb has one.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::handoff::{self, Doorbell};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::machine::{self, BeginStep, Grant, Hold, Refusal};
use crate::outcome::Completed;
use crate::record::Record;
use crate::stats::{StatsCells, bump};

/// Most operations applied in one write transaction.
pub(crate) const MAX_BATCH: usize = 256;

/// Where the committer sends the answer to one command, of that command's own type.
pub(crate) type Responder<T> = handoff::Sender<Result<T>>;

/// A state change, as sent to the committer: its request and where its answer goes.
pub(crate) enum Command {
    /// `begin` found the key claimable in its read; claim it (re-checked here).
    Claim(Job<ClaimRequest, Claimed>),
    /// Completes a lease; answered with the stored response.
    Complete(Job<LeaseRequest<Vec<u8>>, Completed>),
    /// Extends, checkpoints or releases a lease; answered with the lease's end as written.
    Hold(Job<LeaseRequest<Hold>, u64>),
    /// Abandons a lease: the record is deleted.
    Abandon(Job<LeaseRequest<()>, ()>),
    /// Delete up to this many dead records.
    Reap(Job<usize, Reaped>),
}

/// The request of a claim.
pub(crate) struct ClaimRequest {
    pub key: Vec<u8>,
    pub fp: Fingerprint,
    pub lease: u64,
}

/// The request of a lease operation: the lease's key and fencing token, and what to do.
pub(crate) struct LeaseRequest<A> {
    pub key: Vec<u8>,
    pub token: u64,
    pub action: A,
}

/// The answer to a claim: granted, or (another caller got there between the read and the
/// claim) the answer without a write.
pub(crate) type Claimed = std::result::Result<Grant, Refusal>;

/// What a reap pass did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reaped {
    pub deleted: u64,
    /// Whether more records may be due (the pass stopped at its limit, or expiry entries
    /// are still being re-filed after a clock correction).
    pub more: bool,
}

/// One command of a batch: its request (taken when it is applied), its answer once the
/// batch committed, and where the answer goes.
pub(crate) struct Job<Q, A> {
    request: Option<Q>,
    result: Option<Result<A>>,
    resp: Responder<A>,
}

impl<Q, A> Job<Q, A> {
    fn new(request: Q, resp: Responder<A>) -> Job<Q, A> {
        Job {
            request: Some(request),
            result: None,
            resp,
        }
    }

    /// Sends the answer: the batch's failure if it failed, else this command's own result.
    fn finish(self, failure: Option<&Error>) {
        self.resp.send(match (failure, self.result) {
            (Some(failure), _) => Err(failure.clone()),
            (None, Some(result)) => result,
            // Not applied although its batch committed: only when the committer stopped.
            (None, None) => Err(Error::Closed),
        });
    }
}

impl Command {
    fn finish(self, failure: Option<&Error>) {
        match self {
            Command::Claim(job) => job.finish(failure),
            Command::Complete(job) => job.finish(failure),
            Command::Hold(job) => job.finish(failure),
            Command::Abandon(job) => job.finish(failure),
            Command::Reap(job) => job.finish(failure),
        }
    }
}

// Boxing the command would cost an allocation per operation; the small variant is sent once.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Command(Command),
    Shutdown,
}

/// Handle of the committer thread (or threads, for an engine with [`BatchWriter::siblings`]).
pub(crate) struct Committer {
    tx: Sender<Msg>,
    bell: Arc<Doorbell>,
    handles: Vec<JoinHandle<()>>,
}

/// A cheap handle that submits operations to the committer (the reaper holds one).
#[derive(Clone)]
pub(crate) struct Submitter {
    tx: Sender<Msg>,
    bell: Arc<Doorbell>,
}

impl Submitter {
    /// Claims `key` for a new lease.
    ///
    /// # Errors
    /// As [`Submitter::send`].
    pub fn claim(&self, key: Vec<u8>, fp: Fingerprint, lease: u64) -> Result<Claimed> {
        self.send(|resp| Command::Claim(Job::new(ClaimRequest { key, fp, lease }, resp)))
    }

    /// Completes the lease `token` of `key` with `response`.
    ///
    /// # Errors
    /// [`Error::LeaseLost`], or as [`Submitter::send`].
    pub fn complete(&self, key: Vec<u8>, token: u64, response: Vec<u8>) -> Result<Completed> {
        let request = LeaseRequest {
            key,
            token,
            action: response,
        };
        self.send(|resp| Command::Complete(Job::new(request, resp)))
    }

    /// Applies `hold` to the lease `token` of `key`; returns the lease's end as written.
    ///
    /// # Errors
    /// [`Error::LeaseLost`], or as [`Submitter::send`].
    pub fn hold(&self, key: Vec<u8>, token: u64, hold: Hold) -> Result<u64> {
        let request = LeaseRequest {
            key,
            token,
            action: hold,
        };
        self.send(|resp| Command::Hold(Job::new(request, resp)))
    }

    /// Abandons the lease `token` of `key`: its record is deleted.
    ///
    /// # Errors
    /// [`Error::LeaseLost`], or as [`Submitter::send`].
    pub fn abandon(&self, key: Vec<u8>, token: u64) -> Result<()> {
        let request = LeaseRequest {
            key,
            token,
            action: (),
        };
        self.send(|resp| Command::Abandon(Job::new(request, resp)))
    }

    /// One reaping pass of at most `limit` index entries.
    ///
    /// # Errors
    /// As [`Submitter::send`].
    pub fn reap(&self, limit: usize) -> Result<Reaped> {
        self.send(|resp| Command::Reap(Job::new(limit, resp)))
    }

    /// Sends the command made with the responder and waits for its answer.
    ///
    /// # Errors
    /// The command's own error, a batch failure, or [`Error::Closed`] once the committer
    /// stopped.
    fn send<A>(&self, command: impl FnOnce(Responder<A>) -> Command) -> Result<A> {
        let (resp, answer) = handoff::oneshot();
        self.tx
            .send(Msg::Command(command(resp)))
            .map_err(|_| Error::Closed)?;
        self.bell.ring();
        // No answer: the committer stopped before it took the command.
        answer.recv().unwrap_or(Err(Error::Closed))
    }
}

/// The tables of one write transaction, as the commands need them. Each engine provides its
/// own; every read sees the writes made before it in the same transaction.
pub(crate) trait Tables {
    /// The record of `key` (`None`: absent).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record, [`Error::Storage`].
    fn get(&mut self, key: &[u8]) -> Result<Option<Record>>;
    /// Writes `record` as the record of `key`.
    ///
    /// # Errors
    /// [`Error::Storage`].
    fn put(&mut self, key: &[u8], record: &Record) -> Result<()>;
    /// Deletes the record of `key`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    fn delete(&mut self, key: &[u8]) -> Result<()>;
    /// A fencing token above every token granted before.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged or exhausted counter, [`Error::Storage`].
    fn next_token(&mut self) -> Result<u64>;
    /// Deletes records dead at `now`, examining at most `limit` expiry entries.
    ///
    /// # Errors
    /// [`Error::Storage`].
    fn reap(&mut self, now: u64, limit: usize) -> Result<Reaped>;
}

/// An engine's side of the committer: applies a batch in one transaction.
pub(crate) trait BatchWriter: Send + 'static {
    /// Applies every command of `batch` (with [`apply`]) in one transaction and commits it;
    /// each command keeps its own result. `Ok(false)`: nothing was written, every command
    /// was answered without a write. `Err` fails the whole batch (an unknown outcome for its
    /// callers).
    ///
    /// # Errors
    /// A storage failure of the transaction or its commit.
    fn write(&self, batch: &mut [Command]) -> Result<bool>;

    /// When the engine refuses every write (after a failed commit, say): the error for them.
    fn refusal(&self) -> Option<Error> {
        None
    }

    /// Runs once when the committer stops cleanly, after the last batch.
    fn close(&self) {}

    /// Writers for more committer threads beside this one's, each with a batch of its own in
    /// flight: for an engine that orders concurrent batches itself (PostgreSQL's key locks,
    /// taken in one order, do), so that a batch can be sent while others wait for their
    /// commits. Empty, the default: one committer thread, which sleeps on the doorbell.
    fn siblings(&self) -> Vec<Self>
    where
        Self: Sized,
    {
        Vec::new()
    }
}

struct Worker<W> {
    writer: W,
    stats: Arc<StatsCells>,
    /// Where the committer sleeps while its queue is empty.
    bell: Arc<Doorbell>,
}

impl Committer {
    /// Starts the committer thread.
    ///
    /// # Errors
    /// [`Error::Storage`] if the thread cannot be spawned.
    pub fn spawn<W: BatchWriter>(writer: W, stats: Arc<StatsCells>) -> Result<Committer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let bell = Arc::new(Doorbell::default());
        let siblings = writer.siblings();
        if !siblings.is_empty() {
            // Several workers on one queue, each waiting in the channel's own `recv` (the
            // doorbell has one sleeper; a ring without one costs a fence and a load). If a
            // spawn fails, the workers already started stop when the queue's sender drops.
            let handles = std::iter::once(writer)
                .chain(siblings)
                .enumerate()
                .map(|(i, writer)| {
                    let worker = Worker {
                        writer,
                        stats: Arc::clone(&stats),
                        bell: Arc::clone(&bell),
                    };
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name(format!("idemstore-committer-{i}"))
                        .spawn(move || worker.run_shared(rx))
                        .map_err(|e| Error::storage("starting a committer thread", e))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(Committer { tx, bell, handles });
        }
        let worker = Worker {
            writer,
            stats,
            bell: Arc::clone(&bell),
        };
        let handle = std::thread::Builder::new()
            .name("idemstore-committer".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::storage("starting the committer thread", e))?;
        bell.set_sleeper(handle.thread().clone());
        Ok(Committer {
            tx,
            bell,
            handles: vec![handle],
        })
    }

    /// A handle to submit operations.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
        }
    }

    /// Stops the thread (each thread) after everything queued before was answered, and joins
    /// it.
    pub fn shutdown(&mut self) {
        // One stop for each worker: a worker stops at the first it takes.
        for _ in &self.handles {
            let _ = self.tx.send(Msg::Shutdown);
        }
        self.bell.ring();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Most scheduler yields between two batches.
const MAX_YIELDS: usize = 8;

/// Lets the callers just answered run and queue their next operation before the next batch
/// is taken: fuller batches, fewer fsyncs. Yields the CPU while the queue keeps growing and
/// holds fewer operations than were answered; stops as soon as a yield brought nothing new.
/// Not a timed wait: with no other runnable thread a yield returns at once, so a lone
/// caller is committed immediately.
fn let_callers_catch_up(rx: &Receiver<Msg>, answered: usize) {
    let mut queued = rx.len();
    for _ in 0..MAX_YIELDS {
        if queued >= answered {
            return;
        }
        std::thread::yield_now();
        let now = rx.len();
        if now == queued {
            return;
        }
        queued = now;
    }
}

/// Adds what is queued to `batch`, up to [`MAX_BATCH`]; whether a stop was taken.
fn take_queued(rx: &Receiver<Msg>, batch: &mut Vec<Command>) -> bool {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(Msg::Command(command)) => batch.push(command),
            Ok(Msg::Shutdown) => return true,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return false,
        }
    }
    false
}

impl<W: BatchWriter> Worker<W> {
    fn run(self, rx: Receiver<Msg>) {
        let mut batch: Vec<Command> = Vec::with_capacity(MAX_BATCH);
        loop {
            match self.next(&rx) {
                Some(Msg::Command(command)) => batch.push(command),
                Some(Msg::Shutdown) | None => break,
            }
            let stop = take_queued(&rx, &mut batch);
            let answered = batch.len();
            self.commit_batch(&mut batch);
            if stop {
                break;
            }
            let_callers_catch_up(&rx, answered);
        }
        self.writer.close();
    }

    /// One of several workers sharing the queue: each takes what is queued when it is free,
    /// so a batch is collected and sent while the others wait for their commits. No yields
    /// between batches: another worker takes what arrives meanwhile.
    fn run_shared(self, rx: Receiver<Msg>) {
        let mut batch: Vec<Command> = Vec::with_capacity(MAX_BATCH);
        loop {
            match rx.recv() {
                Ok(Msg::Command(command)) => batch.push(command),
                Ok(Msg::Shutdown) | Err(_) => break,
            }
            let stop = take_queued(&rx, &mut batch);
            self.commit_batch(&mut batch);
            if stop {
                break;
            }
        }
        self.writer.close();
    }

    /// Waits for the next message, sleeping on the doorbell (not in the channel's `recv`,
    /// which spins first; see [`crate::handoff`]). `None` once every sender is gone; the
    /// committer is normally stopped by [`Msg::Shutdown`], which is followed by a ring.
    fn next(&self, rx: &Receiver<Msg>) -> Option<Msg> {
        loop {
            match rx.try_recv() {
                Ok(msg) => return Some(msg),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.bell.sleep_unless(|| !rx.is_empty()),
            }
        }
    }

    fn commit_batch(&self, batch: &mut Vec<Command>) {
        if let Some(refusal) = self.writer.refusal() {
            for command in batch.drain(..) {
                command.finish(Some(&refusal));
            }
            return;
        }
        let failure = match self.writer.write(batch) {
            Ok(committed) => {
                if committed {
                    bump(&self.stats.commits, 1);
                    bump(&self.stats.committed_ops, batch.len() as u64);
                }
                None
            }
            Err(failure) => {
                // Whatever failed, it failed a write: its outcome is unknown to the callers.
                let failure = failure.outcome_unknown();
                tracing::error!(
                    error = %failure,
                    operations = batch.len(),
                    "a write batch failed; its callers get an error (unknown outcome)"
                );
                Some(failure)
            }
        };
        for command in batch.drain(..) {
            command.finish(failure.as_ref());
        }
    }
}

/// Applies one command to `tables` at `now`, keeping its result in it. `Err` (a storage
/// failure) fails the batch; the command's own refusals (a lost lease, say) are its result.
///
/// # Errors
/// A storage failure, which fails the whole batch.
pub(crate) fn apply(
    tables: &mut impl Tables,
    command: &mut Command,
    now: u64,
    settings: &Settings,
) -> Result<()> {
    match command {
        Command::Claim(job) => run(job, |q| claim(tables, q, now, settings)),
        Command::Complete(job) => run(job, |q| {
            let current = tables.get(&q.key)?;
            let (record, done) =
                machine::complete(current.as_ref(), q.token, q.action, now, settings.ttl)?;
            tables.put(&q.key, &record)?;
            Ok(done)
        }),
        Command::Hold(job) => run(job, |q| {
            let current = tables.get(&q.key)?;
            let (record, lease_expires_at) =
                machine::hold(current.as_ref(), q.token, q.action, now)?;
            tables.put(&q.key, &record)?;
            Ok(lease_expires_at)
        }),
        Command::Abandon(job) => run(job, |q| {
            let current = tables.get(&q.key)?;
            machine::abandon(current.as_ref(), q.token, now)?;
            tables.delete(&q.key)
        }),
        Command::Reap(job) => run(job, |limit| tables.reap(now, limit)),
    }
}

fn claim(
    tables: &mut impl Tables,
    q: ClaimRequest,
    now: u64,
    settings: &Settings,
) -> Result<Claimed> {
    let current = tables.get(&q.key)?;
    Ok(match machine::decide_begin(current, &q.fp, now) {
        BeginStep::Claim(current) => {
            let token = tables.next_token()?;
            let grant = machine::claim(current, &q.fp, token, now, settings.ttl, q.lease);
            tables.put(&q.key, &grant.record)?;
            Ok(grant)
        }
        BeginStep::Refuse(refusal) => Err(refusal),
    })
}

/// Runs a job's request and keeps its result. A storage failure is returned instead (it
/// fails the whole batch); any other error is the job's own answer.
fn run<Q, A>(job: &mut Job<Q, A>, apply: impl FnOnce(Q) -> Result<A>) -> Result<()> {
    let Some(request) = job.request.take() else {
        return Ok(());
    };
    match apply(request) {
        Err(e @ Error::Storage { .. }) => Err(e),
        result => {
            job.result = Some(result);
            Ok(())
        }
    }
}

impl Command {
    /// The key the command writes (`None` for a reap pass).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Command::Claim(job) => job.request.as_ref().map(|q| q.key.as_slice()),
            Command::Complete(job) => job.request.as_ref().map(|q| q.key.as_slice()),
            Command::Hold(job) => job.request.as_ref().map(|q| q.key.as_slice()),
            Command::Abandon(job) => job.request.as_ref().map(|q| q.key.as_slice()),
            Command::Reap(_) => None,
        }
    }

    /// Whether the command is a claim (which may draw a fencing token).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn is_claim(&self) -> bool {
        matches!(self, Command::Claim(_))
    }

    /// Answers the command with `error` without applying it.
    pub fn answer_without_writing(&mut self, error: &Error) {
        match self {
            Command::Claim(job) => job.result = Some(Err(error.clone())),
            Command::Complete(job) => job.result = Some(Err(error.clone())),
            Command::Hold(job) => job.result = Some(Err(error.clone())),
            Command::Abandon(job) => job.result = Some(Err(error.clone())),
            Command::Reap(job) => job.result = Some(Err(error.clone())),
        }
    }
}
