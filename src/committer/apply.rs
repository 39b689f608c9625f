//! What one command does to an engine's tables: its state transition ([`crate::machine`])
//! applied inside the batch's transaction. The same for every engine.

use super::{ClaimRequest, Claimed, Command, Job, Reaped};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::machine::{self, BeginStep};
use crate::record::Record;

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
