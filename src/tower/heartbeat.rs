//! The heartbeat: while a handler runs, its lease is extended so that a retry cannot take
//! the key over, up to a limit.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, timeout};

use super::blocking::HeldLease;
use crate::error::Error;

/// How the layer keeps a running handler's lease alive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heartbeat {
    /// The store's lease: each beat extends the lease by this much.
    pub lease: Duration,
    /// How long after the handler started the layer stops extending.
    pub limit: Duration,
}

impl Heartbeat {
    /// The time between beats: a third of the lease, so a beat that is late (a busy store)
    /// still lands before the lease runs out.
    fn every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(1))
    }

    /// Runs the handler's future `handler` to its end, extending `lease` every [`every`](Heartbeat::every)
    /// until [`limit`](Heartbeat::limit) has passed since the start. The handler is polled
    /// while an extension commits, so a slow store never stalls it. A lost lease or a store
    /// failure stops the beats (logged); the handler runs on either way.
    pub(crate) async fn run<T>(
        &self,
        handler: impl Future<Output = T>,
        lease: &mut HeldLease,
    ) -> T {
        let mut task = std::pin::pin!(handler);
        let started = Instant::now();
        loop {
            if let Ok(done) = timeout(self.every(), &mut task).await {
                return done;
            }
            if started.elapsed() >= self.limit {
                tracing::warn!(
                    limit_ms = self.limit.as_millis() as u64,
                    "the handler runs longer than the heartbeat limit; its lease is no \
                     longer extended and a retry may take the key over once it runs out"
                );
                return task.await;
            }
            let (extended, done) = beside(lease.extend(self.lease), &mut task).await;
            if let Err(e) = extended {
                if !matches!(e, Error::LeaseLost { .. }) {
                    tracing::error!(error = %e, "extending a running handler's lease failed");
                }
                return match done {
                    Some(done) => done,
                    None => task.await,
                };
            }
            if let Some(done) = done {
                return done;
            }
        }
    }
}

/// Runs `beat` to its end while polling `task` beside it: `beat`'s output, and `task`'s if
/// it finished meanwhile. `beat` is never dropped unfinished (an extension in flight holds
/// the lease).
async fn beside<B: Future, T: Future + Unpin>(
    beat: B,
    task: &mut T,
) -> (B::Output, Option<T::Output>) {
    let mut beat = std::pin::pin!(beat);
    let mut done = None;
    std::future::poll_fn(|cx| {
        if done.is_none()
            && let Poll::Ready(output) = Pin::new(&mut *task).poll(cx)
        {
            done = Some(output);
        }
        beat.as_mut()
            .poll(cx)
            .map(|extended| (extended, done.take()))
    })
    .await
}
