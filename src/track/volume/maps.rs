//! A volume's rates and change maps: the smoothed per-partition rates updated at each tick,
//! and the immutable change map (`ChangeMap`, `PartitionMap`) published from the counters,
//! the dirty bitmap and the unknowns.
//!
//! It only reads what the write path recorded; it never changes a dirty bit or a counter.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::Volume;
use crate::ids::VolumeId;
use crate::track::counters::{classify, ewma, AccessPattern};

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

impl Volume {
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
