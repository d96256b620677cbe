//! Delete with merge, case by case, on the in-memory store: each test builds a small chain
//! with known bytes, deletes a snapshot and checks that every survivor reads exactly the bytes
//! it was written with and verifies, and that the rewritten child has the records, kinds,
//! depths and parent the merge rules say.

use std::collections::BTreeMap;

use super::*;
use crate::ids::{BlockIdx, VolumeId};
use crate::store::{Store, VolumeMeta};

const BS: u64 = 4096;
/// Four blocks per partition.
const G: Geometry = Geometry {
    block_size: BS,
    partition_size: 4 * BS,
};

fn n(s: &str) -> SnapshotName {
    SnapshotName::parse(s).unwrap()
}

fn vid(i: usize) -> VolumeId {
    VolumeId {
        dev: 9,
        ino: 10 + i as u64,
    }
}

/// `len` bytes no block of which is all zero.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    for b in v.iter_mut().step_by(512) {
        *b |= 1;
    }
    v
}

/// A store, and the bytes every volume of every snapshot was written with.
struct Chain {
    store: Store,
    oracle: BTreeMap<(String, usize), Vec<u8>>,
}

/// Block `b` of `data`, `len` bytes, zeros past its end.
fn block(data: &[u8], b: u64, len: usize) -> Vec<u8> {
    let s = (b * BS) as usize;
    let mut out = vec![0u8; len];
    if s < data.len() {
        let k = (data.len() - s).min(len);
        out[..k].copy_from_slice(&data[s..s + k]);
    }
    out
}

impl Chain {
    fn new() -> Chain {
        Chain {
            store: Store::in_memory(),
            oracle: BTreeMap::new(),
        }
    }

    /// Snapshot `name` over `parent`: volume i with `data`, partition p FULL where
    /// `kinds[p]` is 'F' (the last letter repeats). INCREMENTAL partitions store the blocks
    /// that differ from the parent's bytes.
    fn snap(&mut self, name: &str, parent: Option<&str>, vols: &[(usize, &[u8], &str)]) {
        let w = self
            .store
            .begin(&n(name), "g", G, parent.map(n).as_ref())
            .unwrap();
        for &(i, data, kinds) in vols {
            let h = w
                .add_volume(VolumeMeta {
                    id: vid(i),
                    path: format!("v{i}"),
                    size: data.len() as u64,
                    mode: 0o100600,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                })
                .unwrap();
            let before = parent.and_then(|p| self.oracle.get(&(p.to_string(), i)));
            for p in 0..G.partitions(data.len() as u64) {
                let k = kinds.as_bytes()[(p as usize).min(kinds.len() - 1)];
                let full = k == b'F';
                let kind = if full {
                    PartitionKind::Full
                } else {
                    PartitionKind::Incremental
                };
                w.set_partition(h, p, kind, "test").unwrap();
                for b in p * 4..((p + 1) * 4).min(G.blocks(data.len() as u64)) {
                    let len = (BS as usize).min(data.len() - (b * BS) as usize);
                    let cur = block(data, b, len);
                    let prev = before.map(|d| block(d, b, len));
                    if full || prev.as_ref() != Some(&cur) {
                        w.put_block(h, BlockIdx(b), &cur).unwrap();
                    }
                }
            }
            self.oracle.insert((name.to_string(), i), data.to_vec());
        }
        w.commit().unwrap();
    }

    fn manifest(&self, name: &str) -> Manifest {
        self.store.manifest(&n(name)).unwrap()
    }

    fn records(&self, name: &str, i: usize) -> Vec<Record> {
        let m = self.manifest(name);
        table_of(&**self.store.backend(), &n(name), m.volume(vid(i)).unwrap()).unwrap()
    }

    fn delete(&mut self, name: &str) -> DeleteReport {
        let r = self.store.delete_with(&n(name), &mut |_| {}).unwrap();
        self.oracle.retain(|(s, _), _| s != name);
        self.check();
        r
    }

    /// Every survivor reads its bytes and verifies; the deleted ones are gone.
    fn check(&self) {
        let names = self.store.names().unwrap();
        for ((s, i), want) in &self.oracle {
            assert!(names.contains(s), "{s} went missing");
            let r = self.store.open_volume(&n(s), vid(*i)).unwrap();
            let mut got = vec![0xAAu8; want.len()];
            assert_eq!(r.read_at(&mut got, 0).unwrap(), want.len());
            assert!(got == *want, "{s} v{i} reads differently");
            assert!(self.store.verify(&n(s)).unwrap().ok(), "{s}");
        }
        assert!(names
            .iter()
            .all(|s| self.oracle.keys().any(|(o, _)| o == s)));
        assert!(load_deleting(&**self.store.backend()).unwrap().is_empty());
    }

    fn kinds(&self, name: &str, i: usize) -> Vec<(PartitionKind, u32)> {
        let m = self.manifest(name);
        m.volume(vid(i))
            .unwrap()
            .partitions
            .iter()
            .map(|p| (p.kind, p.depth))
            .collect()
    }
}

use PartitionKind::{Full as F, Incremental as I};

#[test]
fn a_full_parent_merges_into_an_incremental_child_as_full() {
    let mut c = Chain::new();
    let x = noise(1, 10 * BS as usize);
    let mut y = x.clone();
    y[5 * BS as usize..6 * BS as usize].fill(7);
    y[9 * BS as usize..].fill(0);
    c.snap("x", None, &[(0, &x, "F")]);
    c.snap("c", Some("x"), &[(0, &y, "I")]);
    assert_eq!(c.kinds("c", 0), [(I, 2); 3]);
    let r = c.delete("x");
    assert_eq!(r.rewritten, ["c"]);
    let m = c.manifest("c");
    assert_eq!(m.parent, None);
    assert_eq!(c.kinds("c", 0), [(F, 1); 3]);
    // The zero block C recorded is dropped (FULL omits it); X's block 5 and 9 are not taken.
    let recs = c.records("c", 0);
    assert!(recs.iter().all(|r| !r.is_zero()));
    assert_eq!(recs.len(), 9);
    assert_eq!(r.bytes_copied, 8 * BS);
    assert_eq!(r.bytes_freed, 16 + 10 * BS);
}

#[test]
fn a_pack_the_child_needs_whole_is_adopted_not_copied() {
    let mut c = Chain::new();
    let x = noise(2, 6 * BS as usize);
    let mut y = x.clone();
    y.extend(noise(3, BS as usize));
    c.snap("x", None, &[(0, &x, "F")]);
    c.snap("c", Some("x"), &[(0, &y, "I")]);
    let r = c.delete("x");
    assert_eq!(r.bytes_copied, 0);
    assert_eq!(r.bytes_freed, 0);
    assert_eq!(c.manifest("c").packs.len(), 2);
}

#[test]
fn an_incremental_parent_leaves_the_child_incremental_over_the_grandparent() {
    let mut c = Chain::new();
    let p = noise(4, 8 * BS as usize);
    let mut x = p.clone();
    x[BS as usize..BS as usize + 9].fill(3);
    x[3 * BS as usize..3 * BS as usize + 9].fill(5);
    x[6 * BS as usize..7 * BS as usize].fill(0);
    let mut y = x.clone();
    y[3 * BS as usize] = 0xEE;
    c.snap("p", None, &[(0, &p, "F")]);
    c.snap("x", Some("p"), &[(0, &x, "I")]);
    c.snap("c", Some("x"), &[(0, &y, "I")]);
    assert_eq!(c.kinds("c", 0), [(I, 3), (I, 3)]);
    let r = c.delete("x");
    assert_eq!(r.rewritten, ["c"]);
    assert_eq!(c.manifest("c").parent.as_deref(), Some("p"));
    assert_eq!(c.kinds("c", 0), [(I, 2), (I, 2)]);
    // X's block 1 (copied: X's block 3 is not needed, so its pack is not adopted), C's block
    // 3 and X's ZERO record for block 6.
    let recs = c.records("c", 0);
    let blocks: Vec<(u64, bool)> = recs.iter().map(|r| (r.block, r.is_zero())).collect();
    assert_eq!(blocks, [(1, false), (3, false), (6, true)]);
    assert_eq!(r.bytes_copied, BS);
}

#[test]
fn a_shorter_middle_snapshot_is_reproduced_with_zero_records_and_a_cut_block() {
    // P: 7 blocks of data. X: cut to one block and 10 bytes (stores nothing: its bytes are
    // P's). C: grown back to 7 blocks, stores only block 5. C read zeros past X's end
    // (blocks 2, 3, 4, 6 and the tail of block 1); over P they would show P's data.
    let mut c = Chain::new();
    let p = noise(5, 7 * BS as usize);
    let x = p[..BS as usize + 10].to_vec();
    let mut y = x.clone();
    y.resize(7 * BS as usize, 0);
    y[5 * BS as usize..6 * BS as usize].fill(4);
    c.snap("p", None, &[(0, &p, "F")]);
    c.snap("x", Some("p"), &[(0, &x, "I")]);
    assert!(c.manifest("x").volumes[0].table.is_none());
    c.snap("c", Some("x"), &[(0, &y, "I")]);
    let r = c.delete("x");
    // Partition 1 was past X's end: its chain ended there, so it is FULL now.
    assert_eq!(c.kinds("c", 0), [(I, 2), (F, 1)]);
    let recs = c.records("c", 0);
    let got: Vec<(u64, bool, u32)> = recs.iter().map(|r| (r.block, r.is_zero(), r.len)).collect();
    assert_eq!(
        got,
        [
            (1, false, 10),
            (2, true, 0),
            (3, true, 0),
            (5, false, BS as u32),
        ]
    );
    assert_eq!(r.bytes_copied, 10);
    // The cut block carries the hash of its 10 bytes: a rescan can compare it.
    let hashes = c.store.block_hashes(&n("c"), vid(0)).unwrap();
    assert_eq!(
        hashes[&1],
        Some(*blake3::hash(&p[BS as usize..BS as usize + 10]).as_bytes())
    );
}

#[test]
fn a_volume_the_deleted_snapshot_lacks_and_a_full_partition_of_the_child_stay_as_they_are() {
    let mut c = Chain::new();
    let p0 = noise(6, 9 * BS as usize);
    let x0 = {
        let mut v = p0.clone();
        v[BS as usize] ^= 0xFF;
        v
    };
    let y0 = {
        let mut v = x0.clone();
        v[5 * BS as usize] ^= 0xFF;
        v
    };
    let y1 = noise(7, 3 * BS as usize + 5);
    c.snap("p", None, &[(0, &p0, "F")]);
    c.snap("x", Some("p"), &[(0, &x0, "I")]);
    // Partition 0 FULL, 1 and 2 INCREMENTAL; volume 1 is new (FULL).
    c.snap("c", Some("x"), &[(0, &y0, "FI"), (1, &y1, "F")]);
    let before1 = c.records("c", 1);
    c.delete("x");
    assert_eq!(c.kinds("c", 0), [(F, 1), (I, 2), (I, 2)]);
    assert_eq!(c.kinds("c", 1), [(F, 1)]);
    assert_eq!(c.records("c", 1), before1);
}

#[test]
fn every_child_of_the_deleted_snapshot_is_rewritten() {
    let mut c = Chain::new();
    let x = noise(8, 5 * BS as usize);
    let mut a = x.clone();
    a[0] ^= 1;
    let mut b = x.clone();
    b.truncate(2 * BS as usize + 1);
    c.snap("x", None, &[(0, &x, "F")]);
    c.snap("a", Some("x"), &[(0, &a, "I")]);
    c.snap("b", Some("x"), &[(0, &b, "I")]);
    let mut seen = Vec::new();
    let r = c
        .store
        .delete_with(&n("x"), &mut |done| seen.push(done))
        .unwrap();
    c.oracle.retain(|(s, _), _| s != "x");
    c.check();
    assert_eq!(r.rewritten, ["a", "b"]);
    assert_eq!(seen.last().copied(), Some(r.bytes_copied));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn oldest_middle_and_newest_go_in_turn_and_every_survivor_reads_the_same() {
    for order in [["s0", "s2", "s3"], ["s3", "s1", "s0"], ["s1", "s2", "s0"]] {
        let mut c = Chain::new();
        let mut v = noise(9, 11 * BS as usize + 77);
        c.snap("s0", None, &[(0, &v, "F")]);
        for k in 1..4u64 {
            let at = (k * BS) as usize;
            v[at..at + 100].fill(k as u8);
            if k == 2 {
                v.truncate(5 * BS as usize - 3);
            } else {
                v.extend(noise(10 + k, 2 * BS as usize));
            }
            let kinds = if k == 2 { "IF" } else { "I" };
            c.snap(
                &format!("s{k}"),
                Some(&format!("s{}", k - 1)),
                &[(0, &v, kinds)],
            );
        }
        for s in order {
            c.delete(s);
        }
        let left = c.store.names().unwrap();
        assert_eq!(left.len(), 1, "{order:?}");
    }
}

#[test]
fn a_held_snapshot_and_a_store_with_an_unreadable_manifest_refuse_the_delete() {
    let mut c = Chain::new();
    let x = noise(11, 3 * BS as usize);
    c.snap("x", None, &[(0, &x, "F")]);
    c.snap("c", Some("x"), &[(0, &x, "I")]);
    c.store.hold(&n("x"), "keep").unwrap();
    assert!(matches!(
        c.store.delete(&n("x")),
        Err(StoreError::Held { .. })
    ));
    c.store.release(&n("x"), None).unwrap();
    // A snapshot without its manifest might build on x.
    c.store
        .backend()
        .stage(&n("odd"), StageMode::New)
        .unwrap()
        .commit(b"not json")
        .unwrap();
    let e = c.store.delete(&n("x")).unwrap_err();
    assert!(matches!(e, StoreError::HasDependents { .. }), "{e}");
    assert!(e.to_string().contains("odd"), "{e}");
    assert!(load_deleting(&**c.store.backend()).unwrap().is_empty());
}

#[test]
fn resume_finishes_a_recorded_delete_and_skips_a_child_already_rewritten() {
    let mut c = Chain::new();
    let x = noise(12, 6 * BS as usize);
    let mut a = x.clone();
    a[0] ^= 1;
    c.snap("x", None, &[(0, &x, "F")]);
    c.snap("a", Some("x"), &[(0, &a, "I")]);
    c.snap("b", Some("x"), &[(0, &a, "I")]);
    let b = c.store.backend().clone();
    // As a crash after the first child's rewrite leaves it.
    note_deleting(
        &*b,
        Deleting {
            name: "x".into(),
            parent: None,
        },
    )
    .unwrap();
    let m = load_manifest_from(&*b, &n("x")).unwrap();
    let extents = extents_of(&*b, &n("x"), &m).unwrap();
    let del = Deleted {
        name: &n("x"),
        manifest: &m,
        extents: &extents,
    };
    assert!(rewrite_child(&*b, &del, &n("a"), &mut |_| {})
        .unwrap()
        .is_some());
    assert!(rewrite_child(&*b, &del, &n("a"), &mut |_| {})
        .unwrap()
        .is_none());
    assert_eq!(c.store.resume_deletes().unwrap(), ["x"]);
    c.oracle.retain(|(s, _), _| s != "x");
    c.check();
    assert!(c.store.resume_deletes().unwrap().is_empty());
}
