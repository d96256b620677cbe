//! A filesystem of a chosen kind made on a loop device in a test's temp dir (ext4 for the
//! power-cut tests, XFS with reflink for the reflink tests), mounted, and torn down on drop
//! (unmounted, the loop device detached, the image removed) even when the test panics. Needs
//! root, `/dev/loop-control`, `losetup`, `mount` and the filesystem's mkfs: `usable` says why
//! not on stderr (the caller then skips).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Run `cmd`; its stdout, or why it failed.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: cannot run it: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

/// The kind of filesystem to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    /// ext4 with 4 KiB blocks.
    Ext4,
    /// XFS with reflink (`mkfs.xfs -m reflink=1`).
    XfsReflink,
}

impl FsKind {
    fn mkfs(self) -> &'static str {
        match self {
            FsKind::Ext4 => "mkfs.ext4",
            FsKind::XfsReflink => "mkfs.xfs",
        }
    }

    fn fstype(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::XfsReflink => "xfs",
        }
    }
}

/// Whether loop filesystems of `kind` can be made here; says why not on stderr ("SKIP: ...").
pub fn usable(kind: FsKind) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: loop filesystems need root (loop devices, mount)");
        return false;
    }
    if super::missing("losetup") || super::missing(kind.mkfs()) || super::missing("mount") {
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP: no /dev/loop-control: loop devices are missing");
        return false;
    }
    true
}

/// A filesystem image on a loop device, mounted at `dir` (or not, between power cuts).
pub struct LoopFs {
    image: PathBuf,
    dev: String,
    dir: PathBuf,
    kind: FsKind,
    mounted: bool,
}

impl LoopFs {
    /// A fresh filesystem of `size` bytes in `image`, mounted at `dir`; Err says why loop
    /// devices cannot be used here.
    pub fn new(kind: FsKind, image: PathBuf, dir: PathBuf, size: u64) -> Result<LoopFs, String> {
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("create {}: {e}", image.display()))?;
        match kind {
            // 4 KiB filesystem blocks, one per page and per tracking block: on a small image
            // mkfs picks 1 KiB, and a page written back in part at a power cut leaves a 4 KiB
            // block torn, which a filesystem may do to unsynced data but the power-cut oracle
            // does not model.
            FsKind::Ext4 => run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .arg(&image))?,
            FsKind::XfsReflink => run(Command::new("mkfs.xfs")
                .args(["-q", "-f", "-m", "reflink=1"])
                .arg(&image))?,
        };
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))?;
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut fs = LoopFs {
            image,
            dev,
            dir,
            kind,
            mounted: false,
        };
        fs.mount()?;
        Ok(fs)
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Mount it (again) at its dir.
    pub fn mount(&mut self) -> Result<(), String> {
        run(Command::new("mount")
            .args(["-t", self.kind.fstype(), &self.dev])
            .arg(&self.dir))?;
        self.mounted = true;
        Ok(())
    }

    /// The power cut: the filesystem stops at once, and what its log had not committed is
    /// gone (EXT4_IOC_SHUTDOWN = XFS_IOC_GOINGDOWN = _IOR('X', 125, u32), flag NOLOGFLUSH).
    pub fn cut(&self) {
        const GOINGDOWN: u64 = (2 << 30) | (4 << 16) | ((b'X' as u64) << 8) | 125;
        const NOLOGFLUSH: u32 = 2;
        let d = File::open(&self.dir).expect("open the loop fs root");
        let flag = NOLOGFLUSH;
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&d),
                GOINGDOWN as _,
                &flag as *const u32,
            )
        };
        assert_eq!(r, 0, "shutdown ioctl: {}", std::io::Error::last_os_error());
    }

    /// Unmount for real (a lazy detach would keep the old superblock, and the next mount would
    /// get it back without replaying the journal); retried while something still holds it.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let c = cstr(&self.dir);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                self.mounted = false;
                return;
            }
            let e = std::io::Error::last_os_error();
            assert!(
                e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline,
                "umount {}: {e}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let c = cstr(&self.dir);
            let deadline = Instant::now() + Duration::from_secs(10);
            while unsafe { libc::umount2(c.as_ptr(), 0) } != 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.image);
    }
}
