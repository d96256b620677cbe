//! The on-disk format of one snapshot: its manifest (JSON), its block tables and its pack
//! headers (binary). Pure encoding and decoding with checks: this module reads whole small
//! files only (through the store's medium, or from a directory), never pack data, and knows
//! nothing of chains. Snapshot names are `ids::SnapshotName`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::error::{IoContext, Result, StoreError};
use crate::ids::{Geometry, SnapshotName, VolumeId};
use crate::sys::{decode_versioned, VersionedError};

/// Format version written in every manifest, table and pack; readers refuse any other.
pub const FORMAT: u32 = 1;
/// The manifest's file name inside a snapshot directory.
pub const MANIFEST: &str = "manifest.json";
/// Format of a manifest that names blocks whose blake3 is not computed yet (a FULL partition
/// cloned by reflink: `VolumeEntry::unhashed`). Older readers refuse it with a clear
/// "unsupported format" instead of taking the missing hashes for damage; once the hashes are
/// in, the manifest is rewritten as [`FORMAT`].
pub const UNHASHED_FORMAT: u32 = 2;
/// Magic at the start of every pack file, followed by the format (u32 LE) and 4 zero bytes.
pub const PACK_MAGIC: &[u8; 8] = b"GRAINPK\0";
/// Length of a pack header; block data starts right after it.
pub const PACK_HEADER_LEN: u64 = 16;
/// Magic at the start of every block table, followed by format (u32 LE), 4 zero bytes and the
/// record count (u64 LE).
pub const TABLE_MAGIC: &[u8; 8] = b"GRAINTB\0";
const TABLE_HEADER_LEN: usize = 24;
const RECORD_LEN: usize = 56;
/// The `pack` of a record saying "this block is all zeros" (an INCREMENTAL partition's block
/// that became zero; a FULL partition simply omits zero blocks).
pub const ZERO_PACK: u32 = u32::MAX;
/// Longest snapshot name.
pub const MAX_NAME: usize = crate::ids::MAX_SNAPSHOT_NAME;

/// How a partition is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionKind {
    /// Self-contained: a block not stored reads as zeros.
    Full,
    /// Only changed blocks: a block not stored comes from the parent snapshot.
    Incremental,
}

/// One partition of a volume in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    pub index: u64,
    pub kind: PartitionKind,
    /// Why the policy chose this kind (shown to users).
    pub reason: String,
    /// Snapshots a read of this partition may visit: 1 for FULL, the parent's depth + 1 for
    /// INCREMENTAL (a partition past the parent's end counts 1 there).
    pub depth: u32,
}

/// A file of the snapshot named by the manifest together with its blake3.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub file: String,
    pub len: u64,
    pub blake3: String,
}

/// A pack file of the snapshot: its blocks carry their own blake3 in the tables, so the pack
/// itself is named with its length only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    pub file: String,
    pub len: u64,
}

/// One volume in a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub id: VolumeId,
    /// Path relative to the backing dir at the snapshot's instant.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    /// One entry per partition covering `size`, in order.
    pub partitions: Vec<PartitionEntry>,
    /// The block table (absent when this snapshot stores no block of the volume).
    pub table: Option<FileRef>,
    /// Records in the table.
    pub records: u64,
    /// Bytes of block data this snapshot stores for the volume.
    pub stored_bytes: u64,
    /// The inode's generation (`FS_IOC_GETVERSION`) at the snapshot's instant, where the
    /// filesystem has one: with `id`, what tells a renamed file from a new one reusing its
    /// inode number (absent in snapshots older than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<u64>,
    /// The file's birth time (statx btime), ns since the epoch, where the filesystem has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_ns: Option<i128>,
    /// Runs `[first, end)` of blocks stored by reflink whose table records carry no blake3
    /// yet (zeros in their place): read unverified until the store hashes them after the
    /// commit (`Store::hash_snapshot`). Only in manifests of [`UNHASHED_FORMAT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhashed: Vec<[u64; 2]>,
}

impl VolumeEntry {
    /// Whether block `b`'s record has no blake3 yet.
    pub fn is_unhashed(&self, b: u64) -> bool {
        let i = self.unhashed.partition_point(|r| r[1] <= b);
        self.unhashed.get(i).is_some_and(|r| r[0] <= b)
    }

    /// Blocks whose record has no blake3 yet.
    pub fn unhashed_blocks(&self) -> u64 {
        self.unhashed.iter().map(|r| r[1] - r[0]).sum()
    }
}

/// Sorted, distinct blocks as runs `[first, end)`.
pub fn block_runs(blocks: impl IntoIterator<Item = u64>) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(r) if r[1] == b => r[1] = b + 1,
            _ => out.push([b, b + 1]),
        }
    }
    out
}

/// What a namespace entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    Symlink,
}

/// A directory or symlink of the group's tree at the snapshot's instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceEntry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    /// The target, for a symlink.
    pub target: Option<String>,
}

/// The commit record of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub group: String,
    pub created_ns: u64,
    /// The snapshot INCREMENTAL partitions build on.
    pub parent: Option<String>,
    pub geometry: Geometry,
    pub volumes: Vec<VolumeEntry>,
    /// Pack files, in order (a record's `pack` indexes this list).
    pub packs: Vec<PackRef>,
    pub namespace: Vec<NamespaceEntry>,
    /// From the barrier to the commit, when the snapshot was taken (what a dry run's time
    /// estimate is scaled from; absent in snapshots older than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_ms: Option<u64>,
}

impl Manifest {
    /// The snapshot's name as a `SnapshotName` (checked against its place when it was
    /// loaded, so an error here means a manifest built by hand).
    pub fn checked_name(&self) -> Result<SnapshotName> {
        Ok(SnapshotName::parse(&self.name)?)
    }

    /// The volume `id`, if the snapshot has it.
    pub fn volume(&self, id: VolumeId) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.id == id)
    }

    /// Chain depth of partition `p` of volume `id` (None if the snapshot lacks either): what
    /// the caller compares with `policy.max_chain`.
    pub fn depth(&self, id: VolumeId, p: u64) -> Option<u32> {
        self.volume(id)?.partitions.get(p as usize).map(|e| e.depth)
    }
}

/// Read and check the manifest of the snapshot in `dir` (named `name`).
pub fn load_manifest(dir: &Path, name: &str) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    decode_manifest(std::fs::read(&path).at(&path), &path, name)
}

/// Read and check the manifest of committed snapshot `name` in `store`.
pub fn load_manifest_from(store: &dyn Backend, name: &SnapshotName) -> Result<Manifest> {
    let path = store.path_of(name, MANIFEST);
    decode_manifest(store.read(name, MANIFEST), &path, name)
}

/// Check the manifest of snapshot `name` read from `path` (a missing file is a damaged
/// snapshot: a snapshot without its commit record).
pub fn decode_manifest(read: Result<Vec<u8>>, path: &Path, name: &str) -> Result<Manifest> {
    let path = path.to_path_buf();
    let bytes = match read {
        Ok(b) => b,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Corrupt {
                path,
                why: "missing (a snapshot directory without its commit record)".into(),
            })
        }
        Err(e) => return Err(e),
    };
    let decoded = match decode_versioned::<Manifest>(&bytes, FORMAT as u64) {
        Err(VersionedError::Unsupported { found }) if found == UNHASHED_FORMAT as u64 => {
            decode_versioned(&bytes, found)
        }
        other => other,
    };
    let m: Manifest = match decoded {
        Ok(m) => m,
        Err(VersionedError::Unsupported { found }) => {
            return Err(StoreError::UnsupportedFormat {
                path,
                found,
                supported: FORMAT,
            })
        }
        Err(VersionedError::Invalid(e)) => {
            return Err(StoreError::Corrupt {
                path,
                why: format!("not a manifest: {e}"),
            })
        }
    };
    if m.name != name {
        return Err(StoreError::Corrupt {
            path,
            why: format!("names snapshot {:?}, not {name:?}", m.name),
        });
    }
    let unhashed = m.volumes.iter().any(|v| !v.unhashed.is_empty());
    if unhashed != (m.format == UNHASHED_FORMAT) {
        return Err(StoreError::Corrupt {
            path,
            why: format!(
                "format {} but {} blocks without a blake3",
                m.format,
                if unhashed { "names" } else { "no" }
            ),
        });
    }
    Ok(m)
}

/// Store-wide record `file` (holds, deletes under way) decoded as `T`, checked to carry
/// `format`; None if it was never written.
pub fn load_record<T: serde::de::DeserializeOwned>(
    b: &dyn Backend,
    file: &str,
    format: u32,
) -> Result<Option<T>> {
    let Some(bytes) = b.read_record(file)? else {
        return Ok(None);
    };
    let path = b.location().join(format!(".{file}"));
    match decode_versioned::<T>(&bytes, format as u64) {
        Ok(r) => Ok(Some(r)),
        Err(VersionedError::Unsupported { found }) => Err(StoreError::UnsupportedFormat {
            path,
            found,
            supported: format,
        }),
        Err(VersionedError::Invalid(why)) => Err(StoreError::Corrupt { path, why }),
    }
}

/// One block as recorded in a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub block: u64,
    /// Index into the manifest's packs, or `ZERO_PACK`.
    pub pack: u32,
    pub len: u32,
    pub offset: u64,
    pub hash: [u8; 32],
}

impl Record {
    /// Whether the record says "all zeros" rather than pointing at data.
    pub fn is_zero(&self) -> bool {
        self.pack == ZERO_PACK
    }
}

/// Encode a block table (records sorted by block).
pub fn encode_table(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TABLE_HEADER_LEN + records.len() * RECORD_LEN);
    out.extend_from_slice(TABLE_MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for r in records {
        out.extend_from_slice(&r.block.to_le_bytes());
        out.extend_from_slice(&r.pack.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.hash);
    }
    out
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Read a block table named by `fref` in `dir`, checking its blake3, header and order.
pub fn load_table(dir: &Path, fref: &FileRef) -> Result<Vec<Record>> {
    let path = dir.join(&fref.file);
    let bytes = std::fs::read(&path).at(&path)?;
    decode_table(&bytes, &path, fref)
}

/// Check and decode the bytes of the block table `fref`, read from `path`.
pub fn decode_table(bytes: &[u8], path: &Path, fref: &FileRef) -> Result<Vec<Record>> {
    let path = path.to_path_buf();
    let corrupt = |why: String| StoreError::Corrupt {
        path: path.clone(),
        why,
    };
    if bytes.len() as u64 != fref.len {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {}",
            bytes.len(),
            fref.len
        )));
    }
    let hash = blake3::hash(bytes).to_hex();
    if hash.as_str() != fref.blake3 {
        return Err(corrupt(format!(
            "blake3 {hash} differs from the manifest's {}",
            fref.blake3
        )));
    }
    if bytes.len() < TABLE_HEADER_LEN || &bytes[..8] != TABLE_MAGIC {
        return Err(corrupt("not a block table".into()));
    }
    let format = le_u32(&bytes[8..]);
    if format != FORMAT {
        return Err(StoreError::UnsupportedFormat {
            path,
            found: format as u64,
            supported: FORMAT,
        });
    }
    let n = le_u64(&bytes[16..]);
    if (bytes.len() - TABLE_HEADER_LEN) as u64 != n.saturating_mul(RECORD_LEN as u64) {
        return Err(corrupt(format!("length does not match {n} records")));
    }
    let mut out = Vec::with_capacity(n as usize);
    for rec in bytes[TABLE_HEADER_LEN..].chunks_exact(RECORD_LEN) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&rec[24..56]);
        let r = Record {
            block: le_u64(rec),
            pack: le_u32(&rec[8..]),
            len: le_u32(&rec[12..]),
            offset: le_u64(&rec[16..]),
            hash,
        };
        if out.last().is_some_and(|p: &Record| p.block >= r.block) {
            return Err(corrupt(format!("block {} out of order", r.block)));
        }
        out.push(r);
    }
    Ok(out)
}

/// The header every pack file starts with.
pub fn pack_header() -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h
}

/// Check a pack header read from `path`.
pub fn check_pack_header(path: &Path, h: &[u8]) -> Result<()> {
    if h.len() < PACK_HEADER_LEN as usize || &h[..8] != PACK_MAGIC {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "not a pack file".into(),
        });
    }
    let format = le_u32(&h[8..]);
    if format != FORMAT {
        return Err(StoreError::UnsupportedFormat {
            path: path.to_path_buf(),
            found: format as u64,
            supported: FORMAT,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhashed_runs_name_exactly_their_blocks() {
        let runs = block_runs([3, 4, 5, 9, 11, 12]);
        assert_eq!(runs, vec![[3, 6], [9, 10], [11, 13]]);
        let v: VolumeEntry = serde_json::from_value(serde_json::json!({
            "id": {"dev": 1, "ino": 2}, "path": "v", "size": 1 << 20, "mode": 0o100600,
            "uid": 0, "gid": 0, "mtime_ns": 0, "partitions": [], "table": null, "records": 0,
            "stored_bytes": 0, "unhashed": runs,
        }))
        .unwrap();
        let got: Vec<u64> = (0..20).filter(|&b| v.is_unhashed(b)).collect();
        assert_eq!(got, vec![3, 4, 5, 9, 11, 12]);
        assert_eq!(v.unhashed_blocks(), 6);
        // An entry of an older manifest has none.
        let mut old = serde_json::to_value(&v).unwrap();
        old.as_object_mut().unwrap().remove("unhashed");
        let v: VolumeEntry = serde_json::from_value(old).unwrap();
        assert!(v.unhashed.is_empty() && !v.is_unhashed(3));
    }

    #[test]
    fn a_table_round_trips_and_a_flipped_byte_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let recs = vec![
            Record {
                block: 3,
                pack: 0,
                len: 4096,
                offset: 16,
                hash: [7; 32],
            },
            Record {
                block: 9,
                pack: ZERO_PACK,
                len: 0,
                offset: 0,
                hash: [0; 32],
            },
        ];
        let bytes = encode_table(&recs);
        std::fs::write(tmp.path().join("t"), &bytes).unwrap();
        let fref = FileRef {
            file: "t".into(),
            len: bytes.len() as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
        };
        assert_eq!(load_table(tmp.path(), &fref).unwrap(), recs);
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        std::fs::write(tmp.path().join("t"), &bad).unwrap();
        assert!(matches!(
            load_table(tmp.path(), &fref),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
