//! FULL snapshots of large sparse volumes (issue 13 item 8): a capture visits the blocks that
//! hold data, not the volume's logical size, and still holds the content at the barrier while
//! a writer fills holes and overwrites data during the capture. The oracle: every block the
//! snapshot reads (its stored blocks, by blake3, the rest zeros) equals the model of the volume
//! at the barrier, which is the original content plus a prefix of the writer's sequence.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Noise, Overlay, Rng};
use grainfs::config::PolicyConfig;
use grainfs::fs::inode::ROOT_INO;
use grainfs::fs::SetAttr;
use grainfs::ids::{Geometry, SnapshotName};
use grainfs::snapshot::{CreateReport, CreateRequest, Engine, EngineOptions};
use grainfs::store::Store;

const BS: u64 = 64 << 10;
const G: Geometry = Geometry {
    block_size: BS,
    partition_size: 64 << 20,
};
/// 64 GiB logical: about a million blocks.
const SIZE: u64 = 64 << 30;
/// Blocks with data before the first snapshot: 4 MiB.
const DATA_BLOCKS: usize = 64;
/// The writer's sequence: this many blocks, half holes filled, half data overwritten.
const SEQ: usize = 32;

fn sn(name: &str) -> SnapshotName {
    SnapshotName::parse(name).unwrap()
}

fn engine(o: &Overlay, defer_writes: bool) -> Engine {
    Engine::new(EngineOptions {
        backing: o.backing.clone(),
        store_dir: o.store.clone(),
        tracker: o.tracker().clone(),
        policy: PolicyConfig {
            full_rate: 1e12,
            full_dirty_fraction: 0.5,
            max_chain: 8,
        },
        groups: Vec::new(),
        workers: 2,
        flush: Box::new(|| {}),
        defer_writes,
    })
    .unwrap()
}

fn full_snapshot(e: &Engine, name: &str) -> CreateReport {
    e.create(&CreateRequest {
        name: Some(sn(name)),
        full: true,
        ..Default::default()
    })
    .unwrap()
}

/// Every block snapshot `name` of `v.img` reads equals `model` (absent: zeros): its stored
/// blocks are exactly the model's blocks, each with the model's hash, and a few of them read
/// back byte for byte.
fn assert_snapshot_is(o: &Overlay, name: &str, model: &HashMap<u64, Vec<u8>>, what: &str) {
    let store = Store::open(&o.store).unwrap();
    let id = o.id("v.img");
    let stored = store.block_hashes(&sn(name), id).unwrap();
    let stored_keys: BTreeSet<u64> = stored.keys().copied().collect();
    let model_keys: BTreeSet<u64> = model.keys().copied().collect();
    assert_eq!(
        stored_keys, model_keys,
        "{what}: the snapshot's blocks with data are not the volume's at the barrier"
    );
    for (b, data) in model {
        assert_eq!(
            stored[b],
            Some(*blake3::hash(data).as_bytes()),
            "{what}: block {b} differs from the volume at the barrier"
        );
    }
    let r = store.open_volume(&sn(name), id).unwrap();
    assert_eq!(r.size(), SIZE);
    let mut buf = vec![0u8; BS as usize];
    for (b, data) in model.iter().take(8) {
        r.read_at(&mut buf, b * BS).unwrap();
        assert!(buf == *data, "{what}: block {b} reads back wrong");
    }
    // A hole between data reads as zeros.
    let hole = (0..SIZE / BS).find(|b| !model.contains_key(b)).unwrap();
    r.read_at(&mut buf, hole * BS).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "{what}: hole {hole} has data");
}

/// A 64 GiB volume with 4 MiB of data scattered in it: its FULL snapshot visits its 64 data
/// blocks, not its million blocks, and stores exactly them. Then, FULL again while a writer
/// fills holes and overwrites data: each snapshot is the volume at its barrier (original
/// content plus a prefix of the writer's writes), with parked writes and with copy first.
fn sparse_full_snapshots(defer_writes: bool) {
    let o = Overlay::tracked(G, Duration::from_secs(3600), |_| {});
    let e = engine(&o, defer_writes);
    let fh = o.create("v.img");
    let ino =
        o.fs.lookup(ROOT_INO, std::ffi::OsStr::new("v.img"))
            .unwrap()
            .attr
            .ino;
    o.fs.setattr(
        ino,
        &SetAttr {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = Rng::new(13);
    let mut data: BTreeSet<u64> = BTreeSet::new();
    while data.len() < DATA_BLOCKS {
        data.insert(rng.below(SIZE / BS));
    }
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for &b in &data {
        let bytes = Noise::new(b).bytes(BS as usize);
        o.fs.write(fh, b * BS, &bytes).unwrap();
        model.insert(b, bytes);
    }

    // The first FULL snapshot, nobody writing: exactly the blocks with data are visited.
    let r = full_snapshot(&e, "s0");
    assert_eq!(
        r.blocks_by_workers + r.blocks_by_writers,
        DATA_BLOCKS as u64,
        "the capture visited other blocks than the 64 with data (of {})",
        SIZE / BS
    );
    assert_eq!(r.volumes[0].stored_bytes, DATA_BLOCKS as u64 * BS);
    assert_snapshot_is(&o, "s0", &model, "s0");

    let data: Vec<u64> = data.into_iter().collect();
    for attempt in 1..=4u8 {
        // Alternately a hole to fill and a data block to overwrite.
        let mut seq = Vec::new();
        while seq.len() < SEQ {
            let b = if seq.len() % 2 == 0 {
                rng.below(SIZE / BS)
            } else {
                data[rng.below(data.len() as u64) as usize]
            };
            if !seq.contains(&b) {
                seq.push(b);
            }
        }
        let mark = |i: usize| vec![attempt.wrapping_mul(40).wrapping_add(i as u8 + 1); BS as usize];
        let before = model.clone();
        let stop = AtomicBool::new(false);
        let done = AtomicUsize::new(0);
        let name = format!("s{attempt}");
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                for (i, &b) in seq.iter().enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    o.fs.write(fh, b * BS, &mark(i)).unwrap();
                    done.store(i + 1, Ordering::Release);
                }
            });
            while done.load(Ordering::Acquire) < 2 {
                std::thread::yield_now();
            }
            let r = full_snapshot(&e, &name);
            stop.store(true, Ordering::Relaxed);
            r
        });
        // The prefix the snapshot holds: the first block of the sequence it has unwritten.
        let store = Store::open(&o.store).unwrap();
        let reader = store.open_volume(&sn(&name), o.id("v.img")).unwrap();
        let mut buf = vec![0u8; BS as usize];
        let k = seq
            .iter()
            .enumerate()
            .position(|(i, &b)| {
                reader.read_at(&mut buf, b * BS).unwrap();
                buf != mark(i)
            })
            .unwrap_or(SEQ);
        let mut at_barrier = before.clone();
        for (i, &b) in seq[..k].iter().enumerate() {
            at_barrier.insert(b, mark(i));
        }
        assert_snapshot_is(&o, &name, &at_barrier, &format!("{name} (prefix {k})"));
        assert!(
            r.blocks_by_workers + r.blocks_by_writers <= (before.len() + SEQ) as u64,
            "{name}: visited {} blocks, more than the blocks with data and the writer's",
            r.blocks_by_workers + r.blocks_by_writers
        );
        // The live volume has every write the writer made.
        let written = done.load(Ordering::Acquire);
        for (i, &b) in seq[..written].iter().enumerate() {
            model.insert(b, mark(i));
        }
        let live = std::fs::File::open(o.backing.join("v.img")).unwrap();
        for (&b, bytes) in &model {
            std::os::unix::fs::FileExt::read_exact_at(&live, &mut buf, b * BS).unwrap();
            assert!(buf == *bytes, "{name}: live block {b} lost a write");
        }
    }
}

#[test]
fn full_snapshots_of_a_sparse_volume_visit_its_data_and_hold_the_barriers_content() {
    sparse_full_snapshots(false);
}

#[test]
fn the_same_with_writes_parked_during_the_capture() {
    sparse_full_snapshots(true);
}
