//! `grainfs snapshot delete NAME|GLOB...`: resolves names and globs against the store's snapshot
//! names (all of them first: one that matches nothing deletes nothing), then deletes newest
//! first, each through the daemon when one runs (so a delete never races a snapshot being
//! taken) or through the store itself otherwise. The store refuses a held snapshot or one
//! another snapshot builds on; the first refusal stops the command.

use std::collections::HashMap;

use super::super::progress::{request_job, Progress};
use super::{locate, open_store, parse_name, store_error, CliError, Where};
use crate::control::{self, Request, Response};
use crate::ids::SnapshotName;
use crate::store::Store;

/// Whether a command-line NAME is a glob rather than a name (snapshot names never hold these).
fn is_glob(arg: &str) -> bool {
    arg.contains(['*', '?', '['])
}

/// The snapshots `args` name, each once, newest first (by instant, then name); an error
/// naming the first argument that matches no snapshot. `snapshots`: every name in the store
/// with its instant (None: unreadable manifest, taken as the oldest).
fn resolve(
    args: &[String],
    snapshots: &[(String, Option<u64>)],
) -> Result<Vec<SnapshotName>, CliError> {
    let mut chosen: HashMap<&str, Option<u64>> = HashMap::new();
    for arg in args {
        if is_glob(arg) {
            let pattern = glob::Pattern::new(arg)
                .map_err(|e| CliError::Usage(format!("glob {arg:?}: {e}")))?;
            let mut matched = false;
            for (name, created) in snapshots {
                if pattern.matches(name) {
                    chosen.insert(name, *created);
                    matched = true;
                }
            }
            if !matched {
                return Err(CliError::Usage(format!(
                    "no snapshot matches {arg:?} (nothing was deleted; `grainfs snapshot list` shows the names)"
                )));
            }
        } else {
            let name = parse_name(arg)?;
            let Some((name, created)) = snapshots.iter().find(|(n, _)| n == name.as_str()) else {
                return Err(CliError::Usage(format!(
                    "no snapshot named {arg:?} in the store (nothing was deleted)"
                )));
            };
            chosen.insert(name, *created);
        }
    }
    let mut out: Vec<(&str, Option<u64>)> = chosen.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    out.into_iter().map(|(n, _)| parse_name(n)).collect()
}

pub(super) fn run(args: &[String], dry_run: bool, at: &Where) -> Result<(), CliError> {
    let (_, _, store_dir) = locate(at)?;
    let store = open_store(&store_dir)?;
    let snapshots: Vec<(String, Option<u64>)> = store
        .list()
        .map_err(store_error)?
        .into_iter()
        .map(|l| (l.name, l.info.ok().map(|i| i.created_ns)))
        .collect();
    let names = resolve(args, &snapshots)?;
    for name in &names {
        if dry_run {
            println!("would delete {name}");
        } else {
            delete_one(&store, &store_dir, name)?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// Delete `name` through the daemon serving `store_dir`, or through `store` when none runs.
fn delete_one(
    store: &Store,
    store_dir: &std::path::Path,
    name: &SnapshotName,
) -> Result<(), CliError> {
    let req = Request::SnapshotDelete { name: name.clone() };
    match request_job(store_dir, &req, "delete", false, false).map(|a| a.response) {
        Ok(Response::Deleted { .. }) => Ok(()),
        Ok(Response::Error { message }) => Err(CliError::Usage(message)),
        Ok(other) => Err(CliError::Usage(format!(
            "daemon: unexpected answer {other:?}"
        ))),
        // No daemon: nothing else can be writing the store.
        Err(e) if control::no_daemon(&e) => {
            // What a merge may copy: at most what the snapshot stores.
            let total = store
                .manifest(name)
                .map_or(0, |m| m.volumes.iter().map(|v| v.stored_bytes).sum());
            let bar = Progress::bytes("delete", total, false);
            let r = store.delete_with(name, &mut |done| bar.set(done));
            bar.finish();
            r.map(|_| ()).map_err(store_error)
        }
        Err(e) => Err(CliError::Usage(format!(
            "the daemon did not answer ({e}); {name} was not deleted"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps() -> Vec<(String, Option<u64>)> {
        [("vms-1", 1), ("vms-3", 3), ("vms-2", 2), ("db-1", 4)]
            .iter()
            .map(|(n, t)| (n.to_string(), Some(*t)))
            .collect()
    }

    fn names(v: Vec<SnapshotName>) -> Vec<String> {
        v.into_iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn globs_and_names_resolve_once_each_newest_first() {
        let r = resolve(&["vms-*".into(), "vms-2".into()], &snaps()).unwrap();
        assert_eq!(names(r), vec!["vms-3", "vms-2", "vms-1"]);
        let r = resolve(&["db-1".into(), "vms-?".into()], &snaps()).unwrap();
        assert_eq!(names(r), vec!["db-1", "vms-3", "vms-2", "vms-1"]);
    }

    #[test]
    fn a_glob_or_name_that_matches_nothing_is_an_error_naming_it() {
        let e = resolve(&["vms-*".into(), "web-*".into()], &snaps())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"web-*\""), "{e}");
        let e = resolve(&["vms-9".into()], &snaps())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"vms-9\""), "{e}");
        assert!(resolve(&["bad name".into()], &snaps()).is_err());
    }
}
