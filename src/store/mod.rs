//! The snapshot store: committed, immutable snapshots on disk, how they are built
//! (`SnapshotWriter`), listed, read (`VolumeReader`), verified and deleted. It is FUSE-free and
//! knows nothing of live volumes, barriers or policy: the snapshot engine hands it bytes and
//! decisions; it must never change a committed snapshot's content.
//!
//! # Format (version [`format::FORMAT`], in every file)
//! ```text
//! <store>/snapshots/
//!   <name>/                 a committed snapshot (the rename of its temp dir commits it)
//!     manifest.json         the commit record: format, name, group, created_ns, parent,
//!                           geometry, volumes [{id, path, size, mode, uid, gid, mtime_ns,
//!                           partitions [{index, kind: full|incremental, reason, depth}],
//!                           table {file, len, blake3}, records, stored_bytes}],
//!                           packs [{file, len}], namespace [{path, kind: dir|symlink, mode,
//!                           uid, gid, mtime_ns, target}]
//!     vol-NNNNNN.tbl        a volume's block table, named in the manifest with its blake3:
//!                           "GRAINTB\0", format u32, 0u32, count u64, then sorted records
//!                           {block u64, pack u32, len u32, offset u64, blake3 [32]} (LE);
//!                           pack = u32::MAX means "this block is zeros now"
//!     pack-NNNNNN           block data, append-only: "GRAINPK\0", format u32, 0u32, then
//!                           blocks, each stored once (len = block size, less for a volume's
//!                           last block); rolled at 1 GiB
//!                           Manifest format 2 (`format::UNHASHED_FORMAT`): a volume may
//!                           list `unhashed` block runs whose records carry zeros for blake3
//!                           (reflinked at capture); `hash_snapshot` rewrites it as format 1
//!   .tmp-<name>/            a snapshot being built, or a new version of one being staged
//!                           by delete with merge (flock'ed by its writer); swept at open
//!   .del-<name>/            a snapshot being deleted (flock'ed); swept at open
//!   .holds.json             store-wide record: holds per snapshot
//!   .deleting.json          store-wide record: deletes under way {format, deleting
//!                           [{name, parent}]} (see `merge`)
//! ```
//! A block of a FULL partition that has no record is zeros: holes and all-zero blocks cost
//! nothing. A block of an INCREMENTAL partition that has no record reads from the same volume
//! (by `VolumeId`) and partition of the parent snapshot, recursively down to a FULL partition;
//! the volume's size is this snapshot's, and a snapshot on the way that was shorter cut the
//! data there (the rest reads as zeros). Snapshot names are `[A-Za-z0-9._-]{1,128}` and never
//! start with '.', so they can never collide with the store's own temp directories.
//!
//! Reading (`VolumeReader`) checks each stored block against its blake3 the first time it is
//! read, remembering the proof per pack file (`verified`) until the file changes: a damaged
//! block is `StoreError::Damaged`, never wrong bytes. Every directory the store makes is 0700
//! and every file 0600, whatever the process umask.
//!
//! Crash safety: data, tables and manifest are fsync'ed inside the temp dir, which is then
//! renamed (no replace) into place and `snapshots/` fsync'ed. A crash before the rename leaves
//! only a temp dir, swept by the next `Store::open`; after it, the snapshot is complete.
//!
//! Delete (`merge`): any snapshot of a chain can go. Each child is rewritten onto the deleted
//! snapshot's parent (staged as a new version, swapped in atomically) so that it reads byte
//! for byte as before, taking the deleted snapshot's blocks it still needs; then the snapshot
//! is removed, and with it the bytes no survivor references. The delete is named in
//! `.deleting.json` first: after a crash at any point every snapshot reads as before, and
//! `Store::resume_deletes` (run by the daemon at start) finishes the delete.
//!
//! The files sit behind `backend::Backend` (the directory above is `local::LocalDir`; tests
//! also use `memory::MemoryStore` and the failure-injecting `failing::Failing`): `Store` and
//! everything it builds on (writer, reader, verify, delete) speak only to that trait.

pub mod backend;
pub mod error;
pub mod failing;
pub mod format;
pub mod holds;
pub mod local;
pub mod memory;
pub mod merge;
pub mod reader;
pub mod restore;
mod verified;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

pub use backend::Backend;
pub use error::{Result, StoreError};
pub use format::{EntryKind, Manifest, NamespaceEntry, PartitionKind, VolumeEntry, FORMAT};
pub use merge::DeleteReport;
pub use reader::{ReaderStats, VolumeReader};
pub use restore::{Placed, VolumeExtents};
use verified::VerifiedExtents;
pub use writer::{ClonedRange, SnapshotWriter, VolumeHandle, VolumeMeta};

use crate::ids::{Geometry, SnapshotName, VolumeId};

/// How a volume is stored in a snapshot, from its partitions' kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VolumeKind {
    Full,
    Incremental,
    Hybrid,
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeKind::Full => "FULL",
            VolumeKind::Incremental => "INCREMENTAL",
            VolumeKind::Hybrid => "HYBRID",
        })
    }
}

/// One volume of a listed snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub path: String,
    pub size: u64,
    pub kind: VolumeKind,
    pub stored_bytes: u64,
    /// Deepest partition chain.
    pub max_depth: u32,
}

/// A committed snapshot as `snapshot list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub group: String,
    pub created_ns: u64,
    pub parent: Option<String>,
    pub volumes: Vec<VolumeInfo>,
    /// Block data this snapshot itself stores.
    pub stored_bytes: u64,
    /// Sum of its volumes' sizes.
    pub logical_bytes: u64,
}

impl SnapshotInfo {
    /// The summary of a manifest.
    pub fn of(m: &Manifest) -> SnapshotInfo {
        let volumes: Vec<VolumeInfo> = m
            .volumes
            .iter()
            .map(|v| {
                let full = v
                    .partitions
                    .iter()
                    .filter(|p| p.kind == PartitionKind::Full)
                    .count();
                let kind = if full == v.partitions.len() {
                    VolumeKind::Full
                } else if full == 0 {
                    VolumeKind::Incremental
                } else {
                    VolumeKind::Hybrid
                };
                VolumeInfo {
                    id: v.id,
                    path: v.path.clone(),
                    size: v.size,
                    kind,
                    stored_bytes: v.stored_bytes,
                    max_depth: v.partitions.iter().map(|p| p.depth).max().unwrap_or(1),
                }
            })
            .collect();
        SnapshotInfo {
            name: m.name.clone(),
            group: m.group.clone(),
            created_ns: m.created_ns,
            parent: m.parent.clone(),
            stored_bytes: volumes.iter().map(|v| v.stored_bytes).sum(),
            logical_bytes: volumes.iter().map(|v| v.size).sum(),
            volumes,
        }
    }
}

/// One entry of `list`: a snapshot directory and what could be read of it.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub info: Result<SnapshotInfo>,
}

/// A problem `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyProblem {
    /// The volume's path in the verified snapshot (None for snapshot-wide problems).
    pub volume: Option<String>,
    /// The block, when one block is at fault.
    pub block: Option<u64>,
    /// The snapshot whose files hold the fault (the verified one or an ancestor).
    pub stored_in: String,
    pub what: String,
}

/// What `verify` checked and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub snapshot: String,
    pub volumes: u64,
    /// Blocks re-hashed (stored here or inherited through the chain).
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks read but not proven: reflinked at capture, their blake3 not computed yet (the
    /// store hashes them after the commit; verify again once it has).
    pub unhashed_blocks: u64,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// True when no byte failed its blake3 and every block could be read (blocks not yet
    /// hashed are not proven, see `proven`).
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// True when every byte of the snapshot was proven.
    pub fn proven(&self) -> bool {
        self.ok() && self.unhashed_blocks == 0
    }
}

/// The snapshot store: snapshots on a medium (a directory, memory, ...).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// Extents proven by the readers of this store, so each is hashed once.
    verified: Arc<VerifiedExtents>,
    /// Serialises changes to the store-wide records (holds) within this process.
    records: Arc<std::sync::Mutex<()>>,
    /// Serialises the rewrites that put hashes in (`hash_snapshot`) with deletes, which
    /// rewrite snapshots too, within this process.
    rewrites: Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// Open (creating if needed) the store's snapshots in `store_dir`, sweeping what crashed
    /// builds and deletions left behind.
    pub fn open(store_dir: &Path) -> Result<Store> {
        Ok(Store::on(Arc::new(local::LocalDir::open(store_dir)?)))
    }

    /// The store on `backend`.
    pub fn on(backend: Arc<dyn Backend>) -> Store {
        Store {
            backend,
            verified: Arc::default(),
            records: Arc::default(),
            rewrites: Arc::default(),
        }
    }

    /// A new, empty store in memory (for tests).
    pub fn in_memory() -> Store {
        Store::on(Arc::new(memory::MemoryStore::default()))
    }

    /// The medium.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// `<store>/snapshots` (for another medium, the name of where it is).
    pub fn snapshots_dir(&self) -> &Path {
        self.backend.location()
    }

    /// Names of the committed snapshots, sorted (raw: a stray entry that is no valid name is
    /// there too).
    pub fn names(&self) -> Result<Vec<String>> {
        let mut out = self.backend.names()?;
        out.sort();
        Ok(out)
    }

    /// Whether committed snapshot `name` is there.
    pub fn exists(&self, name: &SnapshotName) -> Result<bool> {
        self.backend.exists(name)
    }

    /// The manifest of snapshot `name`.
    pub fn manifest(&self, name: &SnapshotName) -> Result<Manifest> {
        if !self.backend.exists(name)? {
            return Err(StoreError::NotFound(name.to_string()));
        }
        format::load_manifest_from(&*self.backend, name)
    }

    /// Every snapshot, oldest first; one whose manifest cannot be read is listed with its
    /// error (last), without hiding the others.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let mut out: Vec<Listed> = self
            .names()?
            .into_iter()
            .map(|name| Listed {
                info: SnapshotName::parse(&name)
                    .map_err(StoreError::from)
                    .and_then(|n| self.manifest(&n))
                    .map(|m| SnapshotInfo::of(&m)),
                name,
            })
            // A snapshot deleted between the listing and the read of its manifest is gone,
            // not unreadable.
            .filter(|l| {
                l.info.is_ok()
                    || SnapshotName::parse(&l.name)
                        .ok()
                        .is_none_or(|n| self.backend.exists(&n).unwrap_or(true))
            })
            .collect();
        out.sort_by_key(|l| {
            (
                l.info.as_ref().map_or(u64::MAX, |i| i.created_ns),
                l.name.clone(),
            )
        });
        Ok(out)
    }

    /// Start building snapshot `name` of `group`; INCREMENTAL partitions build on `parent`.
    pub fn begin(
        &self,
        name: &SnapshotName,
        group: &str,
        geometry: Geometry,
        parent: Option<&SnapshotName>,
    ) -> Result<SnapshotWriter> {
        let parent = parent.map(|p| self.manifest(p)).transpose()?;
        SnapshotWriter::begin(&*self.backend, name, group, geometry, parent)
    }

    /// Open volume `id` of snapshot `name` for reading (resolves its chain once).
    pub fn open_volume(&self, name: &SnapshotName, id: VolumeId) -> Result<VolumeReader> {
        self.read_volume(self.manifest(name)?, id)
    }

    /// Open volume `id` of the snapshot whose manifest `m` the caller already loaded.
    pub fn read_volume(&self, m: Manifest, id: VolumeId) -> Result<VolumeReader> {
        let name = m.checked_name()?;
        VolumeReader::open(&*self.backend, &name, m, id, self.verified.clone())
    }

    /// The blake3 of every block with data that volume `id` of snapshot `name` reads, through
    /// its chain (a block absent reads as zeros). `None`: the block has data but no usable hash
    /// (a shorter snapshot on the way cut it), so it must be treated as different. What a
    /// rescan, `diff` and a rollback compare with. Blocks stored by reflink and not hashed yet
    /// are read and hashed here (the background pass has not reached them): exact, at the
    /// cost of reading them.
    pub fn block_hashes(
        &self,
        name: &SnapshotName,
        id: VolumeId,
    ) -> Result<std::collections::HashMap<u64, Option<[u8; 32]>>> {
        let m = self.manifest(name)?;
        let res = reader::resolve(&*self.backend, name, m, id)?;
        let opened = if res.blocks.iter().any(|b| b.unhashed) {
            Some(reader::open_packs(&*self.backend, &res)?)
        } else {
            None
        };
        let mut buf = Vec::new();
        let mut out = std::collections::HashMap::with_capacity(res.blocks.len());
        for (i, b) in res.blocks.iter().enumerate() {
            let hash = match (&opened, b.unhashed) {
                (Some((packs, which)), true) => {
                    use error::IoContext;
                    let (pack, path) = &packs[which[i] as usize];
                    buf.resize(b.rec.len as usize, 0);
                    pack.read_exact_at(&mut buf, b.rec.offset).at(path)?;
                    *blake3::hash(&buf).as_bytes()
                }
                _ => b.rec.hash,
            };
            out.insert(b.block, (b.len == b.rec.len).then_some(hash));
        }
        Ok(out)
    }

    /// Re-hash every block snapshot `name` reads, through its whole chain. Err only when the
    /// snapshot itself cannot be read; everything else is a problem in the report.
    pub fn verify(&self, name: &SnapshotName) -> Result<VerifyReport> {
        self.verify_with(name, &mut |_, _| {})
    }

    /// The bytes of block data snapshot `name` reads through its chain: what `verify` reads
    /// (the total of its progress).
    pub fn data_bytes(&self, name: &SnapshotName) -> Result<u64> {
        let m = self.manifest(name)?;
        let mut total = 0;
        for v in &m.volumes {
            let res = reader::resolve(&*self.backend, name, m.clone(), v.id)?;
            total += res.blocks.iter().map(|b| b.len as u64).sum::<u64>();
        }
        Ok(total)
    }

    /// `verify`, calling `done(path, bytes)` after each block read (for a progress bar).
    pub fn verify_with(
        &self,
        name: &SnapshotName,
        done: &mut dyn FnMut(&str, u64),
    ) -> Result<VerifyReport> {
        let m = self.manifest(name)?;
        let mut report = VerifyReport {
            snapshot: name.to_string(),
            volumes: m.volumes.len() as u64,
            ..VerifyReport::default()
        };
        for p in &m.packs {
            let path = self.backend.path_of(name, &p.file);
            let problem = match self.backend.len(name, &p.file) {
                Err(e) => Some(e.to_string()),
                Ok(len) if len != p.len => Some(format!(
                    "{}: {} bytes, the manifest says {}",
                    path.display(),
                    len,
                    p.len
                )),
                Ok(_) => None,
            };
            if let Some(what) = problem {
                report.problems.push(VerifyProblem {
                    volume: None,
                    block: None,
                    stored_in: name.to_string(),
                    what,
                });
            }
        }
        for v in &m.volumes {
            let problem = |block, stored_in: &str, what: String| VerifyProblem {
                volume: Some(v.path.clone()),
                block,
                stored_in: stored_in.to_string(),
                what,
            };
            let res = match reader::resolve(&*self.backend, name, m.clone(), v.id) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(problem(None, name, e.to_string()));
                    continue;
                }
            };
            let (packs, which) = match reader::open_packs(&*self.backend, &res) {
                Ok(x) => x,
                Err(e) => {
                    report.problems.push(problem(None, name, e.to_string()));
                    continue;
                }
            };
            let mut buf = Vec::new();
            for (b, &w) in res.blocks.iter().zip(&which) {
                let at = &res.levels[b.level].name;
                buf.resize(b.rec.len as usize, 0);
                if let Err(e) = packs[w as usize].0.read_exact_at(&mut buf, b.rec.offset) {
                    report
                        .problems
                        .push(problem(Some(b.block), at, format!("cannot read: {e}")));
                    continue;
                }
                done(&v.path, b.len as u64);
                if b.unhashed {
                    report.unhashed_blocks += 1;
                    continue;
                }
                report.blocks += 1;
                report.bytes += b.len as u64;
                if blake3::hash(&buf).as_bytes() != &b.rec.hash {
                    report.problems.push(problem(
                        Some(b.block),
                        at,
                        "content differs from its blake3".to_string(),
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Snapshots whose parent is `name` (an unreadable manifest counts: it might be one).
    pub fn dependents(&self, name: &SnapshotName) -> Result<Vec<String>> {
        let (children, unreadable) = self.children(name)?;
        let mut out: Vec<String> = children.iter().map(|c| c.to_string()).collect();
        out.extend(
            unreadable
                .iter()
                .map(|u| format!("{u} (unreadable manifest)")),
        );
        out.sort();
        Ok(out)
    }

    /// Snapshots whose parent is `name`, sorted, and those whose manifest cannot be read (any
    /// of them might be one).
    fn children(&self, name: &SnapshotName) -> Result<(Vec<SnapshotName>, Vec<String>)> {
        let mut children = Vec::new();
        let mut unreadable = Vec::new();
        for other in self.names()? {
            if other == name.as_str() {
                continue;
            }
            match SnapshotName::parse(&other)
                .map_err(StoreError::from)
                .and_then(|n| Ok((self.manifest(&n)?, n)))
            {
                Ok((m, n)) if m.parent.as_deref() == Some(name.as_str()) => children.push(n),
                Ok(_) => {}
                Err(_) => unreadable.push(other),
            }
        }
        Ok((children, unreadable))
    }

    /// Every hold in the store, by snapshot name.
    pub fn holds(&self) -> Result<holds::Holds> {
        holds::load(&*self.backend)
    }

    /// Put hold `tag` on snapshot `name`; false if it was already there.
    pub fn hold(&self, name: &SnapshotName, tag: &str) -> Result<bool> {
        let _g = self.records.lock().unwrap_or_else(|p| p.into_inner());
        holds::hold(&*self.backend, name, tag)
    }

    /// Release hold `tag` (None: all) on snapshot `name`; returns the tags released.
    pub fn release(&self, name: &SnapshotName, tag: Option<&str>) -> Result<Vec<String>> {
        let _g = self.records.lock().unwrap_or_else(|p| p.into_inner());
        holds::release(&*self.backend, name, tag)
    }

    /// Refuse to delete a held snapshot, naming its holds.
    fn check_not_held(&self, name: &SnapshotName) -> Result<()> {
        match self.holds()?.remove(name.as_str()) {
            Some(tags) if !tags.is_empty() => Err(StoreError::Held {
                name: name.to_string(),
                tags: tags.into_iter().collect(),
            }),
            _ => Ok(()),
        }
    }

    /// Delete snapshot `name` (any of a chain: oldest, middle or newest), which no hold may
    /// pin; durable on return. See `delete_with`.
    pub fn delete(&self, name: &SnapshotName) -> Result<()> {
        self.delete_with(name, &mut |_| {}).map(|_| ())
    }

    /// Delete snapshot `name`, merging what its children read through it into them (see
    /// `merge`): every other snapshot reads byte for byte as before, and the store keeps only
    /// bytes a survivor references. `progress` gets the bytes copied so far.
    ///
    /// Refused for a held snapshot, and while any manifest in the store is unreadable (that
    /// snapshot might build on `name` and could not be rewritten). The delete is named in
    /// `deleting.json` before the first child is rewritten. On an error each child is either
    /// rewritten (reading as before, now over `name`'s parent) or untouched, `name` is still
    /// there, and the record is cleared: the delete failed and may simply be retried. Only a
    /// crash (or an error while clearing the record) leaves it for `resume_deletes`.
    pub fn delete_with(
        &self,
        name: &SnapshotName,
        progress: &mut dyn FnMut(u64),
    ) -> Result<merge::DeleteReport> {
        if !self.backend.exists(name)? {
            return Err(StoreError::NotFound(name.to_string()));
        }
        self.check_not_held(name)?;
        // Merging moves records between snapshots and checks the bytes it moves: every hash
        // must be in first (and no rewrite of a child may race the merge's).
        self.hash_all()?;
        let _rewrites = self.rewrites.lock().unwrap_or_else(|p| p.into_inner());
        let (children, unreadable) = self.children(name)?;
        if !unreadable.is_empty() {
            return Err(StoreError::HasDependents {
                name: name.to_string(),
                dependents: unreadable,
            });
        }
        let parent = self.manifest(name)?.parent;
        let noted = {
            let _g = self.records.lock().unwrap_or_else(|p| p.into_inner());
            merge::note_deleting(
                &*self.backend,
                merge::Deleting {
                    name: name.to_string(),
                    parent,
                },
            )
        };
        let done =
            noted.and_then(|()| merge::delete_merging(&*self.backend, name, &children, progress));
        let _g = self.records.lock().unwrap_or_else(|p| p.into_inner());
        match (done, merge::forget_deleting(&*self.backend, name.as_str())) {
            (Ok(report), Ok(())) => Ok(report),
            (Ok(_), Err(e)) => {
                // Deleted; the record's stale line is dropped by the next resume_deletes.
                log::warn!(
                    "snapshot {name} deleted, but clearing {}: {e}",
                    merge::DELETING
                );
                Err(e)
            }
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(clear)) => {
                log::warn!(
                    "deleting {name} failed ({e}) and clearing {} failed too ({clear}): the \
                     next start finishes the delete",
                    merge::DELETING
                );
                Err(e)
            }
        }
    }

    /// Finish the deletes a crash interrupted (named in `deleting.json`): rewrite the children
    /// still building on each, remove it, and drop it from the record. Returns the snapshots
    /// whose delete was finished (or found already done). The daemon calls it at start, after
    /// `Store::open`.
    pub fn resume_deletes(&self) -> Result<Vec<String>> {
        let pending = merge::load_deleting(&*self.backend)?;
        if !pending.is_empty() {
            self.hash_all()?;
        }
        let _rewrites = self.rewrites.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Vec::new();
        for d in pending {
            let name = SnapshotName::parse(&d.name)?;
            if self.backend.exists(&name)? {
                let (children, unreadable) = self.children(&name)?;
                if !unreadable.is_empty() {
                    return Err(StoreError::HasDependents {
                        name: d.name,
                        dependents: unreadable,
                    });
                }
                let r = merge::delete_merging(&*self.backend, &name, &children, &mut |_| {})?;
                log::info!(
                    "finished deleting snapshot {name}: rewrote {:?}, copied {} bytes",
                    r.rewritten,
                    r.bytes_copied
                );
            }
            let _g = self.records.lock().unwrap_or_else(|p| p.into_inner());
            merge::forget_deleting(&*self.backend, &d.name)?;
            done.push(d.name);
        }
        Ok(done)
    }

    /// Put in the blake3 of every block of snapshot `name` stored without one (reflinked at
    /// capture, `VolumeEntry::unhashed`): read the blocks from the packs, hash them, and swap
    /// in a new version of the snapshot with full tables and a manifest of [`FORMAT`] (its
    /// packs taken over as they are: no byte moves). All-zero blocks of FULL partitions are
    /// dropped from the tables then, as a copying capture would have left them out. Returns the
    /// blocks hashed (0: nothing to do). The content is the same before and after; a reader
    /// that opened the old version keeps reading it.
    pub fn hash_snapshot(&self, name: &SnapshotName) -> Result<u64> {
        let _rewrites = self.rewrites.lock().unwrap_or_else(|p| p.into_inner());
        let m = self.manifest(name)?;
        if m.volumes.iter().all(|v| v.unhashed.is_empty()) {
            return Ok(0);
        }
        let bpp = m.geometry.blocks_per_partition();
        let mut packs: Vec<Option<Arc<dyn backend::PackRead>>> = vec![None; m.packs.len()];
        let mut tables = Vec::new();
        let mut hashed = 0;
        let mut buf = Vec::new();
        for (i, v) in m.volumes.iter().enumerate() {
            let Some(t) = v.table.as_ref().filter(|_| !v.unhashed.is_empty()) else {
                continue;
            };
            let path = self.backend.path_of(name, &t.file);
            let mut records = format::decode_table(&self.backend.read(name, &t.file)?, &path, t)?;
            for r in records.iter_mut().filter(|r| v.is_unhashed(r.block)) {
                let pack = match &mut packs[r.pack as usize] {
                    Some(p) => p.clone(),
                    slot @ None => {
                        let p = self
                            .backend
                            .open_pack(name, &m.packs[r.pack as usize].file)?;
                        *slot = Some(p.clone());
                        p
                    }
                };
                buf.resize(r.len as usize, 0);
                let ppath = self.backend.path_of(name, &m.packs[r.pack as usize].file);
                {
                    use error::IoContext;
                    pack.read_exact_at(&mut buf, r.offset).at(&ppath)?;
                }
                r.hash = *blake3::hash(&buf).as_bytes();
                if writer::is_zero(&buf) {
                    r.pack = format::ZERO_PACK;
                }
                hashed += 1;
            }
            records.retain(|r| {
                !(r.is_zero()
                    && v.partitions.get((r.block / bpp) as usize).map(|p| p.kind)
                        == Some(PartitionKind::Full))
            });
            tables.push((i, records));
        }
        // Stage, then check that nobody replaced the snapshot while it was hashed (another
        // process deleting its parent): staging holds its name until the swap.
        let staging = self.backend.stage(name, backend::StageMode::Replace)?;
        if self.manifest(name)? != m {
            staging.abort()?;
            return Err(StoreError::Misuse(format!(
                "snapshot {name} changed while its blocks were hashed: try again"
            )));
        }
        for p in &m.packs {
            staging.adopt(name, &p.file, &p.file)?;
        }
        let mut new = m.clone();
        new.format = FORMAT;
        for v in new.volumes.iter_mut() {
            v.unhashed.clear();
        }
        for (i, v) in m.volumes.iter().enumerate() {
            if let Some(t) = &v.table {
                if !tables.iter().any(|(j, _)| *j == i) {
                    staging.adopt(name, &t.file, &t.file)?;
                }
            }
        }
        for (i, records) in tables {
            let v = &mut new.volumes[i];
            v.records = records.len() as u64;
            v.stored_bytes = records.iter().map(|r| r.len as u64).sum();
            v.table = if records.is_empty() {
                None
            } else {
                let file = format!("vol-{i:06}.tbl");
                let bytes = format::encode_table(&records);
                staging.write_file(&file, &bytes)?;
                Some(format::FileRef {
                    file,
                    len: bytes.len() as u64,
                    blake3: blake3::hash(&bytes).to_hex().to_string(),
                })
            };
        }
        let bytes = serde_json::to_vec_pretty(&new)
            .map_err(|e| StoreError::Misuse(format!("manifest does not serialize: {e}")))?;
        staging.commit(&bytes)?;
        log::info!("snapshot {name}: hashed {hashed} block(s) stored by reflink");
        Ok(hashed)
    }

    /// `hash_snapshot` for every snapshot that has blocks without a blake3; returns the
    /// blocks hashed. The daemon runs it after each commit that cloned blocks and at start
    /// (a crash may have left some); a delete runs it first.
    pub fn hash_all(&self) -> Result<u64> {
        let mut hashed = 0;
        for n in self.names()? {
            let Ok(name) = SnapshotName::parse(&n) else {
                continue;
            };
            let unhashed = match self.manifest(&name) {
                Ok(m) => m.volumes.iter().any(|v| !v.unhashed.is_empty()),
                // Gone meanwhile, or unreadable: nothing to hash here.
                Err(_) => false,
            };
            if unhashed {
                hashed += self.hash_snapshot(&name)?;
            }
        }
        Ok(hashed)
    }
}
