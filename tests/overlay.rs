//! OverlayFs driven directly on a temp dir, without a mount: lookup counting, hard links, file
//! round trips, directory listings, the hidden store, name checks, setattr, unlinked files,
//! rename flags, stale handles, sparse files, and the read-only snapshot view.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Overlay, ROOT, STORE};
use grainfs::fs::inode::{ROOT_INO, SNAPVIEW};
use grainfs::fs::snapview::SNAPDIR_INO;
use grainfs::fs::{
    Attr, Caller, Changed, DirEntry, Entry, FileKind, FsError, OverlayFs, SetAttr, SetTime,
    Validity, WriteBy, Xattr,
};
use grainfs::ids::{BlockIdx, Geometry, SnapshotName, VolumeId};
use grainfs::store::{EntryKind, NamespaceEntry, PartitionKind, Store, VolumeMeta};

fn sn(name: &str) -> SnapshotName {
    SnapshotName::parse(name).unwrap()
}

/// The overlay without a tracker, on a backing dir whose store already holds a file (`secret`)
/// that must stay out of sight.
type Fixture = Overlay;

fn fixture_with(setup: impl FnOnce(&Path)) -> Fixture {
    Overlay::untracked(|backing| {
        std::fs::create_dir(backing.join(STORE)).unwrap();
        std::fs::write(backing.join(STORE).join("secret"), b"store data").unwrap();
        setup(backing);
    })
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.errno(),
    }
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

/// Assert that `attr` shows what lstat(2) shows of `path`.
fn assert_attr_is_lstat(attr: &Attr, path: &Path) {
    let m = std::fs::symlink_metadata(path).unwrap();
    assert_eq!(attr.size, m.size(), "size of {path:?}");
    assert_eq!(attr.blocks, m.blocks(), "blocks of {path:?}");
    assert_eq!(u32::from(attr.perm), m.mode() & 0o7777, "perm of {path:?}");
    assert_eq!(attr.nlink as u64, m.nlink(), "nlink of {path:?}");
    assert_eq!(attr.uid, m.uid(), "uid of {path:?}");
    assert_eq!(attr.gid, m.gid(), "gid of {path:?}");
    assert_eq!(attr.rdev as u64, m.rdev(), "rdev of {path:?}");
    assert_eq!(attr.blksize as u64, m.blksize(), "blksize of {path:?}");
    assert_eq!(
        attr.mtime,
        ts(m.mtime(), m.mtime_nsec()),
        "mtime of {path:?}"
    );
    assert_eq!(
        attr.ctime,
        ts(m.ctime(), m.ctime_nsec()),
        "ctime of {path:?}"
    );
    assert_eq!(
        attr.atime,
        ts(m.atime(), m.atime_nsec()),
        "atime of {path:?}"
    );
    let kind = if m.file_type().is_dir() {
        FileKind::Directory
    } else if m.file_type().is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Regular
    };
    assert_eq!(attr.kind, kind, "kind of {path:?}");
}

fn lookup(f: &Fixture, parent: u64, name: &str) -> Entry {
    f.fs.lookup(parent, OsStr::new(name))
        .unwrap_or_else(|e| panic!("lookup {name}: {e}"))
}

fn read_all(f: &Fixture, fh: u64, offset: u64, size: u32) -> Vec<u8> {
    f.fs.read(fh, offset, size, |b| b.to_vec()).unwrap()
}

/// Every entry of a directory, in one pass from offset 0.
fn list(f: &Fixture, ino: u64) -> Vec<DirEntry> {
    let dh = f.fs.opendir(ino).unwrap();
    let mut out = Vec::new();
    f.fs.readdir(ino, dh.fh, 0, |e| {
        out.push(e);
        false
    })
    .unwrap();
    f.fs.releasedir(dh.fh).unwrap();
    out
}

#[test]
fn lookup_attrs_match_lstat_and_count_references() {
    let f = fixture_with(|b| {
        std::fs::write(b.join("a.img"), vec![7u8; 10_000]).unwrap();
        std::fs::create_dir(b.join("dir")).unwrap();
        std::os::unix::fs::symlink("a.img", b.join("link")).unwrap();
    });
    assert_eq!(f.fs.inode_count(), 1, "only the root before any lookup");
    for name in ["a.img", "dir", "link"] {
        let e = lookup(&f, ROOT_INO, name);
        assert_attr_is_lstat(&e.attr, &f.backing.join(name));
        assert_eq!(f.fs.lookup_count(e.attr.ino), 1, "{name}");
        assert_ne!(e.attr.ino, ROOT_INO);
    }
    assert_eq!(f.fs.inode_count(), 4);

    let a = lookup(&f, ROOT_INO, "a.img").attr.ino;
    let a2 = lookup(&f, ROOT_INO, "a.img").attr.ino;
    assert_eq!(a, a2, "the same file looked up twice is one inode");
    assert_eq!(f.fs.lookup_count(a), 3);
    assert_eq!(f.fs.inode_count(), 4);

    // getattr agrees with lookup and with lstat.
    assert_attr_is_lstat(&f.fs.getattr(a, None).unwrap(), &f.backing.join("a.img"));

    f.fs.forget(a, 2);
    assert_eq!(f.fs.lookup_count(a), 1);
    assert_eq!(f.fs.inode_count(), 4, "still one reference held");
    f.fs.forget(a, 1);
    assert_eq!(f.fs.lookup_count(a), 0);
    assert_eq!(
        f.fs.inode_count(),
        3,
        "the inode goes with its last reference"
    );
    assert_eq!(errno(f.fs.getattr(a, None)), libc::ESTALE);

    // The root is never forgotten.
    f.fs.forget(ROOT_INO, 1_000_000);
    assert!(f.fs.getattr(ROOT_INO, None).is_ok());
    assert_attr_is_lstat(&f.fs.getattr(ROOT_INO, None).unwrap(), &f.backing);
}

#[test]
fn lookup_of_missing_name_is_enoent_and_takes_no_reference() {
    let f = fixture();
    assert_eq!(
        errno(f.fs.lookup(ROOT_INO, OsStr::new("nope"))),
        libc::ENOENT
    );
    assert_eq!(f.fs.inode_count(), 1);
}

#[test]
fn hard_links_share_one_inode() {
    let f = fixture_with(|b| {
        std::fs::write(b.join("one"), b"linked").unwrap();
        std::fs::create_dir(b.join("sub")).unwrap();
        std::fs::hard_link(b.join("one"), b.join("sub").join("two")).unwrap();
    });
    let one = lookup(&f, ROOT_INO, "one");
    let sub = lookup(&f, ROOT_INO, "sub");
    let two = lookup(&f, sub.attr.ino, "two");
    assert_eq!(one.attr.ino, two.attr.ino, "two names of one hard link");
    assert_eq!(one.attr.nlink, 2);
    assert_eq!(f.fs.lookup_count(one.attr.ino), 2);

    // A link made through the overlay joins the same inode, and every name sees the new nlink.
    let three =
        f.fs.link(one.attr.ino, ROOT_INO, OsStr::new("three"))
            .unwrap();
    assert_eq!(three.attr.ino, one.attr.ino);
    assert_eq!(three.attr.nlink, 3);
    assert_eq!(f.fs.getattr(two.attr.ino, None).unwrap().nlink, 3);
    assert_eq!(std::fs::read(f.backing.join("three")).unwrap(), b"linked");
    assert_eq!(f.fs.lookup_count(one.attr.ino), 3);
}

#[test]
fn create_write_read_release_round_trip() {
    let f = fixture();
    let (entry, opened) =
        f.fs.create(
            ROOT,
            ROOT_INO,
            OsStr::new("vol.img"),
            0o666,
            0o022,
            libc::O_RDWR,
        )
        .unwrap();
    let ino = entry.attr.ino;
    assert_eq!(entry.attr.kind, FileKind::Regular);
    assert_eq!(entry.attr.perm, 0o644, "mode with the umask applied");
    assert_eq!(f.fs.lookup_count(ino), 1, "create takes one reference");
    assert_eq!(f.fs.handle_ino(opened.fh).unwrap(), ino);

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(f.fs.write(opened.fh, 0, &data).unwrap(), data.len() as u32);
    assert_eq!(f.fs.write(opened.fh, 300_000, b"tail").unwrap(), 4);
    f.fs.flush(opened.fh).unwrap();
    f.fs.fsync(opened.fh, false).unwrap();
    assert_eq!(read_all(&f, opened.fh, 0, 200_000), data);
    assert_eq!(read_all(&f, opened.fh, 100, 10), &data[100..110]);
    // A read past the end of file is short, a read in the gap sees zeros.
    assert_eq!(read_all(&f, opened.fh, 300_000, 4096), b"tail");
    assert_eq!(read_all(&f, opened.fh, 250_000, 8), vec![0u8; 8]);
    assert!(read_all(&f, opened.fh, 400_000, 10).is_empty());
    f.fs.release(opened.fh).unwrap();
    assert_eq!(errno(f.fs.release(opened.fh)), libc::EBADF);
    assert_eq!(errno(f.fs.read(opened.fh, 0, 1, |_| ())), libc::EBADF);

    let backing = std::fs::read(f.backing.join("vol.img")).unwrap();
    assert_eq!(backing.len(), 300_004);
    assert_eq!(&backing[..200_000], &data[..]);
    assert_attr_is_lstat(
        &f.fs.getattr(ino, None).unwrap(),
        &f.backing.join("vol.img"),
    );

    let ro = f.fs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f, ro.fh, 0, 200_000), data);
    assert_eq!(
        errno(f.fs.write(ro.fh, 0, b"x")),
        libc::EBADF,
        "a read-only handle must not write"
    );
    f.fs.release(ro.fh).unwrap();

    // O_EXCL create of an existing name fails and takes no reference.
    assert_eq!(
        errno(f.fs.create(
            ROOT,
            ROOT_INO,
            OsStr::new("vol.img"),
            0o644,
            0,
            libc::O_RDWR | libc::O_EXCL
        )),
        libc::EEXIST
    );
    assert_eq!(f.fs.lookup_count(ino), 1);
}

#[test]
fn readdir_lists_dot_entries_and_hides_the_store() {
    let f = fixture_with(|b| {
        std::fs::write(b.join("a"), b"").unwrap();
        std::fs::write(b.join("b"), b"").unwrap();
        std::fs::create_dir(b.join("d")).unwrap();
        std::fs::write(b.join("d").join(STORE), b"not the store").unwrap();
    });
    let entries = list(&f, ROOT_INO);
    let mut names: Vec<_> = entries
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".", "..", "a", "b", "d"]);
    let d = entries.iter().find(|e| e.name == "d").unwrap();
    assert_eq!(d.kind, FileKind::Directory);
    // Offsets are strictly increasing, so the kernel can resume anywhere.
    for w in entries.windows(2) {
        assert!(w[0].offset < w[1].offset, "{entries:?}");
    }

    // Resuming from an offset returns exactly the rest.
    let dh = f.fs.opendir(ROOT_INO).unwrap();
    let mut first = Vec::new();
    f.fs.readdir(ROOT_INO, dh.fh, 0, |e| {
        first.push(e);
        first.len() == 3
    })
    .unwrap();
    // The third entry did not fit: resume after the second, and the third must come again.
    let resume = first[1].offset;
    let mut rest = Vec::new();
    f.fs.readdir(ROOT_INO, dh.fh, resume, |e| {
        rest.push(e);
        false
    })
    .unwrap();
    f.fs.releasedir(dh.fh).unwrap();
    let mut all: Vec<_> = first[..2]
        .iter()
        .chain(rest.iter())
        .map(|e| e.name.clone())
        .collect();
    all.sort();
    let mut want: Vec<_> = entries.iter().map(|e| e.name.clone()).collect();
    want.sort();
    assert_eq!(all, want);

    // The store's name is only hidden at the top, where the store is.
    let dino = lookup(&f, ROOT_INO, "d").attr.ino;
    let names: Vec<_> = list(&f, dino).into_iter().map(|e| e.name).collect();
    assert!(names.iter().any(|n| n == STORE), "{names:?}");
    assert!(f.fs.lookup(dino, OsStr::new(STORE)).is_ok());
}

#[test]
fn the_store_is_unreachable_and_cannot_be_replaced() {
    let f = fixture_with(|b| std::fs::write(b.join("x"), b"x").unwrap());
    let store = OsStr::new(STORE);
    assert_eq!(errno(f.fs.lookup(ROOT_INO, store)), libc::ENOENT);
    assert_eq!(
        errno(f.fs.create(ROOT, ROOT_INO, store, 0o644, 0, libc::O_RDWR)),
        libc::EACCES
    );
    assert_eq!(
        errno(f.fs.mkdir(ROOT, ROOT_INO, store, 0o755, 0)),
        libc::EACCES
    );
    assert_eq!(
        errno(f.fs.rename(ROOT_INO, OsStr::new("x"), ROOT_INO, store, 0)),
        libc::EACCES
    );
    assert_eq!(
        errno(f.fs.rename(ROOT_INO, store, ROOT_INO, OsStr::new("y"), 0)),
        libc::EACCES
    );
    assert_eq!(errno(f.fs.unlink(ROOT_INO, store)), libc::EACCES);
    assert_eq!(errno(f.fs.rmdir(ROOT_INO, store)), libc::EACCES);
    assert_eq!(
        errno(f.fs.symlink(ROOT, ROOT_INO, store, Path::new("x"))),
        libc::EACCES
    );
    let x = lookup(&f, ROOT_INO, "x").attr.ino;
    assert_eq!(errno(f.fs.link(x, ROOT_INO, store)), libc::EACCES);
    // Nothing above touched the store or the file.
    assert!(f.backing.join(STORE).is_dir());
    assert_eq!(
        std::fs::read(f.backing.join(STORE).join("secret")).unwrap(),
        b"store data"
    );
    assert_eq!(std::fs::read(f.backing.join("x")).unwrap(), b"x");
    assert_eq!(f.fs.inode_count(), 2, "root and x only");
}

#[test]
fn readdirplus_takes_one_reference_per_entry_delivered() {
    let names = ["f0", "f1", "f2", "f3", "f4"];
    let f = fixture_with(|b| {
        for n in names {
            std::fs::write(b.join(n), n.as_bytes()).unwrap();
        }
    });
    let dh = f.fs.opendir(ROOT_INO).unwrap();
    let mut seen = Vec::new();
    f.fs.readdirplus(ROOT_INO, dh.fh, 0, |d, e| {
        if d.name == "." || d.name == ".." {
            assert!(e.is_none(), "no reference for {:?}", d.name);
        } else {
            let e = e.expect("an entry for a real name");
            assert_eq!(e.attr.ino, d.ino);
            seen.push((d.name.clone(), e.attr.ino));
        }
        false
    })
    .unwrap();
    assert_eq!(seen.len(), names.len(), "{seen:?}");
    assert!(
        seen.iter().all(|(n, _)| n != STORE),
        "store listed: {seen:?}"
    );
    for (n, ino) in &seen {
        assert_eq!(f.fs.lookup_count(*ino), 1, "{n:?}");
    }
    assert_eq!(f.fs.inode_count(), 1 + names.len());
    // A second pass adds exactly one more reference per entry.
    f.fs.readdirplus(ROOT_INO, dh.fh, 0, |_, _| false).unwrap();
    for (n, ino) in &seen {
        assert_eq!(f.fs.lookup_count(*ino), 2, "{n:?}");
    }
    f.fs.releasedir(dh.fh).unwrap();
    for (_, ino) in &seen {
        f.fs.forget(*ino, 2);
    }
    assert_eq!(f.fs.inode_count(), 1);
}

#[test]
fn readdirplus_full_after_k_entries_holds_k_references() {
    let f = fixture_with(|b| {
        for i in 0..6 {
            std::fs::write(b.join(format!("f{i}")), b"x").unwrap();
        }
    });
    let dh = f.fs.opendir(ROOT_INO).unwrap();
    // Accept the two dot entries and k = 3 real ones; the next one does not fit.
    let k = 3;
    let mut accepted = Vec::new();
    let mut refused = None;
    let mut last_offset = 0;
    f.fs.readdirplus(ROOT_INO, dh.fh, 0, |d, e| {
        let real = d.name != "." && d.name != "..";
        let real_so_far = accepted.len();
        if real && real_so_far == k {
            refused = Some((d.name.clone(), d.ino));
            return true;
        }
        last_offset = d.offset;
        if real {
            accepted.push(e.expect("entry").attr.ino);
        }
        false
    })
    .unwrap();
    assert_eq!(accepted.len(), k);
    let (refused_name, refused) = refused.expect("the closure reported full");
    assert_eq!(
        f.fs.lookup_count(refused),
        0,
        "the entry that did not fit keeps no reference"
    );
    for ino in &accepted {
        assert_eq!(f.fs.lookup_count(*ino), 1);
    }
    assert_eq!(
        f.fs.inode_count(),
        1 + k,
        "only the delivered entries are held"
    );

    // Continuing from the last delivered offset delivers the rest, each with one reference.
    let mut rest = Vec::new();
    let mut rest_names = Vec::new();
    f.fs.readdirplus(ROOT_INO, dh.fh, last_offset, |d, e| {
        assert!(d.name != "." && d.name != "..");
        rest_names.push(d.name.clone());
        rest.push(e.expect("entry").attr.ino);
        false
    })
    .unwrap();
    assert_eq!(rest.len(), 6 - k);
    assert!(
        rest_names.contains(&refused_name),
        "{refused_name:?} not in {rest_names:?}"
    );
    assert_eq!(f.fs.inode_count(), 1 + 6);
    for ino in accepted.iter().chain(rest.iter()) {
        assert_eq!(f.fs.lookup_count(*ino), 1);
    }
    f.fs.releasedir(dh.fh).unwrap();
}

#[test]
fn names_with_slash_or_dots_are_rejected() {
    let f = fixture_with(|b| {
        std::fs::create_dir(b.join("d")).unwrap();
        std::fs::write(b.join("d").join("x"), b"x").unwrap();
    });
    for bad in ["d/x", "..", ".", "", "../backing", "/etc"] {
        assert_eq!(
            errno(f.fs.lookup(ROOT_INO, OsStr::new(bad))),
            libc::EINVAL,
            "lookup {bad:?}"
        );
    }
    let d = lookup(&f, ROOT_INO, "d").attr.ino;
    assert_eq!(errno(f.fs.lookup(d, OsStr::new(".."))), libc::EINVAL);
    assert_eq!(
        errno(f.fs.create(ROOT, ROOT_INO, OsStr::new("d/y"), 0o644, 0, libc::O_RDWR)),
        libc::EINVAL
    );
    assert!(!f.backing.join("d").join("y").exists());
    assert_eq!(
        errno(f.fs.mkdir(ROOT, ROOT_INO, OsStr::new("../escape"), 0o755, 0)),
        libc::EINVAL
    );
    assert!(!f.backing.parent().unwrap().join("escape").exists());
}

#[test]
fn lookup_through_a_symlink_never_leaves_the_backing_dir() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x"), b"outside").unwrap();
    let target = outside.path().to_path_buf();
    let f = fixture_with(|b| {
        std::os::unix::fs::symlink(&target, b.join("out")).unwrap();
        std::fs::create_dir(b.join("d")).unwrap();
        std::os::unix::fs::symlink("d", b.join("in")).unwrap();
    });
    let out = lookup(&f, ROOT_INO, "out");
    assert_eq!(out.attr.kind, FileKind::Symlink);
    assert_eq!(
        f.fs.readlink(out.attr.ino).unwrap(),
        target.as_os_str().as_encoded_bytes()
    );
    assert_eq!(
        errno(f.fs.lookup(out.attr.ino, OsStr::new("x"))),
        libc::ENOTDIR
    );
    // Not even a symlink to a dir inside the backing dir is followed.
    let inn = lookup(&f, ROOT_INO, "in");
    assert_eq!(
        errno(f.fs.lookup(inn.attr.ino, OsStr::new("x"))),
        libc::ENOTDIR
    );
    assert_eq!(errno(f.fs.opendir(out.attr.ino)), libc::ENOTDIR);
    assert!(f.fs.open(out.attr.ino, libc::O_RDONLY).is_err());
    assert_eq!(
        errno(f.fs.create(
            ROOT,
            out.attr.ino,
            OsStr::new("new"),
            0o644,
            0,
            libc::O_RDWR
        )),
        libc::ENOTDIR
    );
    assert!(!outside.path().join("new").exists());
    // Creating over a symlink name with O_CREAT does not write through it.
    let r =
        f.fs.create(ROOT, ROOT_INO, OsStr::new("out"), 0o644, 0, libc::O_RDWR);
    assert!(r.is_err(), "create over a symlink must not open its target");
    assert_eq!(std::fs::read(outside.path().join("x")).unwrap(), b"outside");
}

#[test]
fn setattr_truncate_chmod_and_times() {
    let f = fixture_with(|b| std::fs::write(b.join("v"), vec![1u8; 5000]).unwrap());
    let path = f.backing.join("v");
    let ino = lookup(&f, ROOT_INO, "v").attr.ino;

    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                size: Some(100),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.size, 100);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.size, 1 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);

    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                mode: Some(libc::S_IFREG | 0o640),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.perm, 0o640);
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);

    // Both times set explicitly.
    let t_a = UNIX_EPOCH + Duration::new(1_000_000_000, 123_000_000);
    let t_m = UNIX_EPOCH + Duration::new(1_100_000_000, 456_000_000);
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                atime: Some(SetTime::At(t_a)),
                mtime: Some(SetTime::At(t_m)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.atime, a.mtime), (t_a, t_m));
    assert_attr_is_lstat(&a, &path);

    // Only atime, to now: mtime stays.
    let before = SystemTime::now() - Duration::from_secs(2);
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                atime: Some(SetTime::Now),
                mtime: None,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mtime, t_m, "mtime must be left alone");
    assert!(a.atime >= before, "atime set to now: {:?}", a.atime);
    assert_attr_is_lstat(&a, &path);

    // Only mtime, to now: atime stays at what it just became.
    let atime_now = a.atime;
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                atime: None,
                mtime: Some(SetTime::Now),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.atime, atime_now, "atime must be left alone");
    assert!(a.mtime >= before, "mtime set to now: {:?}", a.mtime);

    // Only mtime, to a fixed time; and a time before the epoch.
    let old = UNIX_EPOCH - Duration::from_secs(86_400);
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                mtime: Some(SetTime::At(old)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mtime, old);
    assert_eq!(a.atime, atime_now);
    assert_attr_is_lstat(&a, &path);

    // Truncate through an open handle.
    let h = f.fs.open(ino, libc::O_RDWR).unwrap();
    let a =
        f.fs.setattr(
            ino,
            &SetAttr {
                size: Some(7),
                fh: Some(h.fh),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.size, 7);
    assert_eq!(read_all(&f, h.fh, 0, 100), vec![1u8; 7]);
    f.fs.release(h.fh).unwrap();
}

#[test]
fn unlinked_file_keeps_working_through_its_handle() {
    let f = fixture();
    let (e, h) =
        f.fs.create(ROOT, ROOT_INO, OsStr::new("tmp"), 0o600, 0, libc::O_RDWR)
            .unwrap();
    f.fs.write(h.fh, 0, b"before").unwrap();
    f.fs.unlink(ROOT_INO, OsStr::new("tmp")).unwrap();
    assert!(!f.backing.join("tmp").exists());
    assert_eq!(
        errno(f.fs.lookup(ROOT_INO, OsStr::new("tmp"))),
        libc::ENOENT
    );
    f.fs.write(h.fh, 6, b" and after").unwrap();
    assert_eq!(read_all(&f, h.fh, 0, 100), b"before and after");
    let a = f.fs.getattr(e.attr.ino, Some(h.fh)).unwrap();
    assert_eq!(a.nlink, 0);
    assert_eq!(a.size, 16);
    assert_eq!(a.ino, e.attr.ino);
    // Without the handle, the inode's own fd still answers.
    let a = f.fs.getattr(e.attr.ino, None).unwrap();
    assert_eq!((a.nlink, a.size), (0, 16));
    f.fs.setattr(
        e.attr.ino,
        &SetAttr {
            size: Some(6),
            fh: Some(h.fh),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&f, h.fh, 0, 100), b"before");
    f.fs.release(h.fh).unwrap();
    f.fs.forget(e.attr.ino, 1);
    assert_eq!(f.fs.inode_count(), 1);
}

#[test]
fn rename_noreplace_gives_eexist_and_leaves_both() {
    let f = fixture_with(|b| {
        std::fs::write(b.join("a"), b"A").unwrap();
        std::fs::write(b.join("b"), b"B").unwrap();
    });
    assert_eq!(
        errno(f.fs.rename(
            ROOT_INO,
            OsStr::new("a"),
            ROOT_INO,
            OsStr::new("b"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    assert_eq!(std::fs::read(f.backing.join("a")).unwrap(), b"A");
    assert_eq!(std::fs::read(f.backing.join("b")).unwrap(), b"B");
    // To a free name it renames.
    f.fs.rename(
        ROOT_INO,
        OsStr::new("a"),
        ROOT_INO,
        OsStr::new("c"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();
    assert!(!f.backing.join("a").exists());
    assert_eq!(std::fs::read(f.backing.join("c")).unwrap(), b"A");
    // A plain rename replaces.
    f.fs.rename(ROOT_INO, OsStr::new("c"), ROOT_INO, OsStr::new("b"), 0)
        .unwrap();
    assert_eq!(std::fs::read(f.backing.join("b")).unwrap(), b"A");
}

#[test]
fn rename_keeps_the_inode_number() {
    let f = fixture_with(|b| {
        std::fs::write(b.join("a"), b"A").unwrap();
        std::fs::create_dir(b.join("d")).unwrap();
    });
    let a = lookup(&f, ROOT_INO, "a").attr.ino;
    let d = lookup(&f, ROOT_INO, "d").attr.ino;
    f.fs.rename(ROOT_INO, OsStr::new("a"), d, OsStr::new("moved"), 0)
        .unwrap();
    assert_eq!(lookup(&f, d, "moved").attr.ino, a);
}

#[test]
fn getattr_with_released_or_unknown_fh_falls_back_to_the_inode() {
    let f = fixture_with(|b| std::fs::write(b.join("a"), b"12345").unwrap());
    let ino = lookup(&f, ROOT_INO, "a").attr.ino;
    let h = f.fs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(f.fs.getattr(ino, Some(h.fh)).unwrap().size, 5);
    f.fs.release(h.fh).unwrap();
    let a = f.fs.getattr(ino, Some(h.fh)).unwrap();
    assert_eq!(a.ino, ino);
    assert_attr_is_lstat(&a, &f.backing.join("a"));
    let a = f.fs.getattr(ino, Some(987_654_321)).unwrap();
    assert_eq!(a.size, 5);
}

#[test]
fn unknown_inode_is_estale() {
    let f = fixture();
    let bogus = 424_242;
    assert_eq!(errno(f.fs.getattr(bogus, None)), libc::ESTALE);
    assert_eq!(errno(f.fs.lookup(bogus, OsStr::new("x"))), libc::ESTALE);
    assert_eq!(errno(f.fs.opendir(bogus)), libc::ESTALE);
    assert_eq!(errno(f.fs.open(bogus, libc::O_RDONLY)), libc::ESTALE);
    assert_eq!(
        errno(f.fs.setattr(
            bogus,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            }
        )),
        libc::ESTALE
    );
    assert_eq!(
        errno(f.fs.create(ROOT, bogus, OsStr::new("x"), 0o644, 0, libc::O_RDWR)),
        libc::ESTALE
    );
    // forget of an unknown inode is harmless.
    f.fs.forget(bogus, 1);
    assert_eq!(f.fs.inode_count(), 1);
}

#[test]
fn fallocate_punch_hole_and_seek_hole_reach_the_backing_file() {
    const K64: u64 = 64 * 1024;
    let f = fixture();
    let (e, h) =
        f.fs.create(
            ROOT,
            ROOT_INO,
            OsStr::new("disk.img"),
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    f.fs.write(h.fh, 0, &vec![0xABu8; 16 * K64 as usize])
        .unwrap();
    f.fs.fsync(h.fh, false).unwrap();
    assert_eq!(
        f.fs.lseek(h.fh, 0, libc::SEEK_HOLE).unwrap(),
        (16 * K64) as i64,
        "a full file has its only hole at the end"
    );
    let blocks_full = std::fs::metadata(f.backing.join("disk.img"))
        .unwrap()
        .blocks();

    f.fs.fallocate(
        h.fh,
        4 * K64,
        4 * K64,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(
        f.fs.lseek(h.fh, 0, libc::SEEK_HOLE).unwrap(),
        (4 * K64) as i64
    );
    assert_eq!(
        f.fs.lseek(h.fh, (4 * K64) as i64, libc::SEEK_DATA).unwrap(),
        (8 * K64) as i64
    );
    assert_eq!(read_all(&f, h.fh, 4 * K64, 16), vec![0u8; 16]);
    assert_eq!(read_all(&f, h.fh, 8 * K64, 4), vec![0xABu8; 4]);
    let a = f.fs.getattr(e.attr.ino, Some(h.fh)).unwrap();
    assert_eq!(a.size, 16 * K64, "KEEP_SIZE keeps the size");

    // The backing file itself has the hole.
    let m = std::fs::metadata(f.backing.join("disk.img")).unwrap();
    assert!(
        m.blocks() < blocks_full,
        "backing blocks {} not below {blocks_full}",
        m.blocks()
    );
    assert_eq!(a.blocks, m.blocks());
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(f.backing.join("disk.img")).unwrap();
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, (4 * K64) as i64);

    // Plain fallocate extends; SEEK_DATA past the end is ENXIO.
    f.fs.fallocate(h.fh, 16 * K64, K64, 0).unwrap();
    assert_eq!(f.fs.getattr(e.attr.ino, None).unwrap().size, 17 * K64);
    assert_eq!(
        errno(f.fs.lseek(h.fh, (20 * K64) as i64, libc::SEEK_DATA)),
        libc::ENXIO
    );
    f.fs.release(h.fh).unwrap();
}

#[test]
fn mkdir_symlink_rmdir_through_the_overlay() {
    let f = fixture();
    let d =
        f.fs.mkdir(ROOT, ROOT_INO, OsStr::new("d"), 0o777, 0o022)
            .unwrap();
    assert_eq!(d.attr.kind, FileKind::Directory);
    assert_eq!(d.attr.perm, 0o755);
    assert_attr_is_lstat(&d.attr, &f.backing.join("d"));
    let s =
        f.fs.symlink(ROOT, d.attr.ino, OsStr::new("s"), Path::new("../nowhere"))
            .unwrap();
    assert_eq!(s.attr.kind, FileKind::Symlink);
    assert_eq!(f.fs.readlink(s.attr.ino).unwrap(), b"../nowhere");
    assert_eq!(
        errno(f.fs.rmdir(ROOT_INO, OsStr::new("d"))),
        libc::ENOTEMPTY
    );
    f.fs.unlink(d.attr.ino, OsStr::new("s")).unwrap();
    f.fs.rmdir(ROOT_INO, OsStr::new("d")).unwrap();
    assert!(!f.backing.join("d").exists());
}

// ---- the snapshot view ----

const SNAP_CONTENT: &[u8] = b"snapshot content";

/// A fixture whose store holds snapshot `s1` (`vms/a.img`, mode 0640, and the symlink
/// `vms/cur`), with the snapshot view on.
fn snap_fixture(visible: bool) -> Fixture {
    fixture_with(|b| {
        std::fs::write(b.join("live.txt"), b"live").unwrap();
        let store = Store::open(&b.join(STORE)).unwrap();
        let geometry = Geometry {
            block_size: 4096,
            partition_size: 1 << 20,
        };
        let w = store.begin(&sn("s1"), "all", geometry, None).unwrap();
        let h = w
            .add_volume(VolumeMeta {
                id: VolumeId { dev: 1, ino: 2 },
                path: "vms/a.img".into(),
                size: SNAP_CONTENT.len() as u64,
                mode: 0o100640,
                uid: 0,
                gid: 0,
                mtime_ns: 1_000_000_000,
            })
            .unwrap();
        w.set_partition(h, 0, PartitionKind::Full, "test").unwrap();
        w.put_block(h, BlockIdx(0), SNAP_CONTENT).unwrap();
        w.add_namespace_entry(NamespaceEntry {
            path: "vms/cur".into(),
            kind: EntryKind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            target: Some("a.img".into()),
        });
        w.commit().unwrap();
    })
    .with_snapshots(visible)
}

#[test]
fn the_snapshot_view_has_its_own_inodes_and_takes_no_references() {
    let f = snap_fixture(false);
    let names = |ino| -> Vec<String> {
        list(&f, ino)
            .iter()
            .map(|d| d.name.to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(ROOT_INO),
        [".", "..", "live.txt"],
        "hidden by default"
    );
    let snaps = lookup(&f, ROOT_INO, ".snapshots");
    assert_eq!(snaps.attr.ino, SNAPDIR_INO);
    assert_eq!(SNAPDIR_INO, SNAPVIEW);
    assert_eq!(
        (snaps.attr.kind, snaps.attr.perm),
        (FileKind::Directory, 0o555)
    );
    assert_eq!(names(SNAPDIR_INO), [".", "..", "s1"]);
    let s1 = lookup(&f, SNAPDIR_INO, "s1");
    let vms = lookup(&f, s1.attr.ino, "vms");
    let a = lookup(&f, vms.attr.ino, "a.img");
    let cur = lookup(&f, vms.attr.ino, "cur");
    for e in [&s1, &vms, &a, &cur] {
        assert!(e.attr.ino > SNAPVIEW, "{:#x}", e.attr.ino);
    }
    assert_eq!(
        (a.attr.size, a.attr.perm, a.attr.kind),
        (SNAP_CONTENT.len() as u64, 0o640, FileKind::Regular)
    );
    assert_eq!(a.attr.mtime, UNIX_EPOCH + Duration::from_secs(1));
    assert_eq!(f.fs.readlink(cur.attr.ino).unwrap(), b"a.img");
    assert_eq!(f.fs.getattr(a.attr.ino, None).unwrap(), a.attr);
    assert_eq!(lookup(&f, vms.attr.ino, "..").attr.ino, s1.attr.ino);
    assert_eq!(
        errno(f.fs.lookup(vms.attr.ino, OsStr::new("nope"))),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.fs.lookup(SNAPDIR_INO, OsStr::new("s2"))),
        libc::ENOENT
    );
    assert_eq!(
        errno(f.fs.lookup(SNAPDIR_INO, OsStr::new(".tmp-s1"))),
        libc::ENOENT
    );
    // `.snapshots` and `<name>` are asked every time, the rest is cached for good; backing
    // inodes keep the configured timeouts.
    assert_eq!(f.fs.validity(SNAPDIR_INO), Validity::Uncached);
    assert_eq!(f.fs.validity(s1.attr.ino), Validity::Uncached);
    assert_eq!(f.fs.validity(vms.attr.ino), Validity::Immutable);
    assert_eq!(f.fs.validity(a.attr.ino), Validity::Immutable);
    let live = lookup(&f, ROOT_INO, "live.txt");
    assert_eq!(f.fs.validity(live.attr.ino), Validity::Configured);
    // None of this reached the backing inode table, and forget leaves the view alone.
    assert_eq!(f.fs.inode_count(), 2);
    f.fs.forget(a.attr.ino, 5);
    f.fs.forget(SNAPDIR_INO, 1);
    assert_eq!(f.fs.getattr(a.attr.ino, None).unwrap(), a.attr);
    assert_eq!(lookup(&f, vms.attr.ino, "a.img").attr.ino, a.attr.ino);
    assert_eq!(
        f.fs.statfs(a.attr.ino).unwrap().bsize,
        f.fs.statfs(ROOT_INO).unwrap().bsize
    );
}

#[test]
fn readdirplus_of_the_root_gives_snapshots_when_visible_without_a_reference() {
    let f = snap_fixture(true);
    let dh = f.fs.opendir(ROOT_INO).unwrap();
    let mut seen = Vec::new();
    f.fs.readdirplus(ROOT_INO, dh.fh, 0, |d, e| {
        if let Some(e) = e {
            assert_eq!(e.attr.ino, d.ino);
            seen.push((d.name.to_string_lossy().into_owned(), d.ino));
        }
        false
    })
    .unwrap();
    f.fs.releasedir(dh.fh).unwrap();
    seen.sort();
    assert_eq!(seen[0], (".snapshots".to_string(), SNAPDIR_INO));
    assert_eq!(seen[1].0, "live.txt");
    assert_eq!(f.fs.inode_count(), 2, "root and live.txt only");
    // Inside the view, readdirplus gives every entry its attributes.
    let s1 = lookup(&f, SNAPDIR_INO, "s1").attr.ino;
    let dh = f.fs.opendir(s1).unwrap();
    let mut inside = Vec::new();
    f.fs.readdirplus(s1, dh.fh, 0, |d, e| {
        inside.push((
            d.name.to_string_lossy().into_owned(),
            e.map(|e| e.attr.kind),
        ));
        false
    })
    .unwrap();
    f.fs.releasedir(dh.fh).unwrap();
    assert_eq!(
        inside,
        [
            (".".to_string(), None),
            ("..".to_string(), None),
            ("vms".to_string(), Some(FileKind::Directory)),
        ]
    );
}

#[test]
fn the_snapshot_view_reads_and_refuses_every_change() {
    let f = snap_fixture(false);
    let s1 = lookup(&f, SNAPDIR_INO, "s1").attr.ino;
    let vms = lookup(&f, s1, "vms").attr.ino;
    let a = lookup(&f, vms, "a.img").attr.ino;
    let live = lookup(&f, ROOT_INO, "live.txt").attr.ino;
    let n = |s: &str| OsStr::new(s).to_os_string();

    let o = f.fs.open(a, libc::O_RDONLY).unwrap();
    assert!(o.keep_cache, "snapshot content never changes");
    assert_eq!(read_all(&f, o.fh, 0, 4096), SNAP_CONTENT);
    assert_eq!(read_all(&f, o.fh, 9, 3), &SNAP_CONTENT[9..12]);
    assert!(read_all(&f, o.fh, 100, 10).is_empty());
    assert_eq!(f.fs.handle_ino(o.fh).unwrap(), a);
    assert_eq!(f.fs.lseek(o.fh, 0, libc::SEEK_DATA).unwrap(), 0);
    assert_eq!(
        f.fs.lseek(o.fh, 0, libc::SEEK_HOLE).unwrap(),
        SNAP_CONTENT.len() as i64
    );
    assert_eq!(errno(f.fs.lseek(o.fh, 100, libc::SEEK_DATA)), libc::ENXIO);
    f.fs.flush(o.fh).unwrap();
    f.fs.fsync(o.fh, false).unwrap();
    let lo = f.fs.open(live, libc::O_RDWR).unwrap();

    let erofs: Vec<(&str, i32)> = vec![
        ("write", errno(f.fs.write(o.fh, 0, b"x"))),
        ("fallocate", errno(f.fs.fallocate(o.fh, 0, 10, 0))),
        (
            "copy into",
            errno(f.fs.copy_file_range(lo.fh, 0, o.fh, 0, 4)),
        ),
        ("open O_WRONLY", errno(f.fs.open(a, libc::O_WRONLY))),
        ("open O_RDWR", errno(f.fs.open(a, libc::O_RDWR))),
        (
            "open O_TRUNC",
            errno(f.fs.open(a, libc::O_RDONLY | libc::O_TRUNC)),
        ),
        (
            "chmod",
            errno(f.fs.setattr(
                a,
                &SetAttr {
                    mode: Some(0o777),
                    ..SetAttr::default()
                },
            )),
        ),
        (
            "truncate",
            errno(f.fs.setattr(
                a,
                &SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            )),
        ),
        (
            "create",
            errno(f.fs.create(ROOT, vms, &n("new"), 0o644, 0, libc::O_WRONLY)),
        ),
        ("mkdir", errno(f.fs.mkdir(ROOT, vms, &n("d"), 0o755, 0))),
        (
            "mknod",
            errno(f.fs.mknod(ROOT, vms, &n("p"), libc::S_IFIFO | 0o644, 0, 0)),
        ),
        (
            "symlink",
            errno(f.fs.symlink(ROOT, vms, &n("l"), Path::new("x"))),
        ),
        ("unlink", errno(f.fs.unlink(vms, &n("a.img")))),
        ("rmdir", errno(f.fs.rmdir(s1, &n("vms")))),
        ("rmdir snapshot", errno(f.fs.rmdir(SNAPDIR_INO, &n("s1")))),
        (
            "rename inside",
            errno(f.fs.rename(vms, &n("a.img"), vms, &n("b"), 0)),
        ),
        (
            "rename out",
            errno(f.fs.rename(vms, &n("a.img"), ROOT_INO, &n("b"), 0)),
        ),
        (
            "rename in",
            errno(f.fs.rename(ROOT_INO, &n("live.txt"), vms, &n("b"), 0)),
        ),
        ("link out", errno(f.fs.link(a, ROOT_INO, &n("hl")))),
        ("link in", errno(f.fs.link(live, vms, &n("hl")))),
        ("setxattr", errno(f.fs.setxattr(a, &n("user.x"), b"1", 0))),
        ("removexattr", errno(f.fs.removexattr(a, &n("user.x")))),
        ("access W_OK", errno(f.fs.access(ROOT, a, libc::W_OK))),
        (
            "unlink .snapshots",
            errno(f.fs.unlink(ROOT_INO, &n(".snapshots"))),
        ),
        (
            "rmdir .snapshots",
            errno(f.fs.rmdir(ROOT_INO, &n(".snapshots"))),
        ),
        (
            "rename onto .snapshots",
            errno(f.fs.rename(ROOT_INO, &n("live.txt"), ROOT_INO, &n(".snapshots"), 0)),
        ),
        (
            "mkdir .snapshots",
            errno(f.fs.mkdir(ROOT, ROOT_INO, &n(".snapshots"), 0o755, 0)),
        ),
    ];
    for (what, e) in erofs {
        assert_eq!(e, libc::EROFS, "{what}");
    }
    // Copying out is the kernel's job (read and write): EXDEV makes it fall back.
    assert_eq!(
        errno(f.fs.copy_file_range(o.fh, 0, lo.fh, 0, 4)),
        libc::EXDEV
    );
    assert_eq!(errno(f.fs.getxattr(a, &n("user.x"), 0)), libc::ENODATA);
    assert_eq!(f.fs.listxattr(a, 0).unwrap(), Xattr::Size(0));
    f.fs.access(ROOT, a, libc::R_OK).unwrap();
    let other = Caller {
        uid: 1000,
        gid: 1000,
        pid: 0,
    };
    assert_eq!(errno(f.fs.access(other, a, libc::R_OK)), libc::EACCES);
    f.fs.access(other, SNAPDIR_INO, libc::R_OK | libc::X_OK)
        .unwrap();
    assert_eq!(read_all(&f, o.fh, 0, 4096), SNAP_CONTENT, "still the same");
    assert_eq!(std::fs::read(f.backing.join("live.txt")).unwrap(), b"live");
    f.fs.release(o.fh).unwrap();
    f.fs.release(lo.fh).unwrap();
    assert_eq!(errno(f.fs.flush(o.fh)), libc::EBADF);
    assert_eq!(errno(f.fs.release(o.fh)), libc::EBADF);
}

/// A change through the public API naming view inode `v`; `live` is a live regular file and
/// `live_fh` a writable handle on it, for the changes that name a second inode or handle.
type InodeChange = fn(&OverlayFs, u64, u64, u64) -> Result<(), FsError>;

/// A change through view handle `fh`, open on view inode `ino`; `live_fh` as above.
type HandleChange = fn(&OverlayFs, u64, u64, u64) -> Result<(), FsError>;

/// A `Changed` result, which must not tell the kernel to drop a mode it never changed.
fn unchanged<T>(c: Changed<T>) -> Result<(), FsError> {
    assert!(!c.mode_stale, "a refused change left the mode stale");
    c.result.map(drop)
}

#[test]
fn every_change_to_a_view_inode_or_handle_is_erofs_whichever_side_it_names() {
    let f = snap_fixture(true);
    let s1 = lookup(&f, SNAPDIR_INO, "s1").attr.ino;
    let vms = lookup(&f, s1, "vms").attr.ino;
    let a = lookup(&f, vms, "a.img").attr.ino;
    let cur = lookup(&f, vms, "cur").attr.ino;
    let live = lookup(&f, ROOT_INO, "live.txt").attr.ino;
    let live_fh = f.fs.open(live, libc::O_RDWR).unwrap().fh;
    let n = OsStr::new;
    let by = WriteBy {
        caller: ROOT,
        kill_suidgid: true,
        open_flags: libc::O_RDWR,
    };

    let inode_changes: Vec<(&str, InodeChange)> = vec![
        ("chmod", |fs, v, _, _| {
            let set = SetAttr {
                mode: Some(0o777),
                ..SetAttr::default()
            };
            fs.setattr(v, &set).map(drop)
        }),
        ("chown", |fs, v, _, _| {
            let set = SetAttr {
                uid: Some(1000),
                gid: Some(1000),
                ..SetAttr::default()
            };
            fs.setattr(v, &set).map(drop)
        }),
        ("truncate", |fs, v, _, _| {
            let set = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            fs.setattr(v, &set).map(drop)
        }),
        ("utimens", |fs, v, _, _| {
            let set = SetAttr {
                atime: Some(SetTime::Now),
                mtime: Some(SetTime::At(UNIX_EPOCH)),
                ..SetAttr::default()
            };
            fs.setattr(v, &set).map(drop)
        }),
        ("truncate by a caller", |fs, v, _, _| {
            let set = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            unchanged(fs.setattr_by(ROOT, v, &set))
        }),
        ("setxattr", |fs, v, _, _| {
            fs.setxattr(v, OsStr::new("user.x"), b"1", 0)
        }),
        ("removexattr", |fs, v, _, _| {
            fs.removexattr(v, OsStr::new("user.x"))
        }),
        ("access W_OK", |fs, v, _, _| fs.access(ROOT, v, libc::W_OK)),
        ("open O_WRONLY", |fs, v, _, _| {
            fs.open(v, libc::O_WRONLY).map(drop)
        }),
        ("open O_RDWR", |fs, v, _, _| {
            fs.open(v, libc::O_RDWR).map(drop)
        }),
        ("open O_TRUNC", |fs, v, _, _| {
            fs.open(v, libc::O_RDONLY | libc::O_TRUNC).map(drop)
        }),
        ("open O_TRUNC by a caller", |fs, v, _, _| {
            let c = fs.open_by(ROOT, v, libc::O_WRONLY | libc::O_TRUNC);
            c.result.map(drop)
        }),
        ("create in", |fs, v, _, _| {
            fs.create(ROOT, v, OsStr::new("new"), 0o644, 0, libc::O_WRONLY)
                .map(drop)
        }),
        ("mknod in", |fs, v, _, _| {
            fs.mknod(ROOT, v, OsStr::new("p"), libc::S_IFIFO | 0o644, 0, 0)
                .map(drop)
        }),
        ("mkdir in", |fs, v, _, _| {
            fs.mkdir(ROOT, v, OsStr::new("d"), 0o755, 0).map(drop)
        }),
        ("symlink in", |fs, v, _, _| {
            fs.symlink(ROOT, v, OsStr::new("l"), Path::new("x"))
                .map(drop)
        }),
        ("unlink in", |fs, v, _, _| fs.unlink(v, OsStr::new("a.img"))),
        ("rmdir in", |fs, v, _, _| fs.rmdir(v, OsStr::new("vms"))),
        ("rename inside", |fs, v, _, _| {
            fs.rename(v, OsStr::new("a.img"), v, OsStr::new("b"), 0)
        }),
        ("rename out of", |fs, v, _, _| {
            fs.rename(v, OsStr::new("a.img"), ROOT_INO, OsStr::new("b"), 0)
        }),
        ("rename into", |fs, v, _, _| {
            fs.rename(ROOT_INO, OsStr::new("live.txt"), v, OsStr::new("b"), 0)
        }),
        ("rename exchange with", |fs, v, _, _| {
            let flags = libc::RENAME_EXCHANGE;
            fs.rename(
                ROOT_INO,
                OsStr::new("live.txt"),
                v,
                OsStr::new("a.img"),
                flags,
            )
        }),
        ("link it out", |fs, v, _, _| {
            fs.link(v, ROOT_INO, OsStr::new("hl")).map(drop)
        }),
        ("link into", |fs, v, live, _| {
            fs.link(live, v, OsStr::new("hl")).map(drop)
        }),
    ];
    let handle_changes: Vec<(&str, HandleChange)> = vec![
        ("write", |fs, fh, _, _| fs.write(fh, 0, b"x").map(drop)),
        ("write whole", |fs, fh, _, _| {
            fs.write_whole(fh, 0, b"x").map(drop)
        }),
        ("write by a caller", |fs, fh, ino, _| {
            let by = WriteBy {
                caller: ROOT,
                kill_suidgid: true,
                open_flags: libc::O_DIRECT,
            };
            unchanged(fs.write_by(by, ino, fh, 0, b"x"))
        }),
        ("fallocate", |fs, fh, _, _| fs.fallocate(fh, 0, 10, 0)),
        ("punch hole", |fs, fh, _, _| {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            fs.fallocate(fh, 0, 4, mode)
        }),
        ("fallocate by a caller", |fs, fh, ino, _| {
            unchanged(fs.fallocate_by(ROOT, ino, fh, 0, 10, 0))
        }),
        ("copy into from the live tree", |fs, fh, _, live_fh| {
            fs.copy_file_range(live_fh, 0, fh, 0, 4).map(drop)
        }),
        ("copy into from itself", |fs, fh, _, _| {
            fs.copy_file_range(fh, 0, fh, 8, 4).map(drop)
        }),
        ("copy into by a caller", |fs, fh, ino, live_fh| {
            unchanged(fs.copy_file_range_by(ROOT, live_fh, 0, ino, fh, 0, 4))
        }),
    ];

    let view_inodes = [SNAPDIR_INO, s1, vms, a, cur];
    let file = f.fs.open(a, libc::O_RDONLY).unwrap().fh;
    let mut handles = vec![(file, a)];
    for d in [SNAPDIR_INO, s1, vms] {
        handles.push((f.fs.opendir(d).unwrap().fh, d));
    }
    let attrs_before: Vec<Attr> = view_inodes
        .iter()
        .map(|&v| f.fs.getattr(v, None).unwrap())
        .collect();
    let backing_before = std::fs::read_dir(&f.backing).unwrap().count();
    let counted = f.fs.inode_count();

    for (what, change) in &inode_changes {
        for &v in &view_inodes {
            let e = errno(change(&f.fs, v, live, live_fh));
            assert_eq!(e, libc::EROFS, "{what} on view inode {v:#x}");
        }
    }
    for (what, change) in &handle_changes {
        for &(fh, ino) in &handles {
            let e = errno(change(&f.fs, fh, ino, live_fh));
            assert_eq!(e, libc::EROFS, "{what} through view handle {fh:#x}");
        }
    }
    // The live tree answers what it would answer anyway, so the EROFS above is the view's.
    unchanged(f.fs.write_by(by, live, live_fh, 0, b"L")).unwrap();
    assert_eq!(std::fs::read(f.backing.join("live.txt")).unwrap(), b"Live");
    assert_eq!(
        errno(f.fs.rename(live, n("x"), ROOT_INO, n("y"), 0)),
        libc::ENOTDIR
    );

    // Nothing changed, in the view or behind it.
    let attrs_after: Vec<Attr> = view_inodes
        .iter()
        .map(|&v| f.fs.getattr(v, None).unwrap())
        .collect();
    assert_eq!(attrs_after, attrs_before);
    assert_eq!(read_all(&f, file, 0, 4096), SNAP_CONTENT);
    let names: Vec<String> = list(&f, vms)
        .iter()
        .map(|d| d.name.to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [".", "..", "a.img", "cur"]);
    assert_eq!(
        std::fs::read_dir(&f.backing).unwrap().count(),
        backing_before,
        "no name made or removed in the backing dir"
    );
    assert_eq!(f.fs.inode_count(), counted, "no reference taken");
    for (fh, _) in handles.into_iter().skip(1) {
        f.fs.releasedir(fh).unwrap();
    }
    f.fs.release(file).unwrap();
    f.fs.release(live_fh).unwrap();
}
