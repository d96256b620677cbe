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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::SystemTime;

use log::warn;

use super::inode::{ROOT_INO, SNAPVIEW};
use super::{
    permits, sys, system_time, Attr, Caller, DirEntry, Entry, FileKind, FsError, FsResult, Opened,
    Validity, READ_BUF,
};
use crate::ids::{SnapshotName, VolumeId};
use crate::store::{EntryKind, Manifest, Store, StoreError, VolumeReader};

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

/// Directory entries: name, inode number, kind.
type Listing = Vec<(OsString, u64, FileKind)>;

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

/// An open directory of the view: the entries read at the last rewind.
struct SnapDirHandle {
    entries: Mutex<Listing>,
    /// Whether a readdir served this listing already (see `OverlayFs::readdir`).
    served: AtomicBool,
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
    files: RwLock<HashMap<u64, Arc<SnapFile>>>,
    dirs: RwLock<HashMap<u64, Arc<SnapDirHandle>>>,
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
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
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
            .fetch_add(plan.nodes.len() as u64, Ordering::Relaxed);
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
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(SnapFile { ino, reader }));
        // The content of a snapshot file never changes: the kernel may keep its page cache.
        Ok(Opened {
            fh,
            keep_cache: true,
        })
    }

    fn file(&self, fh: u64) -> FsResult<Arc<SnapFile>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// Read up to `size` bytes at `offset` and pass them to `with` (short only at end of file).
    pub fn read<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        with: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        let h = self.file(fh)?;
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(size as usize, 0);
            let n = h.reader.read_at(&mut buf, offset)?;
            Ok(with(&buf[..n]))
        })
    }

    /// lseek SEEK_DATA and SEEK_HOLE on an open file (the kernel handles the others itself),
    /// from the blocks the snapshot stores: a restore with `cp` keeps the holes.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.file(fh)?;
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
        Ok(self.file(fh)?.ino)
    }

    /// Check that `fh` is an open file or directory of the view (flush and fsync: nothing to do).
    pub fn check_handle(&self, fh: u64) -> FsResult<()> {
        let known = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&fh)
            || self
                .dirs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&fh);
        if known {
            Ok(())
        } else {
            Err(FsError::UnknownHandle(fh))
        }
    }

    /// Close a file handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or(FsError::UnknownHandle(fh))
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
        self.dirs.write().unwrap_or_else(|p| p.into_inner()).insert(
            fh,
            Arc::new(SnapDirHandle {
                entries: Mutex::new(entries),
                served: AtomicBool::new(false),
            }),
        );
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    fn dir(&self, fh: u64) -> FsResult<Arc<SnapDirHandle>> {
        self.dirs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
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
        let dir = self.dir(fh)?;
        let mut entries = lock(&dir.entries);
        if offset == 0 && dir.served.swap(true, Ordering::Relaxed) {
            // A rewind sees `.snapshots` as it is now.
            *entries = self.listing(ino)?;
        }
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
        self.dirs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or(FsError::UnknownHandle(fh))
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

/// A node of a tree being planned from a manifest (indices instead of inode numbers).
struct Planned {
    name: OsString,
    parent: usize,
    kind: FileKind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    size: u64,
    volume: Option<VolumeId>,
    target: Vec<u8>,
    children: Vec<usize>,
    /// A directory the manifest does not record (a parent of something it does): a recorded
    /// entry for the same path replaces its attributes.
    synthesized: bool,
}

/// A snapshot's tree planned from its manifest; index 0 is the root.
struct Plan {
    nodes: Vec<Planned>,
    by_name: HashMap<(usize, String), usize>,
    /// Attributes of a synthesized directory.
    synth: (u32, u32, SystemTime),
}

/// The components of a manifest path; None when one is "." or ".." (a damaged manifest: such
/// an entry is left out rather than shown somewhere it does not belong).
fn components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    (!parts.iter().any(|c| *c == "." || *c == "..")).then_some(parts)
}

impl Plan {
    /// The tree of manifest `m`. Directories come first, so a file or symlink under a path
    /// recorded as something else is what is left out; every left-out entry is logged.
    /// Regular files lose their setuid and setgid bits unless `setuid`.
    fn of(m: &Manifest, uid: u32, gid: u32, setuid: bool) -> Plan {
        let created = time_ns(m.created_ns as i128);
        let mut plan = Plan {
            nodes: Vec::new(),
            by_name: HashMap::new(),
            synth: (uid, gid, created),
        };
        plan.nodes.push(plan.synthesized(OsString::new(), 0));
        let skip = |path: &str, why: &str| warn!("snapshot {}: {path:?}: {why}; left out", m.name);
        for e in m.namespace.iter().filter(|e| e.kind == EntryKind::Dir) {
            let Some(parts) = components(&e.path) else {
                skip(&e.path, "not a plain relative path");
                continue;
            };
            let Some(i) = plan.dir(&parts) else {
                skip(&e.path, "under a path that is not a directory");
                continue;
            };
            let n = &mut plan.nodes[i];
            if !n.synthesized {
                skip(&e.path, "recorded twice");
                continue;
            }
            n.synthesized = false;
            (n.perm, n.uid, n.gid, n.mtime) = (e.mode, e.uid, e.gid, time_ns(e.mtime_ns));
        }
        // A snapshot keeps a program as it was, setuid root included: shown with the bit, a
        // program whose bit was dropped (a fixed vulnerability) would keep running as root
        // from the snapshot. The view therefore grants no privilege by default.
        let privilege = if setuid {
            0
        } else {
            libc::S_ISUID | libc::S_ISGID
        };
        let files = m.volumes.iter().map(|v| {
            let mode = v.mode & !privilege;
            let mut p = plan_leaf(FileKind::Regular, mode, v.uid, v.gid, v.mtime_ns);
            (p.size, p.volume) = (v.size, Some(v.id));
            (&v.path, p)
        });
        let links = m
            .namespace
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| {
                let mut p = plan_leaf(FileKind::Symlink, e.mode, e.uid, e.gid, e.mtime_ns);
                p.target = e.target.clone().unwrap_or_default().into_bytes();
                p.size = p.target.len() as u64;
                (&e.path, p)
            });
        let leaves: Vec<_> = files.chain(links).collect();
        for (path, leaf) in leaves {
            let Some((name, parents)) = components(path).and_then(|p| {
                let (name, parents) = p.split_last()?;
                Some((name.to_string(), parents.to_vec()))
            }) else {
                skip(path, "not a plain relative path to a file");
                continue;
            };
            let Some(parent) = plan.dir(&parents) else {
                skip(path, "under a path that is not a directory");
                continue;
            };
            if plan.by_name.contains_key(&(parent, name.clone())) {
                skip(path, "recorded twice");
                continue;
            }
            plan.add(parent, name, leaf);
        }
        plan
    }

    fn synthesized(&self, name: OsString, parent: usize) -> Planned {
        let (uid, gid, mtime) = self.synth;
        Planned {
            name,
            parent,
            kind: FileKind::Directory,
            perm: 0o755,
            uid,
            gid,
            mtime,
            size: 0,
            volume: None,
            target: Vec::new(),
            children: Vec::new(),
            synthesized: true,
        }
    }

    fn add(&mut self, parent: usize, name: String, mut node: Planned) -> usize {
        let i = self.nodes.len();
        node.name = OsString::from(&name);
        node.parent = parent;
        self.nodes.push(node);
        self.nodes[parent].children.push(i);
        self.by_name.insert((parent, name), i);
        i
    }

    /// The directory at `parts`, synthesizing missing ones; None when a component is not one.
    fn dir(&mut self, parts: &[&str]) -> Option<usize> {
        let mut at = 0;
        for part in parts {
            at = match self.by_name.get(&(at, part.to_string())) {
                Some(&i) if self.nodes[i].kind == FileKind::Directory => i,
                Some(_) => return None,
                None => {
                    let d = self.synthesized(OsString::new(), at);
                    self.add(at, part.to_string(), d)
                }
            };
        }
        Some(at)
    }

    /// The nodes, numbered from `base` in plan order (the root is `base`).
    fn into_nodes(self, base: u64, tree: &Arc<Tree>, block_size: u64) -> Vec<Node> {
        let ino = |i: usize| base + i as u64;
        let blksize = block_size.clamp(512, u32::MAX as u64) as u32;
        let kinds: Vec<FileKind> = self.nodes.iter().map(|n| n.kind).collect();
        let names: Vec<OsString> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.nodes
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let body = match (p.kind, p.volume) {
                    (FileKind::Directory, _) => {
                        let mut children: Listing = p
                            .children
                            .iter()
                            .map(|&c| (names[c].clone(), ino(c), kinds[c]))
                            .collect();
                        children.sort_by(|a, b| a.0.cmp(&b.0));
                        Body::Dir(children)
                    }
                    (_, Some(volume)) => Body::File {
                        tree: tree.clone(),
                        volume,
                    },
                    _ => Body::Symlink(p.target),
                };
                // A directory's link count: itself, its entry in the parent, each subdirectory's "..".
                let nlink = match &body {
                    Body::Dir(children) => {
                        2 + children
                            .iter()
                            .filter(|c| c.2 == FileKind::Directory)
                            .count() as u32
                    }
                    _ => 1,
                };
                let attr = Attr {
                    ino: ino(i),
                    size: p.size,
                    blocks: p.size.div_ceil(512),
                    nlink,
                    blksize,
                    ..node_attr(p.kind, p.perm, p.uid, p.gid, p.mtime)
                };
                Node {
                    attr,
                    // The root's parent is `.snapshots`.
                    parent: if i == 0 { SNAPDIR_INO } else { ino(p.parent) },
                    body,
                }
            })
            .collect()
    }
}

fn plan_leaf(kind: FileKind, mode: u32, uid: u32, gid: u32, mtime_ns: i128) -> Planned {
    Planned {
        name: OsString::new(),
        parent: 0,
        kind,
        perm: mode,
        uid,
        gid,
        mtime: time_ns(mtime_ns),
        size: 0,
        volume: None,
        target: Vec::new(),
        children: Vec::new(),
        synthesized: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Geometry;
    use crate::store::{NamespaceEntry, VolumeEntry};

    const UID: u32 = 4242;
    const GID: u32 = 4343;
    const CREATED: u64 = 1_700_000_000_000_000_000;

    fn manifest(volumes: &[(&str, u64)], namespace: Vec<NamespaceEntry>) -> Manifest {
        Manifest {
            format: crate::store::FORMAT,
            name: "s".into(),
            group: "all".into(),
            created_ns: CREATED,
            parent: None,
            geometry: Geometry {
                block_size: 65536,
                partition_size: 1 << 26,
            },
            volumes: volumes
                .iter()
                .map(|&(path, ino)| VolumeEntry {
                    id: VolumeId { dev: 9, ino },
                    path: path.into(),
                    size: ino * 1000,
                    mode: 0o100600,
                    uid: 1,
                    gid: 2,
                    mtime_ns: 5_000_000_007,
                    partitions: Vec::new(),
                    table: None,
                    records: 0,
                    stored_bytes: 0,
                })
                .collect(),
            packs: Vec::new(),
            namespace,
        }
    }

    fn ns(path: &str, kind: EntryKind, mode: u32) -> NamespaceEntry {
        NamespaceEntry {
            path: path.into(),
            kind,
            mode,
            uid: 7,
            gid: 8,
            mtime_ns: -1_500_000_000,
            target: Some("t".into()),
        }
    }

    /// The tree as (path, kind, perm, uid) lines, plus the nodes by path.
    fn tree_of(m: &Manifest) -> (Vec<String>, HashMap<String, Node>) {
        let tree = Arc::new(Tree {
            name: "s".into(),
            created_ns: CREATED,
            root: 100,
        });
        let nodes = Plan::of(m, UID, GID, false).into_nodes(100, &tree, 65536);
        let by_ino: HashMap<u64, &Node> = nodes.iter().map(|n| (n.attr.ino, n)).collect();
        let mut paths = HashMap::new();
        let mut lines = Vec::new();
        let mut stack = vec![(String::new(), 100u64)];
        while let Some((path, ino)) = stack.pop() {
            let n = by_ino[&ino];
            lines.push(format!(
                "{path:?} {:?} {:o} {}",
                n.attr.kind, n.attr.perm, n.attr.uid
            ));
            if let Body::Dir(children) = &n.body {
                for (name, c, _) in children.iter().rev() {
                    let p = format!("{path}/{}", name.to_string_lossy());
                    stack.push((p.trim_start_matches('/').to_string(), *c));
                }
            }
            paths.insert(path, ino);
        }
        let mut nodes: HashMap<u64, Node> = nodes.into_iter().map(|n| (n.attr.ino, n)).collect();
        let by_path = paths
            .into_iter()
            .map(|(p, ino)| (p, nodes.remove(&ino).expect("node")))
            .collect();
        (lines, by_path)
    }

    #[test]
    fn recorded_entries_keep_their_attributes_and_missing_parents_are_made_up() {
        let m = manifest(
            &[("vms/a.img", 1), ("deep/er/b.raw", 2), ("/top//c", 3)],
            vec![
                // After a volume under it: still replaces the made-up directory.
                ns("vms", EntryKind::Dir, 0o40700),
                ns("", EntryKind::Dir, 0o40750),
                ns("vms/link", EntryKind::Symlink, 0o120777),
            ],
        );
        let (lines, nodes) = tree_of(&m);
        assert_eq!(
            lines,
            [
                "\"\" Directory 750 7",
                "\"deep\" Directory 755 4242",
                "\"deep/er\" Directory 755 4242",
                "\"deep/er/b.raw\" Regular 600 1",
                "\"top\" Directory 755 4242",
                "\"top/c\" Regular 600 1",
                "\"vms\" Directory 700 7",
                "\"vms/a.img\" Regular 600 1",
                "\"vms/link\" Symlink 777 7",
            ]
        );
        let root = &nodes[""];
        assert_eq!(root.parent, SNAPDIR_INO);
        assert_eq!(root.attr.ino, 100);
        assert_eq!(root.attr.nlink, 5, "root: 2 + deep, top, vms");
        assert_eq!(root.attr.mtime, time_ns(-1_500_000_000));
        let deep = &nodes["deep"];
        assert_eq!((deep.attr.uid, deep.attr.gid), (UID, GID));
        assert_eq!(deep.attr.mtime, time_ns(CREATED as i128));
        let a = &nodes["vms/a.img"];
        assert_eq!((a.attr.size, a.attr.blocks, a.attr.nlink), (1000, 2, 1));
        assert_eq!(a.attr.mtime, time_ns(5_000_000_007));
        assert_eq!(a.attr.blksize, 65536);
        assert!(matches!(a.body, Body::File { volume, .. } if volume.ino == 1));
        assert_eq!(a.parent, nodes["vms"].attr.ino);
        let link = &nodes["vms/link"];
        assert!(matches!(&link.body, Body::Symlink(t) if t == b"t"));
        assert_eq!(link.attr.size, 1);
    }

    #[test]
    fn entries_that_cannot_be_placed_are_left_out() {
        let m = manifest(
            &[
                ("a", 1),
                ("a/under-a-file", 2),
                ("x/../escape", 3),
                ("d", 4),
            ],
            vec![
                ns("a/b", EntryKind::Dir, 0o755),
                ns("d", EntryKind::Dir, 0o700),
                ns("d", EntryKind::Dir, 0o711),
                ns("a", EntryKind::Symlink, 0o777),
                ns("./dot", EntryKind::Dir, 0o777),
            ],
        );
        let (lines, _) = tree_of(&m);
        // Directories are placed first: the volumes and the symlink named like one are what
        // is left out, as are the paths with "." or "..", and the second record of "d".
        assert_eq!(
            lines,
            [
                "\"\" Directory 755 4242",
                "\"a\" Directory 755 4242",
                "\"a/b\" Directory 755 7",
                "\"a/under-a-file\" Regular 600 1",
                "\"d\" Directory 700 7",
            ]
        );
    }

    #[test]
    fn setuid_and_setgid_bits_of_files_show_only_when_asked() {
        let mut m = manifest(&[("bin/su", 1)], vec![ns("bin", EntryKind::Dir, 0o42755)]);
        m.volumes[0].mode = 0o106755;
        let tree = Arc::new(Tree {
            name: "s".into(),
            created_ns: CREATED,
            root: 100,
        });
        let perms = |setuid| {
            let nodes = Plan::of(&m, UID, GID, setuid).into_nodes(100, &tree, 65536);
            let perm = |kind| {
                nodes
                    .iter()
                    .find(|n| n.attr.kind == kind && n.attr.ino != 100)
                    .map(|n| n.attr.perm)
            };
            (perm(FileKind::Regular), perm(FileKind::Directory))
        };
        // A directory's setgid only says which group new entries get: it stays.
        assert_eq!(perms(false), (Some(0o755), Some(0o2755)));
        assert_eq!(perms(true), (Some(0o6755), Some(0o2755)));
    }

    #[test]
    fn nanosecond_times_convert_on_both_sides_of_the_epoch() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(
            time_ns(1_500_000_001),
            UNIX_EPOCH + Duration::new(1, 500_000_001)
        );
        assert_eq!(time_ns(-1), UNIX_EPOCH - Duration::from_nanos(1));
        assert_eq!(
            time_ns(-1_500_000_000),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
    }
}
