//! Directories through a real mount, checked against a plain dir: listings (small and of 2000
//! entries), mkdir, rmdir, unlink, every rename flavour, and the store dir that no listing,
//! lookup or rename may reach.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, MetadataExt};

use common::posix::*;
use common::Mount;

// ---- lookup, getattr, readdir ----

#[test]
fn directory_listing_matches_plain_dir() {
    let p = Pair::new();
    p.both("populate", |r| {
        fs::write(r.join("a.txt"), b"a")?;
        fs::create_dir(r.join("sub"))?;
        fs::write(r.join("sub/inner"), b"i")?;
        std::os::unix::fs::symlink("a.txt", r.join("ln"))?;
        std::os::unix::fs::symlink("dangling", r.join("dangling-ln"))?;
        mkfifo(&r.join("pipe"), 0o644)?;
        fs::write(r.join("name with spaces \u{e9}"), b"")?;
        fs::write(r.join(".hidden"), b"h")?;
        fs::create_dir(r.join("empty"))?;
        Ok(())
    });
    let root = p.same("list root", listing).unwrap();
    assert_eq!(root.len(), 8, "{root:?}");
    p.same("list sub", |r| listing(&r.join("sub"))).unwrap();
    p.expect("list empty", Ok(vec![]), |r| listing(&r.join("empty")));
    // A listing after changes sees the changes (no stale directory cache).
    p.both("change", |r| {
        fs::remove_file(r.join("a.txt"))?;
        fs::write(r.join("b.txt"), b"b")
    });
    p.same("list after change", listing).unwrap();
    p.expect("list a file", Err(libc::ENOTDIR), |r| {
        listing(&r.join("sub/inner"))
    });
    p.expect("list missing", Err(libc::ENOENT), |r| {
        listing(&r.join("nope"))
    });
}

#[test]
fn listing_2000_files_with_attributes_shows_each_once() {
    const N: usize = 2000;
    let m = Mount::with_setup(
        |b| {
            fs::create_dir(b.join("many")).unwrap();
            for i in 0..N {
                fs::write(b.join(format!("many/f{i:05}")), "x".repeat(i % 17)).unwrap();
            }
        },
        None,
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for e in fs::read_dir(m.path().join("many")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let md = e.metadata().unwrap();
        let i: usize = name[1..].parse().unwrap();
        assert!(md.is_file(), "{name}");
        assert_eq!(md.size(), (i % 17) as u64, "{name}: size");
        *seen.entry(name).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    assert_eq!(seen.len(), N, "entries listed");
    for i in 0..N {
        assert!(seen.contains_key(&format!("f{i:05}")), "f{i:05} missing");
    }
}

// ---- namespace ----

#[test]
fn mkdir_rmdir_unlink_match_plain_dir() {
    let p = Pair::new();
    p.expect("mkdir", Ok(()), |r| {
        fs::DirBuilder::new().mode(0o750).create(r.join("d"))
    });
    p.same("new dir attributes", |r| lshape(&r.join("d")))
        .unwrap();
    p.expect("mkdir existing", Err(libc::EEXIST), |r| {
        fs::create_dir(r.join("d"))
    });
    p.expect("mkdir nested", Ok(()), |r| {
        fs::create_dir_all(r.join("d/e/f"))
    });
    p.expect("parent nlink", Ok(3), |r| {
        Ok(fs::metadata(r.join("d"))?.nlink())
    });
    p.expect("rmdir non-empty", Err(libc::ENOTEMPTY), |r| {
        fs::remove_dir(r.join("d/e"))
    });
    p.expect("rmdir empty", Ok(()), |r| fs::remove_dir(r.join("d/e/f")));
    p.expect("rmdir again", Err(libc::ENOENT), |r| {
        fs::remove_dir(r.join("d/e/f"))
    });
    p.expect("unlink", Ok(false), |r| {
        fs::write(r.join("d/file"), b"x")?;
        fs::remove_file(r.join("d/file"))?;
        Ok(r.join("d/file").exists())
    });
    assert!(!p.mount.backing().join("d/file").exists());
    p.expect("unlink symlink, not target", Ok(true), |r| {
        fs::write(r.join("target"), b"t")?;
        std::os::unix::fs::symlink("target", r.join("sl"))?;
        fs::remove_file(r.join("sl"))?;
        Ok(r.join("target").exists())
    });
    p.expect("unlink fifo", Ok(()), |r| {
        mkfifo(&r.join("pipe"), 0o600)?;
        fs::remove_file(r.join("pipe"))
    });
    p.expect("remove whole tree", Ok(()), |r| {
        fs::remove_dir_all(r.join("d"))
    });
    p.same("listing after", listing).unwrap();
}

#[test]
fn rename_replaces_swaps_and_refuses_like_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| {
        fs::write(r.join("src"), b"new content")?;
        fs::write(r.join("dst"), b"old")
    });
    let src_ino = fs::metadata(p.mnt().join("src")).unwrap().ino();
    let old_backing_ino = fs::metadata(p.mount.backing().join("dst")).unwrap().ino();
    let old_target = File::open(p.mnt().join("dst")).unwrap();
    p.expect("rename over existing", Ok(b"new content".to_vec()), |r| {
        fs::rename(r.join("src"), r.join("dst"))?;
        fs::read(r.join("dst"))
    });
    p.expect("source name gone", Ok(false), |r| {
        Ok(r.join("src").exists())
    });
    assert_eq!(
        fs::metadata(p.mnt().join("dst")).unwrap().ino(),
        src_ino,
        "the target name now shows the source inode"
    );
    assert_eq!(fstat(&old_target).st_nlink, 0, "old target inode unlinked");
    let mut old = String::new();
    (&old_target).read_to_string(&mut old).unwrap();
    assert_eq!(old, "old", "old inode still readable through its fd");
    for e in fs::read_dir(p.mount.backing()).unwrap() {
        assert_ne!(
            e.unwrap().ino(),
            old_backing_ino,
            "old target still linked in backing"
        );
    }

    p.both("more files", |r| {
        fs::write(r.join("a"), b"AAAA")?;
        fs::write(r.join("b"), b"BB")?;
        fs::create_dir(r.join("dir"))?;
        fs::write(r.join("dir/in"), b"in")
    });
    p.expect("RENAME_NOREPLACE on existing", Err(libc::EEXIST), |r| {
        renameat2(&r.join("a"), &r.join("b"), libc::RENAME_NOREPLACE)
    });
    p.expect(
        "both untouched",
        Ok((b"AAAA".to_vec(), b"BB".to_vec())),
        |r| Ok((fs::read(r.join("a"))?, fs::read(r.join("b"))?)),
    );
    p.expect("RENAME_NOREPLACE on new name", Ok(b"AAAA".to_vec()), |r| {
        renameat2(&r.join("a"), &r.join("a2"), libc::RENAME_NOREPLACE)?;
        fs::read(r.join("a2"))
    });
    p.expect(
        "RENAME_EXCHANGE swaps",
        Ok((b"BB".to_vec(), b"AAAA".to_vec())),
        |r| {
            renameat2(&r.join("a2"), &r.join("b"), libc::RENAME_EXCHANGE)?;
            Ok((fs::read(r.join("a2"))?, fs::read(r.join("b"))?))
        },
    );
    assert_eq!(fs::read(p.mount.backing().join("b")).unwrap(), b"AAAA");
    p.expect("RENAME_EXCHANGE file and dir", Ok(("dir", "file")), |r| {
        renameat2(&r.join("b"), &r.join("dir"), libc::RENAME_EXCHANGE)?;
        Ok((lshape(&r.join("b"))?.kind, lshape(&r.join("dir"))?.kind))
    });
    p.expect("exchanged dir content follows", Ok(b"in".to_vec()), |r| {
        fs::read(r.join("b/in"))
    });
    p.expect("RENAME_EXCHANGE with missing", Err(libc::ENOENT), |r| {
        renameat2(&r.join("a2"), &r.join("nope"), libc::RENAME_EXCHANGE)
    });
    p.expect("rename into subdir", Ok(b"BB".to_vec()), |r| {
        fs::rename(r.join("a2"), r.join("b/moved"))?;
        fs::read(r.join("b/moved"))
    });
    p.expect("rename dir", Ok(b"in".to_vec()), |r| {
        fs::rename(r.join("b"), r.join("c"))?;
        fs::read(r.join("c/in"))
    });
    p.expect("rename dir over empty dir", Ok(()), |r| {
        fs::create_dir(r.join("empty"))?;
        fs::rename(r.join("c"), r.join("empty"))
    });
    p.same("listing after renames", listing).unwrap();
    p.same("listing of moved dir", |r| listing(&r.join("empty")))
        .unwrap();
}

// ---- the store ----

#[test]
fn store_is_invisible_and_unreachable_through_the_mount() {
    let m = Mount::with_setup(|b| fs::write(b.join("x"), b"x").unwrap(), None);
    let store = m.backing().join(".grainfs");
    assert!(store.is_dir(), "store exists in backing");
    let before: Vec<_> = listing(&store).unwrap();
    let hidden = m.path().join(".grainfs");
    let errno = |r: io::Result<()>| outcome(r).err();
    assert_eq!(
        errno(fs::symlink_metadata(&hidden).map(drop)),
        Some(libc::ENOENT),
        "lstat"
    );
    assert_eq!(
        errno(File::open(&hidden).map(drop)),
        Some(libc::ENOENT),
        "open"
    );
    assert_eq!(
        errno(fs::read_dir(&hidden).map(drop)),
        Some(libc::ENOENT),
        "opendir"
    );
    assert_eq!(
        errno(fs::symlink_metadata(hidden.join("anything")).map(drop)),
        Some(libc::ENOENT),
        "lookup inside"
    );
    assert_eq!(
        errno(access(&hidden, libc::F_OK)),
        Some(libc::ENOENT),
        "access"
    );
    let names: Vec<_> = listing(m.path()).unwrap();
    assert_eq!(names, vec![("x".to_string(), "file")], "root listing");

    assert_eq!(errno(fs::create_dir(&hidden)), Some(libc::EACCES), "mkdir");
    assert_eq!(
        errno(File::create(&hidden).map(drop)),
        Some(libc::EACCES),
        "create"
    );
    assert_eq!(
        errno(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&hidden)
                .map(drop)
        ),
        Some(libc::EACCES),
        "create O_EXCL"
    );
    assert_eq!(errno(mkfifo(&hidden, 0o644)), Some(libc::EACCES), "mkfifo");
    assert_eq!(
        errno(std::os::unix::fs::symlink("x", &hidden)),
        Some(libc::EACCES),
        "symlink"
    );
    assert_eq!(
        errno(fs::hard_link(m.path().join("x"), &hidden)),
        Some(libc::EACCES),
        "link"
    );
    assert_eq!(
        errno(fs::rename(m.path().join("x"), &hidden)),
        Some(libc::EACCES),
        "rename file to .grainfs"
    );
    fs::create_dir(m.path().join("d")).unwrap();
    assert_eq!(
        errno(fs::rename(m.path().join("d"), &hidden)),
        Some(libc::EACCES),
        "rename dir to .grainfs"
    );
    assert_eq!(
        errno(renameat2(
            &m.path().join("x"),
            &hidden,
            libc::RENAME_EXCHANGE
        )),
        Some(libc::ENOENT),
        "exchange with .grainfs (lookup fails first)"
    );
    assert_eq!(errno(fs::remove_dir(&hidden)), Some(libc::ENOENT), "rmdir");
    assert_eq!(
        errno(fs::remove_file(&hidden)),
        Some(libc::ENOENT),
        "unlink"
    );

    // A `.grainfs` below the root is an ordinary name.
    fs::create_dir(m.path().join("d/.grainfs")).unwrap();
    fs::write(m.path().join("d/.grainfs/f"), b"ok").unwrap();
    assert_eq!(fs::read(m.backing().join("d/.grainfs/f")).unwrap(), b"ok");

    assert_eq!(fs::read(m.path().join("x")).unwrap(), b"x", "x untouched");
    assert!(store.is_dir(), "store still a dir");
    let after = listing(&store).unwrap();
    for e in &before {
        assert!(
            after.contains(e),
            "store lost {e:?}: {before:?} -> {after:?}"
        );
    }
}
