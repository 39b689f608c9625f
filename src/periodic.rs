//! A named background thread that runs one job every interval until it is stopped: the
//! reaper and the key index's saver are both one. Stopping (or dropping the handle) wakes the
//! thread at once, waits for the run under way, if any, and joins it: no thread outlives it.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

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

/// Handle of a periodic thread; stopping it (or dropping the handle) joins the thread.
pub(crate) struct Periodic {
    stop: Option<Sender<()>>,
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
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                loop {
                    match stop_rx.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    job(&KeepGoing(&stop_rx));
                }
            })
            .map_err(|e| Error::storage(format!("starting {what}"), e))?;
        Ok(Periodic {
            stop: Some(stop),
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
        let mut idle = Periodic::spawn(
            "test-idle",
            "a test thread",
            Duration::from_secs(3600),
            |_| {},
        )
        .unwrap();
        let start = Instant::now();
        idle.stop();
        thread.stop();
        assert!(start.elapsed() < Duration::from_secs(5));
        let after = runs.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), after, "no run after the stop");
    }
}
