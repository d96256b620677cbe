//! `grainfs snapshot create`: asks the daemon to take a snapshot (or, with `--dry-run`, to plan
//! one) and prints its report. It never takes a snapshot itself: only the daemon sees every
//! write.

use super::super::progress::{job_answer, request_job, Unanswered};
use super::super::status::human;
use super::{locate, parse_name, print_json, CliError, CreateArgs};
use crate::control::{Request, Response};
use crate::snapshot::{CreateReport, CreateRequest};

pub(super) fn run(c: &CreateArgs) -> Result<(), CliError> {
    let (_, backing, store) = locate(&c.at)?;
    let req = Request::SnapshotCreate(CreateRequest {
        group: c.group.clone(),
        paths: c.paths.clone(),
        name: c.name.as_deref().map(parse_name).transpose()?,
        dry_run: c.dry_run,
        full: c.full,
    });
    let report = job_answer(
        request_job(&store, &req, "snapshot", c.json || c.dry_run, !c.dry_run),
        |r| match r {
            Response::Snapshot(r) => Ok(r),
            other => Err(Box::new(other)),
        },
        |r| format!("snapshot {} was already committed", r.name),
        Unanswered {
            backing: &backing,
            store: &store,
            during: "while it took the snapshot",
            leaves: "nothing was committed, and what it had stored is swept at its next start",
            needs: "snapshots are taken by the daemon, which sees every write",
        },
    )?;
    if c.json {
        print_json(&report)
    } else {
        print_create(&report);
        Ok(())
    }
}

/// "at most 1.2 MiB" for an estimate, "?" where the report has none.
fn at_most(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".into(), |b| format!("at most {}", human(b)))
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
        let stored = if r.dry_run {
            at_most(v.estimated_bytes)
        } else {
            human(v.stored_bytes)
        };
        println!(
            "  {:<48} {:<11} {:>18} of {:>10}",
            v.path,
            v.kind,
            stored,
            human(v.size)
        );
        if r.dry_run {
            for p in &v.partitions {
                println!(
                    "      partition {:<4} {:<11} {:>18}  {}",
                    p.index,
                    p.kind,
                    at_most(p.estimated_bytes),
                    p.reason
                );
            }
        }
    }
    if r.dry_run {
        let time = match r.estimated_ms {
            Some(ms) => format!(
                "about {:.1} s at the parent snapshot's capture rate",
                ms as f64 / 1000.0
            ),
            None => "no time estimate (no parent snapshot, or it stored too little to measure a capture rate)".into(),
        };
        println!(
            "total: {} to store of {} logical; {time}",
            at_most(r.estimated_bytes),
            human(r.logical_bytes)
        );
    }
}
