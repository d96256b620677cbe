//! Per-partition write counters, the access-pattern rule and the smoothed change rates.
//!
//! Counters are atomics bumped on the write path (no lock, no allocation); rates are computed
//! only at a tracking tick from the difference since the previous tick.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Buckets of the I/O size histogram: bucket i counts writes of size in [2^(i+9), 2^(i+10)),
/// bucket 0 everything under 1 KiB, the last everything from 2^(BUCKETS+8) up (256 MiB).
pub const SIZE_BUCKETS: usize = 20;

/// The histogram bucket of a write of `len` bytes.
pub fn size_bucket(len: u64) -> usize {
    if len < 1024 {
        return 0;
    }
    ((63 - len.leading_zeros()) as usize - 9).min(SIZE_BUCKETS - 1)
}

/// Live counters of one partition.
#[derive(Debug, Default)]
pub struct PartitionCounters {
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    /// Blocks that went from clean to dirty since the last snapshot.
    pub dirty_blocks: AtomicU64,
    /// Writes that touched only blocks already dirty.
    pub overwrites: AtomicU64,
    /// Writes that started where the same handle's previous write ended.
    pub sequential_writes: AtomicU64,
    pub sizes: [AtomicU64; SIZE_BUCKETS],
    /// Unix time in ns of the last write.
    pub last_update_ns: AtomicU64,
}

/// A plain copy of a partition's counters at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterValues {
    pub writes: u64,
    pub bytes: u64,
    pub dirty_blocks: u64,
    pub overwrites: u64,
    pub sequential_writes: u64,
    pub sizes: Vec<u64>,
    pub last_update_ns: u64,
}

impl PartitionCounters {
    /// Count one write of `len` bytes that newly dirtied `newly_dirty` blocks.
    pub fn record(&self, len: u64, newly_dirty: u64, sequential: bool, now_ns: u64) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        if newly_dirty > 0 {
            self.dirty_blocks.fetch_add(newly_dirty, Ordering::Relaxed);
        } else {
            self.overwrites.fetch_add(1, Ordering::Relaxed);
        }
        if sequential {
            self.sequential_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.sizes[size_bucket(len)].fetch_add(1, Ordering::Relaxed);
        self.last_update_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// Read every counter (not atomically as a whole; each value is exact).
    pub fn values(&self) -> CounterValues {
        CounterValues {
            writes: self.writes.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dirty_blocks: self.dirty_blocks.load(Ordering::Relaxed),
            overwrites: self.overwrites.load(Ordering::Relaxed),
            sequential_writes: self.sequential_writes.load(Ordering::Relaxed),
            sizes: self
                .sizes
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect(),
            last_update_ns: self.last_update_ns.load(Ordering::Relaxed),
        }
    }

    /// Restore saved values (after a clean restart).
    pub fn restore(&self, v: &CounterValues) {
        self.writes.store(v.writes, Ordering::Relaxed);
        self.bytes.store(v.bytes, Ordering::Relaxed);
        self.dirty_blocks.store(v.dirty_blocks, Ordering::Relaxed);
        self.overwrites.store(v.overwrites, Ordering::Relaxed);
        self.sequential_writes
            .store(v.sequential_writes, Ordering::Relaxed);
        for (s, &x) in self.sizes.iter().zip(&v.sizes) {
            s.store(x, Ordering::Relaxed);
        }
        self.last_update_ns
            .store(v.last_update_ns, Ordering::Relaxed);
    }
}

/// How a partition is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessPattern {
    /// No writes yet.
    Idle,
    Sequential,
    Random,
    Mixed,
}

/// The pattern rule: a write is sequential when it starts exactly where the previous write of
/// the same open handle ended (offset 0 for a handle's first write). Over the writes counted, at least 80 % sequential is SEQUENTIAL,
/// at most 20 % is RANDOM, anything between is MIXED. Per handle, because two sequential
/// streams into one file interleave into what looks random by offset alone.
pub fn classify(writes: u64, sequential: u64) -> AccessPattern {
    if writes == 0 {
        return AccessPattern::Idle;
    }
    let share = sequential as f64 / writes as f64;
    if share >= 0.8 {
        AccessPattern::Sequential
    } else if share <= 0.2 {
        AccessPattern::Random
    } else {
        AccessPattern::Mixed
    }
}

/// Time constant of the rate smoothing: a step change in the write rate shows at 63 % after
/// one minute, whatever the tick interval.
pub const EWMA_TAU_SECS: f64 = 60.0;

/// One step of an exponentially weighted moving average with time constant `EWMA_TAU_SECS`:
/// `rate` is the rate measured over the last `dt_secs`.
pub fn ewma(previous: f64, rate: f64, dt_secs: f64) -> f64 {
    if dt_secs <= 0.0 {
        return previous;
    }
    let alpha = 1.0 - (-dt_secs / EWMA_TAU_SECS).exp();
    previous + alpha * (rate - previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_buckets_are_powers_of_two() {
        assert_eq!(size_bucket(1), 0);
        assert_eq!(size_bucket(1023), 0);
        assert_eq!(size_bucket(1024), 1);
        assert_eq!(size_bucket(4096), 3);
        assert_eq!(size_bucket(4097), 3);
        assert_eq!(size_bucket(1 << 20), 11);
        assert_eq!(size_bucket(u64::MAX), SIZE_BUCKETS - 1);
    }

    #[test]
    fn classification_thresholds() {
        assert_eq!(classify(0, 0), AccessPattern::Idle);
        assert_eq!(classify(100, 100), AccessPattern::Sequential);
        assert_eq!(classify(100, 80), AccessPattern::Sequential);
        assert_eq!(classify(100, 79), AccessPattern::Mixed);
        assert_eq!(classify(100, 21), AccessPattern::Mixed);
        assert_eq!(classify(100, 20), AccessPattern::Random);
        assert_eq!(classify(100, 0), AccessPattern::Random);
    }

    #[test]
    fn ewma_converges_and_respects_time() {
        let mut r = 0.0;
        for _ in 0..60 {
            r = ewma(r, 100.0, 10.0);
        }
        assert!((r - 100.0).abs() < 0.01, "{r}");
        // One tau of a constant rate from zero gives 1 - 1/e of it, in one step or in many.
        let one = ewma(0.0, 100.0, 60.0);
        let mut many = 0.0;
        for _ in 0..60 {
            many = ewma(many, 100.0, 1.0);
        }
        assert!(
            (one - 63.212).abs() < 0.01 && (many - one).abs() < 0.01,
            "{one} {many}"
        );
        assert_eq!(ewma(5.0, 100.0, 0.0), 5.0);
    }

    #[test]
    fn record_counts_overwrites_and_sequential() {
        let c = PartitionCounters::default();
        c.record(4096, 1, false, 10);
        c.record(4096, 0, true, 5);
        let v = c.values();
        assert_eq!(
            (
                v.writes,
                v.bytes,
                v.dirty_blocks,
                v.overwrites,
                v.sequential_writes
            ),
            (2, 8192, 1, 1, 1)
        );
        assert_eq!(v.sizes[3], 2);
        assert_eq!(v.last_update_ns, 10);
        let d = PartitionCounters::default();
        d.restore(&v);
        assert_eq!(d.values(), v);
    }
}
