//! `grainfs mount [BACKING MOUNTPOINT] [-c FILE] [-f]`.
//!
//! Without `-f` the command re-executes itself as a detached daemon (a new session, stdio on
//! /dev/null, logging to the store) and returns 0 only once that daemon reports the mount live,
//! as sshfs and mount-s3 do. A failure before that is printed here and exits non-zero.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Args as ClapArgs;

use super::{init_logging, Args, CliError, LogTarget};
use crate::config::Config;
use crate::daemon::{self, MountRequest, Ready, LOG_FILE};

/// Arguments of `grainfs mount`.
#[derive(Debug, ClapArgs)]
pub struct MountArgs {
    /// Directory holding the volumes (or `backing` in the config).
    pub backing: Option<PathBuf>,
    /// Where to show it (or `mountpoint` in the config).
    pub mountpoint: Option<PathBuf>,
    /// Config file; without one the embedded defaults serve.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Stay in the foreground, logging to stderr; SIGINT or SIGTERM unmounts.
    #[arg(short, long)]
    pub foreground: bool,
    /// Internal: this process is the background daemon; report readiness on stdout.
    #[arg(long, hide = true)]
    pub daemonized: bool,
}

const READY: &str = "ready";

/// Tells the waiting parent the mount is live, then lets go of the pipe.
struct PipeReady;

impl Ready for PipeReady {
    fn ready(&mut self, _mountpoint: &Path) {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
        detach_stdout();
    }
}

fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

pub(super) fn run(m: &MountArgs, args: &Args) -> Result<(), CliError> {
    let config = match &m.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let backing = m.backing.clone().or_else(|| config.backing.clone()).ok_or_else(|| {
        CliError::Usage("no backing dir: run `grainfs mount BACKING MOUNTPOINT`, or set `backing` in the config".into())
    })?;
    let mountpoint = m.mountpoint.clone().or_else(|| config.mountpoint.clone()).ok_or_else(|| {
        CliError::Usage("no mount point: run `grainfs mount BACKING MOUNTPOINT`, or set `mountpoint` in the config".into())
    })?;
    let level = config.log_level.clone();

    if m.daemonized {
        // Errors go to the parent through the pipe, so it can print them and fail.
        let result = (|| {
            let mut req = MountRequest::check(&backing, &mountpoint, config)?;
            req.config_file = config_file(m);
            // The log file is reached through the checked store fd, like everything in it.
            let store = daemon::StoreDir::open(&req.store())?;
            init_logging(
                args.verbose,
                args.quiet,
                level.as_deref(),
                "info",
                LogTarget::File(store.path().join(LOG_FILE)),
            );
            daemon::serve(req, &mut PipeReady).map_err(CliError::from)
        })();
        if let Err(e) = &result {
            log::error!("{e}");
            println!("error: {e}");
            detach_stdout();
        }
        return result;
    }

    let mut req = MountRequest::check(&backing, &mountpoint, config)?;
    req.config_file = config_file(m);
    if m.foreground {
        init_logging(
            args.verbose,
            args.quiet,
            level.as_deref(),
            "info",
            LogTarget::Stderr,
        );
        return daemon::serve(req, &mut ()).map_err(CliError::from);
    }
    spawn_daemon(&req, m, args)
}

/// Start the background daemon and wait for it to report the mount live or fail.
fn spawn_daemon(req: &MountRequest, m: &MountArgs, args: &Args) -> Result<(), CliError> {
    let exe = std::env::current_exe().map_err(|source| CliError::Io {
        what: "finding the grainfs executable".into(),
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&req.backing)
        .arg(&req.mountpoint)
        .arg("--daemonized");
    if let Some(c) = &m.config {
        let abs = std::fs::canonicalize(c).unwrap_or_else(|_| c.clone());
        cmd.arg("--config").arg(abs);
    }
    for _ in 0..args.verbose {
        cmd.arg("-v");
    }
    if args.quiet {
        cmd.arg("-q");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .current_dir("/");
    // A new session: the daemon outlives the terminal and ignores its Ctrl-C.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| CliError::Io {
        what: "starting the grainfs daemon".into(),
        source,
    })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::Usage("daemon pipe missing".into()))?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim_end();
    if line == READY {
        return Ok(());
    }
    if let Some(msg) = line.strip_prefix("error: ") {
        let _ = child.wait();
        return Err(CliError::Usage(msg.to_string()));
    }
    let status = child
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    Err(CliError::Usage(format!(
        "the daemon exited ({status}) before the mount was live; see {}",
        req.store().join(LOG_FILE).display()
    )))
}

/// The config file as the daemon reads it again on a reload: absolute, since the daemon's
/// working directory is not the caller's.
fn config_file(m: &MountArgs) -> Option<PathBuf> {
    m.config
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
}
