//! Reference-model test of the mount's namespace and data: proptest generates sequences of file
//! operations over a small, collision-prone namespace, applies each one to the mount and to a
//! plain dir (the model is the kernel's own filesystem), and demands the same result or errno at
//! every step. After each sequence both trees, and the backing dir, must match: names, kinds,
//! sizes, modes, contents, symlink targets and hard-link grouping with nlink.
//!
//! One mount serves every generated case (mounting per case is slow); each case starts by
//! emptying it through the mount. A shrunk failure becomes a named regression test at the bottom.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{Mount, Noise};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Paths the operations pick from: few enough that names collide, types clash and renames land
/// on existing entries. `x` and `y` are usually directories, `x/y` nests one deeper.
const PATHS: &[&str] = &[
    "a", "b", "c", "x", "y", "x/a", "x/b", "x/y", "y/a", "y/b", "x/y/a",
];

/// Symlink targets: relative and free of `..`, so that whichever directory a symlink ends up
/// in after renames, it can never lead out of the tree under test.
const TARGETS: &[&str] = &["a", "b", "x", "y/a", "x/y", "missing"];

const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o700, 0o444, 0o640, 0o1777, 0o4755, 0o2750,
];

/// What happens to a file between opening it and writing through the open descriptor.
#[derive(Clone, Debug)]
enum Detach {
    Nothing,
    Unlink(&'static str),
    Rename(&'static str, &'static str),
}

/// One file operation, applied the same way to the mount and to the plain dir.
#[derive(Clone, Debug)]
enum Op {
    /// open(O_CREAT|O_WRONLY, plus O_EXCL or O_TRUNC).
    Create {
        path: &'static str,
        mode: u32,
        excl: bool,
    },
    /// open(O_WRONLY), pwrite `len` bytes derived from `seed` at `offset`, close.
    Write {
        path: &'static str,
        offset: u64,
        len: usize,
        seed: u64,
    },
    /// truncate(2), up or down.
    Truncate {
        path: &'static str,
        size: u64,
    },
    /// renameat2 with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    Rename {
        from: &'static str,
        to: &'static str,
        flags: u32,
    },
    Unlink(&'static str),
    Mkdir {
        path: &'static str,
        mode: u32,
    },
    Rmdir(&'static str),
    /// link(2): a hard link `to` naming the inode at `from` (symlinks are not followed).
    Link {
        from: &'static str,
        to: &'static str,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Symlink {
        target: &'static str,
        path: &'static str,
    },
    /// Open `path` read-write, do `detach` (unlink or rename, maybe of this very file), then
    /// pwrite through the still-open descriptor and report fstat's size and nlink.
    HeldWrite {
        path: &'static str,
        detach: Detach,
        offset: u64,
        len: usize,
        seed: u64,
    },
    /// Read the whole file (following symlinks) and report its blake3.
    Read(&'static str),
    /// lstat and report kind, mode, size (not for directories) and nlink.
    Stat(&'static str),
}

fn path_strategy() -> impl Strategy<Value = &'static str> {
    prop::sample::select(PATHS)
}

fn mode_strategy() -> impl Strategy<Value = u32> {
    prop::sample::select(MODES)
}

/// Offsets up to 1 MiB, biased toward small ones and block edges so writes overlap.
fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8192,
        prop::sample::select(vec![0u64, 4095, 4096, 65535, 65536, 131072, 1 << 20]),
        0u64..=(1 << 20),
    ]
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..512, 1usize..=65536]
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8192,
        prop::sample::select(vec![0u64, 1, 4096, 65536, 65537, 1 << 20]),
        0u64..=(1 << 20) + 65536,
    ]
}

fn detach_strategy() -> impl Strategy<Value = Detach> {
    prop_oneof![
        Just(Detach::Nothing),
        path_strategy().prop_map(Detach::Unlink),
        (path_strategy(), path_strategy()).prop_map(|(a, b)| Detach::Rename(a, b)),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (path_strategy(), mode_strategy(), any::<bool>())
            .prop_map(|(path, mode, excl)| Op::Create { path, mode, excl }),
        5 => (path_strategy(), offset_strategy(), len_strategy(), any::<u64>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        2 => (path_strategy(), size_strategy()).prop_map(|(path, size)| Op::Truncate { path, size }),
        4 => (
            path_strategy(),
            path_strategy(),
            prop::sample::select(vec![0u32, 0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE])
        )
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => path_strategy().prop_map(Op::Unlink),
        3 => (path_strategy(), mode_strategy()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        1 => path_strategy().prop_map(Op::Rmdir),
        3 => (path_strategy(), path_strategy()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (path_strategy(), mode_strategy()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (prop::sample::select(TARGETS), path_strategy())
            .prop_map(|(target, path)| Op::Symlink { target, path }),
        2 => (path_strategy(), detach_strategy(), offset_strategy(), len_strategy(), any::<u64>())
            .prop_map(|(path, detach, offset, len, seed)| Op::HeldWrite {
                path,
                detach,
                offset,
                len,
                seed
            }),
        2 => path_strategy().prop_map(Op::Read),
        2 => path_strategy().prop_map(Op::Stat),
    ]
}

/// Every generated case starts from the three directories of this tree and some of its files, so that later operations find
/// something to act on instead of failing with ENOENT.
fn prelude() -> Vec<Op> {
    vec![
        Op::Mkdir {
            path: "x",
            mode: 0o755,
        },
        Op::Mkdir {
            path: "y",
            mode: 0o755,
        },
        Op::Mkdir {
            path: "x/y",
            mode: 0o755,
        },
        Op::Create {
            path: "a",
            mode: 0o644,
            excl: true,
        },
        Op::Write {
            path: "a",
            offset: 0,
            len: 100_000,
            seed: 11,
        },
        Op::Create {
            path: "b",
            mode: 0o600,
            excl: true,
        },
        Op::Create {
            path: "x/a",
            mode: 0o644,
            excl: true,
        },
        Op::Write {
            path: "x/a",
            offset: 65536,
            len: 5000,
            seed: 12,
        },
        Op::Create {
            path: "y/a",
            mode: 0o644,
            excl: true,
        },
        Op::Link {
            from: "a",
            to: "y/b",
        },
    ]
}

fn sequence_strategy() -> impl Strategy<Value = Vec<Op>> {
    let mut files = prelude();
    let dirs: Vec<Op> = files.drain(..3).collect();
    let n = files.len();
    (
        prop::sample::subsequence(files, n / 2..=n),
        prop::collection::vec(op_strategy(), 1..40),
    )
        .prop_map(move |(files, more)| {
            let mut ops = dirs.clone();
            ops.extend(files);
            ops.extend(more);
            ops
        })
}

fn cpath(root: &Path, rel: &str) -> CString {
    CString::new(root.join(rel).as_os_str().as_bytes()).expect("path without NUL")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// What one operation observed: Ok with a report (empty for most), or the errno.
type Outcome = Result<String, i32>;

fn check(ret: libc::c_int) -> Result<(), i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn pwrite_all(fd: libc::c_int, buf: &[u8], offset: u64) -> Result<(), i32> {
    let mut done = 0usize;
    while done < buf.len() {
        let n = unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            return Err(errno());
        }
        done += n as usize;
    }
    Ok(())
}

fn close(fd: libc::c_int) -> Result<(), i32> {
    check(unsafe { libc::close(fd) })
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        _ => "other",
    }
}

fn apply(root: &Path, op: &Op) -> Outcome {
    match op {
        Op::Create { path, mode, excl } => {
            let extra = if *excl { libc::O_EXCL } else { libc::O_TRUNC };
            let p = cpath(root, path);
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | extra,
                    *mode as libc::c_uint,
                )
            };
            check(fd)?;
            close(fd)?;
            Ok(String::new())
        }
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => {
            let p = cpath(root, path);
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            check(fd)?;
            let r = pwrite_all(fd, &Noise::new(*seed).bytes(*len), *offset);
            let c = close(fd);
            r?;
            c?;
            Ok(String::new())
        }
        Op::Truncate { path, size } => {
            let p = cpath(root, path);
            check(unsafe { libc::truncate(p.as_ptr(), *size as libc::off_t) })?;
            Ok(String::new())
        }
        Op::Rename { from, to, flags } => {
            let (f, t) = (cpath(root, from), cpath(root, to));
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    f.as_ptr(),
                    libc::AT_FDCWD,
                    t.as_ptr(),
                    *flags,
                )
            })?;
            Ok(String::new())
        }
        Op::Unlink(path) => {
            check(unsafe { libc::unlink(cpath(root, path).as_ptr()) })?;
            Ok(String::new())
        }
        Op::Mkdir { path, mode } => {
            check(unsafe { libc::mkdir(cpath(root, path).as_ptr(), *mode as libc::mode_t) })?;
            Ok(String::new())
        }
        Op::Rmdir(path) => {
            check(unsafe { libc::rmdir(cpath(root, path).as_ptr()) })?;
            Ok(String::new())
        }
        Op::Link { from, to } => {
            let (f, t) = (cpath(root, from), cpath(root, to));
            check(unsafe { libc::link(f.as_ptr(), t.as_ptr()) })?;
            Ok(String::new())
        }
        Op::Chmod { path, mode } => {
            check(unsafe { libc::chmod(cpath(root, path).as_ptr(), *mode as libc::mode_t) })?;
            Ok(String::new())
        }
        Op::Symlink { target, path } => {
            let t = CString::new(*target).expect("target");
            check(unsafe { libc::symlink(t.as_ptr(), cpath(root, path).as_ptr()) })?;
            Ok(String::new())
        }
        Op::HeldWrite {
            path,
            detach,
            offset,
            len,
            seed,
        } => {
            let p = cpath(root, path);
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            check(fd)?;
            let detached = match detach {
                Detach::Nothing => Ok(()),
                Detach::Unlink(q) => check(unsafe { libc::unlink(cpath(root, q).as_ptr()) }),
                Detach::Rename(a, b) => {
                    let (a, b) = (cpath(root, a), cpath(root, b));
                    check(unsafe { libc::rename(a.as_ptr(), b.as_ptr()) })
                }
            };
            let written = pwrite_all(fd, &Noise::new(*seed).bytes(*len), *offset);
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let stat = check(unsafe { libc::fstat(fd, &mut st) });
            let closed = close(fd);
            Ok(format!(
                "detach={detached:?} write={written:?} fstat={:?} close={closed:?}",
                stat.map(|()| (st.st_size, st.st_nlink))
            ))
        }
        Op::Read(path) => {
            let bytes = std::fs::read(root.join(path))
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            Ok(format!(
                "{} bytes, {}",
                bytes.len(),
                blake3::hash(&bytes).to_hex()
            ))
        }
        Op::Stat(path) => {
            let md = std::fs::symlink_metadata(root.join(path))
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let kind = kind_name(md.mode());
            let size = if kind == "dir" { 0 } else { md.size() };
            Ok(format!(
                "{kind} mode={:o} size={size} nlink={}",
                md.mode() & 0o7777,
                md.nlink()
            ))
        }
    }
}

/// One entry of a tree, everything a user would see except inode numbers and times.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    /// Permission bits in octal (0 for symlinks, whose mode means nothing).
    mode: String,
    /// Size for files and symlinks; directories' sizes depend on the filesystem's history.
    size: u64,
    nlink: u64,
    content: String,
}

/// A tree as entries by relative path, plus its hard-link groups (paths sharing an inode).
#[derive(Debug)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    links: Vec<Vec<String>>,
    /// Inode numbers as seen by the walk, for messages only: they differ between trees.
    inos: BTreeMap<String, u64>,
}

impl PartialEq for Tree {
    fn eq(&self, other: &Tree) -> bool {
        self.nodes == other.nodes && self.links == other.links
    }
}

fn walk(root: &Path, skip_store: bool) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut inos = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&dir))
            .unwrap_or_else(|e| panic!("readdir {}/{dir}: {e}", root.display()))
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        entries.sort();
        for name in entries {
            let name = name.to_string_lossy().into_owned();
            if skip_store && dir.is_empty() && name == ".grainfs" {
                continue;
            }
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let full = root.join(&rel);
            let md = std::fs::symlink_metadata(&full)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", full.display()));
            let kind = kind_name(md.mode());
            let (size, content, mode) = match kind {
                "file" => (md.size(), common::blake3_file(&full), md.mode() & 0o7777),
                "symlink" => {
                    let t = std::fs::read_link(&full).expect("readlink");
                    (md.size(), t.to_string_lossy().into_owned(), 0)
                }
                "dir" => {
                    stack.push(rel.clone());
                    (0, String::new(), md.mode() & 0o7777)
                }
                _ => (md.size(), String::new(), md.mode() & 0o7777),
            };
            inos.insert(rel.clone(), md.ino());
            if kind != "dir" {
                by_ino.entry(md.ino()).or_default().push(rel.clone());
            }
            nodes.insert(
                rel,
                Node {
                    kind,
                    mode: format!("{mode:o}"),
                    size,
                    nlink: md.nlink(),
                    content,
                },
            );
        }
    }
    let mut links: Vec<Vec<String>> = by_ino
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    links.sort();
    Tree { nodes, links, inos }
}

/// Empty the mount through the mount itself, and check that it really is empty on both sides.
fn clear(m: &Mount) {
    for e in std::fs::read_dir(m.path()).expect("readdir mount") {
        let e = e.expect("entry");
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).expect("lstat");
        if md.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .unwrap_or_else(|err| panic!("clearing {}: {err}", p.display()));
    }
    assert_eq!(std::fs::read_dir(m.path()).unwrap().count(), 0);
    let left: Vec<_> = std::fs::read_dir(m.backing())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".grainfs")
        .collect();
    assert!(
        left.is_empty(),
        "backing not empty after clearing: {left:?}"
    );
}

/// Apply `ops` to the mount (which must be empty) and to a fresh plain dir, comparing every
/// outcome and then the trees. Err says which step or what part of the tree differed.
fn run_sequence(m: &Mount, ops: &[Op]) -> Result<(), String> {
    let plain = common::plain_dir();
    let (mnt, model) = (m.path(), plain.path());
    for (i, op) in ops.iter().enumerate() {
        let want = apply(model, op);
        let got = apply(mnt, op);
        if want != got {
            return Err(format!(
                "step {i}: {op:?}\n  plain dir: {}\n  mount:     {}",
                show(&want),
                show(&got)
            ));
        }
    }
    let want = walk(model, false);
    let got = walk(mnt, false);
    if want != got {
        // Say whether the difference is a stale cache that time heals or lasting.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let later = walk(mnt, false);
        let verdict = if later == want {
            "gone after 2 s (stale kernel cache?)".to_owned()
        } else {
            format!("2 s later:\n{}", diff_trees(&want, &later))
        };
        return Err(format!(
            "tree differs after the sequence\n{}{verdict}\n{}",
            diff_trees(&want, &got),
            link_inodes(&want, mnt, m.backing())
        ));
    }
    let backing = walk(m.backing(), true);
    if want != backing {
        return Err(format!(
            "backing dir differs from the plain dir\n{}",
            diff_trees(&want, &backing)
        ));
    }
    // The kernel may forget any inode it is not using at any moment (memory pressure,
    // drop_caches); every name must come back with the st_ino it had.
    if forget_unused_inodes(mnt) {
        let after = inode_numbers(mnt);
        if after != got.inos {
            let changed: Vec<String> = got
                .inos
                .iter()
                .filter(|&(rel, ino)| after.get(rel) != Some(ino))
                .map(|(rel, ino)| format!("  {rel}: {ino} -> {:?}\n", after.get(rel)))
                .collect();
            return Err(format!(
                "inode numbers changed after the kernel forgot the mount's inodes\n{}",
                changed.concat()
            ));
        }
    }
    Ok(())
}

/// Make the kernel forget every inode of the mount that nothing holds, as memory pressure or
/// `drop_caches` may at any time: a remount prunes the mount's dentry cache, and with it the
/// inodes. False when that is not allowed (not root), and then nothing happened.
fn forget_unused_inodes(mnt: &Path) -> bool {
    let c = CString::new(mnt.as_os_str().as_bytes()).expect("path without NUL");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // A bare MS_REMOUNT would also clear nosuid, nodev, noexec and the atime flags.
    let keep = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
    .fold(0, |flags, (_, ms_flag)| flags | ms_flag);
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | keep,
            std::ptr::null(),
        )
    };
    r == 0
}

/// st_ino of every entry under `root` by relative path, without following symlinks.
fn inode_numbers(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(root.join(&dir)).expect("readdir") {
            let name = e.expect("dir entry").file_name();
            let name = name.to_string_lossy();
            let rel = if dir.is_empty() {
                name.into_owned()
            } else {
                format!("{dir}/{name}")
            };
            let md = std::fs::symlink_metadata(root.join(&rel)).expect("lstat");
            if md.is_dir() {
                stack.push(rel.clone());
            }
            out.insert(rel, md.ino());
        }
    }
    out
}

/// For each hard-link group of the plain tree, the inode numbers its names have now on the
/// mount and in the backing dir.
fn link_inodes(plain: &Tree, mnt: &Path, backing: &Path) -> String {
    let ino = |root: &Path, rel: &str| std::fs::symlink_metadata(root.join(rel)).map(|m| m.ino());
    let mut out = String::new();
    for group in &plain.links {
        for rel in group {
            out += &format!(
                "  {rel}: mount ino {:?}, backing ino {:?}\n",
                ino(mnt, rel),
                ino(backing, rel)
            );
        }
    }
    out
}

fn show(o: &Outcome) -> String {
    match o {
        Ok(s) if s.is_empty() => "Ok".into(),
        Ok(s) => format!("Ok({s})"),
        Err(e) => format!("Err({})", std::io::Error::from_raw_os_error(*e)),
    }
}

fn diff_trees(want: &Tree, got: &Tree) -> String {
    let mut out = String::new();
    for (p, n) in &want.nodes {
        match got.nodes.get(p) {
            None => out += &format!("  only in plain: {p} {n:?}\n"),
            Some(g) if g != n => out += &format!("  {p}:\n    plain {n:?}\n    mount {g:?}\n"),
            _ => {}
        }
    }
    for (p, n) in &got.nodes {
        if !want.nodes.contains_key(p) {
            out += &format!("  only in mount: {p} {n:?}\n");
        }
    }
    if want.links != got.links {
        out += &format!(
            "  hard-link groups:\n    plain {:?}\n    mount {:?}\n",
            want.links, got.links
        );
        for rel in want.links.iter().chain(&got.links).flatten() {
            out += &format!("    {rel}: mount ino {:?}\n", got.inos.get(rel));
        }
    }
    out
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

#[test]
fn mount_matches_plain_dir() {
    let m = Mount::new();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&sequence_strategy(), |ops| {
        clear(&m);
        run_sequence(&m, &ops).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Run one fixed sequence on a fresh mount (for the regressions below).
fn regression(ops: &[Op]) {
    let m = Mount::new();
    if let Err(e) = run_sequence(&m, ops) {
        panic!("{e}");
    }
}

// Shrunk failures found by `mount_matches_plain_dir`, kept as named regressions.
#[allow(unused_imports)]
use Detach::{Nothing, Rename as DRename, Unlink as DUnlink};
#[allow(unused_imports)]
use Op::*;

#[test]
fn write_through_one_hard_link_shows_through_the_other() {
    regression(&[
        Create {
            path: "a",
            mode: 0o644,
            excl: true,
        },
        Link { from: "a", to: "x" },
        Stat("x"),
        Write {
            path: "x",
            offset: 4095,
            len: 3000,
            seed: 1,
        },
        Stat("a"),
        Read("a"),
        HeldWrite {
            path: "a",
            detach: DUnlink("a"),
            offset: 70000,
            len: 10,
            seed: 2,
        },
        Stat("x"),
        Read("x"),
    ]);
}

/// Found by the model: `a` and `y/b`, one hard-linked file, showed two st_ino until the entry
/// cache timed out. The kernel had forgotten the inode between the lookups of the two names
/// (it may, whenever nothing holds it), and the next lookup numbered the same file afresh.
#[test]
fn hard_link_keeps_its_inode_number_after_the_kernel_forgets_it() {
    let m = Mount::new();
    for op in &prelude() {
        apply(m.path(), op).unwrap_or_else(|e| panic!("{op:?}: errno {e}"));
    }
    let before = inode_numbers(m.path());
    assert_eq!(before["a"], before["y/b"], "one file, one inode number");
    if !forget_unused_inodes(m.path()) {
        eprintln!("SKIP: remounting (to make the kernel forget inodes) needs root");
        return;
    }
    // FORGET reaches the daemon asynchronously; let it land before the next lookups.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        inode_numbers(m.path()),
        before,
        "st_ino of every name after the kernel forgot the inodes"
    );
}

/// Found by the model: the daemon's chown of new files cleared setuid and setgid.
#[test]
fn create_keeps_setuid_bit() {
    regression(&[
        Create {
            path: "a",
            mode: 0o4755,
            excl: false,
        },
        Stat("a"),
        Create {
            path: "b",
            mode: 0o2755,
            excl: true,
        },
    ]);
}
