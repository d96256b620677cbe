//! Attributes of the live tree: getattr, setattr (chmod, chown, truncate, utimens), statfs,
//! xattrs and access (`Attrs for Live`), after the public operations that forward each call to
//! the tree owning its inode (`tree.rs`; statfs alone is not routed), and the permission check
//! the snapshot view shares (`permits`).
//!
//! Every change here runs inside the write gate of the volume it touches (`gate.rs`); it must
//! never follow a symlink (xattrs on one are refused rather than set on its target).

use super::*;

impl OverlayFs {
    // ---- attributes: each forwarded to the tree that owns its inode ----

    /// Attributes of an inode, through its open handle when the kernel gives one.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        self.tree(ino).getattr(ino, fh)
    }

    /// chmod, chown, truncate and utimens, in that order; returns the new attributes.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.tree(ino).setattr(ino, set)
    }

    /// getxattr: with size 0, the size of the value.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Xattr> {
        self.tree(ino).getxattr(ino, name, size)
    }

    /// listxattr: with size 0, the size of the list.
    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<Xattr> {
        self.tree(ino).listxattr(ino, size)
    }

    /// setxattr with XATTR_CREATE / XATTR_REPLACE passed through.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        self.tree(ino).setxattr(ino, name, value, flags)
    }

    /// removexattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        self.tree(ino).removexattr(ino, name)
    }

    /// access(2): checked against the inode's mode for the caller (the kernel normally does
    /// this itself under `default_permissions`, so this is only reached without it).
    pub fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()> {
        self.tree(ino).access(caller, ino, mask)
    }

    /// statfs of the backing filesystem. Not routed: the view's inodes (and unknown ones) get
    /// the backing filesystem's figures too.
    pub fn statfs(&self, ino: u64) -> FsResult<StatFs> {
        let inode = self
            .inodes
            .get(ino)
            .or_else(|_| self.inodes.get(ROOT_INO))?;
        let s = sys::fstatfs(inode.raw_fd()).map_err(FsError::backing("statfs"))?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }

    pub(super) fn xattr_target(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let inode = self.inodes.get(ino)?;
        // Through /proc/self/fd a symlink would be followed; Linux allows no user xattrs on
        // symlinks anyway, so refuse rather than touch the target.
        if inode.kind == FileKind::Symlink {
            return Err(FsError::NotSupported);
        }
        Ok(inode)
    }
}

impl Attrs for Live<'_> {
    fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(fh) = fh {
            if let Ok(h) = self.files.get(fh) {
                let st = sys::fstat(h.file.as_raw_fd()).map_err(FsError::backing("getattr"))?;
                return Ok(Attr::from_stat(ino, &st));
            }
        }
        let inode = self.inodes.get(ino)?;
        let st = self.stat_of(&inode)?;
        Ok(Attr::from_stat(ino, &st))
    }

    fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let inode = self.inodes.get(ino)?;
        let handle = match set.fh {
            Some(fh) => self.files.get(fh).ok(),
            None => None,
        };
        let is_symlink = inode.kind == FileKind::Symlink;
        if set.mode.is_some() && is_symlink {
            return Err(FsError::NotSupported);
        }
        self.metadata_change(&[inode.key], || {
            if let Some(mode) = set.mode {
                match &handle {
                    Some(h) => {
                        if unsafe { libc::fchmod(h.file.as_raw_fd(), mode & 0o7777) } == -1 {
                            return Err(FsError::backing("chmod")(std::io::Error::last_os_error()));
                        }
                    }
                    None => sys::chmod_fd(inode.raw_fd(), mode & 0o7777)
                        .map_err(FsError::backing("chmod"))?,
                }
            }
            if set.uid.is_some() || set.gid.is_some() {
                sys::fchown_fd(
                    inode.raw_fd(),
                    set.uid.unwrap_or(u32::MAX),
                    set.gid.unwrap_or(u32::MAX),
                )
                .map_err(FsError::backing("chown"))?;
            }
            Ok(())
        })?;
        if let Some(size) = set.size {
            if inode.kind != FileKind::Regular {
                return Err(FsError::backing("truncate")(
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
            let volume = handle
                .as_ref()
                .and_then(|h| h.volume.clone())
                .or_else(|| self.volume_of(&inode, false));
            let old = std::cell::Cell::new(0u64);
            // Shrinking changes the content from the new end to the old one.
            self.tracked(
                volume.as_ref(),
                || {
                    old.set(self.stat_of(&inode)?.st_size as u64);
                    Ok((size, old.get().saturating_sub(size)))
                },
                || match &handle {
                    Some(h) => sys::ftruncate(h.file.as_raw_fd(), size)
                        .map_err(FsError::backing("truncate")),
                    None => {
                        let fd = sys::reopen(inode.raw_fd(), libc::O_WRONLY)
                            .map_err(FsError::backing("truncate"))?;
                        sys::ftruncate(fd.as_raw_fd(), size).map_err(FsError::backing("truncate"))
                    }
                },
                |v, _, _, _| v.record_truncate(old.get(), size, now_ns()),
            )?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec(set.atime), timespec(set.mtime)];
            self.metadata_change(&[inode.key], || {
                sys::utimens_fd(inode.raw_fd(), is_symlink, &times)
                    .map_err(FsError::backing("utimens"))
            })?;
        }
        let st = match &handle {
            Some(h) => sys::fstat(h.file.as_raw_fd()),
            None => sys::fstat(inode.raw_fd()),
        }
        .map_err(FsError::backing("setattr"))?;
        Ok(Attr::from_stat(ino, &st))
    }

    fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Xattr> {
        let inode = self.xattr_target(ino)?;
        let c = CString::new(name.as_bytes()).map_err(|_| FsError::NotSupported)?;
        let mut buf = vec![0u8; size as usize];
        let n =
            sys::getxattr(inode.raw_fd(), &c, &mut buf).map_err(FsError::backing("getxattr"))?;
        if size == 0 {
            return Ok(Xattr::Size(n as u32));
        }
        buf.truncate(n);
        Ok(Xattr::Data(buf))
    }

    fn listxattr(&self, ino: u64, size: u32) -> FsResult<Xattr> {
        // Symlinks list none: Linux allows them no user xattrs.
        let inode = self.inodes.get(ino)?;
        if inode.kind == FileKind::Symlink {
            return Ok(if size == 0 {
                Xattr::Size(0)
            } else {
                Xattr::Data(Vec::new())
            });
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(inode.raw_fd(), &mut buf).map_err(FsError::backing("listxattr"))?;
        if size == 0 {
            return Ok(Xattr::Size(n as u32));
        }
        buf.truncate(n);
        Ok(Xattr::Data(buf))
    }

    fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let inode = self.xattr_target(ino)?;
        let c = CString::new(name.as_bytes()).map_err(|_| FsError::NotSupported)?;
        if name.as_bytes().starts_with(b"security.") && crate::track::any_capture() {
            // A parked write landing after this would drop capabilities set after it returned.
            if let Some(v) = self.tracked_volume(&inode) {
                v.settle(0, 0);
            }
        }
        self.metadata_change(&[inode.key], || {
            sys::setxattr(inode.raw_fd(), &c, value, flags).map_err(FsError::backing("setxattr"))
        })
    }

    fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let inode = self.xattr_target(ino)?;
        let c = CString::new(name.as_bytes()).map_err(|_| FsError::NotSupported)?;
        self.metadata_change(&[inode.key], || {
            sys::removexattr(inode.raw_fd(), &c).map_err(FsError::backing("removexattr"))
        })
    }

    fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()> {
        let inode = self.inodes.get(ino)?;
        let st = self.stat_of(&inode)?;
        permits(caller, inode.kind, st.st_mode, st.st_uid, st.st_gid, mask)
    }
}

/// Whether `mask` (R_OK, W_OK, X_OK or F_OK) is allowed to `caller` on an inode of `kind`
/// with `mode` owned by `uid`:`gid`; root may do anything but execute a file with no x bit.
pub(super) fn permits(
    caller: Caller,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mask: i32,
) -> FsResult<()> {
    let denied = || FsError::backing("access")(std::io::Error::from_raw_os_error(libc::EACCES));
    if mask == libc::F_OK || caller.uid == 0 {
        if caller.uid == 0
            && mask & libc::X_OK != 0
            && kind != FileKind::Directory
            && mode & 0o111 == 0
        {
            return Err(denied());
        }
        return Ok(());
    }
    let bits = if uid == caller.uid {
        (mode >> 6) & 7
    } else if gid == caller.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    } as i32;
    if bits & mask == mask {
        Ok(())
    } else {
        Err(denied())
    }
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                libc::timespec {
                    tv_sec: s as libc::time_t,
                    tv_nsec: ns as libc::c_long,
                }
            }
        },
    }
}
