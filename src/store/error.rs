//! The store's one error type: every failure of the on-disk snapshot store, saying what went
//! wrong and where. The daemon and the CLI decide how to show it (and which errno, if any);
//! nothing here ever panics on bad input or a damaged file.

use std::io;
use std::path::PathBuf;

use crate::ids::{NameError, VolumeId};

/// A failure of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("a snapshot named {0:?} already exists or is being built: choose another name")]
    NameTaken(String),
    #[error("no snapshot named {0:?} in the store")]
    NotFound(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: format {found} is not supported (this grainfs reads format {supported}): upgrade grainfs", path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{}: damaged: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("snapshot {snapshot:?}: chain broken: {why}")]
    Chain { snapshot: String, why: String },
    #[error("snapshot {snapshot:?}: no volume {volume}")]
    NoVolume { snapshot: String, volume: VolumeId },
    /// A stored block whose bytes differ from its blake3: read as EIO, never as wrong bytes.
    #[error("snapshot {snapshot:?}: {volume}: block {block} is damaged (its bytes in {} differ from its blake3; stored by snapshot {stored_in:?}): run `grainfs snapshot verify`", path.display())]
    Damaged {
        snapshot: String,
        volume: String,
        block: u64,
        stored_in: String,
        path: PathBuf,
    },
    #[error("snapshot being built: {0}")]
    Misuse(String),
    /// A request the store refuses (a bad hold tag, a release of no hold), saying why.
    #[error("{0}")]
    Refused(String),
    #[error("snapshot {name:?} is held ({}): release it first with `grainfs snapshot release {name}`", tags.join(", "))]
    Held { name: String, tags: Vec<String> },
    /// A delete refused because snapshots whose manifests cannot be read might build on it
    /// (delete with merge could not rewrite them).
    #[error("snapshot {name:?} may be the parent of {dependents:?}, whose manifests cannot be read: run `grainfs snapshot verify` on them, then repair or delete them first")]
    HasDependents {
        name: String,
        dependents: Vec<String>,
    },
}

/// Shorthand for the store's results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attach a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.into(),
            source,
        })
    }
}
