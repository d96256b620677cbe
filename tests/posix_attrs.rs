//! Attributes through a real mount, checked against the backing dir and a plain dir: what
//! stat(2) shows, what chmod, chown, truncate and utimensat change, and what statfs reports.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use common::posix::*;
use common::Mount;

// ---- lookup, getattr, readdir ----

#[test]
fn stat_through_mount_shows_backing_attributes() {
    let m = Mount::with_setup(
        |b| {
            fs::write(b.join("file"), b"twelve bytes").unwrap();
            fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o640)).unwrap();
            std::os::unix::fs::chown(b.join("file"), Some(1234), Some(5678)).unwrap();
            utimens(
                &b.join("file"),
                libc::timespec {
                    tv_sec: 1_500_000_000,
                    tv_nsec: 123_456_789,
                },
                libc::timespec {
                    tv_sec: 1_600_000_000,
                    tv_nsec: 987_654_321,
                },
            )
            .unwrap();
            fs::create_dir_all(b.join("dir/a")).unwrap();
            fs::create_dir_all(b.join("dir/b")).unwrap();
            fs::set_permissions(b.join("dir"), fs::Permissions::from_mode(0o2750)).unwrap();
            std::os::unix::fs::symlink("file", b.join("link")).unwrap();
            fs::write(b.join("hard1"), b"x").unwrap();
            fs::hard_link(b.join("hard1"), b.join("hard2")).unwrap();
            mkfifo(&b.join("fifo"), 0o620).unwrap();
            let big = File::create(b.join("sparse")).unwrap();
            big.set_len(5 * MIB + 3).unwrap();
            big.write_at(b"data", MIB).unwrap();
        },
        None,
    );
    for name in [
        "file", "dir", "dir/a", "link", "hard1", "hard2", "fifo", "sparse",
    ] {
        let on_mount = fs::symlink_metadata(m.path().join(name)).unwrap();
        let on_backing = fs::symlink_metadata(m.backing().join(name)).unwrap();
        assert_eq!(shape(&on_mount), shape(&on_backing), "{name}");
        assert_eq!(on_mount.size(), on_backing.size(), "{name}: size");
        assert_eq!(on_mount.blocks(), on_backing.blocks(), "{name}: st_blocks");
        assert_eq!(
            (on_mount.mtime(), on_mount.mtime_nsec()),
            (on_backing.mtime(), on_backing.mtime_nsec()),
            "{name}: mtime"
        );
        assert_eq!(
            (on_mount.ctime(), on_mount.ctime_nsec()),
            (on_backing.ctime(), on_backing.ctime_nsec()),
            "{name}: ctime"
        );
    }
    let f = fs::metadata(m.path().join("file")).unwrap();
    assert_eq!(f.mode() & 0o7777, 0o640);
    assert_eq!((f.uid(), f.gid()), (1234, 5678));
    assert_eq!((f.mtime(), f.mtime_nsec()), (1_600_000_000, 987_654_321));
    assert_eq!((f.atime(), f.atime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!(f.size(), 12);
    let d = fs::metadata(m.path().join("dir")).unwrap();
    assert_eq!(d.nlink(), 4, "dir with two subdirs");
    assert_eq!(d.mode() & 0o7777, 0o2750);
    // Hard links are one inode through the mount too.
    let h1 = fs::metadata(m.path().join("hard1")).unwrap();
    let h2 = fs::metadata(m.path().join("hard2")).unwrap();
    assert_eq!(h1.ino(), h2.ino());
    assert_eq!(h1.nlink(), 2);
    // stat follows the symlink, lstat does not.
    assert_eq!(fs::metadata(m.path().join("link")).unwrap().size(), 12);
    assert!(fs::symlink_metadata(m.path().join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read(m.path().join("sparse")).unwrap().len() as u64,
        5 * MIB + 3
    );
}

// ---- setattr ----

#[test]
fn chmod_chown_truncate_and_timestamps_apply() {
    let p = Pair::new();
    p.both("create", |r| fs::write(r.join("f"), b"0123456789"));

    p.same("chmod", |r| {
        fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o4751))?;
        lshape(&r.join("f"))
    })
    .unwrap();
    assert_eq!(
        lshape(&p.mount.backing().join("f")).unwrap().perm,
        0o4751,
        "backing mode"
    );

    p.same("chown", |r| {
        std::os::unix::fs::chown(r.join("f"), Some(1234), Some(1234))?;
        lshape(&r.join("f"))
    })
    .unwrap();
    let b = fs::metadata(p.mount.backing().join("f")).unwrap();
    assert_eq!((b.uid(), b.gid()), (1234, 1234), "backing owner");

    p.expect(
        "truncate up by path",
        Ok(b"0123456789\0\0\0\0\0".to_vec()),
        |r| {
            truncate_path(&r.join("f"), 15)?;
            fs::read(r.join("f"))
        },
    );
    p.expect("truncate down by fd", Ok(b"0123".to_vec()), |r| {
        OpenOptions::new()
            .write(true)
            .open(r.join("f"))?
            .set_len(4)?;
        fs::read(r.join("f"))
    });
    p.expect("truncate up by fd", Ok(3 * MIB), |r| {
        OpenOptions::new()
            .write(true)
            .open(r.join("f"))?
            .set_len(3 * MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });
    assert_eq!(
        fs::metadata(p.mount.backing().join("f")).unwrap().size(),
        3 * MIB
    );
    p.expect("truncate to zero", Ok(0), |r| {
        truncate_path(&r.join("f"), 0)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });

    let fixed = |r: &Path| utimens(&r.join("f"), ts(1_000_000), ts(2_000_000));
    let times = |r: &Path| -> io::Result<(i64, i64)> {
        let m = fs::metadata(r.join("f"))?;
        Ok((m.atime(), m.mtime()))
    };
    p.expect("explicit times", Ok((1_000_000, 2_000_000)), |r| {
        fixed(r)?;
        times(r)
    });
    assert_eq!(
        times(p.mount.backing()).unwrap(),
        (1_000_000, 2_000_000),
        "backing times"
    );

    let before = secs_since_epoch(SystemTime::now());
    for root in [p.mnt(), p.plain(), p.mount.backing()] {
        if root != p.mount.backing() {
            utimens(
                &root.join("f"),
                ts_special(libc::UTIME_NOW),
                ts_special(libc::UTIME_NOW),
            )
            .unwrap();
        }
        let (a, m) = times(root).unwrap();
        let after = secs_since_epoch(SystemTime::now());
        assert!(
            (before..=after).contains(&a) && (before..=after).contains(&m),
            "UTIME_NOW in {}: atime {a} mtime {m} not in {before}..={after}",
            root.display()
        );
    }

    // UTIME_OMIT on atime: mtime moves to now, atime stays.
    let before = secs_since_epoch(SystemTime::now());
    p.both("fixed times", fixed);
    p.both("omit atime", |r| {
        utimens(
            &r.join("f"),
            ts_special(libc::UTIME_OMIT),
            ts_special(libc::UTIME_NOW),
        )
    });
    for root in [p.mnt(), p.plain(), p.mount.backing()] {
        let (a, m) = times(root).unwrap();
        assert_eq!(a, 1_000_000, "atime with UTIME_OMIT in {}", root.display());
        assert!(
            m >= before,
            "mtime with UTIME_NOW in {}: {m} < {before}",
            root.display()
        );
    }

    // UTIME_OMIT on mtime: atime set, mtime untouched.
    p.both("fixed times", fixed);
    p.expect("omit mtime", Ok((3_000_000, 2_000_000)), |r| {
        utimens(&r.join("f"), ts(3_000_000), ts_special(libc::UTIME_OMIT))?;
        times(r)
    });
    assert_eq!(times(p.mount.backing()).unwrap(), (3_000_000, 2_000_000));

    // Both omitted: nothing changes.
    p.expect("omit both", Ok((3_000_000, 2_000_000)), |r| {
        utimens(
            &r.join("f"),
            ts_special(libc::UTIME_OMIT),
            ts_special(libc::UTIME_OMIT),
        )?;
        times(r)
    });

    // On a symlink, lchown and utimensat(AT_SYMLINK_NOFOLLOW) change the link, not the target.
    p.both("symlink", |r| std::os::unix::fs::symlink("f", r.join("sl")));
    p.expect("lchown a symlink", Ok(((4321, 4321), (1234, 1234))), |r| {
        std::os::unix::fs::lchown(r.join("sl"), Some(4321), Some(4321))?;
        let (l, t) = (
            fs::symlink_metadata(r.join("sl"))?,
            fs::metadata(r.join("f"))?,
        );
        Ok(((l.uid(), l.gid()), (t.uid(), t.gid())))
    });
    p.expect(
        "utimensat on a symlink itself",
        Ok(((5_000_000, 6_000_000), (3_000_000, 2_000_000))),
        |r| {
            let c = cpath(&r.join("sl"));
            let new = [ts(5_000_000), ts(6_000_000)];
            cvt(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    new.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
            let l = fs::symlink_metadata(r.join("sl"))?;
            Ok(((l.atime(), l.mtime()), times(r)?))
        },
    );
    let l = fs::symlink_metadata(p.mount.backing().join("sl")).unwrap();
    assert_eq!((l.uid(), l.mtime()), (4321, 6_000_000), "backing symlink");
}

// ---- namespace ----

#[test]
fn statfs_reports_the_backing_filesystem() {
    let m = Mount::new();
    let on_mount = statfs(m.path());
    let on_backing = statfs(m.backing());
    assert_eq!(on_mount.f_bsize, on_backing.f_bsize, "f_bsize");
    assert_eq!(on_mount.f_blocks, on_backing.f_blocks, "f_blocks");
    assert_eq!(on_mount.f_files, on_backing.f_files, "f_files");
    assert_eq!(on_mount.f_namelen, on_backing.f_namelen, "f_namelen");
    let free_diff = on_mount.f_bfree.abs_diff(on_backing.f_bfree);
    assert!(
        free_diff < on_backing.f_blocks / 100 + 1024,
        "f_bfree {} vs {}",
        on_mount.f_bfree,
        on_backing.f_bfree
    );
}
