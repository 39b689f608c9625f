//! The two waits between a caller and the committer, without spinning.
//!
//! A caller hands its operation to the committer and waits for the answer; the committer
//! waits for operations. crossbeam's blocking `recv` spins and yields the CPU for a while
//! before it parks the thread. Measured with `compare --callers 1 --handoff` (figures in
//! BENCHMARKS.md), work handed to a second thread ran measurably slower when both threads
//! waited in crossbeam's `recv` than when they parked at once: the spinning, on the CPU the
//! other thread is not using, slows the thread doing the work. So both waits here park at
//! once:
//!
//! * [`Doorbell`]: the committer sleeps on it when its queue (still a crossbeam channel) is
//!   empty; a caller rings it after queueing. A ring costs a fence and a load unless the
//!   committer sleeps.
//! * [`oneshot`]: the answer to one operation. The caller sleeps on a condition variable
//!   until the committer sends, or drops the sender (the committer stopped).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::Thread;

use parking_lot::{Condvar, Mutex};

/// Wakes the committer when a caller queued work while it slept.
#[derive(Default)]
pub(crate) struct Doorbell {
    sleeping: AtomicBool,
    /// The sleeping thread; set once, before any caller can ring.
    sleeper: OnceLock<Thread>,
}

impl Doorbell {
    /// Names the thread that sleeps on this doorbell. Call before handing the doorbell to
    /// any caller.
    pub fn set_sleeper(&self, thread: Thread) {
        let _ = self.sleeper.set(thread);
    }

    /// Wakes the sleeper if it sleeps. Call after queueing work.
    pub fn ring(&self) {
        // Pairs with the fence in `sleep_unless`: either the sleeper sees the work queued
        // before this fence, or this load sees that it announced sleep.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed)
            && let Some(thread) = self.sleeper.get()
        {
            thread.unpark();
        }
    }

    /// Parks the calling thread (the sleeper) unless `ready()` holds after it announced that
    /// it sleeps. May return early (spurious wake-ups); callers check again.
    pub fn sleep_unless(&self, ready: impl Fn() -> bool) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !ready() {
            std::thread::park();
        }
        self.sleeping.store(false, Ordering::Relaxed);
    }
}

/// What a [`Receiver`] can find in its slot.
enum State<T> {
    Waiting,
    Sent(T),
    /// The sender was dropped without sending.
    Dropped,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

/// The sending half of a [`oneshot`]. Dropping it unsent wakes the receiver with `None`.
pub(crate) struct Sender<T> {
    slot: Option<Arc<Slot<T>>>,
}

/// The receiving half of a [`oneshot`].
pub(crate) struct Receiver<T> {
    slot: Arc<Slot<T>>,
}

/// A channel for exactly one value, whose receiver parks without spinning.
pub(crate) fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Waiting),
        changed: Condvar::new(),
    });
    (
        Sender {
            slot: Some(Arc::clone(&slot)),
        },
        Receiver { slot },
    )
}

impl<T> Sender<T> {
    /// Hands `value` to the receiver and wakes it.
    pub fn send(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            Self::fill(&slot, State::Sent(value));
        }
    }

    fn fill(slot: &Slot<T>, state: State<T>) {
        *slot.state.lock() = state;
        slot.changed.notify_one();
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            Self::fill(&slot, State::Dropped);
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("oneshot::Sender")
    }
}

impl<T> Receiver<T> {
    /// Waits for the value; `None` if the sender was dropped without sending.
    pub fn recv(self) -> Option<T> {
        let mut state = self.slot.state.lock();
        loop {
            match std::mem::replace(&mut *state, State::Waiting) {
                State::Sent(value) => return Some(value),
                State::Dropped => return None,
                State::Waiting => self.slot.changed.wait(&mut state),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn a_value_sent_before_or_after_the_wait_arrives() {
        let (tx, rx) = oneshot();
        tx.send(7);
        assert_eq!(rx.recv(), Some(7));

        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send("late");
        });
        assert_eq!(rx.recv(), Some("late"));
        t.join().unwrap();
    }

    #[test]
    fn a_dropped_sender_wakes_the_receiver_with_none() {
        let (tx, rx) = oneshot::<u8>();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        assert_eq!(rx.recv(), None);
        t.join().unwrap();
    }

    /// Many rounds of queue-then-ring against a sleeper that checks the queue: a lost
    /// wake-up would hang this test.
    #[test]
    fn no_ring_is_lost() {
        const ROUNDS: usize = 20_000;
        let bell = Arc::new(Doorbell::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(AtomicUsize::new(0));
        let sleeper = {
            let (bell, queued, taken) = (bell.clone(), queued.clone(), taken.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < ROUNDS {
                    let now = queued.load(Ordering::Acquire);
                    if now > seen {
                        seen = now;
                        taken.store(seen, Ordering::Release);
                        continue;
                    }
                    bell.sleep_unless(|| queued.load(Ordering::Acquire) > seen);
                }
            })
        };
        bell.set_sleeper(sleeper.thread().clone());
        for i in 1..=ROUNDS {
            // Every other round, queue only once the sleeper announced sleep (the ring must
            // wake it); the others race with it going to sleep.
            if i % 2 == 0 {
                let start = std::time::Instant::now();
                while !bell.sleeping.load(Ordering::Acquire) {
                    assert!(start.elapsed() < Duration::from_secs(10), "never slept");
                    std::thread::yield_now();
                }
            }
            queued.store(i, Ordering::Release);
            bell.ring();
            // Wait for the sleeper to take it, so that it goes back to sleep often.
            let start = std::time::Instant::now();
            while taken.load(Ordering::Acquire) < i {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "round {i}: the sleeper missed a ring"
                );
                std::thread::yield_now();
            }
        }
        sleeper.join().unwrap();
    }
}
