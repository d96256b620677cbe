//! Operations on regular files of the live tree: open, create, read, write, fsync, fallocate,
//! lseek, copy_file_range, release (`Files for Live`), after the public operations that forward
//! each call to the tree owning its inode or handle (`tree.rs`). Every content change goes
//! through the write gate (`gate.rs`); a read only waits for writes parked on its range during
//! a capture, and for a rollback rewriting its volume (`track::hold`).
//!
//! It must never write to the backing file outside the gate, and never hand the backing open
//! a flag that breaks tracking (`STRIPPED_OPEN_FLAGS`).

use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::AtomicI32;

use super::*;

// fallocate(2) mode bits (linux/falloc.h).
const FALLOC_PUNCH_HOLE: i32 = 0x02;
const FALLOC_COLLAPSE_RANGE: i32 = 0x08;
const FALLOC_ZERO_RANGE: i32 = 0x10;
const FALLOC_INSERT_RANGE: i32 = 0x20;

/// Open flags the backing open must not get. O_APPEND: the kernel already computes the append
/// offset and serialises appends per inode, and with O_APPEND Linux pwrite ignores the offset, so
/// tracking would record the wrong blocks. O_DIRECT: the kernel's buffers are not aligned for
/// the backing file (qemu cache=none depends on O_DIRECT opens working at all). O_CREAT, O_EXCL
/// and O_NOFOLLOW are meaningless on a reopen of an inode we already hold.
const STRIPPED_OPEN_FLAGS: libc::c_int = libc::O_APPEND
    | libc::O_DIRECT
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOFOLLOW
    | libc::O_NOCTTY;

/// The pid of the child `flush_kernel_cache` runs, while it runs (0: none): its FSYNC
/// requests need no backing fsync (`fsync_by`).
static FLUSHER: AtomicI32 = AtomicI32::new(0);

/// One `flush_kernel_cache` at a time (a snapshot and a live diff may both want one); never
/// taken by a request.
static FLUSHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Rounds of `flush_kernel_cache` for files whose name moved while it ran.
const FLUSH_ROUNDS: usize = 3;

impl OverlayFs {
    /// Push every page the kernel may hold dirty for this mount (write-back cache, shared
    /// writable mappings) through the daemon's write path, and return once the daemon has
    /// answered every one of those writes: what the snapshot barrier, a rollback and a live
    /// diff do first, so a write that returned before them is in the volumes.
    ///
    /// A `syncfs` of the mount is not enough: on Linux 6.18 it returned before an unsynced
    /// 3 MiB write had reached the daemon (FUSE ends a page's writeback when the page is
    /// copied into a request, not when the daemon answers). An fsync of a FUSE file does wait:
    /// `fuse_fsync` writes the inode's dirty pages back and waits for the daemon's replies to
    /// them (`fuse_sync_writes`) before it sends FSYNC. So every inode with a writable handle
    /// open here is opened through the mount at `mountpoint` and fsynced. Only those can hold
    /// dirty pages: the kernel writes back through a writable open file of the inode, and
    /// writes back and waits before it sends the RELEASE of the last one.
    ///
    /// The fsyncs run in a child process (`sys::fsync_in_child`), and the caller must hold no
    /// lock a request needs nor any gate closed: the WRITE and FSYNC requests they cause are
    /// served by this daemon's own threads.
    pub fn flush_kernel_cache(&self, mountpoint: &Path) -> std::io::Result<()> {
        let _one = FLUSHING.lock().unwrap_or_else(|p| p.into_inner());
        let mut only: Option<Vec<u64>> = None;
        for _ in 0..FLUSH_ROUNDS {
            let targets = self.writable_inodes(mountpoint, only.as_deref());
            if targets.is_empty() {
                return Ok(());
            }
            let failed = sys::fsync_in_child(&targets, |pid| FLUSHER.store(pid, Ordering::SeqCst));
            FLUSHER.store(0, Ordering::SeqCst);
            let failed = failed?;
            if failed.is_empty() {
                return Ok(());
            }
            // A name that moved or went while we looked: look again for those inodes only.
            only = Some(failed.iter().map(|&i| targets[i].ino).collect());
        }
        let left = self.writable_inodes(mountpoint, only.as_deref());
        if left.is_empty() {
            return Ok(());
        }
        Err(std::io::Error::other(format!(
            "{} open file(s) could not be flushed through the mount, first {:?}",
            left.len(),
            left[0].path
        )))
    }

    /// The inodes with a writable handle open (`only` those among them, if given), by their
    /// current name under `mountpoint`. An unlinked file is left out: no snapshot, rollback or
    /// diff reaches it by name.
    fn writable_inodes(&self, mountpoint: &Path, only: Option<&[u64]>) -> Vec<sys::FsyncTarget> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        // The backing dir as the kernel names it (resolved), to find each file's name in it.
        let backing = match self.inodes.get(ROOT_INO) {
            Ok(root) => std::fs::read_link(format!("/proc/self/fd/{}", root.raw_fd()))
                .unwrap_or_else(|_| self.backing.clone()),
            Err(_) => self.backing.clone(),
        };
        for h in self.files.all() {
            let fd = h.file.as_raw_fd();
            let writable = sys::open_flags(fd).is_ok_and(|f| f & libc::O_ACCMODE != libc::O_RDONLY);
            if !writable
                || only.is_some_and(|o| !o.contains(&h.inode.ino))
                || !seen.insert(h.inode.ino)
            {
                continue;
            }
            if sys::fstat(fd).is_ok_and(|st| st.st_nlink == 0) {
                continue;
            }
            let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
                continue;
            };
            let Ok(rel) = path.strip_prefix(&backing) else {
                log::warn!(
                    "flush: {} is not under the backing dir {}: its cached writes are not \
                     flushed before this snapshot",
                    path.display(),
                    backing.display()
                );
                continue;
            };
            let Ok(path) = CString::new(mountpoint.join(rel).into_os_string().into_vec()) else {
                continue;
            };
            out.push(sys::FsyncTarget {
                path,
                ino: h.inode.ino,
            });
        }
        out
    }

    /// `fsync` asked by process `pid`. The daemon's own flush (`flush_kernel_cache`) only
    /// needs the kernel's dirty pages to have reached the backing files, which they have when
    /// its FSYNC arrives: it gets no backing fsync, so a snapshot never forces every open
    /// volume to disk (a snapshot's durability comes from its own commit, not the volumes').
    pub fn fsync_by(&self, pid: u32, fh: u64, datasync: bool) -> FsResult<()> {
        let flusher = FLUSHER.load(Ordering::SeqCst);
        if flusher != 0 && flusher as u32 == pid {
            return self.tree_fh(fh).handle_ino(fh).map(drop);
        }
        self.fsync(fh, datasync)
    }

    // ---- files: each forwarded to the tree that owns its inode or handle ----

    /// Open a regular file.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        self.tree(ino).open(None, ino, flags)
    }

    /// Create and open a regular file (O_EXCL and O_TRUNC honoured by the backing open).
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Entry, Opened)> {
        self.tree(parent)
            .create(caller, parent, name, mode, umask, flags)
    }

    /// Read up to `size` bytes at `offset` and pass them to `with` (short only at end of file).
    pub fn read<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        with: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = self.tree_fh(fh).read(fh, offset, size, &mut buf)?;
            Ok(with(&buf[..n]))
        })
    }

    /// Write all of `data` at `offset`; short only when the backing file took part of it and
    /// then failed (ENOSPC), as pwrite(2) reports it.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.tree_fh(fh).write(fh, offset, data, false)
    }

    /// `write` for a caller that cannot take a short count: all of `data`, or the error that
    /// stopped it (part of it may be written then, as after a failed direct write). The
    /// kernel's direct I/O path (O_DIRECT opens, with FUSE_ASYNC_DIO) turns a short write
    /// reply into EIO: an O_DIRECT write that ran out of space part way failed with EIO, and
    /// nothing was logged, since no operation had failed here (the one path found that fits
    /// issue 9's unexplained O_DIRECT fsx failure, if its disk was full for a moment).
    pub fn write_whole(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.tree_fh(fh).write(fh, offset, data, true)
    }

    /// Called on every close(2) of a descriptor; nothing is buffered here, so nothing to do.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.tree_fh(fh).flush(fh)
    }

    /// The last close of an open file.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.tree_fh(fh).release(fh)
    }

    /// fsync or fdatasync the backing file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.tree_fh(fh).fsync(fh, datasync)
    }

    /// fallocate(2), including FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        self.tree_fh(fh).fallocate(fh, offset, length, mode)
    }

    /// lseek(2) on the backing file: SEEK_DATA and SEEK_HOLE see its real holes.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        self.tree_fh(fh).lseek(fh, offset, whence)
    }

    /// copy_file_range(2) between two open files (reflinks where the backing fs can); routed
    /// by the file it changes.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        self.tree_fh(fh_out)
            .copy_file_range(fh_in, off_in, fh_out, off_out, len)
    }

    /// The inode number an open file handle refers to (for the tracking layer to come).
    pub fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        self.tree_fh(fh).handle_ino(fh)
    }
}

impl Files for Live<'_> {
    /// An `O_TRUNC` open by a `caller` runs as the caller, so the backing filesystem clears
    /// setuid/setgid as it does for a truncate by a non-owner.
    fn open(&self, caller: Option<Caller>, ino: u64, flags: i32) -> FsResult<Opened> {
        let inode = self.inodes.get(ino)?;
        if inode.kind != FileKind::Regular {
            // Devices and fifos are handled by the kernel; a symlink is never opened by us.
            return Err(FsError::backing("open")(std::io::Error::from_raw_os_error(
                if inode.kind == FileKind::Directory {
                    libc::EISDIR
                } else {
                    libc::ELOOP
                },
            )));
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY || truncate;
        let volume = if writable {
            self.volume_of(&inode, false)
        } else {
            None
        };
        let old = std::cell::Cell::new(0u64);
        let fd = self.tracked(
            volume.as_ref(),
            || {
                if truncate {
                    old.set(self.stat_of(&inode)?.st_size as u64);
                }
                Ok((0, old.get()))
            },
            || {
                let reopen = || {
                    self.open_for_kernel(flags & !STRIPPED_OPEN_FLAGS, |f| {
                        sys::reopen(inode.raw_fd(), f)
                    })
                };
                match caller {
                    Some(c) if truncate => self.as_caller(c, reopen),
                    _ => reopen(),
                }
                .map_err(FsError::backing("open"))
            },
            |v, _, _, _| {
                if truncate {
                    v.record_truncate(old.get(), 0, now_ns())
                }
            },
        )?;
        self.register_file(File::from(fd), inode, volume)
    }

    fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Entry, Opened)> {
        let parent_inode = self.inodes.get(parent)?;
        self.check_not_store(&parent_inode, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing("create"))?;
        // With tracking, O_TRUNC is not left to the open: the name is only resolved by the
        // open itself, so which inode it truncates is known only after it. The file is opened
        // without it, and the truncation then runs on that inode's volume like any other
        // change (inside its gate, copy-before-write first, recorded), as the caller, so the
        // backing filesystem clears setuid/setgid as an O_TRUNC by the caller would.
        let accmode = flags & libc::O_ACCMODE;
        let truncate_after =
            self.tracker.is_some() && flags & libc::O_TRUNC != 0 && accmode != libc::O_RDONLY;
        let mut open_flags = (flags & !(libc::O_APPEND | libc::O_DIRECT | libc::O_NOCTTY))
            | libc::O_CREAT
            | libc::O_NOFOLLOW;
        if truncate_after {
            open_flags &= !libc::O_TRUNC;
        }
        // A file created here is tracked from birth; an existing one may have a history.
        let existed = sys::fstatat(parent_inode.raw_fd(), &c).is_ok();
        let fd = self
            .as_caller(caller, || {
                self.open_for_kernel(open_flags, |f| {
                    sys::openat(parent_inode.raw_fd(), &c, f, (mode & !umask) & 0o7777)
                })
            })
            .map_err(FsError::backing("create"))?;
        if truncate_after {
            let st = sys::fstat(fd.as_raw_fd()).map_err(FsError::backing("create"))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size > 0 {
                let volume = self.tracker.as_ref().map(|t| {
                    let v = t.volume(volume_id(BackingKey::of(&st)), st.st_size as u64, false);
                    v.first_stamp(&st);
                    v
                });
                let old = std::cell::Cell::new(0u64);
                self.tracked(
                    volume.as_ref(),
                    || {
                        old.set(
                            sys::fstat(fd.as_raw_fd())
                                .map_err(FsError::backing("create"))?
                                .st_size as u64,
                        );
                        Ok((0, old.get()))
                    },
                    || {
                        self.as_caller(caller, || sys::ftruncate(fd.as_raw_fd(), 0))
                            .map_err(FsError::backing("create"))
                    },
                    |v, _, _, _| v.record_truncate(old.get(), 0, now_ns()),
                )?;
            }
        }
        let entry = self.lookup_in(&parent_inode, name)?;
        let inode = self.inodes.get(entry.attr.ino)?;
        if inode.key
            != BackingKey::of(&sys::fstat(fd.as_raw_fd()).map_err(FsError::backing("create"))?)
        {
            // Someone replaced the name between our open and our lookup: refuse rather than
            // hand the kernel a handle on one inode under the number of another.
            self.inodes.forget(entry.attr.ino, 1);
            return Err(FsError::backing("create")(
                std::io::Error::from_raw_os_error(libc::EAGAIN),
            ));
        }
        let volume = self.volume_of(&inode, !existed);
        // The kernel counts the lookup only if the reply goes out: on failure, give it back.
        let opened = self
            .register_file(File::from(fd), inode, volume)
            .inspect_err(|_| self.inodes.forget(entry.attr.ino, 1))?;
        Ok((entry, opened))
    }

    fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> FsResult<usize> {
        let h = self.files.get(fh)?;
        if let Some(v) = self.parked_on(&h) {
            v.settle(offset, size as u64);
        }
        // While a rollback rewrites volumes, a read waits for it in the volume's gate (shared
        // side), so it sees each block before or after the rollback, never a mix.
        let pass = crate::track::ReadPass::begin();
        let held = pass
            .held()
            .then(|| h.volume.clone().or_else(|| self.tracked_volume(&h.inode)))
            .flatten();
        let _gate = held.as_ref().map(|v| v.enter());
        sys::pread_into(h.file.as_raw_fd(), buf, size as usize, offset)
            .map_err(FsError::backing("read"))?;
        Ok(buf.len())
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8], whole: bool) -> FsResult<u32> {
        let h = self.files.get(fh)?;
        let len = data.len() as u64;
        let written = self.tracked_or_deferred(
            h.volume.as_ref(),
            || Ok((offset, len)),
            |v| {
                // O_SYNC and O_DSYNC writes must be on disk when they return: never parked.
                // Nor a write to a file with capabilities: the backing filesystem drops them
                // when the bytes land, and an exec must not find the new bytes with the old
                // capabilities.
                if crate::track::any_capture()
                    && sys::open_flags(h.file.as_raw_fd()).is_ok_and(|f| f & libc::O_DSYNC == 0)
                    && !sys::has_file_caps(h.file.as_raw_fd())
                {
                    return v
                        .defer_write(offset, data)
                        .map(|parked| parked.then_some(data.len()))
                        .map_err(FsError::backing("write"));
                }
                Ok(None)
            },
            || {
                let fd = h.file.as_raw_fd();
                let mut done =
                    sys::pwrite_all(fd, data, offset).map_err(FsError::backing("write"))?;
                // Short: the backing file failed after part of it. Go on with the rest, which
                // either fails at once with that error or (space came back) makes progress.
                while whole && done < data.len() {
                    done += sys::pwrite_all(fd, &data[done..], offset + done as u64)
                        .map_err(FsError::backing("write"))?;
                }
                Ok(done)
            },
            |v, done, _, _| match done {
                Some(_) => {
                    let sequential = h.last_end.swap(offset + len, Ordering::Relaxed) == offset;
                    v.record_write(offset, len, sequential, now_ns())
                }
                None => v.record_zero(offset, len, now_ns()),
            },
        )?;
        Ok(written as u32)
    }

    fn flush(&self, fh: u64) -> FsResult<()> {
        self.files.get(fh).map(drop)
    }

    fn release(&self, fh: u64) -> FsResult<()> {
        self.files.remove(fh)
    }

    fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.files.get(fh)?;
        if let Some(v) = self.parked_on(&h) {
            v.settle(0, 0);
        }
        if let Some(v) = &h.volume {
            // A write parked during a capture that failed when it landed, reported as the
            // kernel reports a failed writeback.
            if let Some(e) = v.take_write_error() {
                return Err(FsError::backing("fsync")(e));
            }
        }
        sys::fsync(h.file.as_raw_fd(), datasync).map_err(FsError::backing("fsync"))
    }

    fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let h = self.files.get(fh)?;
        let old = std::cell::Cell::new(0u64);
        self.tracked(
            h.volume.as_ref(),
            || {
                let old_size = sys::fstat(h.file.as_raw_fd())
                    .map_err(FsError::backing("fallocate"))?
                    .st_size as u64;
                old.set(old_size);
                let old = old_size;
                // Which content changes: punch hole and zero range zero the blocks they touch
                // (within the old size; past it the file only grows); collapse and insert shift
                // everything from the offset on; plain allocation changes only the size.
                Ok(if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 {
                    let end = old.min(offset.saturating_add(length));
                    (offset, end.saturating_sub(offset))
                } else if mode & (FALLOC_COLLAPSE_RANGE | FALLOC_INSERT_RANGE) != 0 {
                    (offset, (old + length).saturating_sub(offset))
                } else {
                    (offset, 0)
                })
            },
            || {
                sys::fallocate(h.file.as_raw_fd(), mode, offset, length)
                    .map_err(FsError::backing("fallocate"))
            },
            |v, _, start, len| {
                let now = now_ns();
                v.record_zero(start, len, now);
                if let Ok(st) = sys::fstat(h.file.as_raw_fd()) {
                    if st.st_size as u64 != old.get() {
                        v.record_truncate(old.get(), st.st_size as u64, now);
                    }
                }
            },
        )
    }

    fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.files.get(fh)?;
        if whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE {
            if let Some(v) = self.parked_on(&h) {
                v.settle(0, 0);
            }
        }
        sys::lseek(h.file.as_raw_fd(), offset, whence).map_err(FsError::backing("lseek"))
    }

    fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        // Routed by `fh_out`; the source may still be the view's. Snapshot data is not in a
        // file the kernel could copy from: EXDEV makes it fall back to reading and writing
        // (ENOSYS would turn copy_file_range off for the mount).
        if snapview::owns_fh(fh_in) {
            return Err(FsError::backing("copy_file_range")(
                std::io::Error::from_raw_os_error(libc::EXDEV),
            ));
        }
        let a = self.files.get(fh_in)?;
        let b = self.files.get(fh_out)?;
        if let Some(v) = self.parked_on(&a) {
            v.settle(off_in, len);
        }
        // The source is read here like any read: counted while no rollback holds reads (the
        // pass lives until the copy is done). While one does, EXDEV makes the kernel copy by
        // read and write, each of which waits for the rollback in its own volume's gate
        // (entering two gates here could cross the rollback's id order).
        let pass = crate::track::ReadPass::begin();
        if pass.held() && (a.volume.is_some() || self.tracked_volume(&a.inode).is_some()) {
            return Err(FsError::backing("copy_file_range")(
                std::io::Error::from_raw_os_error(libc::EXDEV),
            ));
        }
        self.tracked(
            b.volume.as_ref(),
            || Ok((off_out, len)),
            || {
                sys::copy_file_range(a.file.as_raw_fd(), off_in, b.file.as_raw_fd(), off_out, len)
                    .map_err(FsError::backing("copy_file_range"))
            },
            |v, n, _, _| match n {
                Some(n) => v.record_write(off_out, *n, false, now_ns()),
                None => v.record_zero(off_out, len, now_ns()),
            },
        )
    }
    fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        Ok(self.files.get(fh)?.inode.ino)
    }

    fn describe_fh(&self, fh: u64) -> String {
        match self.files.get(fh) {
            Ok(h) => format!("inode {} ({})", h.inode.ino, fd_path(h.file.as_raw_fd())),
            Err(_) => format!("file handle {fh} (released)"),
        }
    }
}
