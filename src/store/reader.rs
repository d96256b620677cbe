//! Reading a volume of a snapshot: the chain of INCREMENTAL partitions is resolved once, when
//! the volume is opened, into an index block -> (pack, offset, len); every read then costs an
//! index lookup and a `pread` (or an lru cache hit), whatever the chain depth. A block read
//! from a pack is checked against its blake3 the first time (and again after its pack file
//! changed): a damaged block is an error, never wrong bytes. Resolution is also what `verify`
//! walks to prove every byte. Nothing here writes to the store.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info};
use lru::LruCache;

use super::backend::{Backend, PackRead};
use super::error::{IoContext, Result, StoreError};
use super::format::{
    check_pack_header, decode_table, load_manifest_from, Manifest, PartitionKind, Record, MANIFEST,
    PACK_HEADER_LEN,
};
use super::verified::{PackKey, Stamp, VerifiedExtents};
use crate::ids::{SnapshotName, VolumeId};

/// Longest chain followed before calling it a cycle (policy.max_chain is far below).
const MAX_LEVELS: usize = 4096;
/// Bytes of hot blocks an open volume keeps in its lru cache.
const CACHE_BYTES: u64 = 16 << 20;

/// One snapshot visited by a resolution (level 0 is the one being read).
pub(crate) struct Level {
    pub name: SnapshotName,
    pub manifest: Manifest,
}

/// Where block data of the volume comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    pub block: u64,
    pub level: usize,
    pub rec: Record,
    /// Bytes of `rec` inside the volume (smaller than `rec.len` when a snapshot on the way cut
    /// the volume inside this block).
    pub len: u32,
    /// The record has no blake3 yet (a reflinked block the store has not hashed since the
    /// commit): its bytes cannot be proven.
    pub unhashed: bool,
}

/// A volume of a snapshot with its chain resolved.
pub(crate) struct Resolution {
    pub levels: Vec<Level>,
    pub path: String,
    pub size: u64,
    pub block_size: u64,
    /// Blocks with data, sorted; every other block reads as zeros.
    pub blocks: Vec<Resolved>,
}

/// Resolve volume `id` of snapshot `m0` (already loaded from the store as `name0`).
pub(crate) fn resolve(
    store: &dyn Backend,
    name0: &SnapshotName,
    m0: Manifest,
    id: VolumeId,
) -> Result<Resolution> {
    let name0 = name0.clone();
    let chain_err = |why: String| StoreError::Chain {
        snapshot: name0.to_string(),
        why,
    };
    let v0 = m0.volume(id).ok_or_else(|| StoreError::NoVolume {
        snapshot: name0.to_string(),
        volume: id,
    })?;
    let g = m0.geometry;
    let (bs, bpp) = (g.block_size, g.blocks_per_partition());
    let nblocks = g.blocks(v0.size);
    let nparts = v0.partitions.len();
    let (path, size) = (v0.path.clone(), v0.size);
    let mut levels = vec![Level {
        name: name0.clone(),
        manifest: m0,
    }];
    let mut continuing: Vec<bool> = vec![true; nparts];
    let mut decided: HashSet<u64> = HashSet::new();
    let mut out = Vec::new();
    let mut limit = size;
    loop {
        let k = levels.len() - 1;
        let level = &levels[k];
        let m = &level.manifest;
        let v = m.volume(id).ok_or_else(|| {
            chain_err(format!(
                "{path}: ancestor {:?} has no volume {id}",
                level.name
            ))
        })?;
        if m.geometry != g {
            return Err(chain_err(format!(
                "ancestor {:?} has geometry {:?}, not {g:?}",
                level.name, m.geometry
            )));
        }
        if v.partitions.len() as u64 != g.partitions(v.size)
            || v.partitions
                .iter()
                .enumerate()
                .any(|(i, p)| p.index != i as u64)
        {
            return Err(StoreError::Corrupt {
                path: store.path_of(&level.name, MANIFEST),
                why: format!("{}: partition list does not cover the volume", v.path),
            });
        }
        limit = limit.min(v.size);
        // Partitions past this snapshot's end hold zeros here: resolution of them stops.
        for (p, c) in continuing.iter_mut().enumerate() {
            if p >= v.partitions.len() {
                *c = false;
            }
        }
        if let Some(t) = &v.table {
            let path = store.path_of(&level.name, &t.file);
            let records = decode_table(&store.read(&level.name, &t.file)?, &path, t)?;
            for r in records {
                if r.block >= nblocks || !continuing[(r.block / bpp) as usize] {
                    continue;
                }
                if !r.is_zero() && (r.pack as usize >= m.packs.len() || r.len as u64 > bs) {
                    return Err(StoreError::Corrupt {
                        path: store.path_of(&level.name, &t.file),
                        why: format!("block {} points outside the snapshot's packs", r.block),
                    });
                }
                if !decided.insert(r.block) {
                    continue;
                }
                let start = r.block * bs;
                if r.is_zero() || start >= limit {
                    continue;
                }
                out.push(Resolved {
                    block: r.block,
                    level: k,
                    rec: r,
                    len: (r.len as u64).min(limit - start) as u32,
                    unhashed: v.is_unhashed(r.block),
                });
            }
        }
        let mut any = false;
        for (p, c) in continuing.iter_mut().enumerate() {
            if *c && v.partitions[p].kind == PartitionKind::Full {
                *c = false;
            }
            any |= *c;
        }
        if !any {
            break;
        }
        let Some(parent) = m.parent.clone() else {
            return Err(chain_err(format!(
                "{path}: {:?} has INCREMENTAL partitions but no parent",
                level.name
            )));
        };
        if levels.len() >= MAX_LEVELS || levels.iter().any(|l| l.name == parent) {
            return Err(chain_err(format!("the chain loops at {parent:?}")));
        }
        let parent = SnapshotName::parse(&parent).map_err(|e| chain_err(e.to_string()))?;
        if !store.exists(&parent)? {
            return Err(chain_err(format!(
                "ancestor {parent:?} of {:?} is missing",
                level.name
            )));
        }
        let manifest = load_manifest_from(store, &parent)?;
        levels.push(Level {
            name: parent,
            manifest,
        });
    }
    out.sort_by_key(|r| r.block);
    Ok(Resolution {
        levels,
        path,
        size,
        block_size: bs,
        blocks: out,
    })
}

/// An open pack and its name in messages.
pub(crate) type Opened = (Arc<dyn PackRead>, PathBuf);

/// Open every pack `res` uses, checking headers; returns the packs and, per resolved block,
/// the index of its pack.
pub(crate) fn open_packs(store: &dyn Backend, res: &Resolution) -> Result<(Vec<Opened>, Vec<u32>)> {
    let mut ids: HashMap<(usize, u32), u32> = HashMap::new();
    let mut files = Vec::new();
    let mut which = Vec::with_capacity(res.blocks.len());
    for b in &res.blocks {
        let key = (b.level, b.rec.pack);
        let i = match ids.get(&key) {
            Some(i) => *i,
            None => {
                let level = &res.levels[b.level];
                let file = &level.manifest.packs[b.rec.pack as usize].file;
                let path = store.path_of(&level.name, file);
                let f = store.open_pack(&level.name, file)?;
                let mut h = [0u8; PACK_HEADER_LEN as usize];
                f.read_exact_at(&mut h, 0).at(&path)?;
                check_pack_header(&path, &h)?;
                files.push((f, path));
                let i = files.len() as u32 - 1;
                ids.insert(key, i);
                i
            }
        };
        which.push(i);
    }
    Ok((files, which))
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    block: u64,
    offset: u64,
    pack: u32,
    /// Bytes the volume reads from the extent.
    len: u32,
    /// Bytes of the stored extent, which its blake3 covers (more than `len` when a snapshot on
    /// the way cut the volume inside this block).
    stored_len: u32,
    /// The level (snapshot of the chain) that stores the extent.
    level: u32,
    /// None: not hashed yet (read unverified).
    hash: Option<[u8; 32]>,
}

/// A pack file open for reading, with its identity for `VerifiedExtents`.
struct OpenPack {
    file: Arc<dyn PackRead>,
    path: PathBuf,
    key: PackKey,
    /// The stamp the last read saw (at first, the one at open).
    seen: Mutex<Stamp>,
}

/// Counters of one open volume (for tests and `status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Block reads from pack files.
    pub preads: u64,
    /// Block reads served from the lru cache.
    pub cache_hits: u64,
    /// Blocks hashed and compared with their blake3 (the rest were proven before).
    pub hashed: u64,
}

/// A volume of a snapshot opened for reading; `read_at` is safe from several threads. Every
/// block read from a pack is proven against its blake3 once (see `VerifiedExtents`); a block
/// that fails is an error (`StoreError::Damaged`), logged once per open volume.
pub struct VolumeReader {
    path: String,
    size: u64,
    block_size: u64,
    /// Names of the snapshots of the chain, level 0 the one read.
    levels: Vec<SnapshotName>,
    index: Vec<Loc>,
    packs: Vec<OpenPack>,
    verified: Arc<VerifiedExtents>,
    cache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Damaged blocks already logged.
    reported: Mutex<HashSet<u64>>,
    preads: AtomicU64,
    hits: AtomicU64,
    hashed: AtomicU64,
}

impl std::fmt::Debug for VolumeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeReader")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("depth", &self.levels.len())
            .field("blocks", &self.index.len())
            .finish()
    }
}

impl VolumeReader {
    pub(crate) fn open(
        store: &dyn Backend,
        name: &SnapshotName,
        m: Manifest,
        id: VolumeId,
        verified: Arc<VerifiedExtents>,
    ) -> Result<VolumeReader> {
        let res = resolve(store, name, m, id)?;
        let (files, which) = open_packs(store, &res)?;
        let index = res
            .blocks
            .iter()
            .zip(&which)
            .map(|(b, &w)| Loc {
                block: b.block,
                offset: b.rec.offset,
                pack: w,
                len: b.len,
                stored_len: b.rec.len,
                level: b.level as u32,
                hash: (!b.unhashed).then_some(b.rec.hash),
            })
            .collect::<Vec<Loc>>();
        let unhashed = index.iter().filter(|l| l.hash.is_none()).count();
        if unhashed > 0 {
            // Said once per open: these bytes are read as the clone holds them, unproven,
            // until the store has hashed them (`Store::hash_snapshot`, run after the commit).
            info!(
                "snapshot {name}: {} has {unhashed} block(s) not yet hashed (reflinked at \
                 capture): read unverified until the store hashes them",
                res.path
            );
        }
        let packs = files
            .into_iter()
            .map(|(file, path)| {
                let (key, stamp) = file.stamp().at(&path)?;
                Ok(OpenPack {
                    file,
                    path,
                    key,
                    seen: Mutex::new(stamp),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cap = (CACHE_BYTES / res.block_size).max(8) as usize;
        Ok(VolumeReader {
            path: res.path,
            size: res.size,
            block_size: res.block_size,
            levels: res.levels.into_iter().map(|l| l.name).collect(),
            index,
            packs,
            verified,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN),
            )),
            reported: Mutex::new(HashSet::new()),
            preads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
        })
    }

    /// The volume's size in this snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The volume's path in this snapshot.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Snapshots the resolution visited (1 when every partition is FULL).
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Bytes of block data the volume reads from packs (the rest is zeros).
    pub fn data_bytes(&self) -> u64 {
        self.index.iter().map(|l| l.len as u64).sum()
    }

    /// lseek SEEK_DATA: the first offset at or after `offset` inside a block with data (None:
    /// only zeros from there to the end). Blocks are the unit: a block with data counts whole.
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let block = offset / self.block_size;
        let i = self.index.partition_point(|l| l.block < block);
        let loc = self.index.get(i)?;
        let at = (loc.block * self.block_size).max(offset);
        (at < self.size).then_some(at)
    }

    /// lseek SEEK_HOLE: the first offset at or after `offset` in a block without data, or the
    /// size (the end of a file counts as a hole); None at or past the end.
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let mut block = offset / self.block_size;
        let mut i = self.index.partition_point(|l| l.block < block);
        while self.index.get(i).is_some_and(|l| l.block == block) {
            block += 1;
            i += 1;
        }
        Some((block * self.block_size).max(offset).min(self.size))
    }

    /// Read counters.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            preads: self.preads.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            hashed: self.hashed.load(Ordering::Relaxed),
        }
    }

    fn block(&self, loc: &Loc) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&loc.block)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b.clone());
        }
        let pack = &self.packs[loc.pack as usize];
        // A proof holds only while the pack stays as it was from before the proven read to
        // after this one, so the stamp is taken after each read. A new proof is kept only if
        // the stamp after the read equals one seen before it (the previous read's, or the one
        // at open): a change racing the read proves nothing. One stat per read from a pack.
        let proven = self.verified.proven_under(pack.key, loc.offset);
        let before = *pack.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut data = vec![0u8; loc.stored_len as usize];
        pack.file
            .read_exact_at(&mut data, loc.offset)
            .at(&pack.path)?;
        self.preads.fetch_add(1, Ordering::Relaxed);
        let after = pack.file.stamp().at(&pack.path)?.1;
        *pack.seen.lock().unwrap_or_else(|p| p.into_inner()) = after;
        let trusted = loc.hash.is_none()
            || match proven {
                Some(stamp) if stamp == after => true,
                Some(stamp) => {
                    self.verified.forget(pack.key, stamp);
                    false
                }
                None => false,
            };
        if !trusted {
            self.hashed.fetch_add(1, Ordering::Relaxed);
            if Some(*blake3::hash(&data).as_bytes()) != loc.hash {
                return Err(self.damaged(loc));
            }
            if before == after {
                self.verified.prove(pack.key, after, loc.offset);
            }
        }
        data.truncate(loc.len as usize);
        let data = Arc::new(data);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(loc.block, data.clone());
        Ok(data)
    }

    /// The error for a block that failed its blake3, logged the first time.
    fn damaged(&self, loc: &Loc) -> StoreError {
        let err = StoreError::Damaged {
            snapshot: self.levels[0].to_string(),
            volume: self.path.clone(),
            block: loc.block,
            stored_in: self.levels[loc.level as usize].to_string(),
            path: self.packs[loc.pack as usize].path.clone(),
        };
        if self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(loc.block)
        {
            error!("{err}");
        }
        err
    }

    /// Read up to `buf.len()` bytes at `offset`; returns the count (0 at or past the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let bs = self.block_size;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let take = ((bs as usize) - within).min(n - done);
            let dst = &mut buf[done..done + take];
            match self.index.binary_search_by_key(&block, |l| l.block) {
                Err(_) => dst.fill(0),
                Ok(i) => {
                    let data = self.block(&self.index[i])?;
                    let have = data.len().saturating_sub(within).min(take);
                    if have > 0 {
                        dst[..have].copy_from_slice(&data[within..within + have]);
                    }
                    dst[have..].fill(0);
                }
            }
            done += take;
        }
        Ok(n)
    }
}
