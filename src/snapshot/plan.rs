//! From what a barrier took to what a capture must copy: the policy's decision per partition
//! (with the reason a person reads) and the blocks pending for the capture. Pure: it reads
//! bitmaps and change maps, never a volume or the store.

use crate::config::PolicyConfig;
use crate::ids::Geometry;
use crate::policy::{self, Decision, Kind, PartitionState};
use crate::store::Manifest;
use crate::track::bitmap::{count_words_range, for_words};
use crate::track::{ChangeMap, Taken, Volume};

/// What a barrier would take from `v` now (for a dry run).
pub(super) fn taken_view(v: &Volume, map: &ChangeMap) -> Taken {
    let blocks = map.size.div_ceil(map.block_size);
    let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
    for b in 0..blocks {
        if v.is_dirty(b) {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }
    Taken {
        id: v.id,
        counts: Vec::new(),
        bits,
        unknown_all: map.unknown_all,
        unknown: map.unknown_partitions.iter().copied().collect(),
        size: map.size,
        low_water: map.low_water,
    }
}

/// The policy's decision for every partition of a volume of `size` bytes, from what the
/// barrier took. `base_ok`: the dirty bits are relative to `parent` (otherwise every partition
/// the parent has is rescanned, unless a FULL rule applies).
pub(super) fn plan(
    t: &Taken,
    size: u64,
    g: Geometry,
    map: &ChangeMap,
    base_ok: bool,
    parent: Option<&Manifest>,
    policy_config: &PolicyConfig,
) -> Vec<Decision> {
    let bpp = g.blocks_per_partition();
    let nblocks = g.blocks(size);
    let parent_vol = parent.and_then(|m| m.volume(t.id));
    (0..g.partitions(size))
        .map(|p| {
            let first = p * bpp;
            let end = (first + bpp).min(nblocks);
            let dirty = count_words_range(&t.bits, first, end);
            let state = PartitionState {
                partition: p,
                blocks: end - first,
                dirty_blocks: dirty,
                change_rate: map
                    .partitions
                    .get(p as usize)
                    .map_or(0.0, |m| m.change_rate),
                unknown: t.unknown_all || t.unknown.contains(&p) || !base_ok,
                parent_depth: parent_vol
                    .and_then(|v| v.partitions.get(p as usize))
                    .map(|e| e.depth),
            };
            let mut d = policy::decide(&state, policy_config);
            if d.rescan && !base_ok && !(t.unknown_all || t.unknown.contains(&p)) {
                d.reason = format!(
                    "the change map is not relative to the parent {:?} (a snapshot of another group, or a deleted one, came in between): blocks are hashed and only those that differ are stored",
                    parent.map_or("", |m| m.name.as_str())
                );
            }
            d
        })
        .collect()
}

/// The blocks a capture must copy: every block of FULL and rescanned partitions, the taken
/// dirty blocks of INCREMENTAL ones.
pub(super) fn pending_blocks(t: &Taken, size: u64, g: Geometry, plan: &[Decision]) -> Vec<u64> {
    let nblocks = g.blocks(size);
    let bpp = g.blocks_per_partition();
    let mut words = vec![0u64; nblocks.div_ceil(64) as usize];
    for d in plan {
        let first = d.partition * bpp;
        let end = (first + bpp).min(nblocks);
        let all = d.kind == Kind::Full || d.rescan;
        for_words(first, end, |w, mask| {
            let taken = t.bits.get(w).copied().unwrap_or(0);
            words[w] |= if all { mask } else { taken & mask };
        });
    }
    words
}
