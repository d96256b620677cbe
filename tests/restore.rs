//! `grainfs restore` through a real mount, as a user runs it: a tree with sparse files, nested
//! directories, symlinks, setuid, other owners and old mtimes comes back as it was (holes as
//! holes); a middle snapshot of a chain restores as its `.snapshots` view reads; restores with
//! the daemon stopped; `--force` and what it never does (remove a directory, follow a symlink
//! in DIR); a damaged pack stops the restore naming the volume and block and leaves no file
//! looking complete; PATH selection; a restore by an ordinary user warns about owners; a
//! restore racing a delete that rewrites the snapshot reads on; a sqlite3 database under load, snapshotted every second, restores to a database that passes
//! `PRAGMA integrity_check`.
//!
//! The oracle: the backing dir (or the snapshot's view) walked without following symlinks,
//! each entry's kind, mode, owner, mtime and content blake3 (or link target), compared with the
//! restored tree walked the same way.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes};
use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{blake3_file, open_rw, Mount, Noise, Rng, KIB, MIB, SMALL_GEOMETRY};

// ---------------------------------------------------------------------------------------------
// Helpers

fn grainfs(args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut c = Command::new(common::grainfs_bin());
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null()).output().expect("run grainfs")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", text(o));
}

fn snapshot(m: &Mount, name: &str) {
    common::create_snapshot(m, name);
}

/// `grainfs restore NAME ARGS... --to TO -m AT`.
fn restore(at: &Path, name: &str, args: &[&str], to: &Path) -> Output {
    let mut c = Command::new(common::grainfs_bin());
    c.arg("restore").arg(name).args(args).arg("--to").arg(to);
    c.arg("-m").arg(at);
    c.stdin(Stdio::null())
        .output()
        .expect("run grainfs restore")
}

fn restore_json(at: &Path, name: &str, args: &[&str], to: &Path) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = restore(at, name, &all, to);
    assert_ok(&o, &format!("restore {name} --json"));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("restore --json: {e}: {}", text(&o)))
}

/// One entry of a tree as the oracle compares it.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
        size: u64,
        blake3: String,
    },
    Link {
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
        target: PathBuf,
    },
}

/// Every entry under `root` (not `root` itself, not the store), never following a symlink.
fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir:?}: {e}")) {
            let e = e.expect("dir entry");
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && name == ".grainfs" {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).expect("lstat");
            let mtime = (md.mtime(), md.mtime_nsec());
            let node = if md.file_type().is_symlink() {
                Node::Link {
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime,
                    target: fs::read_link(&p).expect("readlink"),
                }
            } else if md.is_dir() {
                walk(root, &r, out);
                Node::Dir {
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime,
                }
            } else {
                Node::File {
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime,
                    size: md.len(),
                    blake3: blake3_file(&p),
                }
            };
            out.insert(r, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Paths and content hashes only (what the `.snapshots` view shows exactly: it drops setuid).
fn contents(t: &BTreeMap<String, Node>) -> BTreeMap<String, String> {
    t.iter()
        .map(|(p, n)| {
            let v = match n {
                Node::Dir { .. } => "dir".to_string(),
                Node::File { blake3, size, .. } => format!("{size} {blake3}"),
                Node::Link { target, .. } => format!("-> {}", target.display()),
            };
            (p.clone(), v)
        })
        .collect()
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn set_mtime(p: &Path, t: SystemTime) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {p:?}: {e}"));
    f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap_or_else(|e| panic!("set times of {p:?}: {e}"));
}

fn set_link_mtime(p: &Path, secs: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "lutimes {p:?}: {}", std::io::Error::last_os_error());
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {p:?}: {e}"));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {p:?}: {e}"));
}

fn root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (owners, setuid, a FUSE mount)");
        return false;
    }
    true
}

/// The tree the round trip restores, made through the mount: a 64 MiB sparse volume with
/// three 64 KiB extents, nested directories, a setuid program, files and a directory owned by
/// uid 1234, symlinks (one dangling), and old mtimes with nanoseconds everywhere.
fn populate(mnt: &Path) {
    let mut noise = Noise::named("restore round trip");
    fs::create_dir_all(mnt.join("a/b/c")).unwrap();
    fs::create_dir_all(mnt.join("bin")).unwrap();
    fs::create_dir_all(mnt.join("empty")).unwrap();
    let sparse = open_rw(&mnt.join("a/sparse.img"));
    sparse.set_len(64 * MIB).unwrap();
    for off in [MIB, 20 * MIB, 64 * MIB - 64 * KIB] {
        use std::os::unix::fs::FileExt;
        sparse
            .write_all_at(&noise.bytes(64 * KIB as usize), off)
            .unwrap();
    }
    sparse.sync_all().unwrap();
    drop(sparse);
    fs::write(mnt.join("a/b/c/small.txt"), b"small and plain\n").unwrap();
    fs::write(mnt.join("a/b/owned.bin"), noise.bytes(10_000)).unwrap();
    fs::write(mnt.join("bin/prog"), noise.bytes(5000)).unwrap();
    fs::write(mnt.join("empty.txt"), b"").unwrap();
    std::os::unix::fs::symlink("b/c/small.txt", mnt.join("a/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", mnt.join("a/b/dangling")).unwrap();
    chown(&mnt.join("a/b/owned.bin"), 1234, 1234);
    chown(&mnt.join("a/b"), 1234, 1234);
    chown(&mnt.join("a/b/dangling"), 1234, 1234);
    // After the chown, which would clear it.
    chmod(&mnt.join("bin/prog"), 0o4755);
    chmod(&mnt.join("a/b/owned.bin"), 0o640);
    chmod(&mnt.join("a/b"), 0o750);
    chmod(&mnt.join("bin"), 0o2775);
    set_mtime(&mnt.join("a/sparse.img"), at(1_500_000_000, 123_456_789));
    set_mtime(&mnt.join("a/b/c/small.txt"), at(1_400_000_000, 1));
    set_mtime(&mnt.join("a/b/owned.bin"), at(1_300_000_000, 999_999_999));
    set_mtime(&mnt.join("bin/prog"), at(1_200_000_000, 500));
    set_mtime(&mnt.join("empty.txt"), at(1_100_000_000, 0));
    set_link_mtime(&mnt.join("a/link"), 1_000_000_000);
    set_link_mtime(&mnt.join("a/b/dangling"), 1_000_000_001);
    // Directories last: creating in them changes their mtime.
    for (d, s) in [
        ("a/b/c", 900_000_000),
        ("a/b", 800_000_000),
        ("a", 700_000_000),
        ("bin", 600_000_000),
        ("empty", 500_000_000),
    ] {
        set_mtime(&mnt.join(d), at(s, 42));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_tree_comes_back_with_holes_modes_owners_times_and_symlinks() {
    if !root() {
        return;
    }
    let m = Mount::new();
    populate(m.path());
    snapshot(&m, "s1");
    let before = tree(m.backing());
    let out = m.scratch().join("out");
    let report = restore_json(m.path(), "s1", &[], &out);
    // atime = mtime (looked at before anything reads the file, which would move its atime).
    let md = fs::metadata(out.join("a/sparse.img")).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_500_000_000, 123_456_789));

    let after = tree(&out);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (p, n) in &before {
        assert_eq!(&after[p], n, "{p}");
    }
    // Holes stay holes: 192 KiB of data in a 64 MiB file.
    let md = fs::metadata(out.join("a/sparse.img")).unwrap();
    assert_eq!(md.len(), 64 * MIB);
    let allocated = md.blocks() * 512;
    assert!(
        (192 * KIB..2 * MIB).contains(&allocated),
        "restored sparse file has {allocated} bytes allocated, its data is 192 KiB"
    );
    assert_eq!(report["files"], 5, "{report}");
    assert_eq!(report["symlinks"], 2, "{report}");
    assert_eq!(report["dirs"], 5, "{report}");
    assert_eq!(report["owners_restored"], true, "{report}");
    let written = report["bytes_written"].as_u64().unwrap();
    assert_eq!(written, 192 * KIB + 16 + 10_000 + 5000, "{report}");
    // The store and DIR share one filesystem, where copy_file_range always works (a reflink on
    // XFS and btrfs, an in-kernel copy elsewhere).
    assert_eq!(
        report["bytes_copied"].as_u64().unwrap(),
        written,
        "{report}"
    );
    assert!(report["elapsed_ms"].is_u64(), "{report}");
    // Nothing of the restore's temp names is left.
    assert!(!tree(&out).keys().any(|p| p.contains(".grainfs-restore")));
}

#[test]
fn a_middle_snapshot_of_a_chain_restores_as_its_view_reads() {
    if !root() {
        return;
    }
    let m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut noise = Noise::named("restore chain");
    let mut rng = Rng::new(7);
    let vol = m.path().join("vm/disk.img");
    fs::create_dir_all(vol.parent().unwrap()).unwrap();
    fs::write(&vol, noise.bytes(3 * MIB as usize)).unwrap();
    fs::write(m.path().join("vm/notes.txt"), b"first").unwrap();
    snapshot(&m, "c0");
    let write_blocks = |noise: &mut Noise, rng: &mut Rng, n: u64| {
        use std::os::unix::fs::FileExt;
        let f = open_rw(&vol);
        for _ in 0..n {
            let off = rng.below(3 * MIB / 4096) * 4096;
            f.write_all_at(&noise.bytes(4096), off).unwrap();
        }
        f.sync_all().unwrap();
    };
    write_blocks(&mut noise, &mut rng, 40);
    fs::write(m.path().join("vm/notes.txt"), b"second, longer").unwrap();
    fs::write(m.path().join("vm/only-in-c1"), noise.bytes(9000)).unwrap();
    snapshot(&m, "c1");
    write_blocks(&mut noise, &mut rng, 40);
    fs::remove_file(m.path().join("vm/only-in-c1")).unwrap();
    open_rw(&vol).set_len(2 * MIB + 100).unwrap();
    snapshot(&m, "c2");

    // c1 really reads through its parent.
    let o = grainfs(&[&"snapshot", &"show", &"c1", &"--json", &"-m", &m.path()]);
    assert_ok(&o, "snapshot show c1");
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kinds: Vec<String> = shown["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kinds.iter().any(|k| k != "FULL"),
        "c1 has no INCREMENTAL partition: {kinds:?}"
    );

    let out = m.scratch().join("c1");
    restore_json(m.path(), "c1", &[], &out);
    let view = tree(&m.path().join(".snapshots/c1"));
    let restored = tree(&out);
    assert_eq!(contents(&restored), contents(&view));
    assert!(restored.contains_key("vm/only-in-c1"));
}

#[test]
fn a_restore_works_with_the_daemon_stopped() {
    if !root() {
        return;
    }
    let mut m = Mount::new();
    populate(m.path());
    snapshot(&m, "offline");
    let before = tree(m.backing());
    m.stop();
    let out = m.scratch().join("out");
    let o = restore(m.backing(), "offline", &[], &out);
    assert_ok(&o, "restore without a daemon");
    assert!(String::from_utf8_lossy(&o.stdout).contains("restored offline"));
    assert_eq!(tree(&out), before);
}

#[test]
fn existing_files_are_refused_without_force_and_force_never_follows_or_removes() {
    if !root() {
        return;
    }
    let m = Mount::new();
    fs::create_dir_all(m.path().join("d")).unwrap();
    fs::write(m.path().join("d/f"), b"snapshot content").unwrap();
    fs::write(m.path().join("g"), b"other").unwrap();
    snapshot(&m, "s");
    let out = m.scratch().join("out");

    // Something in the way: named, and nothing written (g is not restored either).
    fs::create_dir_all(out.join("d")).unwrap();
    fs::write(out.join("d/f"), b"mine").unwrap();
    let o = restore(m.path(), "s", &[], &out);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&out.join("d/f").display().to_string()) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(out.join("d/f")).unwrap(), b"mine");
    assert!(!out.join("g").exists());

    // --force replaces the file.
    let o = restore(m.path(), "s", &["--force"], &out);
    assert_ok(&o, "restore --force");
    assert_eq!(fs::read(out.join("d/f")).unwrap(), b"snapshot content");
    assert_eq!(fs::read(out.join("g")).unwrap(), b"other");

    // A symlink in DIR where the snapshot has a directory is replaced, never followed.
    let elsewhere = m.scratch().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let out2 = m.scratch().join("out2");
    fs::create_dir_all(&out2).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out2.join("d")).unwrap();
    let o = restore(m.path(), "s", &[], &out2);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&out2.join("d").display().to_string()));
    let o = restore(m.path(), "s", &["--force"], &out2);
    assert_ok(&o, "restore --force over a symlink");
    assert!(fs::symlink_metadata(out2.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(out2.join("d/f")).unwrap(), b"snapshot content");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A directory where the snapshot has a file: refused even with --force, nothing removed.
    let out3 = m.scratch().join("out3");
    fs::create_dir_all(out3.join("g/keep")).unwrap();
    let o = restore(m.path(), "s", &["--force"], &out3);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&out3.join("g").display().to_string()) && err.contains("directory"),
        "{err}"
    );
    assert!(out3.join("g/keep").is_dir());
    assert!(!out3.join("d").exists());
}

#[test]
fn a_damaged_pack_stops_the_restore_naming_the_volume_and_block() {
    if !root() {
        return;
    }
    let m = Mount::new();
    let mut noise = Noise::named("restore damage");
    fs::create_dir_all(m.path().join("v")).unwrap();
    fs::write(m.path().join("v/disk.img"), noise.bytes(2 * MIB as usize)).unwrap();
    snapshot(&m, "dmg");
    // Reflinked blocks are only hashed after the commit: damage before that is not caught.
    common::wait_hashed(m.path());
    let dir = m.store().join("snapshots/dmg");
    let pack = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pack-")
        })
        .expect("a pack file");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap();
        let at = f.metadata().unwrap().len() / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
    // Which block verify finds damaged.
    let o = grainfs(&[&"snapshot", &"verify", &"dmg", &"--json", &"-m", &m.path()]);
    assert!(!o.status.success(), "verify passed a damaged pack");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let block = v[0]["problems"][0]["block"]
        .as_u64()
        .expect("a damaged block");

    let out = m.scratch().join("out");
    let o = restore(m.path(), "dmg", &[], &out);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("v/disk.img") && err.contains(&format!("block {block} ")),
        "{err}"
    );
    // No file that looks complete, and no temp file left.
    assert!(!out.join("v/disk.img").exists());
    let left: Vec<_> = fs::read_dir(out.join("v"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn paths_select_files_and_subtrees() {
    if !root() {
        return;
    }
    let m = Mount::new();
    populate(m.path());
    snapshot(&m, "sel");
    let before = tree(m.backing());

    let out = m.scratch().join("sub");
    let o = restore(m.path(), "sel", &["a/b", "./bin/prog"], &out);
    assert_ok(&o, "restore a/b bin/prog");
    let got = tree(&out);
    let want: Vec<&String> = before
        .keys()
        .filter(|p| {
            p.as_str() == "a"
                || p.starts_with("a/b")
                || p.as_str() == "bin"
                || p.as_str() == "bin/prog"
        })
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), want);
    for (p, n) in &got {
        assert_eq!(n, &before[p], "{p}");
    }

    // A PATH that matches nothing is named, and nothing is written.
    let out = m.scratch().join("none");
    let o = restore(m.path(), "sel", &["a/b", "a/nope"], &out);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a/nope"));
    assert!(!out.exists());
    // "a/b" does not select "a/bb..." siblings, and ".." is refused.
    let o = restore(m.path(), "sel", &["../x"], &out);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn a_restore_by_an_ordinary_user_warns_about_owners() {
    if !root() || common::missing("setpriv") {
        return;
    }
    let mut m = Mount::new();
    populate(m.path());
    snapshot(&m, "user");
    let before = tree(m.backing());
    m.stop();
    // The store is root's, mode 0700: give it (and the way to it) to nobody, as the store of
    // a mount nobody made.
    let tmp = m.backing().parent().unwrap().to_path_buf();
    chmod(&tmp, 0o755);
    let o = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(m.store())
        .output()
        .unwrap();
    assert_ok(&o, "chown the store");
    let out = m.scratch().join("mine");
    fs::create_dir_all(&out).unwrap();
    chown(&m.scratch(), 65534, 65534);
    chown(&out, 65534, 65534);
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::grainfs_bin())
        .args(["restore", "user", "--to"])
        .arg(&out)
        .arg("-m")
        .arg(m.backing())
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv");
    if String::from_utf8_lossy(&o.stderr).contains("setpriv:") {
        eprintln!("SKIP: setpriv cannot switch users here: {}", text(&o));
        return;
    }
    assert_ok(&o, "restore as uid 65534");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("not running as root").count(), 1, "{err}");
    let got = tree(&out);
    assert_eq!(contents(&got), contents(&before));
    for (p, n) in &got {
        match n {
            Node::File { uid, mode, .. } | Node::Dir { uid, mode, .. } => {
                assert_eq!(*uid, 65534, "{p}");
                if let Node::File { mode: want, .. } | Node::Dir { mode: want, .. } = &before[p] {
                    // setgid needs membership of the file's group, which nobody lacks here.
                    assert_eq!(mode & 0o5777, want & 0o5777, "{p}");
                }
            }
            Node::Link { uid, .. } => assert_eq!(*uid, 65534, "{p}"),
        }
    }
}

/// A database written through the mount by one sqlite3 process while snapshots are taken
/// about every second; a middle snapshot restored is a consistent database.
fn sqlite_restores_consistent(journal_mode: &str) {
    if !root() || common::missing("sqlite3") {
        return;
    }
    let m = Mount::new();
    let db = m.path().join("data/app.db");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "PRAGMA journal_mode={journal_mode}; CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, b BLOB);"
        ))
        .output()
        .unwrap();
    assert_ok(&o, "create the database");

    let mut child = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let out = child.stdout.take().unwrap();
        let acked = acked.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                if let Ok(n) = line.unwrap_or_default().trim().parse::<u64>() {
                    acked.store(n, Ordering::SeqCst);
                }
            }
        })
    };
    let feeder = {
        let mut input = child.stdin.take().unwrap();
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if n >= acked.load(Ordering::SeqCst) + 2 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                n += 1;
                // Inserts, updates and deletes: pages split, merge and move.
                let sql = format!(
                    "BEGIN;\nWITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 20)\n\
                     INSERT INTO t(n, b) SELECT {n}, randomblob(abs(random()) % 6000) FROM k;\n\
                     UPDATE t SET b = randomblob(100) WHERE id % 7 = {m};\n\
                     DELETE FROM t WHERE id % 11 = {m} AND n < {n} - 5;\nCOMMIT;\nSELECT {n};\n",
                    m = n % 7
                );
                if input.write_all(sql.as_bytes()).is_err() {
                    return;
                }
            }
        })
    };
    let mut names = Vec::new();
    let started = Instant::now();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(1000));
        let name = format!("db{i}");
        // Every commit that returned before the snapshot began is in it.
        let acked_before = acked.load(Ordering::SeqCst);
        snapshot(&m, &name);
        names.push((name, acked_before));
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "sqlite3 failed");
    assert!(
        acked.load(Ordering::SeqCst) > 5,
        "sqlite3 committed too little in {:?}",
        started.elapsed()
    );

    let (middle, acked_at) = &names[2];
    let out = m.scratch().join(middle);
    restore_json(m.path(), middle, &[], &out);
    let o = Command::new("sqlite3")
        .arg(out.join("data/app.db"))
        .arg("PRAGMA integrity_check; SELECT count(*) > 0, max(n) FROM t;")
        .output()
        .unwrap();
    assert_ok(&o, "sqlite3 on the restored database");
    let text_out = String::from_utf8_lossy(&o.stdout);
    let mut lines = text_out.lines();
    assert_eq!(lines.next(), Some("ok"), "{journal_mode}: {text_out}");
    let counts: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
    assert_eq!(counts[0], "1", "{text_out}");
    let max: u64 = counts[1].parse().unwrap_or(0);
    assert!(
        max >= *acked_at && max > 0,
        "{journal_mode}: snapshot {middle} taken after commit {acked_at} restores up to {max}"
    );
}

#[test]
fn a_sqlite_database_under_load_restores_consistent_rollback_journal() {
    sqlite_restores_consistent("DELETE");
}

#[test]
fn a_sqlite_database_under_load_restores_consistent_wal() {
    sqlite_restores_consistent("WAL");
}

#[test]
fn a_restore_reads_on_while_a_delete_rewrites_the_snapshot() {
    if !root() {
        return;
    }
    let m = Mount::with_setup(|_| {}, Some(SMALL_GEOMETRY));
    let mut noise = Noise::named("restore during delete");
    let dir = m.path().join("many");
    fs::create_dir_all(&dir).unwrap();
    for round in 0..3 {
        for i in 0..120 {
            let p = dir.join(format!("f{i:03}"));
            if round == 0 || i % 3 == round {
                use std::os::unix::fs::FileExt;
                let f = open_rw(&p);
                f.write_all_at(&noise.bytes(4096), if round == 0 { 0 } else { 4096 })
                    .unwrap();
                if round == 0 {
                    f.write_all_at(&noise.bytes(8192), 8192).unwrap();
                }
            }
        }
        snapshot(&m, &format!("r{round}"));
    }
    // Restore r2 while r1 (its parent) is deleted: r2 is rewritten onto r0 meanwhile.
    let out = m.scratch().join("r2");
    let mut restore_child = Command::new(common::grainfs_bin())
        .args(["restore", "r2", "--json", "--to"])
        .arg(&out)
        .arg("-m")
        .arg(m.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = grainfs(&[&"snapshot", &"delete", &"r1", &"-m", &m.path()]);
    assert_ok(&o, "delete r1");
    let status = restore_child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(restore_child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "restore during a delete: {err}");
    assert_eq!(
        contents(&tree(&out)),
        contents(&tree(&m.path().join(".snapshots/r2")))
    );
}

/// A restore killed part way (SIGKILL: no handler runs) leaves no file in DIR: a file gets a
/// name only once its data, attributes and fsync are done.
#[test]
fn a_restore_killed_part_way_leaves_no_partial_file() {
    let m = Mount::new();
    let chunk = Noise::named("killed restore").bytes(1 << 20);
    {
        let f = std::fs::File::create(m.path().join("big.img")).unwrap();
        for i in 0..512u64 {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20).unwrap();
        }
    }
    snapshot(&m, "big");
    let mut killed = false;
    for attempt in 0..4 {
        let out = m.scratch().join(format!("out{attempt}"));
        let mut child = Command::new(common::grainfs_bin())
            .args(["restore", "big", "--to"])
            .arg(&out)
            .arg("-m")
            .arg(m.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 100 * attempt));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        let left: Vec<String> = std::fs::read_dir(&out)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if status.success() {
            assert_eq!(left, vec!["big.img".to_string()]);
            continue;
        }
        assert!(left.is_empty(), "a killed restore left {left:?}");
        killed = true;
        break;
    }
    assert!(killed, "no restore was killed part way");
}
