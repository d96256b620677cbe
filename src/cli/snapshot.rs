//! `grainfs snapshot create|list|verify|delete`. Creating asks the daemon (it sees every
//! write, so only it can take a consistent snapshot); listing and verifying read the store
//! directly, with or without a daemon; deleting goes through the daemon when one runs, so it
//! never races a snapshot being taken, and opens the store itself otherwise.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, Subcommand};

use super::status::{find_target, human};
use super::CliError;
use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::ids::SnapshotName;
use crate::snapshot::{CreateReport, CreateRequest};
use crate::store::{Store, VerifyReport};
use crate::sys::utc_stamp;

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

/// The snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a group (default: `all`, every regular file).
    Create {
        /// A group of the config, or `all`.
        group: Option<String>,
        /// Snapshot the files matching this glob (relative to the mount) instead of a group;
        /// may be repeated.
        #[arg(long = "path", value_name = "GLOB")]
        paths: Vec<String>,
        /// The snapshot's name (A-Z a-z 0-9 . _ -, at most 128); default `<group>-<UTC time>`.
        #[arg(long)]
        name: Option<String>,
        /// Print the plan (FULL or INCREMENTAL per partition, and why) and take nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// List the snapshots: name, time, group, volumes, kind, bytes stored and logical.
    List {
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
    /// Delete a snapshot that no other snapshot depends on.
    Delete {
        name: String,
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

fn open_store(store: &Path) -> Result<Store, CliError> {
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
    Store::open(store).map_err(|e| CliError::Usage(e.to_string()))
}

pub(super) fn run(args: &SnapshotArgs) -> Result<(), CliError> {
    match &args.command {
        SnapshotCommand::Create {
            group,
            paths,
            name,
            dry_run,
            json,
            at,
        } => {
            let (_, backing, store) = locate(at)?;
            let req = Request::SnapshotCreate(CreateRequest {
                group: group.clone(),
                paths: paths.clone(),
                name: name.as_deref().map(parse_name).transpose()?,
                dry_run: *dry_run,
            });
            let report = match control::request_within(&store, &req, None) {
                Ok(Response::Snapshot(r)) => r,
                Ok(Response::Error { message }) => return Err(CliError::Usage(message)),
                Ok(other) => {
                    return Err(CliError::Usage(format!("daemon: unexpected answer {other:?}")))
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(CliError::Usage(format!(
                        "the daemon serving {} ended while it took the snapshot (killed or crashed; its log is {} when it ran in the background): nothing was committed, and what it had stored is swept at its next start",
                        backing.display(),
                        store.join("grainfs.log").display()
                    )))
                }
                Err(e) => {
                    return Err(CliError::Usage(format!(
                        "no grainfs daemon answers for {} ({e}); snapshots are taken by the daemon, which sees every write: mount it first",
                        backing.display()
                    )))
                }
            };
            if *json {
                print_json(&report)?;
            } else {
                print_create(&report);
            }
            Ok(())
        }
        SnapshotCommand::List { json, at } => {
            let (_, _, store) = locate(at)?;
            let store = open_store(&store)?;
            let listed = store.list().map_err(|e| CliError::Usage(e.to_string()))?;
            if *json {
                let infos: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|l| match &l.info {
                        Ok(i) => serde_json::to_value(i).unwrap_or_default(),
                        Err(e) => serde_json::json!({"name": l.name, "error": e.to_string()}),
                    })
                    .collect();
                return print_json(&infos);
            }
            println!(
                "{:<36} {:<20} {:<12} {:>4} {:<11} {:>10} {:>10}",
                "NAME", "TIME (UTC)", "GROUP", "VOLS", "KIND", "STORED", "LOGICAL"
            );
            for l in &listed {
                match &l.info {
                    Ok(i) => {
                        let mut kinds: Vec<String> =
                            i.volumes.iter().map(|v| v.kind.to_string()).collect();
                        kinds.sort();
                        kinds.dedup();
                        let kind = if kinds.len() == 1 {
                            kinds.remove(0)
                        } else {
                            "MIXED".into()
                        };
                        println!(
                            "{:<36} {:<20} {:<12} {:>4} {:<11} {:>10} {:>10}",
                            i.name,
                            utc_stamp(i.created_ns / 1_000_000_000),
                            i.group,
                            i.volumes.len(),
                            kind,
                            human(i.stored_bytes),
                            human(i.logical_bytes)
                        );
                        for v in &i.volumes {
                            println!(
                                "    {:<48} {:<11} {:>10} {:>10}",
                                v.path,
                                v.kind.to_string(),
                                human(v.stored_bytes),
                                human(v.size)
                            );
                        }
                    }
                    Err(e) => println!("{:<36} unreadable: {e}", l.name),
                }
            }
            Ok(())
        }
        SnapshotCommand::Verify { names, json, at } => {
            let (_, _, store) = locate(at)?;
            let store = open_store(&store)?;
            let names = if names.is_empty() {
                store.names().map_err(|e| CliError::Usage(e.to_string()))?
            } else {
                names.clone()
            };
            let names = names
                .iter()
                .map(|n| parse_name(n))
                .collect::<Result<Vec<_>, _>>()?;
            let reports = verify(&store, &names)?;
            let bad: Vec<&VerifyReport> = reports.iter().filter(|r| !r.ok()).collect();
            if *json {
                print_json(&reports)?;
            } else {
                for r in &reports {
                    println!(
                        "{}: {} volume(s), {} block(s), {}: {}",
                        r.snapshot,
                        r.volumes,
                        r.blocks,
                        human(r.bytes),
                        if r.ok() { "ok" } else { "DAMAGED" }
                    );
                    for p in &r.problems {
                        println!(
                            "    {}{}: {} (stored in {})",
                            p.volume.as_deref().unwrap_or("(snapshot)"),
                            p.block.map_or(String::new(), |b| format!(" block {b}")),
                            p.what,
                            p.stored_in
                        );
                    }
                }
            }
            if bad.is_empty() {
                Ok(())
            } else {
                Err(CliError::Usage(format!(
                    "{} of {} snapshot(s) failed verification: {}",
                    bad.len(),
                    reports.len(),
                    bad.iter()
                        .map(|r| r.snapshot.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
        SnapshotCommand::Delete { name, at } => {
            let (_, _, store_dir) = locate(at)?;
            let name = &parse_name(name)?;
            match control::request_within(
                &store_dir,
                &Request::SnapshotDelete { name: name.clone() },
                None,
            ) {
                Ok(Response::Deleted { .. }) => {}
                Ok(Response::Error { message }) => return Err(CliError::Usage(message)),
                Ok(other) => {
                    return Err(CliError::Usage(format!(
                        "daemon: unexpected answer {other:?}"
                    )))
                }
                // No daemon: nothing else can be writing the store.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    open_store(&store_dir)?
                        .delete(name)
                        .map_err(|e| CliError::Usage(e.to_string()))?
                }
                Err(e) => {
                    return Err(CliError::Usage(format!(
                        "the daemon did not answer ({e}); nothing was deleted"
                    )))
                }
            }
            println!("deleted {name}");
            Ok(())
        }
    }
}

/// A snapshot name from the command line (a bad one is a usage error, exit status 1).
fn parse_name(name: &str) -> Result<SnapshotName, CliError> {
    SnapshotName::parse(name).map_err(|e| CliError::Usage(e.to_string()))
}

/// Verify `names`, with a progress bar (one step per volume) when stderr is a terminal.
fn verify(store: &Store, names: &[SnapshotName]) -> Result<Vec<VerifyReport>, CliError> {
    let total: u64 = names
        .iter()
        .map(|n| store.manifest(n).map_or(0, |m| m.volumes.len() as u64))
        .sum();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} volumes {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut out = Vec::new();
    for n in names {
        bar.set_message(n.to_string());
        let r = store
            .verify_with(n, &mut |_| bar.inc(1))
            .map_err(|e| CliError::Usage(e.to_string()))?;
        out.push(r);
    }
    bar.finish_and_clear();
    Ok(out)
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn print_create(r: &CreateReport) {
    if r.dry_run {
        println!(
            "plan for snapshot {} of group {} (parent {}); nothing taken:",
            r.name,
            r.group,
            r.parent.as_deref().unwrap_or("none")
        );
    } else {
        println!(
            "snapshot {} of group {}: {} volume(s), {} stored for {} logical (parent {}); writers held {} us, capture {} ms",
            r.name,
            r.group,
            r.volumes.len(),
            human(r.stored_bytes),
            human(r.logical_bytes),
            r.parent.as_deref().unwrap_or("none"),
            r.barrier_us,
            r.capture_ms
        );
    }
    for v in &r.volumes {
        println!(
            "  {:<48} {:<11} {:>10} of {:>10}",
            v.path,
            v.kind,
            human(v.stored_bytes),
            human(v.size)
        );
        if r.dry_run {
            for p in &v.partitions {
                println!("      partition {:<4} {:<11} {}", p.index, p.kind, p.reason);
            }
        }
    }
}
