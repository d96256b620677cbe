//! Rollback (`grainfs rollback`): the live volumes of a snapshot return to its content, in place,
//! through the running daemon, as `zfs rollback` does for a dataset but per group of files.
//!
//! Under the engine's busy lock: a safety snapshot of the group first (an ordinary snapshot, so
//! retention prunes it), then the plan. Which blocks differ is found without hashing whole
//! volumes: the live content is the tracker's base snapshot plus the blocks dirty since it, so
//! the blocks to write are those whose stored blake3 differs between the base and the target,
//! plus the dirty ones; partitions the tracker lost (unknown) and volumes whose base is not a
//! stored snapshot with them are read and compared block by block. Then, with every volume's
//! write gate held and reads held out (`track::hold`), each differing block is written from the
//! target (read through the store's checked reader), marked dirty (it now differs from the
//! base, so the next incremental snapshot copies it), fdatasynced; the gates reopen and the
//! kernel's cached pages of each file are dropped (`Engine::set_invalidate`: after the gates,
//! since dropping pages waits for reads in flight, which may wait for a gate). Files, dirs and
//! symlinks the snapshot has and the live tree lacks come back; newer files stay unless pruned.
//!
//! A cancel is honoured up to the first write; from there the rollback of the planned blocks
//! completes. It never writes a block it did not plan, never writes outside the write gate of
//! a tracked volume, and never changes the store except by the safety snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::group::{self, Selection, ALL};
use super::{job, CreateRequest, Engine, Job, Result, SnapshotError};
use crate::ids::{Geometry, SnapshotName, VolumeId};
use crate::store::{EntryKind, Manifest, NamespaceEntry, StoreError, VolumeEntry, VolumeReader};
use crate::sys::{self, now_ns, utc_stamp};
use crate::track::Volume;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;

/// What the kernel must forget after a rollback.
#[derive(Clone, Debug)]
pub enum Invalidate {
    /// Attributes and cached pages of the backing inode (dev, ino).
    Content { dev: u64, ino: u64 },
    /// The entry `name` in the backing directory (dev, ino): it was created or removed.
    Entry { dev: u64, ino: u64, name: OsString },
}

/// The engine's hook that drops the kernel's caches (see `Engine::set_invalidate`).
pub type InvalidateFn = dyn Fn(&Invalidate) + Send + Sync;

/// `grainfs rollback`, as sent to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub name: SnapshotName,
    /// Only the volumes (and entries) under these paths, relative to the backing dir; empty:
    /// every volume of the snapshot.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Take no safety snapshot first.
    #[serde(default)]
    pub no_safety_snapshot: bool,
    /// Remove the group's files (and symlinks, and then empty dirs) the snapshot lacks.
    #[serde(default)]
    pub prune: bool,
}

/// One volume rolled back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolledBackVolume {
    pub path: String,
    pub old_size: u64,
    pub new_size: u64,
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// How the differing blocks were found: `tracked since <snapshot>`, or `rescanned`
    /// (partly, with unknown partitions).
    pub compared: String,
    /// Blocks read and hashed because tracking could not tell.
    pub blocks_rescanned: u64,
}

/// What a rollback did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RollbackReport {
    pub name: String,
    pub group: String,
    /// The snapshot of the state before the rollback (None with --no-safety-snapshot).
    pub safety_snapshot: Option<String>,
    pub volumes: Vec<RolledBackVolume>,
    /// Files, dirs and symlinks the live tree lacked, created from the snapshot.
    pub restored: Vec<String>,
    /// Files, symlinks and dirs the snapshot lacks, removed (--prune).
    pub removed: Vec<String>,
    /// Files the snapshot lacks, kept (no --prune).
    pub kept: Vec<String>,
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// How long writers and readers of the volumes waited for the write phase.
    pub held_ms: u64,
    pub elapsed_ms: u64,
    /// Anything worth saying (a safety snapshot left out, an owner not restored).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A live volume to roll back, as planned before the gates close.
struct LiveVolume {
    entry: VolumeEntry,
    volume: Arc<Volume>,
    file: OwnedFd,
    reader: VolumeReader,
    /// Blocks whose blake3 differs between the tracker's base and the target (None: no usable
    /// base; every block is compared by reading it).
    differ: Option<(String, BTreeSet<u64>)>,
    target_hashes: HashMap<u64, Option<[u8; 32]>>,
}

/// Notes a volume's ctime as the overlay's own when dropped: after a rollback changed it, on
/// every way out (a failure part way included), so it is never taken for a change behind the
/// overlay's back (which would cost the next snapshot a rescan of the whole volume).
struct Touched<'a>(&'a Volume);

impl Drop for Touched<'_> {
    fn drop(&mut self) {
        self.0.touch();
    }
}

/// The blocks to write to one volume, found with its gate closed.
struct Plan {
    blocks: Vec<u64>,
    bytes: u64,
    compared: String,
    rescanned: u64,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// Whether `path` is selected by `paths` (empty: everything; a dir selects what is under it).
fn under(path: &str, paths: &[String]) -> bool {
    paths.is_empty()
        || paths.iter().any(|p| {
            let p = p.trim_matches('/');
            p.is_empty() || p == "." || path == p || path.starts_with(&format!("{p}/"))
        })
}

/// Same content, as two stored block hashes say (absent: zeros; Some(None): unknown).
fn same(a: Option<&Option<[u8; 32]>>, b: Option<&Option<[u8; 32]>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(Some(x)), Some(Some(y))) => x == y,
        _ => false,
    }
}

/// Whether live block `data` equals the target's block `b` (the rule of a capture's rescan).
fn same_as_target(hashes: &HashMap<u64, Option<[u8; 32]>>, b: u64, data: &[u8]) -> bool {
    let zero = data.iter().all(|&x| x == 0);
    match hashes.get(&b) {
        None => zero,
        Some(None) => false,
        Some(Some(h)) => !zero && blake3::hash(data).as_bytes() == h,
    }
}

/// Read `buf.len()` bytes at `offset` (zeros past the end of the file).
fn read_full(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match sys::pread(fd.as_raw_fd(), &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn cstr(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// (parent, name) of a relative path.
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn timespec(ns: i128) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

impl Engine {
    /// Set what drops the kernel's caches of files a rollback changed (the daemon, once
    /// mounted). Called without any lock a FUSE request may wait for.
    pub fn set_invalidate(&self, f: Arc<InvalidateFn>) {
        *self.invalidate.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn invalidate(&self, what: &Invalidate) {
        let f = self
            .invalidate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            f(what);
        }
    }

    /// Tell the kernel the entry `path` (relative to the backing dir) changed.
    fn invalidate_entry(&self, path: &str) {
        let (parent, name) = split(path);
        let dir = if parent.is_empty() {
            sys::fstat(self.root.as_raw_fd())
        } else {
            sys::open_beneath(self.root.as_raw_fd(), parent, libc::O_PATH)
                .and_then(|fd| sys::fstat(fd.as_raw_fd()))
        };
        if let Ok(st) = dir {
            self.invalidate(&Invalidate::Entry {
                dev: st.st_dev,
                ino: st.st_ino,
                name: name.into(),
            });
        }
    }

    /// Roll the live volumes of snapshot `req.name` back to its content (see the module doc).
    pub fn rollback_with(&self, req: &RollbackRequest, job: &Job) -> Result<RollbackReport> {
        let started = Instant::now();
        let _busy = self.lock_busy(false)?;
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(SnapshotError::Request("the daemon is stopping".into()));
        }
        // Dirty pages the kernel holds for the mount (shared mappings, writeback cache) must
        // reach the volumes now: landing after the rollback, they would undo part of it.
        (self.flush)();
        let target = self.store.manifest(&req.name)?;
        let geometry = self.tracker.geometry();
        if target.geometry != geometry {
            return Err(SnapshotError::Request(format!(
                "snapshot {} was taken with block size {} and partition size {}, the mount tracks {} and {}: a rollback cannot compare them; copy its files out with grainfs restore",
                target.name,
                target.geometry.block_size,
                target.geometry.partition_size,
                geometry.block_size,
                geometry.partition_size
            )));
        }
        let vols: Vec<&VolumeEntry> = target
            .volumes
            .iter()
            .filter(|v| under(&v.path, &req.paths))
            .collect();
        let ns: Vec<&NamespaceEntry> = target
            .namespace
            .iter()
            .filter(|e| !e.path.is_empty() && under(&e.path, &req.paths))
            .collect();
        if !req.paths.is_empty() && vols.is_empty() && ns.is_empty() {
            return Err(SnapshotError::Request(format!(
                "snapshot {} has nothing under {}",
                target.name,
                req.paths.join(", ")
            )));
        }
        let mut report = RollbackReport {
            name: target.name.clone(),
            group: target.group.clone(),
            ..RollbackReport::default()
        };
        let sel = self.group_selection(&target)?;
        if !req.no_safety_snapshot {
            report.safety_snapshot = self.safety_snapshot(&target, &sel, job, &mut report.notes)?;
        }
        let cancelled = |report: &RollbackReport| {
            SnapshotError::Request(format!(
                "rollback to {} {}: nothing was changed{}",
                target.name,
                job::CANCELLED,
                match &report.safety_snapshot {
                    Some(s) => format!("; the safety snapshot {s} stays"),
                    None => String::new(),
                }
            ))
        };
        if job.cancelled() {
            return Err(cancelled(&report));
        }
        // Plan what can be planned with writers running: the files, and the blocks whose
        // stored hashes differ (snapshots never change).
        let mut live = Vec::new();
        let mut missing = Vec::new();
        for e in &vols {
            match self.plan_volume(&target, e)? {
                Some(l) => live.push(l),
                None => missing.push((*e).clone()),
            }
        }
        live.sort_by_key(|l| l.volume.id);
        if let Some(w) = live.windows(2).find(|w| w[0].volume.id == w[1].volume.id) {
            return Err(SnapshotError::Request(format!(
                "{} and {} are now hard links of one file; a rollback cannot give them two contents: remove one, or use grainfs restore",
                w[0].entry.path, w[1].entry.path
            )));
        }
        // Prove the blocks already known to differ (read, blake3-checked) before writers and
        // readers wait: under the hold, their reads find the proofs and do not hash again. A
        // damaged snapshot fails here, with nothing changed.
        let bs = geometry.block_size;
        let mut buf = Vec::new();
        for l in &live {
            let Some((_, differ)) = &l.differ else {
                continue;
            };
            for (i, &b) in differ.iter().enumerate() {
                if i % 256 == 0 && job.cancelled() {
                    return Err(cancelled(&report));
                }
                let off = b * bs;
                if off >= l.entry.size {
                    continue;
                }
                buf.resize(bs.min(l.entry.size - off) as usize, 0);
                l.reader.read_at(&mut buf, off).map_err(|e| {
                    SnapshotError::Request(format!(
                        "rollback to {}: reading block {b} of {} from the snapshot: {e}; nothing was changed",
                        target.name, l.entry.path
                    ))
                })?;
            }
        }
        // The write phase: reads held out, then the gates in id order (as a barrier takes
        // them, so the two never deadlock).
        let held_at = Instant::now();
        let hold = crate::track::hold_reads();
        let gates: Vec<_> = live.iter().map(|l| l.volume.close_gate()).collect();
        let plans = self.final_plans(&live, geometry, job);
        let plans = match plans {
            Ok(p) if !job.cancelled() => p,
            Ok(_) => {
                drop(gates);
                drop(hold);
                return Err(cancelled(&report));
            }
            Err(e) => {
                drop(gates);
                drop(hold);
                return Err(e);
            }
        };
        let total: u64 = plans.iter().map(|p| p.bytes).sum::<u64>()
            + missing.iter().map(|e| e.size).sum::<u64>();
        let mut done = 0u64;
        job.progress("rollback", 0, total);
        let mut failure = None;
        for (l, plan) in live.iter().zip(&plans) {
            match self.apply(l, &plan.blocks, geometry, job, (&mut done, total)) {
                Ok(v) => report.volumes.push(RolledBackVolume {
                    compared: plan.compared.clone(),
                    blocks_rescanned: plan.rescanned,
                    ..v
                }),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(gates);
        drop(hold);
        report.held_ms = held_at.elapsed().as_millis() as u64;
        // Outside every lock a FUSE request could wait for.
        for l in &live {
            self.invalidate(&Invalidate::Content {
                dev: l.volume.id.dev,
                ino: l.volume.id.ino,
            });
        }
        if let Some(e) = failure {
            return Err(SnapshotError::Request(format!(
                "rollback to {} failed part way: {e}. The blocks written are tracked; {}",
                target.name,
                match &report.safety_snapshot {
                    Some(s) => format!("the safety snapshot {s} holds the state before"),
                    None => "no safety snapshot was taken".into(),
                }
            )));
        }
        let after_blocks = |e: SnapshotError, report: &RollbackReport| {
            SnapshotError::Request(format!(
                "rollback to {}: the volumes were rolled back ({} block(s) written), but restoring the tree failed: {e}; {}",
                target.name,
                report.volumes.iter().map(|v| v.blocks_written).sum::<u64>(),
                match &report.safety_snapshot {
                    Some(s) => format!("the safety snapshot {s} holds the state before"),
                    None => "no safety snapshot was taken".into(),
                }
            ))
        };
        if let Err(e) =
            self.restore_namespace(&target, &ns, &missing, job, (&mut done, total), &mut report)
        {
            return Err(after_blocks(e, &report));
        }
        if let Err(e) = self.new_entries(&target, &sel, req, &mut report) {
            return Err(after_blocks(e, &report));
        }
        job.progress("rollback", total, total);
        report.blocks_written = report.volumes.iter().map(|v| v.blocks_written).sum();
        report.bytes_written = report.volumes.iter().map(|v| v.bytes_written).sum();
        report.volumes.sort_by(|a, b| a.path.cmp(&b.path));
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        info!(
            "rollback to {}: {} volume(s), {} block(s) written, {} restored, {} removed, writers held {} ms (safety snapshot {})",
            target.name,
            report.volumes.len(),
            report.blocks_written,
            report.restored.len(),
            report.removed.len(),
            report.held_ms,
            report.safety_snapshot.as_deref().unwrap_or("none")
        );
        Ok(report)
    }

    /// What the snapshot's group selects now: its config group, `all`, or (a group of globs
    /// or one gone from the config) the snapshot's own files.
    fn group_selection(&self, target: &Manifest) -> Result<Selection> {
        let asked = CreateRequest {
            group: Some(target.group.clone()),
            ..CreateRequest::default()
        };
        if target.group != "paths" {
            if let Ok((_, sel)) = self.resolve(&asked) {
                return Ok(sel);
            }
        }
        Selection::globs(&self.own_globs(target)).map_err(SnapshotError::Request)
    }

    fn own_globs(&self, target: &Manifest) -> Vec<String> {
        target
            .volumes
            .iter()
            .map(|v| glob::Pattern::escape(&v.path))
            .collect()
    }

    /// Take the safety snapshot of the target's group (None when the group has no file now).
    fn safety_snapshot(
        &self,
        target: &Manifest,
        sel: &Selection,
        job: &Job,
        notes: &mut Vec<String>,
    ) -> Result<Option<String>> {
        let tree = group::walk(&self.root, self.store_key, sel)
            .map_err(io_err("walking the backing dir".into()))?;
        if tree.volumes.is_empty() {
            notes.push("no safety snapshot: the group has no file now".into());
            return Ok(None);
        }
        let stamp = utc_stamp(now_ns() / 1_000_000_000);
        let suffix = format!("-pre-rollback-{stamp}");
        let keep = crate::ids::MAX_SNAPSHOT_NAME.saturating_sub(suffix.len() + 4);
        let base: String = target.name.chars().take(keep).collect();
        let mut name = SnapshotName::parse(&format!("{base}{suffix}")).map_err(StoreError::from)?;
        let mut i = 2;
        while self.store.exists(&name)? {
            name = SnapshotName::parse(&format!("{base}{suffix}-{i}")).map_err(StoreError::from)?;
            i += 1;
        }
        let known = target.group != "paths"
            && self
                .resolve(&CreateRequest {
                    group: Some(target.group.clone()),
                    ..CreateRequest::default()
                })
                .is_ok();
        // The group as configured now may no longer select every file the rollback writes
        // (its globs changed since): then the safety snapshot takes the group's globs and the
        // snapshot's files, so that nothing is overwritten that it does not hold.
        let covered = target.volumes.iter().all(|v| sel.matches(&v.path));
        let paths = match (known, covered) {
            (true, true) => Vec::new(),
            (true, false) => {
                let rules = self.rules();
                let mut globs: Vec<String> = rules
                    .groups
                    .iter()
                    .find(|g| g.name == target.group)
                    .map(|g| g.volumes.clone())
                    .unwrap_or_default();
                globs.extend(self.own_globs(target));
                notes.push(format!(
                    "group {} no longer selects every file of {}: the safety snapshot is of the group's globs and the snapshot's files",
                    target.group, target.name
                ));
                globs
            }
            (false, _) => self.own_globs(target),
        };
        let req = CreateRequest {
            group: (known && covered).then(|| target.group.clone()),
            paths,
            name: Some(name),
            ..CreateRequest::default()
        };
        match self.create_locked(&req, job) {
            Ok(r) => Ok(Some(r.name)),
            Err(e) if job.cancelled() => Err(SnapshotError::Request(format!(
                "rollback to {} {}: nothing was changed and no safety snapshot was kept ({e})",
                target.name,
                job::CANCELLED
            ))),
            Err(e) => Err(SnapshotError::Request(format!(
                "the safety snapshot before the rollback to {} failed, so nothing was changed: {e}",
                target.name
            ))),
        }
    }

    /// The live file of volume `e`, readied (None: no file at its path; it is restored).
    fn plan_volume(&self, target: &Manifest, e: &VolumeEntry) -> Result<Option<LiveVolume>> {
        let path_fd = match sys::open_beneath(self.root.as_raw_fd(), &e.path, libc::O_PATH) {
            Ok(fd) => fd,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                return Err(SnapshotError::Request(format!(
                    "{} is now a symlink (or under one); move it away first, or copy the snapshot's file out with grainfs restore",
                    e.path
                )))
            }
            Err(source) => return Err(io_err(format!("opening {}", e.path))(source)),
        };
        let st = sys::fstat(path_fd.as_raw_fd()).map_err(io_err(format!("stat {}", e.path)))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(SnapshotError::Request(format!(
                "{} is no longer a regular file; move it away first, or copy the snapshot's file out with grainfs restore",
                e.path
            )));
        }
        let file = sys::reopen(path_fd.as_raw_fd(), libc::O_RDWR)
            .map_err(io_err(format!("opening {} for writing", e.path)))?;
        let id = VolumeId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let volume = self.tracker.volume(id, st.st_size as u64, false);
        volume.attach_fd(|| Some(path_fd));
        volume.first_stamp(&st);
        if volume.check_stamp() {
            warn!("{} changed behind the overlay's back: rescanned", e.path);
        }
        let name = target.checked_name()?;
        let target_hashes = self.store.block_hashes(&name, e.id)?;
        let nblocks = target.geometry.blocks(e.size);
        let differ = match self.base_of(&volume) {
            Some(base) => {
                let bname = base.checked_name()?;
                let base_hashes = self.store.block_hashes(&bname, id)?;
                let blocks: BTreeSet<u64> = base_hashes
                    .keys()
                    .chain(target_hashes.keys())
                    .copied()
                    .filter(|&b| b < nblocks && !same(base_hashes.get(&b), target_hashes.get(&b)))
                    .collect();
                Some((base.name, blocks))
            }
            None => None,
        };
        let reader = self.store.read_volume(target.clone(), e.id)?;
        Ok(Some(LiveVolume {
            entry: e.clone(),
            volume,
            file,
            reader,
            differ,
            target_hashes,
        }))
    }

    /// The stored snapshot the volume's dirty bits are relative to, if it holds the volume.
    fn base_of(&self, v: &Volume) -> Option<Manifest> {
        let (name, created) = v.base()?;
        let name = SnapshotName::parse(&name).ok()?;
        let m = self.store.manifest(&name).ok()?;
        (m.created_ns == created
            && m.geometry == self.tracker.geometry()
            && m.volume(v.id).is_some())
        .then_some(m)
    }

    /// With the gates closed: the blocks to write per volume, and their bytes. Dirty bits and
    /// unknowns are read now, so no write slips between the plan and the writes.
    fn final_plans(&self, live: &[LiveVolume], g: Geometry, job: &Job) -> Result<Vec<Plan>> {
        let bs = g.block_size;
        let mut out = Vec::with_capacity(live.len());
        let mut buf = vec![0u8; bs as usize];
        for l in live {
            // A change behind our back since the plan: the volume becomes unknown.
            l.volume.check_stamp_before_change();
            let size = l.entry.size;
            let nblocks = g.blocks(size);
            let (unknown_all, unknown) = l.volume.unknowns();
            let mut blocks = BTreeSet::new();
            let mut rescan: Box<dyn Iterator<Item = u64>> = match &l.differ {
                Some((_, differ)) if !unknown_all => {
                    blocks.extend(differ.iter().copied());
                    let words = l.volume.dirty_words();
                    for (w, word) in words.iter().enumerate() {
                        let mut bits = *word;
                        while bits != 0 {
                            let b = w as u64 * 64 + bits.trailing_zeros() as u64;
                            bits &= bits - 1;
                            if b < nblocks {
                                blocks.insert(b);
                            }
                        }
                    }
                    let bpp = g.blocks_per_partition();
                    Box::new(
                        unknown
                            .into_iter()
                            .flat_map(move |p| (p * bpp)..((p + 1) * bpp))
                            .filter(move |&b| b < nblocks),
                    )
                }
                _ => Box::new(0..nblocks),
            };
            let mut rescanned = 0u64;
            for b in rescan.by_ref() {
                if blocks.contains(&b) {
                    continue;
                }
                if rescanned.is_multiple_of(256) && job.cancelled() {
                    return Ok(Vec::new());
                }
                let off = b * bs;
                let len = bs.min(size - off) as usize;
                read_full(&l.file, &mut buf[..len], off)
                    .map_err(io_err(format!("reading {} block {b}", l.entry.path)))?;
                rescanned += 1;
                if !same_as_target(&l.target_hashes, b, &buf[..len]) {
                    blocks.insert(b);
                }
            }
            let bytes = blocks.iter().map(|b| bs.min(size - b * bs)).sum();
            let compared = match (&l.differ, unknown_all, rescanned) {
                (Some((base, _)), false, 0) => format!("tracked since {base}"),
                (Some((base, _)), false, _) => {
                    format!("tracked since {base}, unknown partitions rescanned")
                }
                _ => "rescanned".to_string(),
            };
            out.push(Plan {
                blocks: blocks.into_iter().collect(),
                bytes,
                compared,
                rescanned,
            });
        }
        Ok(out)
    }

    /// Write the planned blocks of one volume from the target (gate held by the caller), its
    /// size, mode, owner and mtime; mark what changed, fdatasync.
    fn apply(
        &self,
        l: &LiveVolume,
        blocks: &[u64],
        g: Geometry,
        job: &Job,
        (done, total): (&mut u64, u64),
    ) -> std::result::Result<RolledBackVolume, String> {
        let v = &l.volume;
        let path = &l.entry.path;
        let fd = l.file.as_raw_fd();
        let size = l.entry.size;
        let bs = g.block_size;
        let old = sys::fstat(fd)
            .map_err(|e| format!("stat {path}: {e}"))?
            .st_size as u64;
        let intent = |off: u64, len: u64| {
            self.tracker
                .before_change(v, off, len)
                .map_err(|e| format!("recording the write intent of {path}: {e}"))
        };
        let mut out = RolledBackVolume {
            path: path.clone(),
            old_size: old,
            new_size: size,
            ..RolledBackVolume::default()
        };
        // Every block is read (and checked against its blake3) before the first write: a
        // damaged snapshot fails here, with nothing of this volume written. Nothing is kept:
        // the store's reader remembers what it proved, so the second read below is a read,
        // and memory stays one block whatever the rollback's size.
        let read = |b: u64, buf: &mut Vec<u8>| {
            let off = b * bs;
            buf.resize(bs.min(size - off) as usize, 0);
            let n = l
                .reader
                .read_at(buf, off)
                .map_err(|e| format!("reading block {b} of {path} from the snapshot: {e}"))?;
            buf[n..].fill(0);
            Ok::<(), String>(())
        };
        let mut buf = Vec::new();
        for &b in blocks {
            read(b, &mut buf)?;
        }
        // From the first change on, the ctime moves: whatever happens, it was ours.
        let touched = Touched(v);
        let now = now_ns();
        if old != size {
            let (lo, hi) = (old.min(size), old.max(size));
            intent(lo, hi - lo)?;
            sys::ftruncate(fd, size).map_err(|e| format!("truncating {path}: {e}"))?;
            v.record_truncate(old, size, now);
        }
        for &b in blocks {
            read(b, &mut buf)?;
            let off = b * bs;
            let len = buf.len() as u64;
            intent(off, len)?;
            let zero = buf.iter().all(|&x| x == 0);
            let punched = zero
                && sys::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len).is_ok();
            if punched {
                v.record_zero(off, len, now);
            } else {
                sys::pwrite_all(fd, &buf, off).map_err(|e| format!("writing {path}: {e}"))?;
                v.record_write(off, len, false, now);
            }
            out.blocks_written += 1;
            out.bytes_written += len;
            *done += len;
            job.progress("rollback", *done, total);
        }
        let st = sys::fstat(fd).map_err(|e| format!("stat {path}: {e}"))?;
        let e = &l.entry;
        if sys::geteuid() == 0 && (st.st_uid, st.st_gid) != (e.uid, e.gid) {
            if let Err(err) = sys::fchown_fd(fd, e.uid, e.gid) {
                warn!("rollback: chown {path}: {err}");
            }
        }
        if st.st_mode & 0o7777 != e.mode & 0o7777 || sys::geteuid() == 0 {
            if let Err(err) = sys::chmod_fd(fd, e.mode & 0o7777) {
                warn!("rollback: chmod {path}: {err}");
            }
        }
        let t = timespec(e.mtime_ns);
        if let Err(err) = sys::utimens_fd(
            fd,
            false,
            &[
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                t,
            ],
        ) {
            warn!("rollback: setting the mtime of {path}: {err}");
        }
        sys::fsync(fd, true).map_err(|e| format!("fdatasync {path}: {e}"))?;
        drop(touched);
        Ok(out)
    }

    /// Create what the snapshot has and the live tree lacks: dirs, symlinks, and the files of
    /// `missing` with their data, mode, owner and times.
    fn restore_namespace(
        &self,
        target: &Manifest,
        ns: &[&NamespaceEntry],
        missing: &[VolumeEntry],
        job: &Job,
        (done, total): (&mut u64, u64),
        report: &mut RollbackReport,
    ) -> Result<()> {
        let root = self.root.as_raw_fd();
        let dirs: BTreeMap<&str, &NamespaceEntry> = target
            .namespace
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .map(|e| (e.path.as_str(), e))
            .collect();
        let mut made_dirs: Vec<&NamespaceEntry> = Vec::new();
        // Parents first: sorted paths put a dir before what is in it.
        let mut wanted: Vec<&str> = ns
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .map(|e| e.path.as_str())
            .chain(missing.iter().map(|v| split(&v.path).0))
            .chain(
                ns.iter()
                    .filter(|e| e.kind == EntryKind::Symlink)
                    .map(|e| split(&e.path).0),
            )
            .filter(|p| !p.is_empty())
            .collect();
        wanted.sort();
        wanted.dedup();
        for path in wanted {
            let mut at = String::new();
            for comp in path.split('/') {
                if !at.is_empty() {
                    at.push('/');
                }
                at.push_str(comp);
                match sys::open_beneath(root, &at, libc::O_PATH | libc::O_DIRECTORY) {
                    Ok(_) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(source) => return Err(io_err(format!("opening dir {at}"))(source)),
                }
                let (parent, name) = split(&at);
                let pfd = self.dir_fd(parent)?;
                let mode = dirs.get(at.as_str()).map_or(0o755, |e| e.mode & 0o7777);
                sys::mkdirat(
                    pfd.as_raw_fd(),
                    &cstr(name).map_err(io_err(at.clone()))?,
                    0o700,
                )
                .map_err(io_err(format!("creating dir {at}")))?;
                report.restored.push(at.clone());
                self.invalidate_entry(&at);
                match dirs.get(at.as_str()) {
                    Some(e) => made_dirs.push(e),
                    None => {
                        let fd = self.dir_fd(&at)?;
                        let _ = sys::chmod_fd(fd.as_raw_fd(), mode);
                    }
                }
            }
        }
        for e in ns.iter().filter(|e| e.kind == EntryKind::Symlink) {
            let (parent, name) = split(&e.path);
            let pfd = self.dir_fd(parent)?;
            let cname = cstr(name).map_err(io_err(e.path.clone()))?;
            let want = e.target.as_deref().unwrap_or("");
            let t = cstr(want).map_err(io_err(e.path.clone()))?;
            // A symlink there with the same target stays; another target is replaced in one
            // rename; anything else there now (a file, a dir) is left and said.
            let mut made = cname.clone();
            if let Ok(st) = sys::fstatat(pfd.as_raw_fd(), &cname) {
                if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    report.notes.push(format!(
                        "{} is a symlink in the snapshot and something else now: left as it is",
                        e.path
                    ));
                    continue;
                }
                let now = sys::open_path(pfd.as_raw_fd(), &cname)
                    .and_then(|fd| sys::readlink_fd(fd.as_raw_fd()))
                    .map_err(io_err(format!("reading symlink {}", e.path)))?;
                if now == want.as_bytes() {
                    continue;
                }
                made = cstr(&format!(".grainfs-rollback.{}", std::process::id()))
                    .map_err(io_err(e.path.clone()))?;
                let _ = sys::unlinkat(pfd.as_raw_fd(), &made, 0);
            }
            sys::symlinkat(&t, pfd.as_raw_fd(), &made)
                .map_err(io_err(format!("creating symlink {}", e.path)))?;
            if made != cname {
                sys::renameat2(pfd.as_raw_fd(), &made, pfd.as_raw_fd(), &cname, 0)
                    .map_err(io_err(format!("replacing symlink {}", e.path)))?;
            }
            if let Ok(fd) = sys::open_path(pfd.as_raw_fd(), &cname) {
                if sys::geteuid() == 0 {
                    let _ = sys::fchown_fd(fd.as_raw_fd(), e.uid, e.gid);
                }
                let t = timespec(e.mtime_ns);
                let _ = sys::utimens_fd(fd.as_raw_fd(), true, &[t, t]);
            }
            report.restored.push(e.path.clone());
            self.invalidate_entry(&e.path);
        }
        for v in missing {
            self.restore_file(target, v, job, (done, total))?;
            report.restored.push(v.path.clone());
            self.invalidate_entry(&v.path);
        }
        // Dirs last, deepest first: their mtimes moved while they were filled.
        made_dirs.sort_by(|a, b| b.path.cmp(&a.path));
        for e in made_dirs {
            if let Ok(fd) = self.dir_fd(&e.path) {
                if sys::geteuid() == 0 {
                    let _ = sys::fchown_fd(fd.as_raw_fd(), e.uid, e.gid);
                }
                let _ = sys::chmod_fd(fd.as_raw_fd(), e.mode & 0o7777);
                let t = timespec(e.mtime_ns);
                let _ = sys::utimens_fd(fd.as_raw_fd(), false, &[t, t]);
            }
        }
        report.restored.sort();
        Ok(())
    }

    /// An O_PATH fd on dir `rel` of the backing dir ("" the root).
    fn dir_fd(&self, rel: &str) -> Result<OwnedFd> {
        let rel = if rel.is_empty() { "." } else { rel };
        sys::open_beneath(self.root.as_raw_fd(), rel, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(io_err(format!("opening dir {rel}")))
    }

    /// Create file `v` from the target: its data (holes stay holes), mode, owner, mtime.
    fn restore_file(
        &self,
        target: &Manifest,
        v: &VolumeEntry,
        job: &Job,
        (done, total): (&mut u64, u64),
    ) -> Result<()> {
        let (parent, name) = split(&v.path);
        let pfd = self.dir_fd(parent)?;
        let dfd = sys::reopen(pfd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(io_err(format!("opening dir {parent}")))?;
        let cname = cstr(name).map_err(io_err(v.path.clone()))?;
        let fd = sys::openat(
            dfd.as_raw_fd(),
            &cname,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
        .map_err(io_err(format!("creating {}", v.path)))?;
        let fail = |what: &str, source| SnapshotError::Io {
            what: format!(
                "{what} {} (left partly written: remove it and try again)",
                v.path
            ),
            source,
        };
        sys::ftruncate(fd.as_raw_fd(), v.size).map_err(|e| fail("sizing", e))?;
        let reader = self.store.read_volume(target.clone(), v.id)?;
        let bs = target.geometry.block_size;
        let mut buf = vec![0u8; bs as usize];
        let mut off = 0u64;
        while off < v.size {
            // Only where the snapshot has data: the rest stays a hole.
            let Some(data) = reader.seek_data(off) else {
                break;
            };
            let start = data / bs * bs;
            let len = bs.min(v.size - start) as usize;
            let n = reader.read_at(&mut buf[..len], start)?;
            if buf[..n].iter().any(|&x| x != 0) {
                sys::pwrite_all(fd.as_raw_fd(), &buf[..n], start)
                    .map_err(|e| fail("writing", e))?;
            }
            *done += len as u64;
            job.progress("rollback", *done, total);
            off = start + len as u64;
        }
        if sys::geteuid() == 0 {
            let _ = sys::fchown_fd(fd.as_raw_fd(), v.uid, v.gid);
        }
        let _ = sys::chmod_fd(fd.as_raw_fd(), v.mode & 0o7777);
        let t = timespec(v.mtime_ns);
        let _ = sys::utimens_fd(fd.as_raw_fd(), false, &[t, t]);
        sys::fsync(fd.as_raw_fd(), true).map_err(|e| fail("fdatasync", e))?;
        Ok(())
    }

    /// The group's files and symlinks the snapshot lacks (under the request's paths): kept and
    /// listed, or with `prune` removed, then the dirs the snapshot lacks if empty.
    fn new_entries(
        &self,
        target: &Manifest,
        sel: &Selection,
        req: &RollbackRequest,
        report: &mut RollbackReport,
    ) -> Result<()> {
        let tree = group::walk(&self.root, self.store_key, sel)
            .map_err(io_err("walking the backing dir".into()))?;
        let has: BTreeSet<&str> = target
            .volumes
            .iter()
            .map(|v| v.path.as_str())
            .chain(target.namespace.iter().map(|e| e.path.as_str()))
            .collect();
        let mut files: Vec<String> = tree
            .volumes
            .values()
            .map(|e| e.path.clone())
            .chain(
                tree.namespace
                    .iter()
                    .filter(|e| e.kind == EntryKind::Symlink)
                    .map(|e| e.path.clone()),
            )
            .filter(|p| !has.contains(p.as_str()) && under(p, &req.paths))
            .collect();
        files.sort();
        if !req.prune {
            report.kept = files;
            return Ok(());
        }
        for p in files {
            let (parent, name) = split(&p);
            let dfd = self.dir_fd(parent)?;
            let dfd = sys::reopen(dfd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(io_err(format!("opening dir {parent}")))?;
            let cname = cstr(name).map_err(io_err(p.clone()))?;
            match sys::unlinkat(dfd.as_raw_fd(), &cname, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(source) => return Err(io_err(format!("removing {p}"))(source)),
            }
            self.invalidate_entry(&p);
            report.removed.push(p);
        }
        if target.group == ALL || matches!(sel, Selection::All) {
            let mut dirs: Vec<String> = tree
                .namespace
                .iter()
                .filter(|e| {
                    e.kind == EntryKind::Dir
                        && !e.path.is_empty()
                        && !has.contains(e.path.as_str())
                        && under(&e.path, &req.paths)
                })
                .map(|e| e.path.clone())
                .collect();
            dirs.sort_by(|a, b| b.cmp(a));
            for d in dirs {
                let (parent, name) = split(&d);
                let Ok(dfd) = self.dir_fd(parent) else {
                    continue;
                };
                let Ok(dfd) = sys::reopen(dfd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                else {
                    continue;
                };
                let Ok(cname) = cstr(name) else { continue };
                if sys::unlinkat(dfd.as_raw_fd(), &cname, libc::AT_REMOVEDIR).is_ok() {
                    self.invalidate_entry(&d);
                    report.removed.push(d);
                }
            }
        }
        report.removed.sort();
        Ok(())
    }
}
