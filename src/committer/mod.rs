//! Group commit: every state change goes through here, one write transaction per batch.
//!
//! Every state change (a claiming `begin`, the lease operations, release on drop, reaper
//! batches) is queued here as a [`Command`]. Whoever commits takes what is queued (at most
//! [`MAX_BATCH`] operations), applies it in arrival order inside one write transaction
//! (each sees the state the ones before it left; [`apply()`]), commits once (one fsync for the
//! whole batch) and then answers every caller.
//!
//! Who commits is decided by leader and follower ([`group`]): a caller that finds the
//! engine's writer free takes it and commits what is queued, its own command included, on
//! its own thread. A lone caller thus pays no hand-off to another thread. A caller that
//! finds the writer busy is a follower: it rings for a committer thread and sleeps until
//! its answer arrives. Under load, the committer thread holds the writer from batch to
//! batch and yields the CPU a bounded number of times between them while the callers it
//! just answered queue their next operation, so batches stay full. There is no timer, and
//! no wait spins (see [`crate::handoff`] for why).
//!
//! A commit that fails answers every caller of the batch with [`Error::Storage`] (an unknown
//! outcome); the engine decides what follows (redb poisons the store: later writes get
//! [`Error::Poisoned`] until it is reopened).
//!
//! The committer is the same for every engine: [`apply()`] runs each command's state
//! transition ([`crate::machine`]) on the engine's [`Tables`], and an engine provides a
//! [`BatchWriter`]: one transaction per batch. An engine whose database orders concurrent
//! transactions itself (PostgreSQL, through its key locks) may provide several writers
//! ([`BatchWriter::siblings`]), each with a batch in flight; redb has one.

mod apply;
mod group;

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::handoff;
use crate::machine::{Grant, Hold, Refusal};
use crate::outcome::Completed;

pub(crate) use apply::{Tables, apply};
use group::Lead;
pub(crate) use group::{BatchWriter, Committer};
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
    pub(super) fn new(request: Q, resp: Responder<A>) -> Job<Q, A> {
        Job {
            request: Some(request),
            result: None,
            resp,
        }
    }

    /// Sends the answer: the batch's failure if it failed, else this command's own result.
    pub(super) fn finish(self, failure: Option<&Error>) {
        self.resp.send(match (failure, self.result) {
            (Some(failure), _) => Err(failure.clone()),
            (None, Some(result)) => result,
            // Not applied although its batch committed: only when the committer stopped.
            (None, None) => Err(Error::Closed),
        });
    }
}

impl Command {
    /// Answers the command's caller: the batch's failure if it failed, else its result.
    pub(super) fn finish(self, failure: Option<&Error>) {
        match self {
            Command::Claim(job) => job.finish(failure),
            Command::Complete(job) => job.finish(failure),
            Command::Hold(job) => job.finish(failure),
            Command::Abandon(job) => job.finish(failure),
            Command::Reap(job) => job.finish(failure),
        }
    }
}

/// A cheap handle that submits operations to the committer (the reaper holds one).
#[derive(Clone)]
pub(crate) struct Submitter {
    tx: Sender<Command>,
    group: Arc<dyn Lead>,
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

    /// Queues the command made with the responder, commits the queue on this thread when
    /// the engine's writer is free, and waits for the command's answer.
    ///
    /// # Errors
    /// The command's own error, a batch failure, or [`Error::Closed`] once the committer
    /// stopped.
    fn send<A>(&self, command: impl FnOnce(Responder<A>) -> Command) -> Result<A> {
        let (resp, answer) = handoff::oneshot();
        self.tx.send(command(resp)).map_err(|_| Error::Closed)?;
        // Commit it here if the writer is free; else a committer thread will.
        self.group.lead();
        // No answer: the committer stopped before it took the command.
        answer.recv().unwrap_or(Err(Error::Closed))
    }
}
