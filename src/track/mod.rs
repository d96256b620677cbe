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

//!
//! This file owns the `Tracker`; `state.rs` the saved state and the restore after a restart,
//! `walk.rs` the walk of the backing tree, `volume.rs` one volume.

pub mod bitmap;
pub mod counters;
pub mod hold;
pub mod intent;
mod state;
pub mod volume;
mod walk;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::info;

use crate::ids::{Geometry, VolumeId};
use crate::sys::{fsync_dir, now_ns};
pub use hold::{hold_reads, ReadHold, ReadPass};
use intent::IntentLog;
use state::set_aside;
pub use state::{load_state, restore, tracking_dir, Recovery, Restored, SavedState, STATE_FORMAT};
pub use volume::{
    any_capture, BeforeChange, ChangeMap, FileStamp, PartitionMap, SavedVolume, Taken, Volume,
};
pub use walk::{walk_tree, walk_volumes, VolumeFiles, WalkErrors};

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
        if let Ok(root) = crate::sys::open_dir_path(backing) {
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
    ///
    /// A volume no saved state holds yet (a file created or first opened since the last save:
    /// an untar, a package install) needs none: after a crash it has no record, so the next
    /// start finds it unknown as a whole (`restore`, `volume`), which is what its intents would
    /// have said. That saves two fsyncs and a rewrite of the whole record per new file.
    pub fn before_change(&self, v: &Volume, offset: u64, len: u64) -> io::Result<()> {
        if !v.recorded() {
            return Ok(());
        }
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
