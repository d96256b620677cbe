//! Which stored extents of which pack files have been proven against their blake3, so a block
//! read through a snapshot is hashed once, not at every read (DESIGN.md: "A stored block that
//! fails its blake3 reads as EIO, never as wrong bytes"). A pack's proofs hold only while its
//! (mtime, ctime) stay what they were when the extents were hashed: any change to the file
//! forgets them all, and the next reads hash again.
//!
//! It is memory only, shared by every reader of one `Store` (so a file closed and opened again
//! is not hashed again), and bounded: past `MAX_EXTENTS` the least recently used pack is
//! forgotten. It never reads or writes the store and never vouches for an extent that a caller
//! did not hash under the stamp it gives.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, MutexGuard};

/// Extents remembered in all (about 16 bytes each: 16 MiB, or 64 GiB of 64 KiB blocks).
const MAX_EXTENTS: usize = 1 << 20;

/// A pack file's identity: (st_dev, st_ino).
pub type PackKey = (u64, u64);

/// What must not change for a pack's proofs to hold: mtime and ctime, in nanoseconds, and the
/// length (packs of committed snapshots never change; any write moves mtime, and a
/// metadata change that could stand for a replaced content, ctime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    len: u64,
}

impl Stamp {
    /// The stamp of a pack in memory: its length and a count of the writes to it (which
    /// stands for the mtime).
    pub fn of_memory(len: u64, writes: u64) -> Stamp {
        Stamp {
            mtime_ns: writes as i128,
            ctime_ns: 0,
            len,
        }
    }

    /// The stamp of an open pack, and its key.
    pub fn of(f: &File) -> io::Result<(PackKey, Stamp)> {
        let m = f.metadata()?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Ok((
            (m.dev(), m.ino()),
            Stamp {
                mtime_ns: ns(m.mtime(), m.mtime_nsec()),
                ctime_ns: ns(m.ctime(), m.ctime_nsec()),
                len: m.len(),
            },
        ))
    }
}

struct Proven {
    stamp: Stamp,
    /// Offsets in the pack of the extents proven under `stamp` (an offset names one extent:
    /// records never share a start).
    extents: HashSet<u64>,
    /// Last use, for eviction.
    used: u64,
}

#[derive(Default)]
struct Packs {
    by_key: HashMap<PackKey, Proven>,
    total: usize,
    clock: u64,
}

/// The extents proven so far, per pack (see the module doc).
#[derive(Default)]
pub struct VerifiedExtents {
    packs: Mutex<Packs>,
}

impl std::fmt::Debug for VerifiedExtents {
    // Counts only: the sets can hold a million offsets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packs = self.lock();
        f.debug_struct("VerifiedExtents")
            .field("packs", &packs.by_key.len())
            .field("extents", &packs.total)
            .finish()
    }
}

impl VerifiedExtents {
    fn lock(&self) -> MutexGuard<'_, Packs> {
        self.packs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stamp under which extent `offset` of pack `key` was proven, if it was.
    pub(crate) fn proven_under(&self, key: PackKey, offset: u64) -> Option<Stamp> {
        let mut packs = self.lock();
        packs.clock += 1;
        let now = packs.clock;
        let p = packs.by_key.get_mut(&key)?;
        p.used = now;
        p.extents.contains(&offset).then_some(p.stamp)
    }

    /// Forget every proof of pack `key` made under `stamp` (the file changed since).
    pub(crate) fn forget(&self, key: PackKey, stamp: Stamp) {
        let mut packs = self.lock();
        if packs.by_key.get(&key).is_some_and(|p| p.stamp == stamp) {
            if let Some(p) = packs.by_key.remove(&key) {
                packs.total -= p.extents.len();
            }
        }
    }

    /// Remember that extent `offset` of pack `key` matched its blake3 while the pack had
    /// `stamp` (taken before the read and unchanged after it). Proofs under another stamp are
    /// dropped: only the newest state of a file counts.
    pub(crate) fn prove(&self, key: PackKey, stamp: Stamp, offset: u64) {
        let mut packs = self.lock();
        packs.clock += 1;
        let now = packs.clock;
        let stale = packs.by_key.get(&key).is_some_and(|p| p.stamp != stamp);
        if stale {
            if let Some(p) = packs.by_key.remove(&key) {
                packs.total -= p.extents.len();
            }
        }
        let p = packs.by_key.entry(key).or_insert_with(|| Proven {
            stamp,
            extents: HashSet::new(),
            used: now,
        });
        p.used = now;
        if p.extents.insert(offset) {
            packs.total += 1;
        }
        while packs.total > MAX_EXTENTS {
            let Some(oldest) = packs
                .by_key
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, p)| p.used)
                .map(|(k, _)| *k)
            else {
                // One pack alone over the bound: start it over.
                if let Some(p) = packs.by_key.get_mut(&key) {
                    p.extents.clear();
                }
                packs.total = 0;
                break;
            };
            if let Some(p) = packs.by_key.remove(&oldest) {
                packs.total -= p.extents.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn proofs_hold_until_the_pack_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pack");
        std::fs::write(&path, b"0123456789").unwrap();
        let f = File::open(&path).unwrap();
        let (key, stamp) = Stamp::of(&f).unwrap();
        let v = VerifiedExtents::default();
        assert_eq!(v.proven_under(key, 4), None);
        v.prove(key, stamp, 4);
        assert_eq!(v.proven_under(key, 4), Some(stamp));
        assert_eq!(v.proven_under(key, 5), None);

        // An append moves mtime (and the length): the old stamp no longer matches.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"x").unwrap();
        let (_, changed) = Stamp::of(&f).unwrap();
        assert_ne!(changed, stamp);
        v.forget(key, stamp);
        assert_eq!(v.proven_under(key, 4), None);
        v.prove(key, changed, 6);
        assert_eq!(v.proven_under(key, 6), Some(changed));
        // A proof under another stamp drops the ones made before: one stamp per pack.
        v.prove(key, stamp, 4);
        assert_eq!(v.proven_under(key, 6), None);
    }
}
