//! The read-only `.snapshots` tree: `<mount>/.snapshots/<name>/` shows snapshot `<name>` as
//! its group's tree was at the snapshot's instant (files, directories and symlinks, with their
//! sizes, modes, owners and mtimes), and file content is read through the store's
//! `VolumeReader`, which checks every block against its blake3: a damaged block reads as EIO
//! (and is logged with snapshot, volume and block), never as wrong bytes. A snapshot grants no
//! privilege: regular files show without their setuid and setgid bits unless the daemon was
//! told otherwise (`snapshot_setuid`), and no file shows xattrs (none are recorded, so no
//! `security.capability` either).
//!
//! It owns a second inode space (the numbers with the top two bits set, `inode::SNAPVIEW`,
//! which the backing inode table never hands out), the trees loaded from manifests, and the
//! handles open on them. It must never write to the store or to the backing dir: `OverlayFs`
//! refuses every change to the view with EROFS before anything reaches this module, and `open`
//! here refuses write access itself.
//!
//! A tree is loaded from its manifest on the first lookup of `<name>` (or listing of
//! `.snapshots`) and lives as long as the mount: a committed snapshot never changes, so its
//! nodes never go stale and need no lookup counts. Which snapshot a name means is checked with
//! one stat at every lookup of `<name>`, so a deleted snapshot is gone at once, and a new
//! snapshot under a reused name gets a new tree with new inode numbers (the kernel cannot mix
//! the two up). A file open when its snapshot is deleted keeps reading: its `VolumeReader`
//! holds the pack files open.
//!
//! Lock order: `trees` before `nodes`; `readers`, `files` and `dirs` are leaves. No lock is held
//! across a manifest load or a chain resolution.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::SystemTime;

use log::warn;

mod plan;

use super::handles::{DirListing, HandleTable, Listing};
use super::inode::{ROOT_INO, SNAPVIEW};
use super::{
    permits, sys, system_time, Attr, Caller, DirEntry, Entry, FileKind, FsError, FsResult, Opened,
    Validity,
};
use crate::ids::{SnapshotName, VolumeId};
use crate::store::{EntryKind, Manifest, Store, StoreError, VolumeReader};
use plan::Plan;

/// Name of the view's directory in the mount root.
pub use crate::ids::SNAPDIR_NAME;

/// Inode number of `.snapshots` itself; tree nodes are numbered after it.
pub const SNAPDIR_INO: u64 = SNAPVIEW;

/// File handles of the view have this bit set, so `OverlayFs` tells them from its own with a
/// bit test on the hot read and write paths. Its own come from the same counter and would need
/// 2^63 opens to reach the bit.
pub(super) const SNAP_FH: u64 = 1 << 63;

/// Whether `fh` is a handle of the view.
pub(super) fn owns_fh(fh: u64) -> bool {
    fh & SNAP_FH != 0
}

/// A snapshot whose tree is loaded.
#[derive(Debug)]
struct Tree {
    name: String,
    /// Tells this snapshot from a later one under the same name.
    created_ns: u64,
    /// Inode number of the tree's root, `<name>` itself.
    root: u64,
}

/// The tree a name currently means.
struct Loaded {
    /// (st_dev, st_ino) of `snapshots/<name>` when the tree was loaded: one stat at each lookup
    /// tells whether the name still means the same snapshot.
    dir: (u64, u64),
    tree: Arc<Tree>,
}

#[derive(Debug)]
enum Body {
    /// Children sorted by name.
    Dir(Listing),
    File {
        tree: Arc<Tree>,
        volume: VolumeId,
    },
    Symlink(Vec<u8>),
}

/// One file, directory or symlink of a snapshot's tree.
#[derive(Debug)]
struct Node {
    attr: Attr,
    parent: u64,
    body: Body,
}

/// An open file of the view.
struct SnapFile {
    ino: u64,
    reader: Arc<VolumeReader>,
}

/// The `.snapshots` view of one store.
pub struct SnapView {
    store: Store,
    visible: bool,
    /// Show the setuid and setgid bits of regular files as recorded (`snapshot_setuid`); by
    /// default they are cleared, so a snapshot never grants a privilege the live tree revoked.
    setuid: bool,
    /// Owner of `.snapshots` and of directories a manifest does not record: the daemon.
    uid: u32,
    gid: u32,
    /// Times of `.snapshots` when the store's directory cannot be stat'ed.
    since: SystemTime,
    next_ino: AtomicU64,
    trees: Mutex<HashMap<String, Loaded>>,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    /// One reader per (tree, volume) while any handle uses it: handles opened together share
    /// the resolved chain and its cache, and the last release closes the pack files (which
    /// keeps a deleted snapshot's space from being held for the life of the mount).
    readers: Mutex<HashMap<(u64, VolumeId), Weak<VolumeReader>>>,
    files: HandleTable<SnapFile>,
    dirs: HandleTable<DirListing>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fail(op: &'static str, errno: i32) -> FsError {
    FsError::backing(op)(std::io::Error::from_raw_os_error(errno))
}

/// A time in nanoseconds since the epoch (negative before it).
fn time_ns(ns: i128) -> SystemTime {
    const NS: i128 = 1_000_000_000;
    let sec = ns.div_euclid(NS).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    system_time(sec, ns.rem_euclid(NS) as i64)
}

/// Attributes of a node of the view, size 0 and one link; atime and ctime are the mtime
/// (nothing else is recorded, and nothing in the view ever changes).
fn node_attr(kind: FileKind, mode: u32, uid: u32, gid: u32, mtime: SystemTime) -> Attr {
    Attr {
        ino: 0,
        size: 0,
        blocks: 0,
        atime: mtime,
        mtime,
        ctime: mtime,
        kind,
        // A recorded mode may carry its S_IFMT bits or not: only the permission bits count.
        perm: (mode & 0o7777) as u16,
        nlink: 1,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
    }
}

impl SnapView {
    /// The view of the snapshots in `store_dir`; `visible`: `.snapshots` is listed in the root.
    /// Regular files show without setuid and setgid bits (see `with_setuid`).
    pub fn new(store_dir: &Path, visible: bool) -> FsResult<SnapView> {
        SnapView::with_setuid(store_dir, visible, false)
    }

    /// `new`, with `setuid`: regular files keep their recorded setuid and setgid bits (config
    /// `snapshot_setuid = true`, for restores that copy modes from the view).
    pub fn with_setuid(store_dir: &Path, visible: bool, setuid: bool) -> FsResult<SnapView> {
        Ok(SnapView {
            store: Store::open(store_dir)?,
            visible,
            setuid,
            uid: sys::geteuid(),
            gid: sys::getegid(),
            since: SystemTime::now(),
            next_ino: AtomicU64::new(SNAPDIR_INO + 1),
            trees: Mutex::new(HashMap::new()),
            nodes: RwLock::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            files: HandleTable::new(),
            dirs: HandleTable::new(),
        })
    }

    /// Whether `.snapshots` is listed in the mount root (it can always be entered by name).
    pub fn visible(&self) -> bool {
        self.visible
    }

    fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .cloned()
            .ok_or(FsError::UnknownInode(ino))
    }

    fn snapdir_attr(&self) -> Attr {
        // The store's snapshots dir changes with every snapshot committed or deleted: its mtime
        // says when `.snapshots` last changed.
        let mtime = std::fs::metadata(self.store.snapshots_dir())
            .and_then(|m| m.modified())
            .unwrap_or(self.since);
        Attr {
            ino: SNAPDIR_INO,
            nlink: 2,
            ..node_attr(FileKind::Directory, 0o555, self.uid, self.gid, mtime)
        }
    }

    /// The entry of `.snapshots` (the lookup of its name in the mount root).
    pub fn snapdir_entry(&self) -> Entry {
        Entry {
            attr: self.snapdir_attr(),
            generation: 0,
        }
    }

    /// How long the kernel may cache `ino`: `.snapshots` and each `<name>` must be asked again
    /// every time (snapshots come and go); everything below a `<name>` never changes.
    pub fn validity(&self, ino: u64) -> Validity {
        if ino == SNAPDIR_INO || self.node(ino).is_ok_and(|n| n.parent == SNAPDIR_INO) {
            Validity::Uncached
        } else {
            Validity::Immutable
        }
    }

    /// (st_dev, st_ino) of the directory of snapshot `name`.
    fn dir_id(&self, name: &str) -> FsResult<(u64, u64)> {
        let path = self.store.snapshots_dir().join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Ok((m.dev(), m.ino())),
            Ok(_) => Err(StoreError::NotFound(name.to_string()).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(name.to_string()).into())
            }
            Err(source) => Err(StoreError::Io { path, source }.into()),
        }
    }

    /// The tree of snapshot `name`, loaded from its manifest unless already loaded for the
    /// snapshot the name means now.
    fn tree(&self, name: &str) -> FsResult<Arc<Tree>> {
        let parsed = SnapshotName::parse(name).map_err(StoreError::from)?;
        let dir = match self.dir_id(name) {
            Ok(d) => d,
            Err(e) => {
                lock(&self.trees).remove(name);
                return Err(e);
            }
        };
        let known = lock(&self.trees).get(name).map(|l| (l.dir, l.tree.clone()));
        if let Some((d, t)) = &known {
            if *d == dir {
                return Ok(t.clone());
            }
        }
        let m = self.store.manifest(&parsed)?;
        if let Some((_, t)) = known {
            if t.created_ns == m.created_ns {
                // The same snapshot in a rewritten directory: its content is the same, and so
                // are the inode numbers the kernel already holds.
                lock(&self.trees).insert(
                    name.to_string(),
                    Loaded {
                        dir,
                        tree: t.clone(),
                    },
                );
                return Ok(t);
            }
        }
        let plan = Plan::of(&m, self.uid, self.gid, self.setuid);
        let base = self
            .next_ino
            .fetch_add(plan.len() as u64, Ordering::Relaxed);
        let tree = Arc::new(Tree {
            name: name.to_string(),
            created_ns: m.created_ns,
            root: base,
        });
        let nodes = plan.into_nodes(base, &tree, m.geometry.block_size);
        let mut trees = lock(&self.trees);
        if let Some(l) = trees.get(name) {
            if l.dir == dir {
                // Another thread loaded it meanwhile; this copy's numbers are never used.
                return Ok(l.tree.clone());
            }
        }
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(nodes.into_iter().map(|n| (n.attr.ino, Arc::new(n))));
        trees.insert(
            name.to_string(),
            Loaded {
                dir,
                tree: tree.clone(),
            },
        );
        Ok(tree)
    }

    fn entry_of(&self, ino: u64) -> FsResult<Entry> {
        if ino == SNAPDIR_INO {
            return Ok(self.snapdir_entry());
        }
        Ok(Entry {
            attr: self.node(ino)?.attr,
            generation: 0,
        })
    }

    /// Look `name` up in the view's directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let missing = || fail("lookup", libc::ENOENT);
        if parent == SNAPDIR_INO {
            return match name.to_str() {
                Some(".") => Ok(self.snapdir_entry()),
                Some(n) => self.entry_of(self.tree(n)?.root),
                None => Err(missing()),
            };
        }
        let node = self.node(parent)?;
        let Body::Dir(children) = &node.body else {
            return Err(fail("lookup", libc::ENOTDIR));
        };
        match name.to_str() {
            Some(".") => return self.entry_of(parent),
            Some("..") => return self.entry_of(node.parent),
            _ => {}
        }
        let i = children
            .binary_search_by(|(n, _, _)| n.as_os_str().cmp(name))
            .map_err(|_| missing())?;
        self.entry_of(children[i].1)
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(self.entry_of(ino)?.attr)
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match &self.node(ino)?.body {
            Body::Symlink(target) => Ok(target.clone()),
            _ => Err(fail("readlink", libc::EINVAL)),
        }
    }

    /// The reader of `volume` in `tree`: the one open handles already use, or a new one.
    fn reader(&self, tree: &Tree, volume: VolumeId) -> FsResult<Arc<VolumeReader>> {
        let key = (tree.root, volume);
        if let Some(r) = lock(&self.readers).get(&key).and_then(Weak::upgrade) {
            return Ok(r);
        }
        let m = self
            .store
            .manifest(&SnapshotName::parse(&tree.name).map_err(StoreError::from)?)?;
        if m.created_ns != tree.created_ns {
            // The name means a newer snapshot now: this file's snapshot was deleted.
            return Err(StoreError::NotFound(tree.name.clone()).into());
        }
        let r = Arc::new(self.store.read_volume(m, volume)?);
        let mut readers = lock(&self.readers);
        if let Some(other) = readers.get(&key).and_then(Weak::upgrade) {
            return Ok(other);
        }
        readers.retain(|_, w| w.strong_count() > 0);
        readers.insert(key, Arc::downgrade(&r));
        Ok(r)
    }

    /// Open a file of the view read-only as handle `fh` (which has `SNAP_FH` set).
    pub fn open(&self, ino: u64, flags: i32, fh: u64) -> FsResult<Opened> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        if ino == SNAPDIR_INO {
            return Err(fail("open", libc::EISDIR));
        }
        let node = self.node(ino)?;
        let reader = match &node.body {
            Body::File { tree, volume } => self.reader(tree, *volume)?,
            Body::Dir(_) => return Err(fail("open", libc::EISDIR)),
            Body::Symlink(_) => return Err(fail("open", libc::ELOOP)),
        };
        self.files.insert(fh, SnapFile { ino, reader });
        // The content of a snapshot file never changes: the kernel may keep its page cache.
        Ok(Opened {
            fh,
            keep_cache: true,
        })
    }

    /// Read up to `size` bytes at `offset` into the start of `buf`; returns how many (short
    /// only at end of file).
    pub fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> FsResult<usize> {
        let h = self.files.get(fh)?;
        buf.resize(size as usize, 0);
        Ok(h.reader.read_at(buf, offset)?)
    }

    /// lseek SEEK_DATA and SEEK_HOLE on an open file (the kernel handles the others itself),
    /// from the blocks the snapshot stores: a restore with `cp` keeps the holes.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.files.get(fh)?;
        let off = u64::try_from(offset).map_err(|_| fail("lseek", libc::EINVAL))?;
        let at = match whence {
            libc::SEEK_SET => Some(off),
            libc::SEEK_END => h.reader.size().checked_add(off),
            libc::SEEK_DATA => h.reader.seek_data(off),
            libc::SEEK_HOLE => h.reader.seek_hole(off),
            _ => return Err(fail("lseek", libc::EINVAL)),
        };
        match at.map(i64::try_from) {
            Some(Ok(at)) => Ok(at),
            Some(Err(_)) => Err(fail("lseek", libc::EINVAL)),
            None => Err(fail("lseek", libc::ENXIO)),
        }
    }

    /// The inode an open handle refers to.
    pub fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        Ok(self.files.get(fh)?.ino)
    }

    /// Check that `fh` is an open file or directory of the view (flush and fsync: nothing to do).
    pub fn check_handle(&self, fh: u64) -> FsResult<()> {
        if self.files.contains(fh) || self.dirs.contains(fh) {
            Ok(())
        } else {
            Err(FsError::UnknownHandle(fh))
        }
    }

    /// Close a file handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.files.remove(fh)
    }

    // ---- directories ----

    /// `.snapshots`: every committed snapshot whose tree can be loaded.
    fn snapdir_listing(&self) -> FsResult<Listing> {
        let names = self.store.names()?;
        lock(&self.trees).retain(|n, _| names.binary_search(n).is_ok());
        let mut out: Listing = vec![
            (".".into(), SNAPDIR_INO, FileKind::Directory),
            ("..".into(), ROOT_INO, FileKind::Directory),
        ];
        for name in names {
            match self.tree(&name) {
                Ok(t) => out.push((name.into(), t.root, FileKind::Directory)),
                // Deleted since listed (or a directory that is not a snapshot's).
                Err(e) if e.errno() == libc::ENOENT => {}
                Err(e) => warn!("{SNAPDIR_NAME}/{name}: {e}; not listed"),
            }
        }
        Ok(out)
    }

    fn listing(&self, ino: u64) -> FsResult<Listing> {
        if ino == SNAPDIR_INO {
            return self.snapdir_listing();
        }
        let node = self.node(ino)?;
        let Body::Dir(children) = &node.body else {
            return Err(fail("opendir", libc::ENOTDIR));
        };
        let mut out = Vec::with_capacity(children.len() + 2);
        out.push((".".into(), ino, FileKind::Directory));
        out.push(("..".into(), node.parent, FileKind::Directory));
        out.extend(children.iter().cloned());
        Ok(out)
    }

    /// Open a directory of the view as handle `fh` and list it.
    pub fn opendir(&self, ino: u64, fh: u64) -> FsResult<Opened> {
        let entries = self.listing(ino)?;
        self.dirs.insert(fh, DirListing::new(entries));
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    /// Directory entries from `offset`, with their entries for readdirplus (None for "." and
    /// ".."); `add` returns true when the reply buffer is full. Nothing is counted: the view's
    /// inodes need no lookup counts.
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()> {
        // A rewind sees `.snapshots` as it is now.
        let dir = self.dirs.get(fh)?;
        let entries = dir.at(offset, || self.listing(ino))?;
        for (i, (name, d_ino, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let entry = if plus && name != "." && name != ".." {
                match self.entry_of(*d_ino) {
                    Ok(e) => Some(e),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let d = DirEntry {
                ino: *d_ino,
                offset: i as u64 + 1,
                kind: *kind,
                name: name.clone(),
            };
            if add(d, entry.as_ref()) {
                break;
            }
        }
        Ok(())
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.dirs.remove(fh)
    }

    /// access(2): write access is EROFS, as on any read-only filesystem; the rest from the
    /// recorded mode and owner.
    pub fn access(&self, caller: Caller, ino: u64, mask: i32) -> FsResult<()> {
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        let a = self.getattr(ino)?;
        permits(caller, a.kind, u32::from(a.perm), a.uid, a.gid, mask)
    }
}
