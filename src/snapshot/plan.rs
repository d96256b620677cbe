//! From what a barrier took to what a capture must copy: the policy's decision per partition
//! (with the reason a person reads), the blocks pending for the capture, and a dry run's
//! estimate of the bytes each partition would store. Pure: it reads bitmaps and change maps,
//! never a volume or the store (the estimate is handed where a volume's data lies).

use crate::config::PolicyConfig;
use crate::ids::{Geometry, VolumeId};
use crate::policy::{self, Decision, Kind, PartitionState};
use crate::store::Manifest;
use crate::sys::now_ns;
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
/// the parent has is rescanned, unless a FULL rule applies). `force_full`: every partition
/// FULL (`snapshot create --full`).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    t: &Taken,
    size: u64,
    g: Geometry,
    map: &ChangeMap,
    base_ok: bool,
    parent: Option<&Manifest>,
    policy_config: &PolicyConfig,
    force_full: bool,
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
                force_full,
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

/// What a barrier would take now from volume `v` of `size` bytes, with its change map; a volume
/// the tracker never saw (None) is unknown throughout, as the barrier would find it.
pub(super) fn dry_view(
    v: Option<&Volume>,
    id: VolumeId,
    g: Geometry,
    size: u64,
) -> (Taken, ChangeMap) {
    let fresh;
    let v = match v {
        Some(v) => v,
        None => {
            fresh = Volume::new(id, g, size);
            fresh.mark_unknown_all();
            &fresh
        }
    };
    let map = v.change_map(None, now_ns());
    (taken_view(v, &map), map)
}

/// At most how many bytes of block data each partition of `plan` would store, for a volume of
/// `size` bytes: a FULL or rescanned partition its allocated bytes (`allocated(start, end)`:
/// the bytes with data in that range, None when unknown: then the whole range counts;
/// all-zero blocks are not stored either, but finding them would mean reading them), an
/// INCREMENTAL one its dirty blocks, the last one cut at the volume's end.
pub(super) fn estimate(
    t: &Taken,
    size: u64,
    g: Geometry,
    plan: &[Decision],
    allocated: impl Fn(u64, u64) -> Option<u64>,
) -> Vec<u64> {
    let nblocks = g.blocks(size);
    let bpp = g.blocks_per_partition();
    plan.iter()
        .map(|d| {
            let first = d.partition * bpp;
            let end = (first + bpp).min(nblocks);
            if d.kind == Kind::Full || d.rescan {
                let start = (first * g.block_size).min(size);
                let stop = (end * g.block_size).min(size);
                return allocated(start, stop).unwrap_or(stop - start);
            }
            let dirty = count_words_range(&t.bits, first, end) * g.block_size;
            let last = nblocks.saturating_sub(1);
            let last_dirty = (first..end).contains(&last)
                && t.bits
                    .get((last / 64) as usize)
                    .is_some_and(|w| w & (1 << (last % 64)) != 0);
            if last_dirty {
                dirty - (nblocks * g.block_size - size)
            } else {
                dirty
            }
        })
        .collect()
}
