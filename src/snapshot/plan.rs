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
    // Word by word: a sparse volume's dry run must not visit each of its blocks.
    let blocks = map.size.div_ceil(map.block_size);
    let mut bits = v.dirty_words();
    bits.resize(blocks.div_ceil(64) as usize, 0);
    if !blocks.is_multiple_of(64) {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (blocks % 64)) - 1;
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

/// The blocks a capture must copy: the taken dirty blocks of INCREMENTAL partitions, every
/// block of rescanned ones, and of FULL ones every block that may hold data at the barrier:
/// those that held data when the engine looked before the barrier (`data`, from
/// `data_blocks`; None: unknown, every block) plus the taken dirty ones (a write through the
/// overlay after the look set its bit before the barrier took the bits). Any other block of a
/// FULL partition was a hole at the barrier, and a FULL partition reads as zeros where it
/// stores nothing: so a sparse volume's capture visits its data, not its logical size, and a
/// writer filling such a hole after the barrier has nothing to copy first.
///
/// A change behind the overlay's back between the look and the barrier (another process
/// writing the backing file into a hole) is not in the snapshot; it is caught by the stamp
/// check, and the next snapshot rescans that volume. Such a writer is never at one instant
/// with the group anyway.
pub(super) fn pending_blocks(
    t: &Taken,
    size: u64,
    g: Geometry,
    plan: &[Decision],
    data: Option<&[u64]>,
) -> Vec<u64> {
    let nblocks = g.blocks(size);
    let bpp = g.blocks_per_partition();
    let mut words = vec![0u64; nblocks.div_ceil(64) as usize];
    for d in plan {
        let first = d.partition * bpp;
        let end = (first + bpp).min(nblocks);
        for_words(first, end, |w, mask| {
            let taken = t.bits.get(w).copied().unwrap_or(0);
            words[w] |= match (d.kind, d.rescan, data) {
                (Kind::Full, _, Some(data)) => (data.get(w).copied().unwrap_or(0) | taken) & mask,
                (Kind::Full, _, None) | (_, true, _) => mask,
                _ => taken & mask,
            };
        });
    }
    words
}

/// One bit per block of a volume of `size` bytes, set for each block that `ranges` (byte runs
/// that hold data, as `sys::data_ranges` gives them) touches.
pub(super) fn data_blocks(
    size: u64,
    g: Geometry,
    ranges: impl FnOnce(&mut dyn FnMut(u64, u64)),
) -> Vec<u64> {
    let nblocks = g.blocks(size);
    let mut words = vec![0u64; nblocks.div_ceil(64) as usize];
    ranges(&mut |from, to| {
        let first = from / g.block_size;
        let end = to.div_ceil(g.block_size).min(nblocks);
        for_words(first, end, |w, mask| words[w] |= mask);
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const G: Geometry = Geometry {
        block_size: 64 << 10,
        partition_size: 64 << 20,
    };

    fn decisions(parts: u64, kind: Kind) -> Vec<Decision> {
        (0..parts)
            .map(|partition| Decision {
                partition,
                kind,
                rescan: false,
                reason: String::new(),
            })
            .collect()
    }

    fn taken(bits: Vec<u64>, size: u64) -> Taken {
        Taken {
            id: VolumeId { dev: 1, ino: 2 },
            counts: Vec::new(),
            bits,
            unknown_all: false,
            unknown: Default::default(),
            size,
            low_water: size,
        }
    }

    /// A FULL capture of a sparse file visits its allocated blocks, not its logical size: on a
    /// 16 GiB file with data in 5 places (one straddling two blocks, one run of 3 blocks), the
    /// pending blocks are exactly the blocks SEEK_DATA finds data in.
    #[test]
    fn a_full_partitions_pending_blocks_are_its_allocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("sparse.img")).unwrap();
        let size = 16u64 << 30;
        f.set_len(size).unwrap();
        let bs = G.block_size;
        let writes = [
            (0, 4096),
            (bs * 1000 + bs - 100, 200), // blocks 1000 and 1001
            (bs * 70_000, 3 * bs),       // blocks 70000..70003
            (size - 10, 10),             // the last block
            (bs * 131_000 + 5, 1),       // one byte
        ];
        for (at, len) in writes {
            f.write_all_at(&vec![0xa5; len as usize], at).unwrap();
        }
        let mut looked = Ok(());
        let data = data_blocks(size, G, |r| {
            looked = crate::sys::data_ranges(f.as_raw_fd(), 0, size, r)
        });
        looked.unwrap();
        let expected: std::collections::BTreeSet<u64> = [
            0,
            1000,
            1001,
            70_000,
            70_001,
            70_002,
            size / bs - 1,
            131_000,
        ]
        .into_iter()
        .collect();
        let t = taken(Vec::new(), size);
        let plan = decisions(G.partitions(size), Kind::Full);
        let pending = pending_blocks(&t, size, G, &plan, Some(&data));
        let count: u64 = pending.iter().map(|w| w.count_ones() as u64).sum();
        // A filesystem without holes reports everything as data: then there is nothing to
        // spare, and the count is every block.
        if count == G.blocks(size) {
            eprintln!("the temp dir's filesystem keeps no holes: nothing to check");
            return;
        }
        assert_eq!(count, expected.len() as u64, "pending blocks: {count}");
        for b in expected {
            assert!(
                pending[(b / 64) as usize] & (1 << (b % 64)) != 0,
                "block {b}"
            );
        }
        // Blocks dirtied after the look (a hole filled through the overlay before the barrier)
        // are pending too; INCREMENTAL partitions keep only their dirty blocks; no look at
        // all (None) means every block of a FULL partition.
        let mut bits = vec![0u64; G.blocks(size).div_ceil(64) as usize];
        bits[5000 / 64] |= 1 << (5000 % 64);
        let t = taken(bits, size);
        let pending = pending_blocks(&t, size, G, &plan, Some(&data));
        let count: u64 = pending.iter().map(|w| w.count_ones() as u64).sum();
        assert_eq!(count, 9);
        let inc = decisions(G.partitions(size), Kind::Incremental);
        let pending = pending_blocks(&t, size, G, &inc, Some(&data));
        assert_eq!(pending.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
        let pending = pending_blocks(&t, size, G, &plan, None);
        let count: u64 = pending.iter().map(|w| w.count_ones() as u64).sum();
        assert_eq!(count, G.blocks(size));
    }
}
