//! `grainfs umount MOUNTPOINT`: unmount a grainfs mount and wait for its daemon to save and exit.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;

use super::CliError;
use crate::config::Config;
use crate::daemon;

/// Arguments of `grainfs umount`.
#[derive(Debug, ClapArgs)]
pub struct UmountArgs {
    /// The mount point to unmount.
    pub mountpoint: PathBuf,
    /// Detach now even if files are open (the daemon exits when the last one closes).
    #[arg(short = 'z', long)]
    pub lazy: bool,
    /// The config the mount was started with (to find a store outside the backing dir).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

pub(super) fn run(args: &UmountArgs) -> Result<(), CliError> {
    let mp = std::fs::canonicalize(&args.mountpoint).map_err(|source| CliError::Io {
        what: format!("mount point {}", args.mountpoint.display()),
        source,
    })?;
    let entry = daemon::mount_entry(&mp)
        .ok_or_else(|| CliError::Usage(format!("{} is not mounted", mp.display())))?;
    let Some(backing) = entry.backing.clone() else {
        return Err(CliError::Usage(format!(
            "{} is a {} mount, not grainfs; use umount(8)",
            mp.display(),
            entry.fstype
        )));
    };
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let store = config.store_dir(&backing);

    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
            .map_err(|_| CliError::Usage(format!("{}: bad path", mp.display())))?;
        let flags = if args.lazy { libc::MNT_DETACH } else { 0 };
        if unsafe { libc::umount2(c.as_ptr(), flags) } == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(CliError::Usage(format!(
                    "{} is busy: a process has a file open or its working directory there \
                     (see `fuser -vm {}`); close them, or use --lazy",
                    mp.display(),
                    mp.display()
                )));
            }
            return Err(CliError::Io {
                what: format!("unmounting {}", mp.display()),
                source: e,
            });
        }
    } else {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if args.lazy {
            cmd.arg("-z");
        }
        let status = cmd.arg(&mp).status().map_err(|source| CliError::Io {
            what: "running fusermount3 (install the fuse3 package)".into(),
            source,
        })?;
        if !status.success() {
            return Err(CliError::Usage(format!(
                "fusermount3 -u {} failed ({status})",
                mp.display()
            )));
        }
    }
    if !args.lazy && !daemon::wait_for_store_release(&store, Duration::from_secs(60)) {
        log::warn!(
            "unmounted {}, but its daemon still holds {} after 60 s",
            mp.display(),
            store.display()
        );
    }
    Ok(())
}
