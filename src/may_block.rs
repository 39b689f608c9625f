//! Whether this thread may block on a tokio runtime of idemstore's own (the PostgreSQL
//! client drives one): tokio refuses (panics) to drive a runtime on a thread that drives
//! another. Threads with no runtime current may; so may the threads of tokio's blocking pool,
//! which tokio cannot tell apart from the runtime's own threads, when idemstore runs work
//! there itself ([`allowed`]: the tower layer's store calls).

#![cfg_attr(not(feature = "postgres"), allow(dead_code))]

use std::cell::Cell;

thread_local! {
    /// Set while [`allowed`] runs work on this thread.
    static ALLOWED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` with this thread known as one where blocking is allowed (a thread of tokio's
/// blocking pool).
#[cfg_attr(not(feature = "tower"), allow(dead_code))]
pub(crate) fn allowed<T>(work: impl FnOnce() -> T) -> T {
    /// Restores the mark as it was, on return and on a panic.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALLOWED.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ALLOWED.with(|a| a.replace(true)));
    work()
}

/// Whether a runtime of idemstore's own may be driven on this thread: no tokio runtime is
/// current here, or the thread runs [`allowed`] work.
pub(crate) fn here() -> bool {
    ALLOWED.with(Cell::get) || tokio::runtime::Handle::try_current().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_thread_with_no_runtime_or_running_allowed_work_may_block() {
        assert!(here());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert!(!here());
            assert!(allowed(here));
            let _ = std::panic::catch_unwind(|| allowed(|| panic!("inside")));
            assert!(!here(), "the mark is restored after a panic");
        });
    }
}
