//! One tracked volume: its dirty bitmap, its partitions' counters and rates, what is unknown
//! about it, and its write gate.
//!
//! A volume is a backing inode (tracking follows the inode: rename keeps it, hard links share
//! it). The write path records into it without allocating; rates and change maps are computed
//! only at a tick. It never does I/O except `fstat` on its own O_PATH fd.
//!
//! This file owns the volume itself, its write gate and what the write path records (dirty
//! blocks, counters, sizes, write intents). The rest lives beside it: `stamp.rs` (the
//! outside-change check), `capture_slot.rs` (the snapshot capture attached to it),
//! `barrier.rs` (what a snapshot takes), `saved.rs` (saved state), `maps.rs` (rates and change
//! maps).

mod barrier;
mod capture_slot;
mod maps;
mod saved;
mod stamp;

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use super::bitmap::DirtyBitmap;
use super::counters::PartitionCounters;
use crate::ids::{Geometry, VolumeId};
use barrier::PendingTake;
pub use barrier::Taken;
use capture_slot::CaptureSlot;
pub use capture_slot::{any_capture, BeforeChange};
pub use maps::{ChangeMap, PartitionMap, Rates};
pub use saved::SavedVolume;
pub use stamp::FileStamp;

/// A partition's live state.
#[derive(Debug, Default)]
pub struct Partition {
    pub counters: PartitionCounters,
    /// The intent epoch in which this partition's write intent was last persisted.
    pub intent_epoch: AtomicU64,
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
    /// Whether a saved state (`state.json`) holds a record of this volume (`Tracker::save`
    /// sets it, inside the gate, before it saves the volume). Until then its writes need no
    /// write intent: after a crash a volume without a record starts unknown as a whole.
    recorded: AtomicBool,
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
            recorded: AtomicBool::new(false),
        }
    }

    /// Whether a saved state may hold a record of this volume (see `recorded`).
    pub fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }

    /// From now on the saved state holds this volume: writers already inside the gate (which
    /// skipped the write intent) leave first, so their bits are in the save that follows.
    pub fn mark_recorded(&self) {
        if !self.recorded() {
            let _gate = self.close_gate();
            self.recorded.store(true, Ordering::Release);
        }
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

    /// Close the write gate: in-flight writes drain, new ones wait until the guard drops.
    pub fn close_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
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

    /// Dirty bits (for tests and the snapshot engine to come).
    pub fn is_dirty(&self, block: u64) -> bool {
        self.bitmap.is_dirty(block)
    }

    /// The dirty bits, one per block, read without taking them (a rollback's plan).
    pub fn dirty_words(&self) -> Vec<u64> {
        self.bitmap.words()
    }

    /// What is unknown: the whole volume, and the partitions to rescan (read, not taken).
    pub fn unknowns(&self) -> (bool, BTreeSet<u64>) {
        (
            self.unknown_all.load(Ordering::Relaxed),
            self.unknown
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::counters::AccessPattern;

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
