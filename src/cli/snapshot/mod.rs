//! `grainfs snapshot create|list|show|verify|hold|release|delete`, one file per command.
//! Creating asks the daemon (it sees every write, so only it can take a consistent snapshot);
//! listing, showing and verifying read the store directly, with or without a daemon; holds are
//! a small store-wide record the command writes itself, daemon or not; deleting goes through
//! the daemon when one runs, so it never races a snapshot being taken, and opens the store
//! itself otherwise. Nothing here reads volume data.

mod create;
mod delete;
mod holds;
mod list;
mod show;
mod table;
mod verify;

use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, Subcommand};

use super::status::find_target;
use super::CliError;
use crate::config::Config;
use crate::ids::SnapshotName;
use crate::store::Store;

/// Arguments of `grainfs snapshot`.
#[derive(Debug, ClapArgs)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// Which mount a snapshot command is about.
#[derive(Debug, ClapArgs)]
pub struct Where {
    /// A grainfs mount (or a path inside it, or a backing dir); default: the mount the working
    /// directory is in, the config's, or the only one.
    #[arg(short = 'm', long = "mount")]
    pub mount: Option<PathBuf>,
    /// The config the mount was started with (to find its groups and a store outside the
    /// backing dir).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `grainfs snapshot create`.
#[derive(Debug, ClapArgs)]
pub struct CreateArgs {
    /// A group of the config, or `all`.
    pub group: Option<String>,
    /// Snapshot the files matching this glob (relative to the mount) instead of a group;
    /// may be repeated.
    #[arg(long = "path", value_name = "GLOB")]
    pub paths: Vec<String>,
    /// The snapshot's name (A-Z a-z 0-9 . _ -, at most 128); default `<group>-<UTC time>`.
    #[arg(long)]
    pub name: Option<String>,
    /// Store every partition FULL, whatever the policy would choose (a fresh base for the
    /// chain).
    #[arg(long)]
    pub full: bool,
    /// Print the plan (FULL or INCREMENTAL per partition, and why) with at most how many bytes
    /// each would store, and take nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

/// The snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a group (default: `all`, every regular file).
    Create(CreateArgs),
    /// List the snapshots: name, time, group, volumes, kinds, bytes stored and logical, holds.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// What the manifest of one snapshot records: group, time, parent, holds, and per volume
    /// and partition its kind, chain depth and the reason for it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Re-hash every stored block and rebuild every volume; exit 1 on any mismatch.
    Verify {
        /// Snapshots to verify (default: all).
        names: Vec<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Pin a snapshot with a tag: it is neither pruned nor deleted until released.
    Hold {
        name: String,
        /// The hold's tag (1 to 64 printable characters, no spaces).
        #[arg(long, default_value = crate::store::holds::DEFAULT_TAG)]
        tag: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Release a snapshot's hold with this tag (default: every hold on it).
    Release {
        name: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Delete snapshots no other snapshot depends on and no hold pins, newest first; NAMES may
    /// be globs (`'vms-2026-*'`) matched against the store's snapshot names.
    Delete {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Print what would be deleted, in order, and delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        at: Where,
    },
}

/// The store and backing dir a command works on.
pub(super) fn locate(at: &Where) -> Result<(Config, PathBuf, PathBuf), CliError> {
    let config = match &at.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let paths: Vec<PathBuf> = at.mount.iter().cloned().collect();
    let target = find_target(&paths, &config)?;
    let store = config.store_dir(&target.backing);
    Ok((config, target.backing, store))
}

/// Open the store at `store` for an offline command (one that works with or without a daemon).
pub(super) fn open_store(store: &Path) -> Result<Store, CliError> {
    match std::fs::metadata(store.join("snapshots")) {
        Ok(m) if m.is_dir() => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(store).map_or_else(
                |_| "another user".to_string(),
                |m| format!("uid {}", m.uid()),
            );
            return Err(CliError::Io {
                what: format!(
                    "reading the store {} (it belongs to {owner}, mode 0700: run this as that user)",
                    store.display()
                ),
                source: e,
            });
        }
        _ => {
            return Err(CliError::Usage(format!(
                "no snapshots in {} yet (take one with `grainfs snapshot create`)",
                store.display()
            )))
        }
    }
    Store::open(store).map_err(store_error)
}

/// A store error as the user sees it (its message says what and where).
fn store_error(e: crate::store::StoreError) -> CliError {
    CliError::Usage(e.to_string())
}

pub(super) fn run(args: &SnapshotArgs) -> Result<(), CliError> {
    match &args.command {
        SnapshotCommand::Create(c) => create::run(c),
        SnapshotCommand::List { json, at } => list::run(*json, at),
        SnapshotCommand::Show { name, json, at } => show::run(name, *json, at),
        SnapshotCommand::Verify { names, json, at } => verify::run(names, *json, at),
        SnapshotCommand::Hold {
            name,
            tag,
            json,
            at,
        } => holds::hold(name, tag, *json, at),
        SnapshotCommand::Release {
            name,
            tag,
            json,
            at,
        } => holds::release(name, tag.as_deref(), *json, at),
        SnapshotCommand::Delete { names, dry_run, at } => delete::run(names, *dry_run, at),
    }
}

/// A snapshot name from the command line (a bad one is a usage error, exit status 1).
fn parse_name(name: &str) -> Result<SnapshotName, CliError> {
    SnapshotName::parse(name).map_err(|e| CliError::Usage(e.to_string()))
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}
