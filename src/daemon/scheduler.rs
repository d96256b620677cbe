//! The scheduler thread: takes each group's snapshot when its `schedule` says (the decision is
//! `schedule::due`: on time, one catch-up after downtime, never two of a group at once), prunes
//! the group right after, logs every run (taken, skipped and why, failed and why), and keeps
//! what `status` shows per group: the last run, the next slot, the last failure. A failed run
//! is not retried within its slot: the next slot tries again (and `status` shows the failure
//! meanwhile). It owns no snapshot logic: the engine takes and prunes, `schedule` decides.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use jiff::tz::TimeZone;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::config::{GroupConfig, Schedule};
use crate::control::RunFailure;
use crate::schedule::{self, Decision};
use crate::snapshot::{CreateRequest, Engine, SnapshotError};
use crate::sys::realtime_ns;

/// The longest the thread sleeps between looks: a clock step or a reload is noticed within it.
const TICK: Duration = Duration::from_secs(1);
/// How often the newest snapshot of each group is read from the store again.
const REREAD: Duration = Duration::from_secs(30);

/// What the scheduler knows of one scheduled group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupRuns {
    /// When the next run is due (None: the schedule has no next slot).
    pub next_ns: Option<u64>,
    /// The last scheduled snapshot this daemon took.
    pub last_taken: Option<String>,
    /// The last scheduled run that failed (cleared by the next success).
    pub last_failure: Option<RunFailure>,
    /// The slot of that failure: not tried again before the next slot.
    #[serde(skip)]
    failed_slot_ns: Option<u64>,
    /// A busy engine was already logged for this slot.
    #[serde(skip)]
    busy_slot_ns: Option<u64>,
}

struct State {
    groups: Vec<GroupConfig>,
    timezone: TimeZone,
    runs: BTreeMap<String, GroupRuns>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The running scheduler; `stop` ends its thread.
pub struct Scheduler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Start scheduling `groups` on `engine`.
    pub fn start(
        engine: Arc<Engine>,
        groups: Vec<GroupConfig>,
        timezone: TimeZone,
    ) -> std::io::Result<Scheduler> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                groups,
                timezone,
                runs: BTreeMap::new(),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || run(&s, &engine))?;
        Ok(Scheduler {
            shared,
            thread: Some(thread),
        })
    }

    /// Follow new groups and time zone from the next look on.
    pub fn reconfigure(&self, groups: Vec<GroupConfig>, timezone: TimeZone) {
        let mut st = lock(&self.shared);
        st.runs.retain(|g, _| groups.iter().any(|c| &c.name == g));
        st.groups = groups;
        st.timezone = timezone;
        self.shared.wake.notify_all();
    }

    /// What the scheduler knows per scheduled group.
    pub fn runs(&self) -> BTreeMap<String, GroupRuns> {
        lock(&self.shared).runs.clone()
    }

    /// End the thread (a run in progress finishes first).
    pub fn stop(mut self) {
        lock(&self.shared).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The time of `group`'s newest snapshot in the store, scheduled or not.
fn newest_of(engine: &Engine, group: &str) -> Option<u64> {
    match engine.store().list() {
        Ok(list) => list
            .into_iter()
            .filter_map(|l| l.info.ok())
            .filter(|i| i.group == group)
            .map(|i| i.created_ns)
            .max(),
        Err(e) => {
            warn!("scheduler: cannot list the store: {e}");
            None
        }
    }
}

/// The interval between two slots of `schedule` around `now_ns` (what `status --check`
/// compares a snapshot's age with).
pub fn period_ns(schedule: &Schedule, now_ns: u64, tz: &TimeZone) -> Option<u64> {
    let a = schedule::next_after(schedule, now_ns, tz)?;
    let b = schedule::next_after(schedule, a, tz)?;
    Some(b - a)
}

fn run(shared: &Shared, engine: &Engine) {
    // The newest snapshot per group, read from the store at start and after each run.
    let mut newest: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let mut read_at = std::time::Instant::now();
    loop {
        // Read again now and then: snapshots deleted by hand change what is due.
        if read_at.elapsed() >= REREAD {
            newest.clear();
            read_at = std::time::Instant::now();
        }
        let (groups, tz) = {
            let st = lock(shared);
            if st.stop {
                return;
            }
            (st.groups.clone(), st.timezone.clone())
        };
        for g in groups.iter() {
            let Some(sched) = &g.schedule else { continue };
            let now = realtime_ns();
            let last = *newest
                .entry(g.name.clone())
                .or_insert_with(|| newest_of(engine, &g.name));
            let failed = lock(shared)
                .runs
                .get(&g.name)
                .and_then(|r| r.failed_slot_ns);
            let since = last.max(failed);
            match schedule::due(sched, since, false, now, &tz) {
                Decision::Wait { next_ns, .. } => {
                    lock(shared).runs.entry(g.name.clone()).or_default().next_ns = next_ns;
                }
                Decision::Busy { .. } => {}
                Decision::Run {
                    slot_ns, reason, ..
                } => {
                    // A snapshot taken by hand since the last look may cover the slot.
                    let fresh = newest_of(engine, &g.name);
                    newest.insert(g.name.clone(), fresh);
                    if fresh.max(failed).is_some_and(|t| t >= slot_ns) {
                        continue;
                    }
                    take(shared, engine, g, sched, slot_ns, &reason, &tz);
                    newest.insert(g.name.clone(), newest_of(engine, &g.name));
                }
            }
        }
        let st = lock(shared);
        if st.stop {
            return;
        }
        let _ = shared.wake.wait_timeout(st, TICK);
    }
}

/// One scheduled run of group `g` for `slot_ns`: snapshot, then prune.
fn take(
    shared: &Shared,
    engine: &Engine,
    g: &GroupConfig,
    sched: &Schedule,
    slot_ns: u64,
    reason: &str,
    tz: &TimeZone,
) {
    let req = CreateRequest {
        group: Some(g.name.clone()),
        ..CreateRequest::default()
    };
    let started = std::time::Instant::now();
    match engine.create(&req) {
        Ok(r) => {
            info!(
                "scheduled snapshot {} of group {} taken in {:.1}s ({reason}); {} bytes stored",
                r.name,
                g.name,
                started.elapsed().as_secs_f64(),
                r.stored_bytes
            );
            {
                let mut st = lock(shared);
                let runs = st.runs.entry(g.name.clone()).or_default();
                runs.last_taken = Some(r.name.clone());
                runs.last_failure = None;
                runs.failed_slot_ns = None;
                runs.next_ns = schedule::next_after(sched, realtime_ns(), tz);
            }
            match engine.prune(Some(&g.name), false, realtime_ns()) {
                Ok(p) if !p.removed.is_empty() => info!(
                    "pruned group {}: removed {} ({} bytes -> {} bytes)",
                    g.name,
                    p.removed.join(", "),
                    p.bytes_before,
                    p.bytes_after
                ),
                Ok(_) => {}
                Err(e) => warn!("pruning group {} after its snapshot failed: {e}", g.name),
            }
        }
        Err(SnapshotError::Busy) => {
            // Another snapshot operation runs: look again at the next tick, log it once.
            let mut st = lock(shared);
            let runs = st.runs.entry(g.name.clone()).or_default();
            if runs.busy_slot_ns != Some(slot_ns) {
                runs.busy_slot_ns = Some(slot_ns);
                info!(
                    "scheduled snapshot of group {} waits: another snapshot operation is running",
                    g.name
                );
            }
        }
        Err(e) => {
            let message = e.to_string();
            warn!(
                "scheduled snapshot of group {} failed ({reason}): {message}; the next slot tries again",
                g.name
            );
            let mut st = lock(shared);
            let runs = st.runs.entry(g.name.clone()).or_default();
            runs.failed_slot_ns = Some(slot_ns);
            runs.last_failure = Some(RunFailure {
                at_ns: realtime_ns(),
                message,
            });
            runs.next_ns = schedule::next_after(sched, slot_ns, tz);
        }
    }
}
