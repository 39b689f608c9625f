//! A named background thread that runs one job every interval until it is stopped: the
//! reaper and the key index's saver are both one. Stopping (or dropping the handle) wakes the
//! thread at once, waits for the run under way, if any, and joins it: no thread outlives it.
//! A stop may hand the thread one last job to run before it ends ([`Periodic::stop_after`]).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Whether the job should go on: `false` once a stop was asked (a long job checks between
/// its steps).
pub(crate) struct KeepGoing<'a>(&'a Receiver<()>);

impl KeepGoing<'_> {
    /// `true` while no stop was asked.
    pub fn now(&self) -> bool {
        matches!(self.0.try_recv(), Err(TryRecvError::Empty))
    }
}

/// A job the thread runs once, when it is stopped.
type LastJob = Box<dyn FnOnce() + Send>;

/// Handle of a periodic thread; stopping it (or dropping the handle) joins the thread.
pub(crate) struct Periodic {
    stop: Option<Sender<()>>,
    /// Set by [`Periodic::stop_after`] before the stop; taken and run by the thread.
    last: Arc<Mutex<Option<LastJob>>>,
    handle: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Starts the thread `name`, which runs `job` every `every` until stopped; `what` names
    /// the thread in the error.
    ///
    /// # Errors
    /// [`Error::Storage`] if the thread cannot be spawned.
    pub fn spawn(
        name: &str,
        what: &str,
        every: Duration,
        mut job: impl FnMut(&KeepGoing<'_>) + Send + 'static,
    ) -> Result<Periodic> {
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let last: Arc<Mutex<Option<LastJob>>> = Arc::default();
        let last_job = Arc::clone(&last);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // A message or a dropped sender is the stop.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(every) {
                    job(&KeepGoing(&stop_rx));
                }
                // Taken before it runs, so the handle's copy never holds it afterwards.
                let last = last_job.lock().take();
                if let Some(last) = last {
                    last();
                }
            })
            .map_err(|e| Error::storage(format!("starting {what}"), e))?;
        Ok(Periodic {
            stop: Some(stop),
            last,
            handle: Some(handle),
        })
    }

    /// Stops the thread (after the run under way, if any) and joins it.
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    /// Stops the thread as [`Periodic::stop`] does, but has it run `last` on its way out
    /// (after the run under way, if any), and joins it. Returns `last` unrun when the thread
    /// could not run it: it was stopped before, or a job of it panicked.
    pub fn stop_after<F: FnOnce() + Send + 'static>(&mut self, last: F) -> Option<LastJob> {
        *self.last.lock() = Some(Box::new(last));
        self.stop();
        // Still here: the thread had ended (stopped before, or a panic) and never took it.
        self.last.lock().take()
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// A thread named `name` whose job would run only after an hour.
    fn idle(name: &str) -> Periodic {
        Periodic::spawn(name, "a test thread", Duration::from_secs(3600), |_| {}).unwrap()
    }

    #[test]
    fn runs_every_interval_and_stops_at_once() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let mut thread = Periodic::spawn(
            "test-periodic",
            "a test thread",
            Duration::from_millis(5),
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        let start = Instant::now();
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the job never ran"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // A long interval: the stop still ends the thread at once.
        let mut idle = idle("test-idle");
        let start = Instant::now();
        idle.stop();
        thread.stop();
        assert!(start.elapsed() < Duration::from_secs(5));
        let after = runs.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), after, "no run after the stop");
    }

    #[test]
    fn a_last_job_runs_on_the_thread_before_it_is_joined() {
        let mut thread = idle("test-last");
        let ran_on = Arc::new(Mutex::new(None));
        let record = Arc::clone(&ran_on);
        let unrun = thread.stop_after(move || {
            *record.lock() = std::thread::current().name().map(str::to_owned);
        });
        assert!(unrun.is_none(), "the thread ran the job");
        assert_eq!(ran_on.lock().as_deref(), Some("test-last"));
        // Once stopped, a last job is handed back instead.
        assert!(thread.stop_after(|| {}).is_some());
    }

    #[test]
    fn a_last_job_is_handed_back_when_the_thread_died() {
        let mut thread = Periodic::spawn(
            "test-dies",
            "a test thread",
            Duration::from_millis(1),
            |_| panic!("a job that fails"),
        )
        .unwrap();
        let start = Instant::now();
        while !thread.handle.as_ref().unwrap().is_finished() {
            assert!(start.elapsed() < Duration::from_secs(10), "never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        let last = thread.stop_after(|| {}).expect("handed back");
        last();
    }
}
