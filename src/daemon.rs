//! The daemon: checks a mount request, claims the store, mounts the overlay and serves it until
//! it is unmounted (by `grainfs umount`, umount(8), or SIGINT/SIGTERM), then releases the store.
//! SIGHUP (or `grainfs reload`) reads the config file again (`lifecycle`); the scheduler takes
//! and prunes each group's snapshots on time (`scheduler`).
//!
//! It owns the mount's lifetime and the store lock; it never touches file data itself (that is
//! `fs`) and never talks to the kernel's FUSE side (the session and its mount options are
//! `fuse::session`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{error, info, warn};

use crate::config::Config;
use crate::control::{self, Request, Response, StatusReport};
use crate::fs::{OverlayFs, OverlayOptions};
use crate::fuse::session::{self, unescape_mountinfo, MountError, MountSettings};
use crate::fuse::KernelCache;
use crate::ids::{Geometry, VolumeId};
use crate::snapshot::{Engine, EngineOptions, Job};
use crate::track::Tracker;

pub mod lifecycle;
pub mod scheduler;

use lifecycle::Lifecycle;

/// Why a mount could not be served; each message says what, where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("backing dir {0}: does not exist; create it or name an existing directory")]
    BackingMissing(PathBuf),
    #[error("backing dir {0}: not a directory")]
    BackingNotDir(PathBuf),
    #[error("mount point {0}: does not exist; create it first (mkdir -p {0})")]
    MountpointMissing(PathBuf),
    #[error("mount point {0}: not a directory")]
    MountpointNotDir(PathBuf),
    #[error("mount point {0}: busy, something is already mounted there; unmount it first (grainfs umount {0})")]
    MountpointBusy(PathBuf),
    #[error("mount point {mountpoint} is inside the backing dir {backing}; the overlay would contain itself, choose a mount point outside it")]
    MountpointInsideBacking {
        mountpoint: PathBuf,
        backing: PathBuf,
    },
    #[error("store {0}: a store inside the backing dir must sit directly in its root (like the default <backing>/.grainfs); a deeper one could be reached by renaming its parent through the mount")]
    StorePlacement(PathBuf),
    #[error("mount point {mountpoint} contains the backing dir {backing} or the store {store}; the overlay would hide its own files, choose a mount point outside both")]
    MountpointCovers {
        mountpoint: PathBuf,
        backing: PathBuf,
        store: PathBuf,
    },
    #[error("store {path}: {why}; remove it or choose another store")]
    StoreUnsafe { path: PathBuf, why: String },
    #[error("store {path}: {source}")]
    Store { path: PathBuf, source: io::Error },
    #[error("store {path} is in use by another grainfs daemon{pid}; unmount that one first")]
    StoreLocked { path: PathBuf, pid: String },
    #[error("mounting {0}: /dev/fuse is not open to this user (uid {1}); FUSE mounts by ordinary users need it mode 0666, as most distributions ship it (chmod 0666 /dev/fuse), or mount as root")]
    DevFuse(PathBuf, u32),
    #[error("mounting {mountpoint}: {source}")]
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("opening backing dir: {0}")]
    Overlay(#[from] crate::fs::FsError),
    #[error("snapshot engine: {0}")]
    Engine(String),
    #[error("serving {mountpoint}: {source}")]
    Serve {
        mountpoint: PathBuf,
        source: io::Error,
    },
}

/// A checked request to serve `backing` at `mountpoint`.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub store: PathBuf,
    pub config: Config,
    /// The file `config` was read from, read again on a reload (None: no file).
    pub config_file: Option<PathBuf>,
}

/// Name of the lock file that marks a store as served by a live daemon.
pub const LOCK_FILE: &str = "daemon.lock";
pub use crate::fuse::session::FSNAME_PREFIX;

/// Name of the daemon's log file in the store when it runs in the background.
pub const LOG_FILE: &str = "grainfs.log";

impl MountRequest {
    /// Resolve paths and check the request before anything is mounted.
    pub fn check(
        backing: &Path,
        mountpoint: &Path,
        config: Config,
    ) -> Result<MountRequest, DaemonError> {
        let backing = match std::fs::canonicalize(backing) {
            Ok(p) => p,
            Err(_) => return Err(DaemonError::BackingMissing(backing.to_path_buf())),
        };
        if !backing.is_dir() {
            return Err(DaemonError::BackingNotDir(backing));
        }
        let mountpoint_abs = match std::fs::canonicalize(mountpoint) {
            Ok(p) => p,
            Err(_) => return Err(DaemonError::MountpointMissing(mountpoint.to_path_buf())),
        };
        if !mountpoint_abs.is_dir() {
            return Err(DaemonError::MountpointNotDir(mountpoint_abs));
        }
        if is_mountpoint(&mountpoint_abs) {
            return Err(DaemonError::MountpointBusy(mountpoint_abs));
        }
        if mountpoint_abs.starts_with(&backing) {
            return Err(DaemonError::MountpointInsideBacking {
                mountpoint: mountpoint_abs,
                backing,
            });
        }
        // Canonical store path: its parent resolved, its own name never followed (a store that
        // is a symlink is refused when it is opened).
        let configured = config.store_dir(&backing);
        let store = match (configured.parent(), configured.file_name()) {
            (Some(parent), Some(name)) => {
                std::fs::create_dir_all(parent).map_err(|source| DaemonError::Store {
                    path: configured.clone(),
                    source,
                })?;
                std::fs::canonicalize(parent)
                    .map_err(|source| DaemonError::Store {
                        path: configured.clone(),
                        source,
                    })?
                    .join(name)
            }
            _ => return Err(DaemonError::StorePlacement(configured)),
        };
        // A store inside the backing dir sits directly in its root: the root cannot be renamed
        // through the mount, a deeper parent could be, and the store would then be reachable.
        if store.starts_with(&backing) && store.parent() != Some(backing.as_path()) {
            return Err(DaemonError::StorePlacement(store));
        }
        if backing.starts_with(&mountpoint_abs) || store.starts_with(&mountpoint_abs) {
            return Err(DaemonError::MountpointCovers {
                mountpoint: mountpoint_abs,
                backing,
                store,
            });
        }
        Ok(MountRequest {
            backing,
            mountpoint: mountpoint_abs,
            store,
            config,
            config_file: None,
        })
    }

    /// The store dir of this mount (canonical).
    pub fn store(&self) -> PathBuf {
        self.store.clone()
    }
}

/// True if `path` (absolute, canonical) is the mount point of a mounted filesystem.
pub fn is_mountpoint(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// A line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The backing dir, if this is a grainfs mount.
    pub backing: Option<PathBuf>,
}

/// The mountinfo entry whose mount point is `path`, if any (the last one wins, as stacked
/// mounts show the newest last).
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in text.lines() {
        let (left, right) = line.split_once(" - ")?;
        let mp = left.split(' ').nth(4)?;
        if Path::new(&unescape_mountinfo(mp)) != path {
            continue;
        }
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("").to_string();
        let source = unescape_mountinfo(r.next().unwrap_or(""));
        let backing = source.strip_prefix(FSNAME_PREFIX).map(PathBuf::from);
        found = Some(MountEntry {
            backing,
            mountpoint: path.to_path_buf(),
            fstype,
            source,
        });
    }
    found
}

/// The store, opened once: a directory fd checked to be a real directory (not a symlink)
/// owned by the daemon's user, mode 0700. Everything in the store is reached through this fd
/// (as `/proc/self/fd/N/...`), so nobody who can rename or replace the store's path, or any of
/// its parents, can redirect what the daemon (often root) writes.
pub struct StoreDir {
    fd: std::os::fd::OwnedFd,
    real: PathBuf,
}

impl StoreDir {
    /// Create (mode 0700) if missing and open the store at canonical path `store`.
    pub fn open(store: &Path) -> Result<StoreDir, DaemonError> {
        let err = |source| DaemonError::Store {
            path: store.to_path_buf(),
            source,
        };
        let c = std::ffi::CString::new(store.as_os_str().as_encoded_bytes())
            .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        if unsafe { libc::mkdir(c.as_ptr(), 0o700) } == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(e));
            }
        }
        let fd = crate::sys::openat(
            libc::AT_FDCWD,
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
                DaemonError::StoreUnsafe {
                    path: store.to_path_buf(),
                    why: "not a directory (a symlink or a file)".into(),
                }
            } else {
                err(e)
            }
        })?;
        let st = crate::sys::fstat(fd.as_raw_fd()).map_err(err)?;
        let euid = unsafe { libc::geteuid() };
        if st.st_uid != euid {
            return Err(DaemonError::StoreUnsafe {
                path: store.to_path_buf(),
                why: format!("owned by uid {}, not by the daemon's uid {euid}", st.st_uid),
            });
        }
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } == -1 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(StoreDir {
            fd,
            real: store.to_path_buf(),
        })
    }

    /// The path the daemon uses: the store's own inode, through our fd.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The store's real path, for messages.
    pub fn real(&self) -> &Path {
        &self.real
    }
}

/// The store, claimed: the lock is held for as long as this lives.
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// Take the store's daemon lock.
    pub fn claim(dir: &StoreDir) -> Result<StoreLock, DaemonError> {
        let store = dir.real();
        let err = |source| DaemonError::Store {
            path: store.to_path_buf(),
            source,
        };
        let path = dir.path().join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(err)?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == -1 {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            return Err(DaemonError::StoreLocked {
                path: store.to_path_buf(),
                pid: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        file.set_len(0).map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(StoreLock { file, path })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Empty the pid before the lock goes, so a reader never sees a stale pid with no lock.
        let _ = self.file.set_len(0);
        let _ = &self.path;
    }
}

/// Wait until no daemon holds the store's lock (it finished saving and exited), up to `timeout`.
pub fn wait_for_store_release(store: &Path, timeout: std::time::Duration) -> bool {
    let Ok(file) = File::open(store.join(LOCK_FILE)) else {
        return true;
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Where the daemon reports readiness: the parent's pipe when backgrounded, nothing otherwise.
pub trait Ready {
    fn ready(&mut self, mountpoint: &Path);
}

impl Ready for () {
    fn ready(&mut self, _mountpoint: &Path) {}
}

/// Mount and serve until unmounted. `ready` is told once the mount is live.
pub fn serve(req: MountRequest, ready: &mut dyn Ready) -> Result<(), DaemonError> {
    let store_dir = StoreDir::open(&req.store)?;
    let _lock = StoreLock::claim(&store_dir)?;
    // Every store access from here on goes through the store's fd.
    let store = store_dir.path();
    // The kernel already applied the caller's umask to every mode it sends us.
    unsafe { libc::umask(0) };
    crate::sys::raise_nofile_limit();

    let store_inside = req.store.starts_with(&req.backing);
    let tracking = &req.config.tracking;
    let kept_aside = replay_deferred(&req.backing, &store)?;
    let shadowed = req.backing.join(crate::ids::SNAPDIR_NAME);
    if shadowed.symlink_metadata().is_ok() {
        warn!(
            "{} exists in the backing dir: the mount shows the snapshot view under that name \
             instead, so it cannot be reached through the mount and no snapshot includes it; \
             rename it in the backing dir to use it",
            shadowed.display()
        );
    }
    let tracker = if tracking.enabled {
        let geometry = Geometry {
            block_size: tracking.block_size,
            partition_size: tracking.partition_size,
        };
        let (t, recovery) = Tracker::open(&req.backing, &store, geometry, tracking.interval)
            .map_err(|source| DaemonError::Store {
                path: store.clone(),
                source,
            })?;
        if recovery.unclean {
            warn!(
                "the previous daemon did not unmount cleanly: {} partition(s) marked unknown from the write-intent record",
                recovery.intent_partitions
            );
        }
        for path in &recovery.changed_behind {
            warn!("{path} changed behind the overlay's back while unmounted: marked unknown");
        }
        for id in &kept_aside {
            // Acknowledged writes that are not in the file: its tracking cannot vouch for it.
            if let Some(v) = t.get(*id) {
                v.mark_unknown_all();
            }
        }
        Some(Arc::new(t))
    } else {
        info!("tracking disabled by config");
        None
    };
    let overlay = OverlayFs::new(
        &req.backing,
        OverlayOptions {
            store: if store_inside {
                Some(req.store.clone())
            } else {
                None
            },
            tracker: tracker.clone(),
        },
    )?
    .with_snapshots_setuid(
        &store,
        req.config.snapdir == crate::config::SnapDir::Visible,
        req.config.snapshot_setuid,
    )?
    .with_writeback_cache(req.config.fuse.writeback_cache);
    let overlay = Arc::new(overlay);
    let engine = match &tracker {
        Some(t) => Some(Arc::new(start_engine(
            &req,
            &store,
            t.clone(),
            overlay.clone(),
        )?)),
        None => None,
    };
    let lifecycle = match &engine {
        Some(e) => {
            // Deletes a previous daemon began and did not finish are finished first.
            match e.store().resume_deletes() {
                Ok(done) if !done.is_empty() => {
                    info!("finished interrupted delete(s) of {}", done.join(", "))
                }
                Ok(_) => {}
                Err(err) => {
                    warn!("finishing interrupted deletes: {err}; the next start tries again")
                }
            }
            let l = Lifecycle::start(e.clone(), req.config.clone(), req.config_file.clone())
                .map_err(|source| DaemonError::Store {
                    path: store.clone(),
                    source,
                })?;
            Some(Arc::new(l))
        }
        None => None,
    };
    start_control(
        &req,
        &store,
        store_dir.real(),
        tracker.clone(),
        engine.clone(),
        lifecycle.clone(),
    )
    .map_err(|source| DaemonError::Store {
        path: store.clone(),
        source,
    })?;
    let ticker = tracker.as_ref().map(|t| Ticker::start(t.clone()));
    let cache = KernelCache {
        attr_ttl: req.config.cache.attr_timeout,
        entry_ttl: req.config.cache.entry_timeout,
        writeback: req.config.fuse.writeback_cache,
    };
    let settings = MountSettings {
        backing: req.backing.clone(),
        mountpoint: req.mountpoint.clone(),
        allow_other: req.config.allow_other,
        threads: req.config.threads,
        cache,
        transport: req.config.fuse.transport,
    };
    let mut mounted = session::mount(overlay.clone(), &settings).map_err(|e| match e {
        MountError::DevFuse { uid } => DaemonError::DevFuse(req.mountpoint.clone(), uid),
        MountError::Mount(source) => DaemonError::Mount {
            mountpoint: req.mountpoint.clone(),
            source,
        },
        e @ MountError::Transport(_) => DaemonError::Mount {
            mountpoint: req.mountpoint.clone(),
            source: io::Error::other(e.to_string()),
        },
    })?;
    info!(
        "mounted {} at {} ({} threads, transport {}, store {})",
        req.backing.display(),
        req.mountpoint.display(),
        req.config.threads,
        mounted.transport(),
        store_dir.real().display()
    );

    if let Some(e) = &engine {
        e.set_invalidate(invalidator(overlay.clone(), mounted.invalidator()));
    }
    let mut unmounter = mounted.unmounter();
    let mountpoint = req.mountpoint.clone();
    let reloader = lifecycle.clone();
    match signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    // Every signal tries again: a first one may meet a busy mount point.
                    for sig in signals.forever() {
                        if sig == libc::SIGHUP {
                            // As for other daemons: read the config again, never unmount.
                            match &reloader {
                                Some(l) => {
                                    if let Err(e) = l.reload() {
                                        error!("SIGHUP: reload refused, the config in force stays: {e}");
                                    }
                                }
                                None => warn!("SIGHUP: this mount has no snapshot engine (tracking off): nothing to reload"),
                            }
                            continue;
                        }
                        info!("signal {sig}: unmounting {}", mountpoint.display());
                        match unmounter.unmount() {
                            Ok(()) => break,
                            Err(e) => error!(
                                "unmount {}: {e}; still mounted, send the signal again once it is idle, or use grainfs umount --lazy",
                                mountpoint.display()
                            ),
                        }
                    }
                })
                .map_err(|source| DaemonError::Serve {
                    mountpoint: req.mountpoint.clone(),
                    source,
                })?;
        }
        Err(e) => error!("cannot catch SIGINT/SIGTERM ({e}); unmount with grainfs umount"),
    }

    ready.ready(&req.mountpoint);
    let result = mounted.run().map_err(|source| DaemonError::Serve {
        mountpoint: req.mountpoint.clone(),
        source,
    });
    if let Some(e) = &engine {
        // A capture still running has writes parked in memory: they land now, not at the
        // next mount. The engine refuses new snapshots from here on, so the scheduler, stopped
        // next, ends without waiting for a long capture.
        e.stop();
    }
    if let Some(l) = &lifecycle {
        l.stop();
    }
    if let Some(ticker) = ticker {
        ticker.stop();
    }
    if let Some(t) = &tracker {
        // Everything saved and marked clean, so the next mount continues exactly here.
        if let Err(e) = t.shutdown() {
            error!("saving tracking state: {e}; the next mount will treat it as a crash");
        }
    }
    let _ = std::fs::remove_file(control::socket_path(&store));
    info!("unmounted {}", req.mountpoint.display());
    result
}

/// The tracking tick thread: `tracker.tick()` every interval until stopped.
struct Ticker {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Ticker {
    fn start(tracker: Arc<Tracker>) -> Ticker {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let interval = tracker.interval();
        let thread = std::thread::spawn(move || loop {
            match rx.recv_timeout(interval) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = tracker.tick() {
                        error!("tracking tick: {e}");
                    }
                }
                _ => return,
            }
        });
        Ticker { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Writes a killed daemon had accepted but not yet written (parked during a capture) go to
/// their files before anything else looks at them, or aside to lost+found when the file is not
/// provably the same and unchanged. Returns the volumes whose parked writes were kept aside.
/// An error here stops the mount: a journal neither replayed nor kept aside would be cut short
/// by the next capture of its volume.
fn replay_deferred(backing: &Path, store: &Path) -> Result<Vec<VolumeId>, DaemonError> {
    let failed = |source: io::Error| {
        DaemonError::Store {
        path: store.join(crate::snapshot::deferred::DIR),
        source: io::Error::new(
            source.kind(),
            format!(
                "parked writes of a previous daemon could be neither replayed nor kept in {}: {source}; they stay where they are, fix that and mount again",
                store.join(crate::snapshot::recover::LOST_FOUND).display()
            ),
        ),
    }
    };
    let root = File::open(backing).map_err(failed)?;
    let mut aside = Vec::new();
    for o in crate::snapshot::recover::replay(store, root.as_raw_fd()).map_err(failed)? {
        warn!("parked writes of a previous daemon: {o}");
        if let crate::snapshot::recover::Outcome::KeptAside { volume, .. } = o {
            aside.push(volume);
        }
    }
    Ok(aside)
}

/// The snapshot engine of this mount.
fn start_engine(
    req: &MountRequest,
    store: &Path,
    tracker: Arc<Tracker>,
    overlay: Arc<OverlayFs>,
) -> Result<Engine, DaemonError> {
    let mountpoint = req.mountpoint.clone();
    Engine::new(EngineOptions {
        backing: req.backing.clone(),
        store_dir: store.to_path_buf(),
        tracker,
        policy: req.config.policy.clone(),
        groups: req.config.groups.clone(),
        workers: req.config.threads.clamp(1, 4),
        defer_writes: true,
        flush: Box::new(move || {
            // Pages the kernel holds dirty for the mount (write-back cache, shared writable
            // mappings) reach us only at writeback: push them through our own write path and
            // wait for it (`OverlayFs::flush_kernel_cache`, which says why not `syncfs`).
            if let Err(e) = overlay.flush_kernel_cache(&mountpoint) {
                warn!(
                    "flushing the kernel's cached writes of {}: {e}",
                    mountpoint.display()
                );
            }
        }),
    })
    .map_err(|e| DaemonError::Engine(e.to_string()))
}

/// Serve the control socket of this mount.
fn start_control(
    req: &MountRequest,
    store: &Path,
    real_store: &Path,
    tracker: Option<Arc<Tracker>>,
    engine: Option<Arc<Engine>>,
    lifecycle: Option<Arc<Lifecycle>>,
) -> io::Result<()> {
    // The daemon reaches its store through `/proc/self/fd/N`; users must see the real path.
    let (fd_path, real_path) = (
        store.display().to_string(),
        real_store.display().to_string(),
    );
    let shown = move |e: &dyn std::fmt::Display| e.to_string().replace(&fd_path, &real_path);
    let backing = req.backing.display().to_string();
    let mountpoint = req.mountpoint.display().to_string();
    let tracking = req.config.tracking.clone();
    control::serve(
        store,
        Arc::new(move |r, job: &Job| match r {
            Request::Ping => Response::Pong,
            Request::Cancel => Response::Error {
                message: "cancel: nothing to cancel".into(),
            },
            Request::Status { paths } => {
                let volumes = match &tracker {
                    Some(t) => t
                        .change_maps_with_paths()
                        .into_iter()
                        .filter(|m| path_selected(m.path.as_deref(), &paths))
                        .collect(),
                    None => Vec::new(),
                };
                Response::Status(StatusReport {
                    live: true,
                    backing: backing.clone(),
                    mountpoint: Some(mountpoint.clone()),
                    tracking: tracker.is_some(),
                    block_size: tracking.block_size,
                    partition_size: tracking.partition_size,
                    interval_secs: tracking.interval.as_secs_f64(),
                    volumes,
                    groups: lifecycle.as_ref().map(|l| l.groups()).unwrap_or_default(),
                })
            }
            Request::SnapshotCreate(c) => match &engine {
                Some(e) => match e.create_with(&c, job) {
                    Ok(r) => Response::Snapshot(r),
                    Err(err) => Response::Error {
                        message: shown(&err),
                    },
                },
                None => no_engine(),
            },
            Request::SnapshotDelete { name } => match &engine {
                Some(e) => match e.delete_with(&name, job) {
                    Ok(_) => Response::Deleted { name },
                    Err(err) => Response::Error {
                        message: shown(&err),
                    },
                },
                None => no_engine(),
            },
            Request::Prune { group, dry_run } => match &engine {
                Some(e) => match e.prune(group.as_deref(), dry_run, crate::sys::realtime_ns()) {
                    Ok(r) => Response::Pruned(r),
                    Err(err) => Response::Error {
                        message: shown(&err),
                    },
                },
                None => no_engine(),
            },
            Request::Diff { from, to, paths } => match &engine {
                Some(e) => {
                    use crate::snapshot::diff::Side;
                    match (Side::parse(&from), Side::parse(&to)) {
                        (Ok(a), Ok(b)) => match e.diff(&a, &b, &paths) {
                            Ok(r) => Response::Diff(r),
                            Err(err) => Response::Error {
                                message: shown(&err),
                            },
                        },
                        (Err(message), _) | (_, Err(message)) => Response::Error { message },
                    }
                }
                None => no_engine(),
            },
            Request::Rollback(rb) => match &engine {
                Some(e) => match e.rollback_with(&rb, job) {
                    Ok(r) => Response::RolledBack(r),
                    Err(err) => Response::Error {
                        message: shown(&err),
                    },
                },
                None => no_engine(),
            },
            Request::Reload => match &lifecycle {
                Some(l) => match l.reload() {
                    Ok(changes) => Response::Reloaded { changes },
                    Err(message) => Response::Error { message },
                },
                None => no_engine(),
            },
        }),
    )
}

/// What drops the kernel's caches of files a rollback changed: backing inodes mapped to the
/// inode numbers the kernel knows (one it never looked up has nothing cached).
fn invalidator(
    overlay: Arc<OverlayFs>,
    kernel: session::Invalidator,
) -> Arc<crate::snapshot::rollback::InvalidateFn> {
    use crate::snapshot::rollback::Invalidate;
    Arc::new(move |what: &Invalidate| {
        let r = match what {
            Invalidate::Content { dev, ino } => {
                overlay.kernel_ino(*dev, *ino).map(|i| kernel.content(i))
            }
            Invalidate::Entry { dev, ino, name } => overlay
                .kernel_ino(*dev, *ino)
                .map(|i| kernel.entry(i, name)),
        };
        if let Some(Err(e)) = r {
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("dropping the kernel's cache after a rollback ({what:?}): {e}");
            }
        }
    })
}

fn no_engine() -> Response {
    Response::Error {
        message: "snapshots need change tracking, and this mount has it off: set tracking.enabled = true in the config and mount again".into(),
    }
}

/// True if a volume at `path` (relative to the backing dir) is selected by `paths` (empty:
/// everything; a directory selects what is under it).
pub fn path_selected(path: Option<&str>, paths: &[String]) -> bool {
    if paths.is_empty() {
        return true;
    }
    let Some(path) = path else { return false };
    paths.iter().any(|p| {
        let p = p.trim_end_matches('/');
        p.is_empty() || p == "." || path == p || path.starts_with(&format!("{p}/"))
    })
}
