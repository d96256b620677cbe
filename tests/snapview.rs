//! The read-only `.snapshots` view through a real mount: what a snapshot holds reads back byte
//! for byte with its recorded metadata (full, incremental and deep chains, holes, a partial
//! last block, nested directories, symlinks), the view refuses every change with EROFS, is
//! hidden from the root listing unless `snapdir = "visible"`, follows snapshots committed or
//! deleted while mounted, and numbers its inodes uniquely and stably.
//!
//! Snapshots are built with the store API straight into the mount's store, except in the last
//! test, which takes one with `grainfs snapshot create` as a user would.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::posix::{cpath, cvt};
use common::{Mount, Noise};
use grainfs::ids::{BlockIdx, Geometry, SnapshotName, VolumeId};
use grainfs::store::{EntryKind, NamespaceEntry, PartitionKind, Store, VolumeMeta};

fn sn(name: &str) -> SnapshotName {
    SnapshotName::parse(name).unwrap()
}

const BS: u64 = 4096;
/// Four blocks per partition, so a volume of a few blocks has several partitions.
const GEOMETRY: Geometry = Geometry {
    block_size: BS,
    partition_size: 4 * BS,
};
/// The snapshot view's inode range (the top two bits set).
const SNAPVIEW: u64 = 0xC000_0000_0000_0000;
const EROFS: i32 = libc::EROFS;

/// A volume as a snapshot records it.
#[derive(Clone, Debug)]
struct Vol {
    path: &'static str,
    id: u64,
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
}

fn vol(path: &'static str, id: u64, content: Vec<u8>) -> Vol {
    Vol {
        path,
        id,
        content,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_600_000_000_123_456_789,
    }
}

/// Data block, hole block, data block, then a partial last block (3.5 blocks).
fn holey(seed: &str) -> Vec<u8> {
    let mut c = Noise::named(seed).bytes((3 * BS + BS / 2) as usize);
    c[BS as usize..2 * BS as usize].fill(0);
    c
}

fn dir(path: &str, mode: u32, uid: u32, gid: u32, mtime_ns: i128) -> NamespaceEntry {
    NamespaceEntry {
        path: path.into(),
        kind: EntryKind::Dir,
        mode,
        uid,
        gid,
        mtime_ns,
        target: None,
    }
}

fn symlink(path: &str, target: &str) -> NamespaceEntry {
    NamespaceEntry {
        path: path.into(),
        kind: EntryKind::Symlink,
        mode: 0o120777,
        uid: 0,
        gid: 0,
        mtime_ns: 1_500_000_000_000_000_000,
        target: Some(target.into()),
    }
}

/// Commit snapshot `name` of `vols` into the store at `store`. With a parent, a volume the
/// parent has is stored INCREMENTAL: only its blocks that differ from the parent's.
fn commit(
    store: &Path,
    name: &str,
    parent: Option<(&str, &[Vol])>,
    vols: &[Vol],
    namespace: &[NamespaceEntry],
) {
    let st = Store::open(store).expect("open store");
    let w = st
        .begin(&sn(name), "all", GEOMETRY, parent.map(|p| sn(p.0)).as_ref())
        .expect("begin");
    for v in vols {
        let size = v.content.len() as u64;
        let h = w
            .add_volume(VolumeMeta {
                id: VolumeId { dev: 1, ino: v.id },
                path: v.path.into(),
                size,
                mode: v.mode,
                uid: v.uid,
                gid: v.gid,
                mtime_ns: v.mtime_ns,
            })
            .expect("add_volume");
        let old = parent.and_then(|(_, pv)| pv.iter().find(|p| p.id == v.id));
        let kind = match old {
            Some(o) => {
                assert_eq!(o.content.len(), v.content.len(), "same size in a chain");
                PartitionKind::Incremental
            }
            None => PartitionKind::Full,
        };
        for p in 0..GEOMETRY.partitions(size) {
            w.set_partition(h, p, kind, "test").expect("set_partition");
        }
        for b in 0..GEOMETRY.blocks(size) {
            let r = (b * BS) as usize..((b + 1) * BS).min(size) as usize;
            if old.is_some_and(|o| o.content[r.clone()] == v.content[r.clone()]) {
                continue;
            }
            w.put_block(h, BlockIdx(b), &v.content[r])
                .expect("put_block");
        }
    }
    for e in namespace {
        w.add_namespace_entry(e.clone());
    }
    w.commit().expect("commit");
}

fn errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The first snapshot of most tests: two volumes, recorded directories with their own modes
/// and owners, a deep path whose parents the manifest does not record, and a symlink.
fn first_snapshot() -> (Vec<Vol>, Vec<NamespaceEntry>) {
    let a = Vol {
        mode: 0o100640,
        uid: 1234,
        gid: 5678,
        mtime_ns: 1_650_000_000_987_654_321,
        ..vol("vms/a.img", 10, holey("a"))
    };
    let b = Vol {
        mode: 0o600,
        ..vol(
            "deep/er/b.raw",
            11,
            Noise::named("b").bytes((2 * BS) as usize),
        )
    };
    let empty = vol("empty", 12, Vec::new());
    let ns = vec![
        dir("", 0o40750, 0, 0, 1_400_000_000_000_000_000),
        dir("vms", 0o40700, 42, 43, 1_450_000_000_000_000_001),
        symlink("vms/current", "a.img"),
    ];
    (vec![a, b, empty], ns)
}

#[test]
fn a_snapshot_reads_back_with_its_content_and_metadata() {
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            let (vols, ns) = first_snapshot();
            commit(&store, "s1", None, &vols, &ns);
        },
        None,
    );
    let (vols, _) = first_snapshot();
    let s1 = m.path().join(".snapshots/s1");
    for v in &vols {
        let p = s1.join(v.path);
        assert_eq!(fs::read(&p).expect("read"), v.content, "content of {p:?}");
        let md = fs::symlink_metadata(&p).expect("stat");
        assert!(md.is_file(), "{p:?} is a file");
        assert_eq!(md.len(), v.content.len() as u64, "size of {p:?}");
        assert_eq!(
            md.mode(),
            libc::S_IFREG | (v.mode & 0o7777),
            "mode of {p:?}"
        );
        assert_eq!((md.uid(), md.gid()), (v.uid, v.gid), "owner of {p:?}");
        let mtime = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
        assert_eq!(mtime, v.mtime_ns, "mtime of {p:?}");
        assert_eq!(md.nlink(), 1);
        assert_eq!(md.blocks(), v.content.len().div_ceil(512) as u64);
    }
    // Reads at odd offsets and lengths, across the hole and into the partial last block.
    let a = &vols[0].content;
    let f = File::open(s1.join("vms/a.img")).expect("open");
    for (off, len) in [
        (0, 1),
        (BS - 7, 20),
        (BS + 5, BS),
        (3 * BS - 1, BS),
        (0, 4 * BS),
    ] {
        let mut buf = vec![0xAAu8; len as usize];
        let n = f.read_at(&mut buf, off).expect("read_at");
        let end = (off + len).min(a.len() as u64) as usize;
        assert_eq!(&buf[..n], &a[off as usize..end], "read at {off} for {len}");
    }
    // SEEK_HOLE and SEEK_DATA see the hole the snapshot does not store.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    assert_eq!(unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) }, BS as i64);
    assert_eq!(
        unsafe { libc::lseek(fd, BS as i64, libc::SEEK_DATA) },
        2 * BS as i64
    );
    // Recorded directories keep their mode, owner and mtime; unrecorded parents are 0755.
    let root = fs::metadata(&s1).expect("stat s1");
    assert_eq!(root.mode() & 0o7777, 0o750);
    assert_eq!(root.mtime(), 1_400_000_000);
    let vms = fs::metadata(s1.join("vms")).expect("stat vms");
    assert_eq!((vms.mode() & 0o7777, vms.uid(), vms.gid()), (0o700, 42, 43));
    assert_eq!((vms.mtime(), vms.mtime_nsec()), (1_450_000_000, 1));
    for d in ["deep", "deep/er"] {
        let md = fs::metadata(s1.join(d)).expect("stat synthesized dir");
        assert!(md.is_dir());
        assert_eq!(md.mode() & 0o7777, 0o755, "{d}");
    }
    // Listings and the symlink.
    assert_eq!(names(&s1), ["deep", "empty", "vms"]);
    assert_eq!(names(&s1.join("vms")), ["a.img", "current"]);
    assert_eq!(
        fs::read_link(s1.join("vms/current")).expect("readlink"),
        Path::new("a.img")
    );
    assert_eq!(
        fs::read(s1.join("vms/current")).expect("through the link"),
        *a
    );
    // A copy out of the snapshot (what a restore does) is the same bytes.
    let copy = m.scratch().join("a.copy");
    fs::copy(s1.join("vms/a.img"), &copy).expect("cp out");
    assert_eq!(fs::read(&copy).expect("read copy"), *a);
    drop(f);
    m.unmount();
}

#[test]
fn an_incremental_chain_reads_its_parents_blocks_at_every_depth() {
    // Depth 1 is FULL; each child changes one block (in turn across partitions).
    let mut chain: Vec<Vec<Vol>> = vec![vec![vol("v.img", 1, holey("gen0"))]];
    for g in 1..8usize {
        let mut c = chain[g - 1][0].content.clone();
        let b = (g * 3) % 4;
        let r = b * BS as usize..((b + 1) * BS as usize).min(c.len());
        let fresh = Noise::named(format!("gen{g}")).bytes(r.len());
        c[r].copy_from_slice(&fresh);
        chain.push(vec![Vol {
            content: c,
            ..chain[0][0].clone()
        }]);
    }
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            for (g, vols) in chain.iter().enumerate() {
                let parent_name = g.checked_sub(1).map(|p| format!("g{p}"));
                let parent = parent_name.as_deref().map(|n| (n, chain[g - 1].as_slice()));
                commit(&store, &format!("g{g}"), parent, vols, &[]);
            }
        },
        None,
    );
    for (g, vols) in chain.iter().enumerate() {
        let p = m.path().join(format!(".snapshots/g{g}/v.img"));
        assert_eq!(
            blake3::hash(&fs::read(&p).expect("read")),
            blake3::hash(&vols[0].content),
            "g{g} (chain depth {})",
            g + 1
        );
    }
    m.unmount();
}

#[test]
fn snapshots_is_hidden_from_the_root_listing_but_reachable() {
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            fs::write(backing.join("live.txt"), b"live").expect("write");
            let (vols, ns) = first_snapshot();
            commit(&store, "s1", None, &vols, &ns);
        },
        None,
    );
    assert_eq!(names(m.path()), ["live.txt"]);
    assert_eq!(names(&m.path().join(".snapshots")), ["s1"]);
    let md = fs::metadata(m.path().join(".snapshots")).expect("stat .snapshots");
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o555);
    assert_eq!(md.uid(), unsafe { libc::geteuid() });
    assert_eq!(md.ino(), SNAPVIEW);
    m.unmount();
}

#[test]
fn snapdir_visible_lists_snapshots_in_the_root() {
    let m = Mount::with_setup(
        |backing| fs::write(backing.join("live.txt"), b"live").expect("write"),
        Some("snapdir = \"visible\"\n"),
    );
    assert_eq!(names(m.path()), [".snapshots", "live.txt"]);
    let e = fs::read_dir(m.path())
        .expect("read_dir")
        .map(|e| e.expect("entry"))
        .find(|e| e.file_name() == ".snapshots")
        .expect(".snapshots listed");
    assert_eq!(e.ino(), SNAPVIEW, "d_ino is st_ino");
    assert!(e.file_type().expect("type").is_dir());
    // A DirEntry keeps its directory open, which would keep the mount busy.
    drop(e);
    assert!(names(&m.path().join(".snapshots")).is_empty());
    m.unmount();
}

/// A real `.snapshots` in the backing root is shadowed: neither listed nor reachable, and
/// left alone by attempts to remove or rename the name.
#[test]
fn the_view_shadows_a_backing_entry_named_snapshots() {
    let m = Mount::with_setup(
        |backing| {
            fs::create_dir(backing.join(".snapshots")).expect("mkdir");
            fs::write(backing.join(".snapshots/real.txt"), b"real").expect("write");
        },
        Some("snapdir = \"visible\"\n"),
    );
    assert_eq!(names(m.path()), [".snapshots"]);
    let view = m.path().join(".snapshots");
    assert!(names(&view).is_empty());
    assert_eq!(
        errno("stat real.txt", fs::metadata(view.join("real.txt"))),
        libc::ENOENT
    );
    assert_eq!(errno("rmdir", fs::remove_dir(&view)), EROFS);
    assert_eq!(
        errno("rename away", fs::rename(&view, m.path().join("x"))),
        EROFS
    );
    fs::create_dir(m.path().join("d")).expect("mkdir d");
    assert_eq!(
        errno("rename onto", fs::rename(m.path().join("d"), &view)),
        EROFS
    );
    assert_eq!(
        errno("mkdir", fs::create_dir(&view)),
        libc::EEXIST,
        "the name exists"
    );
    assert_eq!(
        fs::read(m.backing().join(".snapshots/real.txt")).expect("untouched"),
        b"real"
    );
    m.unmount();
}

#[test]
fn every_change_inside_the_view_is_erofs() {
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            let (vols, ns) = first_snapshot();
            commit(&store, "s1", None, &vols, &ns);
            fs::write(backing.join("live.txt"), b"live").expect("write");
        },
        None,
    );
    let snaps = m.path().join(".snapshots");
    let s1 = snaps.join("s1");
    let file = s1.join("vms/a.img");
    let live = m.path().join("live.txt");
    let before = fs::read(&file).expect("read");
    let checks: Vec<(&str, io::Result<()>)> = vec![
        (
            "open O_WRONLY",
            OpenOptions::new().write(true).open(&file).map(drop),
        ),
        ("write (O_TRUNC)", fs::write(&file, b"x")),
        (
            "open O_RDONLY|O_TRUNC",
            cvt(unsafe { libc::open(cpath(&file).as_ptr(), libc::O_RDONLY | libc::O_TRUNC) }).map(
                |fd| unsafe {
                    libc::close(fd);
                },
            ),
        ),
        ("create", File::create(s1.join("vms/new")).map(drop)),
        ("mkdir", fs::create_dir(s1.join("newdir"))),
        ("mknod fifo", {
            cvt(unsafe { libc::mkfifo(cpath(&s1.join("fifo")).as_ptr(), 0o644) }).map(drop)
        }),
        (
            "symlink",
            std::os::unix::fs::symlink("x", s1.join("newlink")),
        ),
        ("unlink", fs::remove_file(&file)),
        ("unlink symlink", fs::remove_file(s1.join("vms/current"))),
        ("rmdir", fs::remove_dir(s1.join("deep/er"))),
        ("rename inside", fs::rename(&file, s1.join("vms/b.img"))),
        ("rename out", fs::rename(&file, m.path().join("out.img"))),
        ("rename in", fs::rename(&live, s1.join("live.txt"))),
        ("link out", fs::hard_link(&file, m.path().join("hl"))),
        ("link in", fs::hard_link(&live, s1.join("hl"))),
        (
            "chmod",
            fs::set_permissions(&file, fs::Permissions::from_mode(0o777)),
        ),
        ("chown", std::os::unix::fs::chown(&file, Some(1), Some(1))),
        (
            "truncate",
            cvt(unsafe { libc::truncate(cpath(&file).as_ptr(), 0) }).map(drop),
        ),
        (
            "utimes",
            cvt(unsafe { libc::utimes(cpath(&file).as_ptr(), std::ptr::null()) }).map(drop),
        ),
        (
            "setxattr",
            cvt(unsafe {
                libc::setxattr(
                    cpath(&file).as_ptr(),
                    c"user.x".as_ptr(),
                    b"1".as_ptr().cast(),
                    1,
                    0,
                )
            })
            .map(drop),
        ),
        (
            "removexattr",
            cvt(unsafe { libc::removexattr(cpath(&file).as_ptr(), c"user.x".as_ptr()) }).map(drop),
        ),
        ("mkdir in .snapshots", fs::create_dir(snaps.join("s2"))),
        ("rmdir a snapshot", fs::remove_dir(&s1)),
        (
            "rename a snapshot",
            fs::rename(&s1, snaps.join("s1-renamed")),
        ),
        ("chmod .snapshots", {
            fs::set_permissions(&snaps, fs::Permissions::from_mode(0o777))
        }),
    ];
    for (what, r) in checks {
        assert_eq!(errno(what, r), EROFS, "{what}");
    }
    assert_eq!(fs::read(&file).expect("read"), before, "content unchanged");
    assert_eq!(
        fs::metadata(&file).expect("stat").mode() & 0o7777,
        0o640,
        "mode unchanged"
    );
    assert_eq!(names(&snaps), ["s1"]);
    // Reading xattrs works and finds none.
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::getxattr(
            cpath(&file).as_ptr(),
            c"user.x".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(
        unsafe { libc::listxattr(cpath(&file).as_ptr(), std::ptr::null_mut(), 0) },
        0
    );
    m.unmount();
}

#[test]
fn snapshots_committed_or_deleted_while_mounted_show_at_once() {
    let m = Mount::new();
    let store = m.store();
    let snaps = m.path().join(".snapshots");
    assert!(names(&snaps).is_empty());
    assert_eq!(
        errno("stat s1 before", fs::metadata(snaps.join("s1"))),
        libc::ENOENT
    );
    let (vols, ns) = first_snapshot();
    commit(&store, "s1", None, &vols, &ns);
    // No waiting for a cache to expire: the negative lookup above is not kept.
    assert_eq!(
        fs::read(snaps.join("s1/vms/a.img")).expect("read new"),
        vols[0].content
    );
    let v2 = vec![vol("only.img", 20, Noise::named("two").bytes(5000))];
    commit(&store, "s2", None, &v2, &[]);
    assert_eq!(names(&snaps), ["s1", "s2"]);

    // A file open when its snapshot is deleted keeps reading.
    let open = File::open(snaps.join("s2/only.img")).expect("open");
    let ino_before = fs::metadata(snaps.join("s2/only.img")).expect("stat").ino();
    Store::open(&store)
        .expect("store")
        .delete(&sn("s2"))
        .expect("delete");
    assert_eq!(names(&snaps), ["s1"]);
    assert_eq!(
        errno("stat deleted", fs::metadata(snaps.join("s2"))),
        libc::ENOENT
    );
    assert_eq!(
        errno("read deleted", fs::read(snaps.join("s2/only.img"))),
        libc::ENOENT
    );
    let mut buf = vec![0u8; 5000];
    assert_eq!(open.read_at(&mut buf, 0).expect("read open handle"), 5000);
    assert_eq!(buf, v2[0].content);
    drop(open);

    // The name taken again by another snapshot: its content, under new inode numbers.
    let v3 = vec![vol("only.img", 20, Noise::named("three").bytes(5000))];
    commit(&store, "s2", None, &v3, &[]);
    let p = snaps.join("s2/only.img");
    assert_eq!(fs::read(&p).expect("read reused"), v3[0].content);
    assert_ne!(fs::metadata(&p).expect("stat").ino(), ino_before);
    m.unmount();
}

/// Walk `dir`, mapping each path below it to (st_ino, d_ino from its listing).
fn inode_numbers(dir: &Path, prefix: &str, out: &mut BTreeMap<String, (u64, u64)>) {
    for e in fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let md = fs::symlink_metadata(e.path()).expect("lstat");
        out.insert(name.clone(), (md.ino(), e.ino()));
        if md.is_dir() {
            inode_numbers(&e.path(), &format!("{name}/"), out);
        }
    }
}

#[test]
fn view_inode_numbers_are_unique_stable_and_in_their_own_range() {
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            let (vols, ns) = first_snapshot();
            commit(&store, "s1", None, &vols, &ns);
            commit(&store, "s2", None, &vols, &ns);
            fs::write(backing.join("live.txt"), b"live").expect("write");
        },
        None,
    );
    let snaps = m.path().join(".snapshots");
    let mut first = BTreeMap::new();
    inode_numbers(&snaps, "", &mut first);
    assert_eq!(first.len(), 2 * 8, "{first:?}");
    let mut seen = HashSet::new();
    for (path, (st_ino, d_ino)) in &first {
        assert!(*st_ino > SNAPVIEW, "{path}: {st_ino:#x}");
        assert_eq!(st_ino, d_ino, "{path}: readdir and stat agree");
        assert!(seen.insert(*st_ino), "{path}: {st_ino:#x} used twice");
    }
    let live = fs::metadata(m.path().join("live.txt")).expect("stat").ino();
    assert!(live < SNAPVIEW);
    let mut second = BTreeMap::new();
    inode_numbers(&snaps, "", &mut second);
    assert_eq!(first, second, "numbers stable across walks");
    m.unmount();
}

/// The whole path a user takes: files written through the mount, `grainfs snapshot create`,
/// more writes, and the snapshot still shows the tree as it was.
#[test]
fn a_snapshot_taken_by_the_daemon_shows_the_tree_as_it_was() {
    let m = Mount::new();
    let mnt = m.path();
    fs::create_dir_all(mnt.join("vms/old")).expect("mkdir");
    fs::set_permissions(mnt.join("vms"), fs::Permissions::from_mode(0o711)).expect("chmod");
    let disk = holey("disk");
    fs::write(mnt.join("vms/disk.img"), &disk).expect("write");
    fs::set_permissions(mnt.join("vms/disk.img"), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::os::unix::fs::symlink("disk.img", mnt.join("vms/latest")).expect("symlink");
    let want = fs::metadata(mnt.join("vms/disk.img")).expect("stat");

    let out = Command::new(common::grainfs_bin())
        .args(["snapshot", "create", "--name", "before", "-m"])
        .arg(mnt)
        .output()
        .expect("run grainfs snapshot create");
    assert!(
        out.status.success(),
        "snapshot create: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    fs::write(mnt.join("vms/disk.img"), b"overwritten").expect("overwrite");
    fs::remove_file(mnt.join("vms/latest")).expect("unlink");

    let s = mnt.join(".snapshots/before");
    assert_eq!(fs::read(s.join("vms/disk.img")).expect("read"), disk);
    let got = fs::metadata(s.join("vms/disk.img")).expect("stat");
    assert_eq!(got.len(), want.len());
    assert_eq!(got.mode(), want.mode());
    assert_eq!((got.uid(), got.gid()), (want.uid(), want.gid()));
    assert_eq!(
        (got.mtime(), got.mtime_nsec()),
        (want.mtime(), want.mtime_nsec())
    );
    assert_eq!(
        fs::metadata(s.join("vms")).expect("stat dir").mode() & 0o7777,
        0o711
    );
    assert!(fs::metadata(s.join("vms/old")).expect("stat").is_dir());
    assert_eq!(
        fs::read_link(s.join("vms/latest")).expect("readlink"),
        Path::new("disk.img")
    );
    m.unmount();
}

/// A stored block whose bytes no longer match their blake3 (one byte flipped in its pack)
/// reads as EIO through `.snapshots`, never as wrong bytes; the blocks before and after it
/// read as stored, the daemon logs snapshot, volume and block, and `snapshot verify` names it.
#[test]
fn a_damaged_block_reads_as_eio_and_is_named_in_the_log() {
    let content = Noise::named("damaged").bytes((12 * BS) as usize);
    let bad = 5u64;
    let m = Mount::with_setup(
        |backing| {
            let store = backing.join(".grainfs");
            commit(
                &store,
                "s1",
                None,
                &[vol("vms/a.img", 10, content.clone())],
                &[],
            );
            let st = Store::open(&store).expect("open store");
            let man = st.manifest(&sn("s1")).expect("manifest");
            let dir = st.snapshots_dir().join("s1");
            let v = man.volume(VolumeId { dev: 1, ino: 10 }).expect("volume");
            let table = grainfs::store::format::load_table(&dir, v.table.as_ref().expect("table"))
                .expect("table");
            let rec = table.iter().find(|r| r.block == bad).expect("record");
            let pack = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(&man.packs[rec.pack as usize].file))
                .expect("open pack");
            let mut byte = [0u8];
            pack.read_exact_at(&mut byte, rec.offset + 100)
                .expect("read");
            pack.write_all_at(&[byte[0] ^ 0x10], rec.offset + 100)
                .expect("flip");
        },
        None,
    );
    let path = m.path().join(".snapshots/s1/vms/a.img");
    let f = File::open(&path).expect("open");
    let upto = (bad * BS) as usize;
    let mut before = vec![0u8; upto];
    f.read_exact_at(&mut before, 0)
        .expect("the blocks before the damaged one");
    assert!(before == content[..upto], "bytes before the damaged block");
    let mut after = vec![0u8; content.len() - upto - BS as usize];
    f.read_exact_at(&mut after, (bad + 1) * BS)
        .expect("the blocks after the damaged one");
    assert!(after == content[upto + BS as usize..], "bytes after it");
    let mut one = [0u8; 1];
    assert_eq!(
        errno(
            "pread in the damaged block",
            f.read_at(&mut one, bad * BS + 7)
        ),
        libc::EIO
    );
    drop(f);

    // As `cat` reads it: whatever arrives before the error is the volume's own bytes, and
    // the error is EIO, no later than the damaged block.
    let mut f = File::open(&path).expect("open");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 128 << 10];
    let err = loop {
        match io::Read::read(&mut f, &mut buf) {
            Ok(0) => panic!("read to the end ({} bytes) without an error", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        got.len() <= upto,
        "{} bytes read past the damage",
        got.len()
    );
    assert!(got == content[..got.len()], "bytes before the error");
    drop(f);
    let out = Command::new("cat").arg(&path).output().expect("run cat");
    assert!(!out.status.success(), "cat must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "cat: {stderr}");

    let log = m.log_text();
    assert!(
        log.lines().any(|l| l.contains("snapshot \"s1\"")
            && l.contains("vms/a.img")
            && l.contains(&format!("block {bad} "))),
        "no log line names snapshot, volume and block:\n{log}"
    );

    let out = Command::new(common::grainfs_bin())
        .args(["snapshot", "verify", "--json", "s1", "-m"])
        .arg(m.path())
        .output()
        .expect("run grainfs snapshot verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verify: {text}");
    let report: serde_json::Value = serde_json::from_str(&text).expect("verify --json");
    let problems = &report[0]["problems"];
    assert_eq!(problems[0]["volume"], "vms/a.img", "{text}");
    assert_eq!(problems[0]["block"], bad, "{text}");
    m.unmount();
}
