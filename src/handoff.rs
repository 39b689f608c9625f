//! The two waits between callers and the committer threads, without spinning.
//!
//! A caller that cannot commit its operation itself hands it to a committer thread and
//! waits for the answer; the committer threads wait for operations. crossbeam's blocking
//! `recv` spins and yields the CPU for a while before it parks the thread. Measured with
//! `compare --callers 1 --handoff` (figures in BENCHMARKS.md), work handed to a second thread
//! ran measurably slower when both threads waited in crossbeam's `recv` than when they parked
//! at once: the spinning, on the CPU the other thread is not using, slows the thread doing
//! the work. So both waits here park at once:
//!
//! * [`Bell`]: committer threads sleep on it while nothing is queued for them; a caller
//!   rings it after queueing. A ring costs a fence and a load unless a thread sleeps.
//! * [`oneshot`]: the answer to one operation. The caller sleeps on a condition variable
//!   until the answer is sent, or the sender is dropped (the committer stopped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use parking_lot::{Condvar, Mutex};

/// Wakes a sleeping committer thread when a caller queued work for it.
#[derive(Default)]
pub(crate) struct Bell {
    /// How many threads announced that they sleep (or are about to).
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    woken: Condvar,
}

impl Bell {
    /// Wakes one sleeper, if any sleeps. Call after queueing work.
    pub fn ring(&self) {
        if self.anyone_sleeps() {
            let _held = self.lock.lock();
            self.woken.notify_one();
        }
    }

    /// Wakes every sleeper (to stop, say).
    pub fn ring_all(&self) {
        if self.anyone_sleeps() {
            let _held = self.lock.lock();
            self.woken.notify_all();
        }
    }

    fn anyone_sleeps(&self) -> bool {
        // Pairs with the fence in `sleep_unless`: either the sleeper sees the work queued
        // before this fence, or this load sees that it announced sleep. A sleeper checks
        // and waits holding the lock, so a ringer that saw it takes the lock only once it
        // waits (or has seen the work).
        fence(Ordering::SeqCst);
        self.sleepers.load(Ordering::Relaxed) > 0
    }

    /// Sleeps unless `ready()` holds after the calling thread announced that it sleeps. May
    /// return early (spurious wake-ups); callers check again.
    pub fn sleep_unless(&self, ready: impl Fn() -> bool) {
        let mut held = self.lock.lock();
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !ready() {
            self.woken.wait(&mut held);
        }
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
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
        let bell = Arc::new(Bell::default());
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
        for i in 1..=ROUNDS {
            // Every other round, queue only once the sleeper announced sleep (the ring must
            // wake it); the others race with it going to sleep.
            if i % 2 == 0 {
                let start = std::time::Instant::now();
                while bell.sleepers.load(Ordering::Acquire) == 0 {
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
