//! The inode table: one FUSE inode per backing (st_dev, st_ino), each holding an
//! `O_PATH | O_NOFOLLOW` fd, with exact lookup counts.
//!
//! Keying by (dev, ino) rather than by path is what keeps hard links coherent (one nlink, one
//! mode, one ctime) and lets an unlinked-but-open file keep working. The table never resolves a
//! path and never does I/O while its lock is held, apart from closing fds of forgotten inodes.
//!
//! The FUSE inode number is also what stat shows as st_ino (fuser sends `attr.ino` as the node
//! id), so it must not depend on whether the kernel still holds the inode: the kernel forgets
//! inodes whenever it likes (memory pressure, `drop_caches`), and a number minted afresh at the
//! next lookup would make one file show a new st_ino, and two names of one hard link show two
//! numbers (tar, rsync -H, du and cp -a then copy or count the file twice). So the number is a
//! function of the backing (dev, ino): the backing inode number itself on the backing dir's
//! filesystem, a hash of (dev, ino) with the top bit set on any other one (see `ino_for`). The
//! numbers with the top two bits set are the snapshot view's (`SNAPVIEW`); this table never
//! hands them out.
//!
//! Lock order: `InodeTable::inner` is a leaf lock; nothing else is taken while it is held. A
//! lookup of an inode the table holds takes it shared (the count is atomic); only a new inode
//! and a forget take it exclusively.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{FileKind, FsError, FsResult};

/// FUSE inode number of the mount root.
pub const ROOT_INO: u64 = 1;

/// Inode numbers from here up are hashes of a (dev, ino) that is not on the backing dir's
/// filesystem; below it they are that filesystem's own inode numbers.
const FOREIGN: u64 = 1 << 63;

/// Inode numbers from here up (the top two bits set) belong to the read-only snapshot view
/// (`snapview`): a foreign hash always has bit 62 clear, so the two spaces never meet.
pub const SNAPVIEW: u64 = 0xC000_0000_0000_0000;

/// Whether `ino` is one of the snapshot view's inode numbers.
pub fn is_snapview(ino: u64) -> bool {
    ino >= SNAPVIEW
}

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
    /// Our (FUSE) inode number, `ino_for(key)`. It is handed out again only once the kernel has
    /// forgotten it (lookup count 0), so the kernel never holds two files under one number and
    /// the generation can stay 0; and while the kernel holds it, `fd` keeps the backing inode
    /// alive, so the backing filesystem cannot reuse its number for another file meanwhile.
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
    /// Kernel lookups not yet forgotten. Raised under the read lock (a lookup of a known
    /// inode, the common case, takes no write lock); lowered, and the slot removed at 0, only
    /// under the write lock, so no raise can race the removal.
    nlookup: AtomicU64,
}

struct Inner {
    by_ino: HashMap<u64, Slot>,
    by_key: HashMap<BackingKey, u64>,
    /// st_dev of the backing dir: inodes on it keep their own numbers.
    root_dev: u64,
}

impl Inner {
    /// The number for a new inode of `key`: the same every time the key comes back, unless it
    /// is taken (a hash collision, or a stale entry of the same key that the kernel still
    /// holds), and then the next free one of a fixed sequence.
    fn ino_for(&self, key: BackingKey) -> u64 {
        let mut ino = if key.dev == self.root_dev && key.ino > ROOT_INO && key.ino < FOREIGN {
            key.ino
        } else {
            foreign(key.ino ^ mix(key.dev))
        };
        while self.by_ino.contains_key(&ino) {
            ino = foreign(ino);
        }
        ino
    }
}

/// A number in the foreign range for hash input `x`: top bit set, bit 62 clear (the range with
/// both set is the snapshot view's).
fn foreign(x: u64) -> u64 {
    FOREIGN | (mix(x) & !(SNAPVIEW ^ FOREIGN))
}

/// splitmix64's finaliser: a bijection of u64 that scatters nearby values.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
                nlookup: AtomicU64::new(u64::MAX / 2),
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(root_key, ROOT_INO);
        InodeTable {
            inner: RwLock::new(Inner {
                by_ino,
                by_key,
                root_dev: root_key.dev,
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

    /// The inode number the kernel knows the backing inode `key` by, if it knows it.
    pub fn ino_of(&self, key: BackingKey) -> Option<u64> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_key.get(&key).copied()
    }

    /// Record one kernel lookup of the backing inode `key`; `fd` is an O_PATH fd on it that is
    /// kept if the inode is new and closed otherwise.
    pub fn lookup(&self, key: BackingKey, kind: FileKind, fd: OwnedFd) -> Arc<Inode> {
        if let Some(inode) = self.known(key, kind) {
            return inode;
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = inner.by_key.get(&key) {
            if let Some(slot) = inner.by_ino.get_mut(&ino) {
                // An inode can change kind only if the backing inode number was reused after the
                // old file was deleted behind our back; then the old entry is stale.
                if slot.inode.kind == kind {
                    *slot.nlookup.get_mut() += 1;
                    return slot.inode.clone();
                }
            }
            inner.by_key.remove(&key);
        }
        let ino = inner.ino_for(key);
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
                nlookup: AtomicU64::new(1),
            },
        );
        inner.by_key.insert(key, ino);
        drop(inner);
        log::trace!("inode {ino}: new for {key:?}");
        inode
    }

    /// One more kernel lookup of `key`, if the table holds it with kind `kind`: under the read
    /// lock only.
    fn known(&self, key: BackingKey, kind: FileKind) -> Option<Arc<Inode>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let slot = inner.by_ino.get(inner.by_key.get(&key)?)?;
        (slot.inode.kind == kind).then(|| {
            slot.nlookup.fetch_add(1, Ordering::Relaxed);
            slot.inode.clone()
        })
    }

    /// Drop `n` kernel references; the inode goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let gone = match inner.by_ino.get_mut(&ino) {
            Some(slot) => {
                let left = slot.nlookup.get_mut();
                *left = left.saturating_sub(n);
                *left == 0
            }
            None => false,
        };
        if gone {
            if let Some(slot) = inner.by_ino.remove(&ino) {
                if inner.by_key.get(&slot.inode.key) == Some(&ino) {
                    inner.by_key.remove(&slot.inode.key);
                }
            }
            drop(inner);
            log::trace!("inode {ino}: forgotten");
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
            .map_or(0, |s| s.nlookup.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u64 = 0xfe00;

    fn fd() -> OwnedFd {
        std::fs::File::open("/").expect("open /").into()
    }

    fn table() -> InodeTable {
        InodeTable::new(fd(), BackingKey { dev: DEV, ino: 2 })
    }

    fn key(dev: u64, ino: u64) -> BackingKey {
        BackingKey { dev, ino }
    }

    /// The kernel may forget an inode at any time (drop_caches, memory pressure); the next
    /// lookup of the same file must show the same st_ino, or two names of one hard link, looked
    /// up on either side of the forget, show two numbers.
    #[test]
    fn a_forgotten_inode_comes_back_with_the_same_number() {
        let t = table();
        for k in [key(DEV, 5000), key(DEV + 1, 5000), key(DEV, 1), key(DEV, 0)] {
            let first = t.lookup(k, FileKind::Regular, fd()).ino;
            t.forget(first, 1);
            assert_eq!(t.nlookup(first), 0, "{k:?} forgotten");
            let again = t.lookup(k, FileKind::Regular, fd()).ino;
            assert_eq!(first, again, "{k:?}");
            assert!(again > ROOT_INO, "{k:?} got reserved number {again}");
        }
    }

    #[test]
    fn numbers_are_the_backing_ones_on_the_backing_filesystem_and_distinct_elsewhere() {
        let t = table();
        let home = t.lookup(key(DEV, 5000), FileKind::Regular, fd()).ino;
        assert_eq!(home, 5000);
        let other = t.lookup(key(DEV + 1, 5000), FileKind::Regular, fd()).ino;
        let other2 = t.lookup(key(DEV + 2, 5000), FileKind::Regular, fd()).ino;
        assert!(other >= FOREIGN && other2 >= FOREIGN);
        assert!(!is_snapview(other) && !is_snapview(other2));
        assert_ne!(other, other2);
        // Inode numbers the backing filesystem cannot give us unchanged.
        let one = t.lookup(key(DEV, ROOT_INO), FileKind::Regular, fd()).ino;
        let huge = t.lookup(key(DEV, u64::MAX), FileKind::Regular, fd()).ino;
        assert!(one >= FOREIGN && huge >= FOREIGN && one != huge);
        assert!(!is_snapview(one) && !is_snapview(huge));
        // The root's own key is the root.
        assert_eq!(
            t.lookup(key(DEV, 2), FileKind::Directory, fd()).ino,
            ROOT_INO
        );
        assert_eq!(t.len(), 6);
    }

    /// A key whose kind changed (its backing number reused behind our back) while the kernel
    /// still holds the old inode: the new file gets another number, and forgetting the old
    /// inode leaves the new one reachable.
    #[test]
    fn a_stale_inode_still_held_does_not_share_its_number() {
        let t = table();
        let k = key(DEV, 7);
        let old = t.lookup(k, FileKind::Regular, fd()).ino;
        let new = t.lookup(k, FileKind::Directory, fd()).ino;
        assert_ne!(old, new);
        assert!(new > ROOT_INO);
        t.forget(old, 1);
        assert_eq!(t.lookup(k, FileKind::Directory, fd()).ino, new);
        assert_eq!(t.nlookup(new), 2);
        assert!(t.get(old).is_err());
    }

    /// Foreign numbers, including the ones the collision loop walks to, stay out of the
    /// snapshot view's range whatever the hash gives.
    #[test]
    fn foreign_numbers_never_enter_the_snapshot_view_range() {
        for x in (0..100_000u64).chain([u64::MAX, SNAPVIEW, FOREIGN]) {
            let ino = foreign(x);
            assert!(ino >= FOREIGN && !is_snapview(ino), "{x:#x} -> {ino:#x}");
        }
        let t = table();
        let mut seen = std::collections::HashSet::new();
        for i in 0..500 {
            // Devices other than the backing one: all foreign numbers, from many hash inputs.
            let ino = t
                .lookup(key(DEV + 1 + i % 7, i / 7), FileKind::Regular, fd())
                .ino;
            assert!(!is_snapview(ino), "{ino:#x}");
            assert!(seen.insert(ino), "{ino:#x} handed out twice");
        }
    }
}
