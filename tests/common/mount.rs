//! The one real-mount fixture shared by the integration tests: a backing dir and a mount point
//! in a fresh temp dir, a foreground `grainfs mount -f` child, and an unmount on drop that runs
//! even when the test panics. Tests using it can run in parallel. It never touches the
//! overlay's internals: everything goes through the mount and the `grainfs` binary.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A live grainfs mount over a temp backing dir.
pub struct Mount {
    tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

/// The grainfs binary under test.
pub fn grainfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_grainfs")
}

/// True if `path` is currently a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    text.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// The config of write-back mode: the kernel's page cache absorbs writes.
pub const WRITEBACK: &str = "\n[fuse]\nwriteback_cache = true\n";

/// Whether every mount of this run is in write-back mode (`GRAINFS_TEST_WRITEBACK=1`: the
/// whole real-mount suite in that mode; by default only the tests that ask for it are).
pub fn writeback_everywhere() -> bool {
    std::env::var("GRAINFS_TEST_WRITEBACK").is_ok_and(|v| v == "1")
}

/// The request path every mount of this run asks for (`[fuse] transport`):
/// `GRAINFS_TEST_TRANSPORT` (`auto`, `io_uring` or `dev`), else `io_uring` in `tests/uring.rs`
/// (which runs a representative part of the suite over it) where the kernel has it, else the
/// config's own default.
pub fn test_transport() -> Option<String> {
    match std::env::var("GRAINFS_TEST_TRANSPORT") {
        Ok(t) if !t.is_empty() => Some(t),
        _ if option_env!("CARGO_CRATE_NAME") == Some("uring") => match uring_unavailable() {
            None => Some("io_uring".into()),
            Some(why) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!("FUSE over io_uring tests skipped ({why}): running over /dev/fuse")
                });
                Some("dev".into())
            }
        },
        _ => None,
    }
}

/// Why this kernel or process cannot serve a mount over FUSE over io_uring, if it cannot.
pub fn uring_unavailable() -> Option<String> {
    let param = "/sys/module/fuse/parameters/enable_uring";
    let _ = File::open("/dev/fuse"); // loads the fuse module
    let root = unsafe { libc::geteuid() } == 0;
    match std::fs::read_to_string(param) {
        Err(_) => Some(format!(
            "{param} is missing: no FUSE over io_uring in this kernel"
        )),
        Ok(v) if v.trim() != "Y" && !root => Some(format!("{param} is N and we are not root")),
        Ok(_) => match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            Ok(v) if v.trim() == "2" || (v.trim() == "1" && !root) => {
                Some("io_uring is disabled (kernel.io_uring_disabled)".into())
            }
            _ => None,
        },
    }
}

/// `config` with `[fuse] transport` set to `test_transport()`, unless it names one itself.
fn with_test_transport(config: Option<String>) -> Option<String> {
    let Some(transport) = test_transport() else {
        return config;
    };
    let text = config.unwrap_or_default();
    if text.contains("transport") {
        return Some(text);
    }
    let line = format!("transport = \"{transport}\"\n");
    Some(match text.find("[fuse]\n") {
        Some(at) => format!("{}{line}{}", &text[..at + 7], &text[at + 7..]),
        None => format!("{text}\n[fuse]\n{line}"),
    })
}

impl Mount {
    /// Mount an empty backing dir with the embedded defaults.
    pub fn new() -> Mount {
        Mount::with_setup(|_| {}, None)
    }

    /// Mount an empty backing dir in write-back mode.
    pub fn writeback() -> Mount {
        Mount::with_setup(|_| {}, Some(WRITEBACK))
    }

    /// `with_setup` with `config` (or none) plus `WRITEBACK` when `writeback`.
    pub fn in_mode(writeback: bool, setup: impl FnOnce(&Path), config: Option<&str>) -> Mount {
        match (writeback, config) {
            (false, c) => Mount::with_setup(setup, c),
            (true, c) => Mount::with_setup(setup, Some(&format!("{}{WRITEBACK}", c.unwrap_or("")))),
        }
    }

    /// Mount after `setup` populated the backing dir, optionally with a config file's text
    /// (written to the temp dir; `backing`/`mountpoint` need not be in it).
    pub fn with_setup(setup: impl FnOnce(&Path), config: Option<&str>) -> Mount {
        Mount::with_setup_in(&std::env::temp_dir(), setup, config)
    }

    /// `with_setup` with the temp dir (backing dir, store, mount point) made in `parent`: on a
    /// filesystem of the test's choice (`loopfs`).
    pub fn with_setup_in(parent: &Path, setup: impl FnOnce(&Path), config: Option<&str>) -> Mount {
        let tmp = tempfile::Builder::new()
            .prefix("grainfs-test-")
            .tempdir_in(parent)
            .expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonicalize");
        let backing = root.join("backing");
        let mnt = root.join("mnt");
        std::fs::create_dir(&backing).expect("mkdir backing");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        setup(&backing);
        let log = root.join("daemon.log");
        let mut cmd = Command::new(grainfs_bin());
        cmd.arg("mount").arg(&backing).arg(&mnt).arg("-f");
        let everywhere = (writeback_everywhere() && !config.is_some_and(|c| c.contains("[fuse]")))
            .then(|| format!("{}{WRITEBACK}", config.unwrap_or("")));
        let text = with_test_transport(everywhere.or(config.map(str::to_string)));
        if let Some(text) = text {
            let cfg = root.join("grainfs.toml");
            std::fs::write(&cfg, text).expect("write config");
            cmd.arg("-c").arg(&cfg);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .expect("spawn grainfs");
        let mut m = Mount {
            tmp,
            backing,
            mnt,
            child: Some(child),
            log,
        };
        m.wait_live();
        m
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "grainfs exited ({status}) before mounting:\n{}",
                        self.log_text()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "mount not live after 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The backing dir (the real files).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The mount point (the overlay).
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// A scratch dir beside the mount, outside both backing and mount.
    pub fn scratch(&self) -> PathBuf {
        let p = self.tmp.path().join("scratch");
        let _ = std::fs::create_dir_all(&p);
        p
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmount with `grainfs umount` and wait for the daemon to exit; returns its exit status.
    pub fn unmount(mut self) -> std::process::ExitStatus {
        self.stop()
    }

    /// Kill the daemon with SIGKILL (the mount is left dead until drop detaches it).
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait for a child up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Detach a mount point, whatever state its daemon is in.
pub fn force_unmount(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).expect("path");
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    } else {
        let _ = Command::new("fusermount3").arg("-uz").arg(mnt).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        force_unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- grainfs daemon log ---\n{}", self.log_text());
        }
    }
}

/// A plain temp dir to run the same operations on, as the reference.
pub fn plain_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("grainfs-plain-")
        .tempdir()
        .expect("tempdir")
}

/// blake3 of a file's content, as hex.
pub fn blake3_file(path: &Path) -> String {
    let data = std::fs::read(path).expect("read for hash");
    blake3::hash(&data).to_hex().to_string()
}

/// Open `p` read-write, creating it if missing, never truncating.
pub fn open_rw(p: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
}

/// `grainfs status --json` of the mount at `mnt`, which must succeed, parsed.
pub fn status_json(mnt: &Path) -> grainfs::control::StatusReport {
    let out = Command::new(grainfs_bin())
        .args(["status", "--json"])
        .arg(mnt)
        .output()
        .expect("run grainfs status");
    assert!(
        out.status.success(),
        "grainfs status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is a StatusReport")
}

/// Skip (return true) when an external program is missing, saying so on stderr.
pub fn missing(program: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIP: {program} not installed");
    }
    !found
}

/// Restarting a mount on the same dirs (tracking tests: clean unmount or kill -9, then a new
/// daemon on the same backing dir).
impl Mount {
    /// The store dir of the default config, `<backing>/.grainfs`.
    pub fn store(&self) -> PathBuf {
        self.backing.join(".grainfs")
    }

    /// Unmount cleanly with `grainfs umount` like `unmount`, but keep the temp dirs, so that
    /// `remount` can serve the same backing dir again; returns the daemon's exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let out = umount_retrying(&self.mnt);
        assert!(
            out.status.success(),
            "grainfs umount failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        let mut child = self.child.take().expect("child");
        wait_timeout(&mut child, Duration::from_secs(30)).expect("daemon did not exit after umount")
    }

    /// Start a new daemon on the same backing dir and mount point, with the same config file
    /// if there was one. A mount left dead by `kill9` is detached first; after `stop` there is
    /// nothing to detach. The new daemon's log is appended to the same log file.
    pub fn remount(&mut self) {
        force_unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while is_mounted(&self.mnt) {
            assert!(Instant::now() < deadline, "old mount still attached");
            std::thread::sleep(Duration::from_millis(10));
        }
        let root = self.tmp.path().canonicalize().expect("canonicalize");
        let mut cmd = Command::new(grainfs_bin());
        cmd.arg("mount").arg(&self.backing).arg(&self.mnt).arg("-f");
        let cfg = root.join("grainfs.toml");
        if cfg.exists() {
            cmd.arg("-c").arg(&cfg);
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .expect("spawn grainfs");
        self.child = Some(child);
        self.wait_live();
    }
}

/// `grainfs umount`, retried for a moment while the mount is busy: a parallel test's fork
/// (before its exec) briefly holds duplicates of this process's fds, files on this mount among
/// them, and the kernel then refuses the unmount with EBUSY.
pub fn umount_retrying(mnt: &Path) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(grainfs_bin())
            .arg("umount")
            .arg(mnt)
            .output()
            .expect("run grainfs umount");
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy || Instant::now() >= deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
