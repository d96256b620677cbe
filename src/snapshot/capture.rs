//! Copy-before-write capture of one volume (DESIGN.md "Snapshot protocol" step 3): the blocks
//! a snapshot needs, registered at the barrier, copied into the store either by the capture
//! workers or by a writer that is about to change one of them, whichever comes first, and
//! exactly once, always with the content the block had at the barrier.
//!
//! A block's pending bit is only ever cleared under its stripe lock, after its content is in
//! the store (or the snapshot has failed): a writer that finds the bit set copies the block
//! itself; one that finds it clear, or waits for the stripe while a worker copies it, then
//! changes content that is already saved. This module reads the backing file and writes the
//! store; it never changes a live volume and never fails a user's write: an error marks the
//! whole group snapshot failed, and the engine aborts it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::deferred::{Deferred, Parked};
use crate::ids::{BlockIdx, Geometry};
use crate::store::{SnapshotWriter, VolumeHandle};
use crate::track::{BeforeChange, Volume};

/// Stripe locks per volume: enough that a writer and a worker rarely meet on one.
const STRIPES: usize = 64;
/// Bytes of a volume one reflink takes at most (see `Capture::clone_partition`).
const CLONE_CHUNK: u64 = 16 << 20;

/// What the capture does with a pending block of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAction {
    /// INCREMENTAL: store the block (it is dirty).
    Store,
    /// FULL: store the block unless it is a hole (all-zero blocks cost nothing either way).
    Full,
    /// Rescan: store the block only if it differs from the parent's.
    Rescan,
}

/// The first failure of a group snapshot, shared by its captures.
#[derive(Debug, Default)]
pub struct Failure {
    failed: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Failure {
    /// Record a failure (the first one is kept).
    pub fn fail(&self, why: String) {
        let mut w = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            *w = Some(why);
        }
        self.failed.store(true, Ordering::Release);
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why the snapshot failed, if it did.
    pub fn why(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A fixed-size atomic bitmap of the blocks still to copy.
struct PendingBits {
    words: Vec<AtomicU64>,
    left: AtomicU64,
}

impl PendingBits {
    fn from_words(words: Vec<u64>) -> PendingBits {
        let left = words.iter().map(|w| w.count_ones() as u64).sum();
        PendingBits {
            words: words.into_iter().map(AtomicU64::new).collect(),
            left: AtomicU64::new(left),
        }
    }

    fn is_set(&self, b: u64) -> bool {
        self.words
            .get((b / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    fn clear(&self, b: u64) {
        if let Some(w) = self.words.get((b / 64) as usize) {
            if w.fetch_and(!(1 << (b % 64)), Ordering::AcqRel) & (1 << (b % 64)) != 0 {
                self.left.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a capture did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Blocks saved by writers just before they changed them.
    pub by_writers: u64,
    /// Blocks saved by the capture workers.
    pub by_workers: u64,
    /// Blocks of rescanned partitions found equal to the parent's (not stored).
    pub unchanged: u64,
    /// Blocks skipped as holes.
    pub holes: u64,
    /// Writes parked until their blocks were saved, instead of making the writer copy them.
    pub deferred_writes: u64,
    /// Blocks of FULL partitions stored by reflink (FICLONERANGE), none of their bytes read or
    /// copied (also counted in `by_workers`).
    pub cloned: u64,
}

/// The capture of one volume of a snapshot being taken.
pub struct Capture {
    /// The volume's path at the barrier (for messages).
    pub path: String,
    source: File,
    size: u64,
    geometry: Geometry,
    pending: PendingBits,
    actions: Vec<BlockAction>,
    /// For rescanned partitions: the parent's block hashes (absent: zeros there).
    parent_hashes: HashMap<u64, Option<[u8; 32]>>,
    writer: Arc<SnapshotWriter>,
    handle: VolumeHandle,
    failure: Arc<Failure>,
    stripes: Vec<Mutex<()>>,
    /// The live volume (writes taken over land through it, as the overlay's own).
    volume: Arc<Volume>,
    /// Writes taken over (None: this volume copies before every write).
    deferred: Option<Deferred>,
    /// Blocks that parked writes wait for: the workers copy these first.
    urgent: Mutex<VecDeque<u64>>,
    urgent_n: AtomicUsize,
    deferred_writes: AtomicU64,
    by_writers: AtomicU64,
    by_workers: AtomicU64,
    unchanged: AtomicU64,
    holes: AtomicU64,
    cloned: AtomicU64,
}

/// Everything a capture needs, gathered at the barrier.
pub struct CaptureSpec {
    pub path: String,
    /// Read-only fd on the volume's backing inode (keeps an unlinked file readable).
    pub source: File,
    /// Size at the barrier.
    pub size: u64,
    pub geometry: Geometry,
    /// Blocks to copy, one bit per block.
    pub pending: Vec<u64>,
    /// Per partition.
    pub actions: Vec<BlockAction>,
    pub parent_hashes: HashMap<u64, Option<[u8; 32]>>,
    pub writer: Arc<SnapshotWriter>,
    pub handle: VolumeHandle,
    pub failure: Arc<Failure>,
    pub volume: Arc<Volume>,
    pub deferred: Option<Deferred>,
}

thread_local! {
    static BLOCK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Capture {
    pub fn new(s: CaptureSpec) -> Capture {
        // No readahead on the capture's own fd: pages the kernel reads ahead for a worker (in
        // the idle I/O class) stay locked until that slow read completes, and a writer needing
        // one of them would wait behind it. Blocks are read whole anyway.
        // SAFETY: fadvise on an fd we own; failure only keeps readahead.
        unsafe { libc::posix_fadvise(s.source.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Capture {
            path: s.path,
            source: s.source,
            size: s.size,
            geometry: s.geometry,
            pending: PendingBits::from_words(s.pending),
            actions: s.actions,
            parent_hashes: s.parent_hashes,
            writer: s.writer,
            handle: s.handle,
            failure: s.failure,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            volume: s.volume,
            deferred: s.deferred,
            urgent: Mutex::new(VecDeque::new()),
            urgent_n: AtomicUsize::new(0),
            deferred_writes: AtomicU64::new(0),
            by_writers: AtomicU64::new(0),
            by_workers: AtomicU64::new(0),
            unchanged: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            cloned: AtomicU64::new(0),
        }
    }

    /// Blocks still to copy.
    pub fn left(&self) -> u64 {
        self.pending.left.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            by_writers: self.by_writers.load(Ordering::Relaxed),
            by_workers: self.by_workers.load(Ordering::Relaxed),
            unchanged: self.unchanged.load(Ordering::Relaxed),
            holes: self.holes.load(Ordering::Relaxed),
            deferred_writes: self.deferred_writes.load(Ordering::Relaxed),
            cloned: self.cloned.load(Ordering::Relaxed),
        }
    }

    /// The whole blocks of FULL partition `p` a clone can take, as `first..end`: the span from
    /// its first to its last pending block (a partial last block of the volume is copied).
    fn clone_span(&self, p: u64) -> Option<(u64, u64)> {
        if self.actions.get(p as usize) != Some(&BlockAction::Full) {
            return None;
        }
        let bpp = self.geometry.blocks_per_partition();
        let first = p * bpp;
        let end = (first + bpp).min(self.size / self.geometry.block_size);
        let lo = (first..end).find(|&b| self.pending.is_set(b))?;
        let hi = (lo..end).rev().find(|&b| self.pending.is_set(b))? + 1;
        Some((lo, hi))
    }

    /// FULL partitions whose pending blocks a clone could take, while the store can clone.
    pub fn clone_tasks(&self) -> Vec<u64> {
        if !self.writer.cloning() {
            return Vec::new();
        }
        (0..self.actions.len() as u64)
            .filter(|&p| self.clone_span(p).is_some())
            .collect()
    }

    /// Store FULL partition `p`'s pending blocks by reflink: one FICLONERANGE per chunk of
    /// their span (`CLONE_CHUNK`) into a pack, then each block of the chunk still pending is
    /// recorded from the clone (its blake3 is computed after the commit) and stops being
    /// pending. A clone is one instant of the file (the filesystem locks the volume against writes for its duration). A block still
    /// pending after it was written by nobody since the barrier (a writer saves a pending
    /// block before it writes, and only then clears its bit): the clone holds its content at
    /// the barrier. A block a writer saved first keeps that copy, and the clone's bytes there
    /// are ignored. Where the filesystem cannot clone (ext4, XFS without reflink, the store
    /// on another filesystem) nothing happens, and the blocks are copied as before.
    pub fn clone_partition(&self, p: u64) {
        if self.failure.failed() || !self.writer.cloning() {
            return;
        }
        let Some((lo, hi)) = self.clone_span(p) else {
            return;
        };
        let bs = self.geometry.block_size;
        // One clone per chunk, not per partition: the filesystem holds the volume's lock
        // against writers for the whole call, which grows with the extents in the range
        // (measured on XFS: a 2 GiB clone took 8-12 ms for a file in 3 extents, 1.2-1.3 s for
        // one in 150,000; 64 MiB of the latter 50-67 ms).
        let chunk = (CLONE_CHUNK / bs).max(1);
        let mut at = lo;
        while at < hi && !self.failure.failed() && self.writer.cloning() {
            let end = (at + chunk).min(hi);
            self.clone_chunk(at, end);
            at = end;
        }
    }

    /// `clone_partition` for blocks `lo..hi`.
    fn clone_chunk(&self, lo: u64, hi: u64) {
        let bs = self.geometry.block_size;
        // The clone writes the range's dirty pages back first, with the volume locked against
        // writers: write them back now, unlocked, so that the locked part is short. The engine
        // makes them durable before the commit anyway.
        // SAFETY: sync_file_range on an fd we own; a failure only leaves the work to the clone.
        unsafe {
            libc::sync_file_range(
                self.source.as_raw_fd(),
                (lo * bs) as i64,
                ((hi - lo) * bs) as i64,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
        let range = match self
            .writer
            .clone_blocks(self.handle, BlockIdx(lo), hi - lo, &self.source)
        {
            Ok(Some(r)) => r,
            Ok(None) => {
                log::debug!(
                    "{}: no reflink into the store: blocks are copied",
                    self.path
                );
                return;
            }
            Err(e) => {
                self.failure
                    .fail(format!("cloning {} blocks {lo}..{hi}: {e}", self.path));
                return;
            }
        };
        let mut taken = Vec::with_capacity((hi - lo) as usize);
        for b in lo..hi {
            if !self.pending.is_set(b) {
                continue;
            }
            let _stripe = self.stripes[(b as usize) % STRIPES]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Under the stripe lock no writer is saving it: still pending means unwritten.
            if self.pending.is_set(b) {
                taken.push(b);
                self.pending.clear(b);
            }
        }
        if let Err(e) = self.writer.put_cloned(self.handle, &range, &taken) {
            self.failure
                .fail(format!("storing {} blocks {lo}..{hi}: {e}", self.path));
        }
        self.cloned.fetch_add(taken.len() as u64, Ordering::Relaxed);
        self.by_workers
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        self.land_parked();
    }

    /// Copy the blocks parked writes wait for, then let those writes land.
    pub fn serve_urgent(&self) {
        if self.urgent_n.load(Ordering::Acquire) == 0 {
            return;
        }
        loop {
            let next = {
                let mut u = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
                let b = u.pop_front();
                self.urgent_n.store(u.len(), Ordering::Release);
                b
            };
            let Some(b) = next else { break };
            if self.save(b) {
                self.by_workers.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.land_parked();
    }

    /// Apply the parked writes whose blocks are saved.
    fn land_parked(&self) {
        if let Some(d) = &self.deferred {
            d.apply_ready(
                &self.volume,
                &|b| self.pending.is_set(b),
                self.failure.failed(),
                None,
            );
        }
    }

    /// The capture is over (done, failed or abandoned): no more parking, and every parked
    /// write lands now. Call before detaching the capture from its volume.
    pub fn finish(&self) {
        if let Some(d) = &self.deferred {
            d.finish(&self.volume);
        }
    }

    fn blocks(&self) -> u64 {
        self.geometry.blocks(self.size)
    }

    /// Save block `b` if it is still pending. Returns whether this call saved it.
    fn save(&self, b: u64) -> bool {
        if !self.pending.is_set(b) {
            return false;
        }
        let _stripe = self.stripes[(b as usize) % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.pending.is_set(b) {
            return false;
        }
        if !self.failure.failed() {
            if let Err(why) = self.copy(b) {
                self.failure.fail(why);
            }
        }
        // Cleared even on failure: the snapshot is dead, nobody must wait for this block.
        self.pending.clear(b);
        true
    }

    /// `save`, by a writer that needs the block out of the way (counted as the writers').
    fn save_for_writer(&self, b: u64) -> bool {
        let saved = self.save(b);
        if saved {
            self.by_writers.fetch_add(1, Ordering::Relaxed);
        }
        saved
    }

    /// Copy block `b` as it is in the backing file now (the caller guarantees: as at the
    /// barrier) into the store.
    fn copy(&self, b: u64) -> Result<(), String> {
        let bs = self.geometry.block_size;
        let start = b * bs;
        let len = bs.min(self.size - start) as usize;
        let action = self.actions[(b / self.geometry.blocks_per_partition()) as usize];
        if action == BlockAction::Full && self.is_hole(start, len as u64) {
            self.holes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        BLOCK_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            buf.resize(len, 0);
            let mut done = 0;
            while done < len {
                match self.source.read_at(&mut buf[done..], start + done as u64) {
                    // Shorter than at the barrier: only a change behind the overlay's back
                    // can do that; what is missing reads as zeros, as a sparse end would.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading {} block {b}: {e}", self.path)),
                }
            }
            if action == BlockAction::Rescan && self.same_as_parent(b, &buf) {
                self.unchanged.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The pack takes the bytes straight from the volume (a reflink where the filesystem
            // can); `buf` gives their hash. Both see the content at the barrier: the block is
            // still pending, under its stripe lock.
            let res = if done == len {
                self.writer
                    .put_block_from(self.handle, BlockIdx(b), &buf, &self.source, start)
            } else {
                self.writer.put_block(self.handle, BlockIdx(b), &buf)
            };
            res.map_err(|e| format!("storing {} block {b}: {e}", self.path))
        })
    }

    /// Whether `start..start+len` holds no data (SEEK_DATA finds none before its end).
    fn is_hole(&self, start: u64, len: u64) -> bool {
        // SAFETY: lseek on an fd we own.
        let r = unsafe { libc::lseek(self.source.as_raw_fd(), start as i64, libc::SEEK_DATA) };
        if r == -1 {
            // ENXIO: no data from here to the end of the file.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        r as u64 >= start + len
    }

    fn same_as_parent(&self, b: u64, data: &[u8]) -> bool {
        let zero = data.iter().all(|&x| x == 0);
        match self.parent_hashes.get(&b) {
            None => zero,
            Some(None) => false,
            Some(Some(h)) => !zero && blake3::hash(data).as_bytes() == h,
        }
    }

    /// Save every pending block of word `w` (64 blocks): the workers' unit of work.
    pub fn save_word(&self, w: usize) {
        let Some(word) = self.pending.words.get(w) else {
            return;
        };
        let mut bits = word.load(Ordering::Acquire);
        while bits != 0 && !self.failure.failed() {
            self.serve_urgent();
            let i = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            if self.save(w as u64 * 64 + i) {
                self.by_workers.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Indexes of the words with pending blocks.
    pub fn busy_words(&self) -> Vec<usize> {
        self.pending
            .words
            .iter()
            .enumerate()
            .filter(|(_, w)| w.load(Ordering::Relaxed) != 0)
            .map(|(i, _)| i)
            .collect()
    }
}

impl BeforeChange for Capture {
    fn before_change(&self, offset: u64, len: u64) {
        // Writes parked on these bytes come first: this change is later than they are.
        self.settle(offset, len);
        if self.pending.left.load(Ordering::Relaxed) == 0 || self.failure.failed() {
            return;
        }
        let bs = self.geometry.block_size;
        let nblocks = self.blocks();
        let first = offset / bs;
        let last = ((offset.saturating_add(len) - 1) / bs).min(nblocks.saturating_sub(1));
        if first >= nblocks {
            return;
        }
        let mut saved = false;
        for b in first..=last {
            saved |= self.save_for_writer(b);
        }
        if saved {
            self.land_parked();
        }
    }

    fn after_own_change(&self) {
        if let Some(d) = &self.deferred {
            d.after_own_change();
        }
    }

    fn defer_write(&self, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        let Some(d) = &self.deferred else {
            return Ok(false);
        };
        if (self.pending.left.load(Ordering::Relaxed) == 0 && !d.any()) || self.failure.failed() {
            return Ok(false);
        }
        // A write that grows the file is not parked: until it landed, the file's size would
        // not show it.
        if offset.saturating_add(data.len() as u64) > self.volume.size() {
            return Ok(false);
        }
        match d.park(offset, data, &|b| self.pending.is_set(b)) {
            Parked::Yes(copy_first) => {
                self.deferred_writes.fetch_add(1, Ordering::Relaxed);
                if !copy_first.is_empty() {
                    let mut u = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
                    // First in, first out: each parked write waits for the ones before it
                    // (on shared blocks), so they land in the order they came.
                    u.extend(copy_first.iter());
                    self.urgent_n.store(u.len(), Ordering::Release);
                }
                Ok(true)
            }
            Parked::NotNeeded | Parked::No => Ok(false),
        }
    }

    fn settle(&self, offset: u64, len: u64) {
        if let Some(d) = &self.deferred {
            d.settle(
                &self.volume,
                offset,
                len,
                &|b| self.pending.is_set(b),
                &|b| {
                    self.save_for_writer(b);
                },
                &|| self.failure.failed(),
            );
        }
    }
}

/// Put in the blake3 of blocks that captures stored by reflink (`Store::hash_all`), in a
/// thread of its own at background priority: the snapshot is committed and readable
/// meanwhile, its reflinked blocks read unverified until then. A failure is logged; the
/// next call (the next commit that cloned, or the next start of the daemon) tries again.
pub fn hash_in_background(store: &crate::store::Store) {
    let store = store.clone();
    let spawned = std::thread::Builder::new()
        .name("grainfs-hash".into())
        .spawn(move || {
            background_io();
            if let Err(e) = store.hash_all() {
                log::warn!("hashing the blocks stored by reflink: {e} (tried again later)");
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the thread that hashes reflinked blocks: {e}");
    }
}

/// Store what reflinks can take before any block is copied (`Capture::clone_partition`): one
/// clone per FULL partition, no data read. These threads keep their normal priorities: a
/// clone holds the volume's lock against writers, so it must not wait behind other I/O.
fn clone_first(captures: &[Arc<Capture>], workers: usize, failure: &Failure) {
    let work: Vec<(usize, u64)> = captures
        .iter()
        .enumerate()
        .flat_map(|(c, cap)| cap.clone_tasks().into_iter().map(move |p| (c, p)))
        .collect();
    if work.is_empty() {
        return;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(work.len()) {
            s.spawn(|| loop {
                // No `serve_urgent` here: copying the blocks parked writes wait for would let
                // a busy writer starve the clones (measured: an unpaced 4 KiB writer kept a
                // 2 GiB volume's clones waiting 6 to 11 s). Each clone lands the parked writes
                // it releases, and all of them take well under a second.
                if failure.failed() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(c, p)) = work.get(i) else {
                    return;
                };
                captures[c].clone_partition(p);
            });
        }
    });
}

/// Make this capture worker thread yield to writers: off the first CPU, at the lowest CPU
/// priority, and with its I/O in the idle class. The I/O class: a writer's copy-before-write, which the user's
/// write waits for, must not queue behind the workers' reads of whole volumes (measured: cold
/// FULL captures stalled 4 KiB writers for 250 ms without it). The kernel's I/O schedulers
/// with priorities (mq-deadline, bfq) serve idle requests when nothing else waits, and age
/// them so a busy volume delays the capture without starving it.
fn background_io() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    thread_local! { static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    // SAFETY: ioprio_set on the calling thread (who = 0); failure only means no priority.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
    // Off the first CPU the daemon may use, which stays for the FUSE threads that serve the
    // writers. On a kernel without full preemption (PREEMPT_NONE, common on VMs) a worker
    // inside a long kernel call (an in-kernel copy, page cache writeback) keeps its CPU even
    // from a writer's woken FUSE thread: measured on 2 CPUs, a 4 KiB writer at 1,000 writes/s
    // saw 10 to 21 ms stalls during every FULL capture; with the workers kept off one CPU, at
    // most 4.2 ms over four captures, and the captures took no longer.
    // SAFETY: CPU sets of the calling thread, a zeroed set filled by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) == 0 && libc::CPU_COUNT(&set) > 1 {
            if let Some(first) = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set))
            {
                libc::CPU_CLR(first, &mut set);
                libc::sched_setaffinity(0, size, &set);
            }
        }
    }
    // The lowest CPU priority too: workers hash and copy whole volumes, and on a small
    // machine they would otherwise take the CPU from the FUSE threads that serve writers
    // (measured on 2 CPUs: writers paused 13 ms behind them). On Linux the nice value of
    // PRIO_PROCESS with a thread id is that thread's.
    // SAFETY: setpriority on the calling thread's id; failure only keeps the priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Run `workers` threads that copy every pending block of `captures` until none is left or
/// the snapshot failed.
pub fn run_workers(captures: &[Arc<Capture>], workers: usize, failure: &Failure) {
    clone_first(captures, workers, failure);
    let work: Vec<(usize, usize)> = captures
        .iter()
        .enumerate()
        .flat_map(|(c, cap)| cap.busy_words().into_iter().map(move |w| (c, w)))
        .collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                background_io();
                if failure.failed() {
                    return;
                }
                for cap in captures {
                    cap.serve_urgent();
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(c, w)) = work.get(i) else {
                    return;
                };
                captures[c].save_word(w);
                captures[c].writer.pace();
            });
        }
    });
}
