//! What crosses the control socket for `snapshot create`: the request and the report of what a
//! snapshot took (or, in a dry run, would take), per volume and partition. Plain data: no I/O.

use serde::{Deserialize, Serialize};

use crate::ids::SnapshotName;
use crate::policy::{Decision, Kind};

/// `grainfs snapshot create`, as sent to the daemon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// A group of the config (or `all`); None with no paths means `all`.
    pub group: Option<String>,
    /// Path globs relative to the backing dir, instead of a group.
    #[serde(default)]
    pub paths: Vec<String>,
    pub name: Option<SnapshotName>,
    #[serde(default)]
    pub dry_run: bool,
    /// Store every partition FULL (`--full`), whatever the policy would choose.
    #[serde(default)]
    pub full: bool,
}

/// One partition of a volume in a plan or a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    pub index: u64,
    /// FULL or INCREMENTAL.
    pub kind: String,
    pub rescan: bool,
    pub reason: String,
    /// Dry run: at most how many bytes of block data the snapshot would store for this
    /// partition (FULL or rescanned: its allocated bytes; INCREMENTAL: its dirty blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
}

/// One volume of a plan or a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub path: String,
    pub size: u64,
    /// FULL, INCREMENTAL or HYBRID.
    pub kind: String,
    /// Bytes of block data stored (0 in a dry run).
    pub stored_bytes: u64,
    /// Dry run: at most how many bytes it would store (the sum over its partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
    pub partitions: Vec<PartitionReport>,
}

/// What `snapshot create` did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateReport {
    pub name: String,
    pub group: String,
    pub parent: Option<String>,
    pub dry_run: bool,
    /// The snapshot's instant.
    pub created_ns: u64,
    /// How long writers of the group were held at the barrier.
    pub barrier_us: u64,
    /// From the barrier to the commit.
    pub capture_ms: u64,
    pub volumes: Vec<VolumeReport>,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    /// Blocks saved by writers (copy-before-write) and by the capture workers.
    pub blocks_by_writers: u64,
    pub blocks_by_workers: u64,
    /// Writes parked until their blocks were saved (their writers did not copy them).
    #[serde(default)]
    pub writes_deferred: u64,
    /// Blocks of rescanned partitions found unchanged.
    pub blocks_unchanged: u64,
    /// Dry run: at most how many bytes the snapshot would store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
    /// Dry run: how long storing `estimated_bytes` would take at the capture throughput of an
    /// earlier snapshot (None: no snapshot records its throughput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_ms: Option<u64>,
}

/// A partition's line in a report, from the policy's decision.
pub(super) fn partition_report(d: &Decision) -> PartitionReport {
    PartitionReport {
        index: d.partition,
        kind: match d.kind {
            Kind::Full => "FULL",
            Kind::Incremental => "INCREMENTAL",
        }
        .to_string(),
        rescan: d.rescan,
        reason: d.reason.clone(),
        estimated_bytes: None,
    }
}

/// A dry run's line for a volume of `size` bytes planned as `plan`, with at most how many
/// bytes each partition would store (`estimates`, in plan order).
pub(super) fn estimated_volume(
    path: String,
    size: u64,
    plan: &[Decision],
    estimates: &[u64],
) -> VolumeReport {
    let partitions: Vec<PartitionReport> = plan
        .iter()
        .zip(estimates)
        .map(|(d, e)| PartitionReport {
            estimated_bytes: Some(*e),
            ..partition_report(d)
        })
        .collect();
    VolumeReport {
        path,
        size,
        kind: crate::policy::volume_kind(plan).to_string(),
        stored_bytes: 0,
        estimated_bytes: Some(estimates.iter().sum()),
        partitions,
    }
}
