//! The snapshot policy: from a volume's change map, the state of its parent chain and the
//! config, decide per partition whether the next snapshot stores it FULL or INCREMENTAL, with a
//! reason a person can read. Pure: no I/O, no clock, no store; the engine gathers the inputs.
//!
//! The rules (DESIGN.md "Policy"), in order: FULL if the user asked for it (`snapshot create
//! --full`), or the partition has no parent, or its chain
//! depth reached `policy.max_chain`, or its change rate exceeds `policy.full_rate`, or its dirty
//! fraction reaches `policy.full_dirty_fraction`; else INCREMENTAL. A partition whose tracking
//! is unknown is INCREMENTAL by rescan (its blocks are hashed and compared with the parent), unless
//! a FULL rule applies anyway. A clean partition stays INCREMENTAL and stores nothing.

use serde::Serialize;

use crate::config::PolicyConfig;
use crate::track::ChangeMap;

/// How a partition is stored in the next snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    Full,
    Incremental,
}

/// What the policy decided for one partition, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub partition: u64,
    pub kind: Kind,
    /// Hash every block and store those that differ from the parent (tracking was lost).
    pub rescan: bool,
    pub reason: String,
}

/// What the policy knows of one partition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartitionState {
    pub partition: u64,
    /// Blocks of this partition in the volume as it is now.
    pub blocks: u64,
    pub dirty_blocks: u64,
    /// EWMA of blocks newly dirtied per second.
    pub change_rate: f64,
    pub unknown: bool,
    /// Depth of this partition's chain in the parent snapshot (1 = stored FULL there); None
    /// when there is no parent snapshot or the parent does not have this partition.
    pub parent_depth: Option<u32>,
    /// The user asked for a full copy of every partition (`snapshot create --full`).
    pub force_full: bool,
}

/// The reason of a partition made FULL by `snapshot create --full`.
pub const FORCED_FULL: &str = "forced by --full";

/// Decide one partition.
pub fn decide(p: &PartitionState, policy: &PolicyConfig) -> Decision {
    let full = |reason: String| Decision {
        partition: p.partition,
        kind: Kind::Full,
        rescan: false,
        reason,
    };
    if p.force_full {
        return full(FORCED_FULL.into());
    }
    let Some(depth) = p.parent_depth else {
        return full("no parent snapshot has this partition".into());
    };
    if depth >= policy.max_chain {
        return full(format!(
            "the chain reached depth {depth}, policy.max_chain is {}",
            policy.max_chain
        ));
    }
    if p.change_rate > policy.full_rate {
        return full(format!(
            "change rate {:.1} blocks/s is above policy.full_rate {}",
            p.change_rate, policy.full_rate
        ));
    }
    let fraction = if p.blocks == 0 {
        0.0
    } else {
        p.dirty_blocks as f64 / p.blocks as f64
    };
    if p.dirty_blocks > 0 && fraction >= policy.full_dirty_fraction {
        return full(format!(
            "{} of {} blocks dirty ({:.0} %), at least policy.full_dirty_fraction {}",
            p.dirty_blocks,
            p.blocks,
            fraction * 100.0,
            policy.full_dirty_fraction
        ));
    }
    let (rescan, reason) = if p.unknown {
        (
            true,
            "tracking was lost: blocks are hashed and only those that differ are stored".into(),
        )
    } else if p.dirty_blocks == 0 {
        (false, "no block changed: nothing is stored".into())
    } else {
        (
            false,
            format!("{} of {} blocks changed", p.dirty_blocks, p.blocks),
        )
    };
    Decision {
        partition: p.partition,
        kind: Kind::Incremental,
        rescan,
        reason,
    }
}

/// Decide every partition of a volume from its change map; `parent_depth(partition)` gives
/// the chain depth in the parent snapshot (None: no parent, or not in it).
pub fn plan_volume(
    map: &ChangeMap,
    parent_depth: impl Fn(u64) -> Option<u32>,
    policy: &PolicyConfig,
) -> Vec<Decision> {
    let blocks_total = map.size.div_ceil(map.block_size);
    let bpp = map.partition_size / map.block_size;
    let nparts = map.size.div_ceil(map.partition_size);
    (0..nparts)
        .map(|i| {
            let pm = map.partitions.get(i as usize);
            let state = PartitionState {
                partition: i,
                blocks: (blocks_total - i * bpp).min(bpp),
                dirty_blocks: pm.map_or(0, |p| p.dirty_blocks),
                change_rate: pm.map_or(0.0, |p| p.change_rate),
                unknown: map.unknown_all || pm.is_some_and(|p| p.unknown),
                parent_depth: parent_depth(i),
                force_full: false,
            };
            decide(&state, policy)
        })
        .collect()
}

/// A volume with both kinds is HYBRID; one kind throughout names that kind.
pub fn volume_kind(decisions: &[Decision]) -> &'static str {
    let full = decisions.iter().filter(|d| d.kind == Kind::Full).count();
    match full {
        0 => "INCREMENTAL",
        n if n == decisions.len() => "FULL",
        _ => "HYBRID",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PolicyConfig = PolicyConfig {
        full_rate: 100.0,
        full_dirty_fraction: 0.5,
        max_chain: 8,
    };

    fn state() -> PartitionState {
        PartitionState {
            partition: 3,
            blocks: 1024,
            dirty_blocks: 10,
            change_rate: 1.0,
            unknown: false,
            parent_depth: Some(2),
            force_full: false,
        }
    }

    #[test]
    fn each_rule_decides_with_its_reason() {
        let d = decide(&state(), &POLICY);
        assert_eq!((d.kind, d.rescan), (Kind::Incremental, false));
        assert_eq!(d.reason, "10 of 1024 blocks changed");

        let d = decide(
            &PartitionState {
                parent_depth: None,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Full);
        assert!(d.reason.contains("no parent"), "{}", d.reason);

        let d = decide(
            &PartitionState {
                parent_depth: Some(8),
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Full);
        assert!(
            d.reason.contains("depth 8") && d.reason.contains("max_chain"),
            "{}",
            d.reason
        );

        let d = decide(
            &PartitionState {
                change_rate: 150.0,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Full);
        assert!(d.reason.contains("150.0 blocks/s"), "{}", d.reason);

        let d = decide(
            &PartitionState {
                dirty_blocks: 512,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Full);
        assert!(
            d.reason.contains("512 of 1024") && d.reason.contains("50 %"),
            "{}",
            d.reason
        );
        let d = decide(
            &PartitionState {
                dirty_blocks: 511,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Incremental);
    }

    #[test]
    fn clean_partitions_store_nothing_and_unknown_ones_are_rescanned() {
        let d = decide(
            &PartitionState {
                dirty_blocks: 0,
                ..state()
            },
            &POLICY,
        );
        assert_eq!((d.kind, d.rescan), (Kind::Incremental, false));
        assert!(d.reason.contains("nothing is stored"));
        let d = decide(
            &PartitionState {
                unknown: true,
                ..state()
            },
            &POLICY,
        );
        assert_eq!((d.kind, d.rescan), (Kind::Incremental, true));
        // A FULL rule still wins over a rescan.
        let d = decide(
            &PartitionState {
                unknown: true,
                parent_depth: None,
                ..state()
            },
            &POLICY,
        );
        assert_eq!((d.kind, d.rescan), (Kind::Full, false));
    }

    #[test]
    fn forced_full_wins_over_every_other_rule() {
        for s in [
            state(),
            PartitionState {
                dirty_blocks: 0,
                ..state()
            },
            PartitionState {
                unknown: true,
                ..state()
            },
            PartitionState {
                parent_depth: None,
                ..state()
            },
        ] {
            let d = decide(
                &PartitionState {
                    force_full: true,
                    ..s
                },
                &POLICY,
            );
            assert_eq!((d.kind, d.rescan), (Kind::Full, false), "{s:?}");
            assert_eq!(d.reason, FORCED_FULL);
        }
    }

    #[test]
    fn a_tiny_last_partition_is_judged_on_its_own_blocks() {
        // 2 dirty of the 2 blocks the last partition has: 100 % dirty, so FULL.
        let d = decide(
            &PartitionState {
                blocks: 2,
                dirty_blocks: 2,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(d.kind, Kind::Full);
    }

    #[test]
    fn volume_kinds() {
        let inc = decide(&state(), &POLICY);
        let full = decide(
            &PartitionState {
                parent_depth: None,
                ..state()
            },
            &POLICY,
        );
        assert_eq!(volume_kind(&[inc.clone(), inc.clone()]), "INCREMENTAL");
        assert_eq!(volume_kind(&[full.clone(), full.clone()]), "FULL");
        assert_eq!(volume_kind(&[full, inc]), "HYBRID");
    }

    #[test]
    fn a_volume_plan_follows_its_change_map() {
        use crate::ids::{Geometry, VolumeId};
        use crate::track::Volume;
        let g = Geometry {
            block_size: 4096,
            partition_size: 4096 * 16,
        };
        // 3 partitions; partition 0 fully rewritten, partition 1 one block, partition 2 clean.
        let v = Volume::new(VolumeId { dev: 1, ino: 1 }, g, 3 * 16 * 4096);
        v.record_write(0, 16 * 4096, true, 1);
        v.record_write(16 * 4096, 10, false, 1);
        let map = v.change_map(None, 2);
        let plan = plan_volume(&map, |p| (p != 2).then_some(1), &POLICY);
        let kinds: Vec<Kind> = plan.iter().map(|d| d.kind).collect();
        assert_eq!(kinds, vec![Kind::Full, Kind::Incremental, Kind::Full]);
        assert!(plan[2].reason.contains("no parent"));
        assert_eq!(volume_kind(&plan), "HYBRID");
    }
}
