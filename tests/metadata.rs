//! What the kernel caches of names, through a real mount: a name looked up while missing is
//! cached as a negative entry, and that must never hide a file made through the mount (create,
//! mkdir, symlink, link, rename, from this or another process), nor a snapshot just taken under
//! `.snapshots`; a file made behind the overlay's back shows within the entry timeout (at once
//! with `entry_timeout = "0s"`). Also: closes need no FLUSH round trip and lose nothing.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{grainfs_bin, Mount};

fn missing(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Err(e) => e.kind() == ErrorKind::NotFound,
        Ok(_) => false,
    }
}

/// Look `name` up a few times while it does not exist (the kernel now holds a negative entry).
fn look_up_while_missing(p: &Path) {
    for _ in 0..3 {
        assert!(missing(p), "{p:?} exists before the test made it");
    }
}

#[test]
fn names_made_through_the_mount_show_at_once_after_a_failed_lookup() {
    // A long entry timeout: a stale negative entry would show for the whole test.
    let m = Mount::with_setup(
        |b| fs::write(b.join("src"), b"source").unwrap(),
        Some("[cache]\nentry_timeout = \"1h\"\nattr_timeout = \"1h\"\n"),
    );
    let d = m.path();

    let p = d.join("created");
    look_up_while_missing(&p);
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");

    let p = d.join("dir");
    look_up_while_missing(&p);
    fs::create_dir(&p).unwrap();
    assert!(fs::metadata(&p).unwrap().is_dir());
    let inner = p.join("inner");
    look_up_while_missing(&inner);
    fs::write(&inner, b"x").unwrap();
    assert!(inner.exists());

    let p = d.join("symlink");
    look_up_while_missing(&p);
    std::os::unix::fs::symlink("src", &p).unwrap();
    assert_eq!(fs::read_link(&p).unwrap(), Path::new("src"));

    let p = d.join("hardlink");
    look_up_while_missing(&p);
    fs::hard_link(d.join("src"), &p).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"source");
    assert_eq!(fs::metadata(&p).unwrap().nlink(), 2);

    let p = d.join("renamed");
    look_up_while_missing(&p);
    fs::rename(d.join("created"), &p).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    assert!(missing(&d.join("created")));

    // Made by another process through the mount: same kernel, same dentry cache.
    let p = d.join("by-shell");
    look_up_while_missing(&p);
    let ok = Command::new("sh")
        .arg("-c")
        .arg("echo hi > by-shell && mkdir by-shell-dir")
        .current_dir(d)
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(fs::read(&p).unwrap(), b"hi\n");
    assert!(d.join("by-shell-dir").is_dir());

    // Removed and made again.
    fs::remove_file(&p).unwrap();
    look_up_while_missing(&p);
    fs::write(&p, b"again").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"again");

    // The listing agrees with every lookup.
    let mut names: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "by-shell",
            "by-shell-dir",
            "dir",
            "hardlink",
            "renamed",
            "src",
            "symlink"
        ]
    );
}

/// Poll `p` until it exists; how long that took.
fn shows_within(p: &Path, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if p.exists() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_file_made_behind_the_overlays_back_shows_within_the_entry_timeout() {
    let m = Mount::with_setup(|_| {}, Some("[cache]\nentry_timeout = \"2s\"\n"));
    let p = m.path().join("outside");
    look_up_while_missing(&p);
    fs::write(m.backing().join("outside"), b"x").unwrap();
    // Within the documented timeout (2 s here), plus slack for a loaded machine.
    let took = shows_within(&p, Duration::from_secs(5));
    assert!(took.is_some(), "not visible 5 s after it was made");

    // With entry_timeout = 0 nothing is cached: it shows at once.
    let m = Mount::with_setup(|_| {}, Some("[cache]\nentry_timeout = \"0s\"\n"));
    let p = m.path().join("outside");
    look_up_while_missing(&p);
    fs::write(m.backing().join("outside"), b"x").unwrap();
    assert!(
        p.exists(),
        "entry_timeout = 0s must cache no negative entry"
    );
}

#[test]
fn a_snapshot_shows_at_once_after_its_name_was_looked_up() {
    let m = Mount::with_setup(
        |b| fs::write(b.join("vol.img"), vec![7u8; 8192]).unwrap(),
        Some("[cache]\nentry_timeout = \"1h\"\n"),
    );
    let snap = m.path().join(".snapshots").join("s1");
    look_up_while_missing(&snap);
    look_up_while_missing(&snap.join("vol.img"));
    let out = Command::new(grainfs_bin())
        .current_dir(m.path())
        .args(["snapshot", "create", "--name", "s1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(snap.join("vol.img")).unwrap(), vec![7u8; 8192]);
    // Inside a snapshot nothing changes, so a missing name stays missing.
    look_up_while_missing(&snap.join("other"));
}

#[test]
fn closing_files_keeps_every_byte_without_flush_requests() {
    let m = Mount::new();
    for i in 0..200 {
        let p = m.path().join(format!("f{i}"));
        fs::write(&p, format!("content {i}")).unwrap();
    }
    for i in 0..200 {
        let p = m.path().join(format!("f{i}"));
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("content {i}"));
        assert_eq!(
            fs::read_to_string(m.backing().join(format!("f{i}"))).unwrap(),
            format!("content {i}")
        );
    }
}
