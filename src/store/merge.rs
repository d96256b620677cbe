//! Delete with merge: how a snapshot X that other snapshots build on is deleted without
//! changing a byte any of them reads. Every child C (a snapshot whose parent is X) is rewritten
//! into a new version C' whose parent is X's parent P: C' keeps C's own records and packs
//! (adopted, never copied), takes from X the extents C read through it (copied into a new pack
//! with `PackWrite::write_from`, or X's pack adopted whole when C' needs every extent of it),
//! and reproduces the cut a shorter X made (ZERO records, and a block X cut mid-block stored
//! anew with its own blake3). A partition whose chain ended at X (X FULL there, or past X's
//! end) becomes FULL; one where X was INCREMENTAL stays INCREMENTAL over P. Each C' is staged
//! (`StageMode::Replace`) and committed in one atomic swap; X is removed after its last child.
//!
//! Planning (`plan_volume`) is pure: from C's records, X's partitions, the resolution C reads
//! today and the one C' would inherit from P, it says where each block of C' comes from. The
//! rest applies a plan through the `Backend`. A delete under way is named in the store-wide
//! record `deleting.json` (format [`DELETING_FORMAT`]) before the first child is rewritten,
//! so `Store::resume_deletes` can finish it after a crash. This module never changes what a
//! snapshot reads, never recomputes a block from live data, and never decides whether a delete
//! is allowed (holds, unreadable manifests: `Store::delete_with` does).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backend::{Backend, BlockSource, PackRead, PackWrite, StageMode, Staging};
use super::error::{IoContext, Result, StoreError};
use super::format::{
    decode_table, encode_table, load_manifest_from, pack_header, FileRef, Manifest, PackRef,
    PartitionEntry, PartitionKind, Record, VolumeEntry, PACK_HEADER_LEN, ZERO_PACK,
};
use super::reader::{resolve, Resolution, Resolved};
use super::writer::PACK_LIMIT;
use crate::ids::{Geometry, SnapshotName};

/// The store-wide record of deletes under way.
pub const DELETING: &str = "deleting.json";
/// Format of the deletes-under-way record.
pub const DELETING_FORMAT: u32 = 1;
/// Alignment of extents that can be shared by a reflink (as the writer aligns whole blocks).
const ALIGN: u64 = 4096;

/// What a delete did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeleteReport {
    /// The deleted snapshot.
    pub name: String,
    /// Children rewritten onto the deleted snapshot's parent.
    pub rewritten: Vec<String>,
    /// Block bytes copied into the children's new packs.
    pub bytes_copied: u64,
    /// Bytes of the deleted snapshot's packs that no survivor keeps.
    pub bytes_freed: u64,
}

/// A delete under way, as `deleting.json` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleting {
    pub name: String,
    /// Its parent when the delete began: what its children are rewritten onto.
    pub parent: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeletingRecord {
    format: u32,
    deleting: Vec<Deleting>,
}

/// The deletes under way (none if the record was never written).
pub fn load_deleting(b: &dyn Backend) -> Result<Vec<Deleting>> {
    let r: Option<DeletingRecord> = super::format::load_record(b, DELETING, DELETING_FORMAT)?;
    Ok(r.map(|r| r.deleting).unwrap_or_default())
}

fn save_deleting(b: &dyn Backend, deleting: Vec<Deleting>) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(&DeletingRecord {
        format: DELETING_FORMAT,
        deleting,
    })
    .map_err(|e| StoreError::Misuse(format!("encoding the deletes under way: {e}")))?;
    b.write_record(DELETING, &bytes)
}

/// Name `d` in the record, durably (before the first child is rewritten).
pub fn note_deleting(b: &dyn Backend, d: Deleting) -> Result<()> {
    let mut all = load_deleting(b)?;
    if all.iter().any(|e| e.name == d.name) {
        return Ok(());
    }
    all.push(d);
    save_deleting(b, all)
}

/// Drop `name` from the record (its delete finished, or failed and was given up).
pub fn forget_deleting(b: &dyn Backend, name: &str) -> Result<()> {
    let all = load_deleting(b)?;
    if !all.iter().any(|e| e.name == name) {
        return Ok(());
    }
    save_deleting(b, all.into_iter().filter(|e| e.name != name).collect())
}

/// Where a block of a rewritten child comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The child's own record (its packs keep their names and indexes).
    Own(Record),
    /// An extent of the deleted snapshot, taken verbatim (copied, or its pack adopted).
    Deleted(Record),
    /// The first `len` bytes of extent `rec` stored by snapshot `snap` (a block that the
    /// deleted snapshot's size cut mid-block, or any extent whose cut would otherwise change):
    /// read, checked against its blake3, cut and stored anew with its own.
    Cut {
        snap: SnapshotName,
        rec: Record,
        len: u32,
    },
    /// Zeros now (a ZERO record of an INCREMENTAL partition).
    Zero,
}

/// A volume of the rewritten child: its partitions and, by block, where each record comes from.
#[derive(Debug)]
pub(crate) struct VolumePlan {
    pub partitions: Vec<PartitionEntry>,
    pub blocks: Vec<(u64, Source)>,
}

/// What volume `child` of the child reads at a block with data, as `(snapshot, record, len)`.
fn seen(res: &Resolution, r: &Resolved) -> (SnapshotName, Record, u32) {
    (res.levels[r.level].name.clone(), r.rec, r.len)
}

fn find(res: &Resolution, block: u64) -> Option<&Resolved> {
    res.blocks
        .binary_search_by_key(&block, |r| r.block)
        .ok()
        .map(|i| &res.blocks[i])
}

/// Plan volume `child` of child C for its rewrite onto the deleted snapshot's parent.
/// `own`: C's records of the volume; `deleted`: the volume in the deleted snapshot X (None if
/// X lacks it); `target`: C's resolution of the volume today (what C' must read); `base`: the
/// parent P's resolution of the volume, needed when a partition stays INCREMENTAL.
pub(crate) fn plan_volume(
    g: Geometry,
    deleted_name: &SnapshotName,
    child: &VolumeEntry,
    own: &[Record],
    deleted: Option<&VolumeEntry>,
    target: &Resolution,
    base: Option<&Resolution>,
) -> Result<VolumePlan> {
    let bpp = g.blocks_per_partition();
    let bs = g.block_size;
    let nblocks = g.blocks(child.size);
    // A partition whose chain went on from X stays INCREMENTAL (over P) where X was
    // INCREMENTAL; where X was FULL, or C is past X's end, the chain ended at X: FULL.
    let partitions: Vec<PartitionEntry> = child
        .partitions
        .iter()
        .map(|c| {
            if c.kind == PartitionKind::Full {
                return c.clone();
            }
            match deleted.and_then(|x| x.partitions.get(c.index as usize)) {
                Some(x) if x.kind == PartitionKind::Incremental => PartitionEntry {
                    // The chain now skips X: as deep as X's was there. Deeper descendants
                    // are not rewritten, so their depth becomes an upper bound (one more than
                    // the truth); policy only compares depths with max_chain, where an upper
                    // bound errs on the safe side (a FULL a little early).
                    depth: x.depth,
                    ..c.clone()
                },
                _ => PartitionEntry {
                    index: c.index,
                    kind: PartitionKind::Full,
                    reason: format!("FULL: merged with its deleted parent {deleted_name}"),
                    depth: 1,
                },
            }
        })
        .collect();
    let kind_of = |b: u64| {
        partitions
            .get((b / bpp) as usize)
            .map_or(PartitionKind::Full, |p| p.kind)
    };
    let was_full = |b: u64| {
        child
            .partitions
            .get((b / bpp) as usize)
            .is_none_or(|p| p.kind == PartitionKind::Full)
    };
    let incremental_left = partitions
        .iter()
        .any(|p| p.kind == PartitionKind::Incremental);
    let base = match (incremental_left, base) {
        (false, _) => None,
        (true, Some(b)) => Some(b),
        (true, None) => {
            return Err(StoreError::Misuse(format!(
                "{}: merging an INCREMENTAL partition needs its new parent's resolution",
                child.path
            )))
        }
    };
    let own_at: BTreeMap<u64, Record> = own.iter().map(|r| (r.block, *r)).collect();
    // Every block where C' may need a record: C's own, what C reads, what P would show.
    let mut candidates: BTreeSet<u64> = own_at.keys().copied().collect();
    candidates.extend(target.blocks.iter().map(|r| r.block));
    if let Some(b) = base {
        candidates.extend(b.blocks.iter().map(|r| r.block));
    }
    let mut blocks = Vec::new();
    for b in candidates.into_iter().take_while(|&b| b < nblocks) {
        let full = kind_of(b) == PartitionKind::Full;
        if let Some(r) = own_at.get(&b) {
            // C's own records read the same in C' (the first level cuts at C's size in both);
            // a FULL partition reads a missing block as zeros, so ZERO records go.
            if !(full && r.is_zero()) {
                blocks.push((b, Source::Own(*r)));
            }
            continue;
        }
        if was_full(b) {
            continue;
        }
        let start = b * bs;
        let want = find(target, b).map(|r| seen(target, r));
        let inherited = match (full, base) {
            (false, Some(base)) => find(base, b).map(|r| {
                let (snap, rec, len) = seen(base, r);
                // C' cuts what it inherits at its own size.
                (snap, rec, (len as u64).min(child.size - start) as u32)
            }),
            _ => None,
        };
        if want == inherited {
            continue;
        }
        let source = match want {
            None => Source::Zero,
            Some((snap, rec, len)) => {
                // C' reads a record of its own up to its size: verbatim only if that is the
                // length C read.
                let verbatim = (rec.len as u64).min(child.size - start) == len as u64;
                if &snap == deleted_name && verbatim {
                    Source::Deleted(rec)
                } else {
                    Source::Cut { snap, rec, len }
                }
            }
        };
        blocks.push((b, source));
    }
    Ok(VolumePlan { partitions, blocks })
}

/// The deleted snapshot's stored extents: per pack, the offsets its records point at.
pub(crate) fn extents_of(
    b: &dyn Backend,
    name: &SnapshotName,
    m: &Manifest,
) -> Result<Vec<HashSet<u64>>> {
    let mut out = vec![HashSet::new(); m.packs.len()];
    for v in &m.volumes {
        for r in table_of(b, name, v)? {
            if let Some(set) = out.get_mut(r.pack as usize) {
                set.insert(r.offset);
            }
        }
    }
    Ok(out)
}

fn table_of(b: &dyn Backend, name: &SnapshotName, v: &VolumeEntry) -> Result<Vec<Record>> {
    match &v.table {
        None => Ok(Vec::new()),
        Some(t) => decode_table(&b.read(name, &t.file)?, &b.path_of(name, &t.file), t),
    }
}

/// New packs of a rewritten child, created as data comes.
struct Packs<'a> {
    staging: &'a dyn Staging,
    /// Every pack of C' so far, in manifest order.
    refs: Vec<PackRef>,
    /// The pack being appended to: its index in `refs` and its sink.
    open: Option<(usize, Arc<dyn PackWrite>)>,
    sinks: Vec<Arc<dyn PackWrite>>,
    taken: HashSet<String>,
}

impl Packs<'_> {
    fn fresh_name(&mut self) -> String {
        let mut i = self.refs.len();
        loop {
            let name = format!("pack-{i:06}");
            if self.taken.insert(name.clone()) {
                return name;
            }
            i += 1;
        }
    }

    /// A place for `len` bytes: (pack index, offset, sink). `aligned`: the bytes come from an
    /// aligned extent, so they go at an aligned offset too, where a reflink can share them.
    fn reserve(&mut self, len: u64, aligned: bool) -> Result<(u32, u64, Arc<dyn PackWrite>)> {
        let place = |at: u64| {
            if aligned {
                at.div_ceil(ALIGN) * ALIGN
            } else {
                at
            }
        };
        let full = match &self.open {
            Some((i, _)) => place(self.refs[*i].len) + len > PACK_LIMIT,
            None => true,
        };
        if full {
            let name = self.fresh_name();
            let sink = self.staging.create_pack(&name)?;
            sink.write_at(0, &pack_header())?;
            self.refs.push(PackRef {
                file: name,
                len: PACK_HEADER_LEN,
            });
            self.sinks.push(sink.clone());
            self.open = Some((self.refs.len() - 1, sink));
        }
        let Some((i, sink)) = &self.open else {
            return Err(StoreError::Misuse("no open pack".into()));
        };
        let offset = place(self.refs[*i].len);
        self.refs[*i].len = offset + len;
        Ok((*i as u32, offset, sink.clone()))
    }
}

/// Packs of committed snapshots opened for reading, by (snapshot, file).
#[derive(Default)]
struct Opened(HashMap<(SnapshotName, String), Arc<dyn PackRead>>);

impl Opened {
    fn get(
        &mut self,
        b: &dyn Backend,
        snap: &SnapshotName,
        file: &str,
    ) -> Result<Arc<dyn PackRead>> {
        let key = (snap.clone(), file.to_string());
        if let Some(p) = self.0.get(&key) {
            return Ok(p.clone());
        }
        let p = b.open_pack(snap, file)?;
        self.0.insert(key, p.clone());
        Ok(p)
    }
}

/// A child's rewrite, done.
pub(crate) struct Rewritten {
    pub bytes_copied: u64,
    /// Packs of the deleted snapshot that the child adopted whole (indexes).
    pub adopted: Vec<u32>,
}

/// The deleted snapshot X, what its children need of it.
pub(crate) struct Deleted<'a> {
    pub name: &'a SnapshotName,
    pub manifest: &'a Manifest,
    /// Per pack, the offsets of its stored extents (`extents_of`).
    pub extents: &'a [HashSet<u64>],
}

/// Rewrite child `child` of X onto X's parent: plan every volume, copy or adopt what it needs,
/// stage the new version and commit it. None if `child` no longer builds on X (a rewrite a
/// crash interrupted after its commit). On an error the staging is dropped and `child` stays
/// as it was.
pub(crate) fn rewrite_child(
    b: &dyn Backend,
    x: &Deleted<'_>,
    child: &SnapshotName,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<Rewritten>> {
    let cm = load_manifest_from(b, child)?;
    if cm.parent.as_deref() != Some(x.name.as_str()) {
        return Ok(None);
    }
    let parent = x
        .manifest
        .parent
        .as_deref()
        .map(SnapshotName::parse)
        .transpose()?;
    let pm = parent
        .as_ref()
        .map(|p| load_manifest_from(b, p))
        .transpose()?;
    let mut plans = Vec::with_capacity(cm.volumes.len());
    for v in &cm.volumes {
        let own = table_of(b, child, v)?;
        let xv = x.manifest.volume(v.id);
        if v.partitions.iter().all(|p| p.kind == PartitionKind::Full) {
            plans.push(VolumePlan {
                partitions: v.partitions.clone(),
                blocks: own.iter().map(|r| (r.block, Source::Own(*r))).collect(),
            });
            continue;
        }
        let target = resolve(b, child, cm.clone(), v.id)?;
        let stays = v.partitions.iter().any(|p| {
            p.kind == PartitionKind::Incremental
                && xv
                    .and_then(|x| x.partitions.get(p.index as usize))
                    .is_some_and(|x| x.kind == PartitionKind::Incremental)
        });
        let base = match (stays, &parent, &pm) {
            (true, Some(p), Some(m)) => Some(resolve(b, p, m.clone(), v.id)?),
            _ => None,
        };
        plans.push(plan_volume(
            cm.geometry,
            x.name,
            v,
            &own,
            xv,
            &target,
            base.as_ref(),
        )?);
    }
    let staging = b.stage(child, StageMode::Replace)?;
    match apply(
        b,
        &*staging,
        x,
        child,
        &cm,
        parent.as_ref(),
        plans,
        progress,
    ) {
        Ok((manifest, done)) => {
            let bytes = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| StoreError::Misuse(format!("manifest does not serialize: {e}")))?;
            staging.commit(&bytes)?;
            Ok(Some(done))
        }
        Err(e) => {
            if let Err(a) = staging.abort() {
                log::warn!("dropping the rewrite of {child}: {a}");
            }
            Err(e)
        }
    }
}

/// Stage the planned volumes of C' (everything but the manifest's commit).
#[allow(clippy::too_many_arguments)]
fn apply(
    b: &dyn Backend,
    staging: &dyn Staging,
    x: &Deleted<'_>,
    child: &SnapshotName,
    cm: &Manifest,
    parent: Option<&SnapshotName>,
    plans: Vec<VolumePlan>,
    progress: &mut dyn FnMut(u64),
) -> Result<(Manifest, Rewritten)> {
    let mut packs = Packs {
        staging,
        refs: Vec::new(),
        open: None,
        sinks: Vec::new(),
        taken: cm.packs.iter().map(|p| p.file.clone()).collect(),
    };
    // C's packs, under the same names and indexes: its records stay as they are.
    for p in &cm.packs {
        staging.adopt(child, &p.file, &p.file)?;
        packs.refs.push(p.clone());
    }
    // X's extents C' needs verbatim, by pack; a pack needed whole is adopted, not copied.
    let mut needed: BTreeMap<(u32, u64), Record> = BTreeMap::new();
    for plan in &plans {
        for (_, s) in &plan.blocks {
            if let Source::Deleted(r) = s {
                needed.insert((r.pack, r.offset), *r);
            }
        }
    }
    let mut moved: HashMap<(u32, u64), (u32, u64)> = HashMap::new();
    let mut adopted = Vec::new();
    for (k, extents) in x.extents.iter().enumerate() {
        let k = k as u32;
        if extents.is_empty() || !extents.iter().all(|o| needed.contains_key(&(k, *o))) {
            continue;
        }
        let pref = &x.manifest.packs[k as usize];
        let name = packs.fresh_name();
        staging.adopt(x.name, &pref.file, &name)?;
        packs.refs.push(PackRef {
            file: name,
            len: pref.len,
        });
        let at = packs.refs.len() as u32 - 1;
        for o in extents {
            moved.insert((k, *o), (at, *o));
        }
        adopted.push(k);
    }
    let mut opened = Opened::default();
    let mut copied = 0u64;
    for (key, r) in &needed {
        if moved.contains_key(key) {
            continue;
        }
        let file = &x
            .manifest
            .packs
            .get(r.pack as usize)
            .ok_or_else(|| StoreError::Corrupt {
                path: b.path_of(x.name, "manifest.json"),
                why: format!("block {} points outside the snapshot's packs", r.block),
            })?
            .file;
        let src = opened.get(b, x.name, file)?;
        let len = r.len as u64;
        let aligned = r.offset.is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN);
        let (at, offset, sink) = packs.reserve(len, aligned && src.as_file().is_some())?;
        match src.as_file() {
            // In the kernel: copy_file_range, a reflink where the filesystem can.
            Some(f) => sink.write_from(
                offset,
                BlockSource {
                    file: f,
                    offset: r.offset,
                    len,
                    bytes: None,
                },
            )?,
            None => {
                let mut buf = vec![0u8; r.len as usize];
                let path = b.path_of(x.name, file);
                src.read_exact_at(&mut buf, r.offset).at(&path)?;
                sink.write_at(offset, &buf)?;
            }
        }
        moved.insert(*key, (at, offset));
        copied += len;
        progress(copied);
    }
    let mut volumes = Vec::with_capacity(plans.len());
    // Manifests of the snapshots cut blocks come from.
    let mut manifests: HashMap<SnapshotName, Manifest> = HashMap::new();
    for (i, (v, plan)) in cm.volumes.iter().zip(plans).enumerate() {
        let mut records = Vec::with_capacity(plan.blocks.len());
        for (block, s) in plan.blocks {
            let rec = match s {
                Source::Own(r) => r,
                Source::Zero => zero(block),
                Source::Deleted(r) => {
                    let (pack, offset) = moved[&(r.pack, r.offset)];
                    Record { pack, offset, ..r }
                }
                Source::Cut { snap, rec, len } => {
                    if !manifests.contains_key(&snap) {
                        manifests.insert(snap.clone(), load_manifest_from(b, &snap)?);
                    }
                    let file = &manifests[&snap]
                        .packs
                        .get(rec.pack as usize)
                        .ok_or_else(|| StoreError::Chain {
                            snapshot: snap.to_string(),
                            why: format!("block {block} points outside its packs"),
                        })?
                        .file;
                    let path = b.path_of(&snap, file);
                    let mut buf = vec![0u8; rec.len as usize];
                    opened
                        .get(b, &snap, file)?
                        .read_exact_at(&mut buf, rec.offset)
                        .at(&path)?;
                    // Never turn damaged bytes into a block with a fresh, matching hash.
                    if blake3::hash(&buf).as_bytes() != &rec.hash {
                        return Err(StoreError::Damaged {
                            snapshot: child.to_string(),
                            volume: v.path.clone(),
                            block,
                            stored_in: snap.to_string(),
                            path,
                        });
                    }
                    buf.truncate(len as usize);
                    if buf.iter().all(|&c| c == 0) {
                        let p = (block / cm.geometry.blocks_per_partition()) as usize;
                        if plan.partitions[p].kind == PartitionKind::Full {
                            continue;
                        }
                        zero(block)
                    } else {
                        let (pack, offset, sink) = packs.reserve(len as u64, false)?;
                        sink.write_at(offset, &buf)?;
                        copied += len as u64;
                        progress(copied);
                        Record {
                            block,
                            pack,
                            len,
                            offset,
                            hash: *blake3::hash(&buf).as_bytes(),
                        }
                    }
                }
            };
            records.push(rec);
        }
        records.sort_by_key(|r| r.block);
        let table = if records.is_empty() {
            None
        } else {
            let file = format!("vol-{i:06}.tbl");
            let bytes = encode_table(&records);
            staging.write_file(&file, &bytes)?;
            Some(FileRef {
                file,
                len: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            })
        };
        volumes.push(VolumeEntry {
            partitions: plan.partitions,
            table,
            records: records.len() as u64,
            stored_bytes: records.iter().map(|r| r.len as u64).sum(),
            ..v.clone()
        });
    }
    for s in &packs.sinks {
        s.sync()?;
    }
    let manifest = Manifest {
        parent: parent.map(|p| p.to_string()),
        volumes,
        packs: packs.refs,
        ..cm.clone()
    };
    Ok((
        manifest,
        Rewritten {
            bytes_copied: copied,
            adopted,
        },
    ))
}

fn zero(block: u64) -> Record {
    Record {
        block,
        pack: ZERO_PACK,
        len: 0,
        offset: 0,
        hash: [0; 32],
    }
}

/// Delete X: rewrite each of `children` onto X's parent, then remove X. The caller checked
/// holds and noted the delete in `deleting.json`; a child already rewritten is skipped.
pub(crate) fn delete_merging(
    b: &dyn Backend,
    name: &SnapshotName,
    children: &[SnapshotName],
    progress: &mut dyn FnMut(u64),
) -> Result<DeleteReport> {
    let m = load_manifest_from(b, name)?;
    let extents = extents_of(b, name, &m)?;
    let x = Deleted {
        name,
        manifest: &m,
        extents: &extents,
    };
    let mut report = DeleteReport {
        name: name.to_string(),
        ..DeleteReport::default()
    };
    let mut adopted = HashSet::new();
    for c in children {
        let before = report.bytes_copied;
        let mut each = |n: u64| progress(before + n);
        if let Some(done) = rewrite_child(b, &x, c, &mut each)? {
            report.rewritten.push(c.to_string());
            report.bytes_copied += done.bytes_copied;
            adopted.extend(done.adopted);
        }
    }
    report.bytes_freed = freed(b, name, &m, &adopted);
    b.remove(name)?;
    Ok(report)
}

/// Bytes of X's packs that go with it: neither adopted by a child now nor shared with another
/// snapshot by an earlier merge (same file identity). A pack that cannot be opened counts as
/// freed; this is a report, not a decision.
fn freed(b: &dyn Backend, name: &SnapshotName, m: &Manifest, adopted: &HashSet<u32>) -> u64 {
    let key = |snap: &SnapshotName, file: &str| {
        b.open_pack(snap, file)
            .ok()
            .and_then(|p| p.stamp().ok())
            .map(|(k, _)| k)
    };
    let mut others = HashSet::new();
    for other in b.names().unwrap_or_default() {
        let Ok(o) = SnapshotName::parse(&other) else {
            continue;
        };
        if &o == name {
            continue;
        }
        if let Ok(om) = load_manifest_from(b, &o) {
            others.extend(om.packs.iter().filter_map(|p| key(&o, &p.file)));
        }
    }
    m.packs
        .iter()
        .enumerate()
        .filter(|(k, p)| {
            !adopted.contains(&(*k as u32))
                && key(name, &p.file).is_none_or(|k| !others.contains(&k))
        })
        .map(|(_, p)| p.len)
        .sum()
}

#[cfg(test)]
mod tests;
