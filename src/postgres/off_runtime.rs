//! Where the PostgreSQL client may block. It drives a small tokio runtime of its own, and
//! tokio refuses (panics) to start one on a thread that drives another: a store opened by
//! async code (`Builder::open_postgres` in an async `main`), a read made there, the last
//! clone of a store dropped there. On a multi-threaded runtime such work blocks in place
//! (`block_in_place`); on a current-thread runtime it runs on a scoped thread of its own,
//! which the calling thread waits for, as it would have waited for the work itself (writes
//! are handed to the committer's thread there: `BatchWriter::may_write_here`).

use std::sync::Mutex;

/// Runs `work(value)` on this thread if it may block there ([`crate::may_block::place`]:
/// in `block_in_place` on a multi-threaded runtime); else on a thread of its own, joined
/// before this returns. A panic of `work` is resumed here.
///
/// # Errors
/// The thread could not be started: `value` is handed back, with the reason.
pub(crate) fn off_runtime<T: Send, R: Send>(
    value: T,
    work: impl FnOnce(T) -> R + Send,
) -> Result<R, (T, std::io::Error)> {
    use crate::may_block::{Where, place};
    match place() {
        Where::Here => return Ok(work(value)),
        Where::InPlace => return Ok(tokio::task::block_in_place(|| work(value))),
        Where::Elsewhere => {}
    }
    let slot = Mutex::new(Some(value));
    let take = || slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("idemstore-pg-io".into())
            .spawn_scoped(s, || work(take().expect("the value is taken once")));
        match spawned {
            Ok(thread) => Ok(thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
            Err(e) => Err((take().expect("the thread never started"), e)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_here_outside_a_runtime_and_on_another_thread_inside_one() {
        let here = std::thread::current().id();
        assert_eq!(
            off_runtime(1, |v| (v, std::thread::current().id())).ok(),
            Some((1, here))
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (v, there) = runtime
            .block_on(async { off_runtime(2, |v| (v, std::thread::current().id())) })
            .ok()
            .unwrap();
        assert_eq!(v, 2);
        assert_ne!(there, here);
    }
}
