//! The write-intent record, in the spirit of md RAID's write-intent bitmap: before the first
//! write to a partition in each tick, the (volume, partition) pair is made durable here; it is
//! cleared only after the dirty bitmaps that cover that write are saved. After a crash, the pairs
//! still listed are exactly the partitions whose tracking may be behind their data.
//!
//! Lock order: `IntentLog::sets` is a leaf lock (held across the durable file write, which is
//! the point: concurrent first-writes to new partitions wait for one another).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::state::read_tracking_file;
use crate::ids::VolumeId;
use crate::sys::write_durably;

/// Format version of the intent file.
pub const INTENT_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct IntentFile {
    format: u32,
    partitions: Vec<(VolumeId, u64)>,
}

#[derive(Default)]
struct Sets {
    /// Recorded in the current epoch.
    current: BTreeSet<(VolumeId, u64)>,
    /// Recorded in earlier epochs whose bitmaps are not saved yet.
    previous: BTreeSet<(VolumeId, u64)>,
}

/// The durable write-intent record of one store.
pub struct IntentLog {
    path: PathBuf,
    epoch: AtomicU64,
    sets: Mutex<Sets>,
}

impl IntentLog {
    /// Open the record in `dir`; returns it and the pairs a previous daemon left behind (after a
    /// crash), which stay recorded until `clear_previous`.
    pub fn open(dir: &Path) -> io::Result<(IntentLog, BTreeSet<(VolumeId, u64)>)> {
        let path = dir.join("intent.json");
        let left: BTreeSet<(VolumeId, u64)> =
            match read_tracking_file::<IntentFile>(&path, INTENT_FORMAT)? {
                Some(f) => f.partitions.into_iter().collect(),
                None => BTreeSet::new(),
            };
        let log = IntentLog {
            path,
            // Epoch 0 is what fresh partitions hold, so the first real epoch is 1.
            epoch: AtomicU64::new(1),
            sets: Mutex::new(Sets {
                current: BTreeSet::new(),
                previous: left.clone(),
            }),
        };
        Ok((log, left))
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn write(&self, sets: &Sets) -> io::Result<()> {
        let f = IntentFile {
            format: INTENT_FORMAT,
            partitions: sets.previous.union(&sets.current).copied().collect(),
        };
        let bytes = serde_json::to_vec(&f).map_err(io::Error::other)?;
        write_durably(&self.path, &bytes)
    }

    /// Make (volume, partition) durable before its first write of this epoch.
    pub fn record(&self, id: VolumeId, partition: u64) -> io::Result<()> {
        self.record_many(id, &[partition])
    }

    /// Make several partitions of one volume durable with a single write.
    pub fn record_many(&self, id: VolumeId, partitions: &[u64]) -> io::Result<()> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let mut added = Vec::new();
        let mut need_write = false;
        for &p in partitions {
            let key = (id, p);
            if sets.current.insert(key) {
                added.push(key);
                need_write |= !sets.previous.contains(&key);
            }
        }
        if !need_write {
            return Ok(());
        }
        if let Err(e) = self.write(&sets) {
            for key in added {
                sets.current.remove(&key);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Start a new epoch: what was recorded so far waits for the next save.
    pub fn rotate(&self) -> u64 {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let current = std::mem::take(&mut sets.current);
        sets.previous.extend(current);
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The bitmaps covering every earlier epoch are saved: forget those records.
    pub fn clear_previous(&self) -> io::Result<()> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        // Nothing to forget and the file already says what `current` says.
        if sets.previous.is_empty() && (self.path.exists() != sets.current.is_empty()) {
            return Ok(());
        }
        sets.previous.clear();
        if sets.current.is_empty() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            return crate::sys::fsync_dir(self.path.parent().unwrap_or(Path::new(".")));
        }
        self.write(&sets)
    }

    /// Keep `pairs` recorded into the current epoch (lazy clearing, as md does): they were
    /// written during the epoch just saved and are likely written again, so their next write
    /// costs no durable record. They are on disk already (in `previous`).
    pub fn carry(&self, pairs: &[(VolumeId, u64)]) {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.current.extend(pairs.iter().copied());
    }

    /// Pairs recorded and not yet cleared (for tests and status).
    pub fn pending(&self) -> BTreeSet<(VolumeId, u64)> {
        let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.previous.union(&sets.current).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: VolumeId = VolumeId { dev: 1, ino: 7 };

    #[test]
    fn records_survive_a_crash_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (log, left) = IntentLog::open(dir.path()).unwrap();
        assert!(left.is_empty());
        log.record(V, 3).unwrap();
        log.record(V, 4).unwrap();
        // A crash here: a new daemon finds both.
        let (_, left) = IntentLog::open(dir.path()).unwrap();
        assert_eq!(left, [(V, 3), (V, 4)].into_iter().collect());
        // Rotation keeps them on disk until the save that covers them.
        log.rotate();
        log.record(V, 5).unwrap();
        let (_, left) = IntentLog::open(dir.path()).unwrap();
        assert_eq!(left.len(), 3);
        log.clear_previous().unwrap();
        let (_, left) = IntentLog::open(dir.path()).unwrap();
        assert_eq!(left, [(V, 5)].into_iter().collect());
        log.rotate();
        log.clear_previous().unwrap();
        let (_, left) = IntentLog::open(dir.path()).unwrap();
        assert!(left.is_empty());
        assert!(!dir.path().join("intent.json").exists());
    }

    #[test]
    fn leftovers_stay_pending_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = IntentLog::open(dir.path()).unwrap();
        log.record(V, 1).unwrap();
        drop(log);
        let (log, left) = IntentLog::open(dir.path()).unwrap();
        assert_eq!(log.pending(), left);
        log.clear_previous().unwrap();
        assert!(log.pending().is_empty());
    }
}
