//! The write gate: the design's write path in one place. Every change of a tracked volume's
//! content runs inside its gate (`tracked`, `tracked_or_deferred`: write intent made durable,
//! copy-before-write for a capture, the change, the change map), every metadata change inside
//! the gates of the volumes it touches (`metadata_change`), and every opened file gets its
//! volume here (`volume_of`, `register_file`).
//!
//! It must stay allocation-free and lock-light on the write path (one shared gate entry per
//! write), and never decide what a change is: callers pass its range and how to record it.

use super::*;

impl OverlayFs {
    /// The tracked volume of a regular file (created on first use); None with tracking off.
    /// `fresh`: the file was just created through the overlay.
    pub(super) fn volume_of(&self, inode: &Inode, fresh: bool) -> Option<Arc<Volume>> {
        let t = self.tracker.as_ref()?;
        if inode.kind != FileKind::Regular {
            return None;
        }
        let st = sys::fstat(inode.raw_fd()).ok()?;
        let v = t.volume(volume_id(inode.key), st.st_size as u64, fresh);
        v.attach_fd(|| inode.fd.try_clone().ok());
        v.first_stamp(&st);
        Some(v)
    }

    /// Run `change`, which alters content from `offset` for `len` bytes (0: size only), inside
    /// the volume's write gate with its write intent made durable first; `record` then notes
    /// the change in the volume's change map. Without a volume, just run `change`.
    ///
    /// `range` gives (offset, len) and runs inside the gate, so sizes it reads cannot move
    /// under it. `record` gets the result, or None when the change failed: a change that failed
    /// part way (a short write then ENOSPC) may still have changed part of the range, so the
    /// caller marks the whole range then.
    pub(super) fn tracked<T>(
        &self,
        volume: Option<&Arc<Volume>>,
        range: impl FnOnce() -> FsResult<(u64, u64)>,
        change: impl FnOnce() -> FsResult<T>,
        record: impl FnOnce(&Volume, Option<&T>, u64, u64),
    ) -> FsResult<T> {
        self.tracked_or_deferred(volume, range, |_| Ok(None), change, record)
    }

    /// `tracked`, where `defer` may hand the change to a capture in progress instead of making
    /// it copy the old content first (a plain write: see `snapshot::deferred`); Some(result)
    /// when it did, and `change` is then not run.
    pub(super) fn tracked_or_deferred<T>(
        &self,
        volume: Option<&Arc<Volume>>,
        range: impl FnOnce() -> FsResult<(u64, u64)>,
        defer: impl FnOnce(&Volume) -> FsResult<Option<T>>,
        change: impl FnOnce() -> FsResult<T>,
        record: impl FnOnce(&Volume, Option<&T>, u64, u64),
    ) -> FsResult<T> {
        let (Some(v), Some(t)) = (volume, self.tracker.as_ref()) else {
            return change();
        };
        let _gate = v.enter();
        v.check_stamp_before_change();
        let (offset, len) = range()?;
        // If the intent cannot be made durable (store full), the change is refused: a crash
        // after it would otherwise lose track of it.
        t.before_change(v, offset, len)
            .map_err(FsError::backing("write intent"))?;
        let r = match defer(v)? {
            Some(done) => Ok(done),
            None => {
                // A snapshot being captured gets the old content first.
                v.before_change(offset, len);
                change()
            }
        };
        record(v, r.as_ref().ok(), offset, len);
        // Whatever the change was and whether it failed, the backing file's ctime may have
        // moved: note it as ours, or the next stamp check takes it for a change behind our
        // back. Here, not in `record`, so that no kind of change (a keep-size fallocate
        // records no block) can forget it.
        v.touch();
        r
    }

    /// The tracked volume of an open file, also for handles that cannot write, while a capture
    /// runs (None otherwise): what reads it must wait for writes parked on it.
    pub(super) fn parked_on(&self, h: &FileHandle) -> Option<Arc<Volume>> {
        if !crate::track::any_capture() {
            return None;
        }
        h.volume.clone().or_else(|| self.tracked_volume(&h.inode))
    }

    /// The tracked volume of `inode`, if it has one (never creates it).
    pub(super) fn tracked_volume(&self, inode: &Inode) -> Option<Arc<Volume>> {
        self.tracker.as_ref()?.get(volume_id(inode.key))
    }

    /// What a change of the name `name` in `dir` (unlink, rename) needs to know of the inode it
    /// names now, from one fstatat: its key (for `metadata_change`) and, if its last link is
    /// about to go, its volume id (for `drop_volume`). Nothing without tracking: no stat then.
    pub(super) fn name_target(
        &self,
        dir: &Inode,
        name: &CString,
    ) -> (Option<BackingKey>, Option<VolumeId>) {
        if self.tracker.is_none() {
            return (None, None);
        }
        match sys::fstatat(dir.raw_fd(), name) {
            Ok(st) => {
                let key = BackingKey::of(&st);
                let last = st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1;
                (Some(key), last.then(|| volume_id(key)))
            }
            Err(_) => (None, None),
        }
    }

    /// Run a metadata change (chmod, utimens, link, rename, xattrs: no content change, but the
    /// file's ctime or mtime moves) inside the write gates of the tracked volumes among `keys`,
    /// and note it on them, so the stamp check never takes it for a change behind our back.
    pub(super) fn metadata_change<T>(
        &self,
        keys: &[BackingKey],
        op: impl FnOnce() -> FsResult<T>,
    ) -> FsResult<T> {
        let Some(t) = &self.tracker else {
            return op();
        };
        let mut vols: Vec<Arc<Volume>> = keys.iter().filter_map(|k| t.get(volume_id(*k))).collect();
        // One gate entry per volume: a second shared entry by the same thread could wait
        // behind a queued exclusive one.
        vols.sort_by_key(|v| v.id);
        vols.dedup_by_key(|v| v.id);
        let gates: Vec<_> = vols.iter().map(|v| v.enter()).collect();
        for v in &vols {
            v.check_stamp_before_change();
        }
        let r = op();
        for v in &vols {
            v.touch();
        }
        drop(gates);
        r
    }

    /// Stop tracking a volume whose last link went, unless a concurrent link() gave it a new
    /// one (checked on the inode itself when the volume holds an fd on it).
    pub(super) fn drop_volume(&self, id: Option<VolumeId>) {
        if let (Some(t), Some(id)) = (&self.tracker, id) {
            let still_linked = t.get(id).and_then(|v| v.nlink()).is_some_and(|n| n > 0);
            if !still_linked {
                t.forget_volume(id);
            }
        }
    }

    pub(super) fn register_file(
        &self,
        file: File,
        inode: Arc<Inode>,
        volume: Option<Arc<Volume>>,
    ) -> FsResult<Opened> {
        let st = sys::fstat(file.as_raw_fd()).map_err(FsError::backing("open"))?;
        let stamp = ContentStamp::of(&st);
        let keep_cache = {
            let mut last = inode.stamp.lock().unwrap_or_else(|p| p.into_inner());
            let same = *last == Some(stamp);
            *last = Some(stamp);
            same
        };
        let fh = self.new_fh();
        self.files.insert(
            fh,
            FileHandle {
                file,
                inode,
                volume,
                last_end: AtomicU64::new(0),
            },
        );
        Ok(Opened { fh, keep_cache })
    }
}

pub(super) fn volume_id(key: BackingKey) -> VolumeId {
    VolumeId {
        dev: key.dev,
        ino: key.ino,
    }
}
