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
//! outcome) and poisons the store: later writes get [`Error::Poisoned`] until it is reopened.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::handoff::{self, Doorbell};

use crate::config::{Durability, Settings};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::machine::{self, BeginStep, Grant, LeaseAction, Refusal, Transition};
use crate::record::Record;
use crate::stats::{StatsCells, bump};
use crate::storage::{self, Stored, WriteTables};

/// Most operations applied in one write transaction.
pub(crate) const MAX_BATCH: usize = 256;

/// Where the committer sends the answer to one command, of that command's own type.
pub(crate) type Responder<T> = handoff::Sender<Result<T>>;

/// A state change, as sent to the committer: its request and where its answer goes.
pub(crate) enum Command {
    /// `begin` found the key claimable in its read; claim it (re-checked here).
    Claim(Job<ClaimRequest, Claimed>),
    /// An operation of a lease; answered with the record as written (`None`: deleted).
    Lease(Job<LeaseRequest, Option<Record>>),
    /// Delete up to this many dead records.
    Reap(Job<usize, Reaped>),
}

/// The request of a claim.
pub(crate) struct ClaimRequest {
    pub key: Vec<u8>,
    pub fp: Fingerprint,
    pub lease: u64,
}

/// The request of a lease operation: the lease's key and fencing token, and the action.
pub(crate) struct LeaseRequest {
    pub key: Vec<u8>,
    pub token: u64,
    pub action: LeaseAction,
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
            Command::Lease(job) => job.finish(failure),
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

/// Handle of the committer thread.
pub(crate) struct Committer {
    tx: Sender<Msg>,
    bell: Arc<Doorbell>,
    handle: Option<JoinHandle<()>>,
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

    /// Applies `action` for the holder of `token`.
    ///
    /// # Errors
    /// [`Error::LeaseLost`], or as [`Submitter::send`].
    pub fn lease(&self, key: Vec<u8>, token: u64, action: LeaseAction) -> Result<Option<Record>> {
        self.send(|resp| Command::Lease(Job::new(LeaseRequest { key, token, action }, resp)))
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

struct Worker {
    stored: Arc<Stored>,
    settings: Settings,
    stats: Arc<StatsCells>,
    poisoned: AtomicBool,
    /// The latest time persisted by a batch (nanoseconds).
    noted_time: Cell<u64>,
    /// Where the committer sleeps while its queue is empty.
    bell: Arc<Doorbell>,
}

impl Committer {
    /// Starts the committer thread.
    ///
    /// # Errors
    /// [`Error::Storage`] if the thread cannot be spawned.
    pub fn spawn(
        stored: Arc<Stored>,
        settings: Settings,
        stats: Arc<StatsCells>,
    ) -> Result<Committer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let bell = Arc::new(Doorbell::default());
        let worker = Worker {
            stored,
            settings,
            stats,
            poisoned: AtomicBool::new(false),
            noted_time: Cell::new(0),
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
            handle: Some(handle),
        })
    }

    /// A handle to submit operations.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
        }
    }

    /// Stops the thread after it answered everything queued before, and joins it.
    pub fn shutdown(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        self.bell.ring();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How far the store's time may move before a batch persists it (nanoseconds). The store's
/// clock never goes below the persisted time after a reopen; a clean close persists the
/// exact time, a crash may lose up to this much of it.
const NOTE_TIME_EVERY: u64 = 1_000_000_000;

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

impl Worker {
    fn run(self, rx: Receiver<Msg>) {
        let mut batch: Vec<Command> = Vec::with_capacity(MAX_BATCH);
        loop {
            let mut stop = false;
            match self.next(&rx) {
                Some(Msg::Command(command)) => batch.push(command),
                Some(Msg::Shutdown) | None => break,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Command(command)) => batch.push(command),
                    Ok(Msg::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let answered = batch.len();
            self.commit_batch(&mut batch);
            if stop {
                break;
            }
            let_callers_catch_up(&rx, answered);
        }
        self.flush_on_close();
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

    /// On a clean close: one last durable commit that records the latest time seen (so a
    /// reopened store's clock starts there) and, under `Durability::None`, makes everything
    /// committed before durable.
    fn flush_on_close(&self) {
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        let Ok(stamp) = self.stored.timeline.now() else {
            return;
        };
        // Guarded like every write: the engine can panic on a damaged page.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let Ok(txn) = storage::begin_write(&self.stored.db, Durability::Immediate) else {
                return;
            };
            let noted = WriteTables::open(&txn, &self.stored, stamp).and_then(|mut t| {
                let saved = self.save_corrections(&mut t)?;
                t.note_time(stamp.at)?;
                Ok(saved)
            });
            if let Ok(saved) = noted
                && txn.commit().is_ok()
            {
                self.corrections_saved(saved);
            }
        }));
    }

    fn commit_batch(&self, batch: &mut Vec<Command>) {
        if self.poisoned.load(Ordering::Acquire) {
            for command in batch.drain(..) {
                command.finish(Some(&Error::Poisoned));
            }
            return;
        }
        let failure = self.apply_all(batch).err().map(|failure| {
            // Whatever failed, it failed a write: its outcome is unknown to the callers.
            let failure = failure.outcome_unknown();
            tracing::error!(
                error = %failure,
                operations = batch.len(),
                "a write batch failed; its callers get an error (unknown outcome)"
            );
            failure
        });
        for command in batch.drain(..) {
            command.finish(failure.as_ref());
        }
    }

    /// [`Worker::apply_all_unguarded`], guarded: the storage engine can panic on a damaged
    /// page. A panic fails the batch with [`Error::Corrupt`] and poisons the store, as a failed
    /// commit does (the outcome is unknown).
    fn apply_all(&self, batch: &mut [Command]) -> Result<()> {
        catch_unwind(AssertUnwindSafe(|| self.apply_all_unguarded(batch))).unwrap_or_else(|_| {
            self.poisoned.store(true, Ordering::Release);
            Err(Error::corrupt(
                "the storage engine failed while writing (damaged file); the store refuses \
                 writes until it is reopened",
            ))
        })
    }

    /// Applies every command in one transaction and commits; each command keeps its own
    /// result. `Err` fails the whole batch.
    fn apply_all_unguarded(&self, batch: &mut [Command]) -> Result<()> {
        let txn = storage::begin_write(&self.stored.db, self.settings.durability)?;
        let stamp = match self.stored.timeline.now() {
            Ok(stamp) => stamp,
            // A clock reading the store cannot represent: nothing is written, every
            // command of the batch gets the error (the store is not poisoned).
            Err(e) => {
                for command in batch.iter_mut() {
                    command.answer_without_writing(&e);
                }
                return Ok(());
            }
        };
        let now = stamp.at;
        let mut saved = None;
        let changes = {
            let mut tables = WriteTables::open(&txn, &self.stored, stamp)?;
            // Before any record of a new clock epoch: the correction that began it.
            saved = self.save_corrections(&mut tables)?.or(saved);
            for command in batch.iter_mut() {
                self.apply(&mut tables, command, now)?;
            }
            if saved.is_some() || now >= self.noted_time.get().saturating_add(NOTE_TIME_EVERY) {
                tables.note_time(now)?;
            }
            tables.into_changes()
        };
        if let Err(e) = txn.commit() {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(
                error = %e,
                "commit failed (outcome unknown); the store is poisoned and refuses writes until it is reopened"
            );
            return Err(Error::write_failed("committing a write", e));
        }
        // Published only now: readers never see an entry that is not committed.
        self.stored.index.apply(&changes);
        // The commit went into the file the store opened: unless its path still names that
        // file, no one will open this write again.
        if let Some(file) = &self.stored.file
            && let Err(e) = file.check()
        {
            self.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        if saved.is_some() || now >= self.noted_time.get().saturating_add(NOTE_TIME_EVERY) {
            self.noted_time.set(now);
        }
        self.corrections_saved(saved);
        bump(&self.stats.commits, 1);
        bump(&self.stats.committed_ops, batch.len() as u64);
        Ok(())
    }

    /// Writes the clock corrections not persisted yet, and where the reaper's re-filing of
    /// the records they move back starts. Returns how many corrections are then persisted
    /// (`None` when there was nothing to write), for [`Worker::corrections_saved`] once the
    /// transaction committed.
    fn save_corrections(
        &self,
        tables: &mut WriteTables<'_>,
    ) -> Result<Option<(usize, Option<u64>)>> {
        let Some((corrections, saved)) = self.stored.timeline.unsaved() else {
            return Ok(None);
        };
        let from = {
            let pending = *self.stored.resweep_from.lock();
            match (pending, corrections.resweep_from(saved)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        tables.save_corrections(&corrections, from)?;
        // The reap operations of this same batch start re-filing at once (a failed commit
        // poisons the store, so this is never acted on without the commit).
        *self.stored.resweep_from.lock() = from;
        Ok(Some((corrections.len(), from)))
    }

    /// Notes, after the commit, what [`Worker::save_corrections`] persisted.
    fn corrections_saved(&self, saved: Option<(usize, Option<u64>)>) {
        if let Some((count, _)) = saved {
            self.stored.timeline.mark_saved(count);
        }
    }

    /// Applies one command, keeping its result in it. `Err` (a storage failure) fails the
    /// batch; the command's own refusals (a lost lease, say) are its result.
    fn apply(&self, tables: &mut WriteTables<'_>, command: &mut Command, now: u64) -> Result<()> {
        match command {
            Command::Claim(job) => run(job, |q| self.claim(tables, q, now)),
            Command::Lease(job) => run(job, |q| self.lease(tables, q, now)),
            Command::Reap(job) => run(job, |limit| self.reap(tables, limit, now)),
        }
    }

    fn claim(&self, tables: &mut WriteTables<'_>, q: ClaimRequest, now: u64) -> Result<Claimed> {
        let current = tables.get(&q.key)?;
        Ok(match machine::decide_begin(current, &q.fp, now) {
            BeginStep::Claim(current) => {
                let token = tables.next_token()?;
                let grant = machine::claim(current, &q.fp, token, now, self.settings.ttl, q.lease);
                tables.put(&q.key, &grant.record)?;
                Ok(grant)
            }
            BeginStep::Refuse(refusal) => Err(refusal),
        })
    }

    fn lease(
        &self,
        tables: &mut WriteTables<'_>,
        q: LeaseRequest,
        now: u64,
    ) -> Result<Option<Record>> {
        let current = tables.get(&q.key)?;
        match machine::apply_lease(current.as_ref(), q.token, q.action, now, self.settings.ttl)? {
            Transition::Put(record) => {
                tables.put(&q.key, &record)?;
                Ok(Some(record))
            }
            Transition::Delete => {
                tables.delete(&q.key)?;
                Ok(None)
            }
        }
    }

    fn reap(&self, tables: &mut WriteTables<'_>, limit: usize, now: u64) -> Result<Reaped> {
        // After a clock correction: re-file the expiry entries of records it moved back, a
        // bounded step per pass, until the index is done; the ones due now are then deleted
        // by this same pass.
        let pending = *self.stored.resweep_from.lock();
        let resweeping = match pending {
            Some(from) => {
                let next = tables.resweep(from, limit)?;
                *self.stored.resweep_from.lock() = next;
                next.is_some()
            }
            None => false,
        };
        let pass = tables.reap(now, limit)?;
        Ok(Reaped {
            deleted: pass.deleted,
            more: pass.more || resweeping,
        })
    }
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
    /// Answers the command with `error` without applying it.
    fn answer_without_writing(&mut self, error: &Error) {
        match self {
            Command::Claim(job) => job.result = Some(Err(error.clone())),
            Command::Lease(job) => job.result = Some(Err(error.clone())),
            Command::Reap(job) => job.result = Some(Err(error.clone())),
        }
    }
}
