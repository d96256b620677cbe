//! Writes parked during a capture when the daemon is killed (kill -9), then what happens to the
//! volume while no daemon runs, then a new daemon: parked bytes are replayed only into the very
//! file they were parked for and only if nobody changed it since; otherwise they are kept in
//! `<store>/lost+found/`, the file is left alone, and `grainfs recover` lists and applies them.
//! Never a stale write over newer bytes, never a write into another file, never a lost write.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Mount, Noise};
use grainfs::control::StatusReport;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIZE: u64 = 256 * MIB;
const SLOT: u64 = 4 * KIB;

fn write_big(path: &Path) {
    let f = File::create(path).unwrap();
    for i in 0..SIZE / MIB {
        f.write_all_at(&Noise::new(1000 + i).bytes(MIB as usize), i * MIB)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Start a FULL snapshot of big.img, write 4 KiB slots far ahead of the capture until 300
/// writes returned, and kill -9 the daemon while the writer still runs. Returns the writes that
/// returned, in order; the one in flight at the kill is left out (it never returned).
fn park_and_kill(m: &mut Mount, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let store = m.store();
    let big = m.path().join("big.img");
    let mut create = Command::new(common::grainfs_bin())
        .args([
            "snapshot", "create", "--path", "big.img", "--name", "s1", "-m",
        ])
        .arg(m.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapshot create");
    let wait = Instant::now();
    while du(&store.join("snapshots/.tmp-s1")) < 4 * MIB {
        assert!(
            wait.elapsed() < Duration::from_secs(30),
            "the capture never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop = AtomicBool::new(false);
    let returned = Mutex::new(Vec::<(u64, Vec<u8>)>::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = OpenOptions::new().write(true).open(&big).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Distinct slots in the second half, which the capture reaches last.
                let off = SIZE / 2 + (i * 7919 % (SIZE / 2 / SLOT)) * SLOT;
                let data = Noise::new(seed * 1_000_000 + i).bytes(SLOT as usize);
                i += 1;
                if f.write_all_at(&data, off).is_err() {
                    return;
                }
                returned.lock().unwrap().push((off, data));
            }
        });
        let wait = Instant::now();
        while returned.lock().unwrap().len() < 300 {
            assert!(
                wait.elapsed() < Duration::from_secs(30),
                "the writer is stuck"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Ok(Some(st)) = create.try_wait() {
            panic!("the capture ended ({st}) before it could be killed");
        }
        m.kill9();
        stop.store(true, Ordering::Relaxed);
    });
    let out = create.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ended while it took the snapshot"),
        "a snapshot cut off by the daemon's death must say so: {err}"
    );
    returned.into_inner().unwrap()
}

/// `grainfs recover --json` for the mount's backing dir.
fn recover_list(m: &Mount) -> Vec<serde_json::Value> {
    let out = Command::new(common::grainfs_bin())
        .args(["recover", "--json", "-m"])
        .arg(m.backing())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grainfs recover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kept_writes(k: &serde_json::Value) -> usize {
    k["writes"].as_array().map_or(0, Vec::len)
}

fn recover_apply(m: &Mount, name: &str, to: &Path) {
    let out = Command::new(common::grainfs_bin())
        .args(["recover", "apply", name, "--to"])
        .arg(to)
        .arg("-m")
        .arg(m.backing())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grainfs recover apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unknown_all(m: &Mount, rel: &str) -> bool {
    let out = Command::new(common::grainfs_bin())
        .args(["status", "--json"])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    r.volumes
        .iter()
        .find(|v| v.path.as_deref() == Some(rel))
        .unwrap_or_else(|| panic!("no volume {rel} in status"))
        .unknown_all
}

fn slot_of(data: &[u8], off: u64) -> &[u8] {
    &data[off as usize..(off + SLOT) as usize]
}

fn mount_big() -> Mount {
    Mount::with_setup(|b| write_big(&b.join("big.img")), None)
}

/// (a) Nothing happened while no daemon ran: the parked bytes are in the file after the
/// remount, nothing else changed, nothing is kept aside, and tracking carries on (the next
/// snapshot equals the file).
#[test]
fn a_plain_remount_replays_every_parked_write() {
    let mut m = mount_big();
    let original = std::fs::read(m.backing().join("big.img")).unwrap();
    let returned = park_and_kill(&mut m, 1);
    m.remount();
    let live = std::fs::read(m.backing().join("big.img")).unwrap();
    for (off, data) in &returned {
        assert!(
            slot_of(&live, *off) == &data[..],
            "a write at {off} returned before the kill and is not in the file"
        );
    }
    // Every other byte is as it was, but for the one write in flight at the kill (it never
    // returned: old or new content are both right).
    let written: std::collections::BTreeSet<u64> = returned.iter().map(|(o, _)| *o).collect();
    let differing: Vec<u64> = (0..SIZE / SLOT)
        .map(|s| s * SLOT)
        .filter(|o| !written.contains(o) && slot_of(&live, *o) != slot_of(&original, *o))
        .collect();
    assert!(differing.len() <= 1, "bytes nobody wrote at {differing:?}");
    assert!(
        m.log_text().contains("replayed"),
        "the daemon did not say it replayed parked writes: {}",
        m.log_text()
    );
    assert!(
        recover_list(&m).is_empty(),
        "writes kept aside on a plain remount: {}",
        m.log_text()
    );
    assert!(!m.store().join("deferred").read_dir().unwrap().any(|_| true));
    // Tracked as usual after it: the next snapshot has every write.
    let out = Command::new(common::grainfs_bin())
        .args([
            "snapshot", "create", "--path", "big.img", "--name", "s2", "-m",
        ])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = std::fs::read(m.path().join(".snapshots/s2/big.img")).unwrap();
    assert!(
        snap == live,
        "the snapshot after the replay differs from the file"
    );
}

/// (b) Newer bytes were written directly into the backing file while no daemon ran: they win,
/// the parked (older) bytes go to lost+found, the volume is unknown, and `recover apply` can
/// still write the parked bytes on request.
#[test]
fn bytes_written_behind_the_overlays_back_win_over_parked_ones() {
    let mut m = mount_big();
    let returned = park_and_kill(&mut m, 2);
    let backing = m.backing().join("big.img");
    {
        let f = OpenOptions::new().write(true).open(&backing).unwrap();
        for (i, (off, _)) in returned.iter().enumerate() {
            f.write_all_at(&Noise::new(900_000 + i as u64).bytes(SLOT as usize), *off)
                .unwrap();
        }
    }
    m.remount();
    let live = std::fs::read(&backing).unwrap();
    for (i, (off, _)) in returned.iter().enumerate() {
        assert!(
            slot_of(&live, *off) == &Noise::new(900_000 + i as u64).bytes(SLOT as usize)[..],
            "an older parked write at {off} was replayed over newer bytes"
        );
    }
    let kept = recover_list(&m);
    assert_eq!(kept.len(), 1, "one journal kept aside: {kept:?}");
    assert!(
        kept_writes(&kept[0]) > 0,
        "no parked write was left unapplied at the kill: the test did not test"
    );
    assert_eq!(kept[0]["path"], "big.img");
    assert!(
        kept[0]["reason"].as_str().unwrap().contains("changed"),
        "{kept:?}"
    );
    let log = m.log_text();
    assert!(
        log.contains("big.img") && log.contains("lost+found"),
        "the log does not say where the writes went: {log}"
    );
    assert!(
        unknown_all(&m, "big.img"),
        "the volume is not marked unknown"
    );
    // Applied on request, through the mount: the parked bytes come back for the ranges kept.
    let name = kept[0]["name"].as_str().unwrap().to_string();
    let kept_offsets: Vec<u64> = kept[0]["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["offset"].as_u64().unwrap())
        .collect();
    recover_apply(&m, &name, &m.path().join("big.img"));
    let live = std::fs::read(&backing).unwrap();
    let mut not_returned = 0;
    for off in &kept_offsets {
        // The write in flight at the kill may have been parked without its reply reaching the
        // writer: applying it is right, but the test does not know its bytes.
        let Some((_, data)) = returned.iter().rev().find(|(o, _)| o == off) else {
            not_returned += 1;
            continue;
        };
        assert!(
            slot_of(&live, *off) == &data[..],
            "apply did not write {off}"
        );
    }
    assert!(not_returned <= 1, "{not_returned} kept writes nobody made");
    let after = recover_list(&m);
    assert_eq!(after[0]["applied"], true, "{after:?}");
}

/// (c) The volume was deleted while no daemon ran and a new file got its inode number: the new
/// file is left untouched and the writes are kept aside.
#[test]
fn a_new_file_reusing_the_volumes_inode_number_is_never_written() {
    let mut m = mount_big();
    let returned = park_and_kill(&mut m, 3);
    let backing = m.backing().join("big.img");
    let ino = std::fs::metadata(&backing).unwrap().ino();
    std::fs::remove_file(&backing).unwrap();
    // Make files until one reuses the inode number (ext4 and XFS hand a freed one out again
    // soon); the others go again.
    let content = Noise::new(77).bytes(1024 * 1024);
    let mut reused = None;
    for i in 0..2000 {
        let p = m.backing().join(format!("new-{i}.img"));
        std::fs::write(&p, &content).unwrap();
        if std::fs::metadata(&p).unwrap().ino() == ino {
            reused = Some(p);
            break;
        }
        std::fs::remove_file(&p).unwrap();
    }
    let Some(new) = reused else {
        eprintln!("SKIP: the filesystem never reused inode {ino}");
        return;
    };
    m.remount();
    assert!(
        std::fs::read(&new).unwrap() == content,
        "parked writes of the deleted volume went into the new file with its inode number"
    );
    let kept = recover_list(&m);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept_writes(&kept[0]) > 0, "the test did not test");
    assert!(
        returned.len() + 1 >= kept_writes(&kept[0]),
        "more writes kept than were made"
    );
}

/// (d) The volume was renamed while no daemon ran: every write that returned ends up in it,
/// replayed at the remount or applied from lost+found, never lost.
#[test]
fn a_volume_renamed_while_down_loses_no_parked_write() {
    let mut m = mount_big();
    let returned = park_and_kill(&mut m, 4);
    let moved = m.backing().join("moved.img");
    std::fs::rename(m.backing().join("big.img"), &moved).unwrap();
    m.remount();
    for k in recover_list(&m) {
        assert_eq!(k["path"], "big.img");
        recover_apply(&m, k["name"].as_str().unwrap(), &m.path().join("moved.img"));
    }
    let live = std::fs::read(&moved).unwrap();
    for (off, data) in &returned {
        assert!(
            slot_of(&live, *off) == &data[..],
            "a write at {off} returned before the kill and is lost after the rename"
        );
    }
}
