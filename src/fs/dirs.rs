//! Directories of the live tree: open, list (readdir and readdirplus, with the store hidden and
//! `.snapshots` shown in the root), fsync, release (`Dirs for Live`), after the public
//! operations that forward each call to the tree owning its inode or handle (`tree.rs`).
//!
//! A listing is read at opendir and at each rewind, never per readdir call; it must never list
//! the store, nor a backing entry that `.snapshots` shadows.

use super::*;

impl OverlayFs {
    // ---- directories: each forwarded to the tree that owns its inode or handle ----

    /// Open a directory and read its entries.
    pub fn opendir(&self, ino: u64) -> FsResult<Opened> {
        self.tree(ino).opendir(ino)
    }

    /// Directory entries from `offset`; `add` returns true when the reply buffer is full.
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry) -> bool,
    ) -> FsResult<()> {
        self.tree(ino).readdir(ino, fh, offset, &mut add)
    }

    /// Like readdir, but each entry is also looked up (one kernel reference per entry sent).
    /// `add` gets the entry and its attributes; it returns true when the buffer is full, and
    /// then the reference of the entry that did not fit is dropped again.
    pub fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()> {
        self.tree(ino).readdirplus(ino, fh, offset, &mut add)
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.tree_fh(fh).releasedir(fh)
    }

    /// fsync a directory.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.tree_fh(fh).fsyncdir(fh, datasync)
    }

    pub(super) fn read_entries(&self, dir: &Inode, file: &File) -> FsResult<Listing> {
        let path = sys::proc_path(file.as_raw_fd());
        let rd = std::fs::read_dir(OsStr::from_bytes(path.as_bytes()))
            .map_err(FsError::backing("readdir"))?;
        let mut out = vec![
            (OsString::from("."), dir.key.ino, FileKind::Directory),
            (OsString::from(".."), 0, FileKind::Directory),
        ];
        if let (Some(v), ROOT_INO) = (&self.snapview, dir.ino) {
            if v.visible() {
                out.push((
                    SNAPDIR_NAME.into(),
                    snapview::SNAPDIR_INO,
                    FileKind::Directory,
                ));
            }
        }
        for e in rd {
            let e = e.map_err(FsError::backing("readdir"))?;
            let name = e.file_name();
            if self.is_store(dir, &name) || self.is_snapdir(dir, &name) {
                continue;
            }
            let kind = match e.file_type() {
                Ok(t) => {
                    use std::os::unix::fs::FileTypeExt;
                    if t.is_dir() {
                        FileKind::Directory
                    } else if t.is_symlink() {
                        FileKind::Symlink
                    } else if t.is_fifo() {
                        FileKind::Fifo
                    } else if t.is_socket() {
                        FileKind::Socket
                    } else if t.is_char_device() {
                        FileKind::CharDevice
                    } else if t.is_block_device() {
                        FileKind::BlockDevice
                    } else {
                        FileKind::Regular
                    }
                }
                Err(_) => FileKind::Regular,
            };
            use std::os::unix::fs::DirEntryExt;
            out.push((name, e.ino(), kind));
        }
        Ok(out)
    }
}

impl Dirs for Live<'_> {
    fn opendir(&self, ino: u64) -> FsResult<Opened> {
        let inode = self.inodes.get(ino)?;
        if inode.kind != FileKind::Directory {
            return Err(FsError::backing("opendir")(
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        let fd = sys::reopen(inode.raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(FsError::backing("opendir"))?;
        let file = File::from(fd);
        let entries = self.read_entries(&inode, &file)?;
        let fh = self.new_fh();
        self.dirs.insert(
            fh,
            DirHandle {
                file,
                listing: DirListing::new(entries),
            },
        );
        Ok(Opened {
            fh,
            keep_cache: false,
        })
    }

    fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry) -> bool,
    ) -> FsResult<()> {
        let dir = self.dirs.get(fh)?;
        let inode = self.inodes.get(ino)?;
        let entries = dir
            .listing
            .at(offset, || self.read_entries(&inode, &dir.file))?;
        for (i, (name, d_ino, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let full = add(DirEntry {
                // The kernel does not use readdir inode numbers for anything but d_ino.
                ino: if *d_ino == 0 { ROOT_INO } else { *d_ino },
                offset: i as u64 + 1,
                kind: *kind,
                name: name.clone(),
            });
            if full {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<&Entry>) -> bool,
    ) -> FsResult<()> {
        let dir = self.dirs.get(fh)?;
        let inode = self.inodes.get(ino)?;
        let entries = dir
            .listing
            .at(offset, || self.read_entries(&inode, &dir.file))?;
        for (i, (name, d_ino, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let dot = name == "." || name == "..";
            let entry = if dot {
                None
            } else {
                match self.lookup_in(&inode, name) {
                    Ok(e) => Some(e),
                    // Gone since we listed it: skip it, as a fresh readdir would.
                    Err(_) => continue,
                }
            };
            let d = DirEntry {
                ino: entry.map_or(if *d_ino == 0 { ROOT_INO } else { *d_ino }, |e| e.attr.ino),
                offset: i as u64 + 1,
                kind: entry.map_or(*kind, |e| e.attr.kind),
                name: name.clone(),
            };
            let full = add(d, entry.as_ref());
            if full {
                if let Some(e) = entry {
                    self.forget(e.attr.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.dirs.remove(fh)
    }

    fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let d = self.dirs.get(fh)?;
        sys::fsync(d.file.as_raw_fd(), datasync).map_err(FsError::backing("fsyncdir"))
    }
}
