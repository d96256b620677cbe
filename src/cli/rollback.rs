//! `grainfs rollback NAME [PATH...]`: asks the daemon to return the live volumes of a snapshot
//! (or those under PATHs) to its content, after a safety snapshot, and prints what it did. It
//! never writes a volume itself: only the daemon can hold writers and readers while it does.

use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;

use super::progress::{job_answer, request_job, Unanswered};
use super::snapshot::{locate, print_json, Where};
use super::status::human;
use super::CliError;
use crate::control::{Request, Response};
use crate::ids::SnapshotName;
use crate::snapshot::rollback::{RollbackReport, RollbackRequest};

/// Arguments of `grainfs rollback`.
#[derive(Debug, ClapArgs)]
pub struct RollbackArgs {
    /// The snapshot to return to.
    pub name: String,
    /// Only the volumes (files, dirs, symlinks) under these paths, relative to the mount (or
    /// absolute, inside the mount or the backing dir); default: every volume of the snapshot.
    pub paths: Vec<PathBuf>,
    /// Take no safety snapshot of the current state first.
    #[arg(long)]
    pub no_safety_snapshot: bool,
    /// Remove the group's files the snapshot lacks (default: keep and list them).
    #[arg(long)]
    pub prune: bool,
    /// Print the report as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

/// PATH as the daemon takes it: relative to the backing dir.
fn relative(p: &Path, roots: &[&Path]) -> Result<String, CliError> {
    let rel = if p.is_absolute() {
        roots
            .iter()
            .find_map(|r| p.strip_prefix(r).ok())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "{} is not inside the mount or its backing dir; give paths relative to the mount",
                    p.display()
                ))
            })?
    } else {
        p
    };
    let s = rel.to_string_lossy().trim_matches('/').to_string();
    if s.split('/').any(|c| c == "..") {
        return Err(CliError::Usage(format!(
            "{}: a path with \"..\" is not allowed",
            p.display()
        )));
    }
    Ok(s)
}

pub(super) fn run(a: &RollbackArgs) -> Result<(), CliError> {
    let (_, backing, store) = locate(&a.at)?;
    let mount =
        a.at.mount
            .as_deref()
            .and_then(|m| std::fs::canonicalize(m).ok());
    let mut roots: Vec<&Path> = vec![&backing];
    if let Some(m) = &mount {
        roots.push(m);
    }
    let paths = a
        .paths
        .iter()
        .map(|p| relative(p, &roots))
        .collect::<Result<Vec<_>, _>>()?;
    let req = Request::Rollback(RollbackRequest {
        name: SnapshotName::parse(&a.name).map_err(|e| CliError::Usage(e.to_string()))?,
        paths,
        no_safety_snapshot: a.no_safety_snapshot,
        prune: a.prune,
    });
    let report = job_answer(
        request_job(&store, &req, "rollback", a.json, true),
        |r| match r {
            Response::RolledBack(r) => Ok(r),
            other => Err(Box::new(other)),
        },
        |_| "the rollback had started writing, and a rollback is never left half done; it completed".into(),
        Unanswered {
            backing: &backing,
            store: &store,
            during: "during the rollback",
            leaves: "the volumes may be partly rolled back, and their tracking rescans what it wrote; run the rollback again after mounting",
            needs: "a rollback runs in the daemon, which holds the volumes' writers while it rewrites them (or copy the snapshot's files out with grainfs restore)",
        },
    )?;
    if a.json {
        print_json(&report)
    } else {
        print_report(&report);
        Ok(())
    }
}

fn print_report(r: &RollbackReport) {
    match &r.safety_snapshot {
        Some(s) => println!("safety snapshot {s} holds the state before the rollback"),
        None => println!("no safety snapshot taken"),
    }
    println!(
        "rolled back to {} (group {}): {} volume(s), {} block(s), {} written; writers held {} ms, {} ms in all",
        r.name,
        r.group,
        r.volumes.len(),
        r.blocks_written,
        human(r.bytes_written),
        r.held_ms,
        r.elapsed_ms
    );
    for v in &r.volumes {
        let size = if v.old_size == v.new_size {
            human(v.new_size)
        } else {
            format!("{} -> {}", human(v.old_size), human(v.new_size))
        };
        println!(
            "  {:<40} {:>8} block(s) {:>10}  size {:<22} {}",
            v.path,
            v.blocks_written,
            human(v.bytes_written),
            size,
            v.compared
        );
    }
    for p in &r.restored {
        println!("  restored {p}");
    }
    for p in &r.removed {
        println!("  removed  {p}");
    }
    if !r.kept.is_empty() {
        println!(
            "  kept {} file(s) the snapshot does not have (--prune removes them):",
            r.kept.len()
        );
        for p in &r.kept {
            println!("    {p}");
        }
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}
