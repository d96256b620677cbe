//! Change tracking: which blocks of which volume changed since the last snapshot, how fast, and
//! how; kept so that no change is ever silently missed, across crashes and restarts too.
//!
//! `Tracker` owns the registry of volumes, the write-intent record and the saved state in
//! `<store>/tracking/`. The overlay calls it on the write path (`before_change` then a `record_*`
//! on the volume, both inside the volume's write gate); the daemon calls `tick` every
//! `tracking.interval` and `shutdown` at unmount. It never touches FUSE and never reads file data.
//!
//! Crash safety (DESIGN.md "Tracking that survives a crash"): the intent record names every
//! partition written since the last save; a start after a crash marks those partitions unknown.
//! A file whose inode, size, mtime or ctime differ from what was saved was changed behind the
//! overlay's back and is marked unknown as a whole.

pub mod bitmap;
pub mod counters;
pub mod intent;
pub mod volume;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::ids::{Geometry, VolumeId};
use crate::sys::{fsync_dir, now_ns, write_durably};
use intent::IntentLog;
pub use volume::{
    any_capture, BeforeChange, ChangeMap, FileStamp, PartitionMap, SavedVolume, Taken, Volume,
};

/// Format version of the saved tracking state.
pub const STATE_FORMAT: u32 = 2;

/// The tracking state as saved in `<store>/tracking/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedState {
    pub format: u32,
    pub geometry: Geometry,
    /// True only when written by a clean unmount.
    pub clean: bool,
    pub saved_at_ns: u64,
    pub interval_ns: u64,
    pub volumes: Vec<SavedVolume>,
}

/// The tracking directory inside a store.
pub fn tracking_dir(store: &Path) -> PathBuf {
    store.join("tracking")
}

/// Read the saved state of a store, if there is one (for offline `status` too).
pub fn load_state(store: &Path) -> io::Result<Option<SavedState>> {
    let path = tracking_dir(store).join("state.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let s: SavedState = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    if s.format != STATE_FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unknown format {}", path.display(), s.format),
        ));
    }
    Ok(Some(s))
}

/// Regular files of a backing dir by inode: their path relative to it and their stat.
pub type VolumeFiles = HashMap<VolumeId, (String, libc::stat)>;

/// Regular files under `backing` (never following a symlink, skipping the store), by inode.
/// Lenient: what cannot be read is left out, as `find` would.
pub fn walk_volumes(backing: &Path, store: &Path) -> VolumeFiles {
    let mut out = HashMap::new();
    let Ok(root) = crate::sys::openat(
        libc::AT_FDCWD,
        &std::ffi::CString::new(backing.as_os_str().as_encoded_bytes()).unwrap_or_default(),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    ) else {
        return out;
    };
    // Followed on purpose: the daemon names its store as /proc/self/fd/N.
    let store_key = std::fs::metadata(store).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    });
    let _ = walk_tree(
        root.as_raw_fd(),
        store_key,
        WalkErrors::Skip,
        |_, _, rel, st| {
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                out.insert(
                    VolumeId {
                        dev: st.st_dev,
                        ino: st.st_ino,
                    },
                    (rel.to_string(), *st),
                );
            }
        },
    );
    out
}

/// What a tree walk does with trouble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkErrors {
    /// Leave out whatever cannot be read.
    Skip,
    /// Skip only names removed during the walk; any other error, and a name that is not
    /// UTF-8, ends the walk with an error.
    Fail,
}

/// Walk the tree under the directory fd `root` through directory fds and `*at` calls, never
/// following a symlink and never entering the directory `skip` ((dev, ino)); call
/// `visit(dir_fd, name, path, stat)` for every entry below the root, `path` relative to it
/// and '/'-separated (subdirectories are visited before their contents).
pub fn walk_tree(
    root: std::os::fd::RawFd,
    skip: Option<(u64, u64)>,
    errors: WalkErrors,
    mut visit: impl FnMut(std::os::fd::RawFd, &std::ffi::CStr, &str, &libc::stat),
) -> io::Result<()> {
    use crate::sys;
    let tolerated = |e: io::Error, also: Option<i32>| -> io::Result<()> {
        let gone =
            e.raw_os_error() == Some(libc::ENOENT) || (also.is_some() && e.raw_os_error() == also);
        if errors == WalkErrors::Skip || gone {
            Ok(())
        } else {
            Err(e)
        }
    };
    let top = sys::reopen(root, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut stack = vec![(top, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let listing = sys::proc_path(dir.as_raw_fd());
        let rd = match std::fs::read_dir(std::ffi::OsStr::from_bytes(listing.as_bytes())) {
            Ok(rd) => rd,
            Err(e) => {
                tolerated(e, None)?;
                continue;
            }
        };
        for e in rd {
            let name = match e {
                Ok(e) => e.file_name(),
                Err(e) => {
                    tolerated(e, None)?;
                    continue;
                }
            };
            if name.to_str().is_none() && errors == WalkErrors::Fail {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{prefix}/{}: the name is not UTF-8, which snapshots cannot record yet; rename it",
                        name.to_string_lossy()
                    ),
                ));
            }
            let Ok(c) = sys::name_cstr(&name) else {
                continue;
            };
            let st = match sys::fstatat(dir.as_raw_fd(), &c) {
                Ok(st) => st,
                Err(e) => {
                    tolerated(e, None)?;
                    continue;
                }
            };
            let rel = if prefix.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{prefix}/{}", name.to_string_lossy())
            };
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                if skip == Some((st.st_dev, st.st_ino)) {
                    continue;
                }
                match sys::openat(
                    dir.as_raw_fd(),
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                ) {
                    Ok(sub) => {
                        visit(dir.as_raw_fd(), &c, &rel, &st);
                        stack.push((sub, rel));
                    }
                    // Removed, or replaced by a non-directory, since its stat.
                    Err(e) => tolerated(e, Some(libc::ENOTDIR))?,
                }
                continue;
            }
            visit(dir.as_raw_fd(), &c, &rel, &st);
        }
    }
    Ok(())
}

/// What `Tracker::open` found about the previous daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The previous daemon did not unmount cleanly.
    pub unclean: bool,
    /// Partitions marked unknown from the intent record.
    pub intent_partitions: usize,
    /// Volumes changed behind the overlay's back, marked unknown as a whole.
    pub changed_behind: Vec<String>,
    /// Saved volumes whose file is gone.
    pub gone: usize,
    /// The saved state or the intent record was damaged and set aside: every volume is unknown.
    pub damaged: bool,
}

/// Move a damaged tracking file out of the way, keeping it for inspection.
fn set_aside(path: &Path, why: &io::Error) {
    let aside = path.with_extension(format!("damaged-{}", now_ns()));
    warn!(
        "{why}; moved to {} and treating every volume as unknown (the next snapshot rescans them)",
        aside.display()
    );
    if let Err(e) = std::fs::rename(path, &aside) {
        warn!("cannot move {} aside: {e}", path.display());
        let _ = std::fs::remove_file(path);
    }
}

/// Volumes as a start finds them: restored from the saved state and the intent record, with
/// the recovery rules applied.
pub struct Restored {
    pub volumes: HashMap<VolumeId, Arc<Volume>>,
    /// Saved volumes whose file was not found.
    pub dormant: Vec<SavedVolume>,
}

/// Apply the recovery rules (DESIGN.md "Tracking that survives a crash") to a saved state, the
/// intent record `left` by the previous daemon and the files of the backing dir now; shared by
/// the daemon's start and the offline `status`.
pub fn restore(
    saved: Option<&SavedState>,
    left: &BTreeSet<(VolumeId, u64)>,
    files: &VolumeFiles,
    geometry: Geometry,
    rec: &mut Recovery,
) -> Restored {
    let mut volumes = HashMap::new();
    let mut dormant = Vec::new();
    let mut renamed: HashMap<VolumeId, VolumeId> = HashMap::new();
    if let Some(s) = saved {
        rec.unclean = !s.clean;
        let same_geometry = s.geometry == geometry;
        if !same_geometry {
            warn!(
                "tracking geometry changed (block {} -> {}, partition {} -> {}): all volumes unknown",
                s.geometry.block_size, geometry.block_size, s.geometry.partition_size, geometry.partition_size
            );
        }
        let intent_vols: BTreeSet<VolumeId> = left.iter().map(|(v, _)| *v).collect();
        // st_dev of a filesystem can change across reboots (device minors, btrfs), so a
        // saved volume is matched by inode number when its exact id is not found.
        let mut by_ino: HashMap<u64, Vec<VolumeId>> = HashMap::new();
        for id in files.keys() {
            by_ino.entry(id.ino).or_default().push(*id);
        }
        for sv in &s.volumes {
            let cur = if files.contains_key(&sv.id) {
                Some(sv.id)
            } else {
                match by_ino.get(&sv.id.ino).map(Vec::as_slice) {
                    Some([only]) => Some(*only),
                    _ => None,
                }
            };
            let Some((cur, (path, st))) = cur.and_then(|c| files.get(&c).map(|f| (c, f))) else {
                // Not found now (a directory unreadable, a file gone): keep the record, so
                // that its history is not silently replaced by a clean one later.
                rec.gone += 1;
                dormant.push(sv.clone());
                continue;
            };
            renamed.insert(sv.id, cur);
            let sv = &SavedVolume {
                id: cur,
                ..sv.clone()
            };
            let v = if same_geometry {
                Volume::restore(geometry, sv)
            } else {
                let v = Volume::new(sv.id, geometry, st.st_size as u64);
                v.mark_unknown_all();
                v
            };
            let now = FileStamp::of(st);
            if now != sv.stamp {
                // Our own writes after the last save explain a changed stamp only for a
                // volume in the intent record, and only within the window the crash can
                // have happened in (two intervals after the last save).
                let window_end = s.saved_at_ns as i128 + 2 * s.interval_ns as i128;
                let in_intent = renamed
                    .iter()
                    .any(|(old, new)| *new == sv.id && intent_vols.contains(old));
                // A shrink changes content from the new end to the old one: our own truncate
                // put all of it in the intent record first. Growth only adds zeros past the old
                // end (what was written there is in the record anyway).
                let (new, old) = (now.size, sv.stamp.size);
                let size_explained = new >= old
                    || (new / geometry.partition_size..=(old - 1) / geometry.partition_size).all(
                        |p| {
                            renamed
                                .iter()
                                .any(|(o, n)| *n == sv.id && left.contains(&(*o, p)))
                        },
                    );
                let explained = rec.unclean
                    && in_intent
                    && size_explained
                    && now.ino == sv.stamp.ino
                    && now.mtime_ns <= window_end
                    && now.ctime_ns <= window_end;
                if !explained {
                    v.mark_unknown_all();
                    rec.changed_behind.push(path.clone());
                }
            }
            // Whatever the difference was, it is accounted for now (unknown partitions or
            // the whole volume): from here on, compare with the file as it is.
            v.adopt_stamp(now);
            volumes.insert(sv.id, Arc::new(v));
        }
    }
    for (id, p) in left {
        let id = renamed.get(id).unwrap_or(id);
        if let Some(v) = volumes.get(id) {
            v.mark_unknown(*p);
            rec.intent_partitions += 1;
        } else if let Some((_, st)) = files.get(id) {
            // Written after the last save and never saved: unknown as a whole.
            let v = Volume::new(*id, geometry, st.st_size as u64);
            v.mark_unknown_all();
            volumes.insert(*id, Arc::new(v));
            rec.intent_partitions += 1;
        }
    }
    Restored { volumes, dormant }
}

/// The change tracker of one mount.
pub struct Tracker {
    geometry: Geometry,
    interval: Duration,
    dir: PathBuf,
    backing: PathBuf,
    store: PathBuf,
    volumes: RwLock<HashMap<VolumeId, Arc<Volume>>>,
    intents: IntentLog,
    last_tick: Mutex<Instant>,
    last_save_ns: AtomicU64,
    published: RwLock<Arc<Vec<ChangeMap>>>,
    /// Serialises ticks and the final save.
    tick_lock: Mutex<()>,
    /// The store has tracking history (or lost it to damage): a file that existed before and
    /// has no record may have changed since the last snapshot, so it starts unknown.
    has_history: bool,
    /// Saved volumes whose file was not found at start; saved again so history is kept.
    dormant: Mutex<Vec<SavedVolume>>,
}

impl Tracker {
    /// Open tracking for `backing` with state in `store`, recovering from whatever the previous
    /// daemon left: a clean state continues exactly; after a crash, the partitions in the intent
    /// record are unknown; files changed behind our back are unknown as a whole.
    pub fn open(
        backing: &Path,
        store: &Path,
        geometry: Geometry,
        interval: Duration,
    ) -> io::Result<(Tracker, Recovery)> {
        let dir = tracking_dir(store);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            // The new directory entry is durable before anything in it is relied on.
            fsync_dir(store)?;
        }
        let mut rec = Recovery::default();
        // A damaged record must not stop the mount: set it aside, say so, and trust nothing.
        let (intents, left) = match IntentLog::open(&dir) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                set_aside(&dir.join("intent.json"), &e);
                rec.damaged = true;
                IntentLog::open(&dir)?
            }
            Err(e) => return Err(e),
        };
        let saved = match load_state(store) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                set_aside(&dir.join("state.json"), &e);
                rec.damaged = true;
                None
            }
            Err(e) => return Err(e),
        };
        let files = walk_volumes(backing, store);
        let Restored { volumes, dormant } =
            restore(saved.as_ref(), &left, &files, geometry, &mut rec);
        // Hold each restored volume's inode from the start, so that a change made behind our
        // back while mounted is seen at the next tick even if the file is never opened.
        if let Ok(root) = crate::sys::openat(
            libc::AT_FDCWD,
            &std::ffi::CString::new(backing.as_os_str().as_encoded_bytes()).unwrap_or_default(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        ) {
            for v in volumes.values() {
                let Some((path, _)) = files.get(&v.id) else {
                    continue;
                };
                v.attach_fd(|| {
                    let fd = crate::sys::open_beneath(root.as_raw_fd(), path, libc::O_PATH).ok()?;
                    let st = crate::sys::fstat(fd.as_raw_fd()).ok()?;
                    (st.st_dev == v.id.dev && st.st_ino == v.id.ino).then_some(fd)
                });
            }
        }
        let t = Tracker {
            geometry,
            interval,
            dir,
            backing: backing.to_path_buf(),
            store: store.to_path_buf(),
            volumes: RwLock::new(volumes),
            intents,
            last_tick: Mutex::new(Instant::now()),
            last_save_ns: AtomicU64::new(0),
            published: RwLock::new(Arc::new(Vec::new())),
            tick_lock: Mutex::new(()),
            has_history: saved.is_some() || rec.damaged,
            dormant: Mutex::new(dormant),
        };
        // Make what recovery found durable before the old intent record goes.
        t.save(false)?;
        t.intents.clear_previous()?;
        t.publish(&files);
        if rec.unclean || !rec.changed_behind.is_empty() {
            info!(
                "tracking recovered: unclean={} intent partitions={} changed behind our back={:?}",
                rec.unclean, rec.intent_partitions, rec.changed_behind
            );
        }
        Ok((t, rec))
    }

    /// Block and partition sizes.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The tick interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The volume of backing inode `id`, created if new: clean if `fresh` (the file was just
    /// created through the overlay) or the store has no history yet, unknown otherwise.
    pub fn volume(&self, id: VolumeId, size: u64, fresh: bool) -> Arc<Volume> {
        if let Some(v) = self
            .volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return v.clone();
        }
        let mut vols = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        vols.entry(id)
            .or_insert_with(|| {
                let v = Volume::new(id, self.geometry, size);
                if !fresh && self.has_history {
                    v.mark_unknown_all();
                }
                // A record kept from an earlier start for this inode is superseded.
                self.dormant
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|d| d.id.ino != id.ino);
                Arc::new(v)
            })
            .clone()
    }

    /// Every tracked volume, as of now.
    fn all_volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The volume of `id`, if tracked.
    pub fn get(&self, id: VolumeId) -> Option<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The file's last link is gone: stop tracking it.
    pub fn forget_volume(&self, id: VolumeId) {
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Make the write intent of `offset..offset+len` durable; call inside the volume's gate,
    /// before the change reaches the backing file.
    pub fn before_change(&self, v: &Volume, offset: u64, len: u64) -> io::Result<()> {
        let epoch = self.intents.epoch();
        v.ensure_intent(offset, len, epoch, |parts| {
            self.intents.record_many(v.id, parts)
        })
    }

    /// Publish the immutable change maps of this tick, with paths. Paths come from a walk of
    /// the backing dir (the overlay tracks inodes, not names): cheap for directories of volumes,
    /// the intended use; a tree of a million small files would make each tick pay for it.
    fn publish(&self, files: &VolumeFiles) {
        let maps = self.change_maps(files);
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(maps);
    }

    /// The change maps published at the last tick (sorted by path).
    pub fn published(&self) -> Arc<Vec<ChangeMap>> {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fresh change maps with paths relative to the backing dir (walks the backing tree).
    pub fn change_maps_with_paths(&self) -> Vec<ChangeMap> {
        self.change_maps(&walk_volumes(&self.backing, &self.store))
    }

    /// Change maps with the paths of an earlier walk of the backing dir.
    fn change_maps(&self, files: &VolumeFiles) -> Vec<ChangeMap> {
        let now = now_ns();
        let vols = self.all_volumes();
        let mut maps: Vec<ChangeMap> = vols
            .iter()
            .map(|v| v.change_map(files.get(&v.id).map(|(p, _)| p.clone()), now))
            .collect();
        maps.sort_by(|a, b| a.path.cmp(&b.path).then(a.volume_id.cmp(&b.volume_id)));
        maps
    }

    /// Save every volume (state.json), durably.
    fn save(&self, clean: bool) -> io::Result<()> {
        let vols = self.all_volumes();
        let mut saved = Vec::with_capacity(vols.len());
        for v in &vols {
            if v.check_stamp() {
                warn!(
                    "volume {} changed behind the overlay's back: marked unknown",
                    v.id
                );
            }
            saved.push(v.saved(None));
        }
        saved.extend(
            self.dormant
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        saved.sort_by_key(|s| s.id);
        let now = now_ns();
        let state = SavedState {
            format: STATE_FORMAT,
            geometry: self.geometry,
            clean,
            saved_at_ns: now,
            interval_ns: self.interval.as_nanos() as u64,
            volumes: saved,
        };
        let bytes = serde_json::to_vec(&state).map_err(io::Error::other)?;
        write_durably(&self.dir.join("state.json"), &bytes)?;
        self.last_save_ns.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// One tracking tick: new intent epoch, drain writers of the old one, update rates, save,
    /// clear the intent records the save covers, publish change maps.
    pub fn tick(&self) -> io::Result<()> {
        let _t = self.tick_lock.lock().unwrap_or_else(|p| p.into_inner());
        // A file whose last link went behind our back: stop tracking it, which also lets go
        // of our fd on it, so its space is freed now and not at unmount. (Open handles through
        // the mount keep their own reference.)
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, v| v.nlink() != Some(0));
        let old = self.intents.epoch();
        let new = self.intents.rotate();
        let vols = self.all_volumes();
        // Partitions written during the epoch being saved stay recorded (lazy clearing): a
        // steady writer does not pay a durable record per partition at every tick. Only the
        // partitions idle for a whole tick are cleared.
        let mut carried = Vec::new();
        for v in &vols {
            carried.extend(v.carry_intents(old, new).into_iter().map(|p| (v.id, p)));
        }
        self.intents.carry(&carried);
        for v in &vols {
            // A writer that saw the old epoch sets its bits before the save below.
            v.drain();
        }
        let dt = {
            let mut last = self.last_tick.lock().unwrap_or_else(|p| p.into_inner());
            let dt = last.elapsed().as_secs_f64();
            *last = Instant::now();
            dt
        };
        for v in &vols {
            v.tick_rates(dt);
        }
        self.save(false)?;
        self.intents.clear_previous()?;
        self.publish(&walk_volumes(&self.backing, &self.store));
        Ok(())
    }

    /// The final save at unmount: everything saved and marked clean, no intent left.
    pub fn shutdown(&self) -> io::Result<()> {
        let _t = self.tick_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.intents.rotate();
        let vols = self.all_volumes();
        for v in &vols {
            v.drain();
        }
        self.save(true)?;
        // Only what the save covered is cleared; a write that slipped in after it (a FUSE
        // worker still running) keeps its record, and the next mount rescans it.
        self.intents.clear_previous()
    }

    /// The snapshot barrier (DESIGN.md "Snapshot protocol" step 2): close the write gates of
    /// `ids` in a fixed order (by id, so two barriers never deadlock), let in-flight writes
    /// drain, take every volume's dirty bits, run `at_instant` with the volumes and what was
    /// taken (the caller records the namespace and registers its capture there), and reopen the
    /// gates. No data is copied inside. A write that returned before this call is in the taken
    /// bits; one that starts after it is in the live map. The taken bits are saved as pending
    /// before this returns, so a crash before the snapshot commits gives them back to the live
    /// map at the next start; if that save fails, they are merged back at once and the error
    /// returned (with what `at_instant` returned, so the caller can undo its part).
    pub fn barrier<R>(
        &self,
        ids: &[VolumeId],
        at_instant: impl FnOnce(&[Arc<Volume>], &[Taken]) -> R,
    ) -> Result<(R, Vec<Taken>), (R, io::Error)> {
        let mut vols: Vec<Arc<Volume>> = {
            let map = self.volumes.read().unwrap_or_else(|p| p.into_inner());
            ids.iter().filter_map(|id| map.get(id).cloned()).collect()
        };
        vols.sort_by_key(|v| v.id);
        vols.dedup_by_key(|v| v.id);
        let taken;
        let r;
        {
            let _gates: Vec<_> = vols.iter().map(|v| v.close_gate()).collect();
            taken = vols
                .iter()
                .map(|v| v.take_for_snapshot())
                .collect::<Vec<_>>();
            r = at_instant(&vols, &taken);
        }
        let saved = {
            let _t = self.tick_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.save(false)
        };
        match saved {
            Ok(()) => Ok((r, taken)),
            Err(e) => {
                // Best effort: the live maps get the bits back even if this save fails too.
                let _ = self.abort(&taken);
                Err((r, e))
            }
        }
    }

    /// The snapshot of `taken` committed as `snapshot` (name, created_ns): its bits stop being
    /// pending, and the volumes' dirty bits are relative to it from now on.
    pub fn commit(&self, taken: &[Taken], snapshot: (&str, u64)) -> io::Result<()> {
        for t in taken {
            if let Some(v) = self.get(t.id) {
                v.commit_taken(t, (snapshot.0.to_string(), snapshot.1));
            }
        }
        let _t = self.tick_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.save(false)
    }

    /// The snapshot of `taken` failed: merge everything back into the live maps.
    pub fn abort(&self, taken: &[Taken]) -> io::Result<()> {
        for t in taken {
            if let Some(v) = self.get(t.id) {
                let _gate = v.close_gate();
                v.abort_taken(t);
            }
        }
        let _t = self.tick_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.save(false)
    }

    /// Intent records not yet covered by a save.
    pub fn pending_intents(&self) -> BTreeSet<(VolumeId, u64)> {
        self.intents.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 4096,
        partition_size: 65536,
    };

    #[test]
    fn a_damaged_state_is_set_aside_and_nothing_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("b");
        let store = backing.join(".grainfs");
        std::fs::create_dir_all(tracking_dir(&store)).unwrap();
        std::fs::write(tracking_dir(&store).join("state.json"), b"{ not json").unwrap();
        let (t, rec) = Tracker::open(&backing, &store, G, Duration::from_secs(10)).unwrap();
        assert!(rec.damaged);
        let v = t.volume(VolumeId { dev: 1, ino: 2 }, 0, false);
        assert!(v.change_map(None, 0).unknown_all);
        let aside: Vec<_> = std::fs::read_dir(tracking_dir(&store))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("damaged"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    #[test]
    fn saved_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let old = unsafe { libc::umask(0) };
        let p = tmp.path().join("x.json");
        let r = write_durably(&p, b"{}");
        unsafe { libc::umask(old) };
        r.unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    fn stat_of(path: &Path) -> libc::stat {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        crate::sys::fstatat(libc::AT_FDCWD, &c).unwrap()
    }

    #[test]
    fn after_a_crash_an_unrecorded_shrink_is_not_explained_by_our_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("v.img");
        std::fs::write(&f, vec![1u8; 4 * 65536]).unwrap();
        let st = stat_of(&f);
        let id = VolumeId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let v = Volume::new(id, G, 4 * 65536);
        v.adopt_stamp(FileStamp::of(&st));
        let state = SavedState {
            format: STATE_FORMAT,
            geometry: G,
            clean: false,
            saved_at_ns: now_ns(),
            interval_ns: 10_000_000_000,
            volumes: vec![v.saved(None)],
        };
        // The daemon wrote partition 0 after its last save, then died; the file was then cut
        // to one partition by someone else.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(65536)
            .unwrap();
        let st = stat_of(&f);
        let files: HashMap<_, _> = [(id, ("v.img".to_string(), st))].into_iter().collect();
        let left: BTreeSet<_> = [(id, 0u64)].into_iter().collect();
        let mut rec = Recovery::default();
        let r = restore(Some(&state), &left, &files, G, &mut rec);
        assert!(r.volumes[&id].change_map(None, 0).unknown_all, "{rec:?}");
        // Had the record covered the cut partitions, it would be ours: only those unknown.
        let left: BTreeSet<_> = (0..4).map(|p| (id, p)).collect();
        let mut rec = Recovery::default();
        let r = restore(Some(&state), &left, &files, G, &mut rec);
        let m = r.volumes[&id].change_map(None, 0);
        assert!(
            !m.unknown_all && m.unknown_partitions == vec![0, 1, 2, 3],
            "{m:?}"
        );
    }
}
