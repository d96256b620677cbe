//! `grainfs rollback` through a real mount: the live volumes return to the snapshot's content
//! (blake3 of the live file equals the one read back at `.snapshots/NAME/path`), after random
//! writes, a truncate and a grow; the next incremental snapshot still equals the live files at
//! its instant; O_DIRECT readers during a rollback see each block old or new, never a mix; the
//! safety snapshot holds the state before; deleted files come back, new ones stay (or go with
//! --prune); PATH selection; a volume unknown after kill -9; a qcow2 image under qemu-img.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{blake3_file, open_rw, Mount, Rng, KIB, MIB, SMALL_GEOMETRY};
use grainfs::snapshot::rollback::RollbackReport;
use grainfs::snapshot::CreateReport;

const BS: u64 = 4 * KIB;

fn run(m: &Mount, args: &[&str]) -> Output {
    common::grainfs_at(args, m.path())
}

fn create(m: &Mount, name: &str) -> CreateReport {
    serde_json::from_value(common::create_snapshot(m, name)).expect("CreateReport")
}

/// `grainfs rollback --json ARGS`, which must succeed.
fn rollback(m: &Mount, args: &[&str]) -> RollbackReport {
    let mut all = vec!["rollback", "--json"];
    all.extend_from_slice(args);
    let out = run(m, &all);
    assert!(
        out.status.success(),
        "grainfs {all:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no RollbackReport ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn snap(m: &Mount, name: &str, rel: &str) -> PathBuf {
    m.path().join(".snapshots").join(name).join(rel)
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// Random writes (some across blocks), a few whole-block pattern writes.
fn scribble(path: &Path, rng: &mut Rng, writes: usize) {
    let f = open_rw(path);
    let size = f.metadata().unwrap().len().max(BS);
    for _ in 0..writes {
        let len = 1 + rng.below(3 * BS) as usize;
        let off = rng.below(size);
        f.write_all_at(&random_bytes(rng, len), off).unwrap();
    }
}

#[test]
fn rollback_returns_the_volumes_and_the_next_snapshot_matches_the_live_files() {
    let m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut rng = Rng::new(7);
    let (a, b, d) = (
        m.path().join("a.img"),
        m.path().join("b.img"),
        m.path().join("dir/d.img"),
    );
    std::fs::create_dir(m.path().join("dir")).unwrap();
    std::fs::write(&a, random_bytes(&mut rng, (3 * MIB + 100) as usize)).unwrap();
    std::fs::write(&b, random_bytes(&mut rng, (2 * MIB) as usize)).unwrap();
    std::fs::write(&d, random_bytes(&mut rng, (200 * KIB) as usize)).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = m.path().join("current");
    std::os::unix::fs::symlink("a.img", &link).unwrap();
    create(&m, "s1");

    // Changes: random writes, a grow of a, a truncate of b, d deleted, c new, the symlink
    // pointed elsewhere.
    scribble(&a, &mut rng, 50);
    open_rw(&a).set_len(5 * MIB).unwrap();
    scribble(&a, &mut rng, 10);
    scribble(&b, &mut rng, 20);
    open_rw(&b).set_len(MIB + 5).unwrap();
    std::fs::remove_file(&d).unwrap();
    let c = m.path().join("c.img");
    std::fs::write(&c, b"new since s1").unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("b.img", &link).unwrap();
    let before = (blake3_file(&a), blake3_file(&b));

    let r = rollback(&m, &["s1"]);
    let safety = r.safety_snapshot.clone().expect("a safety snapshot");
    for rel in ["a.img", "b.img", "dir/d.img"] {
        assert_eq!(
            blake3_file(&m.path().join(rel)),
            blake3_file(&snap(&m, "s1", rel)),
            "{rel} after the rollback differs from s1: {r:?}"
        );
    }
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 3 * MIB + 100);
    assert_eq!(
        std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        r.restored,
        vec!["current".to_string(), "dir/d.img".to_string()]
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::Path::new("a.img")
    );
    assert_eq!(r.kept, vec!["c.img".to_string()]);
    assert!(c.exists(), "a file newer than the snapshot is kept");
    let va = r.volumes.iter().find(|v| v.path == "a.img").unwrap();
    assert_eq!((va.old_size, va.new_size), (5 * MIB, 3 * MIB + 100));
    assert!(va.compared.starts_with("tracked since"), "{va:?}");
    // Far fewer blocks than the volume has: only the changed ones were written.
    assert!(
        va.blocks_written > 0 && va.blocks_written < 5 * MIB / BS,
        "{va:?}"
    );
    // The safety snapshot holds the state before.
    assert_eq!(blake3_file(&snap(&m, &safety, "a.img")), before.0);
    assert_eq!(blake3_file(&snap(&m, &safety, "b.img")), before.1);

    // Tracking reflects the rollback: the next incremental snapshot equals the live files.
    scribble(&b, &mut rng, 5);
    let s3 = create(&m, "s3");
    assert_eq!(s3.parent.as_deref(), Some(safety.as_str()));
    for rel in ["a.img", "b.img", "c.img", "dir/d.img"] {
        assert_eq!(
            blake3_file(&m.path().join(rel)),
            blake3_file(&snap(&m, "s3", rel)),
            "{rel}: s3 differs from the live file"
        );
    }
    let verify = run(&m, &["snapshot", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // --no-safety-snapshot and --prune: c goes, no snapshot is added.
    let names_before = std::fs::read_dir(m.path().join(".snapshots"))
        .unwrap()
        .count();
    let r = rollback(&m, &["s1", "--no-safety-snapshot", "--prune"]);
    assert_eq!(r.safety_snapshot, None);
    assert_eq!(r.removed, vec!["c.img".to_string()]);
    assert!(!c.exists());
    assert_eq!(
        std::fs::read_dir(m.path().join(".snapshots"))
            .unwrap()
            .count(),
        names_before
    );
    assert_eq!(blake3_file(&b), blake3_file(&snap(&m, "s1", "b.img")));
    let s4 = create(&m, "s4");
    for v in &s4.volumes {
        assert_eq!(
            blake3_file(&m.path().join(&v.path)),
            blake3_file(&snap(&m, "s4", &v.path))
        );
    }
}

#[test]
fn paths_select_what_is_rolled_back_and_no_daemon_is_a_clear_error() {
    let mut m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut rng = Rng::new(11);
    let (a, b) = (m.path().join("a.img"), m.path().join("b.img"));
    std::fs::write(&a, random_bytes(&mut rng, MIB as usize)).unwrap();
    std::fs::write(&b, random_bytes(&mut rng, MIB as usize)).unwrap();
    create(&m, "s1");
    scribble(&a, &mut rng, 10);
    scribble(&b, &mut rng, 10);
    let b_now = blake3_file(&b);
    let r = rollback(&m, &["s1", "a.img"]);
    assert_eq!(r.volumes.len(), 1);
    assert_eq!(blake3_file(&a), blake3_file(&snap(&m, "s1", "a.img")));
    assert_eq!(blake3_file(&b), b_now, "b.img was not selected");
    // An absolute path inside the mount works too.
    let abs = b.to_string_lossy().to_string();
    rollback(&m, &["s1", &abs, "--no-safety-snapshot"]);
    assert_eq!(blake3_file(&b), blake3_file(&snap(&m, "s1", "b.img")));

    m.stop();
    let out = Command::new(common::grainfs_bin())
        .args(["rollback", "s1", "-m"])
        .arg(m.backing())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mount it first") && err.contains("grainfs restore"),
        "{err}"
    );
}

/// A 4 KiB buffer aligned for O_DIRECT.
struct Aligned(*mut u8, usize);

impl Aligned {
    fn new(len: usize) -> Aligned {
        let l = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        Aligned(unsafe { std::alloc::alloc_zeroed(l) }, len)
    }
    fn buf(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let l = std::alloc::Layout::from_size_align(self.1, 4096).unwrap();
        unsafe { std::alloc::dealloc(self.0, l) };
    }
}

/// Block `b` of generation `gen`: one u64 stamp repeated.
fn stamped(b: u64, gen: u64) -> Vec<u8> {
    let w = (b << 16 | gen).to_le_bytes();
    w.iter().copied().cycle().take(BS as usize).collect()
}

#[test]
fn o_direct_readers_see_each_block_old_or_new_during_a_rollback() {
    let m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let path = m.path().join("v.img");
    let blocks = 48 * MIB / BS;
    const SPAN: u64 = 32;
    {
        let f = open_rw(&path);
        for b in 0..blocks {
            f.write_all_at(&stamped(b, 0), b * BS).unwrap();
        }
    }
    create(&m, "s0");
    // The state before the rollback running now (generation per block; the rollback returns
    // every block to 0), and which round's rollback runs (0: none).
    let pre: Arc<Vec<AtomicU64>> = Arc::new((0..blocks).map(|_| AtomicU64::new(0)).collect());
    let running = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (checked, torn, mixed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (path, stop, pre, running) =
                (path.clone(), stop.clone(), pre.clone(), running.clone());
            let (checked, torn, mixed) = (checked.clone(), torn.clone(), mixed.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .unwrap();
                let mut rng = Rng::new(100 + t);
                let mut buf = Aligned::new((SPAN * BS) as usize);
                while !stop.load(Ordering::Relaxed) {
                    let first = rng.below(blocks - SPAN);
                    let round = running.load(Ordering::SeqCst);
                    let n = f.read_at(buf.buf(), first * BS).unwrap();
                    assert_eq!(n, (SPAN * BS) as usize);
                    if round == 0 || running.load(Ordering::SeqCst) != round {
                        continue;
                    }
                    // Each block old or new, and the read as a whole before or after.
                    let (mut old, mut new) = (true, true);
                    for (i, blk) in buf.buf().chunks(BS as usize).enumerate() {
                        let b = first + i as u64;
                        let was = pre[b as usize].load(Ordering::SeqCst);
                        let is_old = blk == stamped(b, was).as_slice();
                        let is_new = blk == stamped(b, 0).as_slice();
                        if !is_old && !is_new {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                        old &= is_old;
                        new &= is_new;
                    }
                    if !old && !new {
                        mixed.fetch_add(1, Ordering::Relaxed);
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 1..=4u64 {
        {
            // Every block changes: the write phase is as long as it gets, and a read that
            // straddles its moving front is what a missing read hold would show.
            let f = open_rw(&path);
            for b in 0..blocks {
                f.write_all_at(&stamped(b, round), b * BS).unwrap();
                pre[b as usize].store(round, Ordering::SeqCst);
            }
        }
        running.store(round, Ordering::SeqCst);
        let r = rollback(&m, &["s0", "--no-safety-snapshot"]);
        running.store(0, Ordering::SeqCst);
        for p in pre.iter() {
            p.store(0, Ordering::SeqCst);
        }
        assert!(r.blocks_written > 0);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!(
        "reads checked during rollbacks: {}",
        checked.load(Ordering::Relaxed)
    );
    assert_eq!(torn.load(Ordering::Relaxed), 0, "a read saw a torn block");
    assert_eq!(
        mixed.load(Ordering::Relaxed),
        0,
        "a read saw blocks before and after the rollback at once"
    );
    assert_eq!(blake3_file(&path), blake3_file(&snap(&m, "s0", "v.img")));
}

#[test]
fn a_volume_unknown_after_kill9_is_rolled_back_by_rescanning() {
    let mut m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut rng = Rng::new(3);
    let a = m.path().join("a.img");
    std::fs::write(&a, random_bytes(&mut rng, (3 * MIB) as usize)).unwrap();
    create(&m, "s1");
    scribble(&a, &mut rng, 30);
    m.kill9();
    m.remount();
    let st = common::status_json(m.path());
    let v = st
        .volumes
        .iter()
        .find(|v| v.path.as_deref() == Some("a.img"))
        .unwrap();
    assert!(
        v.unknown_all || !v.unknown_partitions.is_empty(),
        "a.img should be unknown after kill -9: {v:?}"
    );
    let r = rollback(&m, &["s1", "--no-safety-snapshot"]);
    assert!(r.volumes[0].compared.contains("rescanned"), "{r:?}");
    assert_eq!(blake3_file(&a), blake3_file(&snap(&m, "s1", "a.img")));
    // And once more with a safety snapshot after new changes: it rescans, the rollback reads
    // only tracked bits.
    scribble(&a, &mut rng, 30);
    m.kill9();
    m.remount();
    let before = blake3_file(&a);
    let r = rollback(&m, &["s1"]);
    let safety = r.safety_snapshot.unwrap();
    assert_eq!(blake3_file(&snap(&m, &safety, "a.img")), before);
    assert_eq!(blake3_file(&a), blake3_file(&snap(&m, "s1", "a.img")));
    let s = create(&m, "after");
    assert_eq!(blake3_file(&a), blake3_file(&snap(&m, &s.name, "a.img")));
}

#[test]
fn a_qcow2_image_rolled_back_passes_qemu_img_check() {
    if common::missing("qemu-img") || common::missing("qemu-io") {
        return;
    }
    let m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let img = m.path().join("vm.qcow2");
    let qemu_io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&img)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("fail"),
            "qemu-io {cmd}: {text}"
        );
        text
    };
    let st = Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    qemu_io("write -P 0xaa 0 1M");
    qemu_io("write -P 0x55 8M 512k");
    create(&m, "s1");
    qemu_io("write -P 0xbb 512k 2M");
    qemu_io("write -P 0xcc 32M 4M");
    let r = rollback(&m, &["s1"]);
    assert!(r.blocks_written > 0);
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_io("read -P 0xaa 0 1M");
    qemu_io("read -P 0x55 8M 512k");
    qemu_io("read -P 0 32M 4M");
    assert_eq!(blake3_file(&img), blake3_file(&snap(&m, "s1", "vm.qcow2")));
}
