//! Leader and follower: who commits the queue, on which thread.
//!
//! The engine's writers (one for redb; several for an engine that orders concurrent
//! transactions itself) are kept in a free list. A caller queues its command and then tries
//! to take a free writer: if it gets one it is the leader and commits one batch of what is
//! queued (its own command is in it unless another leader took it first); if not, it is a
//! follower, rings the bell for a committer thread and sleeps on its answer. A leader that
//! gives its writer back and finds the queue not empty rings the bell too, so a command
//! queued while every writer was taken is always committed by someone.
//!
//! Committer threads (one per writer) sleep on the bell, take a writer when woken and keep
//! committing batches until the queue is empty; with one writer they yield the CPU a bounded
//! number of times between batches so that the callers just answered can queue their next
//! operation (fuller batches, fewer fsyncs).
//!
//! Why no command is left behind: a caller queues, then (after a fence) looks for a writer;
//! a writer's holder gives it back, then (after a fence) looks at the queue. Either the
//! caller finds the writer free, or the holder finds the command and rings; the bell's own
//! protocol ([`crate::handoff::Bell`]) makes sure a ring reaches a thread about to sleep.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, TryRecvError};
use parking_lot::{Condvar, Mutex};

use super::{Command, MAX_BATCH, Submitter};
use crate::error::{Error, Result};
use crate::handoff::Bell;
use crate::stats::{StatsCells, bump};

/// An engine's side of the committer: applies a batch in one transaction.
pub(crate) trait BatchWriter: Send + 'static {
    /// Applies every command of `batch` (with [`super::apply()`]) in one transaction and commits it;
    /// each command keeps its own result. `Ok(false)`: nothing was written, every command
    /// was answered without a write. `Err` fails the whole batch, and every caller gets it:
    /// an [`Error::Storage`] with `outcome_unknown` set when the engine may have committed
    /// the batch (a failed commit, a connection lost after it was sent), without it when
    /// nothing was written.
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

    /// More writers beside this one, each with a batch of its own in flight: for an engine
    /// that orders concurrent batches itself (PostgreSQL's key locks, taken in one order,
    /// do), so that a batch can be sent while others wait for their commits. Empty, the
    /// default: one writer, so batches are committed one after the other.
    fn siblings(&self) -> Vec<Self>
    where
        Self: Sized,
    {
        Vec::new()
    }

    /// Whether a caller's thread may write a batch itself. A thread that may not hands its
    /// command to a committer thread and waits for the answer there. Always, the default.
    fn may_write_here() -> bool
    where
        Self: Sized,
    {
        true
    }
}

/// Commits the queue on the calling thread when a writer is free (a submitter's side of the
/// group, without the writer's type).
pub(super) trait Lead: Send + Sync {
    /// Called after queueing a command: leads one batch if a writer is free, else makes
    /// sure a committer thread will take the command.
    fn lead(&self);
}

/// A writer and the batch buffer that goes with it.
struct Slot<W> {
    writer: W,
    batch: Vec<Command>,
}

/// The writers not in use.
struct Writers<W> {
    free: Vec<Slot<W>>,
    /// Set when the committer stopped: the writers were closed and are gone.
    gone: bool,
}

/// What the callers and the committer threads share.
struct Group<W> {
    queue: Receiver<Command>,
    writers: Mutex<Writers<W>>,
    /// Notified when a writer is given back.
    freed: Condvar,
    /// Where committer threads sleep while nothing is queued for them.
    bell: Bell,
    /// How many writers there are.
    count: usize,
    /// Set when the committer stops: its threads end once the queue is empty.
    stopping: AtomicBool,
    stats: Arc<StatsCells>,
}

/// The committer: its threads, and the group the submitters share.
pub(crate) struct Committer {
    tx: crossbeam_channel::Sender<Command>,
    group: Arc<dyn Stop>,
    handles: Vec<JoinHandle<()>>,
}

/// Stops a group (the committer's side, without the writer's type).
trait Stop: Lead {
    /// After the threads were joined: waits for every writer, closes them and answers
    /// whatever is still queued with [`Error::Closed`].
    fn close(&self);
    /// Tells the threads to stop once the queue is empty, and wakes them.
    fn stop(&self);
}

impl Committer {
    /// Starts the committer: one thread per writer.
    ///
    /// # Errors
    /// [`Error::Storage`] if a thread cannot be spawned.
    pub fn spawn<W: BatchWriter>(writer: W, stats: Arc<StatsCells>) -> Result<Committer> {
        let (tx, queue) = crossbeam_channel::unbounded();
        let siblings = writer.siblings();
        // With one writer, the committer thread lets callers catch up between batches;
        // with several, another writer takes what arrives meanwhile.
        let catch_up = siblings.is_empty();
        let free: Vec<Slot<W>> = std::iter::once(writer)
            .chain(siblings)
            .map(|writer| Slot {
                writer,
                batch: Vec::with_capacity(MAX_BATCH),
            })
            .collect();
        let count = free.len();
        let group = Arc::new(Group {
            queue,
            writers: Mutex::new(Writers { free, gone: false }),
            freed: Condvar::new(),
            bell: Bell::default(),
            count,
            stopping: AtomicBool::new(false),
            stats,
        });
        let mut committer = Committer {
            tx,
            group: group.clone(),
            handles: Vec::with_capacity(count),
        };
        for i in 0..count {
            let group = Arc::clone(&group);
            let name = if count == 1 {
                "idemstore-committer".to_owned()
            } else {
                format!("idemstore-committer-{i}")
            };
            // If a spawn fails, dropping `committer` stops the threads already started.
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || group.run_guarded(catch_up))
                .map_err(|e| Error::storage("starting a committer thread", e))?;
            committer.handles.push(handle);
        }
        Ok(committer)
    }

    /// A handle to submit operations.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            tx: self.tx.clone(),
            group: Arc::clone(&self.group) as Arc<dyn Lead>,
        }
    }

    /// Stops the threads after everything queued before was answered, joins them and closes
    /// the writers. Later commands are answered with [`Error::Closed`].
    pub fn shutdown(&mut self) {
        self.group.stop();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        self.group.close();
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
/// Not a timed wait: with no other runnable thread a yield returns at once.
fn let_callers_catch_up(queue: &Receiver<Command>, answered: usize) {
    let mut queued = queue.len();
    for _ in 0..MAX_YIELDS {
        if queued >= answered {
            return;
        }
        std::thread::yield_now();
        let now = queue.len();
        if now == queued {
            return;
        }
        queued = now;
    }
}

/// Adds what is queued to `batch`, up to [`MAX_BATCH`].
fn take_queued(queue: &Receiver<Command>, batch: &mut Vec<Command>) {
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(command) => batch.push(command),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
        }
    }
}

/// A writer taken from the free list; given back when dropped (also when a batch panics).
struct Taken<'a, W: BatchWriter> {
    group: &'a Group<W>,
    slot: Option<Slot<W>>,
}

impl<W: BatchWriter> Drop for Taken<'_, W> {
    fn drop(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            if std::thread::panicking() && !slot.batch.is_empty() {
                // The batch panicked midway (a bug): its callers learn that its outcome is
                // unknown, and it is never applied again by the next holder.
                let failure = Error::storage(
                    "a write batch panicked",
                    std::io::Error::other("panic while writing a batch"),
                )
                .outcome_unknown();
                for command in slot.batch.drain(..) {
                    command.finish(Some(&failure));
                }
            }
            self.group.give_back(slot);
        }
    }
}

impl<W: BatchWriter> Taken<'_, W> {
    fn slot(&mut self) -> &mut Slot<W> {
        self.slot
            .as_mut()
            .expect("a taken writer is given back only when dropped")
    }
}

/// What a caller found in the free list.
enum Found<'a, W: BatchWriter> {
    Writer(Taken<'a, W>),
    /// Every writer is in use.
    Busy,
    /// The committer stopped.
    Gone,
}

impl<W: BatchWriter> Group<W> {
    fn try_take(&self) -> Found<'_, W> {
        let mut writers = self.writers.lock();
        if writers.gone {
            return Found::Gone;
        }
        match writers.free.pop() {
            Some(slot) => Found::Writer(Taken {
                group: self,
                slot: Some(slot),
            }),
            None => Found::Busy,
        }
    }

    /// Waits for a free writer; `None` once the committer stopped.
    fn take(&self) -> Option<Taken<'_, W>> {
        let mut writers = self.writers.lock();
        loop {
            if writers.gone {
                return None;
            }
            if let Some(slot) = writers.free.pop() {
                return Some(Taken {
                    group: self,
                    slot: Some(slot),
                });
            }
            self.freed.wait(&mut writers);
        }
    }

    fn give_back(&self, slot: Slot<W>) {
        self.writers.lock().free.push(slot);
        self.freed.notify_all();
        // Pairs with the fence in `lead`: a command queued while this writer was taken is
        // seen here, or its caller found the writer free.
        fence(Ordering::SeqCst);
        if !self.queue.is_empty() {
            self.bell.ring();
        }
    }

    /// A committer thread's life: [`Group::run`], started again after a panic (a bug in a
    /// writer or in what it calls), whose batch [`Taken`]'s drop has answered and whose
    /// writer it gave back. A thread that ended would leave the callers queued while another
    /// caller leads with no one to hand the queue to.
    fn run_guarded(&self, catch_up: bool) {
        while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(catch_up))).is_err()
        {
            tracing::error!(
                target: "idemstore::committer",
                "a committer thread panicked; its batch was answered with an unknown outcome, \
                 and the thread goes on"
            );
            // Never a hot loop, should the panic come again at once.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A committer thread: sleeps until something is queued, then commits batches with a
    /// writer until the queue is empty.
    fn run(&self, catch_up: bool) {
        loop {
            self.bell
                .sleep_unless(|| !self.queue.is_empty() || self.stopping.load(Ordering::Acquire));
            if self.queue.is_empty() {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            let Some(mut taken) = self.take() else {
                return;
            };
            loop {
                let slot = taken.slot();
                take_queued(&self.queue, &mut slot.batch);
                if slot.batch.is_empty() {
                    break;
                }
                let answered = slot.batch.len();
                self.commit_batch(slot);
                if catch_up {
                    let_callers_catch_up(&self.queue, answered);
                }
            }
        }
    }

    fn commit_batch(&self, slot: &mut Slot<W>) {
        let Slot { writer, batch } = slot;
        if let Some(refusal) = writer.refusal() {
            for command in batch.drain(..) {
                command.finish(Some(&refusal));
            }
            return;
        }
        let failure = match writer.write(batch) {
            Ok(committed) => {
                if committed {
                    bump(&self.stats.commits, 1);
                    bump(&self.stats.committed_ops, batch.len() as u64);
                }
                None
            }
            Err(failure) => {
                // The writer says whether the engine may have committed (`outcome_unknown`):
                // a failure before anything was sent or committed wrote nothing.
                // The committer's target, whichever module of it logs.
                tracing::error!(
                    target: "idemstore::committer",
                    error = %failure,
                    operations = batch.len(),
                    outcome_unknown = matches!(
                        failure,
                        Error::Storage {
                            outcome_unknown: true,
                            ..
                        }
                    ),
                    "a write batch failed; its callers get the error"
                );
                Some(failure)
            }
        };
        for command in batch.drain(..) {
            command.finish(failure.as_ref());
        }
    }

    /// Answers everything queued with [`Error::Closed`], unapplied.
    fn refuse_queued(&self) {
        while let Ok(command) = self.queue.try_recv() {
            command.finish(Some(&Error::Closed));
        }
    }
}

impl<W: BatchWriter> Lead for Group<W> {
    fn lead(&self) {
        if !W::may_write_here() {
            // A committer thread takes it (or the close, which refuses what is queued once
            // the committer is gone: a command queued before this check is seen by one of
            // the two).
            if self.writers.lock().gone {
                self.refuse_queued();
            } else {
                self.bell.ring();
            }
            return;
        }
        // Pairs with the fence in `give_back`.
        fence(Ordering::SeqCst);
        match self.try_take() {
            Found::Writer(mut taken) => {
                let slot = taken.slot();
                take_queued(&self.queue, &mut slot.batch);
                if !slot.batch.is_empty() {
                    self.commit_batch(slot);
                }
            }
            Found::Busy => self.bell.ring(),
            Found::Gone => self.refuse_queued(),
        }
    }
}

impl<W: BatchWriter> Stop for Group<W> {
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.bell.ring_all();
    }

    fn close(&self) {
        let slots = {
            let mut writers = self.writers.lock();
            if writers.gone {
                return;
            }
            // A caller may still be leading a batch with one.
            while writers.free.len() < self.count {
                self.freed.wait(&mut writers);
            }
            // What was queued after the threads ended and no caller took: commit it.
            if let Some(slot) = writers.free.last_mut() {
                loop {
                    take_queued(&self.queue, &mut slot.batch);
                    if slot.batch.is_empty() {
                        break;
                    }
                    self.commit_batch(slot);
                }
            }
            writers.gone = true;
            std::mem::take(&mut writers.free)
        };
        for slot in &slots {
            slot.writer.close();
        }
        // Queued since: the committer is gone.
        self.refuse_queued();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::committer::{Reaped, Tables, apply};
    use crate::config::{Durability, Settings};
    use crate::fingerprint::Fingerprint;
    use crate::record::Record;

    const SETTINGS: Settings = Settings {
        ttl: 60_000_000_000,
        lease: 1_000_000_000,
        max_response_bytes: 1 << 20,
        durability: Durability::Immediate,
    };

    /// Records in a map, shared by the writers; each write notes its thread and batch size.
    #[derive(Default)]
    struct Memory {
        records: Mutex<HashMap<Vec<u8>, Record>>,
        token: AtomicUsize,
        batches: Mutex<Vec<(ThreadId, usize)>>,
        closed: AtomicUsize,
        /// When set, every write waits at this barrier first (twice: arrived, released).
        gate: Mutex<Option<Arc<Barrier>>>,
        /// When set, the next write fails with this error, writing nothing.
        fail: Mutex<Option<Error>>,
    }

    struct MapTables<'a>(&'a Memory, &'a mut HashMap<Vec<u8>, Record>);

    impl Tables for MapTables<'_> {
        fn get(&mut self, key: &[u8]) -> Result<Option<Record>> {
            Ok(self.1.get(key).cloned())
        }
        fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
            self.1.insert(key.to_vec(), record.clone());
            Ok(())
        }
        fn delete(&mut self, key: &[u8]) -> Result<()> {
            self.1.remove(key);
            Ok(())
        }
        fn next_token(&mut self) -> Result<u64> {
            Ok(self.0.token.fetch_add(1, Ordering::Relaxed) as u64 + 1)
        }
        fn reap(&mut self, _now: u64, _limit: usize) -> Result<Reaped> {
            Ok(Reaped {
                deleted: 0,
                more: false,
            })
        }
    }

    struct MemoryWriter(Arc<Memory>, usize);

    impl BatchWriter for MemoryWriter {
        fn write(&self, batch: &mut [Command]) -> Result<bool> {
            let gate = self.0.gate.lock().clone();
            if let Some(gate) = gate {
                gate.wait();
                gate.wait();
            }
            if let Some(failure) = self.0.fail.lock().take() {
                return Err(failure);
            }
            let mut records = self.0.records.lock();
            let mut tables = MapTables(&self.0, &mut records);
            for command in batch.iter_mut() {
                apply(&mut tables, command, 1, &SETTINGS)?;
            }
            self.0
                .batches
                .lock()
                .push((std::thread::current().id(), batch.len()));
            Ok(true)
        }

        fn close(&self) {
            self.0.closed.fetch_add(1, Ordering::Relaxed);
        }

        fn siblings(&self) -> Vec<MemoryWriter> {
            (1..self.1)
                .map(|_| MemoryWriter(Arc::clone(&self.0), 1))
                .collect()
        }

        fn may_write_here() -> bool {
            !NO_WRITES_HERE.with(std::cell::Cell::get)
        }
    }

    thread_local! {
        /// Set on a thread where [`MemoryWriter`] may not write.
        static NO_WRITES_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn a_caller_where_the_writer_may_not_write_is_served_by_the_committer_thread() {
        let (mut committer, memory) = committer(2);
        let submitter = committer.submitter();
        NO_WRITES_HERE.with(|n| n.set(true));
        for i in 0..20 {
            claim(&submitter, &format!("k{i}")).unwrap();
        }
        let me = std::thread::current().id();
        let batches = memory.batches.lock().clone();
        assert_eq!(batches.iter().map(|b| b.1).sum::<usize>(), 20);
        assert!(
            batches.iter().all(|&(thread, _)| thread != me),
            "written on the caller's thread: {batches:?}"
        );
        committer.shutdown();
        NO_WRITES_HERE.with(|n| n.set(false));
        // Refused once the committer is gone, never left waiting.
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            NO_WRITES_HERE.with(|n| n.set(true));
            let _ = tx.send(claim(&submitter, "after"));
        });
        let after = rx.recv_timeout(Duration::from_secs(10));
        assert!(matches!(after, Ok(Err(Error::Closed))), "{after:?}");
    }

    fn committer(writers: usize) -> (Committer, Arc<Memory>) {
        let memory = Arc::new(Memory::default());
        let writer = MemoryWriter(Arc::clone(&memory), writers);
        let committer = Committer::spawn(writer, Arc::default()).unwrap();
        (committer, memory)
    }

    fn claim(submitter: &Submitter, key: &str) -> Result<u64> {
        let claimed = submitter.claim(key.as_bytes().to_vec(), Fingerprint::of(key), 1_000)?;
        Ok(claimed.expect("a fresh key is granted").token)
    }

    #[test]
    fn a_lone_caller_commits_on_its_own_thread() {
        let (committer, memory) = committer(1);
        let submitter = committer.submitter();
        for i in 0..50 {
            claim(&submitter, &format!("k{i}")).unwrap();
        }
        let me = std::thread::current().id();
        let batches = memory.batches.lock().clone();
        assert_eq!(batches.len(), 50);
        assert!(
            batches
                .iter()
                .all(|&(thread, len)| thread == me && len == 1),
            "every batch of a lone caller is its own, written on its thread: {batches:?}"
        );
    }

    #[test]
    fn followers_are_committed_together_by_the_committer_thread() {
        let (committer, memory) = committer(1);
        let gate = Arc::new(Barrier::new(2));
        *memory.gate.lock() = Some(Arc::clone(&gate));
        let submitter = committer.submitter();
        std::thread::scope(|s| {
            // The leader: its write waits at the gate, holding the only writer.
            let leader = s.spawn(|| claim(&submitter, "leader").unwrap());
            gate.wait();
            let followers: Vec<_> = (0..8)
                .map(|i| {
                    let submitter = submitter.clone();
                    s.spawn(move || claim(&submitter, &format!("f{i}")).unwrap())
                })
                .collect();
            let start = Instant::now();
            while committer.tx.len() < 8 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "followers never queued"
                );
                std::thread::yield_now();
            }
            *memory.gate.lock() = None;
            gate.wait();
            leader.join().unwrap();
            for f in followers {
                f.join().unwrap();
            }
        });
        let batches = memory.batches.lock().clone();
        assert_eq!(batches.iter().map(|b| b.1).sum::<usize>(), 9, "{batches:?}");
        assert_eq!(batches[0].1, 1, "the leader's batch held its own claim");
        assert_eq!(
            batches[1].1, 8,
            "the followers were committed in one batch: {batches:?}"
        );
        assert_eq!(memory.records.lock().len(), 9);
    }

    /// Many callers on one and on several writers: every command is answered, in bounded
    /// time (a lost wake-up would hang a caller), and every claim was written.
    #[test]
    fn no_command_is_left_behind() {
        for writers in [1, 3] {
            let (committer, memory) = committer(writers);
            let done = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for t in 0..8 {
                    let (submitter, done) = (committer.submitter(), &done);
                    s.spawn(move || {
                        for i in 0..500 {
                            claim(&submitter, &format!("{t}-{i}")).unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let start = Instant::now();
                while done.load(Ordering::Relaxed) < 4000 {
                    assert!(start.elapsed() < Duration::from_secs(60), "a caller hangs");
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            assert_eq!(memory.records.lock().len(), 4000);
            let ops: usize = memory.batches.lock().iter().map(|b| b.1).sum();
            assert_eq!(ops, 4000);
        }
    }

    /// A writer that panics on its first batch.
    struct PanicsOnce(Arc<Memory>, AtomicBool);

    impl BatchWriter for PanicsOnce {
        fn write(&self, batch: &mut [Command]) -> Result<bool> {
            if !self.1.swap(true, Ordering::Relaxed) {
                panic!("a bug in a writer (test)");
            }
            MemoryWriter(Arc::clone(&self.0), 1).write(batch)
        }
    }

    /// The writer's error reaches the callers as it is: a failure known to have written
    /// nothing (the server unreachable, say) is not reported as an unknown outcome.
    #[test]
    fn a_failed_batch_keeps_what_its_writer_knows_of_its_outcome() {
        let (committer, memory) = committer(1);
        let submitter = committer.submitter();
        let io = || std::io::Error::other("test");
        for (failure, unknown) in [
            (Error::storage("connecting", io()), false),
            (Error::write_failed("committing", io()), true),
        ] {
            *memory.fail.lock() = Some(failure);
            match claim(&submitter, "k") {
                Err(Error::Storage {
                    outcome_unknown, ..
                }) => assert_eq!(outcome_unknown, unknown),
                other => panic!("{other:?}"),
            }
        }
        assert!(memory.records.lock().is_empty());
    }

    #[test]
    fn a_batch_that_panicked_is_answered_unknown_and_never_applied_again() {
        let memory = Arc::new(Memory::default());
        let committer = Committer::spawn(
            PanicsOnce(Arc::clone(&memory), AtomicBool::new(false)),
            Arc::default(),
        )
        .unwrap();
        let submitter = committer.submitter();
        let panicked =
            std::thread::scope(|s| s.spawn(|| claim(&submitter, "first")).join().is_err());
        assert!(panicked, "the leader's thread saw its writer panic");
        // The writer came back: the next caller leads with it; the first claim stays unapplied.
        claim(&submitter, "second").unwrap();
        let records = memory.records.lock();
        assert!(
            records.contains_key(b"second".as_slice())
                && !records.contains_key(b"first".as_slice())
        );
    }

    #[test]
    fn shutdown_closes_every_writer_once_and_later_commands_are_refused() {
        let (mut committer, memory) = committer(3);
        let submitter = committer.submitter();
        claim(&submitter, "before").unwrap();
        committer.shutdown();
        assert_eq!(memory.closed.load(Ordering::Relaxed), 3);
        assert!(matches!(claim(&submitter, "after"), Err(Error::Closed)));
        drop(committer);
        assert_eq!(memory.closed.load(Ordering::Relaxed), 3, "closed once");
        assert_eq!(memory.records.lock().len(), 1);
    }

    /// A writer that panics on a batch holding the claim of `boom`.
    struct PanicsOnBoom(Arc<Memory>);

    impl BatchWriter for PanicsOnBoom {
        fn write(&self, batch: &mut [Command]) -> Result<bool> {
            if batch.iter().any(|c| c.key() == Some(b"boom".as_slice())) {
                panic!("a bug in a writer, on the committer thread (audit test)");
            }
            MemoryWriter(Arc::clone(&self.0), 1).write(batch)
        }
    }

    /// A batch that panics on the committer thread does not end that thread: a follower (a
    /// caller that found the writer busy) queued afterwards is still answered (it waited for
    /// ever when the thread had died, the bell it and the leader rang having no sleeper).
    #[test]
    fn a_follower_is_answered_after_the_committer_thread_panicked() {
        let memory = Arc::new(Memory::default());
        let committer =
            Committer::spawn(PanicsOnBoom(Arc::clone(&memory)), Arc::default()).unwrap();
        let submitter = committer.submitter();
        // Holds the writer with a gated leader, queues `key` as a follower, releases the
        // leader; returns the follower's answer channel.
        let round = |leader_key: &'static str, key: &'static str| {
            let gate = Arc::new(Barrier::new(2));
            *memory.gate.lock() = Some(Arc::clone(&gate));
            let s1 = submitter.clone();
            let leader = std::thread::spawn(move || claim(&s1, leader_key));
            gate.wait();
            let (tx, rx) = std::sync::mpsc::channel();
            let s2 = submitter.clone();
            std::thread::spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim(&s2, key)));
                let _ = tx.send(r.map_err(|_| ()));
            });
            let start = Instant::now();
            while committer.tx.is_empty() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "follower never queued"
                );
                std::thread::yield_now();
            }
            *memory.gate.lock() = None;
            gate.wait();
            leader.join().unwrap().unwrap();
            rx
        };
        // 1: the committer thread takes `boom` and panics (the follower gets an error).
        let rx = round("l1", "boom");
        let first = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("boom answered");
        assert!(matches!(first, Ok(Err(Error::Storage { .. }))), "{first:?}");
        // 2: an ordinary follower.
        let rx = round("l2", "f");
        let second = rx.recv_timeout(Duration::from_secs(5));
        if second.is_err() {
            // Unstick it so the test ends: a new leader commits what is queued.
            claim(&submitter, "unstick").unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(5));
            panic!(
                "a follower waited 5 s unanswered: the committer thread died in the earlier panic"
            );
        }
    }
}
