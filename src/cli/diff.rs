//! `grainfs diff A B [PATH...]`: what changed from A to B, each a snapshot name or `live`, as
//! `zfs diff` shows it (+ added, - removed, M modified, R renamed), with each changed volume's
//! byte ranges. Two snapshots are compared from the store's block tables, daemon or not. A live
//! side goes to the daemon (its change tracking says what changed); without one, the command
//! reads and hashes the live files itself. It never writes anything.

use std::path::Path;

use clap::Args as ClapArgs;

use super::snapshot::{locate, Where};
use super::status::human;
use super::CliError;
use crate::control::{self, Request, Response};
use crate::snapshot::diff::{self, DiffReport, Side, Sources};
use crate::store::Store;
use crate::sys;

/// Arguments of `grainfs diff`.
#[derive(Debug, ClapArgs)]
pub struct DiffArgs {
    /// The older side: a snapshot name, or `live` (the backing files now).
    pub from: String,
    /// The newer side: a snapshot name, or `live`.
    pub to: String,
    /// Only these paths (relative to the backing dir; a directory means what is under it).
    pub paths: Vec<String>,
    /// A stable JSON report: entries (kind, path, old_path, extents, changed_bytes), totals.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

pub(super) fn run(args: &DiffArgs) -> Result<(), CliError> {
    let from = Side::parse(&args.from).map_err(CliError::Usage)?;
    let to = Side::parse(&args.to).map_err(CliError::Usage)?;
    let (config, backing, store_dir) = locate(&args.at)?;
    let live = from == Side::Live || to == Side::Live;
    let report = if live {
        match control::request_within(
            &store_dir,
            &Request::Diff {
                from: args.from.clone(),
                to: args.to.clone(),
                paths: args.paths.clone(),
            },
            None,
        ) {
            Ok(Response::Diff(r)) => r,
            Ok(Response::Error { message }) => {
                return Err(CliError::Usage(format!("daemon: {message}")))
            }
            Ok(other) => {
                return Err(CliError::Usage(format!(
                    "daemon: unexpected answer {other:?}"
                )))
            }
            Err(e) if control::no_daemon(&e) => offline(
                &config.groups,
                &backing,
                &store_dir,
                &from,
                &to,
                &args.paths,
            )?,
            Err(e) => {
                return Err(CliError::Io {
                    what: format!("asking the daemon of {}", backing.display()),
                    source: e,
                })
            }
        }
    } else {
        offline(
            &config.groups,
            &backing,
            &store_dir,
            &from,
            &to,
            &args.paths,
        )?
    };
    if args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

/// The diff computed here: from the store alone, and for a live side by reading the files.
fn offline(
    groups: &[crate::config::GroupConfig],
    backing: &Path,
    store_dir: &Path,
    from: &Side,
    to: &Side,
    paths: &[String],
) -> Result<DiffReport, CliError> {
    if !store_dir.join("snapshots").is_dir() {
        return Err(CliError::Usage(format!(
            "no snapshots in {} yet (take one with `grainfs snapshot create`)",
            store_dir.display()
        )));
    }
    let store = Store::open(store_dir).map_err(|e| CliError::Usage(e.to_string()))?;
    let root = sys::open_dir_path(backing).map_err(|source| CliError::Io {
        what: format!("opening {}", backing.display()),
        source,
    })?;
    let store_key = std::fs::metadata(store_dir).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    });
    let src = Sources {
        store: &store,
        root: Some(&root),
        store_key,
        groups,
        tracking: None,
    };
    diff::diff(&src, from, to, paths).map_err(|e| CliError::Usage(e.to_string()))
}

/// The text report: one line per path, the extents of each changed volume under it, totals.
fn text(r: &DiffReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for e in &r.entries {
        let path = match &e.old_path {
            Some(old) => format!("{old} -> {}", e.path),
            None => e.path.clone(),
        };
        let mut what = Vec::new();
        if e.file_type != "file" {
            what.push(e.file_type.clone());
        }
        if !e.changes.is_empty() {
            what.push(e.changes.join(", "));
        }
        if e.changed_bytes > 0 {
            what.push(format!(
                "{} changed in {} extent(s)",
                human(e.changed_bytes),
                e.extents.len()
            ));
        }
        let _ = write!(out, "{}\t{path}", e.kind.mark());
        if !what.is_empty() {
            let _ = write!(out, "\t({})", what.join("; "));
        }
        out.push('\n');
        for x in &e.extents {
            let _ = writeln!(
                out,
                "\t@ {}..{} ({})",
                x.offset,
                x.offset + x.len,
                human(x.len)
            );
        }
    }
    let t = &r.totals;
    let _ = writeln!(
        out,
        "{} -> {}: {} added, {} removed, {} modified, {} renamed; {} changed in {} volume(s)",
        r.from,
        r.to,
        t.added,
        t.removed,
        t.modified,
        t.renamed,
        human(t.changed_bytes),
        t.volumes_changed
    );
    match r.live.as_deref() {
        Some("tracked") => out.push_str(
            "live: from the daemon's change tracking (blocks whose tracking was lost were read and hashed)\n",
        ),
        Some(_) => out.push_str(
            "live: no daemon runs, so every live volume was read and hashed block by block\n",
        ),
        None => {}
    }
    out
}
