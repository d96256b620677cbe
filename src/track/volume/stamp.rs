//! The file stamp of a volume and the outside-change check: what the daemon last saw of the
//! backing file (inode, size, mtime, ctime), and the rule that tells a stamp our own changes
//! moved from one someone else moved behind the overlay's back.
//!
//! It owns `FileStamp`, the stamp's refresh and adoption, and the note every change through
//! the overlay leaves (`touch`, `own_change`). It must never take an unexplained move for one
//! of ours: a stamp that moved after our last own change marks the volume unknown as a whole.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::Volume;
use crate::sys::realtime_ns;

/// What the daemon last saw of the backing file, to notice changes made behind its back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of a file as `fstat` saw it.
    pub fn of(st: &libc::stat) -> FileStamp {
        FileStamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        }
    }
}

impl Volume {
    /// Run `write`, a change to the backing file made for the overlay outside the write path
    /// (a write a capture took over), so the stamp check takes it as ours: no stamp check can
    /// run between the change and the note.
    pub fn own_change<T>(&self, write: impl FnOnce() -> T) -> T {
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        let r = write();
        // Not `note_own_change`: the capture that made this change notes it itself, and it
        // may be running inside the capture slot's lock already.
        self.written_since_tick.store(true, Ordering::Relaxed);
        self.last_own_change_ns
            .fetch_max(realtime_ns(), Ordering::Relaxed);
        r
    }

    /// Take the stamp of a freshly opened file if none is recorded yet, so that a change
    /// behind our back is noticed from the first tick on.
    pub fn first_stamp(&self, st: &libc::stat) {
        let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *stamp == FileStamp::default() {
            *stamp = FileStamp::of(st);
        }
    }

    /// Refresh size and stamp from the backing file; returns the new stamp, or None if there
    /// is no fd attached or the stat failed.
    pub fn refresh_stamp(&self) -> Option<FileStamp> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let fd = fd.as_ref()?;
        let st = crate::sys::fstat(fd.as_raw_fd()).ok()?;
        let stamp = FileStamp::of(&st);
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        self.size.store(stamp.size, Ordering::Relaxed);
        Some(stamp)
    }

    /// Adopt the file as it is now (after recovery has accounted for any difference).
    pub fn adopt_stamp(&self, stamp: FileStamp) {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        let old = self.size.swap(stamp.size, Ordering::Relaxed);
        if stamp.size < old {
            self.low_water.fetch_min(stamp.size, Ordering::Relaxed);
        }
    }

    /// The stamp recorded last.
    pub fn stamp(&self) -> FileStamp {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note a change made through the overlay, right after it reached the backing file, so the
    /// stamp it moved is not taken for a change behind our back. Every change needs it, whether
    /// or not it marks blocks: a keep-size fallocate, a punch hole past the end, chmod or an
    /// xattr move the ctime without changing a byte. The `record_*` calls do not note on
    /// their own; the overlay notes once per change, after recording it (one clock read and
    /// one atomic max on the write path, as before).
    pub fn touch(&self) {
        self.note_own_change();
    }

    /// Note a change made through the overlay, right after it: the file's ctime can be no later
    /// than now, so a ctime after this moment at the next stamp check is someone else's.
    fn note_own_change(&self) {
        self.written_since_tick.store(true, Ordering::Relaxed);
        self.last_own_change_ns
            .fetch_max(realtime_ns(), Ordering::Relaxed);
        self.with_capture(|c| c.after_own_change());
    }

    /// Call inside the gate before a change through the overlay. The first such change since
    /// the last stamp check looks at the file first: a stamp that moved in between was moved
    /// by someone else, and the volume becomes unknown (so that change is not hidden by ours).
    /// Later changes in the same interval cost nothing. Returns true if it marked the volume.
    pub fn check_stamp_before_change(&self) -> bool {
        // A plain load first: the write path must not bounce a cache line between writers.
        if self.written_since_tick.load(Ordering::Acquire) {
            return false;
        }
        // Writers that arrive while the first one checks wait for it: a write of theirs
        // before the check ends would look like a change behind our back.
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        if self.written_since_tick.load(Ordering::Acquire) {
            return false;
        }
        let moved = self.restamp(false);
        self.written_since_tick.store(true, Ordering::Release);
        moved
    }

    /// Refresh the stamp with the gate held (no write in flight); if nothing went through the
    /// overlay since the last check and the stamp moved anyway, someone changed the backing
    /// file directly: mark the volume unknown and return true.
    pub fn check_stamp(&self) -> bool {
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        // A write a capture took over lands outside the gate, under this lock (`own_change`).
        let _check = self.stamp_check.lock().unwrap_or_else(|p| p.into_inner());
        let touched = self.written_since_tick.swap(false, Ordering::Relaxed);
        self.restamp(touched)
    }

    /// Refresh the stamp; if it moved in a way our own changes do not explain (`touched`: the
    /// overlay changed the file since the last check), mark the volume unknown and return true.
    /// Our own changes explain a moved stamp only up to the ctime of the last of them: a later
    /// ctime is a change behind our back made after it (within one tick of the clock, a change
    /// right after ours can still hide behind it).
    fn restamp(&self, touched: bool) -> bool {
        let before = self.stamp();
        let own_until = self.last_own_change_ns.load(Ordering::Relaxed) as i128;
        match self.refresh_stamp() {
            Some(now)
                if before != FileStamp::default()
                    && now != before
                    && (!touched || now.ctime_ns > own_until) =>
            {
                self.mark_unknown_all();
                true
            }
            _ => false,
        }
    }
}
