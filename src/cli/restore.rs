//! `grainfs restore NAME [PATH...] --to DIR`: write a snapshot's files, directories and symlinks
//! (all of them, or the subtrees PATH names) under DIR, with their modes, owners and times. It
//! reads the store directly, daemon or not, and never changes it; the blocks are checked and
//! copied by the store (`VolumeExtents::place`: blake3 first, then `copy_file_range`, holes
//! left as holes).
//!
//! Everything under DIR is reached through directory fds (`openat2` beneath DIR refusing every
//! symlink, `*at` calls, `O_NOFOLLOW`): a symlink already in DIR, or one being restored, is
//! never followed. A file is built under a temp name in its directory and renamed into place
//! only once its data, owner, mode and times are set and fsynced: a failed or interrupted
//! restore leaves no file that looks complete. Nothing in DIR is replaced without `--force`, and
//! a directory in the way is never removed.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args as ClapArgs;
use serde::Serialize;

use super::progress::Progress;
use super::snapshot::{locate, open_store, print_json, Where};
use super::status::human;
use super::CliError;
use crate::ids::{SnapshotName, VolumeId};
use crate::store::{EntryKind, Manifest, Placed, Store, VolumeExtents};
use crate::sys;

/// Arguments of `grainfs restore`.
#[derive(Debug, ClapArgs)]
pub struct RestoreArgs {
    /// The snapshot to restore.
    pub name: String,
    /// Files or directories of the snapshot to restore, relative to its root (default:
    /// everything); each must name something in the snapshot.
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// Where to write them (created if missing), at their paths in the snapshot.
    #[arg(long = "to", value_name = "DIR")]
    pub to: PathBuf,
    /// Replace files and symlinks already in DIR (a directory in the way is never removed).
    #[arg(long)]
    pub force: bool,
    /// Print a final report as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

/// `restore --json`: these fields and names stay stable for scripts.
#[derive(Debug, Default, Serialize)]
struct Report {
    snapshot: String,
    to: String,
    files: u64,
    dirs: u64,
    symlinks: u64,
    /// Sum of the restored files' sizes.
    logical_bytes: u64,
    /// Bytes of data put into the files (the rest are holes).
    bytes_written: u64,
    /// Of those, bytes the kernel copied from the store's packs (`copy_file_range`: shared
    /// extents where the filesystem reflinks).
    bytes_copied: u64,
    /// Stored blocks of zeros left as holes.
    zero_bytes: u64,
    /// Whether owners were restored (only root can give files away).
    owners_restored: bool,
    elapsed_ms: u64,
}

/// Attributes the snapshot records for an entry.
#[derive(Clone, Copy, Debug)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
}

#[derive(Clone, Debug)]
enum Kind {
    /// `meta` None: a parent the snapshot does not record (made with default attributes).
    Dir,
    Symlink(CString),
    File(VolumeId),
}

#[derive(Clone, Debug)]
struct Entry {
    kind: Kind,
    meta: Option<Meta>,
}

/// What is in DIR at an entry's path.
enum Found {
    Nothing,
    Dir,
    Other,
}

pub(super) fn run(args: &RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let (_, _, store) = locate(&args.at)?;
    let store = open_store(&store)?;
    let name = SnapshotName::parse(&args.name).map_err(|e| CliError::Usage(e.to_string()))?;
    let manifest = store.manifest(&name).map_err(usage)?;
    let (root_meta, entries) = plan(&manifest, &args.paths)?;

    let to = &args.to;
    let existed = match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => match std::fs::metadata(to) {
            Ok(m) if m.is_dir() => true,
            _ => {
                return Err(CliError::Usage(format!(
                    "{}: not a directory",
                    to.display()
                )))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(CliError::Io {
                what: to.display().to_string(),
                source,
            })
        }
    };
    if existed {
        let root = open_root(to)?;
        check_destination(&root, to, &entries, args.force)?;
    } else {
        std::fs::create_dir_all(to).map_err(|source| CliError::Io {
            what: format!("creating {}", to.display()),
            source,
        })?;
    }
    let root = open_root(to)?;

    let me = (sys::geteuid(), sys::getegid());
    let owners_restored = me.0 == 0;
    if !owners_restored
        && entries
            .values()
            .filter_map(|e| e.meta)
            .chain(root_meta.filter(|_| !existed))
            .any(|m| (m.uid, m.gid) != me)
    {
        eprintln!(
            "grainfs: warning: not running as root: the restored files belong to you (uid {}, \
             gid {}), not to the owners the snapshot records",
            me.0, me.1
        );
    }

    // Ctrl-C (or SIGTERM) stops at the next block and removes the file being built; a second
    // one ends the command at once.
    let stop = Arc::new(AtomicBool::new(false));
    let mut handlers = Vec::new();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Ok(h) = signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone()) {
            handlers.push(h);
        }
        if let Ok(h) = signal_hook::flag::register(sig, stop.clone()) {
            handlers.push(h);
        }
    }

    let mut r = Restore {
        store: &store,
        manifest,
        root: &root,
        to,
        force: args.force,
        owners: owners_restored,
        stop: &stop,
        buf: Vec::new(),
        report: Report {
            snapshot: name.to_string(),
            to: to.display().to_string(),
            owners_restored,
            ..Report::default()
        },
    };
    let result = r.all(&entries, if existed { None } else { root_meta }, args.json);
    for h in handlers {
        signal_hook::low_level::unregister(h);
    }
    result?;
    // Renames and directory attributes made durable with one sync of DIR's filesystem (each
    // file's data was fsynced before its rename).
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
        return Err(io_err(to, "", io::Error::last_os_error()));
    }
    let mut report = r.report;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    if args.json {
        print_json(&report)
    } else {
        println!(
            "restored {} to {}: {} file(s) ({}, {} of data), {} dir(s), {} symlink(s) in {:.1} s",
            report.snapshot,
            report.to,
            report.files,
            human(report.logical_bytes),
            human(report.bytes_written),
            report.dirs,
            report.symlinks,
            report.elapsed_ms as f64 / 1000.0
        );
        Ok(())
    }
}

fn usage(e: crate::store::StoreError) -> CliError {
    CliError::Usage(e.to_string())
}

fn io_err(to: &Path, rel: &str, source: io::Error) -> CliError {
    CliError::Io {
        what: shown(to, rel),
        source,
    }
}

/// `DIR/rel` as the user sees it.
fn shown(to: &Path, rel: &str) -> String {
    if rel.is_empty() {
        to.display().to_string()
    } else {
        to.join(rel).display().to_string()
    }
}

/// DIR itself, as given (the one path followed as the user wrote it), opened for reads: the
/// fd every other call is relative to, and what `syncfs` needs.
fn open_root(to: &Path) -> Result<OwnedFd, CliError> {
    let c = CString::new(to.as_os_str().as_encoded_bytes())
        .map_err(|_| CliError::Usage(format!("{}: not a valid path", to.display())))?;
    sys::openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| io_err(to, "", e))
}

/// The components of a manifest path; None when one is empty, "." or "..".
fn components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    (!parts
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".."))
    .then_some(parts)
}

/// A PATH argument as a manifest path ("" for the whole snapshot); None if it leaves the root.
fn normalize(p: &str) -> Option<String> {
    let mut out = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    (!p.starts_with('/')).then(|| out.join("/"))
}

fn meta_of(mode: u32, uid: u32, gid: u32, mtime_ns: i128) -> Option<Meta> {
    Some(Meta {
        mode,
        uid,
        gid,
        mtime_ns,
    })
}

/// What to restore, by path (parents sort before their children): the entries PATHs select
/// and the directories leading to them; plus the root's recorded attributes.
#[allow(clippy::type_complexity)]
fn plan(
    m: &Manifest,
    paths: &[String],
) -> Result<(Option<Meta>, BTreeMap<String, Entry>), CliError> {
    let skip = |path: &str, why: &str| {
        log::warn!("snapshot {}: {path:?}: {why}; not restored", m.name);
    };
    let mut all: BTreeMap<String, Entry> = BTreeMap::new();
    let mut root = None;
    let mut add = |all: &mut BTreeMap<String, Entry>, path: &str, e: Entry| {
        if path.is_empty() && matches!(e.kind, Kind::Dir) {
            root = e.meta;
            return;
        }
        if components(path).is_none() {
            skip(path, "not a plain relative path");
        } else if all.contains_key(path) {
            skip(path, "recorded twice");
        } else {
            all.insert(path.to_string(), e);
        }
    };
    for n in &m.namespace {
        let kind = match (&n.kind, &n.target) {
            (EntryKind::Dir, _) => Kind::Dir,
            (EntryKind::Symlink, Some(t)) => match CString::new(t.as_bytes()) {
                Ok(c) => Kind::Symlink(c),
                Err(_) => {
                    skip(&n.path, "a symlink target with a NUL byte");
                    continue;
                }
            },
            (EntryKind::Symlink, None) => {
                skip(&n.path, "a symlink without a target");
                continue;
            }
        };
        let meta = meta_of(n.mode, n.uid, n.gid, n.mtime_ns);
        add(&mut all, &n.path, Entry { kind, meta });
    }
    for v in &m.volumes {
        let meta = meta_of(v.mode, v.uid, v.gid, v.mtime_ns);
        let kind = Kind::File(v.id);
        add(&mut all, &v.path, Entry { kind, meta });
    }
    // An entry under something that is not a directory cannot be placed.
    let bad: Vec<String> = all
        .keys()
        .filter(|p| ancestors(p).any(|a| all.get(a).is_some_and(|e| !matches!(e.kind, Kind::Dir))))
        .cloned()
        .collect();
    for p in bad {
        skip(&p, "under a path that is not a directory");
        all.remove(&p);
    }

    let wanted: Vec<String> = paths
        .iter()
        .map(|p| {
            normalize(p).ok_or_else(|| {
                CliError::Usage(format!(
                    "{p:?}: give paths relative to the snapshot's root, without \"..\""
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut chosen: BTreeMap<String, Entry> =
        if wanted.is_empty() || wanted.contains(&String::new()) {
            all.clone()
        } else {
            let mut chosen = BTreeMap::new();
            for (w, given) in wanted.iter().zip(paths) {
                let prefix = format!("{w}/");
                let mut any = false;
                for (p, e) in all.range(w.clone()..) {
                    if p != w && !p.starts_with(&prefix) {
                        if p.as_str() > prefix.as_str() {
                            break;
                        }
                        continue;
                    }
                    any = true;
                    chosen.insert(p.clone(), e.clone());
                }
                if !any {
                    return Err(CliError::Usage(format!(
                        "{given:?} is not in snapshot {}",
                        m.name
                    )));
                }
            }
            chosen
        };
    // The directories leading to what was chosen: recorded ones with their attributes, the
    // others made up.
    let parents: HashSet<String> = chosen
        .keys()
        .flat_map(|p| ancestors(p).map(str::to_string).collect::<Vec<_>>())
        .collect();
    for p in parents {
        let e = all.get(&p).cloned().unwrap_or(Entry {
            kind: Kind::Dir,
            meta: None,
        });
        chosen.entry(p).or_insert(e);
    }
    Ok((root, chosen))
}

/// The proper ancestors of a relative path, nearest first ("a/b/c" -> "a/b", "a").
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut p = path;
    std::iter::from_fn(move || {
        let i = p.rfind('/')?;
        p = &p[..i];
        Some(p)
    })
}

/// Split "a/b/c" into ("a/b", "c").
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn cname(name: &str) -> io::Result<CString> {
    sys::name_cstr(std::ffi::OsStr::new(name))
}

/// An `O_PATH` fd on directory `rel` under `root`, refusing any symlink on the way.
fn dir_fd(root: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    if rel.is_empty() {
        root.try_clone()
    } else {
        sys::open_beneath(
            root.as_raw_fd(),
            rel,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
    }
}

/// What DIR holds at `rel`, never following a symlink.
fn found(root: &OwnedFd, rel: &str) -> io::Result<Found> {
    let (parent, name) = split(rel);
    let dir = match dir_fd(root, parent) {
        Ok(d) => d,
        // A parent missing, or in the way as something else (checked as its own entry first).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
            ) =>
        {
            return Ok(Found::Nothing)
        }
        Err(e) => return Err(e),
    };
    match sys::fstatat(dir.as_raw_fd(), &cname(name)?) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(Found::Dir),
        Ok(_) => Ok(Found::Other),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Found::Nothing),
        Err(e) => Err(e),
    }
}

/// Refuse, before anything is written, what would replace something in DIR: without
/// `--force` any file or symlink in the way (the first one is named); with it, only a
/// directory where the snapshot has a file or symlink. A directory already there is used.
fn check_destination(
    root: &OwnedFd,
    to: &Path,
    entries: &BTreeMap<String, Entry>,
    force: bool,
) -> Result<(), CliError> {
    for (rel, e) in entries {
        let there = found(root, rel).map_err(|err| io_err(to, rel, err))?;
        match (&e.kind, there) {
            (_, Found::Nothing) | (Kind::Dir, Found::Dir) => {}
            (Kind::Dir, Found::Other) | (Kind::File(_) | Kind::Symlink(_), Found::Other)
                if force => {}
            (Kind::File(_) | Kind::Symlink(_), Found::Dir) => {
                return Err(CliError::Usage(format!(
                    "{} is a directory, where the snapshot has a {}: remove it first (--force \
                     never removes a directory); nothing was restored",
                    shown(to, rel),
                    if matches!(e.kind, Kind::File(_)) {
                        "file"
                    } else {
                        "symlink"
                    }
                )))
            }
            (_, Found::Other) => {
                return Err(CliError::Usage(format!(
                    "{} exists: restore elsewhere, or add --force to replace files and \
                     symlinks; nothing was restored",
                    shown(to, rel)
                )))
            }
        }
    }
    Ok(())
}

/// Times for utimensat: atime = mtime = the recorded mtime.
fn times(mtime_ns: i128) -> [libc::timespec; 2] {
    const NS: i128 = 1_000_000_000;
    let t = libc::timespec {
        tv_sec: mtime_ns
            .div_euclid(NS)
            .clamp(i64::MIN as i128, i64::MAX as i128) as libc::time_t,
        tv_nsec: mtime_ns.rem_euclid(NS) as libc::c_long,
    };
    [t, t]
}

/// A temp name in the entry's directory, hidden and short (a name near NAME_MAX still fits).
fn temp_name(n: &mut u64) -> CString {
    *n += 1;
    CString::new(format!(".grainfs-restore.{}.{}", std::process::id(), n)).unwrap_or_default()
}

/// One restore under way.
struct Restore<'a> {
    store: &'a Store,
    manifest: Manifest,
    root: &'a OwnedFd,
    to: &'a Path,
    force: bool,
    owners: bool,
    stop: &'a AtomicBool,
    buf: Vec<u8>,
    report: Report,
}

impl Restore<'_> {
    fn all(
        &mut self,
        entries: &BTreeMap<String, Entry>,
        root_meta: Option<Meta>,
        quiet: bool,
    ) -> Result<(), CliError> {
        // Volumes resolve one at a time (holding every pack of a large tree open at once
        // could run out of fds); the bar's total is their data bytes.
        let mut total = 0;
        for e in entries.values() {
            if let Kind::File(id) = e.kind {
                total += self
                    .store
                    .volume_data_bytes(&self.manifest, id)
                    .unwrap_or(0);
            }
        }
        let bar = Progress::bytes("restore", total, quiet);
        let mut made = Vec::new();
        for (rel, e) in entries {
            if let Kind::Dir = e.kind {
                if self.mkdir(rel)? {
                    made.push((rel.as_str(), e.meta));
                }
                self.report.dirs += u64::from(e.meta.is_some());
            }
        }
        let mut tmp = 0;
        for (rel, e) in entries {
            self.cancelled()?;
            match &e.kind {
                Kind::Dir => {}
                Kind::File(id) => {
                    bar.message(rel.clone());
                    self.file(rel, *id, e.meta, &mut tmp, &bar)?;
                    self.report.files += 1;
                }
                Kind::Symlink(target) => {
                    self.symlink(rel, target, e.meta, &mut tmp)?;
                    self.report.symlinks += 1;
                }
            }
        }
        bar.finish();
        // Directories last, deepest first: writing into one changes its mtime, and its mode
        // may forbid the writes.
        made.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
        for (rel, meta) in made {
            if let Some(m) = meta {
                let fd = dir_fd(self.root, rel).map_err(|e| io_err(self.to, rel, e))?;
                self.attrs(&fd, rel, m, false)?;
            }
        }
        if let Some(m) = root_meta {
            let fd = dir_fd(self.root, "").map_err(|e| io_err(self.to, "", e))?;
            self.attrs(&fd, "", m, false)?;
        }
        Ok(())
    }

    fn cancelled(&self) -> Result<(), CliError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(CliError::Usage(
                "cancelled by the user (the files restored so far are complete; none is half \
                 written)"
                    .into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Make directory `rel` (mode 0700 until its own attributes come last); false if it was
    /// already there (then it is used as it is).
    fn mkdir(&self, rel: &str) -> Result<bool, CliError> {
        let err = |e| io_err(self.to, rel, e);
        let (parent, name) = split(rel);
        let dir = dir_fd(self.root, parent).map_err(err)?;
        let name = cname(name).map_err(err)?;
        match sys::mkdirat(dir.as_raw_fd(), &name, 0o700) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let st = sys::fstatat(dir.as_raw_fd(), &name).map_err(err)?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return Ok(false);
                }
                if !self.force {
                    return Err(CliError::Usage(format!(
                        "{} exists (it appeared during the restore): add --force to replace it",
                        shown(self.to, rel)
                    )));
                }
                sys::unlinkat(dir.as_raw_fd(), &name, 0).map_err(err)?;
                sys::mkdirat(dir.as_raw_fd(), &name, 0o700).map_err(err)?;
                Ok(true)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Owner (as root), then mode (a chown clears setuid), then times, of the inode `fd`
    /// (an `O_PATH` fd or an open file).
    fn attrs(&self, fd: &OwnedFd, rel: &str, m: Meta, symlink: bool) -> Result<(), CliError> {
        let err = |e| io_err(self.to, rel, e);
        if self.owners {
            sys::fchown_fd(fd.as_raw_fd(), m.uid, m.gid).map_err(err)?;
        }
        if !symlink {
            sys::chmod_fd(fd.as_raw_fd(), m.mode & 0o7777).map_err(err)?;
        }
        sys::utimens_fd(fd.as_raw_fd(), symlink, &times(m.mtime_ns)).map_err(err)
    }

    /// Put `from` (a temp name in `dir`) at `rel`; replaces a file or symlink only with
    /// `--force`.
    fn rename_into_place(&self, dir: &OwnedFd, from: &CStr, rel: &str) -> Result<(), CliError> {
        let err = |e| io_err(self.to, rel, e);
        let name = cname(split(rel).1).map_err(err)?;
        let flags = if self.force {
            0
        } else {
            libc::RENAME_NOREPLACE
        };
        match sys::renameat2(dir.as_raw_fd(), from, dir.as_raw_fd(), &name, flags) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(CliError::Usage(format!(
                "{} exists (it appeared during the restore): add --force to replace it",
                shown(self.to, rel)
            ))),
            Err(e) => Err(err(e)),
        }
    }

    fn file(
        &mut self,
        rel: &str,
        id: VolumeId,
        meta: Option<Meta>,
        tmp: &mut u64,
        bar: &Progress,
    ) -> Result<(), CliError> {
        let err = |e| io_err(self.to, rel, e);
        let vol = self.extents(id)?;
        let dir = dir_fd(self.root, split(rel).0).map_err(err)?;
        let name = temp_name(tmp);
        // An unnamed file (O_TMPFILE) while its data goes in: whatever stops the restore (a
        // second Ctrl-C, SIGKILL, a crash) leaves nothing in DIR. It gets the temp name only
        // once complete, for the rename. A filesystem without O_TMPFILE gets the temp name
        // from the start (and an error removes it).
        let unnamed = sys::openat(
            dir.as_raw_fd(),
            c".",
            libc::O_WRONLY | libc::O_TMPFILE,
            0o600,
        );
        let (fd, named) = match unnamed {
            Ok(fd) => (fd, false),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                let fd = sys::openat(
                    dir.as_raw_fd(),
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(err)?;
                (fd, true)
            }
            Err(e) => return Err(err(e)),
        };
        let built = self.fill(rel, &vol, fd, meta, bar).and_then(|file| {
            if !named {
                sys::link_fd(file.as_raw_fd(), dir.as_raw_fd(), &name).map_err(err)?;
            }
            drop(file);
            self.rename_into_place(&dir, &name, rel)
        });
        if built.is_err() {
            let _ = sys::unlinkat(dir.as_raw_fd(), &name, 0);
        }
        built
    }

    /// The data (only blocks with data; the rest stay holes), then owner, mode and times,
    /// then fsync: the file is complete before it gets its name.
    fn fill(
        &mut self,
        rel: &str,
        vol: &VolumeExtents,
        fd: OwnedFd,
        meta: Option<Meta>,
        bar: &Progress,
    ) -> Result<OwnedFd, CliError> {
        let err = |e| io_err(self.to, rel, e);
        let file = File::from(fd);
        file.set_len(vol.size()).map_err(err)?;
        let shown_path = PathBuf::from(shown(self.to, rel));
        let mut placed = Placed::default();
        for i in 0..vol.blocks() {
            self.cancelled()?;
            placed += vol
                .place(i, &file, &shown_path, &mut self.buf)
                .map_err(usage)?;
            bar.inc(vol.block_len(i));
        }
        self.report.logical_bytes += vol.size();
        self.report.bytes_written += placed.copied + placed.written;
        self.report.bytes_copied += placed.copied;
        self.report.zero_bytes += placed.zeros;
        let fd = OwnedFd::from(file);
        if let Some(m) = meta {
            self.attrs(&fd, rel, m, false)?;
        }
        sys::fsync(fd.as_raw_fd(), false).map_err(err)?;
        Ok(fd)
    }

    /// The volume's blocks, with its packs open. A delete running meanwhile may rewrite this
    /// snapshot onto its grandparent (byte for byte the same, under a new manifest, its tables
    /// and packs swapped in at once): a resolution is kept only if the manifest is still the
    /// one it followed once the packs are open (from then on they read as they were);
    /// otherwise it starts over from the new manifest.
    fn extents(&mut self, id: VolumeId) -> Result<VolumeExtents, CliError> {
        let name = SnapshotName::parse(&self.manifest.name).map_err(|e| usage(e.into()))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let got = self.store.volume_extents(&self.manifest, id);
            let now = self
                .store
                .manifest(&name)
                .map_err(|e| CliError::Usage(format!("{e} (it was deleted during the restore)")))?;
            if now == self.manifest {
                return got.map_err(usage);
            }
            self.manifest = now;
            if tries == 8 {
                return Err(CliError::Usage(format!(
                    "snapshot {name} keeps being rewritten by deletes: try again later"
                )));
            }
        }
    }

    fn symlink(
        &mut self,
        rel: &str,
        target: &CStr,
        meta: Option<Meta>,
        tmp: &mut u64,
    ) -> Result<(), CliError> {
        let err = |e| io_err(self.to, rel, e);
        let dir = dir_fd(self.root, split(rel).0).map_err(err)?;
        let name = temp_name(tmp);
        sys::symlinkat(target, dir.as_raw_fd(), &name).map_err(err)?;
        let built = (|| {
            if let Some(m) = meta {
                let fd = sys::open_path(dir.as_raw_fd(), &name).map_err(err)?;
                self.attrs(&fd, rel, m, true)?;
            }
            self.rename_into_place(&dir, &name, rel)
        })();
        if built.is_err() {
            let _ = sys::unlinkat(dir.as_raw_fd(), &name, 0);
        }
        built
    }
}
