//! Reading a volume of a snapshot out into a file, as `grainfs restore` does: the chain is
//! resolved once into the blocks that hold data (`reader::resolve`), their packs are opened,
//! and each block is read from its pack, checked against its blake3, and put at its offset in
//! the destination by `copy_file_range` from the pack (a reflink where the filesystem shares
//! extents), or written from the bytes just checked where the kernel cannot copy. Blocks without
//! data, and stored blocks that are all zeros, are left as holes.
//!
//! It never writes to the store and never opens or names a destination itself: the caller
//! hands it an open file and decides where that file goes. A damaged block is
//! `StoreError::Damaged` (naming the volume and block) before any of its bytes reach the
//! destination.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::{IoContext, Result, StoreError};
use super::format::Manifest;
use super::reader::{self, Opened};
use super::Store;
use crate::ids::{SnapshotName, VolumeId};

/// One block of the volume that holds data, and where its bytes are.
#[derive(Clone, Copy, Debug)]
struct Extent {
    block: u64,
    /// Bytes of the volume the block covers (less than `stored_len` when a snapshot on the way
    /// cut the volume inside it).
    len: u32,
    /// Bytes stored, which the blake3 covers.
    stored_len: u32,
    offset: u64,
    /// Index into `VolumeExtents::packs`.
    pack: u32,
    /// The snapshot of the chain that stores it (index into `levels`).
    level: u32,
    /// None: not hashed yet (a reflinked block; copied out unverified).
    hash: Option<[u8; 32]>,
}

/// What placing one block did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Bytes put by `copy_file_range` (shared extents where the filesystem reflinks).
    pub copied: u64,
    /// Bytes written from memory (the kernel could not copy from the pack).
    pub written: u64,
    /// Bytes of a stored block that were all zeros, left as a hole.
    pub zeros: u64,
}

impl std::ops::AddAssign for Placed {
    fn add_assign(&mut self, o: Placed) {
        self.copied += o.copied;
        self.written += o.written;
        self.zeros += o.zeros;
    }
}

/// A volume of a snapshot resolved for copying out, with its packs open: a snapshot deleted
/// (or a child rewritten by a delete) after this was made still reads as it was, since the
/// open packs stay readable.
pub struct VolumeExtents {
    snapshot: String,
    path: String,
    size: u64,
    block_size: u64,
    levels: Vec<SnapshotName>,
    blocks: Vec<Extent>,
    packs: Vec<Opened>,
    /// Cleared at the first `copy_file_range` that fails (another filesystem, a medium that
    /// is no file): the rest is written from memory without trying again.
    copy_works: AtomicBool,
}

impl std::fmt::Debug for VolumeExtents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeExtents")
            .field("snapshot", &self.snapshot)
            .field("path", &self.path)
            .field("size", &self.size)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl Store {
    /// Resolve volume `id` of the snapshot whose manifest `m` the caller loaded, for copying
    /// it out block by block (`VolumeExtents::place`).
    pub fn volume_extents(&self, m: &Manifest, id: VolumeId) -> Result<VolumeExtents> {
        let name = m.checked_name()?;
        let res = reader::resolve(&**self.backend(), &name, m.clone(), id)?;
        let (packs, which) = reader::open_packs(&**self.backend(), &res)?;
        let blocks = res
            .blocks
            .iter()
            .zip(&which)
            .map(|(b, &w)| Extent {
                block: b.block,
                len: b.len,
                stored_len: b.rec.len,
                offset: b.rec.offset,
                pack: w,
                level: b.level as u32,
                hash: (!b.unhashed).then_some(b.rec.hash),
            })
            .collect();
        Ok(VolumeExtents {
            snapshot: name.to_string(),
            path: res.path,
            size: res.size,
            block_size: res.block_size,
            levels: res.levels.into_iter().map(|l| l.name).collect(),
            blocks,
            packs,
            copy_works: AtomicBool::new(true),
        })
    }
}

impl Store {
    /// Bytes of volume `id` of the snapshot with manifest `m` that blocks with data cover,
    /// through its chain (block tables only: no pack is opened).
    pub fn volume_data_bytes(&self, m: &Manifest, id: VolumeId) -> Result<u64> {
        let name = m.checked_name()?;
        let res = reader::resolve(&**self.backend(), &name, m.clone(), id)?;
        Ok(res.blocks.iter().map(|b| b.len as u64).sum())
    }
}

impl VolumeExtents {
    /// The volume's path in the snapshot.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The volume's size in the snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many blocks with data have no blake3 yet (reflinked at capture, not hashed since):
    /// `place` copies them unverified.
    pub fn unhashed_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.hash.is_none()).count()
    }

    /// How many blocks hold data (`place` takes 0 to this, exclusive).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of the volume that blocks with data cover (the rest reads as zeros).
    pub fn data_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len as u64).sum()
    }

    /// Bytes of the volume block `i` covers.
    pub fn block_len(&self, i: usize) -> u64 {
        self.blocks[i].len as u64
    }

    /// Put block `i` into `dst` at its offset in the volume: read it from its pack into `buf`,
    /// check its blake3 (a block not yet hashed is copied unverified), then copy the same
    /// range from the pack with `copy_file_range` (or write the checked bytes). An all-zero block is not put at all: `dst` keeps a hole
    /// there. `dst` is named `dst_name` in errors.
    pub fn place(
        &self,
        i: usize,
        dst: &File,
        dst_name: &std::path::Path,
        buf: &mut Vec<u8>,
    ) -> Result<Placed> {
        let b = self.blocks[i];
        let (pack, pack_path) = &self.packs[b.pack as usize];
        buf.resize(b.stored_len as usize, 0);
        pack.read_exact_at(buf, b.offset).at(pack_path)?;
        if b.hash.is_some_and(|h| blake3::hash(buf).as_bytes() != &h) {
            return Err(self.damaged(&b, pack_path.clone()));
        }
        let at = b.block * self.block_size;
        let len = b.len as u64;
        if super::writer::is_zero(&buf[..len as usize]) {
            return Ok(Placed {
                zeros: len,
                ..Placed::default()
            });
        }
        if self.copy_works.load(Ordering::Relaxed) {
            if let Some(src) = pack.as_file() {
                if super::local::copy_range(src, b.offset, dst, at, len) {
                    return Ok(Placed {
                        copied: len,
                        ..Placed::default()
                    });
                }
            }
            self.copy_works.store(false, Ordering::Relaxed);
        }
        // Over whatever part a failed copy put there: these are the bytes just checked.
        dst.write_all_at(&buf[..len as usize], at).at(dst_name)?;
        Ok(Placed {
            written: len,
            ..Placed::default()
        })
    }

    fn damaged(&self, b: &Extent, path: PathBuf) -> StoreError {
        StoreError::Damaged {
            snapshot: self.snapshot.clone(),
            volume: self.path.clone(),
            block: b.block,
            stored_in: self.levels[b.level as usize].to_string(),
            path,
        }
    }
}
