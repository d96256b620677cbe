//! A store in memory, for fast tests: the same contract as the local directory (a snapshot
//! becomes visible whole at its commit, a name is taken while it is built, a removed snapshot's
//! packs stay readable by whoever opened them) with no file at all. It is lost with the process
//! and must never be what a mount uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::backend::{Backend, PackKey, PackRead, PackWrite, StageMode, Staging, Stamp};
use super::error::{Result, StoreError};
use crate::ids::SnapshotName;

/// One file: its bytes and an identity for `verified`.
#[derive(Debug)]
struct MemFile {
    key: PackKey,
    data: RwLock<Vec<u8>>,
    /// Writes so far: any change moves the stamp, so proofs of the old bytes are dropped.
    writes: AtomicU64,
}

impl MemFile {
    fn new(key: PackKey, data: Vec<u8>) -> MemFile {
        MemFile {
            key,
            data: RwLock::new(data),
            writes: AtomicU64::new(0),
        }
    }

    fn bytes(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }
}

type Files = HashMap<String, Arc<MemFile>>;

#[derive(Debug, Default)]
struct State {
    committed: BTreeMap<String, Files>,
    building: HashSet<String>,
    records: HashMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Identities of files, unique in the process's memory stores.
    next_key: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self) -> PackKey {
        // dev u64::MAX: no real file has it, so proofs never mix with the local store's.
        (u64::MAX, self.next_key.fetch_add(1, Ordering::Relaxed))
    }
}

/// Snapshots in memory.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    location: PathBuf,
    shared: Arc<Shared>,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore {
            location: PathBuf::from("<memory>"),
            shared: Arc::default(),
        }
    }
}

fn not_found(path: PathBuf) -> StoreError {
    StoreError::Io {
        path,
        source: io::Error::from(io::ErrorKind::NotFound),
    }
}

impl MemoryStore {
    fn file(&self, snap: &SnapshotName, file: &str) -> Result<Arc<MemFile>> {
        self.shared
            .lock()
            .committed
            .get(snap.as_str())
            .and_then(|f| f.get(file).cloned())
            .ok_or_else(|| not_found(self.path_of(snap, file)))
    }

    /// Change byte `at` of `file` of committed snapshot `snap` (for tests of damage).
    pub fn flip_byte(&self, snap: &SnapshotName, file: &str, at: usize) -> Result<()> {
        let f = self.file(snap, file)?;
        let mut d = f.data.write().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = d.get_mut(at) {
            *b ^= 1;
        }
        f.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Backend for MemoryStore {
    fn location(&self) -> &Path {
        &self.location
    }

    fn path_of(&self, snap: &str, file: &str) -> PathBuf {
        self.location.join(snap).join(file)
    }

    fn names(&self) -> Result<Vec<String>> {
        Ok(self.shared.lock().committed.keys().cloned().collect())
    }

    fn exists(&self, snap: &SnapshotName) -> Result<bool> {
        Ok(self.shared.lock().committed.contains_key(snap.as_str()))
    }

    fn read(&self, snap: &SnapshotName, file: &str) -> Result<Vec<u8>> {
        Ok(self.file(snap, file)?.bytes().clone())
    }

    fn len(&self, snap: &SnapshotName, file: &str) -> Result<u64> {
        Ok(self.file(snap, file)?.bytes().len() as u64)
    }

    fn open_pack(&self, snap: &SnapshotName, file: &str) -> Result<Arc<dyn PackRead>> {
        Ok(self.file(snap, file)?)
    }

    fn stage(&self, snap: &SnapshotName, mode: StageMode) -> Result<Box<dyn Staging>> {
        let mut st = self.shared.lock();
        let exists = st.committed.contains_key(snap.as_str());
        match mode {
            StageMode::New if exists => return Err(StoreError::NameTaken(snap.to_string())),
            StageMode::Replace if !exists => return Err(StoreError::NotFound(snap.to_string())),
            _ => {}
        }
        if !st.building.insert(snap.to_string()) {
            return Err(StoreError::NameTaken(snap.to_string()));
        }
        Ok(Box::new(MemStaging {
            store: self.clone(),
            name: snap.clone(),
            mode,
            files: Mutex::default(),
            finished: false,
        }))
    }

    fn remove(&self, snap: &SnapshotName) -> Result<()> {
        match self.shared.lock().committed.remove(snap.as_str()) {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(snap.to_string())),
        }
    }

    fn read_record(&self, file: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.shared.lock().records.get(file).cloned())
    }

    fn write_record(&self, file: &str, bytes: &[u8]) -> Result<()> {
        self.shared
            .lock()
            .records
            .insert(file.to_string(), bytes.to_vec());
        Ok(())
    }
}

impl PackRead for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.bytes();
        let end = (offset as usize).checked_add(buf.len());
        match end.and_then(|e| d.get(offset as usize..e)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    fn stamp(&self) -> io::Result<(PackKey, Stamp)> {
        let d = self.bytes();
        Ok((
            self.key,
            Stamp::of_memory(d.len() as u64, self.writes.load(Ordering::SeqCst)),
        ))
    }
}

impl PackWrite for MemFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let end = offset as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

struct MemStaging {
    store: MemoryStore,
    name: SnapshotName,
    mode: StageMode,
    files: Mutex<Files>,
    finished: bool,
}

impl MemStaging {
    fn add(&self, file: &str, f: Arc<MemFile>) -> Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.contains_key(file) {
            return Err(StoreError::Io {
                path: self.store.path_of(&format!(".tmp-{}", self.name), file),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        files.insert(file.to_string(), f);
        Ok(())
    }
}

impl Staging for MemStaging {
    fn create_pack(&self, file: &str) -> Result<Arc<dyn PackWrite>> {
        let f = Arc::new(MemFile::new(self.store.shared.key(), Vec::new()));
        self.add(file, f.clone())?;
        Ok(f)
    }

    fn write_file(&self, file: &str, bytes: &[u8]) -> Result<()> {
        self.add(
            file,
            Arc::new(MemFile::new(self.store.shared.key(), bytes.to_vec())),
        )
    }

    fn adopt(&self, from: &SnapshotName, file: &str, as_file: &str) -> Result<()> {
        let f = self.store.file(from, file)?;
        self.add(as_file, f)
    }

    fn commit(mut self: Box<Self>, manifest: &[u8]) -> Result<()> {
        self.write_file(super::format::MANIFEST, manifest)?;
        let files = std::mem::take(&mut *self.files.lock().unwrap_or_else(|p| p.into_inner()));
        let mut st = self.store.shared.lock();
        if self.mode == StageMode::New && st.committed.contains_key(self.name.as_str()) {
            return Err(StoreError::NameTaken(self.name.to_string()));
        }
        st.committed.insert(self.name.to_string(), files);
        st.building.remove(self.name.as_str());
        self.finished = true;
        Ok(())
    }

    fn abort(self: Box<Self>) -> Result<()> {
        // Drop does it.
        Ok(())
    }
}

impl Drop for MemStaging {
    fn drop(&mut self) {
        if !self.finished {
            self.store.shared.lock().building.remove(self.name.as_str());
        }
    }
}
