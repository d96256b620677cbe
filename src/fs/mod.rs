//! OverlayFs: the read-write view of the backing dir, free of FUSE.
//!
//! It owns the inode table, the open file and directory handles, and every system call made on
//! the backing dir. It returns plain structs (`Entry`, `Attr`, `Opened`...) and never sees a
//! FUSE reply, so tests drive it directly on a temp dir. It must never resolve a multi-component
//! path under the backing dir, never follow a symlink, and never expose the store.
//!
//! With a snapshot view (`with_snapshots`), `.snapshots` in the root is the view's (`snapview`),
//! whatever the backing dir holds under that name. Every public operation forwards to one of
//! two trees (`tree.rs`), picked in one place (`tree`, `tree_fh`, `tree_pair` below) from the
//! number of the inode or handle it names: the live tree, or the view, which refuses every
//! change with EROFS.

mod attrs;
mod dirs;
mod error;
mod files;
mod gate;
mod handles;
pub mod inode;
mod reply;
mod setid;
pub mod snapview;
mod tree;
use crate::sys;

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

pub use error::{eio_warning, report, FsError, FsResult, RateLimit};
use inode::{is_snapview, BackingKey, ContentStamp, Inode, InodeTable, ROOT_INO};
pub use reply::{
    Attr, Caller, DirEntry, Entry, FileKind, Opened, SetAttr, SetTime, StatFs, Validity, Xattr,
};
pub use setid::{Changed, WriteBy};

use attrs::permits;
use gate::volume_id;
use handles::{DirListing, HandleTable, Listing};
use reply::system_time;
use snapview::{SnapView, SNAPDIR_NAME};
use tree::{Attrs, Dirs, Files, Live, Names, Route, View};

use crate::track::{Tracker, Volume};

use crate::ids::VolumeId;

use crate::sys::now_ns;

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

/// An open directory: its fd (for fsyncdir and rewinds) and the entries it serves.
struct DirHandle {
    file: File,
    listing: DirListing,
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
    files: HandleTable<FileHandle>,
    dirs: HandleTable<DirHandle>,
    next_fh: AtomicU64,
    hidden: Option<HiddenStore>,
    /// When the daemon runs as root, new inodes are handed to the caller.
    chown_new: bool,
    tracker: Option<Arc<Tracker>>,
    /// The read-only `.snapshots` view; None without a store to show.
    snapview: Option<SnapView>,
    /// The kernel caches writes (`with_writeback_cache`): write-only opens are made read-write.
    writeback_cache: bool,
}

thread_local! {
    /// Per-thread read buffer: reads allocate nothing after the first one of a thread.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
            files: HandleTable::new(),
            dirs: HandleTable::new(),
            next_fh: AtomicU64::new(1),
            hidden,
            chown_new: sys::geteuid() == 0,
            tracker: options.tracker,
            snapview: None,
            writeback_cache: false,
        })
    }

    /// Serve a mount whose kernel caches writes (config `fuse.writeback_cache`). The kernel
    /// then reads a page through whichever handle it writes back with, to fill the part of a
    /// page a write did not cover, so a write-only open gets a read-write backing fd where the
    /// backing file lets the daemon read it (otherwise it stays write-only, and a write that
    /// covers part of a page fails with EIO, as in libfuse's passthrough examples). A user
    /// cannot read through it: the kernel checks the user's own open mode before any read.
    pub fn with_writeback_cache(mut self, on: bool) -> OverlayFs {
        self.writeback_cache = on;
        self
    }

    /// Open flags for the backing open of a file the kernel asked to open with `flags`, and the
    /// flags to fall back to when the backing file refuses them (EACCES), if they differ.
    fn backing_open_flags(&self, flags: i32) -> (i32, Option<i32>) {
        if self.writeback_cache && flags & libc::O_ACCMODE == libc::O_WRONLY {
            ((flags & !libc::O_ACCMODE) | libc::O_RDWR, Some(flags))
        } else {
            (flags, None)
        }
    }

    /// `open` with `backing_open_flags(flags)`: read-write where the write-back cache needs
    /// it, as asked where the backing file does not allow reading.
    fn open_for_kernel(
        &self,
        flags: i32,
        open: impl Fn(i32) -> std::io::Result<OwnedFd>,
    ) -> std::io::Result<OwnedFd> {
        match self.backing_open_flags(flags) {
            (wide, Some(asked)) => match open(wide) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => open(asked),
                r => r,
            },
            (flags, None) => open(flags),
        }
    }

    /// The inode number the kernel knows backing inode (`dev`, `ino`) by, if it knows it (to
    /// invalidate its cache after a change made beside the kernel: a rollback).
    pub fn kernel_ino(&self, dev: u64, ino: u64) -> Option<u64> {
        self.inodes.ino_of(BackingKey { dev, ino })
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
        self.tree(ino).validity(ino)
    }

    // ---- routing: the only place that tells the live tree from the snapshot view ----

    /// The tree that owns inode `ino`. Without a view, no view number was ever handed out and
    /// the live tree answers for all of them (it knows none: ESTALE).
    fn tree(&self, ino: u64) -> Route<'_> {
        match &self.snapview {
            Some(view) if is_snapview(ino) => Route::View(View { fs: self, view }),
            _ => Route::Live(Live(self)),
        }
    }

    /// The tree that owns file or directory handle `fh`.
    fn tree_fh(&self, fh: u64) -> Route<'_> {
        match &self.snapview {
            Some(view) if snapview::owns_fh(fh) => Route::View(View { fs: self, view }),
            _ => Route::Live(Live(self)),
        }
    }

    /// The tree that answers a change naming two inodes (rename, link): the view's when either
    /// is in it, so that a rename or link into or out of a snapshot is refused as a change to
    /// the view, whichever side it is.
    fn tree_pair(&self, a: u64, b: u64) -> Route<'_> {
        if is_snapview(b) {
            self.tree(b)
        } else {
            self.tree(a)
        }
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

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    // ---- name operations: each forwarded to the tree that owns its inode ----

    /// Look up a directory entry.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        self.tree(parent).lookup(parent, name)
    }

    /// Drop `nlookup` kernel references to `ino`.
    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.tree(ino).forget(ino, nlookup)
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.tree(ino).readlink(ino)
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
        self.tree(parent)
            .mknod(caller, parent, name, mode, umask, rdev)
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
        self.tree(parent).mkdir(caller, parent, name, mode, umask)
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
        self.tree(parent).symlink(caller, parent, name, &t)
    }

    /// Remove a non-directory.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.tree(parent).unlink(parent, name)
    }

    /// Remove an empty directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.tree(parent).rmdir(parent, name)
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
        self.tree_pair(parent, newparent)
            .rename(parent, name, newparent, newname, flags)
    }

    /// Create a hard link to `ino` as `newname` in `newparent`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        self.tree_pair(ino, newparent).link(ino, newparent, newname)
    }

    /// How the log names inode `ino`: its number and its backing path (read from
    /// /proc/self/fd, so only for logging a failure, never on a path that succeeds).
    pub fn describe(&self, ino: u64) -> String {
        self.tree(ino).describe(ino)
    }

    /// How the log names the file open as `fh` (see `describe`).
    pub fn describe_fh(&self, fh: u64) -> String {
        self.tree_fh(fh).describe_fh(fh)
    }
}

impl Live<'_> {
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
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing(op))?;
        self.as_caller(caller, || make(parent.raw_fd(), &c))
            .map_err(FsError::backing(op))?;
        self.lookup_in(&parent, name)
    }
}

impl Names for Live<'_> {
    fn validity(&self, _ino: u64) -> Validity {
        Validity::Configured
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let parent = self.inodes.get(parent)?;
        self.lookup_in(&parent, name)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        sys::readlink_fd(inode.raw_fd()).map_err(FsError::backing("readlink"))
    }

    fn describe(&self, ino: u64) -> String {
        match self.inodes.get(ino) {
            Ok(inode) => format!("inode {ino} ({})", fd_path(inode.raw_fd())),
            Err(_) => format!("inode {ino} (forgotten)"),
        }
    }

    fn mknod(
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

    fn mkdir(
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

    fn symlink(&self, caller: Caller, parent: u64, name: &OsStr, target: &CStr) -> FsResult<Entry> {
        self.make_node(caller, parent, name, "symlink", |dir, c| {
            sys::symlinkat(target, dir, c)
        })
    }

    fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing("unlink"))?;
        let (key, gone) = self.name_target(&parent, &c);
        self.metadata_change(key.as_slice(), || {
            sys::unlinkat(parent.raw_fd(), &c, 0).map_err(FsError::backing("unlink"))
        })?;
        self.drop_volume(gone);
        Ok(())
    }

    fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let parent = self.inodes.get(parent)?;
        self.check_not_store(&parent, name)?;
        let c = sys::name_cstr(name).map_err(FsError::backing("rmdir"))?;
        sys::unlinkat(parent.raw_fd(), &c, libc::AT_REMOVEDIR).map_err(FsError::backing("rmdir"))
    }

    fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let parent = self.inodes.get(parent)?;
        let newparent = self.inodes.get(newparent)?;
        self.check_not_store(&parent, name)?;
        self.check_not_store(&newparent, newname)?;
        let a = sys::name_cstr(name).map_err(FsError::backing("rename"))?;
        let b = sys::name_cstr(newname).map_err(FsError::backing("rename"))?;
        let (from, _) = self.name_target(&parent, &a);
        let (to, last) = self.name_target(&newparent, &b);
        // An exchange keeps both names: nothing loses its last link.
        let replaced = last.filter(|_| flags & libc::RENAME_EXCHANGE == 0);
        let keys: Vec<BackingKey> = [from, to].into_iter().flatten().collect();
        self.metadata_change(&keys, || {
            sys::renameat2(parent.raw_fd(), &a, newparent.raw_fd(), &b, flags)
                .map_err(FsError::backing("rename"))
        })?;
        self.drop_volume(replaced);
        Ok(())
    }

    fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        let inode = self.inodes.get(ino)?;
        let newparent = self.inodes.get(newparent)?;
        self.check_not_store(&newparent, newname)?;
        let c = sys::name_cstr(newname).map_err(FsError::backing("link"))?;
        self.metadata_change(&[inode.key], || {
            sys::link_fd(inode.raw_fd(), newparent.raw_fd(), &c).map_err(FsError::backing("link"))
        })?;
        self.lookup_in(&newparent, newname)
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
