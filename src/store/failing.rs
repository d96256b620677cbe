//! Failure injection: a wrapper around any store medium that fails one chosen call (the Nth
//! from when it was armed) the way a disk does: an I/O error, ENOSPC, a torn write (part of the
//! bytes land, then the error), or an error after the call took effect (an fsync failing after
//! a rename). For tests of commit and delete; it changes nothing else and must never be what a
//! mount uses.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::backend::{
    Backend, BlockSource, PackKey, PackRead, PackWrite, StageMode, Staging, Stamp,
};
use super::error::{Result, StoreError};
use crate::ids::SnapshotName;

/// How the chosen call fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// EIO, and the call does nothing.
    Io,
    /// ENOSPC, and the call does nothing.
    NoSpace,
    /// A write stores the first half of its bytes, then fails with EIO (any other call: `Io`).
    Torn,
    /// The call takes effect, then fails with EIO.
    After,
}

#[derive(Debug, Default)]
struct Plan {
    calls: AtomicU64,
    /// (call number, fault): the call whose number this is fails.
    armed: Mutex<Option<(u64, Fault)>>,
    /// What failed: the call's name and path.
    fired: Mutex<Option<String>>,
}

impl Plan {
    /// Count a call; the fault if it is the chosen one.
    fn hit(&self, op: &str, path: &Path) -> Option<Fault> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        match *armed {
            Some((at, fault)) if at == n => {
                *armed = None;
                *self.fired.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("{op} {} ({fault:?})", path.display()));
                Some(fault)
            }
            _ => None,
        }
    }
}

fn error(fault: Fault, path: PathBuf) -> StoreError {
    let errno = match fault {
        Fault::NoSpace => libc::ENOSPC,
        _ => libc::EIO,
    };
    StoreError::Io {
        path,
        source: io::Error::from_raw_os_error(errno),
    }
}

/// Run `call` under the plan: fail before it, or after it for `Fault::After`.
fn guarded<T>(plan: &Plan, op: &str, path: PathBuf, call: impl FnOnce() -> Result<T>) -> Result<T> {
    match plan.hit(op, &path) {
        None => call(),
        Some(Fault::After) => {
            call()?;
            Err(error(Fault::After, path))
        }
        Some(f) => Err(error(f, path)),
    }
}

/// A medium whose chosen call fails.
#[derive(Debug)]
pub struct Failing {
    inner: Arc<dyn Backend>,
    plan: Arc<Plan>,
}

impl Failing {
    /// Wrap `inner`; nothing fails until `fail_at`.
    pub fn new(inner: Arc<dyn Backend>) -> Failing {
        Failing {
            inner,
            plan: Arc::default(),
        }
    }

    /// Fail the `n`th call from now (0: the next one) with `fault`, once.
    pub fn fail_at(&self, n: u64, fault: Fault) {
        let at = self.plan.calls.load(Ordering::SeqCst).saturating_add(n);
        *self.plan.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, fault));
        *self.plan.fired.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Disarm.
    pub fn disarm(&self) {
        *self.plan.armed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Calls counted so far (every call that can fail).
    pub fn calls(&self) -> u64 {
        self.plan.calls.load(Ordering::SeqCst)
    }

    /// The call that failed since the last `fail_at`, if one did.
    pub fn fired(&self) -> Option<String> {
        self.plan
            .fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Backend for Failing {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn path_of(&self, snap: &str, file: &str) -> PathBuf {
        self.inner.path_of(snap, file)
    }

    fn names(&self) -> Result<Vec<String>> {
        guarded(&self.plan, "names", self.location().into(), || {
            self.inner.names()
        })
    }

    fn exists(&self, snap: &SnapshotName) -> Result<bool> {
        guarded(&self.plan, "exists", self.location().join(snap), || {
            self.inner.exists(snap)
        })
    }

    fn read(&self, snap: &SnapshotName, file: &str) -> Result<Vec<u8>> {
        guarded(&self.plan, "read", self.path_of(snap, file), || {
            self.inner.read(snap, file)
        })
    }

    fn len(&self, snap: &SnapshotName, file: &str) -> Result<u64> {
        guarded(&self.plan, "len", self.path_of(snap, file), || {
            self.inner.len(snap, file)
        })
    }

    fn open_pack(&self, snap: &SnapshotName, file: &str) -> Result<Arc<dyn PackRead>> {
        let path = self.path_of(snap, file);
        let inner = guarded(&self.plan, "open_pack", path.clone(), || {
            self.inner.open_pack(snap, file)
        })?;
        Ok(Arc::new(FailingPackRead {
            inner,
            plan: self.plan.clone(),
            path,
        }))
    }

    fn stage(&self, snap: &SnapshotName, mode: StageMode) -> Result<Box<dyn Staging>> {
        let inner = guarded(&self.plan, "stage", self.location().join(snap), || {
            self.inner.stage(snap, mode)
        })?;
        Ok(Box::new(FailingStaging {
            inner,
            plan: self.plan.clone(),
            dir: self.location().join(format!(".tmp-{snap}")),
        }))
    }

    fn remove(&self, snap: &SnapshotName) -> Result<()> {
        guarded(&self.plan, "remove", self.location().join(snap), || {
            self.inner.remove(snap)
        })
    }

    fn read_record(&self, file: &str) -> Result<Option<Vec<u8>>> {
        guarded(
            &self.plan,
            "read_record",
            self.location().join(file),
            || self.inner.read_record(file),
        )
    }

    fn write_record(&self, file: &str, bytes: &[u8]) -> Result<()> {
        guarded(
            &self.plan,
            "write_record",
            self.location().join(file),
            || self.inner.write_record(file, bytes),
        )
    }
}

struct FailingStaging {
    inner: Box<dyn Staging>,
    plan: Arc<Plan>,
    dir: PathBuf,
}

impl Staging for FailingStaging {
    fn create_pack(&self, file: &str) -> Result<Arc<dyn PackWrite>> {
        let path = self.dir.join(file);
        let inner = guarded(&self.plan, "create_pack", path.clone(), || {
            self.inner.create_pack(file)
        })?;
        Ok(Arc::new(FailingPackWrite {
            inner,
            plan: self.plan.clone(),
            path,
        }))
    }

    fn write_file(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(file);
        match self.plan.hit("write_file", &path) {
            None => self.inner.write_file(file, bytes),
            Some(Fault::Torn) => {
                self.inner.write_file(file, &bytes[..bytes.len() / 2])?;
                Err(error(Fault::Torn, path))
            }
            Some(Fault::After) => {
                self.inner.write_file(file, bytes)?;
                Err(error(Fault::After, path))
            }
            Some(f) => Err(error(f, path)),
        }
    }

    fn adopt(&self, from: &SnapshotName, file: &str, as_file: &str) -> Result<()> {
        guarded(&self.plan, "adopt", self.dir.join(as_file), || {
            self.inner.adopt(from, file, as_file)
        })
    }

    fn commit(self: Box<Self>, manifest: &[u8]) -> Result<()> {
        let path = self.dir.join(super::format::MANIFEST);
        match self.plan.hit("commit", &path) {
            None => self.inner.commit(manifest),
            Some(Fault::After) => {
                self.inner.commit(manifest)?;
                Err(error(Fault::After, path))
            }
            // The manifest never landed whole: the build is dropped (the inner staging's drop).
            Some(f) => Err(error(f, path)),
        }
    }

    fn abort(self: Box<Self>) -> Result<()> {
        let path = self.dir.clone();
        match self.plan.hit("abort", &path) {
            None => self.inner.abort(),
            Some(Fault::After) => {
                self.inner.abort()?;
                Err(error(Fault::After, path))
            }
            Some(f) => Err(error(f, path)),
        }
    }
}

struct FailingPackWrite {
    inner: Arc<dyn PackWrite>,
    plan: Arc<Plan>,
    path: PathBuf,
}

impl PackWrite for FailingPackWrite {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self.plan.hit("write_at", &self.path) {
            None => self.inner.write_at(offset, data),
            Some(Fault::Torn) => {
                self.inner.write_at(offset, &data[..data.len() / 2])?;
                Err(error(Fault::Torn, self.path.clone()))
            }
            Some(Fault::After) => {
                self.inner.write_at(offset, data)?;
                Err(error(Fault::After, self.path.clone()))
            }
            Some(f) => Err(error(f, self.path.clone())),
        }
    }

    fn reflink_from(&self, offset: u64, src: &File, src_off: u64, len: u64) -> Result<bool> {
        match self.plan.hit("reflink_from", &self.path) {
            None => self.inner.reflink_from(offset, src, src_off, len),
            Some(Fault::After) => {
                self.inner.reflink_from(offset, src, src_off, len)?;
                Err(error(Fault::After, self.path.clone()))
            }
            Some(f) => Err(error(f, self.path.clone())),
        }
    }

    fn write_from(&self, offset: u64, src: BlockSource<'_>) -> Result<()> {
        match self.plan.hit("write_from", &self.path) {
            None => self.inner.write_from(offset, src),
            Some(Fault::Torn) => {
                let data = src.read(&self.path)?;
                self.inner.write_at(offset, &data[..data.len() / 2])?;
                Err(error(Fault::Torn, self.path.clone()))
            }
            Some(Fault::After) => {
                self.inner.write_from(offset, src)?;
                Err(error(Fault::After, self.path.clone()))
            }
            Some(f) => Err(error(f, self.path.clone())),
        }
    }

    fn start_writeback(&self, start: u64, end: u64) {
        self.inner.start_writeback(start, end)
    }

    fn wait_writeback(&self, start: u64, end: u64) {
        self.inner.wait_writeback(start, end)
    }

    fn sync(&self) -> Result<()> {
        guarded(&self.plan, "sync", self.path.clone(), || self.inner.sync())
    }
}

struct FailingPackRead {
    inner: Arc<dyn PackRead>,
    plan: Arc<Plan>,
    path: PathBuf,
}

impl PackRead for FailingPackRead {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.plan.hit("read_exact_at", &self.path) {
            None => self.inner.read_exact_at(buf, offset),
            Some(Fault::After) => {
                self.inner.read_exact_at(buf, offset)?;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Some(Fault::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Some(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn stamp(&self) -> io::Result<(PackKey, Stamp)> {
        self.inner.stamp()
    }

    // The bytes then move in the kernel, past the plan: the write that takes them
    // (`write_from`) is still counted and can fail.
    fn as_file(&self) -> Option<&std::fs::File> {
        self.inner.as_file()
    }
}
