//! Ground floor: the typed ids every layer shares (volumes, geometry, snapshot names, block
//! indexes). It depends on nothing of grainfs and does no I/O; a value that exists here has
//! been checked once, at the edge where it came in.

use serde::{Deserialize, Serialize};

/// The name of the read-only snapshot view in the mount root.
pub const SNAPDIR_NAME: &str = ".snapshots";

/// Identity of a volume: its backing inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{}", self.dev, self.ino)
    }
}

/// Block and partition sizes (powers of two; a partition is a whole number of blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub block_size: u64,
    pub partition_size: u64,
}

impl Geometry {
    pub fn block_shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }

    /// Blocks per partition.
    pub fn blocks_per_partition(&self) -> u64 {
        self.partition_size / self.block_size
    }

    /// Number of blocks covering `size` bytes.
    pub fn blocks(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }

    /// Number of partitions covering `size` bytes.
    pub fn partitions(&self, size: u64) -> u64 {
        size.div_ceil(self.partition_size)
    }
}
