//! A handler's panic as a value: the handler runs inside the layer's request task, and a
//! panic in it must end as a stored problem answer, not as a lost task.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

/// A handler panicked; its message, when it had one.
#[derive(Debug)]
pub(crate) struct Panicked(pub Option<String>);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(message) => write!(f, "the handler panicked: {message}"),
            None => f.write_str("the handler panicked"),
        }
    }
}

fn message(payload: &(dyn Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

pin_project! {
    /// `inner`'s output, or [`Panicked`] when polling it panicked (it is not polled again).
    pub(crate) struct CatchPanic<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchPanic<F> {
    pub(crate) fn new(inner: F) -> CatchPanic<F> {
        CatchPanic { inner }
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // Unwind safety: after a panic the future is dropped unpolled, as a task's would be.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(Panicked(message(&*payload)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_is_a_value_and_an_answer_passes_through() {
        assert_eq!(CatchPanic::new(async { 7 }).await.unwrap(), 7);
        let panicked = CatchPanic::new(async {
            tokio::task::yield_now().await;
            panic!("boom {}", 1)
        })
        .await;
        let err = panicked.unwrap_err();
        assert_eq!(err.to_string(), "the handler panicked: boom 1");
        let panicked = CatchPanic::new(async { std::panic::panic_any(3_u8) }).await;
        assert_eq!(panicked.unwrap_err().to_string(), "the handler panicked");
    }
}
