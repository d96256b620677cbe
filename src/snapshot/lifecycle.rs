//! The snapshot lifecycle the engine acts on: the rules in force (groups, policy, retention,
//! time zone, store budget), swapped whole on a reload; and `prune`, which applies a group's
//! `keep` rules (restic's `forget`, decided by `schedule::forget`) and the store's
//! `max_store_bytes` budget, deleting with merge what goes. It decides nothing itself: the
//! pure rules live in `schedule`; the deletes are the store's. It must never remove a held
//! snapshot, the newest snapshot of a group for the budget, or anything in a dry run.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::tz::TimeZone;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::group::{Selection, ALL};
use super::{CreateRequest, Engine, Job, Result, SnapshotError};
use crate::config::{GroupConfig, PolicyConfig};
use crate::ids::SnapshotName;
use crate::schedule::{self, KeepRules, SnapInfo, StoredSnap};
use crate::store::merge::DeleteReport;
use crate::store::{SnapshotInfo, Store, StoreError};

/// What the engine follows; replaced whole by `Engine::reconfigure`.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policy: PolicyConfig,
    pub groups: Vec<GroupConfig>,
    /// Where retention's hourly to yearly buckets are read.
    pub timezone: TimeZone,
    /// The store's byte budget for `prune`.
    pub max_store_bytes: Option<u64>,
}

/// One snapshot in a prune report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneEntry {
    pub name: String,
    pub created_ns: u64,
    pub keep: bool,
    /// The rules that keep it (restic's words), or why it goes.
    pub reasons: Vec<String>,
}

/// One group in a prune report, newest snapshot first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupPrune {
    pub group: String,
    /// The rules, as the config writes them (`last=3 daily=7`), or `none`.
    pub rules: String,
    pub snapshots: Vec<PruneEntry>,
}

/// What `prune` removed (or, in a dry run, would remove) and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub groups: Vec<GroupPrune>,
    /// Snapshots removed (or to remove), in the order they went.
    pub removed: Vec<String>,
    /// Snapshots that could not be removed, with the error.
    pub failed: Vec<(String, String)>,
    pub max_store_bytes: Option<u64>,
    /// Bytes the store's snapshots hold before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The rules of `keep` as the config writes them.
pub fn describe_keep(k: &KeepRules) -> String {
    let mut parts: Vec<String> = [
        ("last", k.last),
        ("hourly", k.hourly),
        ("daily", k.daily),
        ("weekly", k.weekly),
        ("monthly", k.monthly),
        ("yearly", k.yearly),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(w, n)| format!("{w}={n}"))
    .collect();
    if let Some(d) = k.within {
        parts.push(format!(
            "within={}",
            schedule::fmt_span(d.as_nanos() as u64)
        ));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

impl Rules {
    /// The policy of `group`: its own keys over `[policy]` (the global one for a group the
    /// config does not name, such as `all` or `--path` globs).
    pub fn policy_for(&self, group: &str) -> PolicyConfig {
        self.groups
            .iter()
            .find(|g| g.name == group)
            .map_or_else(|| self.policy.clone(), |g| g.policy.clone())
    }

    /// The retention rules of `group` (none for a group the config does not name).
    pub fn keep_of(&self, group: &str) -> KeepRules {
        self.groups
            .iter()
            .find(|g| g.name == group)
            .map(|g| KeepRules::from(&g.keep))
            .unwrap_or_default()
    }
}

impl Engine {
    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Follow `rules` from the next operation on (a snapshot being taken finishes under the
    /// rules it began with).
    pub fn reconfigure(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    /// The group a request names, and what it selects.
    pub(super) fn resolve(&self, req: &CreateRequest) -> Result<(String, Selection)> {
        if !req.paths.is_empty() {
            if req.group.is_some() {
                return Err(SnapshotError::Request(
                    "give a group or --path globs, not both".into(),
                ));
            }
            let group = "paths".to_string();
            return Ok((
                group,
                Selection::globs(&req.paths).map_err(SnapshotError::Request)?,
            ));
        }
        let name = req.group.as_deref().unwrap_or(ALL);
        let rules = self.rules();
        if let Some(g) = rules.groups.iter().find(|g| g.name == name) {
            return Ok((
                name.to_string(),
                Selection::globs(&g.volumes).map_err(SnapshotError::Request)?,
            ));
        }
        if name == ALL {
            return Ok((ALL.to_string(), Selection::All));
        }
        let known: Vec<&str> = rules
            .groups
            .iter()
            .map(|g| g.name.as_str())
            .chain([ALL])
            .collect();
        Err(SnapshotError::Request(format!(
            "no group {name:?} in the config (groups: {})",
            known.join(", ")
        )))
    }

    /// Delete snapshot `name`, any of a chain: the snapshots built on it are rewritten onto its
    /// parent first (the store's delete with merge). Waits for a snapshot being taken, which
    /// may build on it.
    pub fn delete(&self, name: &SnapshotName) -> Result<DeleteReport> {
        self.delete_with(name, &Job::none())
    }

    /// `delete`, reporting to `job` the bytes merged into its children (of at most what the
    /// snapshot stores).
    pub fn delete_with(&self, name: &SnapshotName, job: &Job) -> Result<DeleteReport> {
        let _busy = self.lock_busy(true)?;
        let total = match job.has_watcher() {
            true => self
                .store
                .manifest(name)
                .map_or(0, |m| m.volumes.iter().map(|v| v.stored_bytes).sum()),
            false => 0,
        };
        let r = self
            .store
            .delete_with(name, &mut |done| job.progress("merge", done, total))?;
        job.progress("merge", total, total);
        info!(
            "snapshot {name} deleted{}",
            if r.rewritten.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} rewritten onto its parent, {} bytes copied)",
                    r.rewritten.join(", "),
                    r.bytes_copied
                )
            }
        );
        Ok(r)
    }

    /// Apply retention: for `group` (None: every group in the store), remove the snapshots its
    /// `keep` rules do not keep, then, with `max_store_bytes`, the oldest unheld snapshots
    /// (never a group's newest) until the store fits. Held snapshots always stay. Waits for a
    /// snapshot being taken (a dry run does not: it only reads).
    pub fn prune(&self, group: Option<&str>, dry_run: bool, now_ns: u64) -> Result<PruneReport> {
        let _busy = if dry_run {
            None
        } else {
            Some(self.lock_busy(true)?)
        };
        prune(&self.store, &self.rules(), group, dry_run, now_ns)
    }
}

/// `Engine::prune` on `store` under `rules`, for a store no daemon serves (`grainfs prune`
/// offline) as well: the caller makes sure no snapshot is being taken meanwhile.
pub fn prune(
    store: &Store,
    rules: &Rules,
    group: Option<&str>,
    dry_run: bool,
    now_ns: u64,
) -> Result<PruneReport> {
    let p = Pruner { store };
    let holds = store.holds()?;
    let mut by_group: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    for l in store.list()? {
        match l.info {
            Ok(i) => by_group.entry(i.group.clone()).or_default().push(i),
            Err(e) => warn!("prune: snapshot {} is unreadable, left alone: {e}", l.name),
        }
    }
    if let Some(g) = group {
        if !by_group.contains_key(g) && !rules.groups.iter().any(|c| c.name == g) {
            return Err(SnapshotError::Request(format!(
                "no group {g:?} in the config or the store"
            )));
        }
    }
    let mut report = PruneReport {
        dry_run,
        max_store_bytes: rules.max_store_bytes,
        ..PruneReport::default()
    };
    let all: Vec<&SnapshotInfo> = by_group.values().flatten().collect();
    report.bytes_before = all.iter().map(|s| s.stored_bytes).sum();
    let mut doomed: Vec<(u64, String)> = Vec::new();
    for (g, snaps) in &by_group {
        if group.is_some_and(|want| want != g) {
            continue;
        }
        let keep = rules.keep_of(g);
        let infos: Vec<SnapInfo> = snaps
            .iter()
            .map(|s| SnapInfo {
                name: s.name.clone(),
                time_ns: s.created_ns,
                held: holds.get(&s.name).is_some_and(|t| !t.is_empty()),
            })
            .collect();
        let verdicts = schedule::forget(&infos, &keep, now_ns, &rules.timezone);
        for v in &verdicts {
            if !v.keep {
                doomed.push((v.time_ns, v.name.clone()));
            }
        }
        report.groups.push(GroupPrune {
            group: g.clone(),
            rules: describe_keep(&keep),
            snapshots: verdicts
                .into_iter()
                .map(|v| PruneEntry {
                    name: v.name,
                    created_ns: v.time_ns,
                    keep: v.keep,
                    reasons: v.reasons,
                })
                .collect(),
        });
    }
    // Oldest first: what goes first is what the fewest survivors were built on.
    doomed.sort();
    for (_, name) in doomed {
        p.prune_one(&name, dry_run, &mut report);
    }
    if let Some(max) = rules.max_store_bytes {
        p.prune_to_budget(max, &holds, dry_run, &mut report)?;
    }
    report.bytes_after = if dry_run {
        p.bytes_without(&report.removed)?
    } else {
        p.bytes_without(&[])?
    };
    Ok(report)
}

/// The deletes of one prune.
struct Pruner<'a> {
    store: &'a Store,
}

impl Pruner<'_> {
    /// Remove one snapshot for `prune` (or note it, in a dry run).
    fn prune_one(&self, name: &str, dry_run: bool, report: &mut PruneReport) {
        if dry_run {
            report.removed.push(name.to_string());
            return;
        }
        let result = SnapshotName::parse(name)
            .map_err(StoreError::from)
            .and_then(|n| self.store.delete(&n));
        match result {
            Ok(()) => {
                info!("prune: removed snapshot {name}");
                report.removed.push(name.to_string());
            }
            Err(e) => {
                warn!("prune: cannot remove snapshot {name}: {e}");
                report.failed.push((name.to_string(), e.to_string()));
            }
        }
    }

    /// The bytes the store's snapshots hold, leaving out `gone`.
    fn bytes_without(&self, gone: &[String]) -> Result<u64> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter_map(|l| l.info.ok())
            .filter(|i| !gone.contains(&i.name))
            .map(|i| i.stored_bytes)
            .sum())
    }

    /// Remove the oldest unheld snapshots until the store fits `max` (one at a time: a delete
    /// with merge moves bytes into a child, so what it frees is known only afterwards).
    fn prune_to_budget(
        &self,
        max: u64,
        holds: &crate::store::holds::Holds,
        dry_run: bool,
        report: &mut PruneReport,
    ) -> Result<()> {
        loop {
            let stored: Vec<StoredSnap> = self
                .store
                .list()?
                .into_iter()
                .filter_map(|l| l.info.ok())
                .filter(|i| !(dry_run && report.removed.contains(&i.name)))
                .map(|i| StoredSnap {
                    held: holds.get(&i.name).is_some_and(|t| !t.is_empty()),
                    name: i.name,
                    group: i.group,
                    time_ns: i.created_ns,
                    bytes: i.stored_bytes,
                })
                .collect();
            let cut = schedule::over_budget(&stored, max);
            let Some(first) = cut.remove.first() else {
                if cut.bytes_after > max {
                    warn!(
                        "prune: the store holds {} bytes, over max_store_bytes = {max}, but \
                         what is left is held or the newest of its group",
                        cut.bytes_after
                    );
                }
                return Ok(());
            };
            if report.failed.iter().any(|(n, _)| n == first) {
                return Ok(());
            }
            let name = first.clone();
            info!("prune: {name} goes to fit max_store_bytes = {max}");
            for g in &mut report.groups {
                for s in &mut g.snapshots {
                    if s.name == name {
                        s.keep = false;
                        s.reasons = vec![format!("over max_store_bytes ({max} bytes)")];
                    }
                }
            }
            let before = report.failed.len();
            self.prune_one(&name, dry_run, report);
            if report.failed.len() > before {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, KeepConfig};
    use crate::ids::{BlockIdx, Geometry, VolumeId};
    use crate::store::{PartitionKind, VolumeMeta};

    const G: Geometry = Geometry {
        block_size: 4096,
        partition_size: 4 * 4096,
    };
    const HOUR: u64 = 3_600_000_000_000;

    fn n(s: &str) -> SnapshotName {
        SnapshotName::parse(s).unwrap()
    }

    /// Snapshot `name` at hour `h`: a 4-block volume whose block `h % 4` holds `h`, FULL for
    /// the first, INCREMENTAL on `parent` after.
    fn take(store: &Store, name: &str, parent: Option<&str>, h: u64) {
        let mut w = store
            .begin(&n(name), "g", G, parent.map(n).as_ref())
            .unwrap();
        w.set_created_ns(h * HOUR);
        let v = w
            .add_volume(VolumeMeta {
                id: VolumeId { dev: 1, ino: 1 },
                path: "v.img".into(),
                size: 4 * 4096,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
            })
            .unwrap();
        let kind = if parent.is_some() {
            PartitionKind::Incremental
        } else {
            PartitionKind::Full
        };
        w.set_partition(v, 0, kind, "test").unwrap();
        w.put_block(v, BlockIdx(h % 4), &[h as u8 + 1; 4096])
            .unwrap();
        w.commit().unwrap();
    }

    fn rules(keep: KeepConfig, max: Option<u64>) -> Rules {
        let mut c = Config::default();
        c.groups.push(GroupConfig {
            name: "g".into(),
            volumes: vec!["*".into()],
            schedule: None,
            keep,
            policy: c.policy.clone(),
        });
        Rules {
            policy: c.policy.clone(),
            groups: c.groups,
            timezone: TimeZone::UTC,
            max_store_bytes: max,
        }
    }

    fn names(store: &Store) -> Vec<String> {
        store.names().unwrap()
    }

    #[test]
    fn prune_keeps_what_the_rules_and_holds_keep_and_survivors_read_the_same() {
        let store = Store::in_memory();
        let mut prev: Option<String> = None;
        for h in 0..6u64 {
            let name = format!("s{h}");
            take(&store, &name, prev.as_deref(), h);
            prev = Some(name);
        }
        let before: Vec<Vec<u8>> = ["s3", "s5"]
            .iter()
            .map(|s| {
                let r = store
                    .open_volume(&n(s), VolumeId { dev: 1, ino: 1 })
                    .unwrap();
                let mut buf = vec![0; 4 * 4096];
                r.read_at(&mut buf, 0).unwrap();
                buf
            })
            .collect();
        store.hold(&n("s1"), "keep").unwrap();
        let keep = KeepConfig {
            last: 2,
            ..KeepConfig::default()
        };
        let now = 10 * HOUR;
        let dry = prune(&store, &rules(keep, None), None, true, now).unwrap();
        assert_eq!(dry.removed, vec!["s0", "s2", "s3"]);
        assert_eq!(names(&store).len(), 6, "a dry run removes nothing");
        let g = &dry.groups[0];
        assert_eq!(g.rules, "last=2");
        let s1 = g.snapshots.iter().find(|s| s.name == "s1").unwrap();
        assert_eq!(s1.reasons, vec!["held".to_string()]);
        let s5 = g.snapshots.iter().find(|s| s.name == "s5").unwrap();
        assert_eq!(s5.reasons, vec!["last snapshot".to_string()]);

        let done = prune(&store, &rules(keep, None), Some("g"), false, now).unwrap();
        assert_eq!(done.removed, vec!["s0", "s2", "s3"]);
        assert!(done.failed.is_empty());
        assert_eq!(names(&store), vec!["s1", "s4", "s5"]);
        // s5 builds on s4, which was rewritten over s1: still the same bytes.
        let r = store
            .open_volume(&n("s5"), VolumeId { dev: 1, ino: 1 })
            .unwrap();
        let mut buf = vec![0; 4 * 4096];
        r.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, before[1]);
        for s in names(&store) {
            assert!(store.verify(&n(&s)).unwrap().ok(), "{s}");
        }

        // The budget: the oldest unheld go, never the newest; the held one stays.
        let tight = prune(
            &store,
            &rules(KeepConfig::default(), Some(1)),
            None,
            false,
            now,
        )
        .unwrap();
        assert_eq!(tight.removed, vec!["s4"]);
        assert_eq!(names(&store), vec!["s1", "s5"]);
        assert!(
            tight.bytes_after > 1,
            "held and newest alone are over budget"
        );
        assert!(prune(&store, &rules(keep, None), Some("nope"), true, now).is_err());
    }
}
