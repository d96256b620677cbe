//! Safe wrappers over the `*at` system calls the overlay makes on the backing dir.
//!
//! Every path argument here is a single name relative to a directory fd, or the empty path with
//! `AT_EMPTY_PATH`, or a `/proc/self/fd/N` magic link naming an fd we already hold. Nothing here
//! ever resolves a multi-component path, so no symlink or `..` can lead out of the backing dir.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Turn a libc return value into an `io::Result`, reading errno on -1.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A single path component as a C string; rejects '/', NUL, "" , "." and "..".
pub fn name_cstr(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopens exactly the inode behind fd, never a path lookup.
pub fn proc_path(fd: RawFd) -> CString {
    // Formatting an integer never contains NUL.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

const EMPTY: &CStr = c"";

pub fn openat(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open an `O_PATH | O_NOFOLLOW` handle on `name` in `dir`: the inode itself, never a link target.
pub fn open_path(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Open an `O_PATH` handle on the directory at `path`, a path the caller was given (followed
/// as given: the daemon names its store as /proc/self/fd/N).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Reopen an inode we hold an `O_PATH` fd for, with real access flags.
pub fn reopen(path_fd: RawFd, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = proc_path(path_fd);
    openat(
        libc::AT_FDCWD,
        &p,
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW),
        0,
    )
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            fd,
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn fstatfs(fd: RawFd) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    check(unsafe { libc::fstatvfs(fd, st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: RawFd,
    oldname: &CStr,
    newdir: RawFd,
    newname: &CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    check(unsafe { libc::renameat2(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), flags) })
        .map(drop)
}

/// Hard-link the inode behind `path_fd` as `name` in `dir`.
pub fn link_fd(path_fd: RawFd, dir: RawFd, name: &CStr) -> io::Result<()> {
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the procfs magic link works for everyone.
    let r = check(unsafe {
        libc::linkat(
            path_fd,
            EMPTY.as_ptr(),
            dir,
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    });
    match r {
        Ok(_) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            let p = proc_path(path_fd);
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    dir,
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
            .map(drop)
        }
        Err(e) => Err(e),
    }
}

pub fn readlink_fd(path_fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = check_size(unsafe {
        libc::readlinkat(path_fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// chown the inode itself (not a link target); `u32::MAX` leaves an id unchanged.
pub fn fchown_fd(path_fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            path_fd,
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn chmod_fd(path_fd: RawFd, mode: libc::mode_t) -> io::Result<()> {
    let p = proc_path(path_fd);
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }).map(drop)
}

pub fn utimens_fd(path_fd: RawFd, is_symlink: bool, times: &[libc::timespec; 2]) -> io::Result<()> {
    if is_symlink {
        // The procfs link would follow the symlink; AT_EMPTY_PATH acts on the link itself.
        return check(unsafe {
            libc::utimensat(
                path_fd,
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop);
    }
    let p = proc_path(path_fd);
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    check(unsafe { libc::ftruncate(fd, size as libc::off_t) }).map(drop)
}

pub fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    check_size(unsafe {
        libc::pread(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

/// Read up to `size` bytes into the spare capacity of `buf` (its length is set to what was read).
pub fn pread_into(fd: RawFd, buf: &mut Vec<u8>, size: usize, offset: u64) -> io::Result<()> {
    buf.clear();
    buf.reserve(size);
    let mut done = 0usize;
    while done < size {
        let n = check_size(unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().add(done).cast(),
                size - done,
                (offset + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    // SAFETY: pread initialised exactly `done` bytes of the reserved capacity.
    unsafe { buf.set_len(done) };
    Ok(())
}

/// Write all of `data` at `offset`; returns the bytes written, short only when an error came
/// after part of the data was on disk (ENOSPC), as pwrite(2) would report it.
pub fn pwrite_all(fd: RawFd, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0usize;
    while done < data.len() {
        let n = check_size(unsafe {
            libc::pwrite(
                fd,
                data[done..].as_ptr().cast(),
                data.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(0) if done > 0 => return Ok(done),
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The mount flags (ST_*) of the filesystem holding `path`.
pub fn statvfs_flags(path: &std::path::Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    check(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() }.f_flag)
}

pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

/// The file status flags of an open fd (fcntl F_GETFL).
pub fn open_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl F_GETFL reads flags of an fd; no memory is passed.
    check(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    check(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) }).map(drop)
}

pub fn lseek(fd: RawFd, offset: i64, whence: libc::c_int) -> io::Result<i64> {
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Bytes of `start..end` of the file open at `fd` that hold data (SEEK_DATA/SEEK_HOLE: no data
/// is read; a filesystem without holes reports the whole range).
pub fn data_bytes(fd: RawFd, start: u64, end: u64) -> io::Result<u64> {
    let mut total = 0;
    data_ranges(fd, start, end, |a, b| total += b - a)?;
    Ok(total)
}

/// Call `f(from, to)` for each run of `start..end` of the file open at `fd` that holds data,
/// in order (SEEK_DATA/SEEK_HOLE: two calls per run, none per hole; no data is read). A
/// filesystem without holes reports the whole range as one run.
pub fn data_ranges(fd: RawFd, start: u64, end: u64, mut f: impl FnMut(u64, u64)) -> io::Result<()> {
    let mut at = start;
    while at < end {
        let data = match lseek(fd, at as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            // No data from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = lseek(fd, data as i64, libc::SEEK_HOLE)? as u64;
        if hole > data {
            f(data, hole.min(end));
        }
        // A file that changed between the two calls must not stall the loop.
        at = hole.max(data + 1);
    }
    Ok(())
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
) -> io::Result<u64> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    let n = check_size(unsafe {
        libc::copy_file_range(fd_in, &mut oi, fd_out, &mut oo, len as usize, 0)
    })?;
    Ok(n as u64)
}

/// Whether process `pid` holds CAP_FSETID where it counts: in its effective set (from
/// /proc/PID/status) and in the daemon's own user namespace (root of a user namespace shows
/// every capability there, and has none over our files). Unknown (pid 0, unreadable, another
/// user namespace) counts as no: the caller then loses setuid/setgid, the safe side.
pub fn has_cap_fsetid(pid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    if pid == 0 {
        return false;
    }
    let ns = |p: String| std::fs::read_link(p).ok();
    match (
        ns(format!("/proc/{pid}/ns/user")),
        ns("/proc/self/ns/user".into()),
    ) {
        (Some(theirs), Some(ours)) if theirs == ours => {}
        _ => return false,
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

/// Whether a caller (`pid`, with fsgid `gid`) is in group `group`.
pub fn caller_in_group(pid: u32, gid: u32, group: libc::gid_t) -> bool {
    gid == group || caller_groups(pid, gid).contains(&group)
}

/// Whether the file open at `fd` carries file capabilities (`security.capability`); an error
/// other than "no such attribute" or "no xattrs here" counts as yes.
pub fn has_file_caps(fd: RawFd) -> bool {
    // SAFETY: a NUL-terminated name and a zero-size query (no buffer written).
    let r =
        unsafe { libc::fgetxattr(fd, c"security.capability".as_ptr(), std::ptr::null_mut(), 0) };
    // A filesystem without xattrs has no capabilities either.
    r >= 0
        || !matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODATA | libc::EOPNOTSUPP)
        )
}

pub fn getxattr(path_fd: RawFd, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_path(path_fd);
    check_size(unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn setxattr(path_fd: RawFd, name: &CStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let p = proc_path(path_fd);
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn listxattr(path_fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_path(path_fd);
    check_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr(path_fd: RawFd, name: &CStr) -> io::Result<()> {
    let p = proc_path(path_fd);
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

pub fn faccessat(path_fd: RawFd, mask: libc::c_int) -> io::Result<()> {
    let p = proc_path(path_fd);
    check(unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask, libc::AT_EACCESS) }).map(drop)
}

pub fn geteuid() -> u32 {
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    unsafe { libc::getegid() }
}

/// The raw fd of anything that has one (keeps call sites short).
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// Open `rel` (a relative path of several components) under `root` with openat2(2), refusing
/// any symlink, magic link or `..` that would resolve outside `root`.
pub fn open_beneath(root: RawFd, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What tells one file from a later one that reuses its inode number: the inode's generation
/// (`FS_IOC_GETVERSION`; ext4, XFS, btrfs, tmpfs) and its birth time (statx), each where the
/// filesystem has it. `fd` must be a real open file (not `O_PATH`) for the generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub generation: Option<u64>,
    /// (seconds, nanoseconds).
    pub btime: Option<(i64, u32)>,
}

/// The identity of the file open at `fd`.
pub fn file_identity(fd: RawFd) -> io::Result<FileIdentity> {
    let st = fstat(fd)?;
    const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601; // _IOR('v', 1, long)
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes one long into `generation`.
    let generation = (unsafe { libc::ioctl(fd, FS_IOC_GETVERSION as _, &mut generation) } == 0)
        .then_some(generation as u64);
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx fills the struct it is given.
    let r = unsafe {
        libc::statx(
            fd,
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BTIME,
            stx.as_mut_ptr(),
        )
    };
    let btime = if r == 0 {
        // SAFETY: statx returned 0, so it filled the struct (it was zeroed before anyway).
        let stx = unsafe { stx.assume_init() };
        (stx.stx_mask & libc::STATX_BTIME != 0)
            .then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec))
    } else {
        None
    };
    Ok(FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        generation,
        btime,
    })
}

/// A file's ctime as (seconds, nanoseconds).
pub fn ctime_of(st: &libc::stat) -> (i64, u32) {
    (st.st_ctime, st.st_ctime_nsec as u32)
}

/// Why a versioned JSON file (a manifest, the tracking state) cannot be taken.
#[derive(Debug)]
pub enum VersionedError {
    /// Written in a format this version does not read.
    Unsupported { found: u64 },
    /// Not JSON of the expected shape.
    Invalid(String),
}

/// Decode a JSON file that carries its `format`: the format is read first, so a file from a
/// newer version says so instead of failing on a field it added.
pub fn decode_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    supported: u64,
) -> Result<T, VersionedError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        format: u64,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| VersionedError::Invalid(e.to_string()))?;
    if probe.format != supported {
        return Err(VersionedError::Unsupported {
            found: probe.format,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| VersionedError::Invalid(e.to_string()))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): state a killed daemon left in the page
/// cache survives only within one boot. `GRAINFS_BOOT_ID` overrides it, so a power-cut test
/// can present the remount as a new boot without rebooting the machine.
pub fn boot_id() -> String {
    if let Ok(id) = std::env::var("GRAINFS_BOOT_ID") {
        return id;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Raise the open-file limit to its hard maximum (the daemon holds an fd per live inode).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// While alive, this thread's filesystem identity is the caller's: fsuid, fsgid and
/// supplementary groups (raw syscalls: per thread, unlike the glibc wrappers). New inodes are
/// then the caller's from birth and the backing filesystem checks permissions as for the
/// caller, with no chown afterwards (which a rename could redirect) and no lost setuid bits.
pub struct AsCaller {
    groups: Vec<libc::gid_t>,
}

impl AsCaller {
    /// Take the identity of `uid`/`gid` with the supplementary groups of process `pid`.
    pub fn enter(uid: u32, gid: u32, pid: u32) -> AsCaller {
        let mut saved: Vec<libc::gid_t> = vec![0; 256];
        let n = unsafe { libc::getgroups(saved.len() as libc::c_int, saved.as_mut_ptr()) };
        saved.truncate(n.max(0) as usize);
        let groups = caller_groups(pid, gid);
        unsafe {
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        AsCaller { groups: saved }
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        unsafe {
            libc::syscall(libc::SYS_setfsuid, libc::geteuid());
            libc::syscall(libc::SYS_setfsgid, libc::getegid());
            libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr());
        }
    }
}

/// Supplementary groups of `pid` from /proc (the kernel checked the caller with them); just
/// `gid` when they cannot be read (the process is gone, or in another pid namespace).
fn caller_groups(pid: u32, gid: u32) -> Vec<libc::gid_t> {
    let text = read_proc(&format!("/proc/{pid}/status")).unwrap_or_default();
    let mut groups: Vec<libc::gid_t> = text
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if pid == 0 || groups.is_empty() {
        groups = vec![gid];
    }
    groups
}

/// A /proc file as text. A /proc file says its size is 0, so `read_to_string` probes it with
/// reads of 32, 32, 64, 128... bytes (eight calls for a status file on every create, mkdir and
/// mknod); one 4 KiB read gets the status of a process whole.
fn read_proc(path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        let spare = buf.capacity() - buf.len();
        let start = buf.len();
        buf.resize(start + spare, 0);
        let n = f.read(&mut buf[start..])?;
        buf.truncate(start + n);
        if n == 0 {
            break;
        }
    }
    String::from_utf8(buf).map_err(io::Error::other)
}

/// Unix time in nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// fsync a directory (after a rename or unlink in it).
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replace `path` atomically and durably: temp file in the same dir, fsync, rename, fsync dir.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Explicit modes: the daemon runs with umask 0 (the kernel applies the caller's).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// CLOCK_REALTIME in ns (the clock file timestamps come from; the fine one, so it is never
/// behind a timestamp the kernel just gave).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `syncfs` on the filesystem at `path`, done by a forked child, with the caller waiting for
/// it. The daemon must not sync its own FUSE mount from one of its threads: that thread can
/// wait uninterruptibly for writeback that only the daemon serves, so a kill -9 arriving then
/// leaves a zombie that holds /dev/fuse open forever and hangs the mount. The child closes
/// every inherited fd (the /dev/fuse one included) before it starts; if the daemon dies, its
/// fds close, the kernel aborts the connection and the child's wait ends.
pub fn syncfs_in_child(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: between fork and _exit the child makes only async-signal-safe system calls on
    // memory prepared before the fork (`c`).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let fd = libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                libc::_exit(*libc::__errno_location());
            }
            let code = if libc::syncfs(fd) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child forked above.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, errno) => Err(io::Error::from_raw_os_error(errno)),
        _ => Err(io::Error::other("the syncfs child was killed")),
    }
}

/// A file for `fsync_in_child`: its path (through a FUSE mount) and the inode number the
/// mount must show for it (so a name that moved to another file since is not taken for it).
pub struct FsyncTarget {
    pub path: CString,
    pub ino: u64,
}

/// Open each of `targets` read-only (write-only where reading is refused) and fsync it, in a
/// forked child, with the caller waiting for it; `started` runs in the caller with the child's
/// pid before the child opens anything. Returns the indexes of the targets the child could not
/// fsync (gone, another inode under the name, or the fsync failed).
///
/// A child for the same reason as `syncfs_in_child`: an fsync of a file of the daemon's own
/// FUSE mount waits uninterruptibly for writes that only the daemon serves, and a thread of
/// the daemon waiting so when a kill -9 comes would keep /dev/fuse open and hang the mount. The
/// child keeps only the two pipes it talks over.
pub fn fsync_in_child(
    targets: &[FsyncTarget],
    started: impl FnOnce(i32),
) -> io::Result<Vec<usize>> {
    let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        // SAFETY: both fds are new and ours.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (go_r, go_w) = pipe()?;
    let (failed_r, failed_w) = pipe()?;
    let (keep_a, keep_b) = (go_r.as_raw_fd(), failed_w.as_raw_fd());
    let (lo, hi) = (keep_a.min(keep_b) as u32, keep_a.max(keep_b) as u32);
    // SAFETY: between fork and _exit the child makes only async-signal-safe system calls on
    // memory prepared before the fork (`targets`, the fds above); it allocates nothing.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            for (from, to) in [
                (3, lo.saturating_sub(1)),
                ((lo + 1).max(3), hi - 1),
                ((hi + 1).max(3), u32::MAX),
            ] {
                if from <= to {
                    libc::syscall(libc::SYS_close_range, from, to, 0u32);
                }
            }
            let mut byte = 0u8;
            if libc::read(keep_a, (&mut byte as *mut u8).cast(), 1) != 1 {
                libc::_exit(1);
            }
            for (i, t) in targets.iter().enumerate() {
                let base = libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_NOFOLLOW;
                let mut fd = libc::open(t.path.as_ptr(), base | libc::O_RDONLY);
                if fd < 0 && *libc::__errno_location() == libc::EACCES {
                    fd = libc::open(t.path.as_ptr(), base | libc::O_WRONLY);
                }
                let mut ok = fd >= 0;
                if ok {
                    let mut st: libc::stat = std::mem::zeroed();
                    ok =
                        libc::fstat(fd, &mut st) == 0 && st.st_ino == t.ino && libc::fsync(fd) == 0;
                    libc::close(fd);
                }
                if !ok {
                    let index = (i as u32).to_le_bytes();
                    libc::write(keep_b, index.as_ptr().cast(), index.len());
                }
            }
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(go_r);
    drop(failed_w);
    started(pid);
    let go = std::fs::File::from(go_w);
    let _ = (&go).write_all(&[1]);
    drop(go);
    let mut failed = Vec::new();
    let mut report = std::fs::File::from(failed_r);
    let mut bytes = Vec::new();
    let read = std::io::Read::read_to_end(&mut report, &mut bytes);
    for chunk in bytes.chunks_exact(4) {
        failed.push(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize);
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child forked above.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    read?;
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(failed),
        (true, code) => Err(io::Error::other(format!(
            "the fsync child exited with {code}"
        ))),
        _ => Err(io::Error::other("the fsync child was killed")),
    }
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (UTC), as snapshot names use it.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `struct file_clone_range` of linux/fs.h.
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// FICLONERANGE: `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// Share `len` bytes of `src` at `src_off` with `dst` at `dst_off` (FICLONERANGE: a reflink,
/// no data copied; the destination's range then reads what the source held at the instant of
/// the call, and later writes to either side no longer show in the other). Offsets and `len`
/// must be multiples of the filesystem's block size. Fails with EOPNOTSUPP (a filesystem
/// without reflink: ext4, XFS made without it), EXDEV (two filesystems) or EINVAL (unaligned,
/// past the source's end).
pub fn clone_range(src: RawFd, src_off: u64, dst: RawFd, dst_off: u64, len: u64) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: src as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: the ioctl reads a struct we own, for its whole call.
    let r = unsafe { libc::ioctl(dst, FICLONERANGE as _, &arg as *const FileCloneRange) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `e` says that `clone_range` cannot work here (rather than that something failed).
pub fn clone_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_civil_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_000_000 + 3_723), "20261118T120843Z");
    }
}
