//! Write-back mode (`[fuse] writeback_cache`) through a real mount. The mode is refused by the
//! config for now: on Linux 6.18 a syncfs of the mount returned before an unsynced 3 MiB write
//! reached the daemon, so the snapshot flush cannot promise that a write made before
//! `snapshot create` is in the snapshot. What holds today: every fsync'd write survives a
//! kill -9 of the daemon (write-through mode), and the mount refuses write-back with a clear
//! error rather than running half of it.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{grainfs_bin, Mount, Noise, MIB, SMALL_GEOMETRY, WRITEBACK};

#[test]
fn fsynced_writes_survive_kill9_in_write_through_mode() {
    let mut m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut noise = Noise::new(11);
    let mut expect = Vec::new();
    {
        let mut f = File::create(m.path().join("v")).unwrap();
        let a = noise.bytes(MIB as usize + 5);
        f.write_all(&a).unwrap();
        f.sync_all().unwrap();
        expect.extend_from_slice(&a);
        let b = noise.bytes(4099);
        f.write_all_at(&b, 8191).unwrap();
        f.sync_data().unwrap();
        expect[8191..8191 + b.len()].copy_from_slice(&b);
        m.kill9();
        drop(f);
    }
    m.remount();
    assert!(
        fs::read(m.path().join("v")).unwrap() == expect,
        "through the mount"
    );
    assert!(
        fs::read(m.backing().join("v")).unwrap() == expect,
        "backing"
    );
}

#[test]
fn a_mount_asking_for_write_back_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("grainfs.toml");
    fs::write(&cfg, WRITEBACK).unwrap();
    let out = Command::new(grainfs_bin())
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    assert!(
        err.contains("fuse.writeback_cache") && err.contains("not available yet"),
        "{err}"
    );
}
