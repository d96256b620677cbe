//! The inode table: one FUSE inode per backing (st_dev, st_ino), each holding an
//! `O_PATH | O_NOFOLLOW` fd, with exact lookup counts.
//!
//! Keying by (dev, ino) rather than by path is what keeps hard links coherent (one nlink, one
//! mode, one ctime) and lets an unlinked-but-open file keep working. The table never resolves a
//! path and never does I/O while its lock is held, apart from closing fds of forgotten inodes.
//!
//! Lock order: `InodeTable::inner` is a leaf lock; nothing else is taken while it is held.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, RwLock};

use super::{FileKind, FsError, FsResult};

/// FUSE inode number of the mount root.
pub const ROOT_INO: u64 = 1;

/// Identity of a backing inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackingKey {
    pub dev: u64,
    pub ino: u64,
}

impl BackingKey {
    pub fn of(st: &libc::stat) -> BackingKey {
        BackingKey {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// What the kernel last saw of a file's content, to decide whether its page cache may be kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentStamp {
    pub size: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl ContentStamp {
    pub fn of(st: &libc::stat) -> ContentStamp {
        ContentStamp {
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// One live inode.
#[derive(Debug)]
pub struct Inode {
    /// Our (FUSE) inode number; never reused within a mount, so the generation is always 0.
    pub ino: u64,
    pub key: BackingKey,
    pub kind: FileKind,
    /// `O_PATH | O_NOFOLLOW` handle on the backing inode.
    pub fd: OwnedFd,
    /// Content stamp at the last open, for `keep_cache`.
    pub stamp: Mutex<Option<ContentStamp>>,
}

impl Inode {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

struct Slot {
    inode: Arc<Inode>,
    nlookup: u64,
}

struct Inner {
    by_ino: HashMap<u64, Slot>,
    by_key: HashMap<BackingKey, u64>,
    next_ino: u64,
}

/// All inodes the kernel currently holds a reference to.
pub struct InodeTable {
    inner: RwLock<Inner>,
}

impl InodeTable {
    /// A table holding only the root, which is never forgotten.
    pub fn new(root_fd: OwnedFd, root_key: BackingKey) -> InodeTable {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            key: root_key,
            kind: FileKind::Directory,
            fd: root_fd,
            stamp: Mutex::new(None),
        });
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT_INO,
            Slot {
                inode: root,
                // The kernel holds the root for the whole mount; one extra so forget never drops it.
                nlookup: u64::MAX / 2,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(root_key, ROOT_INO);
        InodeTable {
            inner: RwLock::new(Inner {
                by_ino,
                by_key,
                next_ino: ROOT_INO + 1,
            }),
        }
    }

    /// The inode for `ino`, or ESTALE.
    pub fn get(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .by_ino
            .get(&ino)
            .map(|s| s.inode.clone())
            .ok_or(FsError::UnknownInode(ino))
    }

    /// Record one kernel lookup of the backing inode `key`; `fd` is an O_PATH fd on it that is
    /// kept if the inode is new and closed otherwise.
    pub fn lookup(&self, key: BackingKey, kind: FileKind, fd: OwnedFd) -> Arc<Inode> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = inner.by_key.get(&key) {
            if let Some(slot) = inner.by_ino.get_mut(&ino) {
                // An inode can change kind only if the backing inode number was reused after the
                // old file was deleted behind our back; then the old entry is stale.
                if slot.inode.kind == kind {
                    slot.nlookup += 1;
                    return slot.inode.clone();
                }
            }
            inner.by_key.remove(&key);
        }
        let ino = inner.next_ino;
        inner.next_ino += 1;
        let inode = Arc::new(Inode {
            ino,
            key,
            kind,
            fd,
            stamp: Mutex::new(None),
        });
        inner.by_ino.insert(
            ino,
            Slot {
                inode: inode.clone(),
                nlookup: 1,
            },
        );
        inner.by_key.insert(key, ino);
        inode
    }

    /// Drop `n` kernel references; the inode goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let gone = match inner.by_ino.get_mut(&ino) {
            Some(slot) => {
                slot.nlookup = slot.nlookup.saturating_sub(n);
                slot.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(slot) = inner.by_ino.remove(&ino) {
                if inner.by_key.get(&slot.inode.key) == Some(&ino) {
                    inner.by_key.remove(&slot.inode.key);
                }
            }
        }
    }

    /// Number of live inodes (the root included).
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_ino
            .len()
    }

    /// True when only... never: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The kernel's lookup count for `ino` (0 if unknown); for tests and diagnostics.
    pub fn nlookup(&self, ino: u64) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_ino
            .get(&ino)
            .map_or(0, |s| s.nlookup)
    }
}
