//! Waiting for a running duplicate in this process instead of answering 409.
//!
//! With [`wait_in_flight`](super::IdempotencyLayer::wait_in_flight), the first request of a
//! key in this layer becomes its *leader*: it asks the store and, if it runs the handler,
//! holds the key until the response is stored. A request with the same key and fingerprint
//! that arrives meanwhile *follows*: it waits, woken when the leader is done (a watch
//! channel whose sender the leader drops; no polling), then asks the store itself, which
//! then replays the stored response.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::fingerprint::Fingerprint;
use crate::key::Key;

/// The keys that requests of this layer are handling now.
#[derive(Default)]
pub(crate) struct InFlightWaits {
    running: Mutex<HashMap<Key, Running>>,
    ids: AtomicU64,
}

struct Running {
    fp: Fingerprint,
    id: u64,
    done: watch::Receiver<()>,
}

/// A request's turn for its key.
pub(crate) enum Turn {
    /// First for the key: go ahead; the others wait until this is dropped.
    Lead(Leader),
    /// Another request with the same fingerprint is being handled: wait on this.
    Follow(watch::Receiver<()>),
    /// Another request with another fingerprint holds the key: do not wait (the store will
    /// answer 422, or 409 for the other).
    Skip,
}

/// Held by the leader of a key; dropping it wakes the followers.
pub(crate) struct Leader {
    waits: Arc<InFlightWaits>,
    key: Key,
    id: u64,
    /// Dropped last (after [`Drop::drop`] removed the entry): wakes every follower.
    _done: watch::Sender<()>,
}

impl InFlightWaits {
    /// Takes the lead for `key`, or says whom to follow.
    pub(crate) fn turn(self: &Arc<Self>, key: &Key, fp: &Fingerprint) -> Turn {
        let mut running = self.running.lock();
        if let Some(other) = running.get(key) {
            return if other.fp == *fp {
                Turn::Follow(other.done.clone())
            } else {
                Turn::Skip
            };
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = watch::channel(());
        running.insert(
            key.clone(),
            Running {
                fp: *fp,
                id,
                done: done_rx,
            },
        );
        Turn::Lead(Leader {
            waits: Arc::clone(self),
            key: key.clone(),
            id,
            _done: done_tx,
        })
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut running = self.waits.running.lock();
        if running.get(&self.key).is_some_and(|r| r.id == self.id) {
            running.remove(&self.key);
        }
    }
}

/// Waits until the leader behind `done` is dropped.
pub(crate) async fn leader_done(mut done: watch::Receiver<()>) {
    // Nothing is ever sent: `changed` returns (with an error) once the sender is dropped,
    // also if that happened before this call.
    while done.changed().await.is_ok() {}
}
