//! Deferred writes: while a capture runs, a plain write to a block the capture has not copied
//! yet is parked here instead of making the writer copy the block first. Copy-before-write
//! must read the old block, and that read waits for the disk: measured on the VM disks this
//! project runs on, a cold 64 KiB read takes 20 to 50 ms whenever a capture (or anything else)
//! keeps the disk busy, far over the 10 ms a writer may pause. A parked write costs the writer
//! a copy into memory and an append to a journal in the store's page cache, never a read.
//!
//! A parked write reaches the backing file once every block it covers is in the snapshot: the
//! capture copies those blocks first (they are queued as urgent), then applies the writes
//! parked on them, in the order they came for any blocks they share. Until then, anything that
//! reads or changes those bytes through the overlay (a read, a truncate, an fsync, a write that
//! cannot be parked) waits for them to land, so the mount always shows the writes as done.
//!
//! The journal (`<store>/deferred/<dev>-<ino>.log`) keeps parked writes across a killed
//! daemon: the kernel keeps its pages, and the next daemon replays (`recover.rs`) every record
//! not marked applied before it mounts, but only into the very file they were parked for and
//! only if nobody changed it since: the journal names the file by device, inode, generation and
//! birth time, and keeps the file's ctime after the daemon's own last change to it (noted after
//! every change the overlay makes while writes are parked). After a reboot the journal is
//! dropped: the writes in it were never fsynced (an fsync waits for them to land and syncs the
//! volume), so losing them is what any filesystem does to unsynced writes at a crash; replaying
//! them could instead undo later, fsynced writes to the same blocks.
//!
//! This module writes only bytes that a writer wrote, at the offsets it wrote them, and never
//! fails a write it accepted: an error applying one is kept for the volume's next fsync, as the
//! kernel does for a failed writeback.
//!
//! This file owns the in-memory queue and the landing; `deferred/journal.rs` owns the
//! journal's format, written and read.

pub mod journal;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use log::warn;

use crate::ids::VolumeId;
use crate::sys;
use crate::track::Volume;
use journal::{journal_name, mark_applied, write_ctime, JournalWriter};
pub use journal::{open_dir, Journal, JournalHeader, Record, DIR};

/// Bytes and writes parked per volume at most; past them writers copy before they write, as
/// without parking (a writer faster than the capture can copy the blocks it needs is slowed
/// to the capture's pace either way).
pub const MAX_PARKED_BYTES: u64 = 64 << 20;
pub const MAX_PARKED_WRITES: usize = 8192;
/// `apply_ready` looks this many waiting writes past the first one that cannot land: the
/// workers copy the blocks parked writes wait for in the order they came, so later ones
/// rarely can, and a full scan per copied block would cost the writers the lock.
const SCAN_PAST_WAITING: usize = 256;
/// Parked writes landed per batch (see `apply_ready`).
const LAND_BATCH: usize = 64;

/// One parked write.
struct Entry {
    offset: u64,
    data: Vec<u8>,
    first: u64,
    last: u64,
    /// Where its record starts in the journal.
    record_at: u64,
}

#[derive(Default)]
struct State {
    /// Created with the first parked write.
    journal: Option<JournalWriter>,
    /// In the order they came.
    entries: VecDeque<Entry>,
    /// Parked entries per block, counting those being landed until they are written.
    blocks: HashMap<u64, u32>,
    bytes: u64,
    /// No more parking: the capture is finishing.
    closed: bool,
}

/// What `park` did.
pub enum Parked {
    /// Parked; these blocks of it are still pending and must be copied first.
    Yes(Vec<u64>),
    /// Nothing of the range is pending or parked: write it now.
    NotNeeded,
    /// Cannot park (closed, full, unsupported, journal error): wait for the parked writes it
    /// overlaps, then copy before writing.
    No,
}

/// The parked writes of one volume during one capture.
pub struct Deferred {
    dir: OwnedFd,
    name: CString,
    header: Vec<u8>,
    /// A writable fd on the volume's inode.
    target: File,
    block_size: u64,
    state: Mutex<State>,
    /// Serialises noting the target's ctime in the journal (stat and write as one step, so the
    /// latest ctime is the one kept). Taken after `state`, never before.
    ctime_note: Mutex<()>,
    /// A record's applied mark could not be written: its bytes are in the file, but a replay
    /// would take it for unapplied and could write it over later writes. From then on the
    /// journal's ctime slot stays zero, so a replay keeps everything aside instead.
    unreplayable: AtomicBool,
    /// Held while a batch of parked writes lands: batches land one after another, so writes
    /// sharing blocks land in the order they came. Parking never takes it.
    applier: Mutex<()>,
    landed: Condvar,
    /// Entries parked and not applied (the read path's fast check).
    parked: AtomicUsize,
    /// Threads in `settle`: a capture worker landing writes for everyone steps aside for them
    /// after each batch (the `applier` mutex is not fair).
    settlers: AtomicUsize,
}

impl Deferred {
    /// Parking for volume `id` at `path`, writing through `target` (a writable fd on it).
    pub fn new(
        dir: OwnedFd,
        id: VolumeId,
        path: &str,
        target: File,
        block_size: u64,
    ) -> io::Result<Deferred> {
        let file = sys::file_identity(target.as_raw_fd())?;
        if (file.dev, file.ino) != (id.dev, id.ino) {
            return Err(io::Error::other(format!(
                "{path}: the file to park writes for is not volume {id}"
            )));
        }
        let header =
            serde_json::to_vec(&JournalHeader::new(file, path)).map_err(io::Error::other)?;
        Ok(Deferred {
            dir,
            name: CString::new(journal_name(id))
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            header,
            target,
            block_size,
            state: Mutex::new(State::default()),
            ctime_note: Mutex::new(()),
            unreplayable: AtomicBool::new(false),
            applier: Mutex::new(()),
            settlers: AtomicUsize::new(0),
            landed: Condvar::new(),
            parked: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anything is parked.
    pub fn any(&self) -> bool {
        self.parked.load(Ordering::Acquire) != 0
    }

    /// Park `data` for `offset` if any block under it is pending (`pending`) or has a parked
    /// write already (which it must follow).
    pub fn park(&self, offset: u64, data: &[u8], pending: &dyn Fn(u64) -> bool) -> Parked {
        let len = data.len() as u64;
        if len == 0 {
            return Parked::NotNeeded;
        }
        let first = offset / self.block_size;
        let last = (offset + len - 1) / self.block_size;
        if !self.any() && !(first..=last).any(pending) {
            return Parked::NotNeeded;
        }
        // Space for the bytes first, outside the lock (allocation can wait for the
        // filesystem's journal): a write into a hole that could not be allocated when it
        // lands would be a write accepted and then lost. Allocating changes no content.
        if self.has_hole(offset, len)
            && sys::fallocate(
                self.target.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_err()
        {
            return Parked::No;
        }
        let mut st = self.lock();
        let follows = !st.blocks.is_empty() && (first..=last).any(|b| st.blocks.contains_key(&b));
        let copy_first: Vec<u64> = (first..=last).filter(|&b| pending(b)).collect();
        if !follows && copy_first.is_empty() {
            return Parked::NotNeeded;
        }
        if st.closed
            || st.bytes + len > MAX_PARKED_BYTES
            || self.parked.load(Ordering::Acquire) >= MAX_PARKED_WRITES
        {
            return Parked::No;
        }
        let record_at = match self.append(&mut st, offset, data) {
            Ok(at) => at,
            Err(e) => {
                warn!("deferred writes: journal: {e}; copying before writing instead");
                return Parked::No;
            }
        };
        for b in first..=last {
            *st.blocks.entry(b).or_insert(0) += 1;
        }
        st.bytes += len;
        st.entries.push_back(Entry {
            offset,
            data: data.to_vec(),
            first,
            last,
            record_at,
        });
        self.parked.fetch_add(1, Ordering::Release);
        Parked::Yes(copy_first)
    }

    /// Whether `offset..offset+len` of the volume may hold a hole (SEEK_HOLE finds one
    /// before its end; an error counts as yes).
    fn has_hole(&self, offset: u64, len: u64) -> bool {
        sys::lseek(self.target.as_raw_fd(), offset as i64, libc::SEEK_HOLE)
            .map_or(true, |hole| (hole as u64) < offset + len)
    }

    /// Append a record to the journal (creating it first); returns where it starts.
    fn append(&self, st: &mut State, offset: u64, data: &[u8]) -> io::Result<u64> {
        let j = match st.journal.take() {
            Some(j) => j,
            None => JournalWriter::create(self.dir.as_raw_fd(), &self.name, &self.header)?,
        };
        let j = st.journal.insert(j);
        // The file's ctime (which the space allocated for a write into a hole may move) is
        // noted by the overlay's `touch` right after this write returns (`after_own_change`),
        // not here as well: a kill in between leaves an older ctime, which only sends a replay
        // to lost+found.
        j.append(offset, data)
    }

    /// Keep the target's ctime in the journal: a replay after a killed daemon writes only
    /// into a file whose ctime is still this one (nobody changed it since).
    fn note_ctime(&self, journal: &File) -> io::Result<()> {
        let _note = self.ctime_note.lock().unwrap_or_else(|p| p.into_inner());
        if self.unreplayable.load(Ordering::Acquire) {
            return write_ctime(journal, (0, 0));
        }
        write_ctime(
            journal,
            sys::ctime_of(&sys::fstat(self.target.as_raw_fd())?),
        )
    }

    /// The overlay just changed the volume (a write, truncate, chmod, xattr...): while writes
    /// are parked, note the file's new ctime, or a replay would take our change for someone
    /// else's and keep the parked writes aside instead of replaying them.
    pub fn after_own_change(&self) {
        if !self.any() {
            return;
        }
        let journal = self.lock().journal.as_ref().map(|j| j.file().clone());
        if let Some(j) = journal {
            if let Err(e) = self.note_ctime(&j) {
                warn!("deferred writes: noting the volume's ctime in the journal: {e}");
            }
        }
    }

    /// Apply every parked write that can land: none of its blocks still pending (unless
    /// `force`: the capture is over or failed) and no earlier parked write it overlaps still
    /// waiting. With `only`, just the writes on those blocks (the caller passes every block
    /// the writes it needs wait for); without, only up to `SCAN_PAST_WAITING` writes past the
    /// first waiting one are looked at, unless `force`. `volume` notes the writes as the
    /// overlay's own; an error goes to it for the next fsync. Returns how many landed.
    ///
    /// Writes land in batches of at most `LAND_BATCH`, written with the state unlocked: a
    /// writer parking, or settling a range of its own, never waits for thousands of landings.
    /// Landed writes stay counted in `blocks` until written, so nobody takes them for done.
    pub fn apply_ready(
        &self,
        volume: &Volume,
        pending: &dyn Fn(u64) -> bool,
        force: bool,
        only: Option<&BTreeSet<u64>>,
    ) -> usize {
        let mut landed = 0;
        if only.is_some_and(|o| o.is_empty()) {
            return 0;
        }
        loop {
            if !self.any() {
                return landed;
            }
            let _applier = self.applier.lock().unwrap_or_else(|p| p.into_inner());
            let (batch, journal) = {
                let mut st = self.lock();
                let batch = Self::take_ready(&mut st, pending, force, only);
                (batch, st.journal.as_ref().map(|j| j.file().clone()))
            };
            if batch.is_empty() {
                return landed;
            }
            let last_batch = batch.len() < LAND_BATCH;
            for e in &batch {
                let res = volume.own_change(|| self.target.write_all_at(&e.data, e.offset));
                if let Err(err) = res {
                    warn!(
                        "deferred write of {} bytes at {} failed: {err}; the next fsync reports it",
                        e.data.len(),
                        e.offset
                    );
                    volume.note_write_error(&err);
                }
                if let Some(j) = &journal {
                    // The ctime first, then the mark. Killed between the write and the note,
                    // a replay finds a ctime it does not know and keeps every unapplied write
                    // aside; between the note and the mark, it writes these same bytes again,
                    // which nothing can have changed in between (later writes overlapping
                    // them were parked behind this one).
                    let _ = self.note_ctime(j);
                    // Marked applied: a replay after a killed daemon must not write it again
                    // over later writes to the same bytes.
                    if let Err(err) = mark_applied(j, e.record_at) {
                        warn!(
                            "deferred writes: marking a landed write applied in the journal: {err}; after a crash its writes go to lost+found, never replayed"
                        );
                        self.unreplayable.store(true, Ordering::Release);
                        let _ = self.note_ctime(j);
                    }
                }
            }
            landed += batch.len();
            {
                let mut st = self.lock();
                for e in &batch {
                    for b in e.first..=e.last {
                        if let Some(n) = st.blocks.get_mut(&b) {
                            *n -= 1;
                            if *n == 0 {
                                st.blocks.remove(&b);
                            }
                        }
                    }
                    st.bytes -= e.data.len() as u64;
                }
                self.parked.fetch_sub(batch.len(), Ordering::Release);
                if st.blocks.is_empty() {
                    // Nothing parked: the journal starts over (see `start_new_epoch`).
                    if let Some(j) = st.journal.as_mut() {
                        j.start_new_epoch();
                    }
                }
            }
            self.landed.notify_all();
            if only.is_some() && last_batch {
                // Nothing wanted was left (what parks meanwhile, the settle asks for again).
                return landed;
            }
            if only.is_none() && !force && self.settlers.load(Ordering::Acquire) > 0 {
                return landed;
            }
            // Otherwise again until nothing is ready: a write parked behind this batch (it
            // shared a block being landed) has no block of its own queued for the workers,
            // so nobody else would come back for it.
        }
    }

    /// Take out of the queue, in order, up to `LAND_BATCH` writes that can land (see
    /// `apply_ready`).
    fn take_ready(
        st: &mut State,
        pending: &dyn Fn(u64) -> bool,
        force: bool,
        only: Option<&BTreeSet<u64>>,
    ) -> Vec<Entry> {
        let mut batch = Vec::new();
        // Blocks of earlier entries still waiting: a later entry on them must wait too.
        let mut waiting: HashSet<u64> = HashSet::new();
        let mut i = 0;
        let mut skipped = 0;
        let scan_all = force || only.is_some();
        while i < st.entries.len()
            && batch.len() < LAND_BATCH
            && (scan_all || skipped < SCAN_PAST_WAITING)
        {
            let e = &st.entries[i];
            let (first, last) = (e.first, e.last);
            if let Some(o) = only {
                if o.range(first..=last).next().is_none() {
                    // Not wanted, and no write taken here shares a block with it (each lies
                    // wholly within `only`).
                    i += 1;
                    continue;
                }
                if (first..=last).any(|b| !o.contains(&b)) {
                    // Partly wanted: parked after the wanted ones were chosen. A later write
                    // it shares a block with must not pass it.
                    waiting.extend(first..=last);
                    i += 1;
                    continue;
                }
            }
            let blocked = (first..=last).any(|b| waiting.contains(&b))
                || (!force && (first..=last).any(pending));
            if blocked {
                waiting.extend(first..=last);
                i += 1;
                skipped += 1;
                continue;
            }
            match st.entries.remove(i) {
                Some(e) => batch.push(e),
                None => break,
            }
        }
        batch
    }

    /// Whether a parked write, queued or landing, overlaps `offset..offset+len` (len 0: any).
    fn overlaps(st: &State, block_size: u64, offset: u64, len: u64) -> bool {
        if st.blocks.is_empty() {
            return false;
        }
        if len == 0 {
            return true;
        }
        let first = offset / block_size;
        let last = (offset.saturating_add(len) - 1) / block_size;
        if last - first < st.blocks.len() as u64 {
            (first..=last).any(|b| st.blocks.contains_key(&b))
        } else {
            st.blocks.keys().any(|&b| first <= b && b <= last)
        }
    }

    /// Wait until no parked write overlaps `offset..offset+len` (len 0: the whole volume),
    /// applying what can land meanwhile (`force` as for `apply_ready`, asked again each round).
    /// The caller does not wait for the workers to reach those writes: it copies the blocks
    /// they wait for itself (`save`, copy-before-write), as a writer without parking would.
    pub fn settle(
        &self,
        volume: &Volume,
        offset: u64,
        len: u64,
        pending: &dyn Fn(u64) -> bool,
        save: &dyn Fn(u64),
        force: &dyn Fn() -> bool,
    ) {
        if !self.any() {
            return;
        }
        let (first, last) = if len == 0 {
            (0, u64::MAX)
        } else {
            (
                offset / self.block_size,
                (offset.saturating_add(len) - 1) / self.block_size,
            )
        };
        loop {
            // The parked writes on the range, and the earlier ones each of them waits for
            // (asked again each round: writes parked meanwhile on the range count too).
            let needed: BTreeSet<u64> = {
                let st = self.lock();
                if !Self::overlaps(&st, self.block_size, offset, len) {
                    return;
                }
                let mut needed = BTreeSet::new();
                for e in st.entries.iter().rev() {
                    let on_range = e.first <= last && first <= e.last;
                    if on_range || needed.range(e.first..=e.last).next().is_some() {
                        needed.extend(e.first..=e.last);
                    }
                }
                needed
            };
            for &b in &needed {
                if pending(b) {
                    save(b);
                }
            }
            self.settlers.fetch_add(1, Ordering::AcqRel);
            self.apply_ready(volume, pending, force(), Some(&needed));
            self.settlers.fetch_sub(1, Ordering::AcqRel);
            let st = self.lock();
            if !Self::overlaps(&st, self.block_size, offset, len) {
                return;
            }
            // What is left is landing in another thread's batch, which notifies; the timeout
            // only bounds a missed wake-up (the capture ending or failing meanwhile).
            let _ = self
                .landed
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stop parking and apply everything parked (the capture is over, or given up): then
    /// remove the journal.
    pub fn finish(&self, volume: &Volume) {
        self.lock().closed = true;
        self.apply_ready(volume, &|_| false, true, None);
        let _ = sys::unlinkat(self.dir.as_raw_fd(), &self.name, 0);
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use BTreeSet;

    /// A queue of parked writes, oldest first, each given by its first and last block.
    fn queue(spans: &[(u64, u64)]) -> State {
        let mut st = State::default();
        for (i, &(first, last)) in spans.iter().enumerate() {
            st.entries.push_back(Entry {
                offset: first * 4096,
                data: vec![i as u8; 1],
                first,
                last,
                record_at: 0,
            });
            for b in first..=last {
                *st.blocks.entry(b).or_insert(0) += 1;
            }
        }
        st
    }

    fn spans(batch: &[Entry]) -> Vec<(u64, u64)> {
        batch.iter().map(|e| (e.first, e.last)).collect()
    }

    /// Found by review: a settle wanting block 10 took the newest write (on 11 and 12) while
    /// an older one on 12 still waited for block 13, so the older bytes would have landed
    /// last. A write only partly within the wanted blocks must wait.
    #[test]
    fn a_settle_never_lands_a_write_before_an_older_one_on_a_shared_block() {
        // Oldest first: Ek on 12-13 (13 still pending), Ej on 10-11, Ei on 11-12.
        let mut st = queue(&[(12, 13), (10, 11), (11, 12)]);
        let only: BTreeSet<u64> = [10, 11].into();
        let batch = Deferred::take_ready(&mut st, &|b| b == 13, false, Some(&only));
        assert_eq!(spans(&batch), vec![(10, 11)], "only Ej may land now");
        assert_eq!(
            st.entries
                .iter()
                .map(|e| (e.first, e.last))
                .collect::<Vec<_>>(),
            vec![(12, 13), (11, 12)],
            "Ek and Ei stay, in order"
        );
    }

    #[test]
    fn writes_land_in_order_and_wait_behind_an_older_write_on_their_blocks() {
        // Block 5 is still pending: the write on 5-6 waits, and so does the later one on 6.
        let mut st = queue(&[(1, 1), (5, 6), (6, 6), (8, 8)]);
        let batch = Deferred::take_ready(&mut st, &|b| b == 5, false, None);
        assert_eq!(spans(&batch), vec![(1, 1), (8, 8)]);
        // With `force` (the capture is over) everything lands, oldest first.
        let batch = Deferred::take_ready(&mut st, &|b| b == 5, true, None);
        assert_eq!(spans(&batch), vec![(5, 6), (6, 6)]);
    }

    #[test]
    fn a_batch_holds_at_most_land_batch_writes() {
        let spans_in: Vec<(u64, u64)> = (0..(LAND_BATCH as u64 + 10)).map(|b| (b, b)).collect();
        let mut st = queue(&spans_in);
        let batch = Deferred::take_ready(&mut st, &|_| false, false, None);
        assert_eq!(batch.len(), LAND_BATCH);
        assert_eq!(st.entries.len(), 10);
    }
}
