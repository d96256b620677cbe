//! The local-directory store: each snapshot is a directory of files under `<store>/snapshots`
//! (layout in the `store` module doc). Builds go to `.tmp-<name>/` (flock'ed while they live)
//! and are renamed into place (no replace) after the manifest was written durably; deletions
//! rename to `.del-<name>/` first. Packs take volume blocks by `copy_file_range`, a reflink
//! where the filesystem can. It never reads or writes outside its snapshots dir, and never
//! changes a committed snapshot's files.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, info, warn};

use super::backend::{
    Backend, BlockSource, PackKey, PackRead, PackWrite, StageMode, Staging, Stamp,
};
use super::error::{IoContext, Result, StoreError};
use super::format::MANIFEST;
use crate::ids::SnapshotName;
use crate::sys::{fsync_dir, write_durably};

/// Snapshots in a directory.
#[derive(Debug)]
pub struct LocalDir {
    snapshots: PathBuf,
}

/// Try to take the exclusive flock of a directory (None if held or not openable).
fn lock_dir(dir: &Path) -> Option<File> {
    let f = File::open(dir).ok()?;
    flock(&f, libc::LOCK_EX | libc::LOCK_NB).ok().map(|()| f)
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl LocalDir {
    /// Open (creating if needed) `<store_dir>/snapshots`, sweeping what crashed builds and
    /// deletions left behind.
    pub fn open(store_dir: &Path) -> Result<LocalDir> {
        let snapshots = store_dir.join("snapshots");
        // Explicit mode: the daemon runs with umask 0, and snapshots are nobody else's business.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .at(&snapshots)?;
        let dir = LocalDir { snapshots };
        dir.sweep()?;
        Ok(dir)
    }

    /// Where store-wide record `file` lives: `<store>/snapshots/.<file>` (a dot name, so it is
    /// never taken for a snapshot and never swept).
    fn record_path(&self, file: &str) -> PathBuf {
        self.snapshots.join(format!(".{file}"))
    }

    /// The store lock, a flock of `snapshots/` itself. Every command opens (and so sweeps) the
    /// store, a daemon may be writing in it at that moment, and a temp name cannot be created
    /// and locked in one step: so a writer holds the lock shared from creating a temp name
    /// until that name is locked (or, for a record, renamed away), and a sweep takes it
    /// exclusively while it chooses what to remove. Without it a `snapshot list` could sweep
    /// the `.tmp-` dir a prune had just made, failing the prune.
    fn store_lock(&self, op: libc::c_int) -> std::io::Result<File> {
        let f = File::open(&self.snapshots)?;
        flock(&f, op)?;
        Ok(f)
    }

    fn sweep(&self) -> Result<()> {
        // A writer is between creating a temp name and locking it: sweep at the next open.
        let Ok(store) = self.store_lock(libc::LOCK_EX | libc::LOCK_NB) else {
            return Ok(());
        };
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(&self.snapshots).at(&self.snapshots)? {
            let e = e.at(&self.snapshots)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") && name.ends_with(".tmp") {
                // A record's temp file (`write_durably` of `.<file>` writes `..<file>.tmp`):
                // a crash between its write and its rename left it; the record is whole.
                files.push(e.path());
            } else if name.starts_with(".tmp-") || name.starts_with(".del-") {
                // A live build or deletion holds its dir's lock: leave it alone. Once we hold
                // it, nobody can reuse the name (it exists) until it is gone.
                if let Some(lock) = lock_dir(&e.path()) {
                    dirs.push((e.path(), lock));
                }
            }
        }
        for path in &files {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("store: cannot sweep {}: {e}", path.display());
            }
        }
        // The dirs are ours now: remove them (maybe large) without keeping writers waiting.
        drop(store);
        for (path, _lock) in &dirs {
            if let Err(e) = std::fs::remove_dir_all(path) {
                warn!("store: cannot sweep {}: {e}", path.display());
            }
        }
        for path in files.iter().chain(dirs.iter().map(|(p, _)| p)) {
            info!("store: swept {}", path.display());
        }
        if !(files.is_empty() && dirs.is_empty()) {
            fsync_dir(&self.snapshots).at(&self.snapshots)?;
        }
        Ok(())
    }
}

impl Backend for LocalDir {
    fn location(&self) -> &Path {
        &self.snapshots
    }

    fn path_of(&self, snap: &str, file: &str) -> PathBuf {
        self.snapshots.join(snap).join(file)
    }

    fn names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.snapshots).at(&self.snapshots)? {
            let e = e.at(&self.snapshots)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.file_type().at(e.path())?.is_dir() {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn exists(&self, snap: &SnapshotName) -> Result<bool> {
        Ok(self.snapshots.join(snap).is_dir())
    }

    fn read(&self, snap: &SnapshotName, file: &str) -> Result<Vec<u8>> {
        let path = self.path_of(snap, file);
        std::fs::read(&path).at(&path)
    }

    fn len(&self, snap: &SnapshotName, file: &str) -> Result<u64> {
        let path = self.path_of(snap, file);
        Ok(std::fs::metadata(&path).at(&path)?.len())
    }

    fn open_pack(&self, snap: &SnapshotName, file: &str) -> Result<Arc<dyn PackRead>> {
        let path = self.path_of(snap, file);
        Ok(Arc::new(LocalPack(File::open(&path).at(&path)?)))
    }

    fn stage(&self, snap: &SnapshotName, mode: StageMode) -> Result<Box<dyn Staging>> {
        let dest = self.snapshots.join(snap);
        let taken = || StoreError::NameTaken(snap.to_string());
        match mode {
            StageMode::New if dest.exists() => return Err(taken()),
            StageMode::Replace if !dest.is_dir() => {
                return Err(StoreError::NotFound(snap.to_string()))
            }
            _ => {}
        }
        let tmp = self.snapshots.join(format!(".tmp-{snap}"));
        // Shared store lock until the temp dir is locked: no sweep in between.
        let store = self.store_lock(libc::LOCK_SH).at(&self.snapshots)?;
        // Explicit mode (the daemon's umask is 0); the rename that commits keeps it.
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&tmp) {
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                taken()
            } else {
                StoreError::Io {
                    path: tmp,
                    source: e,
                }
            });
        }
        let lock = File::open(&tmp).at(&tmp)?;
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Err(taken());
        }
        drop(store);
        Ok(Box::new(LocalStaging {
            snapshots: self.snapshots.clone(),
            tmp,
            name: snap.clone(),
            mode,
            _lock: lock,
            finished: false,
        }))
    }

    fn remove(&self, snap: &SnapshotName) -> Result<()> {
        let dir = self.snapshots.join(snap);
        if !dir.is_dir() {
            return Err(StoreError::NotFound(snap.to_string()));
        }
        // Hide it in one rename, then remove at leisure: a crash in between leaves a `.del-`
        // dir that the next open sweeps, never a half-deleted snapshot.
        let Some(_lock) = lock_dir(&dir) else {
            return Err(StoreError::Misuse(format!(
                "snapshot {snap:?} is locked by another process (being deleted?)"
            )));
        };
        let doomed = self.snapshots.join(format!(".del-{snap}"));
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed).at(&doomed)?;
        }
        rename_noreplace(&dir, &doomed).at(&dir)?;
        fsync_dir(&self.snapshots).at(&self.snapshots)?;
        std::fs::remove_dir_all(&doomed).at(&doomed)?;
        fsync_dir(&self.snapshots).at(&self.snapshots)
    }

    fn read_record(&self, file: &str) -> Result<Option<Vec<u8>>> {
        let path = self.record_path(file);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn write_record(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.record_path(file);
        // Shared store lock: a sweep must not take the temp file between write and rename.
        let _store = self.store_lock(libc::LOCK_SH).at(&self.snapshots)?;
        write_durably(&path, bytes).at(&path)
    }
}

/// A committed pack file.
struct LocalPack(File);

impl PackRead for LocalPack {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn stamp(&self) -> std::io::Result<(PackKey, Stamp)> {
        Stamp::of(&self.0)
    }

    fn as_file(&self) -> Option<&File> {
        Some(&self.0)
    }
}

/// A build in `.tmp-<name>/`.
struct LocalStaging {
    snapshots: PathBuf,
    tmp: PathBuf,
    name: SnapshotName,
    mode: StageMode,
    /// The temp dir, flock'ed while the build lives.
    _lock: File,
    finished: bool,
}

impl Staging for LocalStaging {
    fn create_pack(&self, file: &str) -> Result<Arc<dyn PackWrite>> {
        let path = self.tmp.join(file);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .at(&path)?;
        Ok(Arc::new(LocalPackOut { file: f, path }))
    }

    fn write_file(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.join(file);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .at(&path)?;
        f.write_all_at(bytes, 0).at(&path)?;
        f.sync_all().at(&path)
    }

    fn adopt(&self, from: &SnapshotName, file: &str, as_file: &str) -> Result<()> {
        let src = self.snapshots.join(from).join(file);
        std::fs::hard_link(&src, self.tmp.join(as_file)).at(&src)
    }

    fn commit(mut self: Box<Self>, manifest: &[u8]) -> Result<()> {
        // write_durably also fsyncs the temp dir, making the packs' and tables' names durable.
        let mpath = self.tmp.join(MANIFEST);
        write_durably(&mpath, manifest).at(&mpath)?;
        let dest = self.snapshots.join(&self.name);
        match self.mode {
            StageMode::New => rename_noreplace(&self.tmp, &dest).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    StoreError::NameTaken(self.name.to_string())
                } else {
                    StoreError::Io {
                        path: dest.clone(),
                        source: e,
                    }
                }
            })?,
            StageMode::Replace => {
                // One atomic swap: readers see the old version or the new, never neither. The
                // old one is left in the temp dir's name, removed below (or swept).
                exchange(&self.tmp, &dest).at(&dest)?;
            }
        }
        // Visible from here on: even if the fsync below fails, there is no temp dir to drop.
        self.finished = true;
        if self.mode == StageMode::Replace {
            let old = self.tmp.clone();
            if let Err(e) = std::fs::remove_dir_all(&old) {
                warn!("removing the replaced {}: {e}", old.display());
            }
        }
        fsync_dir(&self.snapshots).at(&self.snapshots)
    }

    fn abort(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        std::fs::remove_dir_all(&self.tmp).at(&self.tmp)?;
        fsync_dir(&self.snapshots).at(&self.snapshots)
    }
}

impl Drop for LocalStaging {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: whatever is left is swept at the next open.
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                warn!(
                    "snapshot {:?} not committed; removing {}: {e}",
                    self.name,
                    self.tmp.display()
                );
            }
        }
    }
}

/// A pack file being written in a temp dir.
struct LocalPackOut {
    file: File,
    path: PathBuf,
}

impl PackWrite for LocalPackOut {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).at(&self.path)
    }

    fn write_from(&self, offset: u64, src: BlockSource<'_>) -> Result<()> {
        if copy_range(src.file, src.offset, &self.file, offset, src.len) {
            return Ok(());
        }
        // The kernel or filesystem cannot: write the bytes over whatever part was copied.
        let data = src.read(&self.path)?;
        self.write_at(offset, &data)
    }

    fn reflink_from(&self, offset: u64, src: &File, src_off: u64, len: u64) -> Result<bool> {
        match crate::sys::clone_range(src.as_raw_fd(), src_off, self.file.as_raw_fd(), offset, len)
        {
            Ok(()) => Ok(true),
            Err(e) if crate::sys::clone_unsupported(&e) => {
                debug!(
                    "{}: no reflink from the volume ({e}): blocks are copied",
                    self.path.display()
                );
                Ok(false)
            }
            Err(source) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn start_writeback(&self, start: u64, end: u64) {
        // Best effort: an error here shows again at the commit's fsync, which decides.
        // SAFETY: sync_file_range on an fd we own.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as i64,
                (end - start) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn wait_writeback(&self, start: u64, end: u64) {
        // SAFETY: sync_file_range on an fd we own.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as i64,
                (end - start) as i64,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().at(&self.path)
    }
}

/// Copy `len` bytes with copy_file_range; false if the kernel or filesystem cannot (the caller
/// writes the bytes itself then, over whatever part was copied).
pub(super) fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> bool {
    let mut done = 0;
    while done < len {
        match crate::sys::copy_file_range(
            src.as_raw_fd(),
            src_off + done,
            dst.as_raw_fd(),
            dst_off + done,
            len - done,
        ) {
            Ok(0) | Err(_) => return false,
            Ok(n) => done += n,
        }
    }
    true
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    crate::sys::renameat2(libc::AT_FDCWD, &c(from)?, libc::AT_FDCWD, &c(to)?, flags)
}

pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    renameat2(from, to, libc::RENAME_NOREPLACE)
}

fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}
