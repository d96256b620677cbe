//! The snapshot store on a temp dir: an oracle (proptest) of random volumes and snapshot
//! chains against an in-memory model, crash leftovers, damaged files, holes and read cost.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::Noise;
use grainfs::ids::{BlockIdx, Geometry, SnapshotName, VolumeId};
use grainfs::store::memory::MemoryStore;
use grainfs::store::{
    format, PartitionKind, SnapshotWriter, Store, StoreError, VolumeKind, VolumeMeta,
};
use proptest::prelude::*;

fn sn(name: &str) -> SnapshotName {
    SnapshotName::parse(name).unwrap()
}

const G: Geometry = Geometry {
    block_size: 4096,
    partition_size: 65536,
};
const MAX_SIZE: u64 = 2 << 20;
const MAX_CHAIN: u32 = 8;

fn vid(i: usize) -> VolumeId {
    VolumeId {
        dev: 7,
        ino: 100 + i as u64,
    }
}

fn meta(i: usize, size: u64) -> VolumeMeta {
    VolumeMeta {
        id: vid(i),
        path: format!("vols/v{i}.img"),
        size,
        mode: 0o100644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_700_000_000_000_000_000 + i as i128,
    }
}

/// Every byte of a volume as the store reads it, in odd-sized unaligned pieces.
fn read_all(store: &Store, snap: &str, id: VolumeId) -> Vec<u8> {
    let r = store.open_volume(&sn(snap), id).unwrap();
    let mut out = vec![0u8; r.size() as usize];
    let mut pos = 0usize;
    let mut piece = 5000usize;
    while pos < out.len() {
        let end = (pos + piece).min(out.len());
        let n = r.read_at(&mut out[pos..end], pos as u64).unwrap();
        assert_eq!(n, end - pos);
        pos = end;
        piece = piece * 7 % 70001 + 1;
    }
    let mut past = [1u8; 16];
    assert_eq!(r.read_at(&mut past, r.size()).unwrap(), 0);
    out
}

fn block_of(data: &[u8], b: u64) -> &[u8] {
    let s = (b * G.block_size) as usize;
    &data[s..(s + G.block_size as usize).min(data.len())]
}

#[derive(Clone, Debug)]
enum Op {
    /// `seed == 0` writes zeros.
    Write {
        vol: usize,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Truncate {
        vol: usize,
        size: u64,
    },
}

#[derive(Clone, Debug)]
struct Step {
    ops: Vec<Op>,
    /// Every partition FULL.
    full: bool,
    /// Per-partition coin for a HYBRID snapshot: FULL where `(seed >> (p % 64)) & 3 == 0`.
    hybrid_seed: u64,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Large writes make dense data for truncates to cut into.
        2 => (0..3usize, 0..MAX_SIZE, 1..MAX_SIZE, any::<u64>())
            .prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        6 => (0..3usize, 0..MAX_SIZE, 1..40_000u64, prop_oneof![1 => Just(0u64), 4 => any::<u64>()])
            .prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        // Block-aligned zero writes: blocks that become all zero.
        2 => (0..3usize, 0..MAX_SIZE / 4096).prop_map(|(vol, b)| Op::Write {
            vol,
            offset: b * 4096,
            len: 4096,
            seed: 0
        }),
        3 => (0..3usize, 0..=MAX_SIZE).prop_map(|(vol, size)| Op::Truncate { vol, size }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop::collection::vec(op(), 0..10),
        prop::bool::weighted(0.15),
        any::<u64>(),
    )
        .prop_map(|(ops, full, hybrid_seed)| Step {
            ops,
            full,
            hybrid_seed,
        })
}

fn apply(vols: &mut [Vec<u8>], op: &Op) {
    match *op {
        Op::Write {
            vol,
            offset,
            len,
            seed,
        } => {
            let end = (offset + len).min(MAX_SIZE) as usize;
            let v = &mut vols[vol];
            if v.len() < end {
                v.resize(end, 0);
            }
            let data = if seed == 0 {
                vec![0; end - offset as usize]
            } else {
                Noise::new(seed).bytes(end - offset as usize)
            };
            v[offset as usize..end].copy_from_slice(&data);
        }
        Op::Truncate { vol, size } => vols[vol].resize(size as usize, 0),
    }
}

/// Block `b` as the parent reads it, compared over `len` bytes (zeros past its end).
fn parent_block(parent: &[u8], b: u64, len: usize) -> Vec<u8> {
    let s = (b * G.block_size) as usize;
    let mut out = vec![0u8; len];
    if s < parent.len() {
        let n = (parent.len() - s).min(len);
        out[..n].copy_from_slice(&parent[s..s + n]);
    }
    out
}

/// Build a snapshot of `vols` (volume i present from step `born[i]`) on top of the previous
/// one, the way the engine will: FULL partitions get every block, INCREMENTAL ones exactly the
/// blocks that differ from the parent (plus the ones written this step).
#[allow(clippy::too_many_arguments)]
fn build(
    store: &Store,
    name: &str,
    parent: Option<(&str, &[Option<Vec<u8>>])>,
    vols: &[Option<Vec<u8>>],
    written: &[BTreeSet<u64>],
    step: &Step,
    depths: &mut [Vec<u32>],
) {
    let w: SnapshotWriter = store
        .begin(&sn(name), "g", G, parent.map(|(p, _)| sn(p)).as_ref())
        .unwrap();
    let parent_manifest = parent.map(|(p, _)| store.manifest(&sn(p)).unwrap());
    for (i, v) in vols.iter().enumerate() {
        let Some(data) = v else { continue };
        let h = w.add_volume(meta(i, data.len() as u64)).unwrap();
        let prev = parent.and_then(|(_, pv)| pv[i].as_deref());
        let bpp = G.blocks_per_partition();
        let nblocks = G.blocks(data.len() as u64);
        let mut new_depths = Vec::new();
        for p in 0..G.partitions(data.len() as u64) {
            let parent_depth = parent_manifest
                .as_ref()
                .and_then(|m| m.depth(vid(i), p))
                .or(prev.map(|_| 1));
            // The model's own account of depths must agree with the store's.
            if let Some(m) = &parent_manifest {
                assert_eq!(m.depth(vid(i), p), depths[i].get(p as usize).copied());
            }
            let full = step.full
                || prev.is_none()
                || parent_depth.is_some_and(|d| d >= MAX_CHAIN)
                || (step.hybrid_seed >> (p % 64)) & 3 == 0;
            let kind = if full {
                PartitionKind::Full
            } else {
                PartitionKind::Incremental
            };
            w.set_partition(h, p, kind, if full { "test: full" } else { "test: delta" })
                .unwrap();
            new_depths.push(if full {
                1
            } else {
                parent_depth.unwrap_or(1) + 1
            });
            for b in p * bpp..((p + 1) * bpp).min(nblocks) {
                let cur = block_of(data, b);
                let put = full
                    || written[i].contains(&b)
                    || prev.is_some_and(|pv| parent_block(pv, b, cur.len()) != cur);
                if put {
                    w.put_block(h, BlockIdx(b), cur).unwrap();
                }
            }
        }
        depths[i] = new_depths;
    }
    let m = w.commit().unwrap();
    for (i, v) in vols.iter().enumerate() {
        if v.is_some() {
            let got: Vec<u32> = m
                .volume(vid(i))
                .unwrap()
                .partitions
                .iter()
                .map(|p| p.depth)
                .collect();
            assert_eq!(got, depths[i], "volume {i}");
            assert!(got.iter().all(|&d| d <= MAX_CHAIN));
        }
    }
}

fn run_oracle(born: [usize; 3], steps: Vec<Step>) -> u32 {
    let tmp = tempfile::tempdir().unwrap();
    run_oracle_on(&Store::open(tmp.path()).unwrap(), born, steps)
}

fn run_oracle_on(store: &Store, born: [usize; 3], steps: Vec<Step>) -> u32 {
    let mut live: Vec<Vec<u8>> = vec![Vec::new(); 3];
    let mut history: Vec<(String, Vec<Option<Vec<u8>>>)> = Vec::new();
    let mut depths: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let mut max_depth = 0;
    for (k, step) in steps.iter().enumerate() {
        let mut written = vec![BTreeSet::new(); 3];
        for op in &step.ops {
            apply(&mut live, op);
            if let Op::Write {
                vol, offset, len, ..
            } = *op
            {
                let end = (offset + len).min(MAX_SIZE);
                written[vol].extend(offset / G.block_size..end.div_ceil(G.block_size));
            }
        }
        let vols: Vec<Option<Vec<u8>>> = (0..3)
            .map(|i| (k >= born[i]).then(|| live[i].clone()))
            .collect();
        for (i, v) in vols.iter().enumerate() {
            if v.is_none() {
                depths[i].clear();
            }
        }
        let name = format!("s{k:02}");
        let parent = history.last().map(|(n, v)| (n.as_str(), v.as_slice()));
        build(store, &name, parent, &vols, &written, step, &mut depths);
        max_depth = max_depth.max(depths.iter().flatten().copied().max().unwrap_or(0));
        history.push((name, vols));
        // Every snapshot so far reads back exactly as the model had it at its instant.
        for (name, vols) in &history {
            for (i, v) in vols.iter().enumerate() {
                let Some(want) = v else {
                    assert!(matches!(
                        store.open_volume(&sn(name), vid(i)),
                        Err(StoreError::NoVolume { .. })
                    ));
                    continue;
                };
                let got = read_all(store, name, vid(i));
                assert_eq!(got.len(), want.len(), "{name} v{i}");
                assert!(
                    blake3::hash(&got) == blake3::hash(want),
                    "{name} v{i}: content differs at byte {:?}",
                    got.iter().zip(want).position(|(a, b)| a != b)
                );
            }
        }
    }
    let (last, _) = history.last().unwrap();
    let report = store.verify(&sn(last)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(max_depth <= MAX_CHAIN);
    max_depth
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_snapshot_reads_back_as_the_model_had_it(
        born in [0..1usize, 0..3usize, 0..6usize],
        steps in prop::collection::vec(step(), 1..13),
    ) {
        run_oracle(born, steps);
    }

    /// The same oracle on the in-memory store: the store's logic does not depend on the medium.
    #[test]
    fn every_snapshot_in_memory_reads_back_as_the_model_had_it(
        born in [0..1usize, 0..3usize, 0..6usize],
        steps in prop::collection::vec(step(), 1..13),
    ) {
        run_oracle_on(&Store::in_memory(), born, steps);
    }
}

/// A damaged block in the in-memory store is found by verify and read as an error, as on disk.
#[test]
fn a_damaged_block_in_memory_fails_verify_and_reads_as_an_error() {
    let mem = Arc::new(MemoryStore::default());
    let store = Store::on(mem.clone());
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8 + 1).collect();
    simple_snapshot(&store, "s", None, &data);
    assert!(store.verify(&sn("s")).unwrap().ok());
    assert_eq!(read_all(&store, "s", vid(0)), data);
    let m = store.manifest(&sn("s")).unwrap();
    mem.flip_byte(&sn("s"), &m.packs[0].file, 100).unwrap();
    let r = store.verify(&sn("s")).unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    let v = store.open_volume(&sn("s"), vid(0)).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        v.read_at(&mut buf, 0),
        Err(StoreError::Damaged { .. })
    ));
}

/// Ten incremental snapshots in a row (no FULL coin): chains reach the bound exactly and the
/// partition at max_chain becomes FULL.
#[test]
fn chains_reach_depth_eight_and_stay_bounded() {
    let steps = (0..12)
        .map(|k| Step {
            ops: vec![Op::Write {
                vol: 0,
                offset: k * 70_000,
                len: 9000,
                seed: k + 1,
            }],
            full: false,
            hybrid_seed: u64::MAX,
        })
        .collect();
    assert_eq!(run_oracle([0, 0, 0], steps), MAX_CHAIN);
}

fn simple_snapshot(store: &Store, name: &str, parent: Option<&str>, data: &[u8]) {
    let w = store
        .begin(&sn(name), "g", G, parent.map(sn).as_ref())
        .unwrap();
    let h = w.add_volume(meta(0, data.len() as u64)).unwrap();
    let kind = if parent.is_some() {
        PartitionKind::Incremental
    } else {
        PartitionKind::Full
    };
    for p in 0..G.partitions(data.len() as u64) {
        w.set_partition(h, p, kind, "test").unwrap();
    }
    for b in 0..G.blocks(data.len() as u64) {
        w.put_block(h, BlockIdx(b), block_of(data, b)).unwrap();
    }
    w.commit().unwrap();
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_dropped_writer_leaves_nothing_and_open_sweeps_crashed_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    {
        let w = store.begin(&sn("dropped"), "g", G, None).unwrap();
        let h = w.add_volume(meta(0, 8192)).unwrap();
        w.put_block(h, BlockIdx(0), &[5u8; 4096]).unwrap();
    }
    assert!(store.names().unwrap().is_empty());
    assert!(matches!(
        store.open_volume(&sn("dropped"), vid(0)),
        Err(StoreError::NotFound(_))
    ));
    // What a killed process leaves behind: a temp dir with a pack, no lock held.
    let crashed = store.snapshots_dir().join(".tmp-crashed");
    std::fs::create_dir(&crashed).unwrap();
    std::fs::write(crashed.join("pack-000000"), vec![9u8; 100_000]).unwrap();
    let deleting = store.snapshots_dir().join(".del-old");
    std::fs::create_dir(&deleting).unwrap();
    // A build in progress in another handle must survive the sweep.
    let live = store.begin(&sn("live"), "g", G, None).unwrap();
    let h = live.add_volume(meta(0, 4096)).unwrap();
    live.set_partition(h, 0, PartitionKind::Full, "new")
        .unwrap();
    live.put_block(h, BlockIdx(0), &[3u8; 4096]).unwrap();
    let store2 = Store::open(tmp.path()).unwrap();
    assert!(!crashed.exists() && !deleting.exists());
    assert!(store2.snapshots_dir().join(".tmp-live").exists());
    assert!(store2.names().unwrap().is_empty());
    live.commit().unwrap();
    assert_eq!(store2.names().unwrap(), vec!["live"]);
    assert_eq!(read_all(&store2, "live", vid(0)), vec![3u8; 4096]);
}

#[test]
fn a_failed_commit_shows_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    // INCREMENTAL with no parent.
    let w = store.begin(&sn("a"), "g", G, None).unwrap();
    let h = w.add_volume(meta(0, 4096)).unwrap();
    w.set_partition(h, 0, PartitionKind::Incremental, "x")
        .unwrap();
    assert!(matches!(w.commit(), Err(StoreError::Chain { .. })));
    // A partition without a kind.
    let w = store.begin(&sn("a"), "g", G, None).unwrap();
    let h = w.add_volume(meta(0, 70_000)).unwrap();
    w.set_partition(h, 0, PartitionKind::Full, "x").unwrap();
    let e = w.commit().unwrap_err();
    assert!(e.to_string().contains("partition 1"), "{e}");
    // Blocks of the wrong length or past the end, stored twice.
    let w = store.begin(&sn("a"), "g", G, None).unwrap();
    let h = w.add_volume(meta(0, 5000)).unwrap();
    assert!(w.put_block(h, BlockIdx(1), &[1u8; 4096]).is_err());
    assert!(w.put_block(h, BlockIdx(2), &[1u8; 904]).is_err());
    w.put_block(h, BlockIdx(1), &[1u8; 904]).unwrap();
    w.put_block(h, BlockIdx(1), &[2u8; 904]).unwrap();
    w.set_partition(h, 0, PartitionKind::Full, "x").unwrap();
    assert!(w.commit().unwrap_err().to_string().contains("twice"));
    assert!(store.names().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(store.snapshots_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn names_are_checked_and_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    for bad in ["", ".tmp-x", "a/b", "sp ace", &"x".repeat(129)] {
        assert!(
            matches!(
                SnapshotName::parse(bad).map_err(StoreError::from),
                Err(StoreError::BadName { .. })
            ),
            "{bad:?}"
        );
    }
    simple_snapshot(&store, "one", None, &[1u8; 5000]);
    assert!(matches!(
        store.begin(&sn("one"), "g", G, None),
        Err(StoreError::NameTaken(_))
    ));
    let _building = store.begin(&sn("two"), "g", G, None).unwrap();
    assert!(matches!(
        store.begin(&sn("two"), "g", G, None),
        Err(StoreError::NameTaken(_))
    ));
    assert!(matches!(
        store.begin(&sn("three"), "g", G, Some(&sn("nope"))),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn list_reports_a_damaged_manifest_without_hiding_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    simple_snapshot(&store, "a", None, &[1u8; 9000]);
    simple_snapshot(&store, "b", Some("a"), &[2u8; 9000]);
    simple_snapshot(&store, "c", None, &[3u8; 100]);
    std::fs::write(
        store.snapshots_dir().join("b").join("manifest.json"),
        b"{\"format\": 1, \"name\": ",
    )
    .unwrap();
    let m = store.snapshots_dir().join("c").join("manifest.json");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replacen("\"format\": 1", "\"format\": 99", 1);
    std::fs::write(&m, text).unwrap();
    let listed = Store::open(tmp.path()).unwrap().list().unwrap();
    let names: Vec<_> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = listed[0].info.as_ref().unwrap();
    assert_eq!(a.volumes[0].kind, VolumeKind::Full);
    assert_eq!(a.logical_bytes, 9000);
    assert!(matches!(listed[1].info, Err(StoreError::Corrupt { .. })));
    assert!(matches!(
        listed[2].info,
        Err(StoreError::UnsupportedFormat { found: 99, .. })
    ));
    // A snapshot whose manifest is unreadable might depend on "a": refuse to delete it.
    assert!(matches!(
        store.delete(&sn("a")),
        Err(StoreError::HasDependents { .. })
    ));
}

#[test]
fn verify_names_the_volume_and_block_of_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let a: Vec<u8> = Noise::new(1).bytes(100_000);
    let b: Vec<u8> = Noise::new(2).bytes(50_000);
    let w = store.begin(&sn("base"), "g", G, None).unwrap();
    for (i, data) in [&a, &b].into_iter().enumerate() {
        let h = w.add_volume(meta(i, data.len() as u64)).unwrap();
        for p in 0..G.partitions(data.len() as u64) {
            w.set_partition(h, p, PartitionKind::Full, "new").unwrap();
        }
        for blk in 0..G.blocks(data.len() as u64) {
            w.put_block(h, BlockIdx(blk), block_of(data, blk)).unwrap();
        }
    }
    let m = w.commit().unwrap();
    // A child that changes volume 0 only, block 0.
    let w = store
        .begin(&sn("child"), "g", G, Some(&sn("base")))
        .unwrap();
    for (i, data) in [&a, &b].into_iter().enumerate() {
        let h = w.add_volume(meta(i, data.len() as u64)).unwrap();
        for p in 0..G.partitions(data.len() as u64) {
            w.set_partition(h, p, PartitionKind::Incremental, "delta")
                .unwrap();
        }
        if i == 0 {
            w.put_block(h, BlockIdx(0), &[0xaa; 4096]).unwrap();
        }
    }
    w.commit().unwrap();
    assert!(store.verify(&sn("base")).unwrap().ok());
    let good = store.verify(&sn("child")).unwrap();
    assert!(good.ok(), "{good:?}");
    assert_eq!(good.blocks, G.blocks(100_000) + G.blocks(50_000));

    let dir = store.snapshots_dir().join("base");
    let v1 = m.volume(vid(1)).unwrap();
    let table = format::load_table(&dir, v1.table.as_ref().unwrap()).unwrap();
    let rec = table.iter().find(|r| r.block == 5).unwrap();
    let pack = dir.join(&m.packs[rec.pack as usize].file);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[rec.offset as usize + 17] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();

    for snap in ["base", "child"] {
        let r = store.verify(&sn(snap)).unwrap();
        assert_eq!(r.problems.len(), 1, "{snap}: {r:?}");
        let p = &r.problems[0];
        assert_eq!(p.volume.as_deref(), Some("vols/v1.img"));
        assert_eq!(p.block, Some(5));
        assert_eq!(p.stored_in, "base");
    }

    // Reading it: every block before and after the damaged one reads as stored; the damaged
    // one is an error naming the snapshot read, the volume, the block and where it is stored.
    let r = store.open_volume(&sn("child"), vid(1)).unwrap();
    let bs = G.block_size as usize;
    let mut before = vec![0u8; 5 * bs];
    assert_eq!(r.read_at(&mut before, 0).unwrap(), 5 * bs);
    assert_eq!(before, b[..5 * bs]);
    let mut after = vec![0u8; b.len() - 6 * bs];
    assert_eq!(r.read_at(&mut after, 6 * bs as u64).unwrap(), after.len());
    assert_eq!(after, b[6 * bs..]);
    for (at, len) in [(5 * bs, 1), (5 * bs + 4000, 200), (4 * bs, 2 * bs)] {
        match r.read_at(&mut vec![0u8; len], at as u64) {
            Err(StoreError::Damaged {
                snapshot,
                volume,
                block,
                stored_in,
                ..
            }) => assert_eq!(
                (
                    snapshot.as_str(),
                    volume.as_str(),
                    block,
                    stored_in.as_str()
                ),
                ("child", "vols/v1.img", 5, "base")
            ),
            other => panic!("read of {len} at {at}: {other:?}"),
        }
    }
}

/// Write `byte` at `offset` of `path` in place (the pack keeps its inode; mtime moves).
fn poke(path: &Path, offset: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[byte], offset).unwrap();
}

#[test]
fn blocks_are_hashed_once_until_their_pack_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let data = Noise::new(9).bytes(20 * G.block_size as usize);
    let nblocks = G.blocks(data.len() as u64);
    let w = store.begin(&sn("s"), "g", G, None).unwrap();
    let h = w.add_volume(meta(0, data.len() as u64)).unwrap();
    for p in 0..G.partitions(data.len() as u64) {
        w.set_partition(h, p, PartitionKind::Full, "new").unwrap();
    }
    for blk in 0..nblocks {
        w.put_block(h, BlockIdx(blk), block_of(&data, blk)).unwrap();
    }
    let m = w.commit().unwrap();
    let dir = store.snapshots_dir().join("s");
    let table =
        format::load_table(&dir, m.volume(vid(0)).unwrap().table.as_ref().unwrap()).unwrap();
    let rec = table.iter().find(|r| r.block == 7).unwrap();
    let pack = dir.join(&m.packs[rec.pack as usize].file);

    let first = store.open_volume(&sn("s"), vid(0)).unwrap();
    assert_eq!(read_all(&store, "s", vid(0)), data);
    let mut all = vec![0u8; data.len()];
    first.read_at(&mut all, 0).unwrap();
    // Each block was hashed by one of the two readers, and only once in all: the other
    // found it proven already.
    let again = store.open_volume(&sn("s"), vid(0)).unwrap();
    again.read_at(&mut all, 0).unwrap();
    assert_eq!(all, data);
    assert_eq!(again.stats().hashed, 0, "{:?}", again.stats());
    assert_eq!(again.stats().preads, nblocks);
    // The lru cache serves a block read again without a pread or a hash.
    again.read_at(&mut all, 0).unwrap();
    assert_eq!((again.stats().preads, again.stats().hashed), (nblocks, 0));

    // The pack changes (a byte of block 7 flipped in place): proofs made before no longer
    // hold, block 7 is an error, the others are hashed again and read as stored.
    std::thread::sleep(std::time::Duration::from_millis(20));
    poke(&pack, rec.offset + 3, data[7 * 4096 + 3] ^ 0x01);
    let changed = store.open_volume(&sn("s"), vid(0)).unwrap();
    let mut block = vec![0u8; 4096];
    match changed.read_at(&mut block, 7 * 4096) {
        Err(StoreError::Damaged { block: 7, .. }) => {}
        other => panic!("damaged block 7 read as {other:?}"),
    }
    for b in (0..nblocks).filter(|&b| b != 7) {
        changed.read_at(&mut block, b * 4096).unwrap();
        assert_eq!(block, block_of(&data, b), "block {b}");
    }
    assert_eq!(changed.stats().hashed, nblocks, "{:?}", changed.stats());
    // A block proven and cached before the change still reads as what was proven.
    first.read_at(&mut block, 7 * 4096).unwrap();
    assert_eq!(block, block_of(&data, 7));

    // Repaired: block 7 reads again, and is hashed again (the pack changed once more).
    std::thread::sleep(std::time::Duration::from_millis(20));
    poke(&pack, rec.offset + 3, data[7 * 4096 + 3]);
    let repaired = store.open_volume(&sn("s"), vid(0)).unwrap();
    repaired.read_at(&mut block, 7 * 4096).unwrap();
    assert_eq!(block, block_of(&data, 7));
    assert_eq!(repaired.stats().hashed, 1);
}

#[test]
fn holes_cost_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let g = Geometry {
        block_size: 64 << 10,
        partition_size: 64 << 20,
    };
    let size = 64u64 << 20;
    let w = store.begin(&sn("zeros"), "g", g, None).unwrap();
    let h = w.add_volume(meta(0, size)).unwrap();
    w.set_partition(h, 0, PartitionKind::Full, "new").unwrap();
    let zero = vec![0u8; g.block_size as usize];
    for b in 0..g.blocks(size) {
        w.put_block(h, BlockIdx(b), &zero).unwrap();
    }
    let m = w.commit().unwrap();
    assert_eq!(m.volume(vid(0)).unwrap().stored_bytes, 0);
    assert!(m.packs.is_empty());
    let on_disk = dir_bytes(&store.snapshots_dir().join("zeros"));
    assert!(on_disk < 16 << 10, "{on_disk} bytes on disk");
    let r = store.open_volume(&sn("zeros"), vid(0)).unwrap();
    assert_eq!(r.size(), size);
    let mut buf = vec![1u8; 1 << 20];
    assert_eq!(r.read_at(&mut buf, size - (1 << 20)).unwrap(), 1 << 20);
    assert!(buf.iter().all(|&x| x == 0));
    assert_eq!(r.stats().preads, 0);
}

#[test]
fn a_depth_eight_reader_resolves_once_and_keeps_its_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let mut data = Noise::new(9).bytes(300_000);
    simple_snapshot(&store, "d1", None, &data);
    for k in 2..=8u64 {
        let w = store
            .begin(
                &sn(&format!("d{k}")),
                "g",
                G,
                Some(&sn(&format!("d{}", k - 1))),
            )
            .unwrap();
        let h = w.add_volume(meta(0, data.len() as u64)).unwrap();
        for p in 0..G.partitions(data.len() as u64) {
            w.set_partition(h, p, PartitionKind::Incremental, "delta")
                .unwrap();
        }
        // Each level changes one block in every partition.
        for p in 0..G.partitions(data.len() as u64) {
            let b = p * G.blocks_per_partition() + k;
            let s = (b * G.block_size) as usize;
            data[s..s + 4096].copy_from_slice(&Noise::new(k * 1000 + p).bytes(4096));
            w.put_block(h, BlockIdx(b), block_of(&data, b)).unwrap();
        }
        let m = w.commit().unwrap();
        assert_eq!(m.depth(vid(0), 0), Some(k as u32));
    }
    let r = store.open_volume(&sn("d8"), vid(0)).unwrap();
    assert_eq!(r.depth(), 8);
    // The chain is resolved: reads need neither the manifests nor the directories of the
    // ancestors any more (their packs stay open).
    for k in 1..=7 {
        std::fs::remove_dir_all(store.snapshots_dir().join(format!("d{k}"))).unwrap();
    }
    let mut got = vec![0u8; data.len()];
    assert_eq!(r.read_at(&mut got, 0).unwrap(), data.len());
    assert!(got == data, "depth-8 read differs from the model");
    let first = r.stats();
    assert_eq!(first.preads, G.blocks(data.len() as u64));
    // Hot blocks come from the lru cache.
    let mut again = vec![0u8; 8192];
    r.read_at(&mut again, 4096).unwrap();
    assert_eq!(r.stats().preads, first.preads);
    assert_eq!(r.stats().cache_hits, first.cache_hits + 2);
    // A fresh open now finds the chain broken, and says where.
    let e = store.open_volume(&sn("d8"), vid(0)).unwrap_err();
    assert!(matches!(e, StoreError::Chain { .. }), "{e}");
    assert!(e.to_string().contains("d7"), "{e}");
}

#[test]
fn delete_merges_a_parent_into_its_child_and_removes_a_leaf_durably() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    simple_snapshot(&store, "p", None, &Noise::new(3).bytes(20_000));
    let child = Noise::new(4).bytes(20_000);
    simple_snapshot(&store, "c", Some("p"), &child);
    assert_eq!(store.dependents(&sn("p")).unwrap(), ["c"]);
    assert!(matches!(
        store.delete(&sn("zz")),
        Err(StoreError::NotFound(_))
    ));
    store.delete(&sn("p")).unwrap();
    assert_eq!(store.manifest(&sn("c")).unwrap().parent, None);
    assert!(read_all(&store, "c", vid(0)) == child);
    assert!(store.verify(&sn("c")).unwrap().ok());
    store.delete(&sn("c")).unwrap();
    assert!(store.names().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(store.snapshots_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".deleting"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_volume_that_shrank_and_grew_reads_zeros_where_it_was_cut() {
    // p: 5 blocks of data. m: cut to 4096 + 10 bytes, storing only its new partial block 1.
    // c: grown back to 5 blocks, storing nothing. p's bytes past m's end must not show
    // through in c: a shorter snapshot on the chain cuts the data there.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let parent = Noise::new(5).bytes(5 * 4096);
    simple_snapshot(&store, "p", None, &parent);
    let mut mid = parent[..4096].to_vec();
    mid.extend(Noise::new(6).bytes(10));
    let w = store.begin(&sn("m"), "g", G, Some(&sn("p"))).unwrap();
    let h = w.add_volume(meta(0, mid.len() as u64)).unwrap();
    w.set_partition(h, 0, PartitionKind::Incremental, "delta")
        .unwrap();
    w.put_block(h, BlockIdx(1), block_of(&mid, 1)).unwrap();
    w.commit().unwrap();
    assert!(read_all(&store, "m", vid(0)) == mid);
    let mut child = mid.clone();
    child.resize(5 * 4096, 0);
    let w = store.begin(&sn("c"), "g", G, Some(&sn("m"))).unwrap();
    let h = w.add_volume(meta(0, child.len() as u64)).unwrap();
    w.set_partition(h, 0, PartitionKind::Incremental, "delta")
        .unwrap();
    w.commit().unwrap();
    assert!(read_all(&store, "c", vid(0)) == child);
    assert!(store.verify(&sn("c")).unwrap().ok());
}

/// Every command opens (and so sweeps) the store while a daemon may be writing in it: opens
/// racing builds and record writes in another handle never take what those are making (a
/// `snapshot list` once swept the `.tmp-` dir a prune had just created).
#[test]
fn opens_racing_builds_and_records_take_nothing_live() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let (dir, stop) = (tmp.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    Store::open(&dir).unwrap();
                }
            })
        })
        .collect();
    for i in 0..100 {
        let name = sn(&format!("s{i:03}"));
        let w = store.begin(&name, "g", G, None).unwrap();
        let h = w.add_volume(meta(0, 4096)).unwrap();
        w.set_partition(h, 0, PartitionKind::Full, "new").unwrap();
        w.put_block(h, BlockIdx(0), &[i as u8; 4096]).unwrap();
        w.commit().unwrap();
        store.hold(&name, "keep").unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in sweepers {
        s.join().unwrap();
    }
    assert_eq!(store.names().unwrap().len(), 100);
    assert_eq!(store.holds().unwrap().len(), 100);
}
