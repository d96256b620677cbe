//! The backing-tree walk: every entry under the backing dir through directory fds and `*at`
//! calls, and the regular files found that way by inode (the volumes and their paths).
//!
//! It must never follow a symlink nor enter the store, and never changes anything it walks.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::ids::VolumeId;

/// Regular files of a backing dir by inode: their path relative to it and their stat.
pub type VolumeFiles = HashMap<VolumeId, (String, libc::stat)>;

/// Regular files under `backing` (never following a symlink, skipping the store), by inode.
/// Lenient: what cannot be read is left out, as `find` would.
pub fn walk_volumes(backing: &Path, store: &Path) -> VolumeFiles {
    let mut out = HashMap::new();
    let Ok(root) = crate::sys::open_dir_path(backing) else {
        return out;
    };
    // Followed on purpose: the daemon names its store as /proc/self/fd/N.
    let store_key = std::fs::metadata(store).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    });
    let _ = walk_tree(
        root.as_raw_fd(),
        store_key,
        WalkErrors::Skip,
        |_, _, rel, st| {
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                out.insert(
                    VolumeId {
                        dev: st.st_dev,
                        ino: st.st_ino,
                    },
                    (rel.to_string(), *st),
                );
            }
        },
    );
    out
}

/// What a tree walk does with trouble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkErrors {
    /// Leave out whatever cannot be read.
    Skip,
    /// Skip only names removed during the walk; any other error, and a name that is not
    /// UTF-8, ends the walk with an error.
    Fail,
}

/// Walk the tree under the directory fd `root` through directory fds and `*at` calls, never
/// following a symlink and never entering the directory `skip` ((dev, ino)); call
/// `visit(dir_fd, name, path, stat)` for every entry below the root, `path` relative to it
/// and '/'-separated (subdirectories are visited before their contents).
pub fn walk_tree(
    root: std::os::fd::RawFd,
    skip: Option<(u64, u64)>,
    errors: WalkErrors,
    mut visit: impl FnMut(std::os::fd::RawFd, &std::ffi::CStr, &str, &libc::stat),
) -> io::Result<()> {
    use crate::sys;
    let tolerated = |e: io::Error, also: Option<i32>| -> io::Result<()> {
        let gone =
            e.raw_os_error() == Some(libc::ENOENT) || (also.is_some() && e.raw_os_error() == also);
        if errors == WalkErrors::Skip || gone {
            Ok(())
        } else {
            Err(e)
        }
    };
    let top = sys::reopen(root, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut stack = vec![(top, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let listing = sys::proc_path(dir.as_raw_fd());
        let rd = match std::fs::read_dir(std::ffi::OsStr::from_bytes(listing.as_bytes())) {
            Ok(rd) => rd,
            Err(e) => {
                tolerated(e, None)?;
                continue;
            }
        };
        for e in rd {
            let name = match e {
                Ok(e) => e.file_name(),
                Err(e) => {
                    tolerated(e, None)?;
                    continue;
                }
            };
            if name.to_str().is_none() && errors == WalkErrors::Fail {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{prefix}/{}: the name is not UTF-8, which snapshots cannot record yet; rename it",
                        name.to_string_lossy()
                    ),
                ));
            }
            let Ok(c) = sys::name_cstr(&name) else {
                continue;
            };
            let st = match sys::fstatat(dir.as_raw_fd(), &c) {
                Ok(st) => st,
                Err(e) => {
                    tolerated(e, None)?;
                    continue;
                }
            };
            let rel = if prefix.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{prefix}/{}", name.to_string_lossy())
            };
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                if skip == Some((st.st_dev, st.st_ino)) {
                    continue;
                }
                match sys::openat(
                    dir.as_raw_fd(),
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                ) {
                    Ok(sub) => {
                        visit(dir.as_raw_fd(), &c, &rel, &st);
                        stack.push((sub, rel));
                    }
                    // Removed, or replaced by a non-directory, since its stat.
                    Err(e) => tolerated(e, Some(libc::ENOTDIR))?,
                }
                continue;
            }
            visit(dir.as_raw_fd(), &c, &rel, &st);
        }
    }
    Ok(())
}
