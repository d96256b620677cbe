//! The snapshot engine (DESIGN.md "Snapshot protocol"): plan, barrier, copy-before-write
//! capture, commit, abort, for a group of volumes at one instant. It joins the tracker (dirty
//! bits, write gates), the policy (FULL or INCREMENTAL per partition, with a reason) and the
//! store (where the snapshot is written and committed). FUSE-free: it runs against the backing
//! dir and the tracker that the overlay feeds, so tests drive it without a mount.
//!
//! It must never change a live volume, never show a partial snapshot, and never lose a change:
//! on any failure the taken dirty bits go back to the live maps.
//!
//! Lock order: `Engine::busy` (one snapshot operation at a time), then the volumes' write
//! gates (inside `Tracker::barrier`, in id order), then a capture's stripe locks, then the
//! store writer's state.

pub mod capture;
pub mod deferred;
pub mod diff;
pub mod group;
pub mod job;
pub use job::Job;
use std::sync::mpsc::RecvTimeoutError;
pub mod lifecycle;
mod plan;
pub mod recover;
mod report;
pub mod rollback;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::{GroupConfig, PolicyConfig};
use crate::ids::{SnapshotName, VolumeId};
use crate::policy::{self, Decision, Kind};
use crate::store::{Manifest, PartitionKind, SnapshotWriter, Store, StoreError, VolumeMeta};
use crate::sys;
use crate::sys::{now_ns, utc_stamp};
use crate::track::{ChangeMap, Taken, Tracker, Volume};
use capture::{BlockAction, Capture, CaptureSpec, CaptureStats, Failure};
use group::{GroupTree, Selection};
use plan::{data_blocks, dry_view, estimate, pending_blocks, plan};
use report::{estimated_volume, partition_report};
pub use report::{CreateReport, CreateRequest, PartitionReport, VolumeReport};

/// How often the engine retries a barrier when the group's files changed between its walk
/// and the barrier (a file created or renamed in between).
const BARRIER_ATTEMPTS: usize = 5;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Request(String),
    #[error("another snapshot operation is running; try again when it is done")]
    Busy,
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {name:?} aborted: {why}. Nothing of it was kept; the live volumes are untouched and their changes stay tracked for the next snapshot")]
    Aborted { name: String, why: String },
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// The snapshot engine of one mount.
pub struct Engine {
    root: OwnedFd,
    /// (dev, ino) of the store, when it sits inside the backing dir: never part of a group.
    store_key: Option<(u64, u64)>,
    store: Store,
    tracker: Arc<Tracker>,
    /// Groups, policy and retention; swapped whole on a reload (`lifecycle`).
    rules: std::sync::RwLock<Arc<lifecycle::Rules>>,
    workers: usize,
    /// Pushes dirty pages of shared mappings on the mount to the daemon (syncfs), so that the
    /// barrier sees them; a no-op without a mount.
    flush: Box<dyn Fn() + Send + Sync>,
    busy: Mutex<()>,
    /// The store's journal dir for writes parked during captures (None: writers copy before
    /// writing).
    deferred_dir: Option<OwnedFd>,
    /// The failure flag of the snapshot being captured, for `stop`.
    current: Mutex<Option<Arc<Failure>>>,
    stopping: AtomicBool,
    /// Drops the kernel's caches of what a rollback changed (set once mounted).
    invalidate: Mutex<Option<Arc<rollback::InvalidateFn>>>,
}

/// Everything the engine is built from.
pub struct EngineOptions {
    pub backing: std::path::PathBuf,
    pub store_dir: std::path::PathBuf,
    pub tracker: Arc<Tracker>,
    pub policy: PolicyConfig,
    pub groups: Vec<GroupConfig>,
    /// Capture worker threads.
    pub workers: usize,
    pub flush: Box<dyn Fn() + Send + Sync>,
    /// Park writes to blocks not yet captured instead of copying them first (see
    /// `deferred`).
    pub defer_writes: bool,
}

/// A volume readied before the barrier.
struct Prepared {
    source: File,
    deferred: Option<deferred::Deferred>,
    /// The change map before the barrier (its rates feed the policy).
    map: ChangeMap,
    parent_hashes: Option<HashMap<u64, Option<[u8; 32]>>>,
    /// The blocks that held data when the engine looked, before the barrier (None: unknown):
    /// a FULL partition's capture copies these and the blocks dirtied since, never its holes
    /// (`plan::pending_blocks`).
    data: Option<Vec<u64>>,
}

/// What the engine did inside the barrier.
#[derive(Default)]
struct AtInstant {
    created_ns: u64,
    captures: Vec<(Arc<Volume>, Arc<Capture>)>,
    plans: Vec<(VolumeId, String, u64, Vec<Decision>)>,
    /// The group gained a file since the walk: gates reopened untouched, try again.
    retry: bool,
    /// Volumes gone from the group since the walk (unlinked, renamed away).
    dropped: HashSet<VolumeId>,
    error: Option<SnapshotError>,
    pause: Duration,
}

impl Engine {
    /// Set up the engine; opens (and sweeps) the store in `o.store_dir`.
    pub fn new(o: EngineOptions) -> Result<Engine> {
        let store = Store::open(&o.store_dir)?;
        Engine::with_store(o, store)
    }

    /// Set up the engine writing snapshots to `store` (`o.store_dir` still holds the parked
    /// writes' journal, and is never part of a group).
    pub fn with_store(o: EngineOptions, store: Store) -> Result<Engine> {
        let c = std::ffi::CString::new(o.backing.as_os_str().as_encoded_bytes())
            .map_err(|_| SnapshotError::Request("backing path has a NUL byte".into()))?;
        let root = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(
            |source| SnapshotError::Io {
                what: format!("opening {}", o.backing.display()),
                source,
            },
        )?;
        let store_key = std::fs::metadata(&o.store_dir).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        let deferred_dir = if o.defer_writes {
            Some(
                deferred::open_dir(&o.store_dir).map_err(|source| SnapshotError::Io {
                    what: format!("opening {}", o.store_dir.join(deferred::DIR).display()),
                    source,
                })?,
            )
        } else {
            None
        };
        // Blocks a crash left without their blake3 (reflinked, not hashed before it).
        capture::hash_in_background(&store);
        Ok(Engine {
            root,
            store_key,
            store,
            tracker: o.tracker,
            rules: std::sync::RwLock::new(Arc::new(lifecycle::Rules {
                policy: o.policy,
                groups: o.groups,
                timezone: jiff::tz::TimeZone::system(),
                max_store_bytes: None,
            })),
            workers: o.workers.max(1),
            flush: o.flush,
            busy: Mutex::new(()),
            deferred_dir,
            current: Mutex::new(None),
            stopping: AtomicBool::new(false),
            invalidate: Mutex::new(None),
        })
    }

    /// The daemon is exiting: give up the snapshot being captured, if any (its parked writes
    /// land in the volumes and its changes stay tracked), refuse new ones, and return once
    /// none runs.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = current {
            f.fail("the daemon is stopping".into());
        }
        drop(self.lock_busy(true));
    }

    /// The store the engine writes.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock_busy(&self, wait: bool) -> Result<std::sync::MutexGuard<'_, ()>> {
        if wait {
            return Ok(self.busy.lock().unwrap_or_else(|p| p.into_inner()));
        }
        match self.busy.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(SnapshotError::Busy),
        }
    }

    /// The name of the new snapshot: the one asked for, or `<group>-<UTC time>`.
    fn pick_name(&self, group: &str, asked: Option<&SnapshotName>) -> Result<SnapshotName> {
        if let Some(n) = asked {
            if self.store.exists(n)? {
                return Err(StoreError::NameTaken(n.to_string()).into());
            }
            return Ok(n.clone());
        }
        let base = format!("{group}-{}", utc_stamp(now_ns() / 1_000_000_000));
        let mut name = SnapshotName::parse(&base).map_err(StoreError::from)?;
        let mut i = 2;
        while self.store.exists(&name)? {
            name = SnapshotName::parse(&format!("{base}-{i}")).map_err(StoreError::from)?;
            i += 1;
        }
        Ok(name)
    }

    /// The newest committed snapshot of `group` with the tracker's geometry.
    fn parent_of(&self, group: &str) -> Result<Option<Manifest>> {
        let mut best: Option<Manifest> = None;
        for l in self.store.list()? {
            let Ok(info) = l.info else { continue };
            if info.group != group {
                continue;
            }
            let name = SnapshotName::parse(&l.name).map_err(StoreError::from)?;
            let m = self.store.manifest(&name)?;
            if m.geometry != self.tracker.geometry() {
                continue;
            }
            if best.as_ref().is_none_or(|b| m.created_ns >= b.created_ns) {
                best = Some(m);
            }
        }
        Ok(best)
    }

    /// Take a snapshot (or, with `dry_run`, say what it would store and why).
    pub fn create(&self, req: &CreateRequest) -> Result<CreateReport> {
        self.create_with(req, &Job::none())
    }

    /// `create`, reporting the capture's progress to `job` and giving up (committing
    /// nothing) when it is cancelled.
    pub fn create_with(&self, req: &CreateRequest, job: &Job) -> Result<CreateReport> {
        let _busy = self.lock_busy(false)?;
        self.create_locked(req, job)
    }

    /// `create_with` for a caller that holds the busy lock already (a rollback's safety
    /// snapshot).
    fn create_locked(&self, req: &CreateRequest, job: &Job) -> Result<CreateReport> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(SnapshotError::Request("the daemon is stopping".into()));
        }
        let (group, sel) = self.resolve(req)?;
        let name = self.pick_name(&group, req.name.as_ref())?;
        let parent = self.parent_of(&group)?;
        if req.dry_run {
            return self.dry_run(name, group, &sel, parent.as_ref(), req.full);
        }
        // Shared writable mappings reach the daemon only at writeback: push them now, so a
        // store through a mapping that returned before this call is in the snapshot.
        (self.flush)();
        for _ in 0..BARRIER_ATTEMPTS {
            if job.cancelled() {
                return Err(SnapshotError::Aborted {
                    name: name.to_string(),
                    why: job::CANCELLED.into(),
                });
            }
            let attempt = self.attempt(&name, &group, &sel, parent.as_ref(), req.full, job);
            job.attach(None);
            if let Some(report) = attempt? {
                return Ok(report);
            }
        }
        Err(SnapshotError::Request(format!(
            "the files of group {group:?} kept changing (created, renamed) during {BARRIER_ATTEMPTS} barriers; try again"
        )))
    }

    /// Walk the backing dir for the files of `group`; an error if it has none.
    fn walk_group(&self, group: &str, sel: &Selection) -> Result<GroupTree> {
        let tree =
            group::walk(&self.root, self.store_key, sel).map_err(|source| SnapshotError::Io {
                what: "walking the backing dir".into(),
                source,
            })?;
        if tree.volumes.is_empty() {
            return Err(SnapshotError::Request(format!(
                "group {group:?} has no regular file in the backing dir"
            )));
        }
        Ok(tree)
    }

    /// Walk the group and ready its volumes for the barrier.
    fn prepare(
        &self,
        group: &str,
        sel: &Selection,
        parent: Option<&Manifest>,
    ) -> Result<HashMap<VolumeId, Prepared>> {
        let tree = self.walk_group(group, sel)?;
        let mut out = HashMap::new();
        for (id, e) in &tree.volumes {
            // O_PATH first: whatever the name is now (a fifo swapped in would block a plain
            // open), nothing is opened for reading until it is the regular file walked.
            let path_fd = match sys::open_beneath(self.root.as_raw_fd(), &e.path, libc::O_PATH) {
                Ok(fd) => fd,
                // Gone or replaced since the walk: the barrier's own walk sorts it out.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => continue,
                Err(source) => {
                    return Err(SnapshotError::Io {
                        what: format!("opening {}", e.path),
                        source,
                    })
                }
            };
            let st = sys::fstat(path_fd.as_raw_fd()).map_err(|source| SnapshotError::Io {
                what: format!("stat {}", e.path),
                source,
            })?;
            if (st.st_dev, st.st_ino) != (id.dev, id.ino)
                || st.st_mode & libc::S_IFMT != libc::S_IFREG
            {
                continue;
            }
            let fd = sys::reopen(path_fd.as_raw_fd(), libc::O_RDONLY).map_err(|source| {
                SnapshotError::Io {
                    what: format!("opening {}", e.path),
                    source,
                }
            })?;
            // Parking writes needs a writable fd of our own on the volume; without one (a
            // read-only file for a daemon that is not root), writers copy first.
            let target = self
                .deferred_dir
                .as_ref()
                .and_then(|_| sys::reopen(path_fd.as_raw_fd(), libc::O_WRONLY).ok());
            let volume = self.tracker.volume(*id, st.st_size as u64, false);
            // The O_PATH fd already checked above is what the volume holds on its inode.
            volume.attach_fd(|| Some(path_fd));
            volume.first_stamp(&st);
            // A change made behind the overlay's back since the last tick must count in this
            // snapshot, not only in the next: look now, as a tick would.
            if volume.check_stamp() {
                warn!("{} changed behind the overlay's back: rescanned", e.path);
            }
            let map = volume.change_map(None, now_ns());
            let in_parent = parent.is_some_and(|p| p.volume(*id).is_some());
            let needs_hashes = in_parent
                && (map.unknown_all
                    || !map.unknown_partitions.is_empty()
                    || !self.base_is(&volume, parent));
            let parent_hashes = match (needs_hashes, parent) {
                (true, Some(p)) => Some(self.store.block_hashes(&p.checked_name()?, *id)?),
                _ => None,
            };
            let deferred = match (&self.deferred_dir, target) {
                (Some(dir), Some(target)) => dir.try_clone().ok().and_then(|dir| {
                    let bs = self.tracker.geometry().block_size;
                    deferred::Deferred::new(dir, *id, &e.path, File::from(target), bs).ok()
                }),
                _ => None,
            };
            // Where its data lies, to spare a FULL partition's holes; on an error, every
            // block counts (a partial look must not hide data).
            let mut looked = Ok(());
            let data = data_blocks(st.st_size as u64, self.tracker.geometry(), |f| {
                looked = sys::data_ranges(fd.as_raw_fd(), 0, st.st_size as u64, f);
            });
            let data = match looked {
                Ok(()) => Some(data),
                Err(err) => {
                    warn!("{}: where its data lies (SEEK_DATA): {err}", e.path);
                    None
                }
            };
            out.insert(
                *id,
                Prepared {
                    source: File::from(fd),
                    deferred,
                    map,
                    parent_hashes,
                    data,
                },
            );
        }
        Ok(out)
    }

    /// Whether `v`'s dirty bits are relative to `parent`.
    fn base_is(&self, v: &Volume, parent: Option<&Manifest>) -> bool {
        match (v.base(), parent) {
            (Some((n, t)), Some(p)) => n == p.name && t == p.created_ns,
            _ => false,
        }
    }

    /// One barrier and capture (every partition FULL with `full`); Ok(None) when the group
    /// changed under it and it must be tried again.
    fn attempt(
        &self,
        name: &SnapshotName,
        group: &str,
        sel: &Selection,
        parent: Option<&Manifest>,
        full: bool,
        job: &Job,
    ) -> Result<Option<CreateReport>> {
        let policy = self.rules().policy_for(group);
        let mut prepared = self.prepare(group, sel, parent)?;
        if prepared.is_empty() {
            // Every file the walk found went before it could be opened: walk again.
            return Ok(None);
        }
        let geometry = self.tracker.geometry();
        let parent_name = parent.map(|p| p.checked_name()).transpose()?;
        let writer = Arc::new(
            self.store
                .begin(name, group, geometry, parent_name.as_ref())?,
        );
        let failure = Arc::new(Failure::default());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.clone());
        if self.stopping.load(Ordering::Acquire) {
            failure.fail("the daemon is stopping".into());
        }
        job.attach(Some(failure.clone()));
        let ids: Vec<VolumeId> = prepared.keys().copied().collect();
        let asked = Instant::now();
        let barrier = self.tracker.barrier(&ids, |vols, taken| {
            let prep = &mut prepared;
            let mut r = self.at_instant(
                vols,
                taken,
                prep,
                sel,
                parent,
                (&policy, full),
                &writer,
                &failure,
            );
            r.pause = asked.elapsed();
            r
        });
        let (mut r, taken) = match barrier {
            Ok(x) => x,
            Err((r, e)) => {
                // The tracker already gave the bits back.
                detach(&r.captures);
                return Err(SnapshotError::Aborted {
                    name: name.to_string(),
                    why: format!("saving the tracking state at the barrier: {e}"),
                });
            }
        };
        if r.retry || r.error.is_some() {
            detach(&r.captures);
            self.give_back(&taken);
            return match r.error.take() {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let (kept, dropped): (Vec<Taken>, Vec<Taken>) =
            taken.into_iter().partition(|t| !r.dropped.contains(&t.id));
        self.give_back(&dropped);
        let caps: Vec<Arc<Capture>> = r.captures.iter().map(|(_, c)| c.clone()).collect();
        let block = geometry.block_size;
        let total = caps.iter().map(|c| c.left()).sum::<u64>() * block;
        let captured = || total - caps.iter().map(|c| c.left()).sum::<u64>() * block;
        std::thread::scope(|s| {
            // Dropping `done` wakes the reporter at once: no snapshot waits on its sleep.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            if job.has_watcher() {
                s.spawn(move || {
                    while let Err(RecvTimeoutError::Timeout) =
                        finished.recv_timeout(Duration::from_millis(100))
                    {
                        job.progress("capture", captured(), total);
                    }
                });
            }
            capture::run_workers(&caps, self.workers, &failure);
            drop(done);
        });
        job.progress("capture", captured(), total);
        detach(&r.captures);
        let mut stats = CaptureStats::default();
        for c in &caps {
            let s = c.stats();
            stats.by_writers += s.by_writers;
            stats.by_workers += s.by_workers;
            stats.unchanged += s.unchanged;
            stats.deferred_writes += s.deferred_writes;
            stats.cloned += s.cloned;
        }
        let left: u64 = caps.iter().map(|c| c.left()).sum();
        drop(caps);
        r.captures.clear();
        let abort = |why: String| {
            self.give_back(&kept);
            SnapshotError::Aborted {
                name: name.to_string(),
                why,
            }
        };
        if let Some(why) = failure.why() {
            return Err(abort(why));
        }
        if left != 0 {
            return Err(abort(format!("{left} block(s) were never captured")));
        }
        // The capture read the volumes through the page cache, and after the commit the
        // tracker calls those blocks clean. A power cut before the kernel wrote them back
        // would bring the older blocks back under bits that say clean, with a stamp that says
        // unchanged (our own fsyncs of the store made the new mtime durable): a silent miss
        // that the next snapshot would copy from this one. So the volumes' content at the
        // barrier is made durable before the snapshot commits (tests/powercut.rs).
        for (id, path, _, _) in &r.plans {
            if r.dropped.contains(id) {
                continue;
            }
            if let Some(p) = prepared.get(id) {
                if let Err(e) = sys::fsync(p.source.as_raw_fd(), true) {
                    return Err(abort(format!("fdatasync {path}: {e}")));
                }
            }
        }
        let Ok(mut writer) = Arc::try_unwrap(writer) else {
            return Err(abort("the store writer is still in use".into()));
        };
        writer.set_created_ns(r.created_ns);
        let manifest = match writer.commit() {
            Ok(m) => m,
            Err(e) => return Err(abort(format!("committing: {e}"))),
        };
        if stats.cloned > 0 {
            capture::hash_in_background(&self.store);
        }
        if let Err(e) = self.tracker.commit(&kept, (name, r.created_ns)) {
            // The snapshot is committed. The saved state still says the bits are pending; if
            // the daemon died before the next save, the next snapshot would rescan them.
            warn!("snapshot {name}: saving the tracking state after the commit: {e}");
        }
        let report = self.report(&manifest, &r, stats, asked.elapsed());
        info!(
            "snapshot {name} of group {group}: {} volume(s), {} bytes stored ({} blocks by reflink), barrier {} us, capture {} ms",
            report.volumes.len(),
            report.stored_bytes,
            stats.cloned,
            report.barrier_us,
            report.capture_ms
        );
        Ok(Some(report))
    }

    /// Merge taken dirty bits back into the live maps (best effort: a failed save is logged;
    /// the bits are back in memory either way).
    fn give_back(&self, taken: &[Taken]) {
        if taken.is_empty() {
            return;
        }
        if let Err(e) = self.tracker.abort(taken) {
            warn!("saving the tracking state after giving back a snapshot's changes: {e}");
        }
    }

    /// The barrier's work, with the group's write gates closed and its dirty bits taken:
    /// record the namespace, plan each volume from what was taken, register its capture.
    /// Copies no data: the time here grows with the number of files and partitions, not with
    /// the bytes in them.
    #[allow(clippy::too_many_arguments)]
    fn at_instant(
        &self,
        vols: &[Arc<Volume>],
        taken: &[Taken],
        prepared: &mut HashMap<VolumeId, Prepared>,
        sel: &Selection,
        parent: Option<&Manifest>,
        (policy, full): (&PolicyConfig, bool),
        writer: &Arc<SnapshotWriter>,
        failure: &Arc<Failure>,
    ) -> AtInstant {
        let mut r = AtInstant {
            created_ns: now_ns(),
            ..AtInstant::default()
        };
        let tree = match group::walk(&self.root, self.store_key, sel) {
            Ok(t) => t,
            Err(source) => {
                r.error = Some(SnapshotError::Io {
                    what: "walking the backing dir at the barrier".into(),
                    source,
                });
                return r;
            }
        };
        // A file of the group that the walk missed, or whose volume the tracker dropped and
        // made anew since (so its gate is not among the closed ones): not at this instant.
        let gated: HashSet<VolumeId> = vols.iter().map(|v| v.id).collect();
        if tree
            .volumes
            .keys()
            .any(|id| !prepared.contains_key(id) || !gated.contains(id))
        {
            r.retry = true;
            return r;
        }
        for e in tree.namespace {
            writer.add_namespace_entry(e);
        }
        let geometry = self.tracker.geometry();
        for (v, t) in vols.iter().zip(taken) {
            let (Some(entry), Some(prep)) = (tree.volumes.get(&v.id), prepared.get_mut(&v.id))
            else {
                // Not found by the walk: left out only if it was unlinked; a file still linked
                // somewhere was renamed during the walk (or out of the group): walk again.
                let linked = prepared
                    .get(&v.id)
                    .and_then(|p| sys::fstat(p.source.as_raw_fd()).ok())
                    .is_none_or(|st| st.st_nlink > 0);
                if linked {
                    r.retry = true;
                    return r;
                }
                r.dropped.insert(v.id);
                continue;
            };
            let size = entry.stat.st_size as u64;
            let (map, base_ok) = (&prep.map, self.base_is(v, parent));
            let plan = plan(t, size, geometry, map, base_ok, parent, policy, full);
            if plan.iter().any(|d| d.rescan) && prep.parent_hashes.is_none() {
                // Tracking was lost between the walk and the barrier (rare): read the
                // parent's hashes now.
                if let Some(p) = parent {
                    match p
                        .checked_name()
                        .and_then(|n| self.store.block_hashes(&n, v.id))
                    {
                        Ok(h) => prep.parent_hashes = Some(h),
                        Err(e) => {
                            r.error = Some(e.into());
                            return r;
                        }
                    }
                }
            }
            let meta = VolumeMeta {
                id: v.id,
                path: entry.path.clone(),
                size,
                mode: entry.stat.st_mode,
                uid: entry.stat.st_uid,
                gid: entry.stat.st_gid,
                mtime_ns: group::mtime_ns(&entry.stat),
            };
            let handle = match writer.add_volume(meta) {
                Ok(h) => h,
                Err(e) => {
                    r.error = Some(e.into());
                    return r;
                }
            };
            // What tells this file from a later one reusing its inode number (`diff` renames).
            if let Ok(i) = sys::file_identity(prep.source.as_raw_fd()) {
                let birth = i
                    .btime
                    .map(|(s, ns)| s as i128 * 1_000_000_000 + ns as i128);
                let _ = writer.set_identity(handle, i.generation, birth);
            }
            for d in &plan {
                let kind = match d.kind {
                    Kind::Full => PartitionKind::Full,
                    Kind::Incremental => PartitionKind::Incremental,
                };
                if let Err(e) = writer.set_partition(handle, d.partition, kind, &d.reason) {
                    r.error = Some(e.into());
                    return r;
                }
            }
            let source = match prep.source.try_clone() {
                Ok(f) => f,
                Err(source) => {
                    r.error = Some(SnapshotError::Io {
                        what: format!("duplicating the fd of {}", entry.path),
                        source,
                    });
                    return r;
                }
            };
            let cap = Arc::new(Capture::new(CaptureSpec {
                path: entry.path.clone(),
                source,
                size,
                geometry,
                pending: pending_blocks(t, size, geometry, &plan, prep.data.as_deref()),
                actions: plan
                    .iter()
                    .map(|d| match (d.kind, d.rescan) {
                        (Kind::Full, _) => BlockAction::Full,
                        (Kind::Incremental, true) => BlockAction::Rescan,
                        (Kind::Incremental, false) => BlockAction::Store,
                    })
                    .collect(),
                parent_hashes: prep.parent_hashes.take().unwrap_or_default(),
                writer: writer.clone(),
                handle,
                failure: failure.clone(),
                volume: v.clone(),
                deferred: prep.deferred.take(),
            }));
            v.set_capture(Some(cap.clone()));
            r.captures.push((v.clone(), cap));
            r.plans.push((v.id, entry.path.clone(), size, plan));
        }
        r
    }

    fn report(
        &self,
        m: &Manifest,
        r: &AtInstant,
        stats: CaptureStats,
        elapsed: Duration,
    ) -> CreateReport {
        let mut volumes: Vec<VolumeReport> = r
            .plans
            .iter()
            .map(|(id, path, size, plan)| VolumeReport {
                path: path.clone(),
                size: *size,
                kind: policy::volume_kind(plan).to_string(),
                stored_bytes: m.volume(*id).map_or(0, |v| v.stored_bytes),
                estimated_bytes: None,
                partitions: plan.iter().map(partition_report).collect(),
            })
            .collect();
        volumes.sort_by(|a, b| a.path.cmp(&b.path));
        CreateReport {
            name: m.name.clone(),
            group: m.group.clone(),
            parent: m.parent.clone(),
            dry_run: false,
            created_ns: m.created_ns,
            barrier_us: r.pause.as_micros() as u64,
            capture_ms: elapsed.saturating_sub(r.pause).as_millis() as u64,
            stored_bytes: volumes.iter().map(|v| v.stored_bytes).sum(),
            logical_bytes: volumes.iter().map(|v| v.size).sum(),
            volumes,
            blocks_by_writers: stats.by_writers,
            blocks_by_workers: stats.by_workers,
            writes_deferred: stats.deferred_writes,
            blocks_unchanged: stats.unchanged,
            ..CreateReport::default()
        }
    }

    /// The plan from the live change maps, without a barrier, with at most how many bytes
    /// each partition would store (see `plan::estimate`); `full`: every partition FULL.
    fn dry_run(
        &self,
        name: SnapshotName,
        group: String,
        sel: &Selection,
        parent: Option<&Manifest>,
        full: bool,
    ) -> Result<CreateReport> {
        let tree = self.walk_group(&group, sel)?;
        let g = self.tracker.geometry();
        let mut volumes = Vec::new();
        for (id, e) in &tree.volumes {
            let size = e.stat.st_size as u64;
            let v = self.tracker.get(*id);
            let (taken, map) = dry_view(v.as_deref(), *id, g, size);
            let base_ok = v.is_some_and(|v| self.base_is(&v, parent));
            let plan = plan(
                &taken,
                size,
                g,
                &map,
                base_ok,
                parent,
                &self.rules().policy_for(&group),
                full,
            );
            // Where its data lies, on the file the walk found (O_PATH first: a fifo must not block).
            let fd = sys::open_beneath(self.root.as_raw_fd(), &e.path, libc::O_PATH)
                .ok()
                .filter(|fd| {
                    sys::fstat(fd.as_raw_fd())
                        .is_ok_and(|st| (st.st_dev, st.st_ino) == (id.dev, id.ino))
                })
                .and_then(|fd| sys::reopen(fd.as_raw_fd(), libc::O_RDONLY).ok());
            let estimates = estimate(&taken, size, g, &plan, |a, b| {
                sys::data_bytes(fd.as_ref()?.as_raw_fd(), a, b).ok()
            });
            volumes.push(estimated_volume(e.path.clone(), size, &plan, &estimates));
        }
        volumes.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(CreateReport {
            name: name.to_string(),
            group,
            parent: parent.map(|p| p.name.clone()),
            dry_run: true,
            logical_bytes: volumes.iter().map(|v| v.size).sum(),
            estimated_ms: estimate_ms(&volumes, parent),
            estimated_bytes: Some(volumes.iter().filter_map(|v| v.estimated_bytes).sum()),
            volumes,
            ..CreateReport::default()
        })
    }
}

/// The time a capture of `volumes` would take at the throughput the parent's capture had
/// (None without a parent that recorded one, or one that stored too little to measure).
fn estimate_ms(volumes: &[VolumeReport], parent: Option<&Manifest>) -> Option<u64> {
    let p = parent?;
    let ms = p.capture_ms?.max(1);
    let stored: u64 = p.volumes.iter().map(|v| v.stored_bytes).sum();
    if stored < 1 << 20 {
        return None;
    }
    let bytes: u64 = volumes.iter().filter_map(|v| v.estimated_bytes).sum();
    Some((bytes as u128 * ms as u128 / stored as u128) as u64)
}

/// Detach the captures from their volumes and wait for writers inside the gates to leave, so
/// that no writer still holds a capture (and with it the store writer).
fn detach(captures: &[(Arc<Volume>, Arc<Capture>)]) {
    // Parked writes land before the capture goes: after it, nothing would apply them.
    for (_, c) in captures {
        c.finish();
    }
    for (v, _) in captures {
        v.set_capture(None);
    }
    for (v, _) in captures {
        v.drain();
    }
}
