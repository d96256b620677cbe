//! Which files a snapshot request covers, and the group's namespace at an instant: a walk of
//! the backing tree through directory fds and `*at` calls (never following a symlink, never
//! entering the store) that records every directory, symlink and regular file with its stat.
//! It reads metadata only, never file content, and changes nothing.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use glob::{MatchOptions, Pattern};

use crate::ids::VolumeId;
use crate::store::{EntryKind, NamespaceEntry};
use crate::sys;
use crate::track::{walk_tree, WalkErrors};

/// The name of the implicit group of every regular file in the mount.
pub const ALL: &str = "all";

/// What a request selects: every file, or the files matching some globs.
#[derive(Clone, Debug)]
pub enum Selection {
    All,
    Globs(Vec<Pattern>),
}

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    // `*` stays inside one directory, as in a shell; `**` crosses directories.
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Selection {
    /// Parse path globs relative to the backing dir; the error names the bad glob.
    pub fn globs(globs: &[String]) -> Result<Selection, String> {
        let mut out = Vec::with_capacity(globs.len());
        for g in globs {
            let g = g.trim_start_matches("./");
            if g.starts_with('/') || g.split('/').any(|c| c == "..") {
                return Err(format!(
                    "glob {g:?} must be relative to the backing dir, without \"..\""
                ));
            }
            out.push(Pattern::new(g).map_err(|e| format!("glob {g:?}: {e}"))?);
        }
        Ok(Selection::Globs(out))
    }

    /// Whether the file at `path` (relative, '/'-separated) is selected.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Selection::All => true,
            Selection::Globs(globs) => globs.iter().any(|g| g.matches_with(path, MATCH)),
        }
    }
}

/// One entry of the backing tree.
#[derive(Clone)]
pub struct TreeEntry {
    /// Relative to the backing dir, '/'-separated; "" is the root.
    pub path: String,
    pub stat: libc::stat,
    /// The target, for a symlink.
    pub target: Option<String>,
}

impl TreeEntry {
    fn kind(&self) -> libc::mode_t {
        self.stat.st_mode & libc::S_IFMT
    }

    /// The volume id of a regular file.
    pub fn volume_id(&self) -> VolumeId {
        VolumeId {
            dev: self.stat.st_dev,
            ino: self.stat.st_ino,
        }
    }

    fn namespace_entry(&self, kind: EntryKind) -> NamespaceEntry {
        NamespaceEntry {
            path: self.path.clone(),
            kind,
            mode: self.stat.st_mode,
            uid: self.stat.st_uid,
            gid: self.stat.st_gid,
            mtime_ns: mtime_ns(&self.stat),
            target: self.target.clone(),
        }
    }
}

/// Whether `path` is under a real `.snapshots` in the backing root: the mount shows the
/// snapshot view there instead, so no snapshot takes what nobody can see through the mount.
fn shadowed(path: &str) -> bool {
    let top = path.split('/').next().unwrap_or("");
    top == crate::ids::SNAPDIR_NAME
}

/// st_mtime in nanoseconds.
pub fn mtime_ns(st: &libc::stat) -> i128 {
    st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128
}

/// The group's part of the backing tree at one instant.
#[derive(Clone, Default)]
pub struct GroupTree {
    /// Selected regular files by inode (one path per inode: the first link found).
    pub volumes: HashMap<VolumeId, TreeEntry>,
    /// Directories (the root included, as "") and selected symlinks.
    pub namespace: Vec<NamespaceEntry>,
}

/// Walk the tree under `root` (an fd on the backing dir), skipping the directory `skip`
/// ((dev, ino) of the store), and keep what `sel` selects: the selected files and symlinks,
/// and the directories that lead to them (every directory for `Selection::All`).
pub fn walk(
    root: &OwnedFd,
    skip: Option<(u64, u64)>,
    sel: &Selection,
) -> std::io::Result<GroupTree> {
    let root_stat = sys::fstat(root.as_raw_fd())?;
    let mut dirs = vec![TreeEntry {
        path: String::new(),
        stat: root_stat,
        target: None,
    }];
    let mut files = Vec::new();
    let mut links = Vec::new();
    // Strict: only a name removed while we walk may be skipped; any other error would leave
    // part of the group out of the snapshot without a word.
    walk_tree(
        root.as_raw_fd(),
        skip,
        WalkErrors::Fail,
        |dir, name, path, st| {
            if shadowed(path) {
                return;
            }
            let mut entry = TreeEntry {
                path: path.to_string(),
                stat: *st,
                target: None,
            };
            match entry.kind() {
                libc::S_IFREG => files.push(entry),
                libc::S_IFLNK => {
                    if let Ok(fd) = sys::open_path(dir, name) {
                        if let Ok(t) = sys::readlink_fd(fd.as_raw_fd()) {
                            entry.target = Some(String::from_utf8_lossy(&t).into_owned());
                        }
                    }
                    links.push(entry);
                }
                libc::S_IFDIR => dirs.push(entry),
                // Fifos, sockets and devices are not volumes and hold no data to keep.
                _ => {}
            }
        },
    )?;
    let mut tree = GroupTree::default();
    let mut wanted: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut want_parents = |path: &str| {
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if !wanted.insert(p.to_string()) {
                break;
            }
        }
    };
    for f in files {
        if sel.matches(&f.path) {
            want_parents(&f.path);
            tree.volumes.entry(f.volume_id()).or_insert(f);
        }
    }
    for l in links {
        if sel.matches(&l.path) {
            want_parents(&l.path);
            tree.namespace.push(l.namespace_entry(EntryKind::Symlink));
        }
    }
    for d in dirs {
        if d.path.is_empty() || matches!(sel, Selection::All) || wanted.contains(&d.path) {
            tree.namespace.push(d.namespace_entry(EntryKind::Dir));
        }
    }
    tree.namespace.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &std::path::Path) -> OwnedFd {
        sys::open_dir_path(dir).unwrap()
    }

    #[test]
    fn globs_select_files_and_the_directories_leading_to_them() {
        let t = tempfile::tempdir().unwrap();
        let b = t.path();
        std::fs::create_dir_all(b.join("vms/old")).unwrap();
        std::fs::create_dir_all(b.join("db")).unwrap();
        std::fs::write(b.join("vms/a.img"), b"a").unwrap();
        std::fs::write(b.join("vms/old/b.img"), b"b").unwrap();
        std::fs::write(b.join("db/x.db"), b"x").unwrap();
        std::os::unix::fs::symlink("a.img", b.join("vms/cur.img")).unwrap();
        let sel = Selection::globs(&["vms/*.img".into()]).unwrap();
        let tree = walk(&root(b), None, &sel).unwrap();
        let mut paths: Vec<_> = tree.volumes.values().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(paths, vec!["vms/a.img"]);
        let ns: Vec<_> = tree.namespace.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(ns, vec!["", "vms", "vms/cur.img"]);
        let link = &tree.namespace[2];
        assert_eq!(
            (link.kind.clone(), link.target.as_deref()),
            (EntryKind::Symlink, Some("a.img"))
        );
        let sel = Selection::globs(&["vms/**/*.img".into()]).unwrap();
        assert_eq!(walk(&root(b), None, &sel).unwrap().volumes.len(), 2);
        let all = walk(&root(b), None, &Selection::All).unwrap();
        assert_eq!(all.volumes.len(), 3);
        assert_eq!(
            all.namespace.len(),
            5,
            "root, vms, vms/old, db, the symlink"
        );
    }

    #[test]
    fn a_real_snapshots_dir_in_the_backing_root_is_in_no_group() {
        let t = tempfile::tempdir().unwrap();
        let b = t.path();
        std::fs::create_dir_all(b.join(".snapshots/old")).unwrap();
        std::fs::write(b.join(".snapshots/old/x.img"), b"x").unwrap();
        std::fs::write(b.join(".snapshots-not.img"), b"y").unwrap();
        std::fs::create_dir_all(b.join("sub/.snapshots")).unwrap();
        std::fs::write(b.join("sub/.snapshots/z.img"), b"z").unwrap();
        let all = walk(&root(b), None, &Selection::All).unwrap();
        let mut paths: Vec<_> = all.volumes.values().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(paths, vec![".snapshots-not.img", "sub/.snapshots/z.img"]);
        assert!(all
            .namespace
            .iter()
            .all(|e| !e.path.starts_with(".snapshots/") && e.path != ".snapshots"));
        let sel = Selection::globs(&["**/*.img".into()]).unwrap();
        assert_eq!(walk(&root(b), None, &sel).unwrap().volumes.len(), 2);
    }

    #[test]
    fn bad_globs_are_refused_by_name() {
        assert!(Selection::globs(&["/etc/*".into()]).is_err());
        assert!(Selection::globs(&["a/../b".into()]).is_err());
        let e = Selection::globs(&["[".into()]).err().unwrap();
        assert!(e.contains("\"[\""), "{e}");
    }
}
