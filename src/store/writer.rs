//! Building one snapshot: `SnapshotWriter` takes the volumes, their blocks and the namespace
//! of a snapshot being captured, and commits them as a new immutable snapshot, or drops them.
//!
//! Everything goes to the medium's staging (`Backend::stage`: for the local store
//! `snapshots/.tmp-<name>/`, flock'ed by the writer, so a concurrent `Store::open` never sweeps
//! a live build). Commit order (DESIGN.md "Snapshot protocol" step 4): packs and tables
//! synced, then the manifest written durably and the snapshot made visible in one step
//! (`Staging::commit`: a rename, no replace, and `snapshots/` fsync'ed). It never modifies a
//! committed snapshot and never reads live volumes: the caller hands it bytes (and, for a
//! reflink, the volume's fd and offset).

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use super::backend::{Backend, BlockSource, PackWrite, StageMode, Staging};
use super::error::{Result, StoreError};
use super::format::{
    block_runs, encode_table, pack_header, FileRef, Manifest, NamespaceEntry, PackRef,
    PartitionEntry, PartitionKind, Record, VolumeEntry, FORMAT, PACK_HEADER_LEN, UNHASHED_FORMAT,
    ZERO_PACK,
};
use crate::ids::{BlockIdx, Geometry, SnapshotName, VolumeId};
use crate::sys::now_ns;

/// A pack file is closed and the next one started once it would exceed this size.
pub const PACK_LIMIT: u64 = 1 << 30;
/// Bytes a build may append before `pace` starts their writeback.
const PACE_CHUNK: u64 = 8 << 20;

/// A volume as it is at the snapshot's instant (from the barrier's namespace record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    pub id: VolumeId,
    /// Path relative to the backing dir.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
}

/// A volume added to a snapshot being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeHandle(usize);

struct VolumeBuild {
    meta: VolumeMeta,
    kinds: Vec<Option<(PartitionKind, String)>>,
    records: Vec<Record>,
    /// (generation, birth ns) of the file, from `set_identity`.
    identity: (Option<u64>, Option<i128>),
    /// Blocks stored by reflink, their blake3 not computed (`put_cloned`).
    unhashed: Vec<u64>,
}

/// Whole blocks of a volume shared with a pack by `SnapshotWriter::clone_blocks`.
#[derive(Clone, Copy, Debug)]
pub struct ClonedRange {
    first: u64,
    count: u64,
    pack: u32,
    offset: u64,
}

struct PackOut {
    sink: Arc<dyn PackWrite>,
    name: String,
    len: u64,
    /// Writeback started up to here (see `pace`).
    flushing: u64,
    /// Writeback waited for up to here.
    flushed: u64,
}

#[derive(Default)]
struct BuildState {
    volumes: Vec<VolumeBuild>,
    packs: Vec<PackOut>,
    namespace: Vec<NamespaceEntry>,
    /// A pack write failed: the build can only be aborted.
    failed: Option<String>,
}

/// A snapshot being built; committed by `commit`, dropped (temp data removed) otherwise.
pub struct SnapshotWriter {
    /// Where the build goes; taken by `commit` and `abort` (dropping it drops the build).
    staging: Option<Box<dyn Staging>>,
    name: SnapshotName,
    group: String,
    geometry: Geometry,
    created_ns: u64,
    parent: Option<Manifest>,
    state: Mutex<BuildState>,
    /// Cleared at the first clone the filesystem refuses: one try per build, not per block.
    cloning: std::sync::atomic::AtomicBool,
}

impl SnapshotWriter {
    pub(crate) fn begin(
        backend: &dyn Backend,
        name: &SnapshotName,
        group: &str,
        geometry: Geometry,
        parent: Option<Manifest>,
    ) -> Result<SnapshotWriter> {
        let g = geometry;
        if !g.block_size.is_power_of_two()
            || !g.partition_size.is_power_of_two()
            || g.partition_size < g.block_size
            || g.block_size > u32::MAX as u64
        {
            return Err(StoreError::Misuse(format!("bad geometry {g:?}")));
        }
        if let Some(p) = &parent {
            if p.geometry != geometry {
                return Err(StoreError::Chain {
                    snapshot: name.to_string(),
                    why: format!(
                        "parent {:?} has geometry {:?}, this snapshot {geometry:?}",
                        p.name, p.geometry
                    ),
                });
            }
        }
        let staging = backend.stage(name, StageMode::New)?;
        Ok(SnapshotWriter {
            staging: Some(staging),
            name: name.clone(),
            group: group.to_string(),
            geometry,
            created_ns: now_ns(),
            parent,
            state: Mutex::new(BuildState::default()),
            cloning: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn state(&self) -> MutexGuard<'_, BuildState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot's name.
    pub fn name(&self) -> &SnapshotName {
        &self.name
    }

    /// Set the snapshot's instant (defaults to when `begin` ran).
    pub fn set_created_ns(&mut self, ns: u64) {
        self.created_ns = ns;
    }

    /// Add a volume; every partition of it then needs `set_partition` before `commit`.
    pub fn add_volume(&self, meta: VolumeMeta) -> Result<VolumeHandle> {
        let mut st = self.state();
        if st.volumes.iter().any(|v| v.meta.id == meta.id) {
            return Err(StoreError::Misuse(format!(
                "volume {} ({}) added twice",
                meta.id, meta.path
            )));
        }
        let parts = self.geometry.partitions(meta.size) as usize;
        st.volumes.push(VolumeBuild {
            meta,
            kinds: vec![None; parts],
            records: Vec::new(),
            identity: (None, None),
            unhashed: Vec::new(),
        });
        Ok(VolumeHandle(st.volumes.len() - 1))
    }

    /// Record what tells `vol`'s file from a later one reusing its inode number: its
    /// generation and birth time (ns), each where the filesystem has it.
    pub fn set_identity(
        &self,
        vol: VolumeHandle,
        gen: Option<u64>,
        birth_ns: Option<i128>,
    ) -> Result<()> {
        let mut st = self.state();
        let v = st
            .volumes
            .get_mut(vol.0)
            .ok_or_else(|| StoreError::Misuse(format!("no volume handle {}", vol.0)))?;
        v.identity = (gen, birth_ns);
        Ok(())
    }

    /// Say how partition `p` of `vol` is stored, and why.
    pub fn set_partition(
        &self,
        vol: VolumeHandle,
        p: u64,
        kind: PartitionKind,
        reason: &str,
    ) -> Result<()> {
        let mut st = self.state();
        let v = st
            .volumes
            .get_mut(vol.0)
            .ok_or_else(|| StoreError::Misuse(format!("no volume handle {}", vol.0)))?;
        let n = v.kinds.len();
        let slot = v.kinds.get_mut(p as usize).ok_or_else(|| {
            StoreError::Misuse(format!(
                "{}: partition {p} is past the end ({n} partitions)",
                v.meta.path
            ))
        })?;
        *slot = Some((kind, reason.to_string()));
        Ok(())
    }

    /// Store block `block` of `vol` (its exact content: the block size, or less for the last
    /// block of the volume). An all-zero block costs no data: a FULL partition omits it, an
    /// INCREMENTAL one records it as zeros. Safe to call from several threads.
    pub fn put_block(&self, vol: VolumeHandle, block: BlockIdx, data: &[u8]) -> Result<()> {
        self.put(vol, block, data, None)
    }

    /// `put_block` for a block whose bytes `data` also sit in `source` at `offset` (and stay
    /// there until this returns): the pack gets them by `copy_file_range` at a 4 KiB-aligned
    /// offset, which is a reflink (shared extents, no copy) on filesystems that can, and an
    /// in-kernel copy elsewhere. `data` still gives the hash.
    pub fn put_block_from(
        &self,
        vol: VolumeHandle,
        block: BlockIdx,
        data: &[u8],
        source: &File,
        offset: u64,
    ) -> Result<()> {
        self.put(vol, block, data, Some((source, offset)))
    }

    fn put(
        &self,
        vol: VolumeHandle,
        block: BlockIdx,
        data: &[u8],
        source: Option<(&File, u64)>,
    ) -> Result<()> {
        let start = self.geometry.block_start(block);
        let block = block.0;
        let bs = self.geometry.block_size;
        let zero = is_zero(data);
        // Hash outside the lock: it is the costly part.
        let hash = if zero {
            [0u8; 32]
        } else {
            *blake3::hash(data).as_bytes()
        };
        let mut st = self.state();
        if let Some(why) = &st.failed {
            return Err(StoreError::Misuse(format!(
                "an earlier write failed ({why}): abort"
            )));
        }
        let size = match st.volumes.get(vol.0) {
            Some(v) => v.meta.size,
            None => return Err(StoreError::Misuse(format!("no volume handle {}", vol.0))),
        };
        if start >= size {
            return Err(StoreError::Misuse(format!(
                "block {block} is past the end of a volume of {size} bytes"
            )));
        }
        let want = bs.min(size - start);
        if data.len() as u64 != want {
            return Err(StoreError::Misuse(format!(
                "block {block} has {} bytes, expected {want}",
                data.len()
            )));
        }
        if zero {
            st.volumes[vol.0].records.push(Record {
                block,
                pack: ZERO_PACK,
                len: 0,
                offset: 0,
                hash,
            });
            return Ok(());
        }
        // Reserve the place under the lock, write outside it: a writer's copy-before-write must
        // not queue behind a worker's write that the kernel is throttling.
        let (pack, offset, sink) = match self.reserve(&mut st, data.len() as u64, source) {
            Ok(x) => x,
            Err(e) => {
                st.failed = Some(e.to_string());
                return Err(e);
            }
        };
        drop(st);
        let written = match source {
            Some((file, at)) if (data.len() as u64).is_multiple_of(ALIGN) => sink.write_from(
                offset,
                BlockSource {
                    file,
                    offset: at,
                    len: data.len() as u64,
                    bytes: Some(data),
                },
            ),
            _ => sink.write_at(offset, data),
        };
        let mut st = self.state();
        if let Err(e) = written {
            st.failed = Some(e.to_string());
            return Err(e);
        }
        st.volumes[vol.0].records.push(Record {
            block,
            pack,
            len: data.len() as u32,
            offset,
            hash,
        });
        Ok(())
    }

    /// Whether `clone_blocks` may still work for this build (false once the filesystem
    /// refused a clone).
    pub fn cloning(&self) -> bool {
        self.cloning.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Share `count` whole blocks of `vol` from `first` on with a pack by reflink
    /// (FICLONERANGE), from `source` at the same offsets: nothing is read or copied, and the
    /// pack keeps what the volume held at the instant of the call. No block is recorded yet:
    /// the caller names those of the range that the snapshot takes from the clone
    /// (`put_cloned`). Ok(None): the medium or filesystem cannot (no reflink, another
    /// filesystem); cloning is then off for the rest of this build, and the caller copies.
    pub fn clone_blocks(
        &self,
        vol: VolumeHandle,
        first: BlockIdx,
        count: u64,
        source: &File,
    ) -> Result<Option<ClonedRange>> {
        use std::sync::atomic::Ordering;
        if !self.cloning() || count == 0 {
            return Ok(None);
        }
        let bs = self.geometry.block_size;
        let len = count * bs;
        let mut st = self.state();
        if let Some(why) = &st.failed {
            return Err(StoreError::Misuse(format!(
                "an earlier write failed ({why}): abort"
            )));
        }
        match st.volumes.get(vol.0) {
            Some(v) if (first.0 + count) * bs <= v.meta.size => {}
            Some(v) => {
                return Err(StoreError::Misuse(format!(
                    "{}: blocks {}..{} are not whole blocks of the volume",
                    v.meta.path,
                    first.0,
                    first.0 + count
                )))
            }
            None => return Err(StoreError::Misuse(format!("no volume handle {}", vol.0))),
        }
        let (pack, offset, sink) = match self.reserve(&mut st, len, Some((source, 0))) {
            Ok(x) => x,
            Err(e) => {
                st.failed = Some(e.to_string());
                return Err(e);
            }
        };
        drop(st);
        let cloned = sink.reflink_from(offset, source, first.0 * bs, len);
        match cloned {
            Ok(true) => Ok(Some(ClonedRange {
                first: first.0,
                count,
                pack,
                offset,
            })),
            Ok(false) => {
                self.cloning.store(false, Ordering::Relaxed);
                let mut st = self.state();
                // Give the reservation back where nothing came after it; otherwise the pack
                // must still reach the length the manifest will give it.
                let last = st.packs.len() as u32 == pack + 1;
                match st.packs.get_mut(pack as usize) {
                    Some(p) if last && p.len == offset + len => p.len = offset,
                    _ => {
                        drop(st);
                        if let Err(e) = sink.write_at(offset + len - 1, &[0]) {
                            self.state().failed = Some(e.to_string());
                            return Err(e);
                        }
                    }
                }
                Ok(None)
            }
            Err(e) => {
                self.state().failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Record `blocks` (each inside `range`, sorted or not) of `vol` as stored by the clone
    /// `range`. Their blake3 is not computed (that would read them): the snapshot names them
    /// as not yet hashed, and the store hashes them after the commit (`Store::hash_snapshot`).
    /// The caller guarantees that each block's content in the clone is the snapshot's.
    pub fn put_cloned(&self, vol: VolumeHandle, range: &ClonedRange, blocks: &[u64]) -> Result<()> {
        let bs = self.geometry.block_size;
        let mut st = self.state();
        let v = st
            .volumes
            .get_mut(vol.0)
            .ok_or_else(|| StoreError::Misuse(format!("no volume handle {}", vol.0)))?;
        for &b in blocks {
            if !(range.first..range.first + range.count).contains(&b) {
                return Err(StoreError::Misuse(format!(
                    "{}: block {b} is not in the clone of blocks {}..{}",
                    v.meta.path,
                    range.first,
                    range.first + range.count
                )));
            }
            v.records.push(Record {
                block: b,
                pack: range.pack,
                len: bs as u32,
                offset: range.offset + (b - range.first) * bs,
                hash: [0; 32],
            });
            v.unhashed.push(b);
        }
        Ok(())
    }

    /// Reserve `len` bytes in the current pack (starting a new one when it is full): the pack's
    /// index, the offset and the pack.
    fn reserve(
        &self,
        st: &mut BuildState,
        len: u64,
        source: Option<(&File, u64)>,
    ) -> Result<(u32, u64, Arc<dyn PackWrite>)> {
        let need_new = st
            .packs
            .last()
            .is_none_or(|p| align(p.len) + len > PACK_LIMIT);
        if need_new {
            let name = format!("pack-{:06}", st.packs.len());
            let sink = self.staging()?.create_pack(&name)?;
            sink.write_at(0, &pack_header())?;
            st.packs.push(PackOut {
                sink,
                name,
                len: PACK_HEADER_LEN,
                flushing: 0,
                flushed: 0,
            });
        }
        let idx = st.packs.len() - 1;
        let p = &mut st.packs[idx];
        // Whole blocks copied from the volume go at 4 KiB-aligned offsets, where a reflink can
        // share extents; the gap before them is a hole. Records carry their offsets, so readers
        // never notice.
        let offset = match source {
            Some(_) if len.is_multiple_of(ALIGN) => align(p.len),
            _ => p.len,
        };
        p.len = offset + len;
        Ok((idx as u32, offset, p.sink.clone()))
    }

    fn staging(&self) -> Result<&dyn Staging> {
        self.staging
            .as_deref()
            .ok_or_else(|| StoreError::Misuse("the build is over".into()))
    }

    /// Keep the build's dirty page cache small: once `PACE_CHUNK` bytes were appended since the
    /// last call that did something, start their writeback and wait for the chunk before them.
    /// Without this a large capture fills the page cache up to the kernel's dirty limit, and
    /// then every writer on the machine, the volumes' own included, is throttled while it
    /// drains (stalls of a second were measured). Call it from capture workers, never from a
    /// user's write: it waits for the disk. The waiting happens outside the state lock.
    pub fn pace(&self) {
        let (sink, start, wait) = {
            let mut st = self.state();
            let Some(p) = st.packs.last_mut() else {
                return;
            };
            if p.len - p.flushing < PACE_CHUNK {
                return;
            }
            let sink = p.sink.clone();
            let start = (p.flushing, p.len);
            let wait = (p.flushed, p.flushing);
            p.flushed = p.flushing;
            p.flushing = p.len;
            (sink, start, wait)
        };
        // Hints: an error shows again at the commit's sync, which decides.
        sink.start_writeback(start.0, start.1);
        if wait.1 > wait.0 {
            sink.wait_writeback(wait.0, wait.1);
        }
    }

    /// Record a directory or symlink of the group's tree.
    pub fn add_namespace_entry(&self, entry: NamespaceEntry) {
        self.state().namespace.push(entry);
    }

    fn build_manifest(&self, st: &mut BuildState) -> Result<Manifest> {
        let mut volumes = Vec::with_capacity(st.volumes.len());
        for (i, v) in st.volumes.iter_mut().enumerate() {
            let parent_vol = self.parent.as_ref().and_then(|p| p.volume(v.meta.id));
            let mut partitions = Vec::with_capacity(v.kinds.len());
            for (p, k) in v.kinds.iter().enumerate() {
                let Some((kind, reason)) = k else {
                    return Err(StoreError::Misuse(format!(
                        "{}: partition {p} has no kind (set_partition)",
                        v.meta.path
                    )));
                };
                let depth = match kind {
                    PartitionKind::Full => 1,
                    PartitionKind::Incremental => {
                        let Some(pv) = parent_vol else {
                            return Err(StoreError::Chain {
                                snapshot: self.name.to_string(),
                                why: format!(
                                    "{}: partition {p} is INCREMENTAL but {} has no such volume",
                                    v.meta.path,
                                    self.parent
                                        .as_ref()
                                        .map_or("there is no parent: it".to_string(), |m| {
                                            format!("parent {:?}", m.name)
                                        })
                                ),
                            });
                        };
                        pv.partitions.get(p).map_or(1, |e| e.depth) + 1
                    }
                };
                partitions.push(PartitionEntry {
                    index: p as u64,
                    kind: *kind,
                    reason: reason.clone(),
                    depth,
                });
            }
            v.records.sort_by_key(|r| r.block);
            if let Some(w) = v.records.windows(2).find(|w| w[0].block == w[1].block) {
                return Err(StoreError::Misuse(format!(
                    "{}: block {} stored twice",
                    v.meta.path, w[0].block
                )));
            }
            let bpp = self.geometry.blocks_per_partition();
            // A FULL partition reads absent blocks as zeros: no record needed.
            v.records.retain(|r| {
                !(r.is_zero() && partitions[(r.block / bpp) as usize].kind == PartitionKind::Full)
            });
            let stored_bytes = v.records.iter().map(|r| r.len as u64).sum();
            v.unhashed.sort_unstable();
            let unhashed = block_runs(v.unhashed.iter().copied());
            let table = if v.records.is_empty() {
                None
            } else {
                let file = format!("vol-{i:06}.tbl");
                let bytes = encode_table(&v.records);
                self.staging()?.write_file(&file, &bytes)?;
                Some(FileRef {
                    file,
                    len: bytes.len() as u64,
                    blake3: blake3::hash(&bytes).to_hex().to_string(),
                })
            };
            let m = &v.meta;
            volumes.push(VolumeEntry {
                id: m.id,
                path: m.path.clone(),
                size: m.size,
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                mtime_ns: m.mtime_ns,
                partitions,
                table,
                records: v.records.len() as u64,
                stored_bytes,
                gen: v.identity.0,
                birth_ns: v.identity.1,
                unhashed,
            });
        }
        let mut packs = Vec::with_capacity(st.packs.len());
        for p in &st.packs {
            p.sink.sync()?;
            packs.push(PackRef {
                file: p.name.clone(),
                len: p.len,
            });
        }
        let unhashed = volumes.iter().any(|v| !v.unhashed.is_empty());
        Ok(Manifest {
            format: if unhashed { UNHASHED_FORMAT } else { FORMAT },
            name: self.name.to_string(),
            group: self.group.clone(),
            created_ns: self.created_ns,
            parent: self.parent.as_ref().map(|p| p.name.clone()),
            geometry: self.geometry,
            volumes,
            packs,
            namespace: std::mem::take(&mut st.namespace),
            capture_ms: Some(crate::sys::now_ns().saturating_sub(self.created_ns) / 1_000_000),
        })
    }

    /// Make the snapshot durable and visible. On any error nothing is visible and the temp
    /// data is gone.
    pub fn commit(mut self) -> Result<Manifest> {
        self.commit_inner()
    }

    fn commit_inner(&mut self) -> Result<Manifest> {
        let manifest = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = &st.failed {
                return Err(StoreError::Misuse(format!(
                    "an earlier write failed ({why}): abort"
                )));
            }
            self.build_manifest(&mut st)?
        };
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| StoreError::Misuse(format!("manifest does not serialize: {e}")))?;
        let staging = self
            .staging
            .take()
            .ok_or_else(|| StoreError::Misuse("the build is over".into()))?;
        staging.commit(&bytes)?;
        Ok(manifest)
    }

    /// Drop everything written so far.
    pub fn abort(mut self) -> Result<()> {
        match self.staging.take() {
            Some(s) => s.abort(),
            None => Ok(()),
        }
    }
}

/// Alignment of whole blocks in packs (the smallest block size, and the page size).
const ALIGN: u64 = 4096;

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Whether every byte is zero (word at a time).
pub(super) fn is_zero(data: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits at valid boundaries.
    let (head, mid, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection_sees_a_single_byte_anywhere() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b[1..]));
        for i in [0, 1, 7, 8, 2048, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            assert!(i == 0 || !is_zero(&b[1..]), "{i}");
            b[i] = 0;
        }
    }
}
