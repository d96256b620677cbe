//! What the `posix_*` tests share: the mount-versus-plain-dir comparison (`Pair`: run the same
//! operation on both and demand the same value or errno), the attributes that must match
//! (`Shape`), thin libc wrappers that keep the errno, content patterns, and running an operation
//! as uid/gid 65534 in a forked child. It never decides what a test expects; it only runs both
//! sides and reports what each saw.

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::mount::Mount;

/// The uid and gid the unprivileged tests drop to.
pub const NOBODY: u32 = 65534;
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

// ---- comparing the mount with a plain dir ----

/// What a user sees of an operation: its value, or the errno it failed with.
pub type Outcome<T> = Result<T, i32>;

pub fn outcome<T>(r: io::Result<T>) -> Outcome<T> {
    r.map_err(|e| {
        e.raw_os_error()
            .unwrap_or_else(|| panic!("error without an errno: {e}"))
    })
}

/// A live mount and a plain dir to run the same operations on.
pub struct Pair {
    pub mount: Mount,
    pub plain: tempfile::TempDir,
}

impl Pair {
    pub fn new() -> Pair {
        Pair::in_mode(false)
    }

    /// A pair whose mount is in write-back mode when `writeback`.
    pub fn in_mode(writeback: bool) -> Pair {
        Pair {
            mount: Mount::in_mode(writeback, |_| {}, None),
            plain: super::plain_dir(),
        }
    }

    pub fn mnt(&self) -> &Path {
        self.mount.path()
    }

    pub fn plain(&self) -> &Path {
        self.plain.path()
    }

    /// Run `op` under the mount and under the plain dir; both must have the same outcome.
    pub fn same<T: PartialEq + Debug>(
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
    pub fn expect<T: PartialEq + Debug>(
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
    pub fn both(&self, what: &str, op: impl Fn(&Path) -> io::Result<()>) {
        for root in [self.mnt(), self.plain()] {
            op(root).unwrap_or_else(|e| panic!("{what} in {}: {e}", root.display()));
        }
    }
}

pub fn errno_name<T>(o: &Outcome<T>) -> String {
    match o {
        Ok(_) => "ok".into(),
        Err(e) => io::Error::from_raw_os_error(*e).to_string(),
    }
}

/// The parts of an inode's attributes that must match between mount, backing and plain dir.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Shape {
    pub kind: &'static str,
    pub perm: u32,
    /// Directory sizes depend on the history of the directory, not on the overlay: left out.
    pub size: u64,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
}

pub fn kind_of(t: fs::FileType) -> &'static str {
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

pub fn shape(m: &fs::Metadata) -> Shape {
    Shape {
        kind: kind_of(m.file_type()),
        perm: m.mode() & 0o7777,
        size: if m.is_dir() { 0 } else { m.size() },
        nlink: m.nlink(),
        uid: m.uid(),
        gid: m.gid(),
    }
}

pub fn lshape(p: &Path) -> io::Result<Shape> {
    fs::symlink_metadata(p).map(|m| shape(&m))
}

// ---- thin libc wrappers that keep the errno ----

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cvt_size(ret: isize) -> io::Result<usize> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
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

pub fn mkfifo(p: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode) }).map(drop)
}

pub fn truncate_path(p: &Path, len: u64) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) }).map(drop)
}

pub fn access(p: &Path, mask: libc::c_int) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::access(c.as_ptr(), mask) }).map(drop)
}

pub fn ts(sec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: 0,
    }
}

pub fn ts_special(nsec: libc::c_long) -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: nsec,
    }
}

pub fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let c = cpath(p);
    let times = [atime, mtime];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn statfs(p: &Path) -> libc::statfs {
    let c = cpath(p);
    let mut s = std::mem::MaybeUninit::<libc::statfs>::uninit();
    cvt(unsafe { libc::statfs(c.as_ptr(), s.as_mut_ptr()) }).expect("statfs");
    unsafe { s.assume_init() }
}

pub fn fstat(f: &File) -> libc::stat {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe { libc::fstat(f.as_raw_fd(), st.as_mut_ptr()) }).expect("fstat");
    unsafe { st.assume_init() }
}

pub fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
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

pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
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
pub fn list_user_xattrs(p: &Path) -> io::Result<Vec<String>> {
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

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("name"));
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

/// Sorted (name, kind) of a directory's entries.
pub fn listing(dir: &Path) -> io::Result<Vec<(String, &'static str)>> {
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

pub fn secs_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .expect("time after epoch")
        .as_secs() as i64
}

/// Deterministic content that differs at every 8-byte word and per `tag`.
pub fn pattern(tag: u8, offset: u64, len: usize) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    assert_eq!(len % 8, 0);
    let mut out = Vec::with_capacity(len);
    for w in 0..(len as u64 / 8) {
        let o = offset + w * 8;
        out.extend_from_slice(&(o ^ ((tag as u64) << 56) ^ 0x5a5a_0000_0000_0000).to_le_bytes());
    }
    out
}

// ---- running as another user ----

/// Let uid 65534 reach the mount point: the fixture's temp dir is created 0700.
pub fn open_to_others(m: &Mount) {
    let root = m.path().parent().expect("mount has a parent");
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod temp root");
}

/// Run `op` in a forked child as uid/gid 65534 with no supplementary groups; returns the errno
/// of its failure (`op` returns -1 and leaves errno set), or 0. The child of a multithreaded
/// process may only make raw system calls, so `op` must not allocate: prepare C strings first.
pub fn as_nobody(op: impl FnOnce() -> libc::c_int) -> i32 {
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
pub fn read_as_nobody(path: &Path) -> i32 {
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
