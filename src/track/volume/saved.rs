//! A volume's saved state: what `<store>/tracking/state.json` keeps of one volume
//! (`SavedVolume`), and the volume rebuilt from it after a restart.
//!
//! It must never save less than is dirty: the bits an uncommitted snapshot took are saved with
//! the live ones, so a crash before the commit gives them back instead of losing them.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::maps::Rates;
use super::stamp::FileStamp;
use super::Volume;
use crate::ids::{Geometry, VolumeId};
use crate::track::counters::CounterValues;

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

impl Volume {
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
            bitmap: sparse(self.bitmap.words()),
            counters: parts
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p.counters.values()))
                .filter(|(_, c)| c.writes != 0 || c.dirty_blocks != 0 || c.last_update_ns != 0)
                .collect(),
            base: self.base(),
            pending: sparse(pending.iter().flat_map(|p| p.bits.iter().copied())),
            rates: sparse(
                self.rates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied(),
            ),
        }
    }

    /// Rebuild a volume from its saved state.
    pub fn restore(geometry: Geometry, s: &SavedVolume) -> Volume {
        let v = Volume::new(s.id, geometry, s.size);
        v.bitmap.merge(&dense(&s.bitmap));
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
        v.bitmap.merge(&dense(&s.pending));
        v.low_water.store(s.low_water, Ordering::Relaxed);
        v.unknown_all.store(s.unknown_all, Ordering::Relaxed);
        *v.base.lock().unwrap_or_else(|p| p.into_inner()) = s.base.clone();
        *v.unknown.lock().unwrap_or_else(|p| p.into_inner()) = s.unknown.iter().copied().collect();
        *v.rates.lock().unwrap_or_else(|p| p.into_inner()) = dense(&s.rates);
        *v.stamp.lock().unwrap_or_else(|p| p.into_inner()) = s.stamp;
        v
    }
}

/// The items that are not the default, by index: a 2 TiB volume with a few changes saves a
/// few bitmap words, not 512 Ki of them.
fn sparse<T: Default + PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<(u64, T)> {
    items
        .into_iter()
        .enumerate()
        .filter(|(_, x)| *x != T::default())
        .map(|(i, x)| (i as u64, x))
        .collect()
}

/// The items `sparse` saved, back in place (the default everywhere else).
fn dense<T: Default + Clone>(sparse: &[(u64, T)]) -> Vec<T> {
    let n = sparse
        .iter()
        .map(|(i, _)| *i as usize + 1)
        .max()
        .unwrap_or(0);
    let mut out = vec![T::default(); n];
    for (i, x) in sparse {
        out[*i as usize] = x.clone();
    }
    out
}
