//! The two trees behind `OverlayFs` and the operations both answer: `Live`, the backing dir,
//! and `View`, the read-only `.snapshots` view. `OverlayFs::tree` and `tree_fh` (in `mod.rs`)
//! pick one per call from the inode or handle number; every public operation forwards to the
//! tree it gets, and nothing past that point asks again which tree it is in.
//!
//! The operations come in one trait per family, each implemented for `Live` in the file of
//! that family (`names` in `mod.rs`, `files.rs`, `dirs.rs`, `attrs.rs`, `setid.rs`) and for
//! `View` here. Every change has a default that refuses it with EROFS: the view implements
//! only what it serves, so a change cannot reach it by a forgotten check. It must never hold
//! state (a tree is two borrowed pointers, made on the stack per call) and never allocate on
//! the way to a write.

use std::ffi::{CStr, OsStr};
use std::ops::Deref;

use super::setid::Changer;
use super::snapview::{SnapView, SNAP_FH};
use super::{
    Attr, Caller, DirEntry, Entry, FsError, FsResult, Opened, OverlayFs, SetAttr, Validity, Xattr,
};

/// Operations on names and inodes: lookup, reference counting, links, and the nodes a
/// directory holds.
pub(super) trait Names {
    /// How long the kernel may cache `ino`'s entry and attributes.
    fn validity(&self, ino: u64) -> Validity;
    fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry>;
    fn forget(&self, ino: u64, nlookup: u64);
    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>>;
    /// How the log names `ino`.
    fn describe(&self, ino: u64) -> String;

    fn mknod(
        &self,
        _caller: Caller,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
    ) -> FsResult<Entry> {
        Err(FsError::ReadOnly)
    }
    fn mkdir(
        &self,
        _caller: Caller,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
    ) -> FsResult<Entry> {
        Err(FsError::ReadOnly)
    }
    fn symlink(
        &self,
        _caller: Caller,
        _parent: u64,
        _name: &OsStr,
        _target: &CStr,
    ) -> FsResult<Entry> {
        Err(FsError::ReadOnly)
    }
    fn unlink(&self, _parent: u64, _name: &OsStr) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    fn rmdir(&self, _parent: u64, _name: &OsStr) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    /// Routed by both directories (`OverlayFs::tree_pair`).
    fn rename(
        &self,
        _parent: u64,
        _name: &OsStr,
        _newparent: u64,
        _newname: &OsStr,
        _flags: u32,
    ) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    /// Routed by the inode and the new parent (`OverlayFs::tree_pair`).
    fn link(&self, _ino: u64, _newparent: u64, _newname: &OsStr) -> FsResult<Entry> {
        Err(FsError::ReadOnly)
    }
}

/// Operations on regular files and their open handles.
pub(super) trait Files {
    /// Open `ino`; `caller`, when given, runs an `O_TRUNC` open (see `OverlayFs::open_by`).
    fn open(&self, caller: Option<Caller>, ino: u64, flags: i32) -> FsResult<Opened>;
    /// Read up to `size` bytes at `offset` into `buf` (the caller's per-thread buffer, whose
    /// content is replaced); returns how many (short only at end of file).
    fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> FsResult<usize>;
    fn flush(&self, fh: u64) -> FsResult<()>;
    fn release(&self, fh: u64) -> FsResult<()>;
    fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()>;
    fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64>;
    fn handle_ino(&self, fh: u64) -> FsResult<u64>;
    /// How the log names the file open as `fh`.
    fn describe_fh(&self, fh: u64) -> String;

    /// Routed by `parent`.
    fn create(
        &self,
        _caller: Caller,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
    ) -> FsResult<(Entry, Opened)> {
        Err(FsError::ReadOnly)
    }
    /// `whole`: see `OverlayFs::write_whole`.
    fn write(&self, _fh: u64, _offset: u64, _data: &[u8], _whole: bool) -> FsResult<u32> {
        Err(FsError::ReadOnly)
    }
    fn fallocate(&self, _fh: u64, _offset: u64, _length: u64, _mode: i32) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    /// Routed by `fh_out`, the file it changes; the live tree answers EXDEV for a source in
    /// the view itself.
    fn copy_file_range(
        &self,
        _fh_in: u64,
        _off_in: u64,
        _fh_out: u64,
        _off_out: u64,
        _len: u64,
    ) -> FsResult<u64> {
        Err(FsError::ReadOnly)
    }
}

/// Operations on directories and their open handles. Listings are routed by the inode.
pub(super) trait Dirs {
    fn opendir(&self, ino: u64) -> FsResult<Opened>;
    fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry) -> bool,
    ) -> FsResult<()>;
    fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()>;
    fn releasedir(&self, fh: u64) -> FsResult<()>;
    fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()>;
}

/// Attributes, xattrs and access checks.
pub(super) trait Attrs {
    /// Attributes of `ino`, through its open handle `fh` when the tree has one.
    fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr>;
    fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Xattr>;
    fn listxattr(&self, ino: u64, size: u32) -> FsResult<Xattr>;
    fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()>;

    fn setattr(&self, _ino: u64, _set: &SetAttr) -> FsResult<Attr> {
        Err(FsError::ReadOnly)
    }
    fn setxattr(&self, _ino: u64, _name: &OsStr, _value: &[u8], _flags: i32) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
    fn removexattr(&self, _ino: u64, _name: &OsStr) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }
}

/// Who loses setuid and setgid before a content change (`setid.rs`).
pub(super) trait Setid {
    /// Clear the bits of `ino` that `changer` must not keep; returns whether the mode changed.
    /// By default nothing: the change that follows is refused.
    fn clear_setid(&self, _ino: u64, _changer: Changer) -> FsResult<bool> {
        Ok(false)
    }
}

/// Every operation of a tree.
pub(super) trait Tree: Names + Files + Dirs + Attrs + Setid {}

impl<T: Names + Files + Dirs + Attrs + Setid> Tree for T {}

/// The live tree: the backing dir, served through the overlay's inode and handle tables.
/// Its operations see the whole `OverlayFs` (gate, tables, store) through `Deref`.
#[derive(Clone, Copy)]
pub(super) struct Live<'a>(pub(super) &'a OverlayFs);

impl Deref for Live<'_> {
    type Target = OverlayFs;

    fn deref(&self) -> &OverlayFs {
        self.0
    }
}

/// The snapshot view, with the overlay whose handle counter it shares.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) fs: &'a OverlayFs,
    pub(super) view: &'a SnapView,
}

/// The tree `OverlayFs::tree` picked: dereferences to it.
pub(super) enum Route<'a> {
    Live(Live<'a>),
    View(View<'a>),
}

impl<'a> Deref for Route<'a> {
    type Target = dyn Tree + 'a;

    fn deref(&self) -> &(dyn Tree + 'a) {
        match self {
            Route::Live(t) => t,
            Route::View(t) => t,
        }
    }
}

// ---- what the view serves; every change is refused by the defaults above ----

impl Names for View<'_> {
    fn validity(&self, ino: u64) -> Validity {
        self.view.validity(ino)
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        self.view.lookup(parent, name)
    }

    fn forget(&self, _ino: u64, _nlookup: u64) {
        // The view's inodes live as long as the mount: nothing to count.
    }

    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.view.readlink(ino)
    }

    fn describe(&self, ino: u64) -> String {
        format!("snapshot file (inode {ino})")
    }
}

impl Files for View<'_> {
    fn open(&self, _caller: Option<Caller>, ino: u64, flags: i32) -> FsResult<Opened> {
        // Write access is refused by the view's open itself.
        self.view.open(ino, flags, self.fs.new_fh() | SNAP_FH)
    }

    fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> FsResult<usize> {
        self.view.read(fh, offset, size, buf)
    }

    fn flush(&self, fh: u64) -> FsResult<()> {
        self.view.check_handle(fh)
    }

    fn release(&self, fh: u64) -> FsResult<()> {
        self.view.release(fh)
    }

    fn fsync(&self, fh: u64, _datasync: bool) -> FsResult<()> {
        self.view.check_handle(fh)
    }

    fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        self.view.lseek(fh, offset, whence)
    }

    fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        self.view.handle_ino(fh)
    }

    fn describe_fh(&self, fh: u64) -> String {
        match self.view.handle_ino(fh) {
            Ok(ino) => format!("snapshot file (inode {ino})"),
            Err(_) => format!("snapshot file handle {fh}"),
        }
    }
}

impl Dirs for View<'_> {
    fn opendir(&self, ino: u64) -> FsResult<Opened> {
        self.view.opendir(ino, self.fs.new_fh() | SNAP_FH)
    }

    fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry) -> bool,
    ) -> FsResult<()> {
        self.view.readdir(ino, fh, offset, false, |d, _| add(d))
    }

    fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()> {
        self.view.readdir(ino, fh, offset, true, add)
    }

    fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.view.releasedir(fh)
    }

    fn fsyncdir(&self, fh: u64, _datasync: bool) -> FsResult<()> {
        self.view.check_handle(fh)
    }
}

impl Attrs for View<'_> {
    fn getattr(&self, ino: u64, _fh: Option<u64>) -> FsResult<Attr> {
        self.view.getattr(ino)
    }

    fn getxattr(&self, _ino: u64, _name: &OsStr, _size: u32) -> FsResult<Xattr> {
        // Snapshots record no xattrs.
        Err(FsError::backing("getxattr")(
            std::io::Error::from_raw_os_error(libc::ENODATA),
        ))
    }

    fn listxattr(&self, _ino: u64, size: u32) -> FsResult<Xattr> {
        Ok(if size == 0 {
            Xattr::Size(0)
        } else {
            Xattr::Data(Vec::new())
        })
    }

    fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()> {
        self.view.access(caller, ino, mask)
    }
}

impl Setid for View<'_> {}
