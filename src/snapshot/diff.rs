//! `grainfs diff`: what changed between two sides, each a snapshot or the live backing files:
//! files added, removed, renamed (same device, inode and generation or birth time under
//! another path), modified (content, size, mode, owner, type, symlink target), and for each
//! volume whose content changed its changed byte ranges, exact to the block size.
//!
//! Between two snapshots it compares the stored block tables (a blake3 per block, through each
//! chain) and the manifests' namespaces: it never reads pack data. Against the live side it
//! asks the tracker what changed since the snapshot its dirty bits are relative to (the base),
//! adds what the tables say changed between the snapshot asked for and that base, and reads and
//! hashes only what the tracker does not know (partitions unknown after a crash, a file changed
//! behind the overlay's back, a volume not tracked or tracked against a snapshot that is gone).
//! Without a tracker (no daemon) every live volume is read and hashed.
//!
//! It must never miss a changed block (a block rewritten with the same bytes may show as
//! changed), never write anything, and never hold the engine's lock while reading data.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::group::{self, Selection, ALL};
use super::{Engine, SnapshotError};
use crate::config::GroupConfig;
use crate::ids::{Geometry, SnapshotName, VolumeId};
use crate::store::{EntryKind, Manifest, NamespaceEntry, Store, StoreError};
use crate::sys;
use crate::track::SavedVolume;

type Result<T> = std::result::Result<T, SnapshotError>;

/// The name that means "the live backing files" on the command line.
pub const LIVE: &str = "live";

/// One side of a diff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Live,
    Snapshot(SnapshotName),
}

impl Side {
    /// `live` or a snapshot name; the error says what a name may be.
    pub fn parse(s: &str) -> std::result::Result<Side, String> {
        if s == LIVE {
            return Ok(Side::Live);
        }
        SnapshotName::parse(s)
            .map(Side::Snapshot)
            .map_err(|e| e.to_string())
    }

    fn label(&self) -> String {
        match self {
            Side::Live => LIVE.to_string(),
            Side::Snapshot(n) => n.to_string(),
        }
    }
}

/// A byte range of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Modified,
    Renamed,
}

impl ChangeKind {
    /// The one-character mark `zfs diff` uses.
    pub fn mark(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Modified => 'M',
            ChangeKind::Renamed => 'R',
        }
    }
}

/// How a volume's changed extents were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Two snapshots' block tables.
    Tables,
    /// The tracker's dirty bits (and the tables between the snapshot and the tracker's base).
    Tracked,
    /// As `Tracked`, and the partitions the tracker lost were read and hashed.
    Rescanned,
    /// The whole live file was read and hashed.
    Hashed,
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffEntry {
    pub kind: ChangeKind,
    /// `file`, `dir` or `symlink` (on the newer side; on the older for a removed path).
    pub file_type: String,
    /// Relative to the backing dir (for a removed path: where it was).
    pub path: String,
    /// Where a renamed file was.
    pub old_path: Option<String>,
    /// What differs: `content`, `size`, `mode`, `owner`, `mtime`, `type`, `target`.
    pub changes: Vec<String>,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// Changed byte ranges of a volume present on both sides, merged, sorted.
    pub extents: Vec<Extent>,
    pub changed_bytes: u64,
    /// How the extents were found (volumes on both sides only).
    pub method: Option<Method>,
}

/// Counts over the entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffTotals {
    pub added: u64,
    pub removed: u64,
    pub modified: u64,
    pub renamed: u64,
    /// Volumes with changed extents.
    pub volumes_changed: u64,
    pub changed_bytes: u64,
}

/// What `grainfs diff` reports (`--json`: these names stay stable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    pub block_size: u64,
    /// How the live side was read: `tracked` (the daemon's change tracking, hashing only
    /// what it lost) or `read` (no daemon: every live volume read and hashed); None when
    /// neither side is live.
    pub live: Option<String>,
    pub entries: Vec<DiffEntry>,
    pub totals: DiffTotals,
}

/// The tracker's view of live volumes: the saved state of each id asked for that it tracks.
pub struct Tracking<'a> {
    pub geometry: Geometry,
    pub states: &'a dyn Fn(&[VolumeId]) -> HashMap<VolumeId, SavedVolume>,
}

/// Where a diff reads from.
pub struct Sources<'a> {
    pub store: &'a Store,
    /// The backing dir (needed for a live side).
    pub root: Option<&'a OwnedFd>,
    /// (dev, ino) of the store, never part of the live side.
    pub store_key: Option<(u64, u64)>,
    /// The configured groups: which live files a snapshot of a group is compared with.
    pub groups: &'a [GroupConfig],
    /// None: read and hash every live volume.
    pub tracking: Option<Tracking<'a>>,
}

/// A regular file on one side.
#[derive(Clone, Debug)]
struct FileView {
    path: String,
    id: VolumeId,
    gen: Option<u64>,
    birth_ns: Option<i128>,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
}

/// One side read: its files, directories and symlinks, and its manifest if a snapshot.
struct View {
    files: Vec<FileView>,
    namespace: Vec<NamespaceEntry>,
    manifest: Option<Manifest>,
    /// Open live files by id (live side only).
    open: HashMap<VolumeId, File>,
}

impl Engine {
    /// Diff two sides of this mount; the live side's changes come from the tracker, read
    /// while no snapshot operation runs (it waits for one being taken).
    pub fn diff(&self, from: &Side, to: &Side, paths: &[String]) -> Result<DiffReport> {
        if matches!(from, Side::Live) || matches!(to, Side::Live) {
            // What the kernel still holds for the mount (shared mappings, writeback cache)
            // is written, so live means what programs wrote.
            (self.flush)();
        }
        let rules = self.rules();
        let states = |ids: &[VolumeId]| {
            // No barrier or commit may move bits between the live map, the pending take and
            // the base while they are read.
            let _busy = self.lock_busy(true);
            ids.iter()
                .filter_map(|id| {
                    let v = self.tracker.get(*id)?;
                    // A change behind the overlay's back since the last tick counts now.
                    v.check_stamp();
                    let _gate = v.close_gate();
                    Some((*id, v.saved(None)))
                })
                .collect()
        };
        let src = Sources {
            store: &self.store,
            root: Some(&self.root),
            store_key: self.store_key,
            groups: &rules.groups,
            tracking: Some(Tracking {
                geometry: self.tracker.geometry(),
                states: &states,
            }),
        };
        diff(&src, from, to, paths)
    }
}

/// Diff `from` against `to`, limited to `paths` (relative to the backing dir; empty: all).
pub fn diff(src: &Sources, from: &Side, to: &Side, paths: &[String]) -> Result<DiffReport> {
    let paths: Vec<String> = paths.iter().map(|p| clean_path(p)).collect();
    let snap = |s: &Side| match s {
        Side::Snapshot(n) => Some(n.clone()),
        Side::Live => None,
    };
    let manifests: Vec<Manifest> = [from, to]
        .iter()
        .filter_map(|s| snap(s))
        .map(|n| src.store.manifest(&n))
        .collect::<std::result::Result<_, _>>()?;
    let live_used = from == &Side::Live || to == &Side::Live;
    let geometry = manifests
        .first()
        .map(|m| m.geometry)
        .or(src.tracking.as_ref().map(|t| t.geometry))
        .unwrap_or(Geometry {
            block_size: 65536,
            partition_size: 1 << 26,
        });
    let mut report = DiffReport {
        from: from.label(),
        to: to.label(),
        block_size: geometry.block_size,
        live: live_used.then(|| {
            if src.tracking.is_some() {
                "tracked".to_string()
            } else {
                "read".to_string()
            }
        }),
        entries: Vec::new(),
        totals: DiffTotals::default(),
    };
    if from == to {
        return Ok(report);
    }
    let view = |s: &Side| -> Result<View> {
        match s {
            Side::Snapshot(n) => {
                let m = manifests
                    .iter()
                    .find(|m| m.name == n.as_str())
                    .cloned()
                    .ok_or_else(|| StoreError::NotFound(n.to_string()))?;
                Ok(snapshot_view(m))
            }
            Side::Live => {
                let other = manifests.first();
                live_view(src, other)
            }
        }
    };
    let (a, b) = (view(from)?, view(to)?);
    let (pairs, a_left, b_left) = pair_files(&a.files, &b.files);
    // The tracker's state of the live volumes that have a snapshot side to compare with.
    let live_ids: Vec<VolumeId> = pairs
        .iter()
        .filter(|(i, j)| selected(&a.files[*i].path, &paths) || selected(&b.files[*j].path, &paths))
        .map(|(i, j)| {
            if from == &Side::Live {
                a.files[*i].id
            } else {
                b.files[*j].id
            }
        })
        .collect();
    let states = match (&src.tracking, live_used) {
        (Some(t), true) => (t.states)(&live_ids),
        _ => HashMap::new(),
    };
    let mut entries = Vec::new();
    for (i, j) in &pairs {
        let (fa, fb) = (&a.files[*i], &b.files[*j]);
        if !selected(&fa.path, &paths) && !selected(&fb.path, &paths) {
            continue;
        }
        let (blocks, method) = changed_blocks(src, &a, fa, &b, fb, &states)?;
        let extents = extents(&blocks, geometry.block_size, fa.size, fb.size);
        let changed_bytes = extents.iter().map(|e| e.len).sum();
        let mut changes = Vec::new();
        if !extents.is_empty() {
            changes.push("content");
        }
        if fa.size != fb.size {
            changes.push("size");
        }
        if fa.mode != fb.mode {
            changes.push("mode");
        }
        if (fa.uid, fa.gid) != (fb.uid, fb.gid) {
            changes.push("owner");
        }
        if fa.mtime_ns != fb.mtime_ns {
            changes.push("mtime");
        }
        let kind = if fa.path != fb.path {
            ChangeKind::Renamed
        } else if !changes.is_empty() {
            ChangeKind::Modified
        } else {
            continue;
        };
        entries.push(DiffEntry {
            kind,
            file_type: "file".into(),
            path: fb.path.clone(),
            old_path: (kind == ChangeKind::Renamed).then(|| fa.path.clone()),
            changes: changes.into_iter().map(String::from).collect(),
            old_size: Some(fa.size),
            new_size: Some(fb.size),
            extents,
            changed_bytes,
            method: Some(method),
        });
    }
    // Everything not paired by identity, by path: files, directories, symlinks.
    let items = |files: Vec<&FileView>, ns: &[NamespaceEntry]| -> BTreeMap<String, Item> {
        let mut out: BTreeMap<String, Item> = ns
            .iter()
            .filter(|e| !e.path.is_empty())
            .map(|e| (e.path.clone(), Item::Entry(e.clone())))
            .collect();
        for f in files {
            out.insert(f.path.clone(), Item::File(f.clone()));
        }
        out
    };
    let ia = items(a_left.iter().map(|&i| &a.files[i]).collect(), &a.namespace);
    let ib = items(b_left.iter().map(|&j| &b.files[j]).collect(), &b.namespace);
    let all: BTreeSet<&String> = ia.keys().chain(ib.keys()).collect();
    for p in all {
        if !selected(p, &paths) {
            continue;
        }
        entries.extend(path_entries(p, ia.get(p), ib.get(p)));
    }
    entries.sort_by(|x, y| x.path.cmp(&y.path).then(x.kind.cmp(&y.kind)));
    for e in &entries {
        match e.kind {
            ChangeKind::Added => report.totals.added += 1,
            ChangeKind::Removed => report.totals.removed += 1,
            ChangeKind::Modified => report.totals.modified += 1,
            ChangeKind::Renamed => report.totals.renamed += 1,
        }
        if e.changed_bytes > 0 {
            report.totals.volumes_changed += 1;
            report.totals.changed_bytes += e.changed_bytes;
        }
    }
    report.entries = entries;
    Ok(report)
}

/// A path on one side not paired by identity.
enum Item {
    File(FileView),
    Entry(NamespaceEntry),
}

impl Item {
    fn file_type(&self) -> &'static str {
        match self {
            Item::File(_) => "file",
            Item::Entry(e) if e.kind == EntryKind::Dir => "dir",
            Item::Entry(_) => "symlink",
        }
    }

    fn size(&self) -> Option<u64> {
        match self {
            Item::File(f) => Some(f.size),
            Item::Entry(_) => None,
        }
    }
}

/// The entries for path `p`, given what each side has there (after pairing by identity).
fn path_entries(p: &str, a: Option<&Item>, b: Option<&Item>) -> Vec<DiffEntry> {
    let entry = |kind: ChangeKind, it: &Item, changes: Vec<String>| DiffEntry {
        kind,
        file_type: it.file_type().into(),
        path: p.to_string(),
        old_path: None,
        changes,
        old_size: a.and_then(Item::size),
        new_size: b.and_then(Item::size),
        extents: Vec::new(),
        changed_bytes: 0,
        method: None,
    };
    match (a, b) {
        (Some(x), None) => vec![entry(ChangeKind::Removed, x, Vec::new())],
        (None, Some(y)) => vec![entry(ChangeKind::Added, y, Vec::new())],
        // Two files that are not the same file: one was replaced by the other.
        (Some(x @ Item::File(_)), Some(y @ Item::File(_))) => vec![
            entry(ChangeKind::Removed, x, Vec::new()),
            entry(ChangeKind::Added, y, Vec::new()),
        ],
        (Some(Item::Entry(x)), Some(y @ Item::Entry(e))) if x.kind == e.kind => {
            let mut changes = Vec::new();
            if x.mode != e.mode {
                changes.push("mode".to_string());
            }
            if (x.uid, x.gid) != (e.uid, e.gid) {
                changes.push("owner".to_string());
            }
            if x.target != e.target {
                changes.push("target".to_string());
            }
            if changes.is_empty() {
                Vec::new()
            } else {
                vec![entry(ChangeKind::Modified, y, changes)]
            }
        }
        (Some(_), Some(y)) => vec![entry(ChangeKind::Modified, y, vec!["type".into()])],
        (None, None) => Vec::new(),
    }
}

/// Pair the files of two sides by identity: same (dev, ino), and a generation and birth time
/// that do not disagree. Without either on both sides (snapshots older than identity), only
/// the same path confirms it. Returns the pairs and the indexes left on each side.
fn pair_files(a: &[FileView], b: &[FileView]) -> (Vec<(usize, usize)>, Vec<usize>, Vec<usize>) {
    let by_id: HashMap<VolumeId, usize> = b.iter().enumerate().map(|(j, f)| (f.id, j)).collect();
    let mut pairs = Vec::new();
    let mut used = HashSet::new();
    for (i, fa) in a.iter().enumerate() {
        let Some(&j) = by_id.get(&fa.id) else {
            continue;
        };
        let fb = &b[j];
        let disagree = matches!((fa.gen, fb.gen), (Some(x), Some(y)) if x != y)
            || matches!((fa.birth_ns, fb.birth_ns), (Some(x), Some(y)) if x != y);
        let confirmed = (fa.gen.is_some() && fb.gen.is_some())
            || (fa.birth_ns.is_some() && fb.birth_ns.is_some());
        if !disagree && (confirmed || fa.path == fb.path) {
            pairs.push((i, j));
            used.insert(j);
        }
    }
    let paired_a: HashSet<usize> = pairs.iter().map(|(i, _)| *i).collect();
    let a_left = (0..a.len()).filter(|i| !paired_a.contains(i)).collect();
    let b_left = (0..b.len()).filter(|j| !used.contains(j)).collect();
    (pairs, a_left, b_left)
}

fn snapshot_view(m: Manifest) -> View {
    let files = m
        .volumes
        .iter()
        .map(|v| FileView {
            path: v.path.clone(),
            id: v.id,
            gen: v.gen,
            birth_ns: v.birth_ns,
            size: v.size,
            mode: v.mode,
            uid: v.uid,
            gid: v.gid,
            mtime_ns: v.mtime_ns,
        })
        .collect();
    View {
        files,
        namespace: m.namespace.clone(),
        manifest: Some(m),
        open: HashMap::new(),
    }
}

/// The live side, as the group of `other` (the snapshot it is compared with) sees it: every
/// file for `all`, the group's globs for a configured group, and otherwise (a snapshot of
/// `--path` globs, a group no longer configured) the snapshot's own paths and files.
fn live_view(src: &Sources, other: Option<&Manifest>) -> Result<View> {
    let root = src
        .root
        .ok_or_else(|| SnapshotError::Request("the live side needs the backing dir".into()))?;
    let group = other.map_or(ALL, |m| m.group.as_str());
    let configured = src.groups.iter().find(|g| g.name == group);
    let sel = match configured {
        Some(g) => Selection::globs(&g.volumes).map_err(SnapshotError::Request)?,
        None => Selection::All,
    };
    let tree = group::walk(root, src.store_key, &sel).map_err(|source| SnapshotError::Io {
        what: "walking the backing dir".into(),
        source,
    })?;
    // Neither `all` nor configured: keep what the snapshot had (by path or by file).
    let own: Option<(HashSet<&str>, HashSet<VolumeId>)> = match other {
        Some(m) if group != ALL && configured.is_none() => Some((
            m.volumes
                .iter()
                .map(|v| v.path.as_str())
                .chain(m.namespace.iter().map(|e| e.path.as_str()))
                .collect(),
            m.volumes.iter().map(|v| v.id).collect(),
        )),
        _ => None,
    };
    let keep = |path: &str, id: Option<VolumeId>| match &own {
        None => true,
        Some((paths, ids)) => paths.contains(path) || id.is_some_and(|i| ids.contains(&i)),
    };
    let mut files = Vec::new();
    let mut open = HashMap::new();
    for (id, e) in &tree.volumes {
        if !keep(&e.path, Some(*id)) {
            continue;
        }
        let st = &e.stat;
        let mut f = FileView {
            path: e.path.clone(),
            id: *id,
            gen: None,
            birth_ns: None,
            size: st.st_size as u64,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: group::mtime_ns(st),
        };
        // O_PATH first (a fifo swapped in must not block), then the same inode for reading.
        let opened = sys::open_beneath(root.as_raw_fd(), &e.path, libc::O_PATH)
            .ok()
            .filter(|fd| {
                sys::fstat(fd.as_raw_fd()).is_ok_and(|s| {
                    (s.st_dev, s.st_ino) == (id.dev, id.ino)
                        && s.st_mode & libc::S_IFMT == libc::S_IFREG
                })
            })
            .and_then(|fd| sys::reopen(fd.as_raw_fd(), libc::O_RDONLY).ok());
        let Some(fd) = opened else {
            // Gone since the walk: not on the live side.
            continue;
        };
        if let Ok(i) = sys::file_identity(fd.as_raw_fd()) {
            f.gen = i.generation;
            f.birth_ns = i
                .btime
                .map(|(s, ns)| s as i128 * 1_000_000_000 + ns as i128);
        }
        open.insert(*id, File::from(fd));
        files.push(f);
    }
    files.sort_by(|x, y| x.path.cmp(&y.path));
    let namespace = tree
        .namespace
        .into_iter()
        .filter(|e| e.path.is_empty() || keep(&e.path, None))
        .collect();
    Ok(View {
        files,
        namespace,
        manifest: None,
        open,
    })
}

/// The blake3 of each block with data of a volume of a snapshot (absent: zeros; None: data
/// whose hash cannot be used).
type Hashes = HashMap<u64, Option<[u8; 32]>>;

/// Blocks (below the smaller of the two sizes) whose content may differ between `fa` of side
/// `a` and `fb` of side `b`, and how that was found.
fn changed_blocks(
    src: &Sources,
    a: &View,
    fa: &FileView,
    b: &View,
    fb: &FileView,
    states: &HashMap<VolumeId, SavedVolume>,
) -> Result<(Vec<u64>, Method)> {
    match (&a.manifest, &b.manifest) {
        (Some(ma), Some(mb)) => {
            if ma.geometry != mb.geometry {
                // Tables of different block sizes cannot be set side by side: all of it.
                let n = ma.geometry.blocks(fa.size.min(fb.size));
                return Ok(((0..n).collect(), Method::Tables));
            }
            let ha = src.store.block_hashes(&ma.checked_name()?, fa.id)?;
            let hb = src.store.block_hashes(&mb.checked_name()?, fb.id)?;
            Ok((
                table_diff(&ha, fa.size, &hb, fb.size, ma.geometry),
                Method::Tables,
            ))
        }
        (Some(m), None) => live_blocks(src, m, fa, b, fb, states),
        (None, Some(m)) => live_blocks(src, m, fb, a, fa, states),
        (None, None) => Ok((Vec::new(), Method::Tracked)),
    }
}

/// Blocks that may differ between volume `sf` of snapshot `m` and live file `lf`.
fn live_blocks(
    src: &Sources,
    m: &Manifest,
    sf: &FileView,
    live: &View,
    lf: &FileView,
    states: &HashMap<VolumeId, SavedVolume>,
) -> Result<(Vec<u64>, Method)> {
    let g = m.geometry;
    let bs = g.block_size;
    let name = m.checked_name()?;
    let s_hashes = src.store.block_hashes(&name, sf.id)?;
    let file = live
        .open
        .get(&lf.id)
        .ok_or_else(|| SnapshotError::Request(format!("{}: the live file is not open", lf.path)))?;
    let upto = sf.size.min(lf.size);
    let nmin = g.blocks(upto);
    let hash_range = |first: u64, end: u64, out: &mut BTreeSet<u64>| -> Result<()> {
        let mut buf = Vec::with_capacity(bs as usize);
        for blk in first..end.min(nmin) {
            if live_block_differs(file, blk, bs, upto, s_hashes.get(&blk), &mut buf).map_err(
                |source| SnapshotError::Io {
                    what: format!("reading {} block {blk}", lf.path),
                    source,
                },
            )? {
                out.insert(blk);
            }
        }
        Ok(())
    };
    let mut out = BTreeSet::new();
    let tracked = src
        .tracking
        .as_ref()
        .filter(|t| t.geometry == g)
        .and_then(|_| states.get(&lf.id))
        .and_then(|sv| Some((sv, base_manifest(src.store, sv, lf.id, g)?)));
    let Some((sv, base)) = tracked else {
        hash_range(0, nmin, &mut out)?;
        return Ok((out.into_iter().collect(), Method::Hashed));
    };
    if sv.unknown_all {
        hash_range(0, nmin, &mut out)?;
        return Ok((out.into_iter().collect(), Method::Rescanned));
    }
    // Changed since the snapshot = changed from it to the tracker's base (tables) + dirty
    // since the base (the live bits and those an uncommitted snapshot took).
    if base.name != m.name {
        let bv = base.volume(lf.id).map_or(0, |v| v.size);
        let hb = src.store.block_hashes(&base.checked_name()?, lf.id)?;
        out.extend(table_diff(&s_hashes, sf.size, &hb, bv, g));
    }
    for (w, bits) in sv.bitmap.iter().chain(&sv.pending) {
        let mut bits = *bits;
        while bits != 0 {
            out.insert(w * 64 + bits.trailing_zeros() as u64);
            bits &= bits - 1;
        }
    }
    // Cut off and grown back since the base without a bit (an adopted stamp): zeros now.
    if sv.low_water < lf.size {
        out.extend((sv.low_water / bs)..g.blocks(lf.size));
    }
    let bpp = g.blocks_per_partition();
    for p in &sv.unknown {
        let (first, end) = (p * bpp, (p + 1) * bpp);
        out.retain(|b| !(first..end).contains(b));
        hash_range(first, end, &mut out)?;
    }
    out.retain(|b| *b < nmin);
    let method = if sv.unknown.is_empty() {
        Method::Tracked
    } else {
        Method::Rescanned
    };
    Ok((out.into_iter().collect(), method))
}

/// The manifest of the snapshot `sv`'s dirty bits are relative to, if it is still the one
/// the tracker means (same name and instant), holds volume `id` and has geometry `g`.
fn base_manifest(store: &Store, sv: &SavedVolume, id: VolumeId, g: Geometry) -> Option<Manifest> {
    let (name, created_ns) = sv.base.as_ref()?;
    let m = store.manifest(&SnapshotName::parse(name).ok()?).ok()?;
    (m.created_ns == *created_ns && m.geometry == g && m.volume(id).is_some()).then_some(m)
}

/// Whether live block `blk` (compared up to byte `upto`) differs from the snapshot's `stored`.
fn live_block_differs(
    file: &File,
    blk: u64,
    bs: u64,
    upto: u64,
    stored: Option<&Option<[u8; 32]>>,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let start = blk * bs;
    let len = bs.min(upto - start) as usize;
    buf.clear();
    buf.resize(len, 0);
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], start + done as u64) {
            // Shorter than when walked: the rest reads as zeros, as a sparse end would.
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(match stored {
        None => buf.iter().any(|&x| x != 0),
        Some(None) => true,
        Some(Some(h)) => blake3::hash(buf).as_bytes() != h,
    })
}

/// Blocks below the smaller size whose stored content differs between two block tables, and
/// every block from there to the larger size.
fn table_diff(ha: &Hashes, sa: u64, hb: &Hashes, sb: u64, g: Geometry) -> Vec<u64> {
    let bs = g.block_size;
    let zero_of = |len: u64| *blake3::hash(&vec![0u8; len as usize]).as_bytes();
    let zero_full = zero_of(bs);
    let (za, zb) = (zero_of(sa % bs), zero_of(sb % bs));
    let norm = |v: Option<&Option<[u8; 32]>>, last: bool, z: &[u8; 32]| match v {
        None => Some(None),
        Some(Some(h)) if *h == zero_full || (last && h == z) => Some(None),
        Some(Some(h)) => Some(Some(*h)),
        // Data with no usable hash: never equal to anything.
        Some(None) => None,
    };
    let (na, nb) = (g.blocks(sa), g.blocks(sb));
    let nmin = na.min(nb);
    let mut out = Vec::new();
    for blk in 0..na.max(nb) {
        if blk >= nmin {
            out.push(blk);
            continue;
        }
        let x = norm(ha.get(&blk), blk + 1 == na, &za);
        let y = norm(hb.get(&blk), blk + 1 == nb, &zb);
        if x.is_none() || x != y {
            out.push(blk);
        }
    }
    out
}

/// Changed `blocks` (sorted) as merged byte ranges, with the range between the two sizes.
fn extents(blocks: &[u64], bs: u64, sa: u64, sb: u64) -> Vec<Extent> {
    let (lo, hi) = (sa.min(sb), sa.max(sb));
    let mut ranges: Vec<(u64, u64)> = blocks
        .iter()
        .map(|b| (b * bs, ((b + 1) * bs).min(hi)))
        .filter(|(s, e)| s < e)
        .collect();
    if hi > lo {
        ranges.push((lo, hi));
    }
    ranges.sort();
    let mut out: Vec<Extent> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(x) if s <= x.offset + x.len => {
                x.len = x.len.max(e - x.offset);
            }
            _ => out.push(Extent {
                offset: s,
                len: e - s,
            }),
        }
    }
    out
}

/// A PATH argument as the entries spell paths: relative, no `./`, no trailing `/`.
fn clean_path(p: &str) -> String {
    let p = p.trim_start_matches("./").trim_end_matches('/');
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

/// Whether `path` is one of `paths` or under one (empty: everything).
fn selected(path: &str, paths: &[String]) -> bool {
    paths.is_empty()
        || paths.iter().any(|p| {
            p.is_empty()
                || path == p
                || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 4096,
        partition_size: 4096 * 4,
    };

    #[test]
    fn extents_merge_neighbours_and_count_the_tail() {
        let e = extents(&[0, 1, 3], 4096, 5 * 4096, 6 * 4096 + 10);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    len: 8192
                },
                Extent {
                    offset: 3 * 4096,
                    len: 4096
                },
                Extent {
                    offset: 5 * 4096,
                    len: 4096 + 10
                },
            ]
        );
        assert!(extents(&[], 4096, 10, 10).is_empty());
    }

    #[test]
    fn tables_differ_where_hashes_do_and_zeros_equal_absence() {
        let z = *blake3::hash(&[0u8; 4096]).as_bytes();
        let a: Hashes = [
            (0, Some([1; 32])),
            (1, Some([2; 32])),
            (2, Some(z)),
            (3, None),
        ]
        .into_iter()
        .collect();
        let b: Hashes = [(0, Some([1; 32])), (1, Some([9; 32])), (3, None)]
            .into_iter()
            .collect();
        // 0 same, 1 differs, 2 zeros both ways, 3 unusable, 4.. beyond the shorter.
        assert_eq!(table_diff(&a, 4 * 4096, &b, 6 * 4096, G), vec![1, 3, 4, 5]);
    }

    #[test]
    fn paths_select_themselves_and_what_is_under_them() {
        let p = vec!["vms".to_string()];
        assert!(selected("vms", &p) && selected("vms/a.img", &p));
        assert!(!selected("vms2/a.img", &p));
        assert!(selected("x", &[]));
        assert_eq!(clean_path("./vms/"), "vms");
    }

    #[test]
    fn a_reused_inode_is_not_a_rename() {
        let f = |path: &str, gen| FileView {
            path: path.into(),
            id: VolumeId { dev: 1, ino: 5 },
            gen: Some(gen),
            birth_ns: None,
            size: 0,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
        };
        let (pairs, _, _) = pair_files(&[f("a", 1)], &[f("b", 1)]);
        assert_eq!(pairs, vec![(0, 0)]);
        let (pairs, l, r) = pair_files(&[f("a", 1)], &[f("b", 2)]);
        assert!(pairs.is_empty() && l == vec![0] && r == vec![0]);
    }
}
