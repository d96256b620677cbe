//! `grainfs diff` through a real mount, checked against the images themselves: random
//! histories of writes, truncates (grow and shrink), punched holes, renames, creates, deletes
//! and snapshots, then `diff --json` between random pairs of snapshots and `live`, compared
//! with a brute-force comparison of both sides read back (`.snapshots/NAME/path` and the live
//! files): every byte that differs lies inside a reported extent, and every path that exists on
//! one side only is reported. Also: a rename is an `R`; snapshot against snapshot needs no pack
//! data (it still answers, the same, with the packs deleted); a volume whose tracking a kill -9
//! lost is rescanned and diffed right against live, and without a daemon too.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Mount;
use grainfs::snapshot::diff::{ChangeKind, DiffReport, Method};
use proptest::prelude::*;

const KIB: u64 = 1024;
const BS: u64 = 4 * KIB;
const PS: u64 = 64 * KIB;

/// Small blocks and partitions: a few hundred KiB span several partitions.
const CONFIG: &str = r#"
[tracking]
block_size = "4KiB"
partition_size = "64KiB"
interval = "1s"
"#;

/// The files a history plays with.
const NAMES: [&str; 5] = ["a.img", "b.img", "c.img", "d/x.img", "d/y.img"];

use common::grainfs_at as grainfs;

fn snapshot(m: &Mount, name: &str) {
    common::create_snapshot(m, name);
}

/// `grainfs diff FROM TO --json` (run against `at`: the mount, or a backing dir offline).
fn diff(at: &Path, from: &str, to: &str) -> DiffReport {
    let out = grainfs(&["diff", from, to, "--json"], at);
    assert!(
        out.status.success(),
        "diff {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "diff --json printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every regular file under `root` (not `.snapshots`, not the store) with its content.
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && (name == ".snapshots" || name == ".grainfs") {
                continue;
            }
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&e.path(), &path, out);
            } else if ft.is_file() {
                let data = std::fs::read(e.path())
                    .unwrap_or_else(|err| panic!("read {}: {err}", e.path().display()));
                out.insert(path, data);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

fn side_root(m: &Mount, side: &str) -> PathBuf {
    if side == "live" {
        m.path().to_path_buf()
    } else {
        m.path().join(".snapshots").join(side)
    }
}

/// Every byte where `a` and `b` differ (a byte past one's end differs) lies inside `extents`
/// of `e`; returns how many blocks differed.
fn check_extents(what: &str, a: &[u8], b: &[u8], e: Option<&grainfs::snapshot::diff::DiffEntry>) {
    let n = a.len().max(b.len());
    let inside = |off: u64| {
        e.is_some_and(|e| {
            e.extents
                .iter()
                .any(|x| off >= x.offset && off < x.offset + x.len)
        })
    };
    let mut off = 0usize;
    while off < n {
        let end = (off + BS as usize).min(n);
        let differs = (off..end).find(|&i| a.get(i) != b.get(i));
        if let Some(i) = differs {
            assert!(
                inside(i as u64),
                "{what}: byte {i} differs but is in no reported extent: {e:?}"
            );
        }
        off = end;
    }
    if let Some(e) = e {
        assert_eq!(
            e.changed_bytes,
            e.extents.iter().map(|x| x.len).sum::<u64>(),
            "{what}: changed_bytes is the extents' total"
        );
    }
}

/// Check `r` (from `sa` to `sb`, the sides' files) against the images themselves.
fn check_report(
    label: &str,
    r: &DiffReport,
    sa: &BTreeMap<String, Vec<u8>>,
    sb: &BTreeMap<String, Vec<u8>>,
) {
    let by_path = |p: &str| -> Vec<&grainfs::snapshot::diff::DiffEntry> {
        r.entries.iter().filter(|e| e.path == p).collect()
    };
    let renamed_from = |p: &str| {
        r.entries
            .iter()
            .find(|e| e.kind == ChangeKind::Renamed && e.old_path.as_deref() == Some(p))
    };
    for (p, da) in sa {
        if let Some(e) = renamed_from(p) {
            let db = sb
                .get(&e.path)
                .unwrap_or_else(|| panic!("{label}: renamed to {} which is not there", e.path));
            check_extents(&format!("{label}: {p} -> {}", e.path), da, db, Some(e));
            continue;
        }
        let here = by_path(p);
        match sb.get(p) {
            None => assert!(
                here.iter().any(|e| e.kind == ChangeKind::Removed)
                    || here.iter().any(|e| e.changes.contains(&"type".to_string())),
                "{label}: {p} is gone but not reported removed: {here:?}"
            ),
            Some(db) => {
                if here.iter().any(|e| {
                    matches!(
                        e.kind,
                        ChangeKind::Added | ChangeKind::Removed | ChangeKind::Renamed
                    )
                }) {
                    continue; // replaced by another file
                }
                let e = here
                    .iter()
                    .find(|e| e.kind == ChangeKind::Modified)
                    .copied();
                check_extents(&format!("{label}: {p}"), da, db, e);
            }
        }
    }
    for p in sb.keys() {
        if sa.contains_key(p) {
            continue;
        }
        assert!(
            by_path(p).iter().any(
                |e| matches!(e.kind, ChangeKind::Added | ChangeKind::Renamed)
                    || e.changes.contains(&"type".to_string())
            ),
            "{label}: {p} is new but not reported added or renamed: {:?}",
            r.entries
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        f: usize,
        off: u64,
        len: u64,
        seed: u8,
    },
    Truncate {
        f: usize,
        size: u64,
    },
    Punch {
        f: usize,
        off: u64,
        len: u64,
    },
    Rename {
        f: usize,
        to: usize,
    },
    Delete {
        f: usize,
    },
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..NAMES.len();
    prop_oneof![
        5 => (f.clone(), 0..4 * PS, 1..6 * BS, any::<u8>())
            .prop_map(|(f, off, len, seed)| Op::Write { f, off, len, seed }),
        2 => (f.clone(), 0..4 * PS).prop_map(|(f, size)| Op::Truncate { f, size }),
        1 => (f.clone(), 0..4 * PS, 1..4 * BS).prop_map(|(f, off, len)| Op::Punch { f, off, len }),
        2 => (f.clone(), 0..NAMES.len()).prop_map(|(f, to)| Op::Rename { f, to }),
        1 => f.prop_map(|f| Op::Delete { f }),
        2 => Just(Op::Snapshot),
    ]
}

/// Play `op` through the mount; returns the name of a snapshot it took.
fn play(m: &Mount, op: &Op, taken: usize) -> Option<String> {
    let path = |f: usize| m.path().join(NAMES[f]);
    match *op {
        Op::Write { f, off, len, seed } => {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path(f))
                .unwrap();
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
                .collect();
            file.write_all_at(&data, off).unwrap();
        }
        Op::Truncate { f, size } => {
            if let Ok(file) = OpenOptions::new().write(true).open(path(f)) {
                file.set_len(size).unwrap();
            }
        }
        Op::Punch { f, off, len } => {
            if let Ok(file) = OpenOptions::new().write(true).open(path(f)) {
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as i64,
                        len as i64,
                    )
                };
                assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
            }
        }
        Op::Rename { f, to } => {
            if f != to && path(f).exists() {
                std::fs::rename(path(f), path(to)).unwrap();
            }
        }
        Op::Delete { f } => {
            let _ = std::fs::remove_file(path(f));
        }
        Op::Snapshot => {
            // A group with no volume left cannot be snapshotted (the engine refuses it).
            if !(0..NAMES.len()).any(|f| path(f).exists()) {
                return None;
            }
            let name = format!("s{taken}");
            snapshot(m, &name);
            return Some(name);
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn diff_covers_every_changed_byte_of_random_histories(
        ops in proptest::collection::vec(op(), 4..24),
        pairs in proptest::collection::vec((any::<u8>(), any::<u8>()), 3),
    ) {
        let m = Mount::with_setup(|b| std::fs::create_dir(b.join("d")).unwrap(), Some(CONFIG));
        play(&m, &Op::Write { f: 0, off: 0, len: 2 * PS, seed: 7 }, 0);
        play(&m, &Op::Write { f: 3, off: PS, len: 2 * PS, seed: 9 }, 0);
        let mut sides = vec![play(&m, &Op::Snapshot, 0).unwrap()];
        for op in &ops {
            if let Some(s) = play(&m, op, sides.len()) {
                sides.push(s);
            }
        }
        sides.push("live".into());
        let images: BTreeMap<String, BTreeMap<String, Vec<u8>>> = sides
            .iter()
            .map(|s| (s.clone(), files(&side_root(&m, s))))
            .collect();
        // Always one snapshot against live, then random pairs (either way round).
        let mut chosen = vec![(sides[0].clone(), "live".to_string())];
        for (x, y) in pairs {
            let (x, y) = (x as usize % sides.len(), y as usize % sides.len());
            if x != y {
                chosen.push((sides[x].clone(), sides[y].clone()));
            }
        }
        for (from, to) in chosen {
            let r = diff(m.path(), &from, &to);
            prop_assert_eq!(&r.live.is_some(), &(from == "live" || to == "live"));
            check_report(&format!("{from} -> {to}"), &r, &images[&from], &images[&to]);
        }
    }
}

#[test]
fn a_rename_is_an_r_with_the_extents_written_since() {
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    std::fs::write(m.path().join("a.img"), vec![1u8; (4 * BS) as usize]).unwrap();
    snapshot(&m, "s1");
    std::fs::rename(m.path().join("a.img"), m.path().join("b.img")).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path().join("b.img"))
        .unwrap();
    f.write_all_at(&[9u8; 10], 2 * BS + 5).unwrap();
    drop(f);
    let r = diff(m.path(), "s1", "live");
    let e = &r.entries;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0].kind, e[0].old_path.as_deref(), e[0].path.as_str()),
        (ChangeKind::Renamed, Some("a.img"), "b.img"),
        "{e:?}"
    );
    assert_eq!(e[0].changed_bytes, BS, "one block written: {e:?}");
    assert_eq!(e[0].extents[0].offset, 2 * BS);
    assert_eq!(
        e[0].method,
        Some(Method::Tracked),
        "the tracker knew: {e:?}"
    );
    snapshot(&m, "s2");
    let r2 = diff(m.path(), "s1", "s2");
    assert_eq!(r2.entries[0].kind, ChangeKind::Renamed, "{:?}", r2.entries);
    assert_eq!(r2.entries[0].extents, e[0].extents);
    assert_eq!(r2.entries[0].method, Some(Method::Tables));
}

#[test]
fn snapshot_against_snapshot_reads_no_pack_data() {
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    let p = m.path().join("v.img");
    std::fs::write(&p, vec![3u8; (5 * PS) as usize]).unwrap();
    snapshot(&m, "s1");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[4u8; 100], PS + 10).unwrap();
    f.set_len(3 * PS + 7).unwrap();
    drop(f);
    snapshot(&m, "s2");
    let before = diff(m.path(), "s1", "s2");
    check_report(
        "s1 -> s2",
        &before,
        &files(&side_root(&m, "s1")),
        &files(&side_root(&m, "s2")),
    );
    assert_eq!(before.totals.modified, 1, "{before:?}");
    // Without the packs no snapshot byte can be read; the diff does not need one (once the
    // blocks a reflink capture stored are hashed: until then it reads them).
    common::wait_hashed(m.path());
    let mut removed = 0;
    for s in ["s1", "s2"] {
        for e in std::fs::read_dir(m.store().join("snapshots").join(s)).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with("pack-") {
                std::fs::remove_file(e.path()).unwrap();
                removed += 1;
            }
        }
    }
    assert!(removed >= 2, "each snapshot stored data in a pack");
    assert!(std::fs::read(side_root(&m, "s2").join("v.img")).is_err());
    assert_eq!(diff(m.path(), "s1", "s2"), before);
}

#[test]
fn a_volume_whose_tracking_a_kill9_lost_is_rescanned_and_diffed_right() {
    let mut m = Mount::with_setup(|_| {}, Some(CONFIG));
    let p = m.path().join("v.img");
    std::fs::write(&p, vec![5u8; (256 * PS) as usize]).unwrap();
    snapshot(&m, "s1");
    // A writer moves through the volume, a new block each millisecond, until the daemon dies
    // under it: the blocks written since the last tick's save are known only from the
    // write-intent record, as unknown partitions.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, p) = (stop.clone(), p.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) && i < 256 * PS / BS {
                if f.write_all_at(&[(i % 241) as u8 + 7; 512], i * BS + 100)
                    .is_err()
                {
                    return;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1700));
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    m.remount();
    let st = common::status_json(m.path());
    let v = st
        .volumes
        .iter()
        .find(|v| v.path.as_deref() == Some("v.img"))
        .expect("v.img tracked");
    assert!(
        v.unknown_all || !v.unknown_partitions.is_empty(),
        "kill -9 mid-writes leaves partitions unknown: {v:?}"
    );
    let s1 = files(&side_root(&m, "s1"));
    let live = files(m.path());
    let r = diff(m.path(), "s1", "live");
    assert_eq!(r.live.as_deref(), Some("tracked"));
    let e = r
        .entries
        .iter()
        .find(|e| e.path == "v.img")
        .expect("v.img modified");
    assert_eq!(e.method, Some(Method::Rescanned), "{e:?}");
    check_report("s1 -> live after kill -9", &r, &s1, &live);
    // The other way round, and without a daemon (every live volume read and hashed).
    check_report("live -> s1", &diff(m.path(), "live", "s1"), &live, &s1);
    m.stop();
    let started = Instant::now();
    let off = diff(m.backing(), "s1", "live");
    assert_eq!(off.live.as_deref(), Some("read"));
    assert!(started.elapsed() < Duration::from_secs(60));
    let e = off.entries.iter().find(|e| e.path == "v.img").unwrap();
    assert_eq!(e.method, Some(Method::Hashed));
    check_report("s1 -> live offline", &off, &s1, &files(m.backing()));
    m.remount();
}
