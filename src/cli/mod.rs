//! The command line: one file per subcommand. It parses arguments, sets up logging and calls the
//! daemon or opens the store; it never touches FUSE or file data itself.

mod check_config;
mod diff;
mod mount;
mod progress;
mod prune;
mod recover;
mod reload;
mod restore;
mod rollback;
mod snapshot;
mod status;
mod umount;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use check_config::CheckConfigArgs;
pub use diff::DiffArgs;
pub use mount::MountArgs;
pub use prune::PruneArgs;
pub use recover::RecoverArgs;
pub use reload::ReloadArgs;
pub use restore::RestoreArgs;
pub use rollback::RollbackArgs;
pub use snapshot::{SnapshotArgs, SnapshotCommand};
pub use status::StatusArgs;
pub use umount::UmountArgs;

/// grainfs: snapshots for directories of file-backed volumes.
#[derive(Debug, Parser)]
#[command(name = "grainfs", version, about, long_about = None)]
pub struct Args {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors in the log.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the overlay of BACKING at MOUNTPOINT (backgrounds once the mount is live).
    Mount(MountArgs),
    /// Unmount a grainfs mount and wait for its daemon to finish.
    Umount(UmountArgs),
    /// Check a config file; errors name the key and the line.
    CheckConfig(CheckConfigArgs),
    /// Change tracking per volume and partition: dirty bytes, rates, access pattern, unknowns.
    Status(StatusArgs),
    /// Take, list, show, verify, hold, release and delete snapshots.
    Snapshot(SnapshotArgs),
    /// Apply retention now: remove what the groups' keep rules and max_store_bytes let go.
    Prune(PruneArgs),
    /// Make the daemon read its config file again (as SIGHUP does).
    Reload(ReloadArgs),
    /// Write a snapshot's files (or some of them) into a directory, holes, modes, owners and
    /// times included.
    Restore(RestoreArgs),
    /// Parked writes a killed daemon left that could not be replayed safely: list, apply, discard.
    Recover(RecoverArgs),
    /// What changed between two snapshots, or a snapshot and `live`: files and byte ranges.
    Diff(DiffArgs),
    /// Return the live volumes of a snapshot (or those under PATHs) to its content, in place,
    /// after a safety snapshot.
    Rollback(RollbackArgs),
}

/// An error for the user: printed as `grainfs: <message>`, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where log lines go.
pub(crate) enum LogTarget {
    Stderr,
    File(PathBuf),
}

/// Set up env_logger: RUST_LOG wins, then -v/-q, then the config's log_level, then `default`.
pub(crate) fn init_logging(
    args_verbose: u8,
    quiet: bool,
    config_level: Option<&str>,
    default: &str,
    target: LogTarget,
) {
    let level = if quiet {
        "error".to_string()
    } else {
        match args_verbose {
            0 => config_level.unwrap_or(default).to_string(),
            1 => "debug".into(),
            _ => "trace".into(),
        }
    };
    let mut b = env_logger::Builder::new();
    b.parse_filters(&format!("{level},fuser=warn"));
    if let Ok(env) = std::env::var("RUST_LOG") {
        b.parse_filters(&env);
    }
    if let LogTarget::File(path) = target {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => {
                b.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => eprintln!(
                "grainfs: cannot open log file {}: {e}; logging to stderr",
                path.display()
            ),
        }
    }
    let _ = b.try_init();
}

/// Run a parsed command line; returns the process exit status.
pub fn run(args: Args) -> i32 {
    if !matches!(args.command, Command::Mount(_)) {
        // A reader that stops early (`grainfs status | head`) ends us quietly, as for any
        // Unix filter; the daemon keeps ignoring SIGPIPE (it writes to sockets).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match &args.command {
        Command::Mount(m) => mount::run(m, &args),
        Command::Umount(u) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            umount::run(u)
        }
        Command::CheckConfig(c) => check_config::run(c),
        Command::Status(s) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            status::run(s)
        }
        Command::Snapshot(s) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            snapshot::run(s)
        }
        Command::Prune(p) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            prune::run(p)
        }
        Command::Reload(r) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            reload::run(r)
        }
        Command::Restore(r) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            restore::run(r)
        }
        Command::Recover(r) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            recover::run(r)
        }
        Command::Diff(d) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            diff::run(d)
        }
        Command::Rollback(r) => {
            init_logging(args.verbose, args.quiet, None, "warn", LogTarget::Stderr);
            rollback::run(r)
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("grainfs: {e}");
            1
        }
    }
}
