//! The filesystem layer's error type; the errno the kernel sees is decided here and nowhere else.

use std::io;

use crate::store::StoreError;

/// An error from an overlay operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backing filesystem refused; its errno is passed through unchanged.
    #[error("{op}: {source}")]
    Backing {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel named an inode we no longer know (a bug or a race with forget).
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    /// The kernel named a file handle we never handed out or already released.
    #[error("unknown file handle {0}")]
    UnknownHandle(u64),
    /// The name belongs to the store and cannot be created, replaced or removed through the mount.
    #[error("{0:?} is reserved for the grainfs store")]
    Reserved(std::ffi::OsString),
    /// The operation makes no sense on this kind of inode.
    #[error("operation not supported on this inode")]
    NotSupported,
    /// Snapshots are read-only.
    #[error("snapshots are read-only")]
    ReadOnly,
    /// The snapshot store could not serve the snapshot view.
    #[error("snapshot view: {0}")]
    Store(#[from] StoreError),
}

impl FsError {
    /// The errno to answer the kernel with.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Backing { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::UnknownHandle(_) => libc::EBADF,
            FsError::Reserved(_) => libc::EACCES,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::ReadOnly => libc::EROFS,
            FsError::Store(e) => match e {
                StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
                // A name that is not a snapshot's (deleted, or never valid) is simply absent.
                StoreError::NotFound(_) | StoreError::BadName { .. } => libc::ENOENT,
                // Damage and broken chains: the data cannot be served.
                _ => libc::EIO,
            },
        }
    }

    /// Wrap an io error from the backing filesystem with the name of the operation.
    pub fn backing(op: &'static str) -> impl FnOnce(io::Error) -> FsError {
        move |source| FsError::Backing { op, source }
    }
}

/// Result of an overlay operation.
pub type FsResult<T> = Result<T, FsError>;
