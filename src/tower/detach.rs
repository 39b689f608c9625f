//! Work that outlives its waiter: a future polled in place, and handed to the runtime as a
//! task of its own only if the one waiting for it goes away first.
//!
//! Once the store granted a request its lease, the handler must run to its end and its
//! response be stored, even if the client disconnects (hyper then drops the request's
//! future). Spawning that work as a task for every request would cost a task and a
//! cross-task wake-up each time; [`Detach`] polls it where it is and spawns it only when
//! dropped unfinished. The work is boxed, so moving it into the task does not move the
//! future itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;

type Work<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Polls its work in place; dropped before the work finished, it spawns the rest of the
/// work on the current runtime (the output is then discarded).
pub(crate) struct Detach<T: Send + 'static> {
    work: Option<Work<T>>,
}

impl<T: Send + 'static> Detach<T> {
    pub(crate) fn new(work: impl Future<Output = T> + Send + 'static) -> Detach<T> {
        Detach {
            work: Some(Box::pin(work)),
        }
    }
}

impl<T: Send + 'static> Future for Detach<T> {
    type Output = T;

    /// The work is taken out while it is polled: if polling it panics, it is dropped with
    /// the unwinding stack, never handed to a task of its own and polled again.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut work = self
            .work
            .take()
            .expect("a Detach is not polled after it finished");
        match work.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(output),
            Poll::Pending => {
                self.work = Some(work);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for Detach<T> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            match Handle::try_current() {
                Ok(handle) => drop(handle.spawn(async move {
                    let _ = work.await;
                })),
                // No runtime (it is gone): the work is dropped; a lease in it releases
                // itself as it would on any drop.
                Err(_) => drop(work),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn finished_in_place_or_after_its_waiter_went_away() {
        assert_eq!(Detach::new(async { 5 }).await, 5);

        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let work = {
            let done = Arc::clone(&done);
            Detach::new(async move {
                let _ = rx.await;
                done.store(true, Ordering::SeqCst);
            })
        };
        // The waiter gives up before the work can finish.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), work).await;
        assert!(gave_up.is_err());
        assert!(!done.load(Ordering::SeqCst));
        tx.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the detached work never finished");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn work_that_panicked_is_never_polled_again() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut work = {
            let polls = Arc::clone(&polls);
            Box::pin(Detach::new(std::future::poll_fn(move |_| {
                polls.fetch_add(1, Ordering::SeqCst);
                panic!("the work failed (test)");
                #[allow(unreachable_code)]
                Poll::<()>::Pending
            })))
        };
        let waker = std::task::Waker::noop();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            work.as_mut().poll(&mut Context::from_waker(waker))
        }));
        assert!(polled.is_err());
        // Dropped after the panic: nothing is left to hand to a task.
        drop(work);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }
}
