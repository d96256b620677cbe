//! The FUSE-free fixture: a backing dir in a fresh temp dir, its store dir, and the `OverlayFs`
//! on it, with or without a `Tracker`, built the way the daemon builds them but driven by direct
//! calls (no mount, no kernel). It can drop and reopen both on the same dirs, as a restart or a
//! crash would. It never mounts and never talks to the `grainfs` binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use grainfs::fs::{Caller, OverlayFs, OverlayOptions};
use grainfs::ids::{Geometry, VolumeId};
use grainfs::track::{Recovery, Tracker};

/// The caller of most direct calls: root.
pub const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// The store dir's name inside the backing dir (the default `<backing>/.grainfs`).
pub const STORE: &str = ".grainfs";

/// A backing dir with its store inside and the overlay on it.
pub struct Overlay {
    tmp: tempfile::TempDir,
    /// The backing dir (the real files).
    pub backing: PathBuf,
    /// The store dir, `<backing>/.grainfs`.
    pub store: PathBuf,
    /// The overlay, shared so that threads and an engine can hold it too.
    pub fs: Arc<OverlayFs>,
    /// The tracker and its tick interval, if the overlay tracks changes.
    tracking: Option<(Arc<Tracker>, Duration)>,
    /// What the tracker found when it opened (default when untracked).
    pub recovery: Recovery,
}

impl Overlay {
    /// An overlay without change tracking, after `setup` populated the backing dir.
    pub fn untracked(setup: impl FnOnce(&Path)) -> Overlay {
        let (tmp, backing) = backing_dir();
        setup(&backing);
        let store = backing.join(STORE);
        let (fs, tracking, recovery) = open(&backing, &store, None);
        Overlay {
            tmp,
            backing,
            store,
            fs,
            tracking,
            recovery,
        }
    }

    /// An overlay with a tracker of `geometry` ticking every `interval`, after `setup` populated
    /// the backing dir.
    pub fn tracked(geometry: Geometry, interval: Duration, setup: impl FnOnce(&Path)) -> Overlay {
        let (tmp, backing) = backing_dir();
        setup(&backing);
        let store = backing.join(STORE);
        let (fs, tracking, recovery) = open(&backing, &store, Some((geometry, interval)));
        Overlay {
            tmp,
            backing,
            store,
            fs,
            tracking,
            recovery,
        }
    }

    /// Create (or truncate) `name` in the root as root, open read-write; its handle.
    pub fn create(&self, name: &str) -> u64 {
        let (_, o) = self
            .fs
            .create(
                ROOT,
                grainfs::fs::inode::ROOT_INO,
                std::ffi::OsStr::new(name),
                0o644,
                0,
                libc::O_RDWR | libc::O_TRUNC,
            )
            .unwrap();
        o.fh
    }

    /// The volume id of `name` in the backing dir.
    pub fn id(&self, name: &str) -> VolumeId {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.backing.join(name)).unwrap();
        VolumeId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    /// The tracker; panics on an untracked overlay.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self
            .tracking
            .as_ref()
            .expect("the overlay was built without a tracker")
            .0
    }

    /// Drop the overlay and the tracker as they are (no shutdown unless the caller did it), let
    /// `unmounted` change the backing dir as it may change while nothing is mounted, and open
    /// both again on the same dirs, the tracker with `geometry` and the same interval.
    pub fn reopen_with(self, geometry: Geometry, unmounted: impl FnOnce(&Path)) -> Overlay {
        let Overlay {
            tmp,
            backing,
            store,
            fs,
            tracking,
            ..
        } = self;
        drop(fs);
        let tracking = tracking.map(|(tracker, interval)| {
            drop(tracker);
            (geometry, interval)
        });
        unmounted(&backing);
        let (fs, tracking, recovery) = open(&backing, &store, tracking);
        Overlay {
            tmp,
            backing,
            store,
            fs,
            tracking,
            recovery,
        }
    }

    /// The same overlay with the read-only snapshot view of its store on (`visible`: listed in
    /// the root); call it before anything else holds the overlay.
    pub fn with_snapshots(self, visible: bool) -> Overlay {
        let Overlay {
            tmp,
            backing,
            store,
            fs,
            tracking,
            recovery,
        } = self;
        let fs = Arc::try_unwrap(fs)
            .ok()
            .expect("the overlay is not shared yet")
            .with_snapshots(&store, visible)
            .expect("with_snapshots");
        Overlay {
            tmp,
            backing,
            store,
            fs: Arc::new(fs),
            tracking,
            recovery,
        }
    }
}

/// A fresh temp dir with an empty `backing` dir in it (by its canonical path).
fn backing_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("grainfs-overlay-")
        .tempdir()
        .expect("tempdir");
    let backing = tmp
        .path()
        .canonicalize()
        .expect("canonicalize")
        .join("backing");
    std::fs::create_dir(&backing).expect("mkdir backing");
    (tmp, backing)
}

type Tracking = Option<(Arc<Tracker>, Duration)>;

/// Open the tracker (if asked for) and the overlay on `backing` with its store at `store`.
fn open(
    backing: &Path,
    store: &Path,
    tracking: Option<(Geometry, Duration)>,
) -> (Arc<OverlayFs>, Tracking, Recovery) {
    let (tracking, recovery) = match tracking {
        Some((geometry, interval)) => {
            let (t, recovery) =
                Tracker::open(backing, store, geometry, interval).expect("Tracker::open");
            (Some((Arc::new(t), interval)), recovery)
        }
        None => (None, Recovery::default()),
    };
    let fs = OverlayFs::new(
        backing,
        OverlayOptions {
            store: Some(store.to_path_buf()),
            tracker: tracking.as_ref().map(|(t, _)| t.clone()),
        },
    )
    .expect("OverlayFs::new");
    (Arc::new(fs), tracking, recovery)
}
