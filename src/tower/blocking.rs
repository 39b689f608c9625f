//! Store calls off the runtime: every call that can wait on a commit (an fsync) runs on
//! tokio's blocking pool, and a [`HeldLease`] never releases itself on a runtime thread.

use std::time::Duration;

use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::lease::Lease;
use crate::outcome::{Begin, Completed};
use crate::store::Store;

/// Runs `f` on tokio's blocking pool and waits for it without holding a runtime thread.
///
/// # Errors
/// [`Error::Closed`] when the pool did not run `f` to its end (the runtime is shutting down,
/// or `f` panicked).
async fn offload<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(move || crate::may_block::allowed(f))
        .await
        .unwrap_or(Err(Error::Closed))
}

/// [`Store::begin`] on the blocking pool. A `Started` answer whose waiter went away is
/// dropped on the pool's thread (its release is a store write).
///
/// # Errors
/// As [`Store::begin`].
pub(crate) async fn begin(store: &Store, key: &Key, fp: Fingerprint) -> Result<Begin> {
    let (store, key) = (store.clone(), key.clone());
    offload(move || store.begin(&key, &fp)).await
}

/// A lease held by async code. Its operations run on the blocking pool; if it is dropped
/// without [`complete`](HeldLease::complete), its release (a store write) is sent to the
/// blocking pool too.
///
/// It keeps a clone of its store: dropping the last clone closes the store, after which a
/// lease can no longer release itself, and a service's last clone may go with the very task
/// that holds the lease (a runtime shutting down drops its tasks). The release comes first.
pub(crate) struct HeldLease {
    lease: Option<Lease>,
    store: Store,
}

impl HeldLease {
    pub(crate) fn new(lease: Lease, store: &Store) -> HeldLease {
        HeldLease {
            lease: Some(lease),
            store: store.clone(),
        }
    }

    /// [`Lease::extend`] on the blocking pool.
    ///
    /// # Errors
    /// As [`Lease::extend`]; [`Error::Closed`] if the lease is gone (a failed call before).
    pub(crate) async fn extend(&mut self, by: Duration) -> Result<()> {
        let mut lease = self.lease.take().ok_or(Error::Closed)?;
        let (lease, result) = tokio::task::spawn_blocking(move || {
            let result = crate::may_block::allowed(|| lease.extend(by));
            (lease, result)
        })
        .await
        .map_err(|_| Error::Closed)?;
        self.lease = Some(lease);
        result
    }

    /// [`Lease::complete`] on the blocking pool.
    ///
    /// # Errors
    /// As [`Lease::complete`].
    pub(crate) async fn complete(mut self, response: Vec<u8>) -> Result<Completed> {
        let lease = self.lease.take().ok_or(Error::Closed)?;
        offload(move || lease.complete(&response)).await
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            release_off_runtime(Release {
                _lease: lease,
                _store: self.store.clone(),
            });
        }
    }
}

/// A lease on its way to its release, with a clone of its store: the fields drop in order,
/// so the lease is released before the store can close.
struct Release {
    _lease: Lease,
    _store: Store,
}

/// Drops `release` (the lease's best-effort release, then the store clone) on the blocking
/// pool. Outside a runtime it is dropped here; if the runtime drops the job unrun (it is
/// shutting down), the job's drop does the same.
fn release_off_runtime(release: Release) {
    match Handle::try_current() {
        Ok(handle) => {
            drop(handle.spawn_blocking(move || crate::may_block::allowed(|| drop(release))))
        }
        Err(_) => drop(release),
    }
}
