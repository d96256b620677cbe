//! POSIX behaviour through a real mount, checked against the same operations on a plain dir.
//!
//! Each test runs an operation family through the mount and, where it makes sense, on a plain
//! temp dir (the reference), and compares what a user would see: content, size, mode, owner and
//! errno. Tests that need a non-root caller fork a child that drops to uid/gid 65534; they need
//! root, as the daemon does in CI.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, DirEntryExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::Mount;

const NOBODY: u32 = 65534;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

// ---- comparing the mount with a plain dir ----

/// What a user sees of an operation: its value, or the errno it failed with.
type Outcome<T> = Result<T, i32>;

fn outcome<T>(r: io::Result<T>) -> Outcome<T> {
    r.map_err(|e| {
        e.raw_os_error()
            .unwrap_or_else(|| panic!("error without an errno: {e}"))
    })
}

/// A live mount and a plain dir to run the same operations on.
struct Pair {
    mount: Mount,
    plain: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            mount: Mount::new(),
            plain: common::plain_dir(),
        }
    }

    fn mnt(&self) -> &Path {
        self.mount.path()
    }

    fn plain(&self) -> &Path {
        self.plain.path()
    }

    /// Run `op` under the mount and under the plain dir; both must have the same outcome.
    fn same<T: PartialEq + Debug>(
        &self,
        what: &str,
        op: impl Fn(&Path) -> io::Result<T>,
    ) -> Outcome<T> {
        let on_mount = outcome(op(self.mnt()));
        let on_plain = outcome(op(self.plain()));
        assert_eq!(
            on_mount,
            on_plain,
            "{what}: mount (left) differs from plain dir (right); errno names: {} vs {}",
            errno_name(&on_mount),
            errno_name(&on_plain)
        );
        on_mount
    }

    /// Like `same`, and the outcome must be `want`.
    fn expect<T: PartialEq + Debug>(
        &self,
        what: &str,
        want: Outcome<T>,
        op: impl Fn(&Path) -> io::Result<T>,
    ) {
        let got = self.same(what, op);
        assert_eq!(
            got, want,
            "{what}: mount and plain dir agree, but not as expected"
        );
    }

    /// Run a setup step on both sides; it must succeed.
    fn both(&self, what: &str, op: impl Fn(&Path) -> io::Result<()>) {
        for root in [self.mnt(), self.plain()] {
            op(root).unwrap_or_else(|e| panic!("{what} in {}: {e}", root.display()));
        }
    }
}

fn errno_name<T>(o: &Outcome<T>) -> String {
    match o {
        Ok(_) => "ok".into(),
        Err(e) => io::Error::from_raw_os_error(*e).to_string(),
    }
}

/// The parts of an inode's attributes that must match between mount, backing and plain dir.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Shape {
    kind: &'static str,
    perm: u32,
    /// Directory sizes depend on the history of the directory, not on the overlay: left out.
    size: u64,
    nlink: u64,
    uid: u32,
    gid: u32,
}

fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "chardev"
    } else if t.is_block_device() {
        "blockdev"
    } else {
        "file"
    }
}

fn shape(m: &fs::Metadata) -> Shape {
    Shape {
        kind: kind_of(m.file_type()),
        perm: m.mode() & 0o7777,
        size: if m.is_dir() { 0 } else { m.size() },
        nlink: m.nlink(),
        uid: m.uid(),
        gid: m.gid(),
    }
}

fn lshape(p: &Path) -> io::Result<Shape> {
    fs::symlink_metadata(p).map(|m| shape(&m))
}

// ---- thin libc wrappers that keep the errno ----

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: isize) -> io::Result<usize> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    cvt(r as libc::c_int).map(drop)
}

fn mkfifo(p: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode) }).map(drop)
}

fn truncate_path(p: &Path, len: u64) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) }).map(drop)
}

fn access(p: &Path, mask: libc::c_int) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::access(c.as_ptr(), mask) }).map(drop)
}

fn ts(sec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: 0,
    }
}

fn ts_special(nsec: libc::c_long) -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: nsec,
    }
}

fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let c = cpath(p);
    let times = [atime, mtime];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

fn statfs(p: &Path) -> libc::statfs {
    let c = cpath(p);
    let mut s = std::mem::MaybeUninit::<libc::statfs>::uninit();
    cvt(unsafe { libc::statfs(c.as_ptr(), s.as_mut_ptr()) }).expect("statfs");
    unsafe { s.assume_init() }
}

fn fstat(f: &File) -> libc::stat {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe { libc::fstat(f.as_raw_fd(), st.as_mut_ptr()) }).expect("fstat");
    unsafe { st.assume_init() }
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("name"));
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), CString::new(name).expect("name"));
    let size =
        cvt_size(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; size];
    let got = cvt_size(unsafe {
        libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(got);
    Ok(buf)
}

/// The `user.` names of a file's xattrs, sorted (security labels differ between filesystems).
fn list_user_xattrs(p: &Path) -> io::Result<Vec<String>> {
    let c = cpath(p);
    let size = cvt_size(unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; size];
    let got = cvt_size(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(got);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("name"));
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

/// Sorted (name, kind) of a directory's entries.
fn listing(dir: &Path) -> io::Result<Vec<(String, &'static str)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            kind_of(e.file_type()?),
        ));
    }
    out.sort();
    Ok(out)
}

fn secs_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .expect("time after epoch")
        .as_secs() as i64
}

/// Deterministic content that differs at every 8-byte word and per `tag`.
fn pattern(tag: u8, offset: u64, len: usize) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    assert_eq!(len % 8, 0);
    let mut out = Vec::with_capacity(len);
    for w in 0..(len as u64 / 8) {
        let o = offset + w * 8;
        out.extend_from_slice(&(o ^ ((tag as u64) << 56) ^ 0x5a5a_0000_0000_0000).to_le_bytes());
    }
    out
}

/// xorshift64: a fixed-seed generator, so a failure replays exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ---- running as another user ----

/// Let uid 65534 reach the mount point: the fixture's temp dir is created 0700.
fn open_to_others(m: &Mount) {
    let root = m.path().parent().expect("mount has a parent");
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod temp root");
}

/// Run `op` in a forked child as uid/gid 65534 with no supplementary groups; returns the errno
/// of its failure (`op` returns -1 and leaves errno set), or 0. The child of a multithreaded
/// process may only make raw system calls, so `op` must not allocate: prepare C strings first.
fn as_nobody(op: impl FnOnce() -> libc::c_int) -> i32 {
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                255
            } else if op() == -1 {
                *libc::__errno_location()
            } else {
                0
            };
            libc::_exit(code);
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) == -1 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EINTR), "waitpid: {e}");
        }
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 255, "child could not drop to uid/gid {NOBODY}");
        code
    }
}

/// open(2) + read(2) of `path` as uid 65534: 0 if it could read, else the errno.
fn read_as_nobody(path: &Path) -> i32 {
    let c = cpath(path);
    as_nobody(|| unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return -1;
        }
        let mut buf = [0u8; 64];
        if libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) < 0 {
            return -1;
        }
        0
    })
}

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

// ---- open, create, read, write, sync ----

#[test]
fn open_flags_behave_like_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| fs::write(r.join("f"), b"hello"));
    p.expect("O_EXCL on existing", Err(libc::EEXIST), |r| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(r.join("f"))
            .map(drop)
    });
    p.expect("O_EXCL on new", Ok(0), |r| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(r.join("new"))?;
        Ok(f.metadata()?.size())
    });
    p.same("mode of new file", |r| lshape(&r.join("new")))
        .unwrap();
    p.expect("O_TRUNC empties", Ok(Vec::new()), |r| {
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(r.join("f"))?;
        fs::read(r.join("f"))
    });
    p.expect(
        "O_CREAT without O_EXCL keeps content",
        Ok(b"abc".to_vec()),
        |r| {
            fs::write(r.join("g"), b"abc")?;
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(r.join("g"))?;
            fs::read(r.join("g"))
        },
    );

    // O_APPEND writes at the end even after another descriptor extended the file.
    p.expect("O_APPEND", Ok(b"0123ABBBBC".to_vec()), |r| {
        fs::write(r.join("log"), b"0123")?;
        let mut appender = OpenOptions::new().append(true).open(r.join("log"))?;
        appender.write_all(b"A")?;
        let other = OpenOptions::new().write(true).open(r.join("log"))?;
        other.write_all_at(b"BBBB", 5)?;
        appender.write_all(b"C")?;
        drop((appender, other));
        fs::read(r.join("log"))
    });
    assert_eq!(
        fs::read(p.mount.backing().join("log")).unwrap(),
        b"0123ABBBBC"
    );

    p.expect("O_RDONLY refuses writes", Err(libc::EBADF), |r| {
        File::open(r.join("g"))?.write_all(b"x")
    });
    p.expect("O_WRONLY refuses reads", Err(libc::EBADF), |r| {
        let mut s = String::new();
        OpenOptions::new()
            .write(true)
            .open(r.join("g"))?
            .read_to_string(&mut s)
            .map(drop)
    });
}

#[test]
fn reads_and_writes_at_offsets_match_plain_dir() {
    let p = Pair::new();
    p.expect(
        "pwrite past end leaves zeros",
        Ok(b"hello\0\0\0\0\0xyz".to_vec()),
        |r| {
            fs::write(r.join("f"), b"hello")?;
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            f.write_all_at(b"xyz", 10)?;
            fs::read(r.join("f"))
        },
    );
    p.expect("pread in the middle", Ok(b"o\0\0\0\0\0x".to_vec()), |r| {
        let mut buf = [0u8; 7];
        File::open(r.join("f"))?.read_exact_at(&mut buf, 4)?;
        Ok(buf.to_vec())
    });
    p.expect("short read at end", Ok(b"yz".to_vec()), |r| {
        let mut buf = [0u8; 64];
        let n = File::open(r.join("f"))?.read_at(&mut buf, 11)?;
        Ok(buf[..n].to_vec())
    });
    p.expect("read past end", Ok(0), |r| {
        let mut buf = [0u8; 64];
        File::open(r.join("f"))?.read_at(&mut buf, 1000)
    });
    p.expect(
        "seek + write + read",
        Ok(b"heLLo\0\0\0\0\0xyz!".to_vec()),
        |r| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("f"))?;
            f.seek(SeekFrom::Start(2))?;
            f.write_all(b"LL")?;
            f.seek(SeekFrom::End(0))?;
            f.write_all(b"!")?;
            f.seek(SeekFrom::Start(0))?;
            let mut out = Vec::new();
            f.read_to_end(&mut out)?;
            Ok(out)
        },
    );
    // Larger than one FUSE request, unaligned.
    let big = pattern(7, 0, 3 * MIB as usize + 8 * 1001);
    p.expect("big unaligned pwrite", Ok(true), |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(r.join("big"))?;
        f.write_all_at(&big, 12345)?;
        let mut back = vec![0u8; big.len()];
        f.read_exact_at(&mut back, 12345)?;
        Ok(back == big && f.metadata()?.size() == 12345 + big.len() as u64)
    });
    assert_eq!(
        common::blake3_file(&p.mnt().join("big")),
        common::blake3_file(&p.plain().join("big"))
    );
    assert_eq!(
        common::blake3_file(&p.mount.backing().join("big")),
        common::blake3_file(&p.plain().join("big"))
    );

    // O_DIRECT opens work (qemu cache=none depends on it) and reach the backing file.
    #[repr(C, align(4096))]
    struct Aligned([u8; 8192]);
    let mut out = Box::new(Aligned([0; 8192]));
    out.0.copy_from_slice(&pattern(9, 0, 8192));
    p.expect(
        "O_DIRECT aligned pwrite and pread",
        Ok((true, 12288)),
        |r| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(r.join("direct"))?;
            f.write_all_at(&out.0, 4096)?;
            let mut back = Box::new(Aligned([0; 8192]));
            f.read_exact_at(&mut back.0, 4096)?;
            Ok((back.0 == out.0, f.metadata()?.size()))
        },
    );
    assert_eq!(
        &fs::read(p.mount.backing().join("direct")).unwrap()[4096..],
        &out.0[..]
    );
}

#[test]
fn mmap_shared_writes_reach_the_file() {
    let p = Pair::new();
    let len = 256 * KIB as usize;
    let data = pattern(11, 0, len);
    p.expect(
        "write through MAP_SHARED, read with read(2)",
        Ok(true),
        |r| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(r.join("m"))?;
            f.set_len(len as u64)?;
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), map.cast::<u8>(), len);
                let synced = cvt(libc::msync(map, len, libc::MS_SYNC));
                libc::munmap(map, len);
                synced?;
            }
            drop(f);
            Ok(fs::read(r.join("m"))? == data)
        },
    );
    assert!(
        fs::read(p.mount.backing().join("m")).unwrap() == data,
        "backing"
    );
    p.expect("read through a private map", Ok(true), |r| {
        let f = File::open(r.join("m"))?;
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let same = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) } == &data[..];
        unsafe { libc::munmap(map, len) };
        Ok(same)
    });
}

#[test]
fn file_changed_in_backing_shows_through_the_mount_on_reopen() {
    let m = Mount::with_setup(|b| fs::write(b.join("v"), b"aaaa").unwrap(), None);
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"aaaa");
    // Same size, new content and mtime: the kernel's page cache must not serve the old bytes.
    fs::write(m.backing().join("v"), b"bbbb").unwrap();
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"bbbb");
    // Unchanged: still right when the cache is kept.
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"bbbb");
}

#[test]
fn close_fsync_fdatasync_and_dir_fsync_succeed() {
    let p = Pair::new();
    p.expect("fsync, fdatasync, close", Ok(0), |r| {
        let mut f = File::create(r.join("f"))?;
        f.write_all(b"data")?;
        f.flush()?;
        f.sync_data()?;
        f.sync_all()?;
        // close(2) is where FUSE flush reports errors: check its return value.
        cvt(unsafe { libc::close(f.into_raw_fd()) })
    });
    p.expect("fsync on a directory fd", Ok(()), |r| {
        fs::create_dir(r.join("d"))?;
        File::open(r.join("d"))?.sync_all()?;
        File::open(r)?.sync_all()?;
        File::open(r.join("d"))?.sync_data()
    });
    p.expect("fsync on an O_RDONLY fd", Ok(()), |r| {
        File::open(r.join("f"))?.sync_all()
    });
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

#[test]
fn hard_links_are_one_inode_through_the_mount() {
    let p = Pair::new();
    p.expect("link", Ok((2, 2)), |r| {
        fs::write(r.join("one"), b"first")?;
        fs::hard_link(r.join("one"), r.join("two"))?;
        Ok((
            fs::metadata(r.join("one"))?.nlink(),
            fs::metadata(r.join("two"))?.nlink(),
        ))
    });
    let one = fs::metadata(p.mnt().join("one")).unwrap();
    let two = fs::metadata(p.mnt().join("two")).unwrap();
    assert_eq!(one.ino(), two.ino(), "same inode number through the mount");
    assert_eq!(
        fs::metadata(p.mount.backing().join("one")).unwrap().nlink(),
        2
    );
    p.expect(
        "write through one name, read through the other",
        Ok(b"fiXXt".to_vec()),
        |r| {
            OpenOptions::new()
                .write(true)
                .open(r.join("two"))?
                .write_all_at(b"XX", 2)?;
            fs::read(r.join("one"))
        },
    );
    p.expect(
        "chmod through one name shows on the other",
        Ok(0o600),
        |r| {
            fs::set_permissions(r.join("one"), fs::Permissions::from_mode(0o600))?;
            Ok(fs::metadata(r.join("two"))?.mode() & 0o7777)
        },
    );
    p.expect("link in a subdir", Ok(3), |r| {
        fs::create_dir(r.join("sub"))?;
        fs::hard_link(r.join("two"), r.join("sub/three"))?;
        Ok(fs::metadata(r.join("one"))?.nlink())
    });
    p.expect("unlink one name", Ok((2, b"fiXXt".to_vec())), |r| {
        fs::remove_file(r.join("one"))?;
        Ok((
            fs::metadata(r.join("two"))?.nlink(),
            fs::read(r.join("sub/three"))?,
        ))
    });
    p.expect("link onto existing name", Err(libc::EEXIST), |r| {
        fs::hard_link(r.join("two"), r.join("sub/three"))
    });
}

#[test]
fn symlinks_and_fifos_match_plain_dir() {
    let p = Pair::new();
    p.expect(
        "symlink + readlink",
        Ok(PathBuf::from("some/where/../target")),
        |r| {
            std::os::unix::fs::symlink("some/where/../target", r.join("rel"))?;
            fs::read_link(r.join("rel"))
        },
    );
    p.same("symlink attributes", |r| lshape(&r.join("rel")))
        .unwrap();
    p.expect(
        "symlink to absolute path",
        Ok(PathBuf::from("/etc/hostname")),
        |r| {
            std::os::unix::fs::symlink("/etc/hostname", r.join("abs"))?;
            fs::read_link(r.join("abs"))
        },
    );
    p.expect("follow relative symlink", Ok(b"via link".to_vec()), |r| {
        fs::write(r.join("real"), b"via link")?;
        std::os::unix::fs::symlink("real", r.join("to-real"))?;
        fs::read(r.join("to-real"))
    });
    p.expect("write through symlink", Ok(b"changed".to_vec()), |r| {
        fs::write(r.join("to-real"), b"changed")?;
        fs::read(r.join("real"))
    });
    p.expect("dangling symlink", Err(libc::ENOENT), |r| {
        std::os::unix::fs::symlink("missing", r.join("dangle"))?;
        fs::read(r.join("dangle"))
    });
    let long_target = "x".repeat(4000);
    p.expect("long target", Ok(PathBuf::from(&long_target)), |r| {
        std::os::unix::fs::symlink(&long_target, r.join("long"))?;
        fs::read_link(r.join("long"))
    });
    p.expect("mkfifo", Ok(()), |r| mkfifo(&r.join("fifo"), 0o640));
    p.same("fifo attributes", |r| lshape(&r.join("fifo")))
        .unwrap();
    assert_eq!(lshape(&p.mnt().join("fifo")).unwrap().kind, "fifo");
    assert_eq!(
        lshape(&p.mount.backing().join("fifo")).unwrap().kind,
        "fifo"
    );
    // The fifo is the kernel's: a reader and a writer through the mount meet.
    let fifo = p.mnt().join("fifo");
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || fs::write(fifo, b"through the pipe")
    });
    let got = fs::read(&fifo).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(got, b"through the pipe");
}

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

#[test]
fn access_checks_match_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| {
        fs::write(r.join("rw"), b"x")?;
        fs::write(r.join("none"), b"x")?;
        fs::set_permissions(r.join("none"), fs::Permissions::from_mode(0o000))?;
        fs::write(r.join("exec"), b"x")?;
        fs::set_permissions(r.join("exec"), fs::Permissions::from_mode(0o100))
    });
    for name in ["rw", "none", "exec", "missing", "."] {
        for (mask, label) in [
            (libc::F_OK, "F_OK"),
            (libc::R_OK, "R_OK"),
            (libc::W_OK, "W_OK"),
            (libc::X_OK, "X_OK"),
            (libc::R_OK | libc::W_OK, "R_OK|W_OK"),
        ] {
            let _ = p.same(&format!("access({name}, {label}) as root"), |r| {
                access(&r.join(name), mask)
            });
        }
    }
    p.expect("root may read a 0000 file", Ok(()), |r| {
        access(&r.join("none"), libc::R_OK)
    });
    p.expect(
        "root may not exec a file without x",
        Err(libc::EACCES),
        |r| access(&r.join("rw"), libc::X_OK),
    );

    // As another user, against the mode bits.
    open_to_others(&p.mount);
    fs::set_permissions(p.plain(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mask, want) in [
        ("rw", libc::F_OK, 0),
        ("rw", libc::R_OK, 0),
        ("rw", libc::W_OK, libc::EACCES),
        ("none", libc::R_OK, libc::EACCES),
        ("missing", libc::F_OK, libc::ENOENT),
    ] {
        for root in [p.mnt(), p.plain()] {
            let c = cpath(&root.join(name));
            let got = as_nobody(|| unsafe { libc::access(c.as_ptr(), mask) });
            assert_eq!(
                got,
                want,
                "access({}, {mask}) as uid {NOBODY}",
                root.join(name).display()
            );
        }
    }
}

// ---- ownership and permissions for non-root callers ----

#[test]
fn new_files_dirs_symlinks_and_fifos_belong_to_the_caller() {
    let p = Pair::new();
    open_to_others(&p.mount);
    p.both("chmod 0777", |r| {
        fs::set_permissions(r, fs::Permissions::from_mode(0o777))
    });
    for root in [p.mnt(), p.plain()] {
        let file = cpath(&root.join("file"));
        let dir = cpath(&root.join("dir"));
        let link = cpath(&root.join("link"));
        let fifo = cpath(&root.join("fifo"));
        let nested = cpath(&root.join("dir/nested"));
        let target = c"file";
        let where_ = root.display();
        assert_eq!(
            as_nobody(|| unsafe {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o644,
                );
                if fd < 0 {
                    return -1;
                }
                if libc::write(fd, b"mine".as_ptr().cast(), 4) != 4 {
                    return -1;
                }
                libc::close(fd)
            }),
            0,
            "create in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkdir(dir.as_ptr(), 0o755) }),
            0,
            "mkdir in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }),
            0,
            "symlink in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }),
            0,
            "mkfifo in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkdir(nested.as_ptr(), 0o700) }),
            0,
            "mkdir in own dir in {where_}"
        );
    }
    for name in ["file", "dir", "link", "fifo", "dir/nested"] {
        for root in [p.mnt(), p.plain(), p.mount.backing()] {
            let md = fs::symlink_metadata(root.join(name)).unwrap();
            assert_eq!(
                (md.uid(), md.gid()),
                (NOBODY, NOBODY),
                "owner of {}",
                root.join(name).display()
            );
        }
        assert_eq!(
            lshape(&p.mnt().join(name)).unwrap(),
            lshape(&p.plain().join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(fs::read(p.mount.backing().join("file")).unwrap(), b"mine");
    // The new owner's rights hold: root's 0700 dir created by 65534 is 65534's to use.
    let inner = cpath(&p.mnt().join("dir/nested/x"));
    assert_eq!(
        as_nobody(|| unsafe { libc::mkdir(inner.as_ptr(), 0o700) }),
        0
    );
}

#[test]

fn setuid_and_setgid_bits_asked_for_at_create_are_kept_for_a_non_root_caller() {
    let p = Pair::new();
    open_to_others(&p.mount);
    p.both("chmod 0777", |r| {
        fs::set_permissions(r, fs::Permissions::from_mode(0o777))
    });
    for root in [p.mnt(), p.plain()] {
        let file = cpath(&root.join("tool"));
        assert_eq!(
            as_nobody(|| unsafe {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o6755,
                );
                if fd < 0 {
                    return -1;
                }
                libc::close(fd)
            }),
            0,
            "create in {}",
            root.display()
        );
    }
    let want = lshape(&p.plain().join("tool")).unwrap();
    assert_eq!(want.perm, 0o6755, "plain dir keeps both bits");
    assert_eq!(
        lshape(&p.mnt().join("tool")).unwrap(),
        want,
        "mode and owner through the mount"
    );
}

#[test]
fn root_only_file_is_unreadable_by_others() {
    let p = Pair::new();
    open_to_others(&p.mount);
    fs::set_permissions(p.plain(), fs::Permissions::from_mode(0o755)).unwrap();
    p.both("create secret", |r| {
        fs::write(r.join("secret"), b"root only")?;
        fs::set_permissions(r.join("secret"), fs::Permissions::from_mode(0o600))?;
        fs::write(r.join("public"), b"anyone")?;
        fs::set_permissions(r.join("public"), fs::Permissions::from_mode(0o644))?;
        fs::create_dir(r.join("private"))?;
        fs::set_permissions(r.join("private"), fs::Permissions::from_mode(0o700))?;
        fs::write(r.join("private/inner"), b"x")?;
        fs::set_permissions(r.join("private/inner"), fs::Permissions::from_mode(0o644))
    });
    for root in [p.mnt(), p.plain()] {
        let w = root.display();
        assert_eq!(read_as_nobody(&root.join("secret")), libc::EACCES, "{w}");
        assert_eq!(read_as_nobody(&root.join("public")), 0, "{w}");
        assert_eq!(
            read_as_nobody(&root.join("private/inner")),
            libc::EACCES,
            "search permission on private dir in {w}"
        );
        let public = cpath(&root.join("public"));
        assert_eq!(
            as_nobody(|| unsafe { libc::open(public.as_ptr(), libc::O_WRONLY) }),
            libc::EACCES,
            "write open of a 0644 root file in {w}"
        );
        let newfile = cpath(&root.join("new"));
        assert_eq!(
            as_nobody(|| unsafe {
                libc::open(newfile.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644)
            }),
            libc::EACCES,
            "create in a 0755 root dir in {w}"
        );
        let secret = cpath(&root.join("secret"));
        assert_eq!(
            as_nobody(|| unsafe { libc::chmod(secret.as_ptr(), 0o666) }),
            libc::EPERM,
            "chmod of another's file in {w}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::unlink(public.as_ptr()) }),
            libc::EACCES,
            "unlink in a 0755 root dir in {w}"
        );
    }
    assert_eq!(fs::read(p.mnt().join("secret")).unwrap(), b"root only");
}

// ---- xattrs ----

#[test]
fn user_xattrs_round_trip_like_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| {
        fs::write(r.join("f"), b"x")?;
        fs::create_dir(r.join("d"))
    });
    if let Err(e) = setxattr(&p.plain().join("f"), "user.probe", b"1", 0) {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            eprintln!(
                "SKIP: no user xattrs on the filesystem of {}",
                p.plain().display()
            );
            return;
        }
        panic!("setxattr probe: {e}");
    }
    removexattr(&p.plain().join("f"), "user.probe").unwrap();
    for name in ["f", "d"] {
        p.expect(&format!("set on {name}"), Ok(()), |r| {
            setxattr(&r.join(name), "user.test", b"value one", 0)
        });
        p.expect(&format!("get on {name}"), Ok(b"value one".to_vec()), |r| {
            getxattr(&r.join(name), "user.test")
        });
        assert_eq!(
            getxattr(&p.mount.backing().join(name), "user.test").unwrap(),
            b"value one"
        );
        p.expect(
            &format!("XATTR_CREATE on existing {name}"),
            Err(libc::EEXIST),
            |r| setxattr(&r.join(name), "user.test", b"v", libc::XATTR_CREATE),
        );
        p.expect(
            &format!("XATTR_REPLACE on missing {name}"),
            Err(libc::ENODATA),
            |r| setxattr(&r.join(name), "user.other", b"v", libc::XATTR_REPLACE),
        );
        p.expect(&format!("replace on {name}"), Ok(b"2".to_vec()), |r| {
            setxattr(&r.join(name), "user.test", b"2", libc::XATTR_REPLACE)?;
            getxattr(&r.join(name), "user.test")
        });
        p.expect(&format!("empty value on {name}"), Ok(Vec::new()), |r| {
            setxattr(&r.join(name), "user.empty", b"", 0)?;
            getxattr(&r.join(name), "user.empty")
        });
        p.expect(
            &format!("list on {name}"),
            Ok(vec!["user.empty".to_string(), "user.test".to_string()]),
            |r| list_user_xattrs(&r.join(name)),
        );
        p.expect(
            &format!("remove on {name}"),
            Ok(vec!["user.empty".to_string()]),
            |r| {
                removexattr(&r.join(name), "user.test")?;
                list_user_xattrs(&r.join(name))
            },
        );
        p.expect(&format!("get removed on {name}"), Err(libc::ENODATA), |r| {
            getxattr(&r.join(name), "user.test")
        });
        p.expect(
            &format!("remove missing on {name}"),
            Err(libc::ENODATA),
            |r| removexattr(&r.join(name), "user.test"),
        );
    }
    let big = vec![b'v'; 3000];
    p.expect("3000-byte value", Ok(big.clone()), |r| {
        setxattr(&r.join("f"), "user.big", &big, 0)?;
        getxattr(&r.join("f"), "user.big")
    });
    p.expect("get on missing file", Err(libc::ENOENT), |r| {
        getxattr(&r.join("missing"), "user.test")
    });
}

// ---- fallocate, lseek, copy_file_range ----

#[test]
fn fallocate_preallocates_punches_and_zeroes_like_plain_dir() {
    let p = Pair::new();
    let open = |r: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("f"))
    };
    p.expect("preallocate grows size", Ok(MIB), |r| {
        fallocate(&open(r)?, 0, 0, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });
    let blocks = fs::metadata(p.mnt().join("f")).unwrap().blocks();
    assert!(blocks * 512 >= MIB, "preallocated st_blocks {blocks}");
    assert_eq!(
        fs::metadata(p.mount.backing().join("f")).unwrap().size(),
        MIB
    );
    p.expect("preallocation reads as zeros", Ok(true), |r| {
        Ok(fs::read(r.join("f"))?.iter().all(|b| *b == 0))
    });
    p.expect("KEEP_SIZE does not grow size", Ok(MIB), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });

    p.both("fill", |r| {
        let f = open(r)?;
        f.set_len(MIB)?;
        f.write_all_at(&vec![0xaa; MIB as usize], 0)?;
        f.sync_all()
    });
    let full_blocks = fs::metadata(p.mnt().join("f")).unwrap().blocks();
    let mut want = vec![0xaa; MIB as usize];
    want[256 * KIB as usize..768 * KIB as usize].fill(0);
    p.expect(
        "punch hole zeroes the range and keeps size",
        Ok((true, MIB)),
        |r| {
            let f = open(r)?;
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                256 * KIB,
                512 * KIB,
            )?;
            Ok((fs::read(r.join("f"))? == want, f.metadata()?.size()))
        },
    );
    for root in [p.mnt(), p.mount.backing()] {
        let after = fs::metadata(root.join("f")).unwrap().blocks();
        assert!(
            after * 512 <= full_blocks * 512 - 512 * KIB,
            "st_blocks in {} did not drop by the hole: {full_blocks} -> {after}",
            root.display()
        );
    }
    p.expect("punch hole without KEEP_SIZE", Err(libc::EOPNOTSUPP), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)
    });

    want[..4096].fill(0);
    want[900 * KIB as usize..(900 * KIB + 100) as usize].fill(0);
    p.expect("zero range", Ok((true, MIB)), |r| {
        let f = open(r)?;
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 4096)?;
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 900 * KIB, 100)?;
        Ok((fs::read(r.join("f"))? == want, f.metadata()?.size()))
    });
    p.expect("zero range past end grows size", Ok(2 * MIB), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_ZERO_RANGE, MIB, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });
    assert_eq!(
        common::blake3_file(&p.mount.backing().join("f")),
        common::blake3_file(&p.plain().join("f"))
    );
}

#[test]
fn seek_data_and_hole_see_the_backing_holes() {
    let m = Mount::new();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path().join("sparse"))
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], GIB).unwrap();
    f.sync_all().unwrap();
    let size = GIB + 4096;
    assert_eq!(f.metadata().unwrap().size(), size);
    let backing = File::open(m.backing().join("sparse")).unwrap();
    let probes = [
        (0, libc::SEEK_DATA),
        (0, libc::SEEK_HOLE),
        (100, libc::SEEK_DATA),
        (4096, libc::SEEK_DATA),
        (4096, libc::SEEK_HOLE),
        (MIB, libc::SEEK_DATA),
        (GIB - 1, libc::SEEK_HOLE),
        (GIB, libc::SEEK_DATA),
        (GIB, libc::SEEK_HOLE),
        (GIB + 100, libc::SEEK_HOLE),
        (size, libc::SEEK_DATA),
        (size, libc::SEEK_HOLE),
        (size + 1, libc::SEEK_HOLE),
    ];
    for (off, whence) in probes {
        let on_mount = outcome(lseek(&f, off, whence));
        let on_backing = outcome(lseek(&backing, off, whence));
        assert_eq!(
            on_mount,
            on_backing,
            "lseek({off}, {}) mount vs backing",
            if whence == libc::SEEK_DATA {
                "SEEK_DATA"
            } else {
                "SEEK_HOLE"
            }
        );
    }
    // The interesting ones, spelled out.
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0);
    assert!(lseek(&f, 0, libc::SEEK_HOLE).unwrap() < GIB, "hole between");
    assert_eq!(lseek(&f, 4096, libc::SEEK_DATA).unwrap(), GIB);
    assert_eq!(lseek(&f, GIB, libc::SEEK_HOLE).unwrap(), size);
    assert_eq!(outcome(lseek(&f, size, libc::SEEK_DATA)), Err(libc::ENXIO));
    // Ordinary seeks are unaffected.
    assert_eq!(lseek(&f, 0, libc::SEEK_END).unwrap(), size);
}

#[test]
fn copy_file_range_copies_content() {
    let p = Pair::new();
    let data = pattern(3, 0, 5 * MIB as usize + 8 * 13);
    p.both("source", |r| fs::write(r.join("src"), &data));
    let copy = |r: &Path, off_in: u64, off_out: u64, len: u64| -> io::Result<u64> {
        let src = File::open(r.join("src"))?;
        let dst = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("dst"))?;
        let (mut i, mut o) = (off_in as libc::loff_t, off_out as libc::loff_t);
        let mut done = 0;
        while done < len {
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut i,
                    dst.as_raw_fd(),
                    &mut o,
                    (len - done) as usize,
                    0,
                )
            };
            let n = cvt_size(n)? as u64;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    };
    p.expect("whole file", Ok(data.len() as u64), |r| {
        copy(r, 0, 0, data.len() as u64)
    });
    assert_eq!(fs::read(p.mnt().join("dst")).unwrap(), data);
    assert_eq!(fs::read(p.mount.backing().join("dst")).unwrap(), data);
    p.expect("range at offsets", Ok(10000), |r| {
        copy(r, 4096 + 8, 3 * MIB + 1, 10000)
    });
    p.same("content after range copy", |r| {
        Ok(blake3::hash(&fs::read(r.join("dst"))?).to_hex().to_string())
    })
    .unwrap();
    p.expect("past end of source copies nothing", Ok(0), |r| {
        copy(r, data.len() as u64 + 10, 0, 100)
    });
    let dst = fs::read(p.mnt().join("dst")).unwrap();
    assert_eq!(
        &dst[..data.len()],
        &{
            let mut w = data.clone();
            w[3 * MIB as usize + 1..3 * MIB as usize + 10001]
                .copy_from_slice(&data[4104..4104 + 10000]);
            w
        }[..]
    );
}

// ---- open-but-unlinked files ----

#[test]
fn unlinked_file_keeps_working_through_its_fd() {
    let p = Pair::new();
    p.expect(
        "write, read, fstat after unlink",
        Ok((b"helloXY".to_vec(), 0, 7)),
        |r| {
            fs::write(r.join("f"), b"hello")?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("f"))?;
            fs::remove_file(r.join("f"))?;
            if r.join("f").exists() {
                return Ok((b"name still there".to_vec(), 99, 0));
            }
            f.write_all_at(b"XY", 5)?;
            let mut buf = Vec::new();
            (&f).seek(SeekFrom::Start(0))?;
            (&f).read_to_end(&mut buf)?;
            let st = fstat(&f);
            Ok((buf, st.st_nlink, st.st_size as u64))
        },
    );
    p.expect("ftruncate and fsync after unlink", Ok(3), |r| {
        fs::write(r.join("g"), b"abcdef")?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("g"))?;
        fs::remove_file(r.join("g"))?;
        f.set_len(3)?;
        f.sync_all()?;
        Ok(f.metadata()?.size())
    });
    p.expect(
        "a new file under the old name is a different file",
        Ok(b"new".to_vec()),
        |r| {
            fs::write(r.join("h"), b"old")?;
            let old = File::open(r.join("h"))?;
            fs::remove_file(r.join("h"))?;
            fs::write(r.join("h"), b"new")?;
            let mut s = Vec::new();
            (&old).read_to_end(&mut s)?;
            assert_eq!(s, b"old");
            fs::read(r.join("h"))
        },
    );
    let names: Vec<_> = listing(p.mount.backing())
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != ".grainfs")
        .collect();
    assert_eq!(
        names,
        vec![("h".to_string(), "file")],
        "no leftover hidden files in backing"
    );
}

// ---- large sparse volume and concurrency ----

#[test]
fn sparse_1gib_random_writes_read_back_exactly() {
    const BLOCK: u64 = 4096;
    let m = Mount::new();
    let path = m.path().join("volume.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(GIB).unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for _ in 0..200 {
        let off = (rng.next() % (GIB / BLOCK)) * BLOCK;
        let tag = rng.next();
        let data: Vec<u8> = (0..BLOCK / 8)
            .flat_map(|w| (w ^ tag).to_le_bytes())
            .collect();
        f.write_all_at(&data, off).unwrap();
        model.insert(off, data);
    }
    f.sync_all().unwrap();
    drop(f);

    let on_mount = File::open(&path).unwrap();
    let on_backing = File::open(m.backing().join("volume.img")).unwrap();
    assert_eq!(on_mount.metadata().unwrap().size(), GIB);
    let chunk = 4 * MIB;
    let mut got = vec![0u8; chunk as usize];
    let mut raw = vec![0u8; chunk as usize];
    for start in (0..GIB).step_by(chunk as usize) {
        let mut want = vec![0u8; chunk as usize];
        for (off, data) in model.range(start..start + chunk) {
            let at = (off - start) as usize;
            want[at..at + data.len()].copy_from_slice(data);
        }
        on_mount.read_exact_at(&mut got, start).unwrap();
        on_backing.read_exact_at(&mut raw, start).unwrap();
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("mount differs from model at byte {}", start + first as u64);
        }
        assert!(
            raw == want,
            "backing differs from model in chunk at {start}"
        );
    }
    for p in [&path, &m.backing().join("volume.img")] {
        let blocks = fs::metadata(p).unwrap().blocks();
        assert!(
            blocks * 512 <= 2 * 200 * BLOCK + MIB,
            "{} is not sparse: {} bytes allocated",
            p.display(),
            blocks * 512
        );
    }
}

#[test]
fn concurrent_writers_lose_nothing() {
    const FILE_SIZE: u64 = 8 * MIB;
    const CHUNK: usize = 64 * KIB as usize;
    let m = Mount::new();
    let shared = m.path().join("shared");
    File::create(&shared).unwrap().set_len(4 * MIB).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let path = m.path().join(format!("file{t}"));
            s.spawn(move || {
                let mut f = File::create(path).unwrap();
                for off in (0..FILE_SIZE).step_by(CHUNK) {
                    f.write_all(&pattern(t, off, CHUNK)).unwrap();
                }
                f.sync_all().unwrap();
            });
        }
        for t in 0..4u64 {
            let shared = &shared;
            s.spawn(move || {
                let f = OpenOptions::new().write(true).open(shared).unwrap();
                let start = t * MIB;
                // Interleave small writes so the threads' requests really overlap in time.
                for off in (start..start + MIB).step_by(4096) {
                    f.write_all_at(&pattern(100, off, 4096), off).unwrap();
                }
            });
        }
    });
    for t in 0..4u8 {
        for root in [m.path(), m.backing()] {
            let got = fs::read(root.join(format!("file{t}"))).unwrap();
            assert_eq!(
                got.len() as u64,
                FILE_SIZE,
                "file{t} size in {}",
                root.display()
            );
            assert!(
                got == pattern(t, 0, FILE_SIZE as usize),
                "file{t} content in {}",
                root.display()
            );
        }
    }
    for root in [m.path(), m.backing()] {
        let got = fs::read(root.join("shared")).unwrap();
        assert!(
            got == pattern(100, 0, 4 * MIB as usize),
            "shared file content in {}",
            root.display()
        );
    }
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

// ---- symlinks leading out of the backing dir, and `..` ----

#[test]
fn symlink_out_of_backing_is_followed_as_the_caller() {
    let m = Mount::new();
    open_to_others(&m);
    let outside = m.scratch().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(outside.join("secret"), b"root secret").unwrap();
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&outside, m.backing().join("out")).unwrap();

    let link = m.path().join("out");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), outside);
    assert_eq!(
        read_as_nobody(&link.join("secret")),
        libc::EACCES,
        "uid {NOBODY} read the secret through the symlink"
    );
    let listed = cpath(&link);
    assert_eq!(
        as_nobody(|| unsafe {
            let fd = libc::open(listed.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            if fd < 0 {
                return -1;
            }
            libc::close(fd)
        }),
        libc::EACCES,
        "uid {NOBODY} listed the 0700 dir through the symlink"
    );
    if !common::missing("setpriv") {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(link.join("secret"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "cat as nobody succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "secret leaked: {:?}", out.stdout);
    }
    // Root may follow it, as on any filesystem: the kernel resolves the target, not the daemon.
    assert_eq!(fs::read(link.join("secret")).unwrap(), b"root secret");
    // A relative symlink that climbs out works the same way.
    std::os::unix::fs::symlink("../scratch/outside", m.backing().join("rel-out")).unwrap();
    assert_eq!(
        read_as_nobody(&m.path().join("rel-out/secret")),
        libc::EACCES
    );
    assert_eq!(
        fs::canonicalize(m.path().join("rel-out")).unwrap(),
        m.path().parent().unwrap().join("scratch/outside")
    );
}

#[test]
fn dotdot_is_resolved_by_the_kernel_not_the_daemon() {
    let m = Mount::with_setup(
        |b| {
            fs::create_dir_all(b.join("sub/deeper")).unwrap();
        },
        None,
    );
    let temp_root = m.path().parent().unwrap().to_path_buf();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&m.path().join("..")), ino(&temp_root), "<mnt>/..");
    assert_eq!(
        ino(&m.path().join("sub/../..")),
        ino(&temp_root),
        "<mnt>/sub/../.."
    );
    assert_eq!(
        ino(&m.path().join("sub/deeper/../../..")),
        ino(&temp_root),
        "<mnt>/sub/deeper/../../.."
    );
    assert_eq!(ino(&m.path().join("sub/..")), ino(m.path()), "<mnt>/sub/..");
    assert_eq!(
        fs::canonicalize(m.path().join("sub/../..")).unwrap(),
        temp_root
    );
    // `..` of the mount is the temp dir, which holds the backing dir: never the backing's parent
    // seen as if it were inside the mount.
    let above: Vec<_> = listing(&m.path().join("sub/../.."))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(above.contains(&"mnt".to_string()), "{above:?}");
    assert!(above.contains(&"backing".to_string()), "{above:?}");
}

// ---- errors ----

#[test]
fn errors_are_the_backing_filesystems() {
    let p = Pair::new();
    p.both("populate", |r| {
        fs::write(r.join("f"), b"file")?;
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("d/x"), b"x")?;
        fs::create_dir(r.join("e"))?;
        std::os::unix::fs::symlink("f", r.join("l"))?;
        Ok(())
    });
    let long_name = "n".repeat(256);
    let fails = |what: &str, errno: i32, op: &dyn Fn(&Path) -> io::Result<()>| {
        p.expect(what, Err(errno), op)
    };
    fails("open missing", libc::ENOENT, &|r| {
        File::open(r.join("missing")).map(drop)
    });
    fails("create in missing dir", libc::ENOENT, &|r| {
        File::create(r.join("no/f")).map(drop)
    });
    fails("path through a file", libc::ENOTDIR, &|r| {
        File::open(r.join("f/x")).map(drop)
    });
    fails("rmdir a file", libc::ENOTDIR, &|r| {
        fs::remove_dir(r.join("f"))
    });
    fails("rmdir non-empty", libc::ENOTEMPTY, &|r| {
        fs::remove_dir(r.join("d"))
    });
    fails("rmdir missing", libc::ENOENT, &|r| {
        fs::remove_dir(r.join("missing"))
    });
    fails("rmdir dot", libc::EINVAL, &|r| {
        fs::remove_dir(r.join("e/."))
    });
    fails("unlink a dir", libc::EISDIR, &|r| {
        fs::remove_file(r.join("e"))
    });
    fails("unlink missing", libc::ENOENT, &|r| {
        fs::remove_file(r.join("missing"))
    });
    fails("mkdir existing file", libc::EEXIST, &|r| {
        fs::create_dir(r.join("f"))
    });
    fails("mkdir over symlink", libc::EEXIST, &|r| {
        fs::create_dir(r.join("l"))
    });
    fails("mkfifo existing", libc::EEXIST, &|r| {
        mkfifo(&r.join("f"), 0o644)
    });
    fails("symlink existing", libc::EEXIST, &|r| {
        std::os::unix::fs::symlink("x", r.join("d"))
    });
    fails("link a dir", libc::EPERM, &|r| {
        fs::hard_link(r.join("e"), r.join("e2"))
    });
    fails("link missing", libc::ENOENT, &|r| {
        fs::hard_link(r.join("missing"), r.join("m2"))
    });
    fails("open dir for writing", libc::EISDIR, &|r| {
        OpenOptions::new().write(true).open(r.join("e")).map(drop)
    });
    fails("read a dir", libc::EISDIR, &|r| {
        File::open(r.join("e"))?
            .read_to_end(&mut Vec::new())
            .map(drop)
    });
    fails("O_DIRECTORY on a file", libc::ENOTDIR, &|r| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(r.join("f"))
            .map(drop)
    });
    fails("O_NOFOLLOW on a symlink", libc::ELOOP, &|r| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(r.join("l"))
            .map(drop)
    });
    fails("readlink a file", libc::EINVAL, &|r| {
        fs::read_link(r.join("f")).map(drop)
    });
    fails("truncate a dir", libc::EISDIR, &|r| {
        truncate_path(&r.join("e"), 0)
    });
    fails("truncate negative", libc::EINVAL, &|r| {
        let c = cpath(&r.join("f"));
        cvt(unsafe { libc::truncate(c.as_ptr(), -1) }).map(drop)
    });
    fails("name too long", libc::ENAMETOOLONG, &|r| {
        File::create(r.join(&long_name)).map(drop)
    });
    fails("rename missing", libc::ENOENT, &|r| {
        fs::rename(r.join("missing"), r.join("m2"))
    });
    fails("rename file over dir", libc::EISDIR, &|r| {
        fs::rename(r.join("f"), r.join("e"))
    });
    fails("rename dir over file", libc::ENOTDIR, &|r| {
        fs::rename(r.join("e"), r.join("f"))
    });
    fails("rename dir over non-empty dir", libc::ENOTEMPTY, &|r| {
        fs::rename(r.join("e"), r.join("d"))
    });
    fails("rename dir into itself", libc::EINVAL, &|r| {
        fs::rename(r.join("d"), r.join("d/sub"))
    });
    fails("rename with both flags", libc::EINVAL, &|r| {
        renameat2(
            &r.join("f"),
            &r.join("g"),
            libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE,
        )
    });
    fails("chmod missing", libc::ENOENT, &|r| {
        fs::set_permissions(r.join("missing"), fs::Permissions::from_mode(0o644))
    });
    fails("getxattr missing name", libc::ENODATA, &|r| {
        getxattr(&r.join("f"), "user.none").map(drop)
    });
    fails("setxattr bad namespace", libc::EOPNOTSUPP, &|r| {
        setxattr(&r.join("f"), "bogus.name", b"v", 0)
    });
    fails(
        "fallocate punch without keep-size",
        libc::EOPNOTSUPP,
        &|r| {
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 1)
        },
    );
    fails("fallocate on O_RDONLY", libc::EBADF, &|r| {
        fallocate(&File::open(r.join("f"))?, 0, 0, 4096)
    });
    fails("SEEK_DATA past end", libc::ENXIO, &|r| {
        lseek(&File::open(r.join("f"))?, 100, libc::SEEK_DATA).map(drop)
    });
    // Nothing above changed the trees.
    p.same("listing after errors", listing).unwrap();
    p.expect("content after errors", Ok(b"file".to_vec()), |r| {
        fs::read(r.join("f"))
    });
}

#[test]
fn o_trunc_by_another_user_clears_setuid_and_setgid_like_plain_dir() {
    let m = Mount::new();
    let plain = common::plain_dir();
    open_to_others(&m);
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut modes = vec![];
    for dir in [m.path(), plain.path()] {
        let f = dir.join("tool");
        fs::write(&f, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
        let c = cpath(&f);
        let errno = as_nobody(|| unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_TRUNC);
            if fd < 0 {
                return -1;
            }
            libc::close(fd)
        });
        assert_eq!(errno, 0, "O_TRUNC as uid 65534 in {}", dir.display());
        modes.push(fs::metadata(&f).unwrap().permissions().mode() & 0o7777);
    }
    assert_eq!(modes[0], modes[1], "mount vs plain dir after O_TRUNC");
    assert_eq!(
        modes[0] & 0o6000,
        0,
        "setuid/setgid must go: {:o}",
        modes[0]
    );
}

#[test]
fn the_mount_is_never_less_restrictive_than_the_backing_filesystem() {
    // A backing dir on a nosuid,nodev filesystem: the overlay must be nosuid,nodev too, or a
    // setuid file there would run as its owner through the root daemon's mount.
    let tmp = tempfile::tempdir().unwrap();
    let fsdir = tmp.path().join("fs");
    fs::create_dir(&fsdir).unwrap();
    let c_fs = cpath(&fsdir);
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c_fs.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"size=16m".as_ptr().cast(),
        )
    };
    assert_eq!(r, 0, "mount tmpfs: {}", io::Error::last_os_error());
    let backing = fsdir.join("b");
    let mnt = tmp.path().join("m");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut child = std::process::Command::new(common::grainfs_bin())
        .arg("mount")
        .arg(&backing)
        .arg(&mnt)
        .arg("-f")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !common::is_mounted(&mnt) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let c = cpath(&mnt);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) });
    common::force_unmount(&mnt);
    let _ = common::wait_timeout(&mut child, std::time::Duration::from_secs(10));
    unsafe { libc::umount2(c_fs.as_ptr(), libc::MNT_DETACH) };
    r.unwrap();
    assert_ne!(
        st.f_flag & libc::ST_NOSUID,
        0,
        "mount over a nosuid fs must be nosuid"
    );
    assert_ne!(
        st.f_flag & libc::ST_NODEV,
        0,
        "mount over a nodev fs must be nodev"
    );
}

/// Who runs a change on a setuid/setgid file: uid/gid 65534, which lacks CAP_FSETID, or the test
/// process itself, root with CAP_FSETID.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Nobody,
    Root,
}

/// A change to a file's content or size, made with raw system calls only so that the forked child
/// of `as_nobody` may run it; `run(file, source)` returns -1 with errno set on failure.
struct Modification {
    name: &'static str,
    run: fn(&std::ffi::CStr, &std::ffi::CStr) -> libc::c_int,
    /// The file's length afterwards, which proves the change happened at all.
    len_after: u64,
}

/// What the write modifications put into the file.
const PATCH: &[u8] = b"exit 0 # patched\n";

/// open(2) `file` O_WRONLY without O_TRUNC (O_TRUNC clears the bits by itself and has its own
/// test), run `op` on the fd and close it.
fn on_wronly_fd(file: &std::ffi::CStr, op: impl FnOnce(libc::c_int) -> isize) -> libc::c_int {
    unsafe {
        let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return -1;
        }
        if op(fd) < 0 {
            // close(2) must not replace the errno that says why `op` failed.
            let errno = *libc::__errno_location();
            libc::close(fd);
            *libc::__errno_location() = errno;
            return -1;
        }
        libc::close(fd)
    }
}

/// Every way, besides O_TRUNC, that changing a file's data is meant to take its privileges away.
fn privilege_dropping_modifications() -> [Modification; 6] {
    [
        Modification {
            name: "write",
            run: |f, _| {
                on_wronly_fd(f, |fd| unsafe {
                    libc::write(fd, PATCH.as_ptr().cast(), PATCH.len())
                })
            },
            len_after: PATCH.len() as u64,
        },
        Modification {
            name: "pwrite",
            run: |f, _| {
                on_wronly_fd(f, |fd| unsafe {
                    libc::pwrite(fd, PATCH.as_ptr().cast(), PATCH.len(), 100)
                })
            },
            len_after: 100 + PATCH.len() as u64,
        },
        Modification {
            name: "ftruncate",
            run: |f, _| on_wronly_fd(f, |fd| unsafe { libc::ftruncate(fd, 4) as isize }),
            len_after: 4,
        },
        Modification {
            name: "truncate",
            run: |f, _| unsafe { libc::truncate(f.as_ptr(), 3) },
            len_after: 3,
        },
        Modification {
            name: "fallocate",
            run: |f, _| on_wronly_fd(f, |fd| unsafe { libc::fallocate(fd, 0, 0, 8192) as isize }),
            len_after: 8192,
        },
        Modification {
            name: "copy_file_range",
            run: |f, source| unsafe {
                let src = libc::open(source.as_ptr(), libc::O_RDONLY);
                if src < 0 {
                    return -1;
                }
                let r = on_wronly_fd(f, |fd| {
                    let null = std::ptr::null_mut();
                    libc::copy_file_range(src, null, fd, null, 4096, 0)
                });
                libc::close(src);
                r
            },
            len_after: 4096,
        },
    ]
}

/// Make `dir/name` a short script owned by 65534:65534 with exactly `mode`. Owning the group lets
/// uid 65534 keep a setgid bit without group exec, which the kernel takes from anyone outside the
/// group; that would hide whether the mount tells the two cases apart.
fn setid_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let f = dir.join(name);
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    // chown(2) clears both bits even for root, so the mode has to come after it.
    std::os::unix::fs::chown(&f, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    assert_eq!(mode_bits(&f), mode, "mode set on {}", f.display());
    f
}

fn mode_bits(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Run `m` on `file` as `caller`, reading from `source`; panics if it fails.
fn modify_as(caller: Caller, m: &Modification, file: &Path, source: &Path) {
    let (f, s) = (cpath(file), cpath(source));
    let errno = match caller {
        Caller::Nobody => as_nobody(|| (m.run)(&f, &s)),
        Caller::Root => outcome(cvt((m.run)(&f, &s))).err().unwrap_or(0),
    };
    assert_eq!(errno, 0, "{} as {caller:?} on {}", m.name, file.display());
}

#[test]
fn writes_truncates_and_fallocate_by_another_user_clear_setuid_setgid_and_caps_like_plain_dir() {
    let m = Mount::new();
    let plain = common::plain_dir();
    open_to_others(&m);
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let source = pattern(9, 0, 4096);
    for dir in [m.path(), plain.path()] {
        fs::write(dir.join("source"), &source).unwrap();
    }

    // Without CAP_FSETID any change to the data drops setuid; setgid goes only along with group
    // exec, since setgid without it marks mandatory locking, not privilege. CAP_FSETID keeps both.
    let cases = [
        (Caller::Nobody, 0o6777, 0o0777),
        (Caller::Nobody, 0o6767, 0o2767),
        (Caller::Root, 0o6777, 0o6777),
    ];
    for modification in &privilege_dropping_modifications() {
        for (caller, before, after) in cases {
            let case = format!("{} as {caller:?} on {before:o}", modification.name);
            let name = format!("{}-{caller:?}-{before:o}", modification.name);
            let mut seen = vec![];
            for dir in [m.path(), plain.path()] {
                let f = setid_file(dir, &name, before);
                modify_as(caller, modification, &f, &dir.join("source"));
                let content = fs::read(&f).unwrap();
                assert_eq!(
                    content.len() as u64,
                    modification.len_after,
                    "length after {case} in {}",
                    dir.display()
                );
                seen.push((mode_bits(&f), content));
            }
            assert_eq!(
                seen[0].0, seen[1].0,
                "mode after {case}: mount vs plain dir"
            );
            assert_eq!(
                seen[0].1, seen[1].1,
                "content after {case}: mount vs plain dir"
            );
            assert_eq!(seen[1].0, after, "mode after {case} in the plain dir");
            // The daemon must clear the bits on disk, not just report them cleared.
            assert_eq!(
                mode_bits(&m.backing().join(&name)),
                after,
                "mode after {case} in the backing dir"
            );
        }
    }

    // File capabilities are privilege too, and a write removes them even when root makes it.
    // A VFS_CAP_REVISION_2 blob: magic without the effective bit, CAP_NET_BIND_SERVICE permitted.
    let mut caps = Vec::with_capacity(20);
    for word in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        caps.extend_from_slice(&word.to_le_bytes());
    }
    let capable = setid_file(plain.path(), "capable", 0o755);
    match outcome(setxattr(&capable, "security.capability", &caps, 0)) {
        Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOTSUP => {
            eprintln!("skipping security.capability: the plain dir's filesystem has no xattrs");
            return;
        }
        r => r.expect("set security.capability in the plain dir"),
    }
    let capable_mnt = setid_file(m.path(), "capable", 0o755);
    setxattr(&capable_mnt, "security.capability", &caps, 0)
        .expect("set security.capability through the mount");
    let write = &privilege_dropping_modifications()[0];
    for f in [&capable_mnt, &capable] {
        // Seen before the write, so that its absence afterwards means it was removed.
        assert_eq!(
            getxattr(f, "security.capability").unwrap(),
            caps,
            "capability on {}",
            f.display()
        );
        modify_as(Caller::Root, write, f, &plain.path().join("source"));
        assert_eq!(
            outcome(getxattr(f, "security.capability")),
            Err(libc::ENODATA),
            "capability after a root write to {}",
            f.display()
        );
    }
    assert_eq!(
        outcome(getxattr(
            &m.backing().join("capable"),
            "security.capability"
        )),
        Err(libc::ENODATA),
        "capability after a root write, in the backing dir"
    );
    assert_eq!(
        mode_bits(&capable_mnt),
        mode_bits(&capable),
        "mode after a root write to a file with capabilities: mount vs plain dir"
    );
    assert_eq!(mode_bits(&capable), 0o755);
}

/// Root of a user namespace (a rootless container, `unshare -Ur`) holds every capability
/// there and none over our files: its truncate, fallocate and write must clear setuid and
/// setgid as on a plain directory, although /proc shows CAP_FSETID in its effective set.
#[test]
fn root_of_a_user_namespace_loses_setuid_and_setgid_like_plain_dir() {
    if common::missing("unshare") || common::missing("fallocate") || common::missing("truncate") {
        return;
    }
    let probe = std::process::Command::new("unshare")
        .args(["-Ur", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: no user namespaces here (unshare -Ur true failed)");
        return;
    }
    let m = Mount::new();
    let plain = common::plain_dir();
    let cases: [(&str, &str); 3] = [
        ("truncate", "truncate -s 10 \"$1\""),
        ("fallocate", "fallocate -l 8192 \"$1\""),
        ("write", "printf x >> \"$1\""),
    ];
    for (name, script) in cases {
        let mut modes = vec![];
        for dir in [m.path(), plain.path()] {
            let f = dir.join(name);
            fs::write(&f, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
            let st = std::process::Command::new("unshare")
                .args(["-Ur", "sh", "-c", script, "sh"])
                .arg(&f)
                .status()
                .expect("run unshare");
            assert!(
                st.success(),
                "{name} in a user namespace on {}",
                f.display()
            );
            modes.push(fs::metadata(&f).unwrap().permissions().mode() & 0o7777);
        }
        assert_eq!(modes[0], modes[1], "{name}: mount vs plain dir");
        assert_eq!(modes[0], 0o777, "{name}: setuid/setgid must go");
    }
}
