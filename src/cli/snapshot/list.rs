//! `grainfs snapshot list`: every snapshot of the store, oldest first, as a table (one column per
//! fact, so a new one is one heading and one cell) or as JSON, read from the manifests and the
//! holds record, with or without a daemon. It never reads block data.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::super::status::human;
use super::table::{Align, Table};
use super::{locate, open_store, print_json, store_error, CliError, Where};
use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::daemon::lifecycle::rules_of;
use crate::snapshot::lifecycle::prune;
use crate::store::{holds::Holds, SnapshotInfo, Store, VolumeKind};
use crate::sys::{realtime_ns, utc_stamp};

/// What retention says of each snapshot: the rules that keep it, or that prune removes it
/// (from the daemon's rules when one runs, else from `-c`'s).
fn kept_by(store: &Store, store_dir: &Path, config: &Config) -> HashMap<String, String> {
    let req = Request::Prune {
        group: None,
        dry_run: true,
    };
    let report = match control::request(store_dir, &req) {
        Ok(Response::Pruned(r)) => Some(r),
        _ => prune(store, &rules_of(config), None, true, realtime_ns()).ok(),
    };
    let mut out = HashMap::new();
    for g in report.iter().flat_map(|r| &r.groups) {
        for s in &g.snapshots {
            let why = if s.keep {
                s.reasons.join(", ")
            } else {
                "pruned next".to_string()
            };
            out.insert(s.name.clone(), why);
        }
    }
    out
}

pub(super) fn run(json: bool, at: &Where) -> Result<(), CliError> {
    let (config, _, store_dir) = locate(at)?;
    let store = open_store(&store_dir)?;
    let listed = store.list().map_err(store_error)?;
    let holds = store.holds().map_err(store_error)?;
    let kept = kept_by(&store, &store_dir, &config);
    if json {
        let infos: Vec<serde_json::Value> = listed
            .iter()
            .map(|l| match &l.info {
                Ok(i) => {
                    let mut v = info_json(i, &holds);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("kept_by".into(), serde_json::json!(kept.get(&i.name)));
                    }
                    v
                }
                Err(e) => serde_json::json!({"name": l.name, "error": e.to_string()}),
            })
            .collect();
        return print_json(&infos);
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("TIME (UTC)", Align::Left),
        ("GROUP", Align::Left),
        ("VOLS", Align::Right),
        ("KIND", Align::Left),
        ("STORED", Align::Right),
        ("LOGICAL", Align::Right),
        ("HOLD", Align::Left),
        ("KEPT BY", Align::Left),
    ]);
    for l in &listed {
        let i = match &l.info {
            Ok(i) => i,
            Err(e) => {
                t.line(format!("{} unreadable: {e}", l.name));
                continue;
            }
        };
        t.row(vec![
            i.name.clone(),
            utc_stamp(i.created_ns / 1_000_000_000),
            i.group.clone(),
            i.volumes.len().to_string(),
            compact_kinds(i),
            human(i.stored_bytes),
            human(i.logical_bytes),
            tags_of(&holds, &i.name).join(","),
            kept.get(&i.name).cloned().unwrap_or_default(),
        ]);
        for v in &i.volumes {
            t.line(format!(
                "    {:<48} {:<11} {:>10} {:>10}",
                v.path,
                v.kind.to_string(),
                human(v.stored_bytes),
                human(v.size)
            ));
        }
    }
    print!("{}", t.render());
    Ok(())
}

/// The hold tags on snapshot `name`, sorted.
pub(super) fn tags_of(holds: &Holds, name: &str) -> Vec<String> {
    holds
        .get(name)
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default()
}

/// How many volumes of each kind, FULL first.
fn kind_counts(i: &SnapshotInfo) -> Vec<(VolumeKind, usize)> {
    [
        VolumeKind::Full,
        VolumeKind::Incremental,
        VolumeKind::Hybrid,
    ]
    .into_iter()
    .map(|k| (k, i.volumes.iter().filter(|v| v.kind == k).count()))
    .filter(|(_, n)| *n > 0)
    .collect()
}

fn short(k: VolumeKind) -> &'static str {
    match k {
        VolumeKind::Full => "FULL",
        VolumeKind::Incremental => "INCR",
        VolumeKind::Hybrid => "HYBRID",
    }
}

/// `FULL`, `INCR` or `HYBRID` for a one-volume snapshot; `2 FULL, 1 HYBRID` for several.
fn compact_kinds(i: &SnapshotInfo) -> String {
    let counts = kind_counts(i);
    match (i.volumes.len(), counts.as_slice()) {
        (1, [(k, _)]) => short(*k).to_string(),
        _ => counts
            .iter()
            .map(|(k, n)| format!("{n} {}", short(*k)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A snapshot as `list --json` shows it: its summary, `kinds` (volumes per kind) and `holds`.
fn info_json(i: &SnapshotInfo, holds: &Holds) -> serde_json::Value {
    let mut v = serde_json::to_value(i).unwrap_or_default();
    let kinds: BTreeMap<String, usize> = kind_counts(i)
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("kinds".into(), serde_json::json!(kinds));
        o.insert("holds".into(), serde_json::json!(tags_of(holds, &i.name)));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::VolumeId;
    use crate::store::VolumeInfo;

    fn info(kinds: &[VolumeKind]) -> SnapshotInfo {
        SnapshotInfo {
            name: "s".into(),
            group: "all".into(),
            created_ns: 0,
            parent: None,
            volumes: kinds
                .iter()
                .enumerate()
                .map(|(n, k)| VolumeInfo {
                    id: VolumeId {
                        dev: 1,
                        ino: n as u64,
                    },
                    path: format!("v{n}"),
                    size: 1,
                    kind: *k,
                    stored_bytes: 1,
                    max_depth: 1,
                })
                .collect(),
            stored_bytes: 0,
            logical_bytes: 0,
        }
    }

    #[test]
    fn kinds_are_one_word_for_one_volume_and_counted_for_several() {
        use VolumeKind::*;
        assert_eq!(compact_kinds(&info(&[Full])), "FULL");
        assert_eq!(compact_kinds(&info(&[Incremental])), "INCR");
        assert_eq!(compact_kinds(&info(&[Hybrid])), "HYBRID");
        assert_eq!(
            compact_kinds(&info(&[Hybrid, Full, Full])),
            "2 FULL, 1 HYBRID"
        );
        assert_eq!(compact_kinds(&info(&[Incremental, Incremental])), "2 INCR");
        let j = info_json(&info(&[Full, Hybrid]), &Holds::new());
        assert_eq!(j["kinds"], serde_json::json!({"FULL": 1, "HYBRID": 1}));
        assert_eq!(j["holds"], serde_json::json!([]));
    }
}
