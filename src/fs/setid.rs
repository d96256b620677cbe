//! Who loses setuid and setgid when a file's content changes. With FUSE_HANDLE_KILLPRIV_V2
//! (the adapter asks for it: without it the kernel asks for `security.capability` before every
//! write) this is the daemon's duty: the backing filesystem sees the root daemon change the
//! file and would keep both bits. The adapter passes the kernel's facts (the caller, a write's
//! FUSE_WRITE_KILL_SUIDGID, the open flags) to the `*_by` operations here; they decide, make
//! the change, and say whether the kernel's cached mode went stale (`Changed`).
//!
//! It must never clear a bit the kernel would keep (a caller with CAP_FSETID; setgid without
//! group execute for a caller in the file's group), never touch the snapshot view (its
//! changes fail with EROFS anyway), and never see a FUSE type: everything here is tested
//! without a mount.

use super::tree::{Live, Setid};
use super::{sys, Caller, FileKind, FsError, FsResult, Opened, OverlayFs, SetAttr};
use crate::fs::Attr;

/// The result of an operation that may have cleared setuid/setgid behind the kernel's back.
#[derive(Debug)]
pub struct Changed<T> {
    pub result: FsResult<T>,
    /// The file's mode may have changed without the kernel knowing (set even when the change
    /// itself then failed): its cached attributes must be dropped.
    pub mode_stale: bool,
}

impl<T> Changed<T> {
    /// Run `change` after `cleared` (the outcome of `clear_setid`), unless that failed.
    fn after(cleared: FsResult<bool>, change: impl FnOnce() -> FsResult<T>) -> Changed<T> {
        match cleared {
            Ok(mode_stale) => Changed {
                result: change(),
                mode_stale,
            },
            Err(e) => Changed {
                result: Err(e),
                mode_stale: false,
            },
        }
    }
}

/// The kernel's facts about one write.
#[derive(Clone, Copy, Debug)]
pub struct WriteBy {
    pub caller: Caller,
    /// FUSE_WRITE_KILL_SUIDGID: the kernel found the writer without CAP_FSETID.
    pub kill_suidgid: bool,
    /// The flags the file was opened with (O_DIRECT matters).
    pub open_flags: i32,
}

/// Who changes a file's content, for `clear_setid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Changer {
    /// A caller the kernel found without CAP_FSETID (FUSE_WRITE_KILL_SUIDGID on a write).
    WithoutFsetid(Caller),
    /// A caller whose capabilities decide (the kernel's flag for truncate does not reach us
    /// through fuser, and fallocate and copy_file_range carry none).
    Process(Caller),
}

/// Who must lose setuid/setgid for a write: only a writer the kernel flagged.
fn write_changer(by: &WriteBy) -> Option<Changer> {
    by.kill_suidgid.then_some(Changer::WithoutFsetid(by.caller))
}

/// Who must lose setuid/setgid for a setattr: a truncate does it, unless the same call sets
/// the mode (the kernel then sends the mode it wants, already without the bits).
fn setattr_changer(caller: Caller, set: &SetAttr) -> Option<Changer> {
    (set.size.is_some() && set.mode.is_none()).then_some(Changer::Process(caller))
}

/// The permission bits `mode` keeps after a content change by a caller without CAP_FSETID:
/// never setuid; setgid only when the group may not execute (a mandatory-locking mark, not a
/// privilege) and the caller is in the file's group (`in_group`, asked only then).
fn kept_mode(mode: u32, in_group: impl FnOnce() -> bool) -> u32 {
    let mut kept = mode & !libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !in_group()) {
        kept &= !libc::S_ISGID;
    }
    kept
}

impl Setid for Live<'_> {
    /// Clear setuid, and setgid, before `changer` changes the content of `ino`, as the kernel
    /// does for a caller without CAP_FSETID (see `kept_mode`). The backing filesystem still
    /// drops `security.capability` on every change by itself, root or not. Returns whether
    /// the mode changed.
    fn clear_setid(&self, ino: u64, changer: Changer) -> FsResult<bool> {
        let inode = self.inodes.get(ino)?;
        if inode.kind != FileKind::Regular {
            return Ok(false);
        }
        let st = self.stat_of(&inode)?;
        let mode = st.st_mode & 0o7777;
        let (Changer::WithoutFsetid(caller) | Changer::Process(caller)) = changer;
        let kept = kept_mode(mode, || {
            sys::caller_in_group(caller.pid, caller.gid, st.st_gid)
        });
        if kept == mode {
            return Ok(false);
        }
        if matches!(changer, Changer::Process(_)) && sys::has_cap_fsetid(caller.pid) {
            return Ok(false);
        }
        self.metadata_change(&[inode.key], || {
            sys::chmod_fd(inode.raw_fd(), kept).map_err(FsError::backing("chmod"))
        })?;
        Ok(true)
    }
}

impl OverlayFs {
    /// `clear_setid` of the tree that owns `ino` (the view's clears nothing: the change that
    /// follows is refused).
    fn clear_setid(&self, ino: u64, changer: Changer) -> FsResult<bool> {
        self.tree(ino).clear_setid(ino, changer)
    }

    fn clear_setid_for(&self, ino: u64, changer: Option<Changer>) -> FsResult<bool> {
        match changer {
            Some(c) => self.clear_setid(ino, c),
            None => Ok(false),
        }
    }

    /// `setattr` by `caller`: a truncate clears setuid/setgid first (see `setattr_changer`).
    pub fn setattr_by(&self, caller: Caller, ino: u64, set: &SetAttr) -> Changed<Attr> {
        let cleared = self.clear_setid_for(ino, setattr_changer(caller, set));
        Changed::after(cleared, || self.setattr(ino, set))
    }

    /// `open` by `caller`: an `O_TRUNC` open runs as the caller, so the backing filesystem
    /// clears setuid/setgid as it does for a truncate by a non-owner; the kernel cannot know
    /// whether it did.
    pub fn open_by(&self, caller: Caller, ino: u64, flags: i32) -> Changed<Opened> {
        let result = self.tree(ino).open(Some(caller), ino, flags);
        let mode_stale = result.is_ok() && flags & libc::O_TRUNC != 0;
        Changed { result, mode_stale }
    }

    /// `write`, with setuid/setgid cleared first when the kernel says so. An O_DIRECT write
    /// is answered whole or failed (`write_whole`): the kernel turns a short reply to one into
    /// EIO.
    pub fn write_by(
        &self,
        by: WriteBy,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Changed<u32> {
        let cleared = self.clear_setid_for(ino, write_changer(&by));
        let whole = by.open_flags & libc::O_DIRECT != 0;
        Changed::after(cleared, || self.tree_fh(fh).write(fh, offset, data, whole))
    }

    /// `fallocate` on `ino` by `caller`, who loses setuid/setgid without CAP_FSETID.
    pub fn fallocate_by(
        &self,
        caller: Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Changed<()> {
        let cleared = self.clear_setid(ino, Changer::Process(caller));
        Changed::after(cleared, || self.fallocate(fh, offset, length, mode))
    }

    /// `copy_file_range` into `ino_out` by `caller`, who loses setuid/setgid on the target
    /// without CAP_FSETID.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range_by(
        &self,
        caller: Caller,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Changed<u64> {
        let cleared = self.clear_setid(ino_out, Changer::Process(caller));
        Changed::after(cleared, || {
            self.copy_file_range(fh_in, off_in, fh_out, off_out, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::fs::inode::ROOT_INO;
    use crate::fs::OverlayOptions;

    /// pid 0: a caller whose capabilities cannot be read counts as without CAP_FSETID.
    const PLAIN: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 0,
    };

    fn write_by(kill_suidgid: bool) -> WriteBy {
        WriteBy {
            caller: PLAIN,
            kill_suidgid,
            open_flags: libc::O_RDWR,
        }
    }

    #[test]
    fn a_change_keeps_setgid_only_without_group_execute_and_for_a_group_member() {
        let (suid, sgid) = (libc::S_ISUID, libc::S_ISGID);
        assert_eq!(kept_mode(suid | 0o755, || true), 0o755);
        assert_eq!(kept_mode(suid | sgid | 0o755, || true), 0o755);
        // Setgid without group execute marks mandatory locking: a group member keeps it.
        assert_eq!(kept_mode(sgid | 0o745, || true), sgid | 0o745);
        assert_eq!(kept_mode(sgid | 0o745, || false), 0o745);
        // Nothing to clear: membership is not even asked.
        assert_eq!(kept_mode(0o755, || panic!("asked")), 0o755);
    }

    #[test]
    fn only_flagged_writes_and_truncates_without_a_mode_clear_setid() {
        assert_eq!(write_changer(&write_by(false)), None);
        assert_eq!(
            write_changer(&write_by(true)),
            Some(Changer::WithoutFsetid(PLAIN))
        );
        let truncate = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(
            setattr_changer(PLAIN, &truncate),
            Some(Changer::Process(PLAIN))
        );
        let truncate_and_chmod = SetAttr {
            mode: Some(0o4755),
            ..truncate
        };
        assert_eq!(setattr_changer(PLAIN, &truncate_and_chmod), None);
        let chmod = SetAttr {
            mode: Some(0o755),
            ..SetAttr::default()
        };
        assert_eq!(setattr_changer(PLAIN, &chmod), None);
    }

    /// An overlay on a temp dir holding `f` with `mode`, and `f`'s inode (looked up).
    fn fixture(mode: u32) -> (tempfile::TempDir, OverlayFs, u64) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let fs = OverlayFs::new(tmp.path(), OverlayOptions::default()).unwrap();
        let ino = fs.lookup(ROOT_INO, OsStr::new("f")).unwrap().attr.ino;
        (tmp, fs, ino)
    }

    fn mode_of(tmp: &tempfile::TempDir) -> u32 {
        std::fs::metadata(tmp.path().join("f"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn a_write_the_kernel_flags_clears_setuid_and_says_the_mode_is_stale() {
        let (tmp, fs, ino) = fixture(0o6755);
        let fh = fs.open(ino, libc::O_RDWR).unwrap().fh;
        let c = fs.write_by(write_by(false), ino, fh, 0, b"ab");
        assert_eq!(c.result.unwrap(), 2);
        assert!(!c.mode_stale);
        assert_eq!(mode_of(&tmp), 0o6755, "an unflagged write keeps the bits");
        let c = fs.write_by(write_by(true), ino, fh, 0, b"cd");
        assert_eq!(c.result.unwrap(), 2);
        assert!(c.mode_stale);
        assert_eq!(mode_of(&tmp), 0o755);
        // Nothing left to clear: the kernel's cache is not dropped again.
        let c = fs.write_by(write_by(true), ino, fh, 0, b"ef");
        assert!(!c.mode_stale);
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"ef23456789");
    }

    #[test]
    fn a_truncate_clears_setuid_unless_the_caller_has_cap_fsetid_or_sets_the_mode() {
        let (tmp, fs, ino) = fixture(0o4755);
        let truncate = SetAttr {
            size: Some(4),
            ..SetAttr::default()
        };
        // This test process runs as root; with CAP_FSETID it keeps the bit, as in the kernel.
        let me = Caller {
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        };
        let c = fs.setattr_by(me, ino, &truncate);
        assert_eq!(c.result.unwrap().size, 4);
        let privileged = sys::has_cap_fsetid(me.pid);
        assert_eq!(c.mode_stale, !privileged);
        assert_eq!(mode_of(&tmp), if privileged { 0o4755 } else { 0o755 });

        let (tmp, fs, ino) = fixture(0o4755);
        let chmod_too = SetAttr {
            mode: Some(0o4700),
            ..truncate
        };
        let c = fs.setattr_by(PLAIN, ino, &chmod_too);
        assert!(!c.mode_stale);
        assert_eq!(c.result.unwrap().perm, 0o4700);
        assert_eq!(mode_of(&tmp), 0o4700);

        let c = fs.setattr_by(PLAIN, ino, &truncate);
        assert!(c.mode_stale);
        assert_eq!(c.result.unwrap().perm, 0o700);
    }

    #[test]
    fn fallocate_and_copy_file_range_clear_setuid_of_the_file_they_change() {
        let (tmp, fs, ino) = fixture(0o4755);
        let fh = fs.open(ino, libc::O_RDWR).unwrap().fh;
        let c = fs.fallocate_by(PLAIN, ino, fh, 0, 4096, 0);
        c.result.unwrap();
        assert!(c.mode_stale);
        assert_eq!(mode_of(&tmp), 0o755);

        std::fs::set_permissions(tmp.path().join("f"), PermissionsExt::from_mode(0o4755)).unwrap();
        std::fs::write(tmp.path().join("src"), b"xyz").unwrap();
        let src = fs.lookup(ROOT_INO, OsStr::new("src")).unwrap().attr.ino;
        let src_fh = fs.open(src, libc::O_RDONLY).unwrap().fh;
        let c = fs.copy_file_range_by(PLAIN, src_fh, 0, ino, fh, 0, 3);
        assert_eq!(c.result.unwrap(), 3);
        assert!(c.mode_stale);
        assert_eq!(mode_of(&tmp), 0o755);
    }

    #[test]
    fn an_o_trunc_open_leaves_the_kernel_mode_stale_and_a_plain_one_does_not() {
        let (_tmp, fs, ino) = fixture(0o644);
        let owner = Caller {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        let c = fs.open_by(owner, ino, libc::O_RDONLY);
        c.result.unwrap();
        assert!(!c.mode_stale);
        let c = fs.open_by(owner, ino, libc::O_WRONLY | libc::O_TRUNC);
        c.result.unwrap();
        assert!(c.mode_stale);
        // A failed open changed nothing.
        let c = fs.open_by(owner, ROOT_INO, libc::O_WRONLY | libc::O_TRUNC);
        assert!(c.result.is_err());
        assert!(!c.mode_stale);
    }
}
