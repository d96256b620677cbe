//! The capture slot of a volume: where the snapshot engine attaches its copy-before-write
//! capture (`BeforeChange`) while a snapshot of the volume runs, and the calls the write path
//! makes through it (copy before a change, take a write over, settle taken-over writes).
//!
//! It owns the slot, the process-wide count of attached captures (the read path's fast check)
//! and the error of a taken-over write kept for the next fsync. It must never let a change
//! reach the backing file past an attached capture, nor fail a change itself: a capture that
//! cannot copy gives up its snapshot instead.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::Volume;

/// What must see a volume's content before it changes: the snapshot engine's copy-before-write
/// capture (DESIGN.md "Write path" step 2). Called inside the volume's write gate, before the
/// change reaches the backing file. It must not fail the change: a capture that cannot copy
/// gives up its snapshot instead.
pub trait BeforeChange: Send + Sync {
    /// `offset..offset+len` (len > 0) of the volume is about to change.
    fn before_change(&self, offset: u64, len: u64);

    /// A plain write of `data` at `offset` is about to happen: take it over if it would have
    /// to wait for copy-before-write. Ok(true): taken; the caller must not write it, the
    /// capture writes it once the blocks under it are saved. Err: the write must fail (no
    /// space for it).
    fn defer_write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<bool> {
        Ok(false)
    }

    /// Wait until every write taken over that overlaps `offset..offset+len` (len 0: the whole
    /// volume) is in the backing file.
    fn settle(&self, _offset: u64, _len: u64) {}

    /// The overlay just changed the volume's file (content or metadata; its ctime moved).
    /// Never called from inside another of these methods.
    fn after_own_change(&self) {}
}

/// Captures attached to any volume of this process: the read path's fast check.
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Whether any volume has a capture attached.
pub fn any_capture() -> bool {
    ATTACHED.load(Ordering::Acquire) != 0
}

/// The capture slot of a volume: empty on the write path's fast path.
#[derive(Default)]
pub(super) struct CaptureSlot {
    attached: AtomicBool,
    capture: RwLock<Option<Arc<dyn BeforeChange>>>,
}

impl std::fmt::Debug for CaptureSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureSlot")
            .field("attached", &self.attached.load(Ordering::Relaxed))
            .finish()
    }
}

impl Volume {
    /// Attach (Some) or detach (None) a snapshot capture. Attach only with the gate closed, so
    /// that no write in flight has passed the copy-before-write check without it.
    pub fn set_capture(&self, capture: Option<Arc<dyn BeforeChange>>) {
        let mut slot = self
            .capture
            .capture
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let was = self
            .capture
            .attached
            .swap(capture.is_some(), Ordering::AcqRel);
        match (was, capture.is_some()) {
            (false, true) => {
                ATTACHED.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                ATTACHED.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        *slot = capture;
    }

    /// Run `f` on the attached capture, if any, holding the slot: once `set_capture(None)`
    /// returns, no thread is still inside the capture (the engine then takes its store
    /// writer back), whether it came through the gate (writers) or not (readers).
    pub(super) fn with_capture<R>(&self, f: impl FnOnce(&dyn BeforeChange) -> R) -> Option<R> {
        if !self.capture.attached.load(Ordering::Acquire) {
            return None;
        }
        let slot = self
            .capture
            .capture
            .read()
            .unwrap_or_else(|p| p.into_inner());
        slot.as_deref().map(f)
    }

    /// Let an attached capture take over a plain write (see `BeforeChange::defer_write`).
    /// Call inside the gate, after the write intent.
    pub fn defer_write(&self, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        if data.is_empty() {
            return Ok(false);
        }
        self.with_capture(|c| c.defer_write(offset, data))
            .unwrap_or(Ok(false))
    }

    /// Wait until writes a capture took over for `offset..offset+len` (len 0: all) are in the
    /// backing file: call before reading or changing those bytes by other means.
    pub fn settle(&self, offset: u64, len: u64) {
        self.with_capture(|c| c.settle(offset, len));
    }

    /// Copy-before-write: let an attached capture save `offset..offset+len` before it changes.
    /// Call inside the gate.
    pub fn before_change(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.with_capture(|c| c.before_change(offset, len));
    }

    /// Keep the error of a write that failed after it returned, for the next fsync.
    pub fn note_write_error(&self, e: &std::io::Error) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let _ = self
            .write_error
            .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The error of a write that failed after it returned (once), as fsync reports it.
    pub fn take_write_error(&self) -> Option<std::io::Error> {
        match self.write_error.swap(0, Ordering::AcqRel) {
            0 => None,
            e => Some(std::io::Error::from_raw_os_error(e)),
        }
    }
}
