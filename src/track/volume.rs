//! One tracked volume: its dirty bitmap, its partitions' counters and rates, what is unknown
//! about it, and its write gate.
//!
//! A volume is a backing inode (tracking follows the inode: rename keeps it, hard links share
//! it). The write path records into it without allocating; rates and change maps are computed
//! only at a tick. It never does I/O except `fstat` on its own O_PATH fd.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};

use super::bitmap::DirtyBitmap;
use super::counters::{classify, ewma, AccessPattern, CounterValues, PartitionCounters};
use crate::ids::{Geometry, VolumeId};
use crate::sys::realtime_ns;

/// What the daemon last saw of the backing file, to notice changes made behind its back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(st: &libc::stat) -> FileStamp {
        FileStamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        }
    }
}

/// Smoothed rates of one partition, updated at each tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// EWMA of blocks newly dirtied per second.
    pub change_rate: f64,
    /// EWMA of writes per second.
    pub write_rate: f64,
    /// Counter values at the previous tick.
    pub last_dirty: u64,
    pub last_writes: u64,
}

/// A partition's live state.
#[derive(Debug, Default)]
pub struct Partition {
    pub counters: PartitionCounters,
    /// The intent epoch in which this partition's write intent was last persisted.
    pub intent_epoch: AtomicU64,
}

/// What must see a volume's content before it changes: the snapshot engine's copy-before-write
/// capture (DESIGN.md "Write path" step 2). Called inside the volume's write gate, before the
/// change reaches the backing file. It must not fail the change: a capture that cannot copy
/// gives up its snapshot instead.
pub trait BeforeChange: Send + Sync {
    /// `offset..offset+len` (len > 0) of the volume is about to change.
    fn before_change(&self, offset: u64, len: u64);

    /// A plain write of `data` at `offset` is about to happen: take it over if it would have
    /// to wait for copy-before-write. Ok(true): taken; the caller must not write it, the
    /// capture writes it once the blocks under it are saved. Err: the write must fail (no
    /// space for it).
    fn defer_write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<bool> {
        Ok(false)
    }

    /// Wait until every write taken over that overlaps `offset..offset+len` (len 0: the whole
    /// volume) is in the backing file.
    fn settle(&self, _offset: u64, _len: u64) {}

    /// The overlay just changed the volume's file (content or metadata; its ctime moved).
    /// Never called from inside another of these methods.
    fn after_own_change(&self) {}
}

/// Captures attached to any volume of this process: the read path's fast check.
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Whether any volume has a capture attached.
pub fn any_capture() -> bool {
    ATTACHED.load(Ordering::Acquire) != 0
}

/// The capture slot of a volume: empty on the write path's fast path.
#[derive(Default)]
struct CaptureSlot {
    attached: AtomicBool,
    capture: RwLock<Option<Arc<dyn BeforeChange>>>,
}

impl std::fmt::Debug for CaptureSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureSlot")
            .field("attached", &self.attached.load(Ordering::Relaxed))
            .finish()
    }
}

/// What uncommitted snapshot barriers took from a volume (the union of them): saved as if it were
/// still live, so a crash before the commit loses none of it.
#[derive(Debug, Default)]
struct PendingTake {
    bits: Vec<u64>,
    unknown_all: bool,
    unknown: BTreeSet<u64>,
    low_water: Option<u64>,
}

/// One tracked volume.
#[derive(Debug)]
pub struct Volume {
    pub id: VolumeId,
    pub geometry: Geometry,
    bitmap: DirtyBitmap,
    partitions: RwLock<Vec<Partition>>,
    /// Size as last seen by the write path (writes, truncates).
    size: AtomicU64,
    /// Lowest size since the last snapshot: blocks between it and the current size that are
    /// not dirty read as zeros (they were cut off and grown back).
    low_water: AtomicU64,
    unknown_all: AtomicBool,
    unknown: Mutex<BTreeSet<u64>>,
    /// Dirty bits taken by a snapshot barrier whose snapshot is not committed yet: saved with
    /// the state, so a crash before the commit merges them back instead of losing them.
    pending: Mutex<Option<PendingTake>>,
    rates: Mutex<Vec<Rates>>,
    /// Whether anything was written through the overlay since the last tick.
    written_since_tick: AtomicBool,
    stamp: Mutex<FileStamp>,
    /// O_PATH fd on the backing inode (absent for volumes loaded from a saved state until the
    /// file is opened again).
    fd: Mutex<Option<OwnedFd>>,
    /// The write gate (DESIGN.md "Write path"): writers hold it shared from the intent check
    /// until their bits are set; a tick or a snapshot barrier takes it exclusively.
    gate: RwLock<()>,
    /// Serialises `check_stamp_before_change`.
    stamp_check: Mutex<()>,
    /// Wall clock (ns) right after the last change made through the overlay.
    last_own_change_ns: AtomicU64,
    /// A snapshot capture in progress on this volume, if any.
    capture: CaptureSlot,
    /// The committed snapshot the dirty bits are relative to: (name, created_ns).
    base: Mutex<Option<(String, u64)>>,
    /// errno of a taken-over write that failed after it returned (0: none).
    write_error: AtomicI32,
}

impl Volume {
    /// A fresh volume with nothing dirty.
    pub fn new(id: VolumeId, geometry: Geometry, size: u64) -> Volume {
        Volume {
            id,
            geometry,
            bitmap: DirtyBitmap::with_blocks(geometry.blocks(size)),
            partitions: RwLock::new(Vec::new()),
            size: AtomicU64::new(size),
            low_water: AtomicU64::new(size),
            unknown_all: AtomicBool::new(false),
            unknown: Mutex::new(BTreeSet::new()),
            pending: Mutex::new(None),
            rates: Mutex::new(Vec::new()),
            written_since_tick: AtomicBool::new(false),
            stamp: Mutex::new(FileStamp::default()),
            fd: Mutex::new(None),
            gate: RwLock::new(()),
            stamp_check: Mutex::new(()),
            last_own_change_ns: AtomicU64::new(0),
            capture: CaptureSlot::default(),
            base: Mutex::new(None),
            write_error: AtomicI32::new(0),
        }
    }

    /// Attach (Some) or detach (None) a snapshot capture. Attach only with the gate closed, so
    /// that no write in flight has passed the copy-before-write check without it.
    pub fn set_capture(&self, capture: Option<Arc<dyn BeforeChange>>) {
        let mut slot = self
            .capture
            .capture
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let was = self
            .capture
            .attached
            .swap(capture.is_some(), Ordering::AcqRel);
        match (was, capture.is_some()) {
            (false, true) => {
                ATTACHED.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                ATTACHED.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        *slot = capture;
    }

    /// Run `f` on the attached capture, if any, holding the slot: once `set_capture(None)`
    /// returns, no thread is still inside the capture (the engine then takes its store
    /// writer back), whether it came through the gate (writers) or not (readers).
    fn with_capture<R>(&self, f: impl FnOnce(&dyn BeforeChange) -> R) -> Option<R> {
        if !self.capture.attached.load(Ordering::Acquire) {
            return None;
        }
        let slot = self
            .capture
            .capture
            .read()
            .unwrap_or_else(|p| p.into_inner());
        slot.as_deref().map(f)
    }

    /// Let an attached capture take over a plain write (see `BeforeChange::defer_write`).
    /// Call inside the gate, after the write intent.
    pub fn defer_write(&self, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        if data.is_empty() {
            return Ok(false);
        }
        self.with_capture(|c| c.defer_write(offset, data))
            .unwrap_or(Ok(false))
    }

    /// Wait until writes a capture took over for `offset..offset+len` (len 0: all) are in the
    /// backing file: call before reading or changing those bytes by other means.
    pub fn settle(&self, offset: u64, len: u64) {
        self.with_capture(|c| c.settle(offset, len));
    }

    /// Run `write`, a change to the backing file made for the overlay outside the write path
    /// (a write a capture took over), so the stamp check takes it as ours: no stamp check can
    /// run between the change and the note.
    pub fn own_change<T>(&self, write: impl FnOnce() -> T) -> T {
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        let r = write();
        // Not `note_own_change`: the capture that made this change notes it itself, and it
        // may be running inside the capture slot's lock already.
        self.written_since_tick.store(true, Ordering::Relaxed);
        self.last_own_change_ns
            .fetch_max(realtime_ns(), Ordering::Relaxed);
        r
    }

    /// Keep the error of a write that failed after it returned, for the next fsync.
    pub fn note_write_error(&self, e: &std::io::Error) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let _ = self
            .write_error
            .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The error of a write that failed after it returned (once), as fsync reports it.
    pub fn take_write_error(&self) -> Option<std::io::Error> {
        match self.write_error.swap(0, Ordering::AcqRel) {
            0 => None,
            e => Some(std::io::Error::from_raw_os_error(e)),
        }
    }

    /// Copy-before-write: let an attached capture save `offset..offset+len` before it changes.
    /// Call inside the gate.
    pub fn before_change(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.with_capture(|c| c.before_change(offset, len));
    }

    /// The committed snapshot the dirty bits are relative to.
    pub fn base(&self) -> Option<(String, u64)> {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Enter the write gate (shared).
    pub fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for every writer inside the gate to leave (used by the tick after an epoch change).
    pub fn drain(&self) {
        drop(self.gate.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Attach the O_PATH fd of the backing inode, if none is attached yet.
    pub fn attach_fd(&self, fd: impl FnOnce() -> Option<OwnedFd>) {
        let mut slot = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = fd();
        }
    }

    fn ensure_partitions(&self, n: usize) {
        if self
            .partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            >= n
        {
            return;
        }
        let mut parts = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        while parts.len() < n {
            parts.push(Partition::default());
        }
    }

    /// Partitions covering `offset..offset+len` (len > 0).
    pub fn partition_range(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let ps = self.geometry.partition_size;
        (offset / ps)..=((offset + len - 1) / ps)
    }

    /// Make sure every partition of `offset..offset+len` has its write intent persisted in
    /// `epoch`: the ones missing are handed to `persist` in one call (which must make them
    /// durable before returning), then remembered.
    pub fn ensure_intent<E>(
        &self,
        offset: u64,
        len: u64,
        epoch: u64,
        persist: impl FnOnce(&[u64]) -> Result<(), E>,
    ) -> Result<(), E> {
        if len == 0 {
            return Ok(());
        }
        let range = self.partition_range(offset, len);
        self.ensure_partitions(*range.end() as usize + 1);
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let mut missing = Vec::new();
        for p in range {
            if parts[p as usize].intent_epoch.load(Ordering::Acquire) != epoch {
                missing.push(p);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        persist(&missing)?;
        for p in missing {
            parts[p as usize]
                .intent_epoch
                .store(epoch, Ordering::Release);
        }
        Ok(())
    }

    /// Mark blocks `first..=last` dirty and count one write of `bytes` in each partition.
    fn mark_blocks(&self, first: u64, last: u64, bytes: u64, sequential: bool, now_ns: u64) {
        let bpp = self.geometry.blocks_per_partition();
        let (fp, lp) = (first / bpp, last / bpp);
        self.ensure_partitions(lp as usize + 1);
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let nparts = lp - fp + 1;
        for p in fp..=lp {
            let b0 = first.max(p * bpp);
            let b1 = last.min(p * bpp + bpp - 1);
            let m = self.bitmap.mark(b0, b1);
            // A write spanning partitions counts once in each, its bytes split evenly.
            parts[p as usize]
                .counters
                .record(bytes / nparts, m.newly_dirty, sequential, now_ns);
        }
    }

    /// Mark the blocks of the byte range `offset..offset+len` (len > 0).
    fn mark_range(&self, offset: u64, len: u64, bytes: u64, sequential: bool, now_ns: u64) {
        let shift = self.geometry.block_shift();
        self.mark_blocks(
            offset >> shift,
            (offset + len - 1) >> shift,
            bytes,
            sequential,
            now_ns,
        );
    }

    /// Record a write of `len` bytes at `offset` that has reached the backing file.
    pub fn record_write(&self, offset: u64, len: u64, sequential: bool, now_ns: u64) {
        if len == 0 {
            return;
        }
        self.mark_range(offset, len, len, sequential, now_ns);
        self.size.fetch_max(offset + len, Ordering::Relaxed);
    }

    /// Record zeroing of `offset..offset+len` (punch hole, zero range): the blocks it touches
    /// changed content.
    pub fn record_zero(&self, offset: u64, len: u64, now_ns: u64) {
        if len == 0 {
            return;
        }
        self.mark_range(offset, len, 0, false, now_ns);
    }

    /// Record a size change from `old` to `new_size` bytes. Growing changes no content (the
    /// new range reads as zeros). Shrinking changes every block from the new end to the old
    /// one: the partial last block, and the blocks cut off, which if the file grows back read
    /// as zeros where the last snapshot may have had data.
    pub fn record_truncate(&self, old: u64, new_size: u64, now_ns: u64) {
        self.size.store(new_size, Ordering::Relaxed);
        if new_size < old {
            self.low_water.fetch_min(new_size, Ordering::Relaxed);
            let shift = self.geometry.block_shift();
            self.mark_blocks(new_size >> shift, (old - 1) >> shift, 0, false, now_ns);
        }
    }

    /// Current size as the write path knows it.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Links of the backing inode (None without an attached fd).
    pub fn nlink(&self) -> Option<u64> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let st = crate::sys::fstat(fd.as_ref()?.as_raw_fd()).ok()?;
        Some(st.st_nlink)
    }

    /// Take the stamp of a freshly opened file if none is recorded yet, so that a change
    /// behind our back is noticed from the first tick on.
    pub fn first_stamp(&self, st: &libc::stat) {
        let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *stamp == FileStamp::default() {
            *stamp = FileStamp::of(st);
        }
    }

    /// Refresh size and stamp from the backing file; returns the new stamp, or None if there
    /// is no fd attached or the stat failed.
    pub fn refresh_stamp(&self) -> Option<FileStamp> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let fd = fd.as_ref()?;
        let st = crate::sys::fstat(fd.as_raw_fd()).ok()?;
        let stamp = FileStamp::of(&st);
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        self.size.store(stamp.size, Ordering::Relaxed);
        Some(stamp)
    }

    /// Adopt the file as it is now (after recovery has accounted for any difference).
    pub fn adopt_stamp(&self, stamp: FileStamp) {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        let old = self.size.swap(stamp.size, Ordering::Relaxed);
        if stamp.size < old {
            self.low_water.fetch_min(stamp.size, Ordering::Relaxed);
        }
    }

    /// The stamp recorded last.
    pub fn stamp(&self) -> FileStamp {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark the whole volume unknown (its tracking cannot be trusted).
    pub fn mark_unknown_all(&self) {
        self.unknown_all.store(true, Ordering::Relaxed);
    }

    /// Mark one partition unknown.
    pub fn mark_unknown(&self, partition: u64) {
        self.unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition);
    }

    /// Note a change made through the overlay, right after it reached the backing file, so the
    /// stamp it moved is not taken for a change behind our back. Every change needs it, whether
    /// or not it marks blocks: a keep-size fallocate, a punch hole past the end, chmod or an
    /// xattr move the ctime without changing a byte. The `record_*` calls do not note on
    /// their own; the overlay notes once per change, after recording it (one clock read and
    /// one atomic max on the write path, as before).
    pub fn touch(&self) {
        self.note_own_change();
    }

    /// Note a change made through the overlay, right after it: the file's ctime can be no later
    /// than now, so a ctime after this moment at the next stamp check is someone else's.
    fn note_own_change(&self) {
        self.written_since_tick.store(true, Ordering::Relaxed);
        self.last_own_change_ns
            .fetch_max(realtime_ns(), Ordering::Relaxed);
        self.with_capture(|c| c.after_own_change());
    }

    /// Call inside the gate before a change through the overlay. The first such change since
    /// the last stamp check looks at the file first: a stamp that moved in between was moved
    /// by someone else, and the volume becomes unknown (so that change is not hidden by ours).
    /// Later changes in the same interval cost nothing. Returns true if it marked the volume.
    pub fn check_stamp_before_change(&self) -> bool {
        // A plain load first: the write path must not bounce a cache line between writers.
        if self.written_since_tick.load(Ordering::Acquire) {
            return false;
        }
        // Writers that arrive while the first one checks wait for it: a write of theirs
        // before the check ends would look like a change behind our back.
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        if self.written_since_tick.load(Ordering::Acquire) {
            return false;
        }
        let moved = self.restamp(false);
        self.written_since_tick.store(true, Ordering::Release);
        moved
    }

    /// Refresh the stamp with the gate held (no write in flight); if nothing went through the
    /// overlay since the last check and the stamp moved anyway, someone changed the backing
    /// file directly: mark the volume unknown and return true.
    pub fn check_stamp(&self) -> bool {
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        // A write a capture took over lands outside the gate, under this lock (`own_change`).
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        let touched = self.written_since_tick.swap(false, Ordering::Relaxed);
        self.restamp(touched)
    }

    /// Refresh the stamp; if it moved in a way our own changes do not explain (`touched`: the
    /// overlay changed the file since the last check), mark the volume unknown and return true.
    /// Our own changes explain a moved stamp only up to the ctime of the last of them: a later
    /// ctime is a change behind our back made after it (within one tick of the clock, a change
    /// right after ours can still hide behind it).
    fn restamp(&self, touched: bool) -> bool {
        let before = self.stamp();
        let own_until = self.last_own_change_ns.load(Ordering::Relaxed) as i128;
        match self.refresh_stamp() {
            Some(now)
                if before != FileStamp::default()
                    && now != before
                    && (!touched || now.ctime_ns > own_until) =>
            {
                self.mark_unknown_all();
                true
            }
            _ => false,
        }
    }

    /// Partitions written since the last tick whose intent is recorded in epoch `old`: mark
    /// them recorded in epoch `new` too (their record is kept on disk, see `IntentLog::carry`)
    /// and return them. Call before `tick_rates`, which resets the "since the last tick".
    pub fn carry_intents(&self, old: u64, new: u64) -> Vec<u64> {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let mut carried = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let last = rates.get(i).map_or(0, |r| r.last_writes);
            if part.counters.writes.load(Ordering::Relaxed) != last
                && part
                    .intent_epoch
                    .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                carried.push(i as u64);
            }
        }
        carried
    }

    /// Update the smoothed rates from the counters, `dt_secs` after the previous tick.
    pub fn tick_rates(&self, dt_secs: f64) {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        rates.resize(parts.len(), Rates::default());
        for (part, r) in parts.iter().zip(rates.iter_mut()) {
            let v = part.counters.values();
            let d_dirty = v.dirty_blocks.saturating_sub(r.last_dirty) as f64;
            let d_writes = v.writes.saturating_sub(r.last_writes) as f64;
            if dt_secs > 0.0 {
                r.change_rate = ewma(r.change_rate, d_dirty / dt_secs, dt_secs);
                r.write_rate = ewma(r.write_rate, d_writes / dt_secs, dt_secs);
            }
            r.last_dirty = v.dirty_blocks;
            r.last_writes = v.writes;
        }
    }

    /// Everything needed to save this volume and restore it after a restart.
    pub fn saved(&self, path: Option<String>) -> SavedVolume {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut unknown = self
            .unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut low_water = self.low_water.load(Ordering::Relaxed);
        // Unknowns a barrier took come back unknown after a crash before its commit.
        if let Some(p) = pending.as_ref() {
            unknown.extend(p.unknown.iter().copied());
            low_water = low_water.min(p.low_water.unwrap_or(u64::MAX));
        }
        SavedVolume {
            id: self.id,
            path,
            stamp: self.stamp(),
            size: self.size(),
            low_water,
            unknown_all: self.unknown_all.load(Ordering::Relaxed)
                || pending.as_ref().is_some_and(|p| p.unknown_all),
            unknown: unknown.into_iter().collect(),
            // Sparse: a 2 TiB volume with a few changes saves a few words, not 512 Ki of them.
            bitmap: self
                .bitmap
                .words()
                .into_iter()
                .enumerate()
                .filter(|(_, w)| *w != 0)
                .map(|(i, w)| (i as u64, w))
                .collect(),
            counters: parts
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p.counters.values()))
                .filter(|(_, c)| c.writes != 0 || c.dirty_blocks != 0 || c.last_update_ns != 0)
                .collect(),
            base: self.base(),
            pending: pending
                .iter()
                .flat_map(|p| p.bits.iter().copied().enumerate())
                .filter(|(_, w)| *w != 0)
                .map(|(i, w)| (i as u64, w))
                .collect(),
            rates: self
                .rates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .enumerate()
                .filter(|(_, r)| **r != Rates::default())
                .map(|(i, r)| (i as u64, *r))
                .collect(),
        }
    }

    /// Rebuild a volume from its saved state.
    pub fn restore(geometry: Geometry, s: &SavedVolume) -> Volume {
        let v = Volume::new(s.id, geometry, s.size);
        if let Some(&(last, _)) = s.bitmap.last() {
            let mut words = vec![0u64; last as usize + 1];
            for &(i, w) in &s.bitmap {
                words[i as usize] = w;
            }
            v.bitmap.merge(&words);
        }
        let nparts = s.counters.iter().map(|(i, _)| *i + 1).max().unwrap_or(0);
        v.ensure_partitions(nparts as usize);
        {
            let parts = v.partitions.read().unwrap_or_else(|p| p.into_inner());
            for (i, c) in &s.counters {
                parts[*i as usize].counters.restore(c);
            }
        }
        // Bits a barrier took for a snapshot that never committed (the daemon died before the
        // commit): they are dirty again, as an abort would have made them.
        if let Some(&(last, _)) = s.pending.last() {
            let mut words = vec![0u64; last as usize + 1];
            for &(i, w) in &s.pending {
                words[i as usize] = w;
            }
            v.bitmap.merge(&words);
        }
        v.low_water.store(s.low_water, Ordering::Relaxed);
        v.unknown_all.store(s.unknown_all, Ordering::Relaxed);
        *v.base.lock().unwrap_or_else(|p| p.into_inner()) = s.base.clone();
        *v.unknown.lock().unwrap_or_else(|p| p.into_inner()) = s.unknown.iter().copied().collect();
        {
            let mut rates = v.rates.lock().unwrap_or_else(|p| p.into_inner());
            let n = s
                .rates
                .iter()
                .map(|(i, _)| *i as usize + 1)
                .max()
                .unwrap_or(0);
            rates.resize(n, Rates::default());
            for (i, r) in &s.rates {
                rates[*i as usize] = *r;
            }
        }
        *v.stamp.lock().unwrap_or_else(|p| p.into_inner()) = s.stamp;
        v
    }

    /// The immutable change map of this volume now.
    pub fn change_map(&self, path: Option<String>, now_ns: u64) -> ChangeMap {
        let g = self.geometry;
        let size = self.size();
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        let rates = self.rates.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let unknown = self
            .unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let unknown_all = self.unknown_all.load(Ordering::Relaxed);
        let bpp = g.blocks_per_partition();
        let nparts = (g.partitions(size) as usize).max(parts.len());
        let mut partitions = Vec::with_capacity(nparts);
        let (mut writes, mut bytes, mut seq, mut last) = (0, 0, 0, 0);
        let (mut change_rate, mut write_rate) = (0.0, 0.0);
        for i in 0..nparts {
            let v = parts
                .get(i)
                .map(|p| p.counters.values())
                .unwrap_or_default();
            let r = rates.get(i).copied().unwrap_or_default();
            let dirty = self
                .bitmap
                .count_range(i as u64 * bpp, (i as u64 + 1) * bpp);
            writes += v.writes;
            bytes += v.bytes;
            seq += v.sequential_writes;
            last = last.max(v.last_update_ns);
            change_rate += r.change_rate;
            write_rate += r.write_rate;
            partitions.push(PartitionMap {
                index: i as u64,
                dirty_blocks: dirty,
                dirty_bytes: dirty * g.block_size,
                writes: v.writes,
                bytes_written: v.bytes,
                overwrites: v.overwrites,
                change_rate: r.change_rate,
                write_rate: r.write_rate,
                access_pattern: classify(v.writes, v.sequential_writes),
                io_sizes: v.sizes.clone(),
                last_update_ns: v.last_update_ns,
                unknown: unknown_all || unknown.contains(&(i as u64)),
            });
        }
        let dirty_blocks = self.bitmap.count();
        ChangeMap {
            volume_id: self.id,
            path,
            size,
            block_size: g.block_size,
            partition_size: g.partition_size,
            dirty_blocks,
            dirty_bytes: dirty_blocks * g.block_size,
            writes,
            bytes_written: bytes,
            change_rate,
            write_rate,
            access_pattern: classify(writes, seq),
            unknown_all,
            unknown_partitions: if unknown_all {
                (0..nparts as u64).collect()
            } else {
                unknown.into_iter().collect()
            },
            low_water: self.low_water.load(Ordering::Relaxed),
            last_updated_ns: last,
            published_ns: now_ns,
            partitions,
        }
    }

    /// Close the write gate: in-flight writes drain, new ones wait until the guard drops.
    pub fn close_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot barrier's swap, to be called with the gate closed: take the dirty bits and
    /// the unknowns (they belong to the snapshot now), start a clean map, and keep the taken
    /// bits as pending until `commit_taken` or `abort_taken`.
    pub fn take_for_snapshot(&self) -> Taken {
        let bits = self.bitmap.take();
        let unknown_all = self.unknown_all.swap(false, Ordering::Relaxed);
        let unknown = std::mem::take(&mut *self.unknown.lock().unwrap_or_else(|p| p.into_inner()));
        let size = self.size();
        let low_water = self.low_water.swap(size, Ordering::Relaxed);
        let counts: Vec<(u64, u64)> = {
            let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            parts
                .iter()
                .map(|p| {
                    (
                        p.counters.dirty_blocks.swap(0, Ordering::Relaxed),
                        p.counters.overwrites.swap(0, Ordering::Relaxed),
                    )
                })
                .collect()
        };
        {
            // Rates restart from the reset counters.
            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            for r in rates.iter_mut() {
                r.last_dirty = 0;
            }
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // An earlier uncommitted take stays covered: pending is the union.
        let all = pending.get_or_insert_with(PendingTake::default);
        if all.bits.len() < bits.len() {
            all.bits.resize(bits.len(), 0);
        }
        for (a, b) in all.bits.iter_mut().zip(&bits) {
            *a |= b;
        }
        all.unknown_all |= unknown_all;
        all.unknown.extend(unknown.iter().copied());
        all.low_water = Some(all.low_water.unwrap_or(u64::MAX).min(low_water));
        drop(pending);
        Taken {
            id: self.id,
            counts,
            bits,
            unknown_all,
            unknown,
            size,
            low_water,
        }
    }

    /// The snapshot that took `t` is committed: its bits are no longer pending.
    /// `snapshot` (name, created_ns) is what the dirty bits are relative to from now on.
    pub fn commit_taken(&self, _t: &Taken, snapshot: (String, u64)) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
    }

    /// The snapshot that took `t` failed: everything it took is dirty (or unknown) again.
    pub fn abort_taken(&self, t: &Taken) {
        self.bitmap.merge(&t.bits);
        {
            // The counters the barrier reset count again (the policy's dirty fractions and
            // the change rates must not read low after an aborted snapshot).
            let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            for (p, (dirty, over)) in parts.iter().zip(&t.counts) {
                p.counters.dirty_blocks.fetch_add(*dirty, Ordering::Relaxed);
                p.counters.overwrites.fetch_add(*over, Ordering::Relaxed);
            }
        }
        if t.unknown_all {
            self.mark_unknown_all();
        }
        self.unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(t.unknown.iter().copied());
        self.low_water.fetch_min(t.low_water, Ordering::Relaxed);
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Dirty bits (for tests and the snapshot engine to come).
    pub fn is_dirty(&self, block: u64) -> bool {
        self.bitmap.is_dirty(block)
    }
}

/// What a snapshot barrier took from one volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Taken {
    pub id: VolumeId,
    /// Per partition: the dirty-block and overwrite counters the barrier reset.
    pub counts: Vec<(u64, u64)>,
    /// Dirty bits since the previous snapshot, one per block.
    pub bits: Vec<u64>,
    /// Tracking was lost for the whole volume: rescan all of it.
    pub unknown_all: bool,
    /// Partitions to rescan.
    pub unknown: BTreeSet<u64>,
    /// Size at the barrier.
    pub size: u64,
    /// Lowest size since the previous snapshot.
    pub low_water: u64,
}

/// A volume as saved in the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedVolume {
    pub id: VolumeId,
    pub path: Option<String>,
    pub stamp: FileStamp,
    pub size: u64,
    pub low_water: u64,
    pub unknown_all: bool,
    pub unknown: Vec<u64>,
    /// Non-zero words of the dirty bitmap: (word index, bits).
    pub bitmap: Vec<(u64, u64)>,
    /// Counters of partitions that saw any change: (partition, values).
    pub counters: Vec<(u64, CounterValues)>,
    /// Rates that are not zero: (partition, rates).
    pub rates: Vec<(u64, Rates)>,
    /// Bits taken by an uncommitted snapshot: (word index, bits); merged back at restore.
    #[serde(default)]
    pub pending: Vec<(u64, u64)>,
    /// The committed snapshot (name, created_ns) the dirty bits are relative to.
    #[serde(default)]
    pub base: Option<(String, u64)>,
}

/// The published change map of one partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionMap {
    pub index: u64,
    pub dirty_blocks: u64,
    pub dirty_bytes: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub overwrites: u64,
    /// EWMA of blocks newly dirtied per second.
    pub change_rate: f64,
    /// EWMA of writes per second.
    pub write_rate: f64,
    pub access_pattern: AccessPattern,
    /// Writes per size bucket (see `counters::size_bucket`).
    pub io_sizes: Vec<u64>,
    pub last_update_ns: u64,
    /// Tracking lost: the snapshot engine must rescan this partition.
    pub unknown: bool,
}

/// The published, immutable change map of one volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeMap {
    pub volume_id: VolumeId,
    /// Path relative to the backing dir, when known.
    pub path: Option<String>,
    pub size: u64,
    pub block_size: u64,
    pub partition_size: u64,
    pub dirty_blocks: u64,
    pub dirty_bytes: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub change_rate: f64,
    pub write_rate: f64,
    pub access_pattern: AccessPattern,
    pub unknown_all: bool,
    pub unknown_partitions: Vec<u64>,
    pub low_water: u64,
    pub last_updated_ns: u64,
    pub published_ns: u64,
    pub partitions: Vec<PartitionMap>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 4096,
        partition_size: 4096 * 16,
    };

    fn vol() -> Volume {
        Volume::new(VolumeId { dev: 1, ino: 2 }, G, 0)
    }

    #[test]
    fn write_marks_exactly_the_blocks_it_covers() {
        let v = vol();
        v.record_write(4095, 2, false, 1);
        assert!(v.is_dirty(0) && v.is_dirty(1) && !v.is_dirty(2));
        let m = v.change_map(None, 2);
        assert_eq!(
            (m.dirty_blocks, m.writes, m.bytes_written, m.size),
            (2, 1, 2, 4097)
        );
    }

    #[test]
    fn write_across_partitions_counts_in_each() {
        let v = vol();
        v.record_write(15 * 4096, 2 * 4096, true, 1);
        let m = v.change_map(None, 2);
        assert_eq!(m.partitions[0].dirty_blocks, 1);
        assert_eq!(m.partitions[1].dirty_blocks, 1);
        assert_eq!(m.partitions[0].writes + m.partitions[1].writes, 2);
    }

    #[test]
    fn shrinking_truncate_marks_from_the_new_end_to_the_old_one() {
        let v = Volume::new(VolumeId { dev: 1, ino: 2 }, G, 10 * 4096);
        v.record_truncate(10 * 4096, 3 * 4096 + 100, 2);
        // The partial last block and every block cut off; nothing before.
        assert!(v.is_dirty(3) && !v.is_dirty(2) && v.is_dirty(9) && !v.is_dirty(10));
        v.record_truncate(3 * 4096 + 100, 8 * 4096, 3);
        assert_eq!(v.change_map(None, 4).dirty_blocks, 7);
        assert_eq!(v.change_map(None, 4).low_water, 3 * 4096 + 100);
    }

    #[test]
    fn growth_marks_nothing() {
        let v = Volume::new(VolumeId { dev: 1, ino: 2 }, G, 8 * 4096);
        v.record_truncate(8 * 4096, 100 * 4096, 2);
        assert_eq!(v.change_map(None, 3).dirty_blocks, 0);
    }

    #[test]
    fn punch_hole_marks_touched_blocks() {
        let v = vol();
        v.record_zero(4096 + 1, 4096, 1);
        assert!(v.is_dirty(1) && v.is_dirty(2) && !v.is_dirty(0) && !v.is_dirty(3));
    }

    #[test]
    fn overwrite_counts_and_patterns() {
        let v = vol();
        for i in 0..10 {
            v.record_write(i * 4096, 4096, true, 1);
        }
        v.record_write(0, 4096, false, 2);
        let m = v.change_map(None, 3);
        assert_eq!(m.partitions[0].overwrites, 1);
        assert_eq!(m.access_pattern, AccessPattern::Sequential);
    }

    #[test]
    fn intent_is_persisted_once_per_partition_and_epoch() {
        let v = vol();
        let mut calls: Vec<Vec<u64>> = vec![];
        v.ensure_intent::<()>(0, 3 * 65536, 1, |p| {
            calls.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        v.ensure_intent::<()>(0, 65536, 1, |p| {
            calls.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        v.ensure_intent::<()>(0, 65536, 2, |p| {
            calls.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        // One durable write per batch, none when all are recorded already.
        assert_eq!(calls, vec![vec![0, 1, 2], vec![0]]);
    }

    #[test]
    fn saved_state_round_trips() {
        let v = vol();
        v.record_write(0, 100_000, true, 5);
        v.mark_unknown(3);
        v.tick_rates(10.0);
        let s = v.saved(Some("a.img".into()));
        let r = Volume::restore(G, &s);
        assert_eq!(r.saved(Some("a.img".into())), s);
        assert_eq!(
            r.change_map(None, 1).partitions,
            v.change_map(None, 1).partitions
        );
    }

    #[test]
    fn rates_follow_the_counters() {
        let v = vol();
        v.tick_rates(10.0);
        for i in 0..100 {
            v.record_write(i * 4096, 4096, false, 1);
        }
        v.tick_rates(10.0);
        let m = v.change_map(None, 1);
        // 100 blocks in 10 s is 10 blocks/s; one step of the EWMA with dt=10 s, tau=60 s.
        let expect = 10.0 * (1.0 - (-10.0f64 / 60.0).exp());
        assert!((m.change_rate - expect).abs() < 1e-9, "{}", m.change_rate);
    }
}
