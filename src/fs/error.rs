//! The filesystem layer's error type; the errno the kernel sees is decided here and nowhere else,
//! and so is how a failed operation is logged (`report`).

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use log::{debug, warn};

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

/// Lets at most `burst` reports out per `window`; the first one let out after a held-back run
/// learns how many were held back. A failing disk can fail every request: the log must say so
/// without growing by a line per request.
pub struct RateLimit {
    window_ns: u64,
    burst: u32,
    /// (start of the current window in ns, reports let out in it, reports held back since the
    /// last one let out).
    state: Mutex<(u64, u32, u64)>,
}

impl RateLimit {
    /// A limiter letting `burst` reports out per `window`.
    pub const fn new(window: Duration, burst: u32) -> RateLimit {
        RateLimit {
            window_ns: window.as_nanos() as u64,
            burst,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// Whether a report at `now_ns` may go out: Some(how many were held back before it).
    pub fn admit(&self, now_ns: u64) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, sent, held) = &mut *st;
        if *sent == 0 || now_ns.saturating_sub(*start) >= self.window_ns {
            *start = now_ns;
            *sent = 0;
        }
        if *sent >= self.burst {
            *held += 1;
            return None;
        }
        *sent += 1;
        Some(std::mem::take(held))
    }
}

/// EIO warnings: 10 per 10 s, enough to see which operations and files fail.
static EIO_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(10), 10);

/// The warning for an EIO answered to a caller: the operation, the file and the cause, and how
/// many earlier ones the rate limit held back.
pub fn eio_warning(op: &str, file: &str, e: &FsError, held_back: u64) -> String {
    let mut msg = format!("{op} on {file} failed with EIO (returned to the caller): {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // The Display of FsError and StoreError already includes their direct source.
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    if held_back > 0 {
        msg.push_str(&format!(" ({held_back} earlier EIO warnings held back)"));
    }
    msg
}

/// Log a failed operation: an EIO at warn, rate-limited, naming `op`, the file (`file` is only
/// called then: finding a path costs a syscall) and the cause, so an I/O error a program
/// reports can be explained from the log; any other errno is an answer the caller expects
/// (ENOENT, EEXIST, ENOSPC...) and stays at debug.
pub fn report(op: &str, file: impl FnOnce() -> String, e: &FsError) {
    let errno = e.errno();
    if errno == libc::EIO {
        if let Some(held_back) = EIO_WARNINGS.admit(crate::sys::now_ns()) {
            warn!("{}", eio_warning(op, &file(), e, held_back));
        }
    } else {
        debug!("{op}: {e} (errno {errno})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_a_burst_out_per_window_and_counts_the_rest() {
        let r = RateLimit::new(Duration::from_secs(10), 2);
        let s = 1_000_000_000u64;
        assert_eq!(r.admit(s), Some(0));
        assert_eq!(r.admit(s + 1), Some(0));
        assert_eq!(r.admit(s + 2), None);
        assert_eq!(r.admit(s + 9 * s), None);
        // A new window: the first one out says how many were held back.
        assert_eq!(r.admit(s + 11 * s), Some(2));
        assert_eq!(r.admit(s + 11 * s + 1), Some(0));
        assert_eq!(r.admit(s + 11 * s + 2), None);
    }

    #[test]
    fn eio_warning_names_operation_file_and_cause() {
        let e = FsError::backing("write")(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.errno(), libc::EIO);
        let w = eio_warning("write", "inode 7 (/srv/v/a.img)", &e, 0);
        assert!(
            w.starts_with("write on inode 7 (/srv/v/a.img) failed with EIO"),
            "{w}"
        );
        assert!(w.contains("Input/output error"), "{w}");
        // An io::Error without an errno (a short pack) also answers EIO, and says why.
        let e = FsError::Store(StoreError::Io {
            path: "/s/snapshots/x/pack-000000".into(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"),
        });
        assert_eq!(e.errno(), libc::EIO);
        let w = eio_warning("read", "snapshot file (inode 9)", &e, 3);
        assert!(
            w.contains("pack-000000") && w.contains("failed to fill"),
            "{w}"
        );
        assert!(w.ends_with("(3 earlier EIO warnings held back)"), "{w}");
    }
}
