//! How a snapshot's tree is built from its manifest: directories first (recorded ones keep
//! their attributes, missing parents are made up), then files and symlinks; an entry that
//! cannot be placed is logged and left out, never shown somewhere it does not belong.
//!
//! Pure: it reads a manifest and returns nodes, and never touches the store or the kernel.

use super::*;

/// A node of a tree being planned from a manifest (indices instead of inode numbers).
struct Planned {
    name: OsString,
    parent: usize,
    kind: FileKind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    size: u64,
    volume: Option<VolumeId>,
    target: Vec<u8>,
    children: Vec<usize>,
    /// A directory the manifest does not record (a parent of something it does): a recorded
    /// entry for the same path replaces its attributes.
    synthesized: bool,
}

/// A snapshot's tree planned from its manifest; index 0 is the root.
pub(super) struct Plan {
    nodes: Vec<Planned>,
    by_name: HashMap<(usize, String), usize>,
    /// Attributes of a synthesized directory.
    synth: (u32, u32, SystemTime),
}

/// The components of a manifest path; None when one is "." or ".." (a damaged manifest: such
/// an entry is left out rather than shown somewhere it does not belong).
fn components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    (!parts.iter().any(|c| *c == "." || *c == "..")).then_some(parts)
}

impl Plan {
    /// How many nodes (and inode numbers) the tree takes.
    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The tree of manifest `m`. Directories come first, so a file or symlink under a path
    /// recorded as something else is what is left out; every left-out entry is logged.
    /// Regular files lose their setuid and setgid bits unless `setuid`.
    pub(super) fn of(m: &Manifest, uid: u32, gid: u32, setuid: bool) -> Plan {
        let created = time_ns(m.created_ns as i128);
        let mut plan = Plan {
            nodes: Vec::new(),
            by_name: HashMap::new(),
            synth: (uid, gid, created),
        };
        plan.nodes.push(plan.synthesized(OsString::new(), 0));
        let skip = |path: &str, why: &str| warn!("snapshot {}: {path:?}: {why}; left out", m.name);
        for e in m.namespace.iter().filter(|e| e.kind == EntryKind::Dir) {
            let Some(parts) = components(&e.path) else {
                skip(&e.path, "not a plain relative path");
                continue;
            };
            let Some(i) = plan.dir(&parts) else {
                skip(&e.path, "under a path that is not a directory");
                continue;
            };
            let n = &mut plan.nodes[i];
            if !n.synthesized {
                skip(&e.path, "recorded twice");
                continue;
            }
            n.synthesized = false;
            (n.perm, n.uid, n.gid, n.mtime) = (e.mode, e.uid, e.gid, time_ns(e.mtime_ns));
        }
        // A snapshot keeps a program as it was, setuid root included: shown with the bit, a
        // program whose bit was dropped (a fixed vulnerability) would keep running as root
        // from the snapshot. The view therefore grants no privilege by default.
        let privilege = if setuid {
            0
        } else {
            libc::S_ISUID | libc::S_ISGID
        };
        let files = m.volumes.iter().map(|v| {
            let mode = v.mode & !privilege;
            let mut p = plan_leaf(FileKind::Regular, mode, v.uid, v.gid, v.mtime_ns);
            (p.size, p.volume) = (v.size, Some(v.id));
            (&v.path, p)
        });
        let links = m
            .namespace
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| {
                let mut p = plan_leaf(FileKind::Symlink, e.mode, e.uid, e.gid, e.mtime_ns);
                p.target = e.target.clone().unwrap_or_default().into_bytes();
                p.size = p.target.len() as u64;
                (&e.path, p)
            });
        let leaves: Vec<_> = files.chain(links).collect();
        for (path, leaf) in leaves {
            let Some((name, parents)) = components(path).and_then(|p| {
                let (name, parents) = p.split_last()?;
                Some((name.to_string(), parents.to_vec()))
            }) else {
                skip(path, "not a plain relative path to a file");
                continue;
            };
            let Some(parent) = plan.dir(&parents) else {
                skip(path, "under a path that is not a directory");
                continue;
            };
            if plan.by_name.contains_key(&(parent, name.clone())) {
                skip(path, "recorded twice");
                continue;
            }
            plan.add(parent, name, leaf);
        }
        plan
    }

    fn synthesized(&self, name: OsString, parent: usize) -> Planned {
        let (uid, gid, mtime) = self.synth;
        Planned {
            name,
            parent,
            kind: FileKind::Directory,
            perm: 0o755,
            uid,
            gid,
            mtime,
            size: 0,
            volume: None,
            target: Vec::new(),
            children: Vec::new(),
            synthesized: true,
        }
    }

    fn add(&mut self, parent: usize, name: String, mut node: Planned) -> usize {
        let i = self.nodes.len();
        node.name = OsString::from(&name);
        node.parent = parent;
        self.nodes.push(node);
        self.nodes[parent].children.push(i);
        self.by_name.insert((parent, name), i);
        i
    }

    /// The directory at `parts`, synthesizing missing ones; None when a component is not one.
    fn dir(&mut self, parts: &[&str]) -> Option<usize> {
        let mut at = 0;
        for part in parts {
            at = match self.by_name.get(&(at, part.to_string())) {
                Some(&i) if self.nodes[i].kind == FileKind::Directory => i,
                Some(_) => return None,
                None => {
                    let d = self.synthesized(OsString::new(), at);
                    self.add(at, part.to_string(), d)
                }
            };
        }
        Some(at)
    }

    /// The nodes, numbered from `base` in plan order (the root is `base`).
    pub(super) fn into_nodes(self, base: u64, tree: &Arc<Tree>, block_size: u64) -> Vec<Node> {
        let ino = |i: usize| base + i as u64;
        let blksize = block_size.clamp(512, u32::MAX as u64) as u32;
        let kinds: Vec<FileKind> = self.nodes.iter().map(|n| n.kind).collect();
        let names: Vec<OsString> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.nodes
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let body = match (p.kind, p.volume) {
                    (FileKind::Directory, _) => {
                        let mut children: Listing = p
                            .children
                            .iter()
                            .map(|&c| (names[c].clone(), ino(c), kinds[c]))
                            .collect();
                        children.sort_by(|a, b| a.0.cmp(&b.0));
                        Body::Dir(children)
                    }
                    (_, Some(volume)) => Body::File {
                        tree: tree.clone(),
                        volume,
                    },
                    _ => Body::Symlink(p.target),
                };
                // A directory's link count: itself, its entry in the parent, each subdirectory's "..".
                let nlink = match &body {
                    Body::Dir(children) => {
                        2 + children
                            .iter()
                            .filter(|c| c.2 == FileKind::Directory)
                            .count() as u32
                    }
                    _ => 1,
                };
                let attr = Attr {
                    ino: ino(i),
                    size: p.size,
                    blocks: p.size.div_ceil(512),
                    nlink,
                    blksize,
                    ..node_attr(p.kind, p.perm, p.uid, p.gid, p.mtime)
                };
                Node {
                    attr,
                    // The root's parent is `.snapshots`.
                    parent: if i == 0 { SNAPDIR_INO } else { ino(p.parent) },
                    body,
                }
            })
            .collect()
    }
}

fn plan_leaf(kind: FileKind, mode: u32, uid: u32, gid: u32, mtime_ns: i128) -> Planned {
    Planned {
        name: OsString::new(),
        parent: 0,
        kind,
        perm: mode,
        uid,
        gid,
        mtime: time_ns(mtime_ns),
        size: 0,
        volume: None,
        target: Vec::new(),
        children: Vec::new(),
        synthesized: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Geometry;
    use crate::store::{NamespaceEntry, VolumeEntry};

    const UID: u32 = 4242;
    const GID: u32 = 4343;
    const CREATED: u64 = 1_700_000_000_000_000_000;

    fn manifest(volumes: &[(&str, u64)], namespace: Vec<NamespaceEntry>) -> Manifest {
        Manifest {
            format: crate::store::FORMAT,
            capture_ms: None,
            name: "s".into(),
            group: "all".into(),
            created_ns: CREATED,
            parent: None,
            geometry: Geometry {
                block_size: 65536,
                partition_size: 1 << 26,
            },
            volumes: volumes
                .iter()
                .map(|&(path, ino)| VolumeEntry {
                    id: VolumeId { dev: 9, ino },
                    path: path.into(),
                    size: ino * 1000,
                    mode: 0o100600,
                    uid: 1,
                    gid: 2,
                    mtime_ns: 5_000_000_007,
                    partitions: Vec::new(),
                    table: None,
                    records: 0,
                    stored_bytes: 0,
                    gen: None,
                    birth_ns: None,
                    unhashed: Vec::new(),
                })
                .collect(),
            packs: Vec::new(),
            namespace,
        }
    }

    fn ns(path: &str, kind: EntryKind, mode: u32) -> NamespaceEntry {
        NamespaceEntry {
            path: path.into(),
            kind,
            mode,
            uid: 7,
            gid: 8,
            mtime_ns: -1_500_000_000,
            target: Some("t".into()),
        }
    }

    /// The tree as (path, kind, perm, uid) lines, plus the nodes by path.
    fn tree_of(m: &Manifest) -> (Vec<String>, HashMap<String, Node>) {
        let tree = Arc::new(Tree {
            name: "s".into(),
            created_ns: CREATED,
            root: 100,
        });
        let nodes = Plan::of(m, UID, GID, false).into_nodes(100, &tree, 65536);
        let by_ino: HashMap<u64, &Node> = nodes.iter().map(|n| (n.attr.ino, n)).collect();
        let mut paths = HashMap::new();
        let mut lines = Vec::new();
        let mut stack = vec![(String::new(), 100u64)];
        while let Some((path, ino)) = stack.pop() {
            let n = by_ino[&ino];
            lines.push(format!(
                "{path:?} {:?} {:o} {}",
                n.attr.kind, n.attr.perm, n.attr.uid
            ));
            if let Body::Dir(children) = &n.body {
                for (name, c, _) in children.iter().rev() {
                    let p = format!("{path}/{}", name.to_string_lossy());
                    stack.push((p.trim_start_matches('/').to_string(), *c));
                }
            }
            paths.insert(path, ino);
        }
        let mut nodes: HashMap<u64, Node> = nodes.into_iter().map(|n| (n.attr.ino, n)).collect();
        let by_path = paths
            .into_iter()
            .map(|(p, ino)| (p, nodes.remove(&ino).expect("node")))
            .collect();
        (lines, by_path)
    }

    #[test]
    fn recorded_entries_keep_their_attributes_and_missing_parents_are_made_up() {
        let m = manifest(
            &[("vms/a.img", 1), ("deep/er/b.raw", 2), ("/top//c", 3)],
            vec![
                // After a volume under it: still replaces the made-up directory.
                ns("vms", EntryKind::Dir, 0o40700),
                ns("", EntryKind::Dir, 0o40750),
                ns("vms/link", EntryKind::Symlink, 0o120777),
            ],
        );
        let (lines, nodes) = tree_of(&m);
        assert_eq!(
            lines,
            [
                "\"\" Directory 750 7",
                "\"deep\" Directory 755 4242",
                "\"deep/er\" Directory 755 4242",
                "\"deep/er/b.raw\" Regular 600 1",
                "\"top\" Directory 755 4242",
                "\"top/c\" Regular 600 1",
                "\"vms\" Directory 700 7",
                "\"vms/a.img\" Regular 600 1",
                "\"vms/link\" Symlink 777 7",
            ]
        );
        let root = &nodes[""];
        assert_eq!(root.parent, SNAPDIR_INO);
        assert_eq!(root.attr.ino, 100);
        assert_eq!(root.attr.nlink, 5, "root: 2 + deep, top, vms");
        assert_eq!(root.attr.mtime, time_ns(-1_500_000_000));
        let deep = &nodes["deep"];
        assert_eq!((deep.attr.uid, deep.attr.gid), (UID, GID));
        assert_eq!(deep.attr.mtime, time_ns(CREATED as i128));
        let a = &nodes["vms/a.img"];
        assert_eq!((a.attr.size, a.attr.blocks, a.attr.nlink), (1000, 2, 1));
        assert_eq!(a.attr.mtime, time_ns(5_000_000_007));
        assert_eq!(a.attr.blksize, 65536);
        assert!(matches!(a.body, Body::File { volume, .. } if volume.ino == 1));
        assert_eq!(a.parent, nodes["vms"].attr.ino);
        let link = &nodes["vms/link"];
        assert!(matches!(&link.body, Body::Symlink(t) if t == b"t"));
        assert_eq!(link.attr.size, 1);
    }

    #[test]
    fn entries_that_cannot_be_placed_are_left_out() {
        let m = manifest(
            &[
                ("a", 1),
                ("a/under-a-file", 2),
                ("x/../escape", 3),
                ("d", 4),
            ],
            vec![
                ns("a/b", EntryKind::Dir, 0o755),
                ns("d", EntryKind::Dir, 0o700),
                ns("d", EntryKind::Dir, 0o711),
                ns("a", EntryKind::Symlink, 0o777),
                ns("./dot", EntryKind::Dir, 0o777),
            ],
        );
        let (lines, _) = tree_of(&m);
        // Directories are placed first: the volumes and the symlink named like one are what
        // is left out, as are the paths with "." or "..", and the second record of "d".
        assert_eq!(
            lines,
            [
                "\"\" Directory 755 4242",
                "\"a\" Directory 755 4242",
                "\"a/b\" Directory 755 7",
                "\"a/under-a-file\" Regular 600 1",
                "\"d\" Directory 700 7",
            ]
        );
    }

    #[test]
    fn setuid_and_setgid_bits_of_files_show_only_when_asked() {
        let mut m = manifest(&[("bin/su", 1)], vec![ns("bin", EntryKind::Dir, 0o42755)]);
        m.volumes[0].mode = 0o106755;
        let tree = Arc::new(Tree {
            name: "s".into(),
            created_ns: CREATED,
            root: 100,
        });
        let perms = |setuid| {
            let nodes = Plan::of(&m, UID, GID, setuid).into_nodes(100, &tree, 65536);
            let perm = |kind| {
                nodes
                    .iter()
                    .find(|n| n.attr.kind == kind && n.attr.ino != 100)
                    .map(|n| n.attr.perm)
            };
            (perm(FileKind::Regular), perm(FileKind::Directory))
        };
        // A directory's setgid only says which group new entries get: it stays.
        assert_eq!(perms(false), (Some(0o755), Some(0o2755)));
        assert_eq!(perms(true), (Some(0o6755), Some(0o2755)));
    }

    #[test]
    fn nanosecond_times_convert_on_both_sides_of_the_epoch() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(
            time_ns(1_500_000_001),
            UNIX_EPOCH + Duration::new(1, 500_000_001)
        );
        assert_eq!(time_ns(-1), UNIX_EPOCH - Duration::from_nanos(1));
        assert_eq!(
            time_ns(-1_500_000_000),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
    }
}
