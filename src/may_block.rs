//! Where this thread may block on a tokio runtime of idemstore's own (the PostgreSQL client
//! drives one): tokio refuses (panics) to drive a runtime on a thread that drives another.
//! Threads with no runtime current may. On a multi-threaded runtime, `block_in_place` makes
//! any of its threads one that may (at no cost on its blocking pool's). On a current-thread
//! runtime tokio cannot tell its own thread from its blocking pool's, so the work goes to
//! another thread, unless idemstore runs it there itself ([`allowed`]: the tower layer's
//! store calls).

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

/// Where blocking work of idemstore's own runtime can run, seen from this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Where {
    /// Here: no tokio runtime is current, or the thread runs [`allowed`] work.
    Here,
    /// Here, inside `tokio::task::block_in_place`: a thread of a multi-threaded runtime
    /// (one of its workers, which then hands its other tasks to another, or one of its
    /// blocking pool's, where it costs nothing).
    InPlace,
    /// Not on this thread: a current-thread runtime is current, and this may be the thread
    /// that drives it.
    Elsewhere,
}

/// Where blocking work can run, seen from this thread.
pub(crate) fn place() -> Where {
    if ALLOWED.with(Cell::get) {
        return Where::Here;
    }
    match tokio::runtime::Handle::try_current() {
        Err(_) => Where::Here,
        Ok(runtime) => match runtime.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => Where::InPlace,
            _ => Where::Elsewhere,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_here_in_place_or_elsewhere_by_the_runtime_around() {
        assert_eq!(place(), Where::Here);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        current.block_on(async {
            assert_eq!(place(), Where::Elsewhere);
            assert_eq!(allowed(place), Where::Here);
            let _ = std::panic::catch_unwind(|| allowed(|| panic!("inside")));
            assert_eq!(
                place(),
                Where::Elsewhere,
                "the mark is restored after a panic"
            );
        });
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let on_a_worker = multi.block_on(multi.spawn(async { place() }));
        assert_eq!(on_a_worker.unwrap(), Where::InPlace);
        let on_the_pool = multi.block_on(multi.spawn_blocking(place));
        assert_eq!(on_the_pool.unwrap(), Where::InPlace);
    }
}
