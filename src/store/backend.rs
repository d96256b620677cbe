//! The boundary between the store's logic (format, chains, verify, commit order, delete) and
//! the medium that holds a snapshot's files: a small trait in the spirit of rustic_core's
//! backend. A snapshot is a set of named files (its manifest, block tables and packs); the
//! medium stores them, lists committed snapshots, reads whole small files and ranges of packs,
//! builds a snapshot out of sight and makes it visible in one step, and removes one.
//!
//! Implementations: `local::LocalDir` (a directory, what a mount uses), `memory::MemoryStore`
//! (fast tests) and `failing::Failing` (a wrapper that fails a chosen call). What comes next
//! fits the same shape: delete with merge stages a new version of a child (`StageMode::Replace`)
//! that rewrites blocks from a pack it reads or re-references a pack (`Staging::adopt`); a
//! remote store reads manifests and tables whole and packs by range. Nothing here knows the
//! format: it moves bytes and names, and must never make a partial snapshot visible.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{IoContext, Result};
pub use super::verified::{PackKey, Stamp};
use crate::ids::SnapshotName;

/// Where a snapshot's files are kept.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Where the snapshots are (for the local store, `<store>/snapshots`).
    fn location(&self) -> &Path;

    /// How `file` of snapshot `snap` is named in messages (a real path for the local store).
    fn path_of(&self, snap: &str, file: &str) -> PathBuf;

    /// Names of the committed snapshots, in no particular order; raw, so a stray entry that
    /// is no valid name is there too (`Store::list` shows it as unreadable).
    fn names(&self) -> Result<Vec<String>>;

    /// Whether committed snapshot `snap` is there.
    fn exists(&self, snap: &SnapshotName) -> Result<bool>;

    /// The whole of `file` (a manifest or a block table) of committed snapshot `snap`. A
    /// missing file is `StoreError::Io` with `ErrorKind::NotFound`.
    fn read(&self, snap: &SnapshotName, file: &str) -> Result<Vec<u8>>;

    /// The length of `file` of committed snapshot `snap`.
    fn len(&self, snap: &SnapshotName, file: &str) -> Result<u64>;

    /// Open pack `file` of committed snapshot `snap` for reads by range.
    fn open_pack(&self, snap: &SnapshotName, file: &str) -> Result<Arc<dyn PackRead>>;

    /// Start building snapshot `snap` out of sight. `New` fails with `StoreError::NameTaken`
    /// if the name is in use or being built; `Replace` builds a new version of a committed
    /// snapshot, which its commit swaps in.
    fn stage(&self, snap: &SnapshotName, mode: StageMode) -> Result<Box<dyn Staging>>;

    /// Remove committed snapshot `snap`: gone for readers in one step, durable on return. A
    /// reader that opened its packs before keeps reading them.
    fn remove(&self, snap: &SnapshotName) -> Result<()>;

    /// The store-wide record `file` (holds, deletions under way), None if it was never
    /// written. Records live beside the snapshots, never inside one.
    fn read_record(&self, file: &str) -> Result<Option<Vec<u8>>>;

    /// Replace record `file` with `bytes` in one step, durably (a crash leaves the old
    /// version or the new one).
    fn write_record(&self, file: &str, bytes: &[u8]) -> Result<()>;
}

/// What a staged snapshot becomes at its commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageMode {
    /// A snapshot under a name not in use.
    New,
    /// A new version of a committed snapshot (delete with merge rewrites a child).
    Replace,
}

/// A snapshot being built. Dropping it without `commit` or `abort` drops what it wrote (best
/// effort; the local store sweeps what is left at its next open).
pub trait Staging: Send + Sync {
    /// Create pack `file`, empty, for writes by offset.
    fn create_pack(&self, file: &str) -> Result<Arc<dyn PackWrite>>;

    /// Write small file `file` (a block table) whole and durably; it must not exist yet.
    fn write_file(&self, file: &str, bytes: &[u8]) -> Result<()>;

    /// Take `file` of committed snapshot `from` in as `as_file`, without copying its bytes
    /// where the medium can (a hard link locally, a server-side copy remotely): how delete with
    /// merge hands a deleted snapshot's pack to its child.
    fn adopt(&self, from: &SnapshotName, file: &str, as_file: &str) -> Result<()>;

    /// Write the manifest durably, then make the snapshot visible in one step. On an error
    /// before that step nothing is visible and what was staged is dropped; an error after it
    /// (the fsync that makes the step durable) leaves the snapshot visible and complete.
    fn commit(self: Box<Self>, manifest: &[u8]) -> Result<()>;

    /// Drop everything staged; durable on return.
    fn abort(self: Box<Self>) -> Result<()>;
}

/// Bytes of a volume (or of another pack) that a pack takes in: `len` bytes of `file` at
/// `offset`. `bytes`, when the caller already holds the same bytes, spares a read.
#[derive(Clone, Copy)]
pub struct BlockSource<'a> {
    pub file: &'a File,
    pub offset: u64,
    pub len: u64,
    pub bytes: Option<&'a [u8]>,
}

impl BlockSource<'_> {
    /// The bytes: the ones given, or read from the file.
    pub fn read(&self, path: &Path) -> Result<std::borrow::Cow<'_, [u8]>> {
        if let Some(b) = self.bytes {
            return Ok(b.into());
        }
        let mut buf = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut buf, self.offset).at(path)?;
        Ok(buf.into())
    }
}

/// A pack being written.
pub trait PackWrite: Send + Sync {
    /// Write `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Put `src` at `offset`. The default reads it into memory and calls `write_at`; the
    /// local store copies in the kernel (`copy_file_range`: a reflink where the filesystem
    /// can share extents).
    fn write_from(&self, offset: u64, src: BlockSource<'_>) -> Result<()> {
        let data = src.read(Path::new("<block source>"))?;
        self.write_at(offset, &data)
    }

    /// Share `len` bytes of `src` at `src_off` with the pack at `offset` by reflink
    /// (FICLONERANGE): no byte is read or copied, and the pack's range keeps what `src` held at
    /// the instant of the call. Ok(false): the medium or its filesystem cannot (the default;
    /// the local store on ext4, or with the volume on another filesystem), and nothing was
    /// written; Err: a failure.
    fn reflink_from(&self, _offset: u64, _src: &File, _src_off: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }

    /// Start writing back `start..end` (a hint that keeps a large build's dirty page cache
    /// small; a no-op where it means nothing).
    fn start_writeback(&self, _start: u64, _end: u64) {}

    /// Write back `start..end` and wait for it (a hint, as `start_writeback`).
    fn wait_writeback(&self, _start: u64, _end: u64) {}

    /// Make everything written durable.
    fn sync(&self) -> Result<()>;
}

/// A pack of a committed snapshot open for reads by range.
pub trait PackRead: Send + Sync {
    /// Fill `buf` from `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// The pack's identity and what must not change for proofs of its extents to hold (see
    /// `verified`).
    fn stamp(&self) -> std::io::Result<(PackKey, Stamp)>;

    /// The pack as a file, where it is one: delete with merge hands its extents to
    /// `PackWrite::write_from` (`copy_file_range`, a reflink where the filesystem can share
    /// extents). None: the caller reads the bytes and writes them.
    fn as_file(&self) -> Option<&File> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalDir;
    use crate::store::memory::MemoryStore;
    use crate::store::StoreError;

    fn n(s: &str) -> SnapshotName {
        SnapshotName::parse(s).unwrap()
    }

    /// The contract every medium keeps, run on each.
    fn contract(b: &dyn Backend) {
        let s = b.stage(&n("a"), StageMode::New).unwrap();
        assert!(matches!(
            b.stage(&n("a"), StageMode::New),
            Err(StoreError::NameTaken(_))
        ));
        let p = s.create_pack("pack-000000").unwrap();
        p.write_at(0, b"header..").unwrap();
        let src = tempfile::tempfile().unwrap();
        src.write_all_at(&[7u8; 8192], 0).unwrap();
        p.write_from(
            4096,
            BlockSource {
                file: &src,
                offset: 0,
                len: 4096,
                bytes: None,
            },
        )
        .unwrap();
        p.sync().unwrap();
        s.write_file("vol-000000.tbl", b"table").unwrap();
        // Nothing is visible before the commit.
        assert!(b.names().unwrap().is_empty());
        assert!(!b.exists(&n("a")).unwrap());
        s.commit(b"manifest one").unwrap();
        assert_eq!(b.names().unwrap(), vec!["a".to_string()]);
        assert_eq!(b.read(&n("a"), "manifest.json").unwrap(), b"manifest one");
        assert_eq!(b.len(&n("a"), "pack-000000").unwrap(), 8192);
        let r = b.open_pack(&n("a"), "pack-000000").unwrap();
        let mut buf = [0u8; 4];
        r.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [7; 4]);

        // Replace: a new version that takes the old one's pack in without copying it.
        let s = b.stage(&n("a"), StageMode::Replace).unwrap();
        s.adopt(&n("a"), "pack-000000", "pack-000001").unwrap();
        s.commit(b"manifest two").unwrap();
        assert_eq!(b.names().unwrap(), vec!["a".to_string()]);
        assert_eq!(b.read(&n("a"), "manifest.json").unwrap(), b"manifest two");
        assert_eq!(b.len(&n("a"), "pack-000001").unwrap(), 8192);
        // The reader opened before keeps reading.
        r.read_exact_at(&mut buf, 4100).unwrap();
        assert_eq!(buf, [7; 4]);

        // An aborted or dropped build leaves nothing and frees its name.
        let s = b.stage(&n("b"), StageMode::New).unwrap();
        s.create_pack("pack-000000").unwrap();
        s.abort().unwrap();
        drop(b.stage(&n("b"), StageMode::New).unwrap());
        b.stage(&n("b"), StageMode::New).unwrap().abort().unwrap();
        assert_eq!(b.names().unwrap(), vec!["a".to_string()]);

        b.remove(&n("a")).unwrap();
        assert!(b.names().unwrap().is_empty());
        assert!(matches!(b.remove(&n("a")), Err(StoreError::NotFound(_))));
        r.read_exact_at(&mut buf, 4096).unwrap();
    }

    #[test]
    fn the_local_directory_keeps_the_contract() {
        let tmp = tempfile::tempdir().unwrap();
        let b = LocalDir::open(tmp.path()).unwrap();
        contract(&b);
        // No temp dir left behind.
        assert_eq!(std::fs::read_dir(b.location()).unwrap().count(), 0);
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        contract(&MemoryStore::default());
    }
}
