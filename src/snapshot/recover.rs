//! Recovery of the writes a killed daemon had parked (see `deferred.rs`). At mount, each journal
//! left in `<store>/deferred/` is replayed into its volume only when that is provably the same
//! file, unchanged since the daemon ended: same device, inode, generation and birth time, and
//! the ctime the daemon noted after its own last change. Otherwise the journal goes whole to
//! `<store>/lost+found/` with a readable index beside it, and `grainfs recover` lists, applies
//! or discards it on request.
//!
//! This module must never write parked bytes into a file it cannot vouch for: a stale write
//! over newer data is silent corruption, while a write kept aside is only a question for the
//! user. Nothing here deletes a journal before its writes are either applied or kept aside.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::info;
use serde::Serialize;

use super::deferred::journal::{Journal, JournalHeader, DIR};
use crate::ids::VolumeId;
use crate::sys::{self, utc_stamp, FileIdentity};
use crate::sys::{fsync_dir, now_ns, write_durably};

/// Where parked writes that could not be replayed are kept, in the store.
pub const LOST_FOUND: &str = "lost+found";
const JOURNAL_EXT: &str = "journal";
const APPLIED_EXT: &str = "applied";
const INDEX_EXT: &str = "txt";

/// What became of one journal at mount.
#[derive(Debug)]
pub enum Outcome {
    /// Written into the volume it was parked for.
    Replayed { path: String, writes: usize },
    /// Not written: kept in lost+found as `name`.
    KeptAside {
        path: String,
        volume: VolumeId,
        writes: usize,
        reason: String,
        name: String,
    },
    /// From another boot: never fsynced, so dropped as a crash drops unsynced writes.
    Dropped { path: String, writes: usize },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Replayed { path, writes } => {
                write!(f, "{path}: replayed {writes} parked write(s)")
            }
            Outcome::KeptAside {
                path,
                writes,
                reason,
                name,
                ..
            } => write!(
                f,
                "{path}: {reason}; its {writes} parked write(s) were NOT written and are kept in \
                 {LOST_FOUND}/{name}.{JOURNAL_EXT} (see `grainfs recover`); the volume's tracking \
                 is marked unknown"
            ),
            Outcome::Dropped { path, writes } => write!(
                f,
                "{path}: {writes} write(s) parked before a reboot were never fsynced and are \
                 dropped, as a crash drops unsynced writes"
            ),
        }
    }
}

/// Replay or keep aside the journals a killed daemon left in `store`, onto the files of the
/// backing dir `root` (an fd).
pub fn replay(store: &Path, root: RawFd) -> io::Result<Vec<Outcome>> {
    let dir = store.join(DIR);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = rd.map(|e| e.map(|e| e.path())).collect::<io::Result<_>>()?;
    paths.sort();
    let mut said = Vec::new();
    for path in paths {
        match replay_one(store, &path, root) {
            Ok(Some(o)) => said.push(o),
            Ok(None) => {}
            Err(e) => {
                // Left in deferred/, the journal would be cut short by the next capture of the
                // same volume: keep it aside, or stop here.
                // Read again for the index and the volume to mark unknown (the writes replayed
                // before the failure are marked applied and left out).
                let j = Journal::read(&path).ok();
                let what = j
                    .as_ref()
                    .map_or_else(|| path.display().to_string(), |j| j.header.path.clone());
                let writes = j.as_ref().map_or(0, |j| j.unapplied().count());
                let reason = format!("replaying it failed ({e})");
                said.push(aside(store, &path, j.as_ref(), what, writes, reason)?);
            }
        }
    }
    Ok(said)
}

fn replay_one(store: &Path, journal: &Path, root: RawFd) -> io::Result<Option<Outcome>> {
    if never_written(journal)? {
        // Empty, or allocated and never written back (a power cut: journals are preallocated
        // and not fsynced): no record in it ever reached the disk.
        std::fs::remove_file(journal)?;
        return Ok(None);
    }
    let j = match Journal::read(journal) {
        Ok(j) => j,
        Err(e) => {
            // Not ours to read (another version, damaged): the bytes stay, for a person.
            let what = journal.display().to_string();
            let reason = format!("unreadable journal ({e})");
            return aside(store, journal, None, what, 0, reason).map(Some);
        }
    };
    let h = &j.header;
    let writes = j.unapplied().count();
    if writes == 0 {
        std::fs::remove_file(journal)?;
        return Ok(None);
    }
    // An unknown boot id (no /proc) counts as another boot: never replay what cannot be
    // placed in this one.
    let boot = sys::boot_id();
    if h.boot_id.is_empty() || boot.is_empty() || h.boot_id != boot {
        std::fs::remove_file(journal)?;
        return Ok(Some(Outcome::Dropped {
            path: h.path.clone(),
            writes,
        }));
    }
    let target = match find_target(root, h) {
        Ok(t) => t,
        Err(reason) => {
            return aside(store, journal, Some(&j), h.path.clone(), writes, reason).map(Some)
        }
    };
    let now = sys::ctime_of(&sys::fstat(target.as_raw_fd())?);
    if now != j.ctime {
        let reason = format!(
            "the file changed after the daemon ended (ctime {}.{:09}, the daemon's last change \
             left {}.{:09})",
            now.0, now.1, j.ctime.0, j.ctime.1
        );
        return aside(store, journal, Some(&j), h.path.clone(), writes, reason).map(Some);
    }
    // Each write is marked applied (with the ctime it left) as it lands, as the daemon does:
    // a replay cut off here resumes, or keeps the rest aside, but never writes one twice over
    // something newer.
    let jf = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(journal)?;
    for r in j.unapplied() {
        target.write_all_at(j.data(r), r.offset)?;
        let ctime = sys::ctime_of(&sys::fstat(target.as_raw_fd())?);
        Journal::mark_applied(&jf, r, ctime)?;
    }
    target.sync_data()?;
    std::fs::remove_file(journal)?;
    info!(
        "replayed {writes} write(s) a killed daemon had parked for {}",
        h.path
    );
    Ok(Some(Outcome::Replayed {
        path: h.path.clone(),
        writes,
    }))
}

/// Whether the journal holds nothing but zeros in its first page (or nothing at all): the
/// daemon writes the header before any record, so no record of it can be on disk.
fn never_written(journal: &Path) -> io::Result<bool> {
    let f = File::open(journal)?;
    let mut head = [0u8; 4096];
    let n = f.read_at(&mut head, 0)?;
    Ok(head[..n].iter().all(|&b| b == 0))
}

/// Keep `journal` aside (see `keep_aside`) and say so. `path` names what it was for.
fn aside(
    store: &Path,
    journal: &Path,
    j: Option<&Journal>,
    path: String,
    writes: usize,
    reason: String,
) -> io::Result<Outcome> {
    let name = keep_aside(store, journal, j, &reason)?;
    let volume = j.map_or(VolumeId { dev: 0, ino: 0 }, |j| VolumeId {
        dev: j.header.file.dev,
        ino: j.header.file.ino,
    });
    Ok(Outcome::KeptAside {
        path,
        volume,
        writes,
        reason,
        name,
    })
}

/// The file a journal was written for, open for writing, or why it cannot be trusted to be.
fn find_target(root: RawFd, h: &JournalHeader) -> Result<File, String> {
    let regular_with_ino = |fd: &OwnedFd| {
        sys::fstat(fd.as_raw_fd()).is_ok_and(|st| {
            (st.st_dev, st.st_ino) == (h.file.dev, h.file.ino)
                && st.st_mode & libc::S_IFMT == libc::S_IFREG
        })
    };
    let mut found = sys::open_beneath(root, &h.path, libc::O_PATH)
        .ok()
        .filter(regular_with_ino);
    if found.is_none() {
        // Renamed while no daemon ran? Look for the inode anywhere under the backing dir.
        let mut rel: Option<String> = None;
        let walked = crate::track::walk_tree(
            root,
            None,
            crate::track::WalkErrors::Skip,
            |_, _, path, st| {
                if rel.is_none()
                    && (st.st_dev, st.st_ino) == (h.file.dev, h.file.ino)
                    && st.st_mode & libc::S_IFMT == libc::S_IFREG
                {
                    rel = Some(path.to_string());
                }
            },
        );
        if let Err(e) = walked {
            return Err(format!(
                "the backing dir could not be searched for it ({e})"
            ));
        }
        found = rel
            .and_then(|rel| sys::open_beneath(root, &rel, libc::O_PATH).ok())
            .filter(regular_with_ino);
    }
    let Some(path_fd) = found else {
        return Err("the file is gone".to_string());
    };
    let fd = sys::reopen(path_fd.as_raw_fd(), libc::O_WRONLY)
        .map_err(|e| format!("the file cannot be opened for writing ({e})"))?;
    let now = sys::file_identity(fd.as_raw_fd())
        .map_err(|e| format!("the file cannot be identified ({e})"))?;
    if !same_file(&h.file, &now) {
        return Err(format!(
            "another file now has its inode number (generation {:?}, birth {:?}; the volume's \
             were {:?}, {:?})",
            now.generation, now.btime, h.file.generation, h.file.btime
        ));
    }
    Ok(File::from(fd))
}

/// Whether `now` is the file `then` was: what `then` recorded must match (a value the
/// filesystem no longer gives counts as a mismatch).
fn same_file(then: &FileIdentity, now: &FileIdentity) -> bool {
    then.dev == now.dev
        && then.ino == now.ino
        && (then.generation.is_none() || then.generation == now.generation)
        && (then.btime.is_none() || then.btime == now.btime)
}

/// Move `journal` to lost+found with an index beside it; returns the name it is kept under.
/// The move is a rename (no space needed); the journal is the data, the index only helps.
fn keep_aside(
    store: &Path,
    journal: &Path,
    j: Option<&Journal>,
    reason: &str,
) -> io::Result<String> {
    let lf = store.join(LOST_FOUND);
    match std::fs::DirBuilder::new().mode(0o700).create(&lf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let stem = journal
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = utc_stamp(now_ns() / 1_000_000_000);
    let mut name = format!("{stamp}-{stem}");
    let mut n = 1;
    while lf.join(format!("{name}.{JOURNAL_EXT}")).exists() {
        n += 1;
        name = format!("{stamp}-{stem}-{n}");
    }
    std::fs::rename(journal, lf.join(format!("{name}.{JOURNAL_EXT}")))?;
    fsync_dir(&lf)?;
    if let Some(parent) = journal.parent() {
        fsync_dir(parent)?;
    }
    let index = index_text(&name, j, reason);
    if let Err(e) = write_durably(&lf.join(format!("{name}.{INDEX_EXT}")), index.as_bytes()) {
        log::warn!("{LOST_FOUND}/{name}: writing its index: {e} (the journal itself is kept)");
    }
    Ok(name)
}

fn index_text(name: &str, j: Option<&Journal>, reason: &str) -> String {
    let mut t = String::new();
    t.push_str("grainfs lost+found: writes a killed daemon had accepted and parked, NOT written\n");
    if let Some(j) = j {
        let f = &j.header.file;
        t.push_str(&format!(
            "file: {}\nvolume: device {:#x}, inode {}, generation {:?}, birth {:?}\n",
            j.header.path, f.dev, f.ino, f.generation, f.btime
        ));
    }
    t.push_str(&format!("reason: {reason}\n"));
    t.push_str(&format!(
        "apply: grainfs recover apply {name} --to FILE   (discard: grainfs recover discard {name})\n"
    ));
    if let Some(j) = j {
        t.push_str("offset length parked_at\n");
        for r in j.unapplied() {
            t.push_str(&format!(
                "{} {} {}\n",
                r.offset,
                r.len,
                utc_stamp(r.time_ns / 1_000_000_000)
            ));
        }
    }
    t
}

/// One set of parked writes kept in lost+found.
#[derive(Debug, Serialize)]
pub struct Kept {
    pub name: String,
    /// The file they were parked for (relative to the backing dir), if the journal is readable.
    pub path: Option<String>,
    pub reason: String,
    /// Applied on request already (`grainfs recover apply`).
    pub applied: bool,
    pub writes: Vec<KeptWrite>,
    /// Why the journal cannot be read, if it cannot.
    pub error: Option<String>,
}

/// One parked write kept aside.
#[derive(Debug, Serialize)]
pub struct KeptWrite {
    pub offset: u64,
    pub length: usize,
    pub parked_ns: u64,
}

/// Everything kept in the store's lost+found, oldest first.
pub fn list(store: &Path) -> io::Result<Vec<Kept>> {
    let lf = store.join(LOST_FOUND);
    let rd = match std::fs::read_dir(&lf) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let p = e?.path();
        let applied = match p.extension().and_then(|x| x.to_str()) {
            Some(JOURNAL_EXT) => false,
            Some(APPLIED_EXT) => true,
            _ => continue,
        };
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reason = std::fs::read_to_string(lf.join(format!("{name}.{INDEX_EXT}")))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("reason: ").map(str::to_string))
            })
            .unwrap_or_default();
        let (path, writes, error) = match Journal::read(&p) {
            Ok(j) => (
                Some(j.header.path.clone()),
                j.unapplied()
                    .map(|r| KeptWrite {
                        offset: r.offset,
                        length: r.len,
                        parked_ns: r.time_ns,
                    })
                    .collect(),
                None,
            ),
            Err(e) => (None, Vec::new(), Some(e.to_string())),
        };
        out.push(Kept {
            name,
            path,
            reason,
            applied,
            writes,
            error,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The journal file of the kept set `name` (not yet applied), or why there is none.
fn kept_journal(store: &Path, name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a name `grainfs recover` lists"),
        ));
    }
    let lf = store.join(LOST_FOUND);
    let p = lf.join(format!("{name}.{JOURNAL_EXT}"));
    if p.exists() {
        return Ok(p);
    }
    if lf.join(format!("{name}.{APPLIED_EXT}")).exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{name} was applied already"),
        ));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "nothing named {name} in {} (see `grainfs recover`)",
            lf.display()
        ),
    ))
}

/// Write the kept writes `name` into `to`, in the order they were parked, and fsync it; the
/// set is then listed as applied. Returns how many writes were written.
pub fn apply(store: &Path, name: &str, to: &Path) -> io::Result<usize> {
    let p = kept_journal(store, name)?;
    let j = Journal::read(&p)?;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", to.display())))?;
    let mut n = 0;
    for r in j.unapplied() {
        target.write_all_at(j.data(r), r.offset)?;
        n += 1;
    }
    target.sync_all()?;
    let lf = store.join(LOST_FOUND);
    std::fs::rename(&p, lf.join(format!("{name}.{APPLIED_EXT}")))?;
    fsync_dir(&lf)?;
    Ok(n)
}

/// Remove the kept set `name` (applied or not) and its index.
pub fn discard(store: &Path, name: &str) -> io::Result<()> {
    let lf = store.join(LOST_FOUND);
    let journal = match kept_journal(store, name) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            lf.join(format!("{name}.{APPLIED_EXT}"))
        }
        Err(e) => return Err(e),
    };
    std::fs::remove_file(journal)?;
    let _ = std::fs::remove_file(lf.join(format!("{name}.{INDEX_EXT}")));
    fsync_dir(&lf)
}

/// The human listing of `grainfs recover`, written to `out`.
pub fn write_table(out: &mut dyn Write, kept: &[Kept]) -> io::Result<()> {
    if kept.is_empty() {
        return writeln!(out, "nothing in {LOST_FOUND}");
    }
    for k in kept {
        let bytes: usize = k.writes.iter().map(|w| w.length).sum();
        writeln!(
            out,
            "{}{}\n  file: {}\n  writes: {} ({} bytes)\n  reason: {}",
            k.name,
            if k.applied { " (applied)" } else { "" },
            k.path.as_deref().unwrap_or("?"),
            k.writes.len(),
            bytes,
            k.error.as_deref().unwrap_or(&k.reason),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_must_match_where_it_was_recorded() {
        let then = FileIdentity {
            dev: 1,
            ino: 2,
            generation: Some(7),
            btime: Some((10, 5)),
        };
        assert!(same_file(&then, &then));
        assert!(!same_file(
            &then,
            &FileIdentity {
                generation: Some(8),
                ..then
            }
        ));
        assert!(!same_file(
            &then,
            &FileIdentity {
                btime: Some((10, 6)),
                ..then
            }
        ));
        assert!(!same_file(
            &then,
            &FileIdentity {
                generation: None,
                ..then
            }
        ));
        let unknown = FileIdentity {
            generation: None,
            btime: None,
            ..then
        };
        assert!(
            same_file(&unknown, &then),
            "nothing recorded, nothing to compare"
        );
    }
}
