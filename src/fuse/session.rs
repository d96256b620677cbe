//! The FUSE session of one mount: the mount options, /dev/fuse, fuser's `Session` and its
//! threads, the request path (`[fuse] transport`: FUSE over io_uring or /dev/fuse reads, both
//! served by the vendored fuser in vendor/fuser), the mount's readahead and dirty page limits,
//! and how the mount names itself in mountinfo.
//!
//! It owns the kernel side of a mount's life, from mounting to the end of `run`; it never
//! decides what happens around it (the store, tracking, signals, the order of shutdown: that is
//! `daemon`), and it never answers a request itself (that is the adapter, `FuseAdapter`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{MountOption, SessionACL, SessionUnmounter};

use super::{FuseAdapter, KernelCache};
use crate::config::Transport;
use crate::fs::OverlayFs;

/// Prefix of the mount's source in mountinfo: `grainfs:<backing>`. It identifies our mounts
/// even where the fs type shows only as `fuse` (fuser mounts as root without the subtype).
pub const FSNAME_PREFIX: &str = "grainfs:";

/// Readahead of the mount, in KiB. The kernel gives a FUSE mount 128 KiB, so sequential reads
/// reach the daemon as 128 KiB requests; at 1 MiB (our max_write) they come as 1 MiB requests,
/// a quarter of the round trips per byte.
const READ_AHEAD_KB: u32 = 1024;

/// What a mount needs to know beyond the filesystem it serves.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// The backing dir, named in the mount's source (`FSNAME_PREFIX`).
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// Let other users in; `None`: only when the daemon is root (config `allow_other`).
    pub allow_other: Option<bool>,
    /// Threads serving requests: each with its own /dev/fuse fd, or over io_uring spread over
    /// the CPUs' queues (at least two each).
    pub threads: usize,
    pub cache: KernelCache,
    /// The request path (config `[fuse] transport`).
    pub transport: Transport,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// /dev/fuse is not open to this (non-root) user.
    #[error("/dev/fuse is not open to uid {uid}")]
    DevFuse { uid: u32 },
    /// The kernel or fusermount refused the mount.
    #[error("{0}")]
    Mount(io::Error),
    /// `transport = "io_uring"` where the kernel or this process cannot have it.
    #[error("[fuse] transport = \"io_uring\", but FUSE over io_uring is not available: {0}; use transport = \"auto\" to fall back to /dev/fuse")]
    Transport(String),
}

/// A live mount, not yet served: `run` serves it until it is unmounted.
pub struct Mounted {
    session: fuser::Session<FuseAdapter>,
}

/// The sysfs switch of FUSE over io_uring; it applies to every FUSE mount of the machine made
/// after it is set.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel will offer FUSE over io_uring at INIT: turn the fuse module's switch on as
/// root (logging it), or say why not.
fn enable_uring(root: bool) -> Result<(), String> {
    // The fuse module may not be loaded yet: opening /dev/fuse loads it.
    let _ = std::fs::File::open("/dev/fuse");
    let value = match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "this kernel has no FUSE over io_uring ({ENABLE_URING} is missing: it needs \
                 Linux 6.14 or later built with CONFIG_FUSE_IO_URING)"
            ))
        }
        Err(e) => return Err(format!("cannot read {ENABLE_URING}: {e}")),
    };
    if value.trim() == "Y" {
        return Ok(());
    }
    if !root {
        return Err(format!("{ENABLE_URING} is N and only root may turn it on"));
    }
    std::fs::write(ENABLE_URING, "Y").map_err(|e| format!("cannot turn on {ENABLE_URING}: {e}"))?;
    log::info!(
        "turned on FUSE over io_uring for this machine: {ENABLE_URING} = Y (it was N; every FUSE \
         mount made from now on may use it)"
    );
    Ok(())
}

/// Unmounts a `Mounted` from another thread (a signal handler).
pub struct Unmounter(SessionUnmounter);

impl Unmounter {
    /// Unmount; fails (and leaves the mount alone) while it is busy.
    pub fn unmount(&mut self) -> io::Result<()> {
        self.0.unmount()
    }
}

/// Mount `fs` at `settings.mountpoint`.
pub fn mount(fs: Arc<OverlayFs>, settings: &MountSettings) -> Result<Mounted, MountError> {
    let adapter = FuseAdapter::new(fs, settings.cache);
    let notifier = adapter.notifier_slot();

    let root = crate::sys::geteuid() == 0;
    let allow_other = settings.allow_other.unwrap_or(root);
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName(format!("{FSNAME_PREFIX}{}", settings.backing.display())),
        MountOption::Subtype("grainfs".into()),
        // The kernel checks permissions from the attributes we report, as for a local fs.
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    // Never weaker than the backing filesystem: where it is nosuid or nodev, so is the mount
    // (otherwise a setuid file or a device node there would work through us, as root). As an
    // ordinary user FUSE is always nosuid,nodev.
    let backing_flags = crate::sys::statvfs_flags(&settings.backing).unwrap_or(u64::MAX);
    if root && backing_flags & libc::ST_NOSUID == 0 {
        options.mount_options.push(MountOption::Suid);
    } else {
        options.mount_options.push(MountOption::NoSuid);
    }
    if root && backing_flags & libc::ST_NODEV == 0 {
        options.mount_options.push(MountOption::Dev);
    } else {
        options.mount_options.push(MountOption::NoDev);
    }
    options.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    options.n_threads = Some(settings.threads.max(1));
    options.clone_fd = true;
    options.io_uring = match settings.transport {
        Transport::Dev => false,
        Transport::Auto | Transport::IoUring => match enable_uring(root) {
            Ok(()) => true,
            Err(reason) if settings.transport == Transport::IoUring => {
                return Err(MountError::Transport(reason))
            }
            Err(reason) => {
                log::info!("FUSE over io_uring not used: {reason}");
                false
            }
        },
    };

    if !root && unsafe { libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        // fusermount3 too opens /dev/fuse as the calling user, so nothing else can work.
        return Err(MountError::DevFuse {
            uid: unsafe { libc::getuid() },
        });
    }
    let session =
        fuser::Session::new(adapter, &settings.mountpoint, &options).map_err(MountError::Mount)?;
    match session.io_uring() {
        fuser::IoUringStatus::Agreed { .. } => log::info!(
            "transport: FUSE over io_uring, a queue per CPU, {} threads spread over them (at \
             least two each)",
            settings.threads.max(1)
        ),
        fuser::IoUringStatus::Unavailable(reason) if settings.transport == Transport::IoUring => {
            // Dropping the session unmounts.
            return Err(MountError::Transport(reason.clone()));
        }
        fuser::IoUringStatus::Unavailable(reason) => log::info!(
            "transport: /dev/fuse with {} threads (FUSE over io_uring not used: {reason})",
            settings.threads.max(1)
        ),
        fuser::IoUringStatus::NotRequested => log::info!(
            "transport: /dev/fuse with {} threads",
            settings.threads.max(1)
        ),
    }
    let _ = notifier.set(session.notifier());
    tune_bdi(&settings.mountpoint, root, settings.cache.writeback);
    Ok(Mounted { session })
}

/// Drops what the kernel caches of a file changed beside it (a rollback's writes). Never call
/// it while holding a lock a request of this mount may wait for: dropping pages waits for the
/// pages that reads in flight hold locked.
#[derive(Clone)]
pub struct Invalidator(fuser::Notifier);

impl Invalidator {
    /// Drop the attributes and every cached page of inode `ino`.
    pub fn content(&self, ino: u64) -> io::Result<()> {
        self.0.inval_inode(fuser::INodeNo(ino), 0, 0)
    }

    /// Drop the cached entry `name` in directory `parent` (negative ones too).
    pub fn entry(&self, parent: u64, name: &std::ffi::OsStr) -> io::Result<()> {
        self.0.inval_entry(fuser::INodeNo(parent), name)
    }
}

impl Mounted {
    /// The request path in use: "io_uring" or "dev".
    pub fn transport(&self) -> &'static str {
        match self.session.io_uring() {
            fuser::IoUringStatus::Agreed { .. } => "io_uring",
            _ => "dev",
        }
    }

    /// What unmounts this mount from another thread.
    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.session.unmount_callable())
    }

    /// What invalidates the kernel's caches of this mount from another thread.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator(self.session.notifier())
    }

    /// Serve requests until the mount goes away.
    pub fn run(self) -> io::Result<()> {
        self.session.run()
    }
}

/// Share of the system's dirty page limit (vm.dirty_ratio or vm.dirty_bytes) the mount's dirty
/// pages may take in write-back mode, in percent: the bound of what the daemon raises. The
/// kernel gives a FUSE mount 1 % (about 50 MB on this machine kind) and a strict limit of its
/// own (`strict_limit`), which throttles a writer as soon as that is full, so write-back gains
/// nothing for large writes. Half the system's limit lets a mount absorb a burst while another
/// disk (or the backing filesystem, which needs dirty pages of its own to take our writes)
/// still gets the other half.
pub const WRITEBACK_MAX_RATIO: u32 = 50;

/// Raise the readahead of the mount's backing device info, and in write-back mode its dirty
/// limits (`WRITEBACK_MAX_RATIO`, `strict_limit` off): root only, best effort, each step
/// logged. The device is read from mountinfo: a stat of the mount point here would wait on our
/// own session.
fn tune_bdi(mountpoint: &Path, root: bool, writeback: bool) {
    if !root {
        if writeback {
            log::info!(
                "not root: the mount's dirty page limits stay at the kernel's FUSE defaults \
                 (1 % of the dirty limit, strict), so large writes gain little from write-back"
            );
        }
        return;
    }
    let Some(dev) = mount_device(mountpoint) else {
        log::info!(
            "no mountinfo line for {}: bdi limits left alone",
            mountpoint.display()
        );
        return;
    };
    let bdi = Path::new("/sys/class/bdi").join(&dev);
    let set = |name: &str, value: String| {
        let path = bdi.join(name);
        match std::fs::write(&path, &value) {
            Ok(()) => true,
            Err(e) => {
                log::info!("cannot set {} to {value}: {e}", path.display());
                false
            }
        }
    };
    let readahead = set("read_ahead_kb", READ_AHEAD_KB.to_string());
    if !writeback {
        if readahead {
            log::info!("bdi {dev}: read_ahead_kb {READ_AHEAD_KB}");
        }
        return;
    }
    if set("max_ratio", WRITEBACK_MAX_RATIO.to_string()) & set("strict_limit", "0".into()) {
        let max_bytes = std::fs::read_to_string(bdi.join("max_bytes"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        log::info!(
            "write-back: bdi {dev}: max_ratio {WRITEBACK_MAX_RATIO} % (max_bytes {max_bytes}), \
             strict_limit 0, read_ahead_kb {READ_AHEAD_KB}"
        );
    }
}

/// The device number (`major:minor`) of the mount at `mountpoint`, from mountinfo.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (Path::new(&unescape_mountinfo(mp)) == mountpoint).then(|| dev.to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
