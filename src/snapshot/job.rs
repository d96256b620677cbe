//! A long request's line to whoever asked for it: progress goes out (bytes done of a total, in
//! a named phase), a cancel comes in. The control socket makes one per request (progress lines
//! to the client; a `cancel` line or a closed connection cancels); the scheduler and tests use
//! `Job::none()`.
//!
//! Cancelling is a request, not a kill: the work checks `cancelled()` at its safe points (a
//! capture fails through its `Failure`, which the job trips at once) and ends the way it ends
//! on any other failure, committing nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::capture::Failure;

/// Why a cancelled job stopped, as its error says.
pub const CANCELLED: &str = "cancelled by the user";

/// Progress of a job: `done` of `total` bytes in `phase` ("capture", "rollback", "merge").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

type Sink = Box<dyn Fn(&JobProgress) + Send + Sync>;

/// See the module doc.
pub struct Job {
    cancelled: AtomicBool,
    /// The capture running for this job: a cancel fails it at once.
    failure: Mutex<Option<Arc<Failure>>>,
    sink: Option<Sink>,
    started: Instant,
    /// When progress was last sent (ms since `started`), to send at most 5 a second.
    last_sent_ms: AtomicU64,
}

impl Job {
    /// A job nobody watches: no progress, never cancelled.
    pub fn none() -> Job {
        Job::with_sink(None)
    }

    /// A job whose progress goes to `sink` (at most 5 times a second, plus each phase's end).
    pub fn watched(sink: impl Fn(&JobProgress) + Send + Sync + 'static) -> Job {
        Job::with_sink(Some(Box::new(sink)))
    }

    fn with_sink(sink: Option<Sink>) -> Job {
        Job {
            cancelled: AtomicBool::new(false),
            failure: Mutex::new(None),
            sink,
            started: Instant::now(),
            last_sent_ms: AtomicU64::new(0),
        }
    }

    /// Ask the work to stop at its next safe point.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        if let Some(f) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f.fail(CANCELLED.into());
        }
    }

    /// Whether anyone takes its progress (work may skip measuring it otherwise).
    pub fn has_watcher(&self) -> bool {
        self.sink.is_some()
    }

    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Tie a capture's failure flag to this job (None: the capture ended). A cancel that came
    /// first fails it at once.
    pub fn attach(&self, failure: Option<Arc<Failure>>) {
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(f), true) = (&failure, self.cancelled()) {
            f.fail(CANCELLED.into());
        }
        *slot = failure;
    }

    /// Report `done` of `total` bytes in `phase` (dropped when the last report is younger
    /// than 200 ms, unless the phase is done).
    pub fn progress(&self, phase: &str, done: u64, total: u64) {
        let Some(sink) = &self.sink else { return };
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_sent_ms.load(Ordering::Relaxed);
        if done < total && now < last + 200 && last != 0 {
            return;
        }
        self.last_sent_ms.store(now.max(1), Ordering::Relaxed);
        sink(&JobProgress {
            phase: phase.to_string(),
            done,
            total,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_fails_the_attached_capture_before_or_after_attaching() {
        let job = Job::none();
        let early = Arc::new(Failure::default());
        job.attach(Some(early.clone()));
        assert!(!early.failed());
        job.cancel();
        assert_eq!(early.why().as_deref(), Some(CANCELLED));
        let late = Arc::new(Failure::default());
        job.attach(Some(late.clone()));
        assert!(late.failed() && job.cancelled());
    }

    #[test]
    fn progress_is_thinned_but_the_end_of_a_phase_always_goes_out() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let job = Job::watched(move |p| s.lock().unwrap().push(p.done));
        for d in 0..=1000 {
            job.progress("capture", d, 1000);
        }
        let seen = seen.lock().unwrap();
        assert!(seen.len() < 10, "{seen:?}");
        assert_eq!(seen.last(), Some(&1000));
    }
}
