//! The saved tracking state and the restore after a restart: `<store>/tracking/state.json`
//! (`SavedState`), how it is written and read, and the recovery rules that turn it, the intent
//! record a previous daemon left and the files found now into the volumes a start begins with.
//!
//! It must never trust what it cannot vouch for: a damaged state or record is set aside and
//! every volume is unknown; a file whose stamp moved in a way our own writes do not explain is
//! unknown as a whole. Offline `status` uses it too, so it never needs a running daemon.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::walk::VolumeFiles;
use super::{FileStamp, SavedVolume, Tracker, Volume};
use crate::ids::{Geometry, VolumeId};
use crate::sys::{decode_versioned, now_ns, write_durably, VersionedError};

/// Format version of the saved tracking state.
pub const STATE_FORMAT: u32 = 2;

/// The tracking state as saved in `<store>/tracking/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedState {
    pub format: u32,
    pub geometry: Geometry,
    /// True only when written by a clean unmount.
    pub clean: bool,
    pub saved_at_ns: u64,
    pub interval_ns: u64,
    pub volumes: Vec<SavedVolume>,
}

/// The tracking directory inside a store.
pub fn tracking_dir(store: &Path) -> PathBuf {
    store.join("tracking")
}

/// Read the saved state of a store, if there is one (for offline `status` too).
pub fn load_state(store: &Path) -> io::Result<Option<SavedState>> {
    read_tracking_file::<SavedState>(&tracking_dir(store).join("state.json"), STATE_FORMAT)
}

/// Read a tracking file whose format is `format`, if there is one: one that does not parse,
/// or of another format, is InvalidData naming the file.
pub(super) fn read_tracking_file<T: DeserializeOwned>(
    path: &Path,
    format: u32,
) -> io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let why = match decode_versioned(&bytes, format as u64) {
        Ok(f) => return Ok(Some(f)),
        Err(VersionedError::Unsupported { found }) => format!("unknown format {found}"),
        Err(VersionedError::Invalid(e)) => e,
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    ))
}

/// What `Tracker::open` found about the previous daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The previous daemon did not unmount cleanly.
    pub unclean: bool,
    /// Partitions marked unknown from the intent record.
    pub intent_partitions: usize,
    /// Volumes changed behind the overlay's back, marked unknown as a whole.
    pub changed_behind: Vec<String>,
    /// Saved volumes whose file is gone.
    pub gone: usize,
    /// The saved state or the intent record was damaged and set aside: every volume is unknown.
    pub damaged: bool,
}

/// Move a damaged tracking file out of the way, keeping it for inspection.
pub(super) fn set_aside(path: &Path, why: &io::Error) {
    let aside = path.with_extension(format!("damaged-{}", now_ns()));
    warn!(
        "{why}; moved to {} and treating every volume as unknown (the next snapshot rescans them)",
        aside.display()
    );
    if let Err(e) = std::fs::rename(path, &aside) {
        warn!("cannot move {} aside: {e}", path.display());
        let _ = std::fs::remove_file(path);
    }
}

/// Volumes as a start finds them: restored from the saved state and the intent record, with
/// the recovery rules applied.
pub struct Restored {
    pub volumes: HashMap<VolumeId, Arc<Volume>>,
    /// Saved volumes whose file was not found.
    pub dormant: Vec<SavedVolume>,
}

/// Apply the recovery rules (DESIGN.md "Tracking that survives a crash") to a saved state, the
/// intent record `left` by the previous daemon and the files of the backing dir now; shared by
/// the daemon's start and the offline `status`.
pub fn restore(
    saved: Option<&SavedState>,
    left: &BTreeSet<(VolumeId, u64)>,
    files: &VolumeFiles,
    geometry: Geometry,
    rec: &mut Recovery,
) -> Restored {
    let mut volumes = HashMap::new();
    let mut dormant = Vec::new();
    let mut renamed: HashMap<VolumeId, VolumeId> = HashMap::new();
    if let Some(s) = saved {
        rec.unclean = !s.clean;
        let same_geometry = s.geometry == geometry;
        if !same_geometry {
            warn!(
                "tracking geometry changed (block {} -> {}, partition {} -> {}): all volumes unknown",
                s.geometry.block_size, geometry.block_size, s.geometry.partition_size, geometry.partition_size
            );
        }
        let intent_vols: BTreeSet<VolumeId> = left.iter().map(|(v, _)| *v).collect();
        // st_dev of a filesystem can change across reboots (device minors, btrfs), so a
        // saved volume is matched by inode number when its exact id is not found.
        let mut by_ino: HashMap<u64, Vec<VolumeId>> = HashMap::new();
        for id in files.keys() {
            by_ino.entry(id.ino).or_default().push(*id);
        }
        for sv in &s.volumes {
            let cur = if files.contains_key(&sv.id) {
                Some(sv.id)
            } else {
                match by_ino.get(&sv.id.ino).map(Vec::as_slice) {
                    Some([only]) => Some(*only),
                    _ => None,
                }
            };
            let Some((cur, (path, st))) = cur.and_then(|c| files.get(&c).map(|f| (c, f))) else {
                // Not found now (a directory unreadable, a file gone): keep the record, so
                // that its history is not silently replaced by a clean one later.
                rec.gone += 1;
                dormant.push(sv.clone());
                continue;
            };
            renamed.insert(sv.id, cur);
            let sv = &SavedVolume {
                id: cur,
                ..sv.clone()
            };
            let v = if same_geometry {
                Volume::restore(geometry, sv)
            } else {
                let v = Volume::new(sv.id, geometry, st.st_size as u64);
                v.mark_unknown_all();
                v
            };
            let now = FileStamp::of(st);
            if now != sv.stamp {
                // Our own writes after the last save explain a changed stamp only for a
                // volume in the intent record, and only within the window the crash can
                // have happened in (two intervals after the last save).
                let window_end = s.saved_at_ns as i128 + 2 * s.interval_ns as i128;
                let in_intent = renamed
                    .iter()
                    .any(|(old, new)| *new == sv.id && intent_vols.contains(old));
                // A shrink changes content from the new end to the old one: our own truncate
                // put all of it in the intent record first. Growth only adds zeros past the old
                // end (what was written there is in the record anyway).
                let (new, old) = (now.size, sv.stamp.size);
                let size_explained = new >= old
                    || (new / geometry.partition_size..=(old - 1) / geometry.partition_size).all(
                        |p| {
                            renamed
                                .iter()
                                .any(|(o, n)| *n == sv.id && left.contains(&(*o, p)))
                        },
                    );
                let explained = rec.unclean
                    && in_intent
                    && size_explained
                    && now.ino == sv.stamp.ino
                    && now.mtime_ns <= window_end
                    && now.ctime_ns <= window_end;
                if !explained {
                    v.mark_unknown_all();
                    rec.changed_behind.push(path.clone());
                }
            }
            // Whatever the difference was, it is accounted for now (unknown partitions or
            // the whole volume): from here on, compare with the file as it is.
            v.adopt_stamp(now);
            volumes.insert(sv.id, Arc::new(v));
        }
    }
    for (id, p) in left {
        let id = renamed.get(id).unwrap_or(id);
        if let Some(v) = volumes.get(id) {
            v.mark_unknown(*p);
            rec.intent_partitions += 1;
        } else if let Some((_, st)) = files.get(id) {
            // Written after the last save and never saved: unknown as a whole.
            let v = Volume::new(*id, geometry, st.st_size as u64);
            v.mark_unknown_all();
            volumes.insert(*id, Arc::new(v));
            rec.intent_partitions += 1;
        }
    }
    Restored { volumes, dormant }
}

impl Tracker {
    /// Save every volume (state.json), durably.
    pub(super) fn save(&self, clean: bool) -> io::Result<()> {
        let vols = self.all_volumes();
        let mut saved = Vec::with_capacity(vols.len());
        for v in &vols {
            v.mark_recorded();
            if v.check_stamp() {
                warn!(
                    "volume {} changed behind the overlay's back: marked unknown",
                    v.id
                );
            }
            saved.push(v.saved(None));
        }
        saved.extend(
            self.dormant
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        saved.sort_by_key(|s| s.id);
        let now = now_ns();
        let state = SavedState {
            format: STATE_FORMAT,
            geometry: self.geometry,
            clean,
            saved_at_ns: now,
            interval_ns: self.interval.as_nanos() as u64,
            volumes: saved,
        };
        let bytes = serde_json::to_vec(&state).map_err(io::Error::other)?;
        write_durably(&self.dir.join("state.json"), &bytes)?;
        self.last_save_ns.store(now, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 4096,
        partition_size: 65536,
    };

    #[test]
    fn a_damaged_state_is_set_aside_and_nothing_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("b");
        let store = backing.join(".grainfs");
        std::fs::create_dir_all(tracking_dir(&store)).unwrap();
        std::fs::write(tracking_dir(&store).join("state.json"), b"{ not json").unwrap();
        let (t, rec) =
            Tracker::open(&backing, &store, G, std::time::Duration::from_secs(10)).unwrap();
        assert!(rec.damaged);
        let v = t.volume(VolumeId { dev: 1, ino: 2 }, 0, false);
        assert!(v.change_map(None, 0).unknown_all);
        let aside: Vec<_> = std::fs::read_dir(tracking_dir(&store))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("damaged"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    #[test]
    fn saved_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let old = unsafe { libc::umask(0) };
        let p = tmp.path().join("x.json");
        let r = write_durably(&p, b"{}");
        unsafe { libc::umask(old) };
        r.unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    fn stat_of(path: &Path) -> libc::stat {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        crate::sys::fstatat(libc::AT_FDCWD, &c).unwrap()
    }

    #[test]
    fn after_a_crash_an_unrecorded_shrink_is_not_explained_by_our_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("v.img");
        std::fs::write(&f, vec![1u8; 4 * 65536]).unwrap();
        let st = stat_of(&f);
        let id = VolumeId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let v = Volume::new(id, G, 4 * 65536);
        v.adopt_stamp(FileStamp::of(&st));
        let state = SavedState {
            format: STATE_FORMAT,
            geometry: G,
            clean: false,
            saved_at_ns: now_ns(),
            interval_ns: 10_000_000_000,
            volumes: vec![v.saved(None)],
        };
        // The daemon wrote partition 0 after its last save, then died; the file was then cut
        // to one partition by someone else.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(65536)
            .unwrap();
        let st = stat_of(&f);
        let files: HashMap<_, _> = [(id, ("v.img".to_string(), st))].into_iter().collect();
        let left: BTreeSet<_> = [(id, 0u64)].into_iter().collect();
        let mut rec = Recovery::default();
        let r = restore(Some(&state), &left, &files, G, &mut rec);
        assert!(r.volumes[&id].change_map(None, 0).unknown_all, "{rec:?}");
        // Had the record covered the cut partitions, it would be ours: only those unknown.
        let left: BTreeSet<_> = (0..4).map(|p| (id, p)).collect();
        let mut rec = Recovery::default();
        let r = restore(Some(&state), &left, &files, G, &mut rec);
        let m = r.volumes[&id].change_map(None, 0);
        assert!(
            !m.unknown_all && m.unknown_partitions == vec![0, 1, 2, 3],
            "{m:?}"
        );
    }
}
