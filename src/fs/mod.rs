//! OverlayFs: the read-write view of the backing dir, free of FUSE.
//!
//! It owns the inode table, the open file and directory handles, and every system call made on
//! the backing dir. It returns plain structs (`Entry`, `Attr`, `Opened`...) and never sees a
//! FUSE reply, so tests drive it directly on a temp dir. It must never resolve a multi-component
//! path under the backing dir, never follow a symlink, and never expose the store.
//!
//! With a snapshot view (`with_snapshots`), `.snapshots` in the root is the view's (`snapview`),
//! whatever the backing dir holds under that name: every operation on one of its inodes or
//! handles goes there, and every change to it is refused with EROFS here.

mod error;
pub mod inode;
mod setid;
pub mod snapview;
use crate::sys;

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{eio_warning, report, FsError, FsResult, RateLimit};
use inode::{is_snapview, BackingKey, ContentStamp, Inode, InodeTable, ROOT_INO};
pub use setid::{Changed, WriteBy};
use snapview::{SnapView, SNAPDIR_NAME, SNAP_FH};

use crate::track::{Tracker, Volume};

use crate::ids::VolumeId;

use crate::sys::now_ns;

// fallocate(2) mode bits (linux/falloc.h).
const FALLOC_PUNCH_HOLE: i32 = 0x02;
const FALLOC_COLLAPSE_RANGE: i32 = 0x08;
const FALLOC_ZERO_RANGE: i32 = 0x10;
const FALLOC_INSERT_RANGE: i32 = 0x20;

/// What kind of inode an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    fn from_mode(mode: libc::mode_t) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::Regular,
        }
    }
}

/// Attributes of an inode as the mount shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

impl Attr {
    fn from_stat(ino: u64, st: &libc::stat) -> Attr {
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            kind: FileKind::from_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }
}

/// A looked-up entry: the kernel now holds one more reference to `attr.ino`.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub attr: Attr,
    pub generation: u64,
}

/// An opened file or directory.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep its page cache: the file did not change since the last open.
    pub keep_cache: bool,
}

/// Who is asking (from the FUSE request header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (its supplementary groups are read from /proc); 0 if unknown.
    pub pid: u32,
}

/// A timestamp to set.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The attribute changes of one setattr call; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

/// One directory entry for readdir.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    /// Offset of the next entry (what the kernel passes back to continue).
    pub offset: u64,
    pub kind: FileKind,
    pub name: OsString,
}

/// Filesystem statistics, passed through from the backing filesystem.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Reply to getxattr/listxattr: the size wanted (probe with size 0) or the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

/// How long the kernel may cache an inode's entry and attributes (fuse.rs turns it into TTLs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// A backing inode: it may change behind the overlay's back, so the configured timeouts.
    Configured,
    /// Asked again every time: `.snapshots` and its `<name>` entries come and go with snapshots.
    Uncached,
    /// Never changes while the mount lives: what a snapshot holds.
    Immutable,
}

/// Options of the overlay that are not about the kernel.
#[derive(Clone, Default)]
pub struct OverlayOptions {
    /// The store dir: hidden from the mount and unreachable through it, if inside the backing dir.
    pub store: Option<PathBuf>,
    /// Change tracking; `None` when `tracking.enabled = false`.
    pub tracker: Option<Arc<Tracker>>,
}

/// An open regular file.
struct FileHandle {
    file: File,
    inode: Arc<Inode>,
    /// The tracked volume, for handles that can change content (tracking on).
    volume: Option<Arc<Volume>>,
    /// End of this handle's previous write (0 before the first): a write starting there is
    /// sequential, so a handle writing from the start of the file is a stream from its first write.
    last_end: AtomicU64,
}

/// An open directory: its fd (for fsyncdir) and the entries read at the last rewind.
struct DirHandle {
    file: File,
    entries: Mutex<Vec<(OsString, u64, FileKind)>>,
    /// Whether a readdir already served this listing: only then is offset 0 a rewind that
    /// must read the directory again (opendir just read it).
    served: std::sync::atomic::AtomicBool,
}

/// Where the store sits, so that it can be hidden.
#[derive(Clone, Debug)]
struct HiddenStore {
    key: BackingKey,
    parent: BackingKey,
    name: OsString,
}

/// The overlay filesystem over one backing dir.
pub struct OverlayFs {
    backing: PathBuf,
    inodes: InodeTable,
    files: RwLock<HashMap<u64, Arc<FileHandle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    hidden: Option<HiddenStore>,
    /// When the daemon runs as root, new inodes are handed to the caller.
    chown_new: bool,
    tracker: Option<Arc<Tracker>>,
    /// The read-only `.snapshots` view; None without a store to show.
    snapview: Option<SnapView>,
}

thread_local! {
    /// Per-thread read buffer: reads allocate nothing after the first one of a thread.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

impl OverlayFs {
    /// Open the overlay on `backing`, which must be an existing directory.
    pub fn new(backing: &Path, options: OverlayOptions) -> FsResult<OverlayFs> {
        let c = CString::new(backing.as_os_str().as_bytes()).map_err(|_| {
            FsError::backing("open backing dir")(std::io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        // The backing dir itself is named by the user, so following a symlink here is fine.
        let root_fd = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(FsError::backing("open backing dir"))?;
        let st = sys::fstat(root_fd.as_raw_fd()).map_err(FsError::backing("stat backing dir"))?;
        let hidden = match &options.store {
            Some(store) => hidden_store(store),
            None => None,
        };
        Ok(OverlayFs {
            backing: backing.to_path_buf(),
            inodes: InodeTable::new(root_fd, BackingKey::of(&st)),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            hidden,
            chown_new: sys::geteuid() == 0,
            tracker: options.tracker,
            snapview: None,
        })
    }

    /// Show the snapshots of the store in `store_dir` under `.snapshots` in the root, listed
    /// there only when `visible`. (A builder rather than an `OverlayOptions` field: the view
    /// opens the store, which can fail, and callers building options by hand stay unchanged.)
    pub fn with_snapshots(self, store_dir: &Path, visible: bool) -> FsResult<OverlayFs> {
        self.with_snapshots_setuid(store_dir, visible, false)
    }

    /// `with_snapshots`, showing the recorded setuid and setgid bits of snapshot files when
    /// `setuid` (config `snapshot_setuid`).
    pub fn with_snapshots_setuid(
        mut self,
        store_dir: &Path,
        visible: bool,
        setuid: bool,
    ) -> FsResult<OverlayFs> {
        self.snapview = Some(SnapView::with_setuid(store_dir, visible, setuid)?);
        Ok(self)
    }

    /// How long the kernel may cache `ino`'s entry and attributes.
    pub fn validity(&self, ino: u64) -> Validity {
        match self.snap(ino) {
            Some(v) => v.validity(ino),
            None => Validity::Configured,
        }
    }

    /// The snapshot view, if `ino` is one of its inodes.
    fn snap(&self, ino: u64) -> Option<&SnapView> {
        self.snapview.as_ref().filter(|_| is_snapview(ino))
    }

    /// The snapshot view, if `fh` is one of its handles.
    fn snap_fh(&self, fh: u64) -> Option<&SnapView> {
        self.snapview.as_ref().filter(|_| snapview::owns_fh(fh))
    }

    /// Refuse a change that touches any of `inos` in the snapshot view.
    fn refuse_snap(inos: &[u64]) -> FsResult<()> {
        if inos.iter().any(|&i| is_snapview(i)) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    /// Whether `name` in `dir` is the snapshot view's `.snapshots` (which shadows any backing
    /// entry of that name: that one is neither listed nor reachable).
    fn is_snapdir(&self, dir: &Inode, name: &OsStr) -> bool {
        self.snapview.is_some() && dir.ino == ROOT_INO && name == SNAPDIR_NAME
    }

    /// The backing dir this overlay serves.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Number of inodes the kernel holds (root included); for tests of lookup counting.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// The kernel's lookup count of `ino`.
    pub fn lookup_count(&self, ino: u64) -> u64 {
        self.inodes.nlookup(ino)
    }

    fn is_store(&self, parent: &Inode, name: &OsStr) -> bool {
        matches!(&self.hidden, Some(h) if h.parent == parent.key && h.name == name)
    }

    /// Refuse names that would create, replace or remove the store or `.snapshots`.
    fn check_not_store(&self, parent: &Inode, name: &OsStr) -> FsResult<()> {
        if self.is_store(parent, name) {
            return Err(FsError::Reserved(name.to_os_string()));
        }
        // EROFS, as for every change to the view: only unlink, rmdir and rename of the name
        // reach here through the kernel (it always looks up as an existing directory, so the
        // kernel itself answers EEXIST to mkdir, mknod, symlink, link and O_EXCL creates).
        if self.is_snapdir(parent, name) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    fn stat_of(&self, inode: &Inode) -> FsResult<libc::stat> {
        sys::fstat(inode.raw_fd()).map_err(FsError::backing("stat"))
    }

    /// Look `name` up in `parent` and take a kernel reference on the result.
    fn lookup_in(&self, parent: &Inode, name: &OsStr) -> FsResult<Entry> {
        if let (true, Some(v)) = (self.is_snapdir(parent, name), &self.snapview) {
            return Ok(v.snapdir_entry());
        }
        let c = sys::name_cstr(name).map_err(FsError::backing("lookup"))?;
        if self.is_store(parent, name) {
            return Err(FsError::Backing {
                op: "lookup",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        let fd = sys::open_path(parent.raw_fd(), &c).map_err(FsError::backing("lookup"))?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(FsError::backing("lookup"))?;
        let key = BackingKey::of(&st);
        if matches!(&self.hidden, Some(h) if h.key == key) {
            return Err(FsError::Backing {
                op: "lookup",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        let inode = self.inodes.lookup(key, FileKind::from_mode(st.st_mode), fd);
        Ok(Entry {
            attr: Attr::from_stat(inode.ino, &st),
            generation: 0,
        })
    }

    /// Run a creating call as the caller when the daemon is root (see `sys::AsCaller`).
    fn as_caller<T>(&self, caller: Caller, f: impl FnOnce() -> T) -> T {
        let _id = self
            .chown_new
            .then(|| sys::AsCaller::enter(caller.uid, caller.gid, caller.pid));
        f()
    }

    fn file(&self, fh: u64) -> FsResult<Arc<FileHandle>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    fn dir(&self, fh: u64) -> FsResult<Arc<DirHandle>> {
        self.dirs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The tracked volume of a regular file (created on first use); None with tracking off.
    /// `fresh`: the file was just created through the overlay.
    fn volume_of(&self, inode: &Inode, fresh: bool) -> Option<Arc<Volume>> {
        let t = self.tracker.as_ref()?;
        if inode.kind != FileKind::Regular {
            return None;
        }
        let st = sys::fstat(inode.raw_fd()).ok()?;
        let v = t.volume(volume_id(inode.key), st.st_size as u64, fresh);
        v.attach_fd(|| inode.fd.try_clone().ok());
        v.first_stamp(&st);
        Some(v)
    }

    /// Run `change`, which alters content from `offset` for `len` bytes (0: size only), inside
    /// the volume's write gate with its write intent made durable first; `record` then notes
    /// the change in the volume's change map. Without a volume, just run `change`.
    ///
    /// `range` gives (offset, len) and runs inside the gate, so sizes it reads cannot move
    /// under it. `record` gets the result, or None when the change failed: a change that failed
    /// part way (a short write then ENOSPC) may still have changed part of the range, so the
    /// caller marks the whole range then.
    fn tracked<T>(
        &self,
        volume: Option<&Arc<Volume>>,
        range: impl FnOnce() -> FsResult<(u64, u64)>,
        change: impl FnOnce() -> FsResult<T>,
        record: impl FnOnce(&Volume, Option<&T>, u64, u64),
    ) -> FsResult<T> {
        self.tracked_or_deferred(volume, range, |_| Ok(None), change, record)
    }

    /// `tracked`, where `defer` may hand the change to a capture in progress instead of making
    /// it copy the old content first (a plain write: see `snapshot::deferred`); Some(result)
    /// when it did, and `change` is then not run.
    fn tracked_or_deferred<T>(
        &self,
        volume: Option<&Arc<Volume>>,
        range: impl FnOnce() -> FsResult<(u64, u64)>,
        defer: impl FnOnce(&Volume) -> FsResult<Option<T>>,
        change: impl FnOnce() -> FsResult<T>,
        record: impl FnOnce(&Volume, Option<&T>, u64, u64),
    ) -> FsResult<T> {
        let (Some(v), Some(t)) = (volume, self.tracker.as_ref()) else {
            return change();
        };
        let _gate = v.enter();
        v.check_stamp_before_change();
        let (offset, len) = range()?;
        // If the intent cannot be made durable (store full), the change is refused: a crash
        // after it would otherwise lose track of it.
        t.before_change(v, offset, len)
            .map_err(FsError::backing("write intent"))?;
        let r = match defer(v)? {
            Some(done) => Ok(done),
            None => {
                // A snapshot being captured gets the old content first.
                v.before_change(offset, len);
                change()
            }
        };
        record(v, r.as_ref().ok(), offset, len);
        // Whatever the change was and whether it failed, the backing file's ctime may have
        // moved: note it as ours, or the next stamp check takes it for a change behind our
        // back. Here, not in `record`, so that no kind of change (a keep-size fallocate
        // records no block) can forget it.
        v.touch();
        r
    }

    /// The tracked volume of an open file, also for handles that cannot write, while a capture
    /// runs (None otherwise): what reads it must wait for writes parked on it.
    fn parked_on(&self, h: &FileHandle) -> Option<Arc<Volume>> {
        if !crate::track::any_capture() {
            return None;
        }
        h.volume.clone().or_else(|| self.tracked_volume(&h.inode))
    }

    /// The tracked volume of `inode`, if it has one (never creates it).
    fn tracked_volume(&self, inode: &Inode) -> Option<Arc<Volume>> {
        self.tracker.as_ref()?.get(volume_id(inode.key))
    }

    /// The volume id of the regular file `name` in `dir` if its last link is about to go.
    fn last_link(&self, dir: &Inode, name: &CString) -> Option<VolumeId> {
        self.tracker.as_ref()?;
        let st = sys::fstatat(dir.raw_fd(), name).ok()?;
        (st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1)
            .then(|| volume_id(BackingKey::of(&st)))
    }

    /// Run a metadata change (chmod, utimens, link, rename, xattrs: no content change, but the
    /// file's ctime or mtime moves) inside the write gates of the tracked volumes among `keys`,
    /// and note it on them, so the stamp check never takes it for a change behind our back.
    fn metadata_change<T>(
        &self,
        keys: &[BackingKey],
        op: impl FnOnce() -> FsResult<T>,
    ) -> FsResult<T> {
        let Some(t) = &self.tracker else {
            return op();
        };
        let mut vols: Vec<Arc<Volume>> = keys.iter().filter_map(|k| t.get(volume_id(*k))).collect();
        // One gate entry per volume: a second shared entry by the same thread could wait
        // behind a queued exclusive one.
        vols.sort_by_key(|v| v.id);
        vols.dedup_by_key(|v| v.id);
        let gates: Vec<_> = vols.iter().map(|v| v.enter()).collect();
        for v in &vols {
            v.check_stamp_before_change();
        }
        let r = op();
        for v in &vols {
            v.touch();
        }
        drop(gates);
        r
    }

    /// The backing key of `name` in `dir`, if it exists.
    fn key_at(dir: &Inode, name: &CString) -> Option<BackingKey> {
        sys::fstatat(dir.raw_fd(), name)
            .ok()
            .map(|st| BackingKey::of(&st))
    }

    /// Stop tracking a volume whose last link went, unless a concurrent link() gave it a new
    /// one (checked on the inode itself when the volume holds an fd on it).
    fn drop_volume(&self, id: Option<VolumeId>) {
        if let (Some(t), Some(id)) = (&self.tracker, id) {
            let still_linked = t.get(id).and_then(|v| v.nlink()).is_some_and(|n| n > 0);
            if !still_linked {
                t.forget_volume(id);
            }
        }
    }

    fn register_file(
        &self,
        file: File,
        inode: Arc<Inode>,
        volume: Option<Arc<Volume>>,
    ) -> FsResult<Opened> {
        let st = sys::fstat(file.as_raw_fd()).map_err(FsError::backing("open"))?;
        let stamp = ContentStamp::of(&st);
        let keep_cache = {
            let mut last = inode.stamp.lock().unwrap_or_else(|p| p.into_inner());
            let same = *last == Some(stamp);
            *last = Some(stamp);
            same
        };
        let fh = self.new_fh();
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                fh,
                Arc::new(FileHandle {
                    file,
                    inode,
                    volume,
                    last_end: AtomicU64::new(0),
                }),
            );
        Ok(Opened { fh, keep_cache })
    }

    // ---- name operations ----

    /// Look up a directory entry.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        if let Some(v) = self.snap(parent) {
            return v.lookup(parent, name);
        }
        let parent = self.inodes.get(parent)?;
        self.lookup_in(&parent, name)
    }

    /// Drop `nlookup` kernel references to `ino`.
    pub fn forget(&self, ino: u64, nlookup: u64) {
        // The view's inodes live as long as the mount: nothing to count.
        if is_snapview(ino) {
            return;
        }
        self.inodes.forget(ino, nlookup);
    }

    /// Attributes of an inode, through its open handle when the kernel gives one.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(v) = self.snap(ino) {
            return v.getattr(ino);
        }
        if let Some(fh) = fh {
            if let Ok(h) = self.file(fh) {
                let st = sys::fstat(h.file.as_raw_fd()).map_err(FsError::backing("getattr"))?;
                return Ok(Attr::from_stat(ino, &st));
            }
        }
        let inode = self.inodes.get(ino)?;
        let st = self.stat_of(&inode)?;
        Ok(Attr::from_stat(ino, &st))
    }

    /// chmod, chown, truncate and utimens, in that order; returns the new attributes.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        Self::refuse_snap(&[ino])?;
        let inode = self.inodes.get(ino)?;
        let handle = match set.fh {
            Some(fh) => self.file(fh).ok(),
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

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        if let Some(v) = self.snap(ino) {
            return v.readlink(ino);
        }
        let inode = self.inodes.get(ino)?;
        sys::readlink_fd(inode.raw_fd()).map_err(FsError::backing("readlink"))
    }

    /// Create a node named `name` in `parent` with `make(dir_fd, name)`, as the caller, and
    /// look it up: the common path of mknod, mkdir and symlink.
    fn make_node(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        op: &'static str,
        make: impl FnOnce(i32, &CString) -> std::io::Result<()>,
    ) -> FsResult<Entry> {
        Self::refuse_snap(&[parent])?;
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing(op))?;
        self.as_caller(caller, || make(parent.raw_fd(), &c))
            .map_err(FsError::backing(op))?;
        self.lookup_in(&parent, name)
    }

    /// Create a fifo, socket or device node (regular files go through `create`).
    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        self.make_node(caller, parent, name, "mknod", |dir, c| {
            sys::mknodat(dir, c, mode & !umask, rdev as libc::dev_t)
        })
    }

    /// Create a directory.
    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> FsResult<Entry> {
        self.make_node(caller, parent, name, "mkdir", |dir, c| {
            sys::mkdirat(dir, c, (mode & !umask) & 0o7777)
        })
    }

    /// Create a symbolic link.
    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> FsResult<Entry> {
        let t = CString::new(target.as_os_str().as_bytes()).map_err(|_| {
            FsError::backing("symlink")(std::io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        self.make_node(caller, parent, name, "symlink", |dir, c| {
            sys::symlinkat(&t, dir, c)
        })
    }

    /// Remove a non-directory.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        Self::refuse_snap(&[parent])?;
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing("unlink"))?;
        let gone = self.last_link(&parent, &c);
        let keys: Vec<BackingKey> = Self::key_at(&parent, &c).into_iter().collect();
        self.metadata_change(&keys, || {
            sys::unlinkat(parent.raw_fd(), &c, 0).map_err(FsError::backing("unlink"))
        })?;
        self.drop_volume(gone);
        Ok(())
    }

    /// Remove an empty directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        Self::refuse_snap(&[parent])?;
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing("rmdir"))?;
        sys::unlinkat(parent.raw_fd(), &c, libc::AT_REMOVEDIR).map_err(FsError::backing("rmdir"))
    }

    /// rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE passed through.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        Self::refuse_snap(&[parent, newparent])?;
        let parent = self.inodes.get(parent)?;
        let newparent = self.inodes.get(newparent)?;
        self.check_not_store(&parent, name)?;
        self.check_not_store(&newparent, newname)?;
        let a = sys::name_cstr(name).map_err(FsError::backing("rename"))?;
        let b = sys::name_cstr(newname).map_err(FsError::backing("rename"))?;
        let replaced = if flags & libc::RENAME_EXCHANGE == 0 {
            self.last_link(&newparent, &b)
        } else {
            None
        };
        let keys: Vec<BackingKey> = [Self::key_at(&parent, &a), Self::key_at(&newparent, &b)]
            .into_iter()
            .flatten()
            .collect();
        self.metadata_change(&keys, || {
            sys::renameat2(parent.raw_fd(), &a, newparent.raw_fd(), &b, flags)
                .map_err(FsError::backing("rename"))
        })?;
        self.drop_volume(replaced);
        Ok(())
    }

    /// Create a hard link to `ino` as `newname` in `newparent`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        Self::refuse_snap(&[ino, newparent])?;
        let inode = self.inodes.get(ino)?;
        let newparent = self.inodes.get(newparent)?;
        self.check_not_store(&newparent, newname)?;
        let c = sys::name_cstr(newname).map_err(FsError::backing("link"))?;
        self.metadata_change(&[inode.key], || {
            sys::link_fd(inode.raw_fd(), newparent.raw_fd(), &c).map_err(FsError::backing("link"))
        })?;
        self.lookup_in(&newparent, newname)
    }

    // ---- files ----

    /// Open a regular file.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        self.open_as(None, ino, flags)
    }

    /// Open a regular file for `caller`: an `O_TRUNC` open runs as the caller, so the backing
    /// filesystem clears setuid/setgid as it does for a truncate by a non-owner.
    fn open_as(&self, caller: Option<Caller>, ino: u64, flags: i32) -> FsResult<Opened> {
        if let Some(v) = self.snap(ino) {
            return v.open(ino, flags, self.new_fh() | SNAP_FH);
        }
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
                let reopen = || sys::reopen(inode.raw_fd(), flags & !STRIPPED_OPEN_FLAGS);
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
        Self::refuse_snap(&[parent])?;
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
                sys::openat(
                    parent_inode.raw_fd(),
                    &c,
                    open_flags,
                    (mode & !umask) & 0o7777,
                )
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

    /// Read up to `size` bytes at `offset` and pass them to `with` (short only at end of file).
    pub fn read<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        with: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        if let Some(v) = self.snap_fh(fh) {
            return v.read(fh, offset, size, with);
        }
        let h = self.file(fh)?;
        if let Some(v) = self.parked_on(&h) {
            v.settle(offset, size as u64);
        }
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            sys::pread_into(h.file.as_raw_fd(), &mut buf, size as usize, offset)
                .map_err(FsError::backing("read"))?;
            Ok(with(&buf))
        })
    }

    /// Write all of `data` at `offset`; short only when the backing file took part of it and
    /// then failed (ENOSPC), as pwrite(2) reports it.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_as(fh, offset, data, false)
    }

    /// `write` for a caller that cannot take a short count: all of `data`, or the error that
    /// stopped it (part of it may be written then, as after a failed direct write). The
    /// kernel's direct I/O path (O_DIRECT opens, with FUSE_ASYNC_DIO) turns a short write
    /// reply into EIO: an O_DIRECT write that ran out of space part way failed with EIO, and
    /// nothing was logged, since no operation had failed here (the one path found that fits
    /// issue 9's unexplained O_DIRECT fsx failure, if its disk was full for a moment).
    pub fn write_whole(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_as(fh, offset, data, true)
    }

    fn write_as(&self, fh: u64, offset: u64, data: &[u8], whole: bool) -> FsResult<u32> {
        if snapview::owns_fh(fh) {
            return Err(FsError::ReadOnly);
        }
        let h = self.file(fh)?;
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

    /// Called on every close(2) of a descriptor; nothing is buffered here, so nothing to do.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        if let Some(v) = self.snap_fh(fh) {
            return v.check_handle(fh);
        }
        self.file(fh).map(drop)
    }

    /// The last close of an open file.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        if let Some(v) = self.snap_fh(fh) {
            return v.release(fh);
        }
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// fsync or fdatasync the backing file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        if let Some(v) = self.snap_fh(fh) {
            return v.check_handle(fh);
        }
        let h = self.file(fh)?;
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

    /// fallocate(2), including FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        if snapview::owns_fh(fh) {
            return Err(FsError::ReadOnly);
        }
        let h = self.file(fh)?;
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

    /// lseek(2) on the backing file: SEEK_DATA and SEEK_HOLE see its real holes.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        if let Some(v) = self.snap_fh(fh) {
            return v.lseek(fh, offset, whence);
        }
        let h = self.file(fh)?;
        if whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE {
            if let Some(v) = self.parked_on(&h) {
                v.settle(0, 0);
            }
        }
        sys::lseek(h.file.as_raw_fd(), offset, whence).map_err(FsError::backing("lseek"))
    }

    /// copy_file_range(2) between two open files (reflinks where the backing fs can).
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        if snapview::owns_fh(fh_out) {
            return Err(FsError::ReadOnly);
        }
        if snapview::owns_fh(fh_in) {
            // Snapshot data is not in a file the kernel could copy from: EXDEV makes it fall
            // back to reading and writing (ENOSYS would turn copy_file_range off for the mount).
            return Err(FsError::backing("copy_file_range")(
                std::io::Error::from_raw_os_error(libc::EXDEV),
            ));
        }
        let a = self.file(fh_in)?;
        let b = self.file(fh_out)?;
        if let Some(v) = self.parked_on(&a) {
            v.settle(off_in, len);
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

    /// How the log names inode `ino`: its number and its backing path (read from
    /// /proc/self/fd, so only for logging a failure, never on a path that succeeds).
    pub fn describe(&self, ino: u64) -> String {
        if is_snapview(ino) {
            return format!("snapshot file (inode {ino})");
        }
        match self.inodes.get(ino) {
            Ok(inode) => format!("inode {ino} ({})", fd_path(inode.raw_fd())),
            Err(_) => format!("inode {ino} (forgotten)"),
        }
    }

    /// How the log names the file open as `fh` (see `describe`).
    pub fn describe_fh(&self, fh: u64) -> String {
        if let Some(v) = self.snap_fh(fh) {
            return match v.handle_ino(fh) {
                Ok(ino) => format!("snapshot file (inode {ino})"),
                Err(_) => format!("snapshot file handle {fh}"),
            };
        }
        match self.file(fh) {
            Ok(h) => format!("inode {} ({})", h.inode.ino, fd_path(h.file.as_raw_fd())),
            Err(_) => format!("file handle {fh} (released)"),
        }
    }

    /// The inode number an open file handle refers to (for the tracking layer to come).
    pub fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        if let Some(v) = self.snap_fh(fh) {
            return v.handle_ino(fh);
        }
        Ok(self.file(fh)?.inode.ino)
    }

    // ---- directories ----

    /// Open a directory and read its entries.
    pub fn opendir(&self, ino: u64) -> FsResult<Opened> {
        if let Some(v) = self.snap(ino) {
            return v.opendir(ino, self.new_fh() | SNAP_FH);
        }
        let inode = self.inodes.get(ino)?;
        if inode.kind != FileKind::Directory {
            return Err(FsError::backing("opendir")(
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        let fd = sys::reopen(inode.raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(FsError::backing("opendir"))?;
        let file = File::from(fd);
        let entries = self.read_entries(&inode, &file)?;
        let fh = self.new_fh();
        self.dirs.write().unwrap_or_else(|p| p.into_inner()).insert(
            fh,
            Arc::new(DirHandle {
                file,
                entries: Mutex::new(entries),
                served: std::sync::atomic::AtomicBool::new(false),
            }),
        );
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    fn read_entries(&self, dir: &Inode, file: &File) -> FsResult<Vec<(OsString, u64, FileKind)>> {
        let path = sys::proc_path(file.as_raw_fd());
        let rd = std::fs::read_dir(OsStr::from_bytes(path.as_bytes()))
            .map_err(FsError::backing("readdir"))?;
        let mut out = vec![
            (OsString::from("."), dir.key.ino, FileKind::Directory),
            (OsString::from(".."), 0, FileKind::Directory),
        ];
        if let (Some(v), ROOT_INO) = (&self.snapview, dir.ino) {
            if v.visible() {
                out.push((
                    SNAPDIR_NAME.into(),
                    snapview::SNAPDIR_INO,
                    FileKind::Directory,
                ));
            }
        }
        for e in rd {
            let e = e.map_err(FsError::backing("readdir"))?;
            let name = e.file_name();
            if self.is_store(dir, &name) || self.is_snapdir(dir, &name) {
                continue;
            }
            let kind = match e.file_type() {
                Ok(t) => {
                    use std::os::unix::fs::FileTypeExt;
                    if t.is_dir() {
                        FileKind::Directory
                    } else if t.is_symlink() {
                        FileKind::Symlink
                    } else if t.is_fifo() {
                        FileKind::Fifo
                    } else if t.is_socket() {
                        FileKind::Socket
                    } else if t.is_char_device() {
                        FileKind::CharDevice
                    } else if t.is_block_device() {
                        FileKind::BlockDevice
                    } else {
                        FileKind::Regular
                    }
                }
                Err(_) => FileKind::Regular,
            };
            use std::os::unix::fs::DirEntryExt;
            out.push((name, e.ino(), kind));
        }
        Ok(out)
    }

    /// Directory entries from `offset`; `add` returns true when the reply buffer is full.
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry) -> bool,
    ) -> FsResult<()> {
        if let Some(v) = self.snap(ino) {
            return v.readdir(ino, fh, offset, false, |d, _| add(d));
        }
        let dir = self.dir(fh)?;
        let inode = self.inodes.get(ino)?;
        let mut entries = dir.entries.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && dir.served.swap(true, Ordering::Relaxed) {
            // A rewind sees the directory as it is now.
            *entries = self.read_entries(&inode, &dir.file)?;
        }
        for (i, (name, d_ino, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let full = add(DirEntry {
                // The kernel does not use readdir inode numbers for anything but d_ino.
                ino: if *d_ino == 0 { ROOT_INO } else { *d_ino },
                offset: i as u64 + 1,
                kind: *kind,
                name: name.clone(),
            });
            if full {
                break;
            }
        }
        Ok(())
    }

    /// Like readdir, but each entry is also looked up (one kernel reference per entry sent).
    /// `add` gets the entry and its attributes; it returns true when the buffer is full, and
    /// then the reference of the entry that did not fit is dropped again.
    pub fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()> {
        if let Some(v) = self.snap(ino) {
            return v.readdir(ino, fh, offset, true, add);
        }
        let dir = self.dir(fh)?;
        let inode = self.inodes.get(ino)?;
        let mut entries = dir.entries.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && dir.served.swap(true, Ordering::Relaxed) {
            *entries = self.read_entries(&inode, &dir.file)?;
        }
        for (i, (name, d_ino, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let dot = name == "." || name == "..";
            let entry = if dot {
                None
            } else {
                match self.lookup_in(&inode, name) {
                    Ok(e) => Some(e),
                    // Gone since we listed it: skip it, as a fresh readdir would.
                    Err(_) => continue,
                }
            };
            let d = DirEntry {
                ino: entry.map_or(if *d_ino == 0 { ROOT_INO } else { *d_ino }, |e| e.attr.ino),
                offset: i as u64 + 1,
                kind: entry.map_or(*kind, |e| e.attr.kind),
                name: name.clone(),
            };
            let full = add(d, entry.as_ref());
            if full {
                if let Some(e) = entry {
                    self.forget(e.attr.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        if let Some(v) = self.snap_fh(fh) {
            return v.releasedir(fh);
        }
        self.dirs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// fsync a directory.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        if let Some(v) = self.snap_fh(fh) {
            return v.check_handle(fh);
        }
        let d = self.dir(fh)?;
        sys::fsync(d.file.as_raw_fd(), datasync).map_err(FsError::backing("fsyncdir"))
    }

    // ---- whole filesystem, xattrs, access ----

    /// statfs of the backing filesystem.
    pub fn statfs(&self, ino: u64) -> FsResult<StatFs> {
        // The snapshot view's inodes (and unknown ones) get the backing filesystem's figures.
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

    fn xattr_target(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let inode = self.inodes.get(ino)?;
        // Through /proc/self/fd a symlink would be followed; Linux allows no user xattrs on
        // symlinks anyway, so refuse rather than touch the target.
        if inode.kind == FileKind::Symlink {
            return Err(FsError::NotSupported);
        }
        Ok(inode)
    }

    /// getxattr: with size 0, the size of the value.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Xattr> {
        if self.snap(ino).is_some() {
            // Snapshots record no xattrs.
            return Err(FsError::backing("getxattr")(
                std::io::Error::from_raw_os_error(libc::ENODATA),
            ));
        }
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

    /// listxattr: with size 0, the size of the list.
    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<Xattr> {
        // Symlinks (no user xattrs on Linux) and the snapshot view (none recorded) list none.
        let inode = match self.snap(ino) {
            Some(_) => None,
            None => Some(self.inodes.get(ino)?).filter(|i| i.kind != FileKind::Symlink),
        };
        let Some(inode) = inode else {
            return Ok(if size == 0 {
                Xattr::Size(0)
            } else {
                Xattr::Data(Vec::new())
            });
        };
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(inode.raw_fd(), &mut buf).map_err(FsError::backing("listxattr"))?;
        if size == 0 {
            return Ok(Xattr::Size(n as u32));
        }
        buf.truncate(n);
        Ok(Xattr::Data(buf))
    }

    /// setxattr with XATTR_CREATE / XATTR_REPLACE passed through.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        Self::refuse_snap(&[ino])?;
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

    /// removexattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        Self::refuse_snap(&[ino])?;
        let inode = self.xattr_target(ino)?;
        let c = CString::new(name.as_bytes()).map_err(|_| FsError::NotSupported)?;
        self.metadata_change(&[inode.key], || {
            sys::removexattr(inode.raw_fd(), &c).map_err(FsError::backing("removexattr"))
        })
    }

    /// access(2): checked against the inode's mode for the caller (the kernel normally does
    /// this itself under `default_permissions`, so this is only reached without it).
    pub fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()> {
        if let Some(v) = self.snap(ino) {
            return v.access(caller, ino, mask);
        }
        let inode = self.inodes.get(ino)?;
        let st = self.stat_of(&inode)?;
        permits(caller, inode.kind, st.st_mode, st.st_uid, st.st_gid, mask)
    }
}

/// Whether `mask` (R_OK, W_OK, X_OK or F_OK) is allowed to `caller` on an inode of `kind`
/// with `mode` owned by `uid`:`gid`; root may do anything but execute a file with no x bit.
fn permits(
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

/// Identity of the store and of its parent, if the store exists.
fn hidden_store(store: &Path) -> Option<HiddenStore> {
    let st = std::fs::symlink_metadata(store).ok()?;
    let parent = store.parent()?;
    let pst = std::fs::metadata(parent).ok()?;
    use std::os::unix::fs::MetadataExt;
    Some(HiddenStore {
        key: BackingKey {
            dev: st.dev(),
            ino: st.ino(),
        },
        parent: BackingKey {
            dev: pst.dev(),
            ino: pst.ino(),
        },
        name: store.file_name()?.to_os_string(),
    })
}

/// The path an fd was opened at, as the kernel knows it now, for log messages.
fn fd_path(fd: std::os::fd::RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).map_or_else(
        |e| format!("path unknown: {e}"),
        |p| p.display().to_string(),
    )
}

fn volume_id(key: BackingKey) -> VolumeId {
    VolumeId {
        dev: key.dev,
        ino: key.ino,
    }
}
