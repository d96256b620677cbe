//! Change tracking through a real mount, queried with `grainfs status`: exact dirty blocks for
//! known writes, access patterns of real writers, path filters, the heatmap, offline status,
//! kill -9 recovery (never clean), files changed while unmounted, modes of the store's files,
//! and tracking turned off.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{open_rw, Mount};
use grainfs::control::StatusReport;
use grainfs::track::counters::AccessPattern;
use grainfs::track::ChangeMap;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BS: u64 = 4 * KIB;
const PS: u64 = MIB;

const CONFIG: &str = r#"
[tracking]
block_size = "4KiB"
partition_size = "1MiB"
interval = "1s"
"#;

fn run_status(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(common::grainfs_bin())
        .arg("status")
        .args(args)
        .output()
        .expect("run grainfs status")
}

/// `grainfs status --json PATH...`, parsed.
fn status(paths: &[&Path]) -> StatusReport {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--json".as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let out = run_status(&args);
    assert!(
        out.status.success(),
        "grainfs status --json {paths:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json output is not a StatusReport ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn volume<'a>(r: &'a StatusReport, path: &str) -> &'a ChangeMap {
    r.volumes
        .iter()
        .find(|v| v.path.as_deref() == Some(path))
        .unwrap_or_else(|| {
            panic!(
                "no volume {path} in status; have {:?}",
                r.volumes.iter().map(|v| &v.path).collect::<Vec<_>>()
            )
        })
}

fn paths(r: &StatusReport) -> BTreeSet<String> {
    r.volumes.iter().filter_map(|v| v.path.clone()).collect()
}

/// Non-zero per-partition dirty block counts, by partition index.
fn dirty_by_partition(m: &ChangeMap) -> BTreeMap<u64, u64> {
    m.partitions
        .iter()
        .filter(|p| p.dirty_blocks > 0)
        .map(|p| (p.index, p.dirty_blocks))
        .collect()
}

fn fill(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}

/// Poll `cond` every 20 ms until it holds or `secs` pass.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {p:?}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn writes_at_known_ranges_show_exactly_those_blocks_dirty() {
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    let p = m.path().join("a.img");
    let f = open_rw(&p);
    // Block 0.
    f.write_all_at(&fill(1, 100), 0).unwrap();
    // Unaligned over blocks 10, 11, 12.
    f.write_all_at(&fill(2, 8192), 10 * BS + 5).unwrap();
    // Straddling partitions 1 and 2: blocks 511 and 512.
    f.write_all_at(&fill(3, 20), 2 * PS - 10).unwrap();
    // Aligned, three blocks at the start of partition 5.
    f.write_all_at(&fill(4, 3 * BS), 5 * PS).unwrap();
    drop(f);

    let r = status(&[m.path()]);
    assert!(r.live && r.tracking, "{r:?}");
    assert_eq!((r.block_size, r.partition_size), (BS, PS));
    assert_eq!(r.interval_secs, 1.0);
    let v = volume(&r, "a.img");
    assert_eq!(
        dirty_by_partition(v),
        [(0, 4), (1, 1), (2, 1), (5, 3)].into(),
        "{v:?}"
    );
    assert_eq!(v.dirty_blocks, 9);
    assert_eq!(v.dirty_bytes, 9 * BS);
    assert_eq!(v.bytes_written, 100 + 8192 + 20 + 3 * BS);
    assert_eq!(v.size, 5 * PS + 3 * BS);
    assert_eq!(v.partitions.len(), 6);
    assert!(!v.unknown_all && v.unknown_partitions.is_empty());
    assert_eq!(r.volumes.len(), 1, "only the written file is a volume");

    // A file inside the mount as PATH gives the same answer.
    let r2 = status(&[&p]);
    assert_eq!(r2.volumes.len(), 1);
    assert_eq!(dirty_by_partition(&r2.volumes[0]), dirty_by_partition(v));

    // Overwrites add writes and bytes, not dirty blocks.
    let f = open_rw(&p);
    f.write_all_at(&fill(5, BS), 0).unwrap();
    drop(f);
    let v = status(&[m.path()]).volumes[0].clone();
    assert_eq!(v.dirty_blocks, 9);
    assert_eq!(v.bytes_written, 100 + 8192 + 20 + 3 * BS + BS);
    assert!(v.partitions[0].overwrites >= 1);
}

#[test]
fn dd_is_sequential_and_random_pwrites_are_random() {
    if common::missing("dd") {
        return;
    }
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    let seq = m.path().join("seq.img");
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", seq.display()))
        .args(["bs=64k", "count=200", "conv=notrunc", "status=none"])
        .output()
        .expect("run dd");
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rnd = m.path().join("rnd.img");
    let f = open_rw(&rnd);
    f.set_len(16 * MIB).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut offsets = BTreeSet::new();
    let buf = fill(0xab, BS);
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (16 * MIB / BS)) * BS;
        offsets.insert(off);
        f.write_all_at(&buf, off).unwrap();
    }
    drop(f);

    let r = status(&[m.path()]);
    let s = volume(&r, "seq.img");
    assert_eq!(s.access_pattern, AccessPattern::Sequential, "{s:?}");
    assert_eq!(s.dirty_blocks, 200 * 64 * KIB / BS);
    assert_eq!(s.bytes_written, 200 * 64 * KIB);
    assert_eq!(s.size, 200 * 64 * KIB);
    let rv = volume(&r, "rnd.img");
    assert_eq!(rv.access_pattern, AccessPattern::Random, "{rv:?}");
    assert_eq!(rv.dirty_blocks, offsets.len() as u64);
    assert_eq!(rv.size, 16 * MIB);
    assert_eq!(rv.bytes_written, 500 * BS);
    assert_eq!(rv.partitions.len(), 16);
    for p in rv.partitions.iter().filter(|p| p.writes >= 10) {
        assert_eq!(p.access_pattern, AccessPattern::Random, "partition {p:?}");
    }
}

#[test]
fn status_filters_by_path_draws_a_heatmap_and_works_offline() {
    let mut m = Mount::with_setup(|_| {}, Some(CONFIG));
    let mnt = m.path().to_path_buf();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    // a.img: partition 0 fully dirty, partition 1 clean, one block of partition 2.
    let f = open_rw(&mnt.join("a.img"));
    f.write_all_at(&fill(1, PS), 0).unwrap();
    f.write_all_at(&fill(1, 1), 2 * PS + 7).unwrap();
    drop(f);
    for (name, off) in [("dir/b.img", 0), ("dir/c.img", 3 * BS), ("d.img", PS)] {
        let f = open_rw(&mnt.join(name));
        f.write_all_at(&fill(2, 2 * BS), off).unwrap();
    }
    let all: BTreeSet<String> = ["a.img", "d.img", "dir/b.img", "dir/c.img"]
        .map(String::from)
        .into();

    let r = status(&[&mnt]);
    assert_eq!(paths(&r), all);
    assert_eq!(
        paths(&status(&[&mnt.join("dir")])),
        ["dir/b.img", "dir/c.img"].map(String::from).into()
    );
    assert_eq!(
        paths(&status(&[&mnt.join("a.img")])),
        ["a.img"].map(String::from).into()
    );
    assert_eq!(
        paths(&status(&[&mnt.join("a.img"), &mnt.join("dir/c.img")])),
        ["a.img", "dir/c.img"].map(String::from).into()
    );

    // The heatmap: per volume a title line and one row of plain shades (stdout is a pipe).
    let out = run_status(&["--heatmap".as_ref(), mnt.as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\x1b'), "no colours on a pipe:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let rows: Vec<&str> = lines
        .iter()
        .filter(|l| {
            l.starts_with("  ") && l.len() > 2 && l[2..].chars().all(|c| ".:+#@?".contains(c))
        })
        .copied()
        .collect();
    assert_eq!(rows.len(), all.len(), "one row per volume:\n{text}");
    for name in &all {
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no heatmap title for {name}:\n{text}"));
        assert!(rows.contains(&lines[i + 1]), "{name}:\n{text}");
    }
    let a = lines.iter().position(|l| l.starts_with("a.img ")).unwrap();
    assert_eq!(lines[a + 1], "  @.:", "{text}");
    assert!(text.contains("legend"), "{text}");

    // After a clean unmount, the saved state answers with the same dirty blocks.
    let live: BTreeMap<String, (u64, BTreeMap<u64, u64>)> = r
        .volumes
        .iter()
        .map(|v| {
            (
                v.path.clone().unwrap(),
                (v.dirty_blocks, dirty_by_partition(v)),
            )
        })
        .collect();
    assert!(m.stop().success(), "{}", m.log_text());
    let off = status(&[m.backing()]);
    assert!(!off.live, "{off:?}");
    assert!(off.tracking);
    assert_eq!((off.block_size, off.partition_size), (BS, PS));
    let offline: BTreeMap<String, (u64, BTreeMap<u64, u64>)> = off
        .volumes
        .iter()
        .map(|v| {
            (
                v.path.clone().unwrap_or_default(),
                (v.dirty_blocks, dirty_by_partition(v)),
            )
        })
        .collect();
    assert_eq!(offline, live);
    assert!(off
        .volumes
        .iter()
        .all(|v| !v.unknown_all && v.unknown_partitions.is_empty()));
    // Filters work offline too.
    assert_eq!(
        paths(&status(&[&m.backing().join("dir")])),
        ["dir/b.img", "dir/c.img"].map(String::from).into()
    );
    // And the text form says it is the saved state.
    let out = run_status(&[m.backing().as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("saved state"), "{text}");
}

/// The partitions of `ino` listed in the store's write-intent record.
fn intent_partitions(store: &Path, ino: u64) -> BTreeSet<u64> {
    let Ok(text) = std::fs::read_to_string(store.join("tracking/intent.json")) else {
        return BTreeSet::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("intent.json is JSON");
    v["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|e| e[0]["ino"].as_u64() == Some(ino))
        .filter_map(|e| e[1].as_u64())
        .collect()
}

fn signal(pid: u32, sig: i32) {
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

#[test]
fn kill9_leaves_the_partitions_written_after_the_last_tick_unknown_never_clean() {
    kill9_then_remount(Some(8 * PS));
}

#[test]

fn kill9_after_the_file_grew_shows_the_new_partitions_unknown() {
    kill9_then_remount(None);
}

/// Write partitions 0 and 1 of a volume (first sized to `size`, if given), wait for a tick,
/// write partition 5, kill -9 the daemon with partition 5 in the intent record, mount again.
fn kill9_then_remount(size: Option<u64>) {
    let mut m = Mount::with_setup(|_| {}, Some(CONFIG));
    let p = m.path().join("vol.img");
    let store = m.store();
    let f = open_rw(&p);
    if let Some(size) = size {
        f.set_len(size).unwrap();
    }
    f.write_all_at(&fill(1, BS), 0).unwrap();
    f.write_all_at(&fill(2, BS), PS + 2 * BS).unwrap();
    let ino = std::fs::metadata(m.backing().join("vol.img"))
        .unwrap()
        .ino();
    // A tick saves the bitmaps and clears the intent record.
    wait_for(20, "a tick to save partitions 0 and 1", || {
        intent_partitions(&store, ino).is_empty()
            && grainfs::track::load_state(&store)
                .ok()
                .flatten()
                .is_some_and(|s| {
                    s.volumes
                        .iter()
                        .any(|v| v.id.ino == ino && v.counters.len() >= 2)
                })
    });
    // Write to partition 5, then freeze the daemon and check that the intent record names it
    // (a tick could have slipped in between and saved it; then write again).
    let mut written = vec![(0, BS, 1u8), (PS + 2 * BS, BS, 2u8)];
    let mut attempt = 0;
    loop {
        let off = 5 * PS + attempt * BS;
        f.write_all_at(&fill(5, BS), off).unwrap();
        written.push((off, BS, 5));
        signal(m.pid(), libc::SIGSTOP);
        if intent_partitions(&store, ino).contains(&5) {
            break;
        }
        signal(m.pid(), libc::SIGCONT);
        attempt += 1;
        assert!(
            attempt < 50,
            "partition 5 never caught in the intent record"
        );
        wait_for(20, "the tick to finish", || {
            intent_partitions(&store, ino).is_empty()
        });
    }
    m.kill9();
    drop(f);

    m.remount();
    let r = status(&[m.path()]);
    let v = volume(&r, "vol.img");
    assert!(
        v.unknown_partitions.contains(&5),
        "partition 5 was written after the last tick and must be unknown: {v:?}"
    );
    assert!(v.partitions[5].unknown, "{:?}", v.partitions[5]);
    // Precision: the partitions saved by the tick are still known, with their dirty blocks.
    assert!(!v.unknown_all, "only partition 5 is in doubt: {v:?}");
    assert_eq!(v.unknown_partitions, vec![5]);
    assert_eq!(v.partitions[0].dirty_blocks, 1);
    assert_eq!(v.partitions[1].dirty_blocks, 1);
    // The data is intact.
    let f = std::fs::File::open(&p).unwrap();
    for (off, len, byte) in written {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|b| *b == byte), "data at {off}");
    }
    let want_size = size.unwrap_or(0).max(5 * PS + (attempt + 1) * BS);
    assert_eq!(f.metadata().unwrap().len(), want_size);
    assert_eq!(v.size, want_size);
    let log = m.log_text();
    assert!(log.contains("did not unmount cleanly"), "{log}");
}

#[test]
fn a_write_to_the_backing_file_while_unmounted_is_detected() {
    let mut m = Mount::with_setup(|_| {}, Some(CONFIG));
    for name in ["a.img", "b.img"] {
        let f = open_rw(&m.path().join(name));
        f.write_all_at(&fill(1, 2 * BS), PS).unwrap();
    }
    assert!(m.stop().success(), "{}", m.log_text());
    std::thread::sleep(Duration::from_millis(50));
    let f = OpenOptions::new()
        .write(true)
        .open(m.backing().join("a.img"))
        .unwrap();
    f.write_all_at(b"behind your back", 3 * BS).unwrap();
    drop(f);

    m.remount();
    let r = status(&[m.path()]);
    let a = volume(&r, "a.img");
    assert!(a.unknown_all, "{a:?}");
    assert!(a.partitions.iter().all(|p| p.unknown));
    let b = volume(&r, "b.img");
    assert!(!b.unknown_all && b.unknown_partitions.is_empty(), "{b:?}");
    assert_eq!(dirty_by_partition(b), [(1, 2)].into());
    assert!(m.log_text().contains("changed behind"), "{}", m.log_text());
}

#[test]
fn the_control_socket_and_tracking_files_are_private() {
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    let f = open_rw(&m.path().join("a.img"));
    f.write_all_at(b"x", 0).unwrap();
    let store = m.store();
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("control.sock")), 0o600);
    let tracking = store.join("tracking");
    // A new volume writes its first intent once a tick has saved it.
    wait_for(20, "a tick to save the volume in state.json", || {
        std::fs::read_to_string(tracking.join("state.json"))
            .is_ok_and(|t| !t.contains("\"volumes\":[]"))
    });
    f.write_all_at(b"y", 0).unwrap();
    assert!(tracking.join("intent.json").exists());
    assert_eq!(mode(&tracking) & 0o077, 0, "tracking dir is private");
    for e in std::fs::read_dir(&tracking).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{p:?}");
        }
    }
    // The store is never visible through the mount.
    assert!(!m.path().join(".grainfs").exists());
}

#[test]
fn tracking_disabled_reports_no_volumes() {
    let m = Mount::with_setup(
        |_| {},
        Some("[tracking]\nenabled = false\ninterval = \"1s\"\n"),
    );
    let f = open_rw(&m.path().join("a.img"));
    f.write_all_at(&fill(1, 3 * BS), 0).unwrap();
    drop(f);
    let r = status(&[m.path()]);
    assert!(r.live, "{r:?}");
    assert!(!r.tracking, "{r:?}");
    assert!(r.volumes.is_empty(), "{r:?}");
    assert_eq!(paths(&status(&[&m.path().join("a.img")])), BTreeSet::new());
}

#[test]
fn writes_through_a_shared_mapping_are_tracked() {
    use std::os::fd::AsRawFd;
    let m = Mount::with_setup(|_| {}, Some(CONFIG));
    let p = m.path().join("mmap.img");
    let f = open_rw(&p);
    f.set_len(16 * BS).unwrap();
    let len = (16 * BS) as usize;
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        let bytes = addr as *mut u8;
        *bytes.add(3 * BS as usize + 17) = 0xee;
        *bytes.add(9 * BS as usize) = 0xee;
        assert_eq!(libc::msync(addr, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(addr, len), 0);
    }
    drop(f);
    let r = status(&[&p]);
    let v = volume(&r, "mmap.img");
    assert_eq!(v.dirty_blocks, 2, "{v:?}");
    let data = std::fs::read(m.backing().join("mmap.img")).unwrap();
    assert_eq!(
        (data[3 * BS as usize + 17], data[9 * BS as usize]),
        (0xee, 0xee)
    );
}
