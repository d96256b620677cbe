//! Instant FULL snapshots on a filesystem with reflink (issue 13, item 4): the backing dir and
//! the store live on an XFS filesystem made with `-m reflink=1` on a loop device, and a FULL
//! partition is stored by cloning its extents (FICLONERANGE) instead of copying them. Checked
//! through a real mount, as a user would see it:
//!
//! - the snapshot holds the volume as it was at the barrier while a writer runs through the
//!   mount (the writer records what it wrote; the snapshot must hold exactly a prefix of its
//!   writes, at least those that returned before `create` began and at most those that had
//!   begun when it returned);
//! - the snapshot shares its extents with the volume: the filesystem's free space barely moves
//!   for a 1 GiB volume (a copy would take 1 GiB);
//! - `snapshot verify` says the cloned blocks are "not yet hashed" right after the commit, then
//!   proves every block once the daemon has hashed them in the background;
//! - reads from `.snapshots`, `diff`, `restore` and delete with merge work on the cloned
//!   snapshot, before and after its blocks are hashed;
//! - on ext4 the same snapshot takes the copying path, and every block is hashed at once.
//!
//! Needs root, loop devices, `losetup`, `mount`, `mkfs.xfs` (xfsprogs) and `mkfs.ext4`;
//! skipped with a message where they are missing.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::loopfs::{usable, FsKind, LoopFs};
use common::{create_snapshot, grainfs_at, open_rw, Mount, Noise, MIB};

/// The default tracking block (the config is the embedded default).
const BS: u64 = 64 * 1024;
const VOLUME: u64 = 1024 * MIB;
const IMAGE: u64 = 4096 * MIB;

/// The blake3 of each `BS` block of `path`.
fn block_hashes(path: &Path) -> Vec<[u8; 32]> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; BS as usize];
    (0..len.div_ceil(BS))
        .map(|b| {
            let n = BS.min(len - b * BS) as usize;
            f.read_exact_at(&mut buf[..n], b * BS)
                .unwrap_or_else(|e| panic!("read {} block {b}: {e}", path.display()));
            *blake3::hash(&buf[..n]).as_bytes()
        })
        .collect()
}

/// Write `size` bytes of noise to `path` (through whatever is mounted there), fsync'ed.
fn write_noise(path: &Path, size: u64, seed: u64) {
    let f = File::create(path).unwrap();
    let mut noise = Noise::new(seed);
    for at in (0..size).step_by(8 << 20) {
        let chunk = noise.bytes((8 << 20).min(size - at) as usize);
        f.write_all_at(&chunk, at).unwrap();
    }
    f.sync_all().unwrap();
}

/// Write `i` of the writer: a whole block of bytes that name it.
fn marker(i: u64) -> Vec<u8> {
    let mut v = vec![(i as u8) | 0x80; BS as usize];
    v[..16].copy_from_slice(b"grainfs-reflink-");
    v[16..24].copy_from_slice(&i.to_le_bytes());
    v
}

fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct we own.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn verify_json(m: &Mount, name: &str) -> serde_json::Value {
    let out = grainfs_at(&["snapshot", "verify", "--json", name], m.path());
    assert!(
        out.status.success(),
        "snapshot verify {name}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    v[0].clone()
}

/// Wait until the daemon has hashed every reflinked block of `name` (at most 3 minutes).
fn wait_hashed(m: &Mount, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = verify_json(m, name);
        if r["unhashed_blocks"] == 0 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: blocks still not hashed after 3 minutes: {r}\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A loop filesystem of `kind` with a grainfs mount whose backing dir holds `vol.img` (1 GiB of
/// noise); None (skipped) where loop filesystems cannot be made.
fn rig(kind: FsKind, tmp: &Path) -> Option<(LoopFs, Mount)> {
    if !usable(kind) {
        return None;
    }
    let fs = match LoopFs::new(kind, tmp.join("fs.img"), tmp.join("fs"), IMAGE) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("SKIP: cannot set up a loop filesystem: {e}");
            return None;
        }
    };
    let m = Mount::with_setup_in(
        fs.dir(),
        |b| write_noise(&b.join("vol.img"), VOLUME, 7),
        None,
    );
    Some((fs, m))
}

#[test]
fn a_full_snapshot_on_xfs_reflink_is_the_barriers_content_and_shares_the_volumes_extents() {
    let tmp = tempfile::Builder::new()
        .prefix("grainfs-reflink-")
        .tempdir()
        .unwrap();
    let Some((fs, m)) = rig(FsKind::XfsReflink, tmp.path()) else {
        return;
    };
    let path = m.path().join("vol.img");
    let mut model = block_hashes(&m.backing().join("vol.img"));
    let nblocks = VOLUME / BS;

    // One writer through the mount, block nblocks-1-i getting write i: completion order is
    // index order, so the writes a snapshot holds must be a prefix of them.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let f = open_rw(&path);
        let (stop, started, done) = (stop.clone(), started.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..nblocks {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                started.store(i + 1, Ordering::SeqCst);
                f.write_all_at(&marker(i), (nblocks - 1 - i) * BS).unwrap();
                done.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let wait = Instant::now();
    while done.load(Ordering::SeqCst) < 8 {
        assert!(wait.elapsed() < Duration::from_secs(10), "writer stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
    let free_before = free_bytes(fs.dir());
    let done_before = done.load(Ordering::SeqCst);
    let report = create_snapshot(&m, "clone");
    let started_after = started.load(Ordering::SeqCst);
    let free_after = free_bytes(fs.dir());
    // A few more writes, which the snapshot must not show.
    let wait = Instant::now();
    while done.load(Ordering::SeqCst) < (started_after + 64).min(nblocks) {
        assert!(wait.elapsed() < Duration::from_secs(20), "writer stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let total = done.load(Ordering::SeqCst);
    assert_eq!(report["volumes"][0]["kind"], "FULL", "{report}");
    assert!(
        m.log_text().contains("blocks by reflink"),
        "no reflink count in the log:\n{}",
        m.log_text()
    );
    eprintln!(
        "reflink FULL of 1 GiB: barrier {} us, capture {} ms, free space used {} MiB, {total} writes, {done_before} before create, {started_after} begun when it returned",
        report["barrier_us"],
        report["capture_ms"],
        free_before.saturating_sub(free_after) >> 20
    );
    // Shared extents: the writer's own copy-on-write allocations during the call are all that
    // may take space (a copy would take 1 GiB).
    assert!(
        free_before.saturating_sub(free_after) < 256 * MIB,
        "the snapshot took {} MiB of a 1 GiB volume: not shared extents",
        free_before.saturating_sub(free_after) >> 20
    );

    // Right after the commit the cloned blocks have no hash yet, and verify says so.
    let early = verify_json(&m, "clone");
    assert_eq!(early["problems"].as_array().unwrap().len(), 0, "{early}");
    assert!(
        early["unhashed_blocks"].as_u64().unwrap() > 0,
        "verify right after the snapshot proved every block of a cloned 1 GiB volume: {early}"
    );
    let text = grainfs_at(&["snapshot", "verify", "clone"], m.path());
    assert!(text.status.success());
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("not yet hashed"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // The oracle: the snapshot as read through `.snapshots` (unverified blocks included).
    let snap = m.path().join(".snapshots/clone/vol.img");
    let check = |got: &[[u8; 32]], what: &str| {
        assert_eq!(got.len() as u64, nblocks, "{what}");
        let mut k = 0;
        while k < total && got[(nblocks - 1 - k) as usize] == *blake3::hash(&marker(k)).as_bytes() {
            k += 1;
        }
        for i in k..total {
            let b = (nblocks - 1 - i) as usize;
            assert_eq!(
                got[b], model[b],
                "{what}: block {b} (write {i}) holds neither the content before the writes nor a write of the prefix of {k}"
            );
        }
        for b in 0..(nblocks - total) as usize {
            assert_eq!(got[b], model[b], "{what}: untouched block {b}");
        }
        assert!(
            k >= done_before && k <= started_after,
            "{what}: {k} writes in the snapshot, but {done_before} had returned before the call and {started_after} had begun when it returned"
        );
        k
    };
    let k = check(&block_hashes(&snap), "read before hashing");

    // Once the daemon has hashed them: proven, and the same bytes.
    let proven = wait_hashed(&m, "clone");
    assert_eq!(proven["problems"].as_array().unwrap().len(), 0, "{proven}");
    assert_eq!(proven["blocks"], nblocks, "{proven}");
    assert_eq!(check(&block_hashes(&snap), "read after hashing"), k);

    // Restore writes the snapshot's file out as it was.
    let out_dir = tmp.path().join("fs/restored");
    let out = grainfs_at(
        &[
            "restore",
            "--to",
            out_dir.to_str().unwrap(),
            "clone",
            "vol.img",
        ],
        m.path(),
    );
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        block_hashes(&out_dir.join("vol.img")),
        block_hashes(&snap),
        "the restored file"
    );

    // A second FULL snapshot made by reflink, then an INCREMENTAL one on it, `diff` between
    // them (exact while the parent's blocks are not hashed yet: it hashes what it needs),
    // and delete with merge of the cloned parent (which hashes it first): the child reads as
    // before.
    for i in 0..total {
        model[(nblocks - 1 - i) as usize] = *blake3::hash(&marker(i)).as_bytes();
    }
    let live = open_rw(&path);
    live.write_all_at(&vec![0x5a; BS as usize], 3 * BS).unwrap();
    live.sync_all().unwrap();
    let full2 = grainfs_at(
        &["snapshot", "create", "--full", "--json", "--name", "full2"],
        m.path(),
    );
    assert!(
        full2.status.success(),
        "{}",
        String::from_utf8_lossy(&full2.stderr)
    );
    live.write_all_at(&vec![0xa5; BS as usize], 9 * BS).unwrap();
    live.sync_all().unwrap();
    let child = create_snapshot(&m, "child");
    assert_eq!(child["volumes"][0]["kind"], "INCREMENTAL", "{child}");
    let live_now = block_hashes(&m.backing().join("vol.img"));
    let diff = grainfs_at(&["diff", "--json", "full2", "child"], m.path());
    assert!(
        diff.status.success(),
        "diff: {}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&diff.stdout).unwrap();
    assert_eq!(
        d["entries"][0]["changed_bytes"], BS,
        "diff full2 child: one block changed: {d}"
    );
    let del = grainfs_at(&["snapshot", "delete", "full2"], m.path());
    assert!(
        del.status.success(),
        "delete: {}\n{}",
        String::from_utf8_lossy(&del.stderr),
        m.log_text()
    );
    assert_eq!(
        block_hashes(&m.path().join(".snapshots/child/vol.img")),
        live_now,
        "the child after its cloned parent was deleted"
    );
    let all = grainfs_at(&["snapshot", "verify", "--json"], m.path());
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stdout)
    );
    let del = grainfs_at(&["snapshot", "delete", "clone"], m.path());
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    drop(live);
    assert!(m.unmount().success());
}

#[test]
fn on_ext4_a_full_snapshot_is_copied_and_hashed_at_once() {
    let tmp = tempfile::Builder::new()
        .prefix("grainfs-reflink-")
        .tempdir()
        .unwrap();
    let Some((_fs, m)) = rig(FsKind::Ext4, tmp.path()) else {
        return;
    };
    let live = block_hashes(&m.backing().join("vol.img"));
    create_snapshot(&m, "copy");
    assert!(
        m.log_text().contains("(0 blocks by reflink)"),
        "{}",
        m.log_text()
    );
    let r = verify_json(&m, "copy");
    assert_eq!(r["unhashed_blocks"], 0, "{r}");
    assert_eq!(r["blocks"], VOLUME / BS, "{r}");
    assert_eq!(
        block_hashes(&m.path().join(".snapshots/copy/vol.img")),
        live
    );
    assert!(m.unmount().success());
}
