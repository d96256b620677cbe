//! The adapter, and with `session` the only code that touches fuser: it links fuser's method
//! calls into `OverlayFs` and turns each `Result` into a reply. It only translates: no
//! filesystem logic lives here, and no decision either (who loses setuid/setgid is decided by
//! `OverlayFs`, from the kernel's facts passed on here). The errno is decided by
//! `FsError::errno`, every failure is logged and answered by `FuseAdapter::answer` (an EIO at
//! warn, naming the operation and the file), and the kernel cache policy by `KernelCache`
//! (documented there).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};

use crate::fs::{
    Attr, Caller, Changed, Entry, FileKind, FsError, OverlayFs, SetAttr, SetTime, Validity,
    WriteBy, Xattr,
};

pub mod session;

/// Kernel cache settings, chosen on purpose:
///
/// - Writeback cache is a choice (config `fuse.writeback_cache`, off by default). Off, every
///   write is a synchronous request: a write() returns after the daemon wrote the backing file,
///   so draining the daemon's in-flight requests is enough for the snapshot barrier (DESIGN.md)
///   to see every write that returned before it. On (FUSE_WRITEBACK_CACHE), a write() returns
///   once it is in the kernel's page cache and reaches the daemon later, in large requests,
///   through any writable handle of the inode; the barrier then sees what returned before it
///   only because the engine's flush (`OverlayFs::flush_kernel_cache`: an fsync through the
///   mount of every inode with a writable handle) writes back every dirty page of the mount
///   and waits for the daemon's replies before it. What the
///   kernel then does itself: O_APPEND offsets (the backing open never gets O_APPEND anyway),
///   mtime and ctime (sent back as setattr), and the page reads that fill a page a write covers
///   in part (so write-only opens are read-write in the backing, `OverlayFs::
///   with_writeback_cache`). Tracking stays exact per block: a page never straddles a block.
/// - Attribute and entry timeouts default to 1 s (config `[cache]`): stat-heavy programs (git,
///   tar) stop paying a round trip per stat, while a change made behind the overlay's back is
///   seen within a second. Changes made through the mount are always seen at once, because the
///   kernel updates or invalidates its own cache on them. A name that does not exist is
///   answered with a negative entry for the same entry timeout (not an ENOENT, which the
///   kernel cannot cache), except where the directory's entries are not cached at all
///   (`.snapshots` and each `<name>` in it); a create, link or rename through the mount
///   replaces the kernel's negative entry at once.
/// - keep_cache is set on open only when the file's size, mtime and ctime are the same as at its
///   previous open, so re-reading an unchanged volume is served from the page cache, and a file
///   changed behind our back is never served stale.
/// - The snapshot view (`OverlayFs::validity`): `.snapshots` and each `<name>` in it are never
///   cached, so a new snapshot shows at once and a deleted one is gone at once; everything
///   below a `<name>` never changes and is cached for `IMMUTABLE_TTL`.
#[derive(Clone, Copy, Debug)]
pub struct KernelCache {
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    /// Ask the kernel for FUSE_WRITEBACK_CACHE (config `fuse.writeback_cache`).
    pub writeback: bool,
}

/// Entry and attribute timeout of what a snapshot holds. Any long value is right for content
/// that never changes; an hour bounds the memory the kernel spends on a deleted snapshot's
/// dentries, which nothing can reach once its `<name>` is gone.
pub const IMMUTABLE_TTL: Duration = Duration::from_secs(3600);

/// Largest write the kernel sends in one request. 1 MiB halves the request count of the
/// sequential benchmark against fuser's 128 KiB kernel default while keeping per-thread
/// buffers small.
pub const MAX_WRITE: u32 = 1 << 20;

/// The fuser `Filesystem` for an `OverlayFs`.
pub struct FuseAdapter {
    fs: Arc<OverlayFs>,
    cache: KernelCache,
    /// Set once the session exists (`notifier_slot`): tells the kernel of attribute changes
    /// it did not ask for.
    notifier: Arc<OnceLock<Notifier>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<OverlayFs>, cache: KernelCache) -> FuseAdapter {
        FuseAdapter {
            fs,
            cache,
            notifier: Arc::new(OnceLock::new()),
        }
    }

    /// Where the daemon puts the session's notifier after mounting.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// The kernel caches a mode we changed behind its back (clearing setuid/setgid): drop
    /// its attributes so the next stat or exec asks again.
    fn forget_attrs(&self, ino: INodeNo) {
        if let Some(n) = self.notifier.get() {
            // Offset -1: attributes only, no page cache (and no lock the request holds).
            if let Err(e) = n.inval_inode(ino, -1, 0) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    warn!("invalidating the attributes of inode {}: {e}", ino.0);
                }
            }
        }
    }
}

/// The file an operation was on, for the log; named only when a failure is logged.
#[derive(Clone, Copy)]
enum On<'a> {
    Ino(INodeNo),
    Fh(FileHandle),
    Name(INodeNo, &'a OsStr),
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0 tells the kernel the name does not exist,
/// and the entry timeout says how long it may believe so; the rest is ignored.
fn negative() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn fopen(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

/// A fuser reply that can carry an error: every kind has `error`, but no common trait.
trait Reply {
    fn error(self, e: Errno);
}

macro_rules! replies {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}

replies!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

impl FuseAdapter {
    /// The errno to answer a failed `op` on `on` with, after logging it: every failure goes
    /// through here, so an EIO a program sees is always in the log (`fs::report`).
    fn fail(&self, op: &'static str, on: On<'_>, e: &FsError) -> Errno {
        crate::fs::report(
            op,
            || match on {
                On::Ino(ino) => self.fs.describe(ino.0),
                On::Fh(fh) => self.fs.describe_fh(fh.0),
                On::Name(parent, name) => format!("{name:?} in {}", self.fs.describe(parent.0)),
            },
            e,
        );
        Errno::from_i32(e.errno())
    }

    /// Answer `op` on `on`: `ok` replies with the value, a failure goes through `fail`. The
    /// one error branch of every handler.
    fn answer<R: Reply, T>(
        &self,
        op: &'static str,
        on: On<'_>,
        reply: R,
        r: Result<T, FsError>,
        ok: impl FnOnce(R, T),
    ) {
        match r {
            Ok(v) => ok(reply, v),
            Err(e) => reply.error(self.fail(op, on, &e)),
        }
    }

    /// Reply to an operation that returns nothing.
    fn empty(&self, op: &'static str, on: On<'_>, reply: ReplyEmpty, r: Result<(), FsError>) {
        self.answer(op, on, reply, r, |reply, ()| reply.ok())
    }

    /// The timeouts (attributes, entry) of `ino`.
    fn ttl(&self, ino: u64) -> (Duration, Duration) {
        match self.fs.validity(ino) {
            Validity::Configured => (self.cache.attr_ttl, self.cache.entry_ttl),
            Validity::Uncached => (Duration::ZERO, Duration::ZERO),
            Validity::Immutable => (IMMUTABLE_TTL, IMMUTABLE_TTL),
        }
    }

    /// Reply to an operation that returns a looked-up entry.
    fn entry(&self, op: &'static str, on: On<'_>, reply: ReplyEntry, r: Result<Entry, FsError>) {
        self.answer(op, on, reply, r, |reply, e| {
            reply.entry(
                &self.ttl(e.attr.ino).1,
                &attr(&e.attr),
                Generation(e.generation),
            )
        })
    }

    /// Reply to an operation that returns attributes.
    fn attr(&self, op: &'static str, on: On<'_>, reply: ReplyAttr, r: Result<Attr, FsError>) {
        self.answer(op, on, reply, r, |reply, a| {
            reply.attr(&self.ttl(a.ino).0, &attr(&a))
        })
    }

    /// Reply to getxattr and listxattr.
    fn xattr(&self, op: &'static str, on: On<'_>, reply: ReplyXattr, r: Result<Xattr, FsError>) {
        self.answer(op, on, reply, r, |reply, x| match x {
            Xattr::Size(n) => reply.size(n),
            Xattr::Data(d) => reply.data(&d),
        })
    }

    /// The result of a change that may have cleared setuid/setgid, once the kernel's cached
    /// attributes of `ino` are dropped if it did.
    fn unstale<T>(&self, ino: INodeNo, c: Changed<T>) -> Result<T, FsError> {
        if c.mode_stale {
            self.forget_attrs(ino);
        }
        c.result
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        // Each capability is optional: an older kernel without one still mounts.
        for cap in [
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Without it the kernel asks for `security.capability` (a GETXATTR round trip)
            // before every write, to see whether the write must drop it: measured, 4 KiB
            // random writes went from 12,500 to 18,900 IOPS with it. The daemon then clears
            // setuid/setgid itself (`fs::setid`); the backing filesystem drops file
            // capabilities on every change by itself.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks {cap:?}");
            }
        }
        if self.cache.writeback {
            // Without it the mount simply stays write-through: every guarantee of that mode
            // holds, only the speed of write-back is lost.
            match config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                Ok(()) => info!("kernel write-back cache on (fuse.writeback_cache = true)"),
                Err(_) => warn!(
                    "fuse.writeback_cache = true, but the kernel lacks FUSE_WRITEBACK_CACHE: \
                     writes stay write-through"
                ),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            // A negative entry (node id 0) the kernel may keep as long as the directory's
            // entries (`KernelCache`): a name looked up again and again while missing (git's
            // .gitignore per directory, include and module search paths) costs one request.
            Err(e) if e.errno() == libc::ENOENT && !self.ttl(parent.0).1.is_zero() => {
                reply.entry(&self.ttl(parent.0).1, &negative(), Generation(0))
            }
            r => self.entry("lookup", On::Name(parent, name), reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.fs.getattr(ino.0, fh.map(|f| f.0));
        self.attr("getattr", On::Ino(ino), reply, r)
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        let r = self.unstale(ino, self.fs.setattr_by(caller(req), ino.0, &set));
        self.attr("setattr", On::Ino(ino), reply, r)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.fs.readlink(ino.0);
        self.answer("readlink", On::Ino(ino), reply, r, |reply, t| {
            reply.data(&t)
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .mknod(caller(req), parent.0, name, mode, umask, rdev);
        self.entry("mknod", On::Name(parent, name), reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            "mkdir",
            On::Name(parent, name),
            reply,
            self.fs.mkdir(caller(req), parent.0, name, mode, umask),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.fs.unlink(parent.0, name);
        self.empty("unlink", On::Name(parent, name), reply, r)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.fs.rmdir(parent.0, name);
        self.empty("rmdir", On::Name(parent, name), reply, r)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(
            "symlink",
            On::Name(parent, link_name),
            reply,
            self.fs.symlink(caller(req), parent.0, link_name, target),
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        self.empty("rename", On::Name(parent, name), reply, r)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            "link",
            On::Ino(ino),
            reply,
            self.fs.link(ino.0, newparent.0, newname),
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.unstale(ino, self.fs.open_by(caller(req), ino.0, flags.0));
        self.answer("open", On::Ino(ino), reply, r, |reply, o| {
            reply.opened(FileHandle(o.fh), fopen(o.keep_cache))
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The reply is consumed inside the closure; only a failed read leaves it to answer.
        let mut reply = Some(reply);
        let r = self.fs.read(fh.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let Some(reply) = reply {
            self.answer("read", On::Fh(fh), reply, r, |_, ()| ());
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let by = WriteBy {
            caller: caller(req),
            kill_suidgid: write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
            open_flags: flags.0,
        };
        let r = self.unstale(ino, self.fs.write_by(by, ino.0, fh.0, offset, data));
        self.answer("write", On::Fh(fh), reply, r, |reply, n| reply.written(n))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered in the daemon and it keeps no locks, so a close has nothing to
        // wait for here: ENOSYS makes the kernel stop sending FLUSH (one round trip less per
        // close). The kernel still writes back a write-back mount's dirty pages of the file
        // before the close returns (`fuse_flush` does that before it looks at `no_flush`).
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty("release", On::Fh(fh), reply, self.fs.release(fh.0))
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.fsync_by(req.pid(), fh.0, datasync);
        self.empty("fsync", On::Fh(fh), reply, r)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.fs.opendir(ino.0);
        self.answer("opendir", On::Ino(ino), reply, r, |reply, o| {
            reply.opened(FileHandle(o.fh), FopenFlags::empty())
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.fs.readdir(ino.0, fh.0, offset, |d| {
            reply.add(INodeNo(d.ino), d.offset, kind(d.kind), &d.name)
        });
        self.answer("readdir", On::Ino(ino), reply, r, |reply, ()| reply.ok())
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.fs.readdirplus(ino.0, fh.0, offset, |d, e| match e {
            // One timeout for both: fuser sends the same for the entry and its attributes.
            Some(e) => reply.add(
                INodeNo(d.ino),
                d.offset,
                &d.name,
                &self.ttl(e.attr.ino).1,
                &attr(&e.attr),
                Generation(e.generation),
            ),
            None => {
                // "." and "..": the kernel ignores their attributes and takes no reference.
                let placeholder = FileAttr {
                    ino: INodeNo(d.ino),
                    size: 0,
                    blocks: 0,
                    atime: SystemTime::UNIX_EPOCH,
                    mtime: SystemTime::UNIX_EPOCH,
                    ctime: SystemTime::UNIX_EPOCH,
                    crtime: SystemTime::UNIX_EPOCH,
                    kind: FileType::Directory,
                    perm: 0o755,
                    nlink: 2,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    flags: 0,
                };
                reply.add(
                    INodeNo(d.ino),
                    d.offset,
                    &d.name,
                    &Duration::ZERO,
                    &placeholder,
                    Generation(0),
                )
            }
        });
        self.answer("readdirplus", On::Ino(ino), reply, r, |reply, ()| {
            reply.ok()
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty("releasedir", On::Ino(ino), reply, self.fs.releasedir(fh.0))
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.fsyncdir(fh.0, datasync);
        self.empty("fsyncdir", On::Ino(ino), reply, r)
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = self.fs.statfs(ino.0);
        self.answer("statfs", On::Ino(ino), reply, r, |reply, s| {
            reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            )
        })
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.setxattr(ino.0, name, value, flags);
        self.empty("setxattr", On::Ino(ino), reply, r)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.fs.getxattr(ino.0, name, size);
        self.xattr("getxattr", On::Ino(ino), reply, r)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.fs.listxattr(ino.0, size);
        self.xattr("listxattr", On::Ino(ino), reply, r)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.fs.removexattr(ino.0, name);
        self.empty("removexattr", On::Ino(ino), reply, r)
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.fs.access(caller(req), ino.0, mask.bits());
        self.empty("access", On::Ino(ino), reply, r)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .fs
            .create(caller(req), parent.0, name, mode, umask, flags);
        self.answer(
            "create",
            On::Name(parent, name),
            reply,
            r,
            |reply, (e, o)| {
                reply.created(
                    &self.ttl(e.attr.ino).1,
                    &attr(&e.attr),
                    Generation(e.generation),
                    FileHandle(o.fh),
                    fopen(o.keep_cache),
                )
            },
        )
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let c = self
            .fs
            .fallocate_by(caller(req), ino.0, fh.0, offset, length, mode);
        self.empty("fallocate", On::Fh(fh), reply, self.unstale(ino, c))
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self.fs.lseek(fh.0, offset, whence);
        self.answer("lseek", On::Fh(fh), reply, r, |reply, o| reply.offset(o))
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The kernel caps one request well below 4 GiB; the clamp only guards the u32 reply.
        let len = len.min(u32::MAX as u64 & !0xfff);
        let c = self.fs.copy_file_range_by(
            caller(req),
            fh_in.0,
            offset_in,
            ino_out.0,
            fh_out.0,
            offset_out,
            len,
        );
        let r = self.unstale(ino_out, c);
        if let Err(e) = &r {
            // EXDEV is the normal answer for a source in `.snapshots` (the kernel then
            // copies by reading and writing); EIO is warned about by `fail`.
            if e.errno() != libc::EXDEV && e.errno() != libc::EIO {
                warn!("copy_file_range: {e}");
            }
        }
        self.answer("copy_file_range", On::Fh(fh_out), reply, r, |reply, n| {
            reply.written(n as u32)
        })
    }
}
