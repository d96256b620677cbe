//! Open handles: `HandleTable<T>`, the fh -> handle map that both trees use (the live tree's
//! files and directories, the snapshot view's), and `DirListing`, the listing an open
//! directory serves from. Handle numbers come from `OverlayFs`, one counter for both trees.
//!
//! A table's lock is a leaf: it is held only to insert, clone out or remove an `Arc`, never
//! across I/O, so a slow backing file never blocks another handle's lookup.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{FileKind, FsError, FsResult};

/// Open handles of one kind, by file handle number.
pub(super) struct HandleTable<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
}

impl<T> HandleTable<T> {
    pub(super) fn new() -> HandleTable<T> {
        HandleTable {
            map: RwLock::new(HashMap::new()),
        }
    }

    /// Register `handle` as `fh`.
    pub(super) fn insert(&self, fh: u64, handle: T) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(handle));
    }

    /// The handle open as `fh`.
    pub(super) fn get(&self, fh: u64) -> FsResult<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// Whether `fh` is open here.
    pub(super) fn contains(&self, fh: u64) -> bool {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&fh)
    }

    /// Every open handle, cloned out (the lock is held only to clone).
    pub(super) fn all(&self) -> Vec<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Close `fh` (the handle goes once no request holds it any more).
    pub(super) fn remove(&self, fh: u64) -> FsResult<()> {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or(FsError::UnknownHandle(fh))
    }
}

/// Directory entries: name, inode number (0: the parent of the root), kind.
pub(super) type Listing = Vec<(OsString, u64, FileKind)>;

/// What an open directory serves readdir from: the entries read at opendir or the last rewind.
pub(super) struct DirListing {
    entries: Mutex<Listing>,
    /// Whether a readdir already served this listing: only then is offset 0 a rewind that
    /// must read the directory again (opendir just read it).
    served: AtomicBool,
}

impl DirListing {
    pub(super) fn new(entries: Listing) -> DirListing {
        DirListing {
            entries: Mutex::new(entries),
            served: AtomicBool::new(false),
        }
    }

    /// The entries to serve a readdir at `offset` from; a rewind sees the directory as it is
    /// now (`relist`).
    pub(super) fn at(
        &self,
        offset: u64,
        relist: impl FnOnce() -> FsResult<Listing>,
    ) -> FsResult<MutexGuard<'_, Listing>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && self.served.swap(true, Ordering::Relaxed) {
            *entries = relist()?;
        }
        Ok(entries)
    }
}
