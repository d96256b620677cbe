//! `grainfs prune [GROUP] [--dry-run] [--json]`: apply retention now, as the scheduler does
//! after each scheduled snapshot. Shows, like `restic forget --dry-run`, every snapshot of each
//! group with the rules that keep it, or that it goes. Through the daemon when one serves the
//! store (so a prune never races a snapshot being taken), else on the store directly with the
//! config given by `-c`.

use clap::Args as ClapArgs;

use super::snapshot::{locate, print_json, Where};
use super::status::human;
use super::CliError;
use crate::control::{self, Request, Response};
use crate::daemon::lifecycle::rules_of;
use crate::schedule::fmt_time;
use crate::snapshot::lifecycle::{prune, PruneReport};
use crate::store::Store;
use crate::sys::realtime_ns;

/// Arguments of `grainfs prune`.
#[derive(Debug, ClapArgs)]
pub struct PruneArgs {
    /// Only this group (default: every group in the store).
    pub group: Option<String>,
    /// Show what would be removed, and why the rest stays; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

pub(super) fn run(args: &PruneArgs) -> Result<(), CliError> {
    let (config, _, store_dir) = locate(&args.at)?;
    let req = Request::Prune {
        group: args.group.clone(),
        dry_run: args.dry_run,
    };
    let report = match control::request_within(&store_dir, &req, None) {
        Ok(Response::Pruned(r)) => r,
        Ok(Response::Error { message }) => return Err(CliError::Usage(message)),
        Ok(other) => {
            return Err(CliError::Usage(format!(
                "daemon: unexpected answer {other:?}"
            )))
        }
        Err(e) if control::no_daemon(&e) => {
            // No daemon: nothing else writes the store; the rules come from `-c`.
            if args.at.config.is_none() {
                eprintln!(
                    "grainfs: no daemon serves this store and no -c CONFIG was given: no keep \
                     rules are known, so every snapshot stays"
                );
            }
            if !store_dir.join("snapshots").is_dir() {
                return Err(CliError::Usage(format!(
                    "no snapshots in {} yet",
                    store_dir.display()
                )));
            }
            let store = Store::open(&store_dir).map_err(|e| CliError::Usage(e.to_string()))?;
            prune(
                &store,
                &rules_of(&config),
                args.group.as_deref(),
                args.dry_run,
                realtime_ns(),
            )
            .map_err(|e| CliError::Usage(e.to_string()))?
        }
        Err(e) => {
            return Err(CliError::Usage(format!(
                "the daemon did not answer ({e}); nothing was pruned"
            )))
        }
    };
    if args.json {
        return print_json(&report);
    }
    print(&report, &rules_of(&config).timezone);
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{} snapshot(s) could not be removed",
            report.failed.len()
        )))
    }
}

fn print(r: &PruneReport, tz: &jiff::tz::TimeZone) {
    for g in &r.groups {
        println!("group {} (keep {})", g.group, g.rules);
        for s in &g.snapshots {
            let verdict = match (s.keep, r.dry_run) {
                (true, _) => "keep",
                (false, true) => "would remove",
                (false, false) => "remove",
            };
            println!(
                "  {:<12} {:<40} {:<24} {}",
                verdict,
                s.name,
                fmt_time(s.created_ns, tz),
                s.reasons.join(", ")
            );
        }
    }
    for (name, why) in &r.failed {
        println!("could not remove {name}: {why}");
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} snapshot(s); snapshots hold {} -> {}{}",
        r.removed.len(),
        human(r.bytes_before),
        human(r.bytes_after),
        r.max_store_bytes.map_or(String::new(), |m| format!(
            " (max_store_bytes {})",
            human(m)
        ))
    );
}
