//! The snapshot barrier's side of a volume: take the dirty bits, unknowns and low water for a
//! snapshot (`Taken`), keep them pending until the snapshot commits, and give them back if it
//! aborts.
//!
//! It must be called with the volume's gate closed, and must never drop a taken bit before the
//! snapshot that took it has committed: until then the bits are pending, saved with the state.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use super::Volume;
use crate::ids::VolumeId;

/// What uncommitted snapshot barriers took from a volume (the union of them): saved as if it were
/// still live, so a crash before the commit loses none of it.
#[derive(Debug, Default)]
pub(super) struct PendingTake {
    pub(super) bits: Vec<u64>,
    pub(super) unknown_all: bool,
    pub(super) unknown: BTreeSet<u64>,
    pub(super) low_water: Option<u64>,
}

impl Volume {
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
