//! Deleting any snapshot of a chain (delete with merge), against an oracle: the blake3 of
//! every volume as it was written. Random chains (1 to 3 volumes that grow and shrink, come
//! and go, with zero blocks, holes and a random FULL or INCREMENTAL kind per partition) lose
//! snapshots in a random order, in memory and in a directory; after each delete every
//! survivor reads its oracle bytes and verifies, and the store holds exactly the bytes the
//! survivors reference. Then faults (EIO, ENOSPC, a torn write, an error after the effect) at
//! every store call of a delete, and kill -9 of a process deleting, each followed by
//! `resume_deletes`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grainfs::ids::{BlockIdx, Geometry, SnapshotName, VolumeId};
use grainfs::store::failing::{Failing, Fault};
use grainfs::store::format::{decode_table, PACK_HEADER_LEN};
use grainfs::store::memory::MemoryStore;
use grainfs::store::merge::load_deleting;
use grainfs::store::{PartitionKind, Store, VolumeMeta};
use proptest::prelude::*;

const BS: u64 = 4096;
/// Four blocks per partition.
const G: Geometry = Geometry {
    block_size: BS,
    partition_size: 4 * BS,
};
const MAX_BLOCKS: u64 = 14;

fn sn(s: &str) -> SnapshotName {
    SnapshotName::parse(s).unwrap()
}

fn vid(i: usize) -> VolumeId {
    VolumeId {
        dev: 3,
        ino: 50 + i as u64,
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// One volume in one snapshot: its new size, the blocks written (seed 0: zeros), and which
/// partitions are FULL (bit p of `full`), when the volume is there at all.
#[derive(Clone, Debug)]
struct VolStep {
    present: bool,
    size: u64,
    writes: Vec<(u64, u64)>,
    full: u64,
}

fn vol_step() -> impl Strategy<Value = VolStep> {
    (
        prop::bool::weighted(0.9),
        0..=MAX_BLOCKS * BS + 100,
        prop::collection::vec(
            (
                0..MAX_BLOCKS,
                prop_oneof![1 => Just(0u64), 3 => 1..u64::MAX],
            ),
            0..6,
        ),
        any::<u64>(),
    )
        .prop_map(|(present, size, writes, full)| VolStep {
            present,
            size,
            writes,
            full,
        })
}

/// A snapshot: one step per volume (volume 0 is always there).
fn chain() -> impl Strategy<Value = Vec<Vec<VolStep>>> {
    prop::collection::vec(prop::collection::vec(vol_step(), 1..=3), 1..7)
}

/// The bytes every snapshot was written with, by (snapshot, volume).
type Oracle = BTreeMap<(String, usize), [u8; 32]>;

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

/// Write the chain `steps` (snapshot k over k-1) into `store`; returns the oracle.
fn build(store: &Store, steps: &[Vec<VolStep>]) -> Oracle {
    let mut oracle = Oracle::new();
    let mut live: Vec<Vec<u8>> = vec![Vec::new(); 3];
    let mut before: Vec<Option<Vec<u8>>> = vec![None; 3];
    for (k, step) in steps.iter().enumerate() {
        let name = format!("s{k}");
        let parent = (k > 0).then(|| sn(&format!("s{}", k - 1)));
        let w = store.begin(&sn(&name), "g", G, parent.as_ref()).unwrap();
        let mut now: Vec<Option<Vec<u8>>> = vec![None; 3];
        for (i, v) in step.iter().enumerate() {
            if !v.present && i > 0 {
                continue;
            }
            let data = &mut live[i];
            data.resize(v.size as usize, 0);
            for &(b, seed) in &v.writes {
                let s = (b * BS) as usize;
                if s >= data.len() {
                    continue;
                }
                let e = (s + BS as usize).min(data.len());
                let bytes = if seed == 0 {
                    vec![0; e - s]
                } else {
                    noise(seed, e - s)
                };
                data[s..e].copy_from_slice(&bytes);
            }
            let h = w
                .add_volume(VolumeMeta {
                    id: vid(i),
                    path: format!("v{i}.img"),
                    size: v.size,
                    mode: 0o100644,
                    uid: 1,
                    gid: 1,
                    mtime_ns: 0,
                })
                .unwrap();
            let prev = before[i].as_deref();
            for p in 0..G.partitions(v.size) {
                // INCREMENTAL needs the volume in the parent.
                let full = prev.is_none() || (v.full >> (p % 64)) & 1 == 1;
                let kind = if full {
                    PartitionKind::Full
                } else {
                    PartitionKind::Incremental
                };
                w.set_partition(h, p, kind, "test").unwrap();
                for b in p * 4..((p + 1) * 4).min(G.blocks(v.size)) {
                    let len = (BS as usize).min(data.len() - (b * BS) as usize);
                    let cur = block(data, b, len);
                    let written = v.writes.iter().any(|w| w.0 == b);
                    if full || written || prev.map(|d| block(d, b, len)) != Some(cur.clone()) {
                        w.put_block(h, BlockIdx(b), &cur).unwrap();
                    }
                }
            }
            oracle.insert((name.clone(), i), *blake3::hash(data).as_bytes());
            now[i] = Some(data.clone());
        }
        w.commit().unwrap();
        before = now;
    }
    oracle
}

/// Every snapshot in the store is in the oracle, reads its oracle bytes and verifies.
fn check_reads(store: &Store, oracle: &Oracle, what: &str) {
    for name in store.names().unwrap() {
        let vols: Vec<_> = oracle.iter().filter(|((s, _), _)| *s == name).collect();
        assert!(!vols.is_empty(), "{what}: {name} is not a snapshot written");
        for ((_, i), want) in vols {
            let r = store
                .open_volume(&sn(&name), vid(*i))
                .unwrap_or_else(|e| panic!("{what}: {name} v{i}: {e}"));
            let mut got = vec![0u8; r.size() as usize];
            assert_eq!(r.read_at(&mut got, 0).unwrap(), got.len());
            assert!(
                blake3::hash(&got).as_bytes() == want,
                "{what}: {name} v{i} reads differently"
            );
        }
        let report = store.verify(&sn(&name)).unwrap();
        assert!(report.ok(), "{what}: {report:?}");
    }
}

/// The store holds exactly what the survivors reference. Pack files are counted once by
/// identity (a pack adopted by two children is one file). In each, the extents the survivors'
/// records point at, sorted, must tile the file after its header: each starts where the one
/// before ended, except that an extent copied from an aligned one may start at the next 4 KiB
/// boundary (the hole a reflink needs). So no byte of a deleted snapshot that no survivor
/// needs is left, and no survivor lost one. In a directory, nothing else is there either.
fn check_space(store: &Store, what: &str) {
    let b = store.backend();
    let mut packs: HashMap<(u64, u64), (u64, BTreeMap<u64, u32>)> = HashMap::new();
    let mut dirs = BTreeSet::new();
    for name in store.names().unwrap() {
        let n = sn(&name);
        let m = store.manifest(&n).unwrap();
        let mut keys = Vec::new();
        let mut files: BTreeSet<String> = BTreeSet::from(["manifest.json".to_string()]);
        for p in &m.packs {
            let key = b.open_pack(&n, &p.file).unwrap().stamp().unwrap().0;
            assert_eq!(b.len(&n, &p.file).unwrap(), p.len, "{what}: {name}");
            packs.entry(key).or_insert((p.len, BTreeMap::new()));
            keys.push(key);
            files.insert(p.file.clone());
        }
        for v in &m.volumes {
            let Some(t) = &v.table else { continue };
            files.insert(t.file.clone());
            let recs = decode_table(&b.read(&n, &t.file).unwrap(), Path::new(&t.file), t).unwrap();
            for r in recs.iter().filter(|r| !r.is_zero()) {
                let ext = &mut packs.get_mut(&keys[r.pack as usize]).unwrap().1;
                let had = ext.insert(r.offset, r.len);
                assert!(
                    had.is_none_or(|l| l == r.len),
                    "{what}: overlapping extents"
                );
            }
        }
        dirs.insert(name.clone());
        let dir = store.snapshots_dir().join(&name);
        if dir.is_dir() {
            let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(on_disk, files, "{what}: {name} holds other files");
        }
    }
    for (len, extents) in packs.values() {
        assert!(!extents.is_empty(), "{what}: a pack no survivor reads");
        let mut at = PACK_HEADER_LEN;
        for (&o, &l) in extents {
            let gap_ok = o > at && o % 4096 == 0 && l % 4096 == 0 && o - at < 4096;
            assert!(o == at || gap_ok, "{what}: unreferenced bytes {at}..{o}");
            at = o + l as u64;
        }
        assert_eq!(at, *len, "{what}: unreferenced bytes at the end of a pack");
    }
    if store.snapshots_dir().is_dir() {
        for e in std::fs::read_dir(store.snapshots_dir()).unwrap() {
            let f = e.unwrap().file_name().to_string_lossy().into_owned();
            // A record's temp file a kill left behind (a few bytes) is swept only once it is
            // old: a young one may be a live daemon's write in progress.
            let record_temp = f.starts_with("..") && f.ends_with(".tmp");
            assert!(
                dirs.contains(&f) || f == ".deleting.json" || f == ".holds.json" || record_temp,
                "{what}: {f} left in the store"
            );
        }
    }
}

/// Delete the snapshots `order` picks (a random subset in a random order), checking after
/// each.
fn run(store: &Store, steps: &[Vec<VolStep>], order: &[prop::sample::Index]) {
    let mut oracle = build(store, steps);
    check_reads(store, &oracle, "built");
    check_space(store, "built");
    for pick in order {
        let names = store.names().unwrap();
        if names.is_empty() {
            break;
        }
        let x = pick.get(&names).clone();
        let r = store.delete_with(&sn(&x), &mut |_| {}).unwrap();
        assert!(r.rewritten.iter().all(|c| names.contains(c)));
        oracle.retain(|(s, _), _| *s != x);
        let what = format!("after deleting {x}");
        assert!(!store.exists(&sn(&x)).unwrap(), "{what}");
        check_reads(store, &oracle, &what);
        check_space(store, &what);
        assert!(load_deleting(&**store.backend()).unwrap().is_empty());
    }
}

proptest! {
    #[test]
    fn any_delete_in_memory_keeps_every_survivor_and_frees_the_rest(
        steps in chain(),
        order in prop::collection::vec(any::<prop::sample::Index>(), 1..7),
    ) {
        run(&Store::in_memory(), &steps, &order);
    }
}

proptest! {
    // A directory store fsyncs at every commit: fewer cases keep this file well under 30 s.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_delete_in_a_directory_keeps_every_survivor_and_frees_the_rest(
        steps in chain(),
        order in prop::collection::vec(any::<prop::sample::Index>(), 1..7),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        run(&Store::open(tmp.path()).unwrap(), &steps, &order);
    }
}

/// A fixed chain with every case of a merge: FULL and INCREMENTAL partitions, a volume that
/// shrinks mid-block then grows, one that appears later, zero blocks.
fn fixed_chain() -> Vec<Vec<VolStep>> {
    let v = |size: u64, writes: &[(u64, u64)], full: u64| VolStep {
        present: true,
        size,
        writes: writes.to_vec(),
        full,
    };
    let gone = VolStep {
        present: false,
        size: 0,
        writes: vec![],
        full: 0,
    };
    vec![
        vec![v(12 * BS, &[(0, 1), (3, 2), (5, 3), (9, 4), (11, 5)], 0)],
        vec![
            v(12 * BS, &[(3, 6), (5, 0), (10, 7)], 0b010),
            v(5 * BS + 7, &[(0, 8), (4, 9)], 0),
        ],
        vec![v(BS + 100, &[(1, 10)], 0), gone.clone()],
        vec![
            v(13 * BS + 5, &[(2, 11), (12, 12)], 0b100),
            v(3 * BS, &[(1, 13)], 0),
        ],
    ]
}

/// Faults at every store call of deleting each snapshot of the fixed chain in turn: after
/// each, every snapshot left reads its oracle bytes and verifies; `resume_deletes` then
/// finishes the delete or has nothing to do; a retry of a failed delete succeeds; the store
/// ends holding only what the survivors reference.
fn faults_on(make: &dyn Fn() -> Arc<dyn grainfs::store::Backend>, kinds: &[Fault], stride: u64) {
    let mut fired = 0;
    for target in ["s0", "s1", "s2", "s3"] {
        // Calls a delete makes, counted on a clean run.
        let probe = Arc::new(Failing::new(make()));
        let store = Store::on(probe.clone());
        build(&store, &fixed_chain());
        let start = probe.calls();
        store.delete(&sn(target)).unwrap();
        let calls = probe.calls() - start;
        for nth in (0..calls + 2).step_by(stride as usize) {
            for &fault in kinds {
                let faults = Arc::new(Failing::new(make()));
                let store = Store::on(faults.clone());
                let mut oracle = build(&store, &fixed_chain());
                faults.fail_at(nth, fault);
                let r = store.delete(&sn(target));
                faults.disarm();
                let what = format!("delete {target}, {fault:?} at call {nth}: {r:?}");
                if faults.fired().is_some() {
                    fired += 1;
                } else {
                    assert!(r.is_ok(), "{what}");
                }
                // Old or new, for every snapshot: it reads as written.
                let mut all = oracle.clone();
                if !store.exists(&sn(target)).unwrap() {
                    all.retain(|(s, _), _| s != target);
                }
                check_reads(&store, &all, &what);
                store.resume_deletes().unwrap();
                assert!(load_deleting(&*faults).unwrap().is_empty(), "{what}");
                check_reads(&store, &all, &what);
                if store.exists(&sn(target)).unwrap() {
                    store.delete(&sn(target)).unwrap();
                }
                oracle.retain(|(s, _), _| s != target);
                check_reads(&store, &oracle, &what);
                check_space(&store, &what);
            }
        }
    }
    assert!(fired > 100, "only {fired} faults fired");
}

#[test]
fn a_fault_at_any_call_of_a_delete_in_memory_leaves_old_or_new_and_resume_completes() {
    faults_on(
        &|| Arc::new(MemoryStore::default()),
        &[Fault::Io, Fault::NoSpace, Fault::Torn, Fault::After],
        1,
    );
}

#[test]
fn a_fault_at_any_call_of_a_delete_in_a_directory_leaves_old_or_new_and_resume_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    faults_on(
        &|| {
            let dir = tmp.path().join(
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            );
            Arc::new(grainfs::store::local::LocalDir::open(&dir).unwrap())
        },
        &[Fault::NoSpace, Fault::After],
        1,
    );
}

const CHILD_ENV: &str = "GRAINFS_DELETE_ANY_STORE";

/// A bigger chain for the crash test: 3 volumes of up to 48 blocks, 7 snapshots.
fn crash_chain() -> Vec<Vec<VolStep>> {
    (0..7u64)
        .map(|k| {
            (0..3u64)
                .map(|i| VolStep {
                    present: true,
                    size: (40 + (k * 7 + i * 3) % 9) * BS - (k % 3) * 1000,
                    writes: (0..12)
                        .map(|j| ((k * 13 + j * 5 + i) % 48, k * 100 + j * 3 + i))
                        .collect(),
                    full: (k * 0x9E37_79B9 + i) >> 3,
                })
                .collect()
        })
        .collect()
}

/// The child of the crash test: finish what the last one left, then delete every snapshot
/// but one, in an order its seed gives. Run only by `a_delete_killed_at_any_point_...`.
#[test]
#[ignore]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    store.resume_deletes().unwrap();
    let seed: usize = std::env::var("GRAINFS_DELETE_ANY_SEED")
        .unwrap()
        .parse()
        .unwrap();
    loop {
        let names = store.names().unwrap();
        if names.len() <= 1 {
            break;
        }
        let x = &names[(seed * 7 + names.len() * 3) % names.len()];
        store.delete(&sn(x)).unwrap();
    }
}

fn spawn_child(dir: &Path, seed: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--ignored", "--nocapture", "-q"])
        .env(CHILD_ENV, dir)
        .env("GRAINFS_DELETE_ANY_SEED", seed.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// kill -9 of a process deleting, at 20 points spread over its run: after a reopen and
/// `resume_deletes`, every snapshot left reads its oracle bytes and verifies, and the store
/// holds only what they reference.
#[test]
fn a_delete_killed_at_any_point_leaves_every_snapshot_readable_and_resume_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = crash_chain();
    // How long a whole run takes, to spread the kills over it.
    let dir = tmp.path().join("clean");
    let oracle = build(&Store::open(&dir).unwrap(), &steps);
    let t = Instant::now();
    let status = spawn_child(&dir, 0).wait().unwrap();
    let whole = t.elapsed();
    assert!(status.success());
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.names().unwrap().len(), 1);
    check_reads(&store, &oracle, "clean run");
    check_space(&store, "clean run");
    let mut interrupted = 0;
    let mut resumed = 0;
    for run in 0..20usize {
        let dir = tmp.path().join(format!("run{run}"));
        let oracle = build(&Store::open(&dir).unwrap(), &steps);
        let mut child = spawn_child(&dir, run);
        // Spread over the run, a little past its end.
        let at = whole.mul_f64((run as f64 + 0.5) / 19.0);
        std::thread::sleep(at.min(Duration::from_secs(10)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        interrupted += usize::from(!status.success());
        let what = format!("run {run} killed after {at:?}");
        let store = Store::open(&dir).unwrap();
        // Before resuming: every snapshot there reads as written.
        check_reads(&store, &oracle, &what);
        resumed += usize::from(!store.resume_deletes().unwrap().is_empty());
        assert!(load_deleting(&**store.backend()).unwrap().is_empty());
        check_reads(&store, &oracle, &what);
        check_space(&store, &what);
    }
    eprintln!("{interrupted} of 20 killed, {resumed} inside a delete (a whole run: {whole:?})");
    assert!(
        interrupted >= 10,
        "only {interrupted} runs were killed mid-way"
    );
    assert!(resumed >= 3, "only {resumed} kills landed inside a delete");
}
