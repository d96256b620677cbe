//! The daemon's side of the snapshot lifecycle: the config in force and its reload (SIGHUP or
//! `grainfs reload`), the scheduler it feeds, and the per-group view `status` shows. A reload
//! reads the file again, refuses a bad file or a change that needs a remount with the same
//! key-and-line error `check-config` gives (the old config stays in force), and otherwise hands
//! the new groups, policy and retention to the engine and the scheduler. It never takes or
//! deletes a snapshot itself.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jiff::tz::TimeZone;
use log::{info, warn};

use super::scheduler::{period_ns, Scheduler};
use crate::config::{Config, GroupConfig};
use crate::control::GroupStatus;
use crate::schedule::KeepRules;
use crate::snapshot::lifecycle::{describe_keep, Rules};
use crate::snapshot::Engine;
use crate::sys::realtime_ns;

/// The lifecycle of one mount's snapshots.
pub struct Lifecycle {
    engine: Arc<Engine>,
    scheduler: Mutex<Option<Scheduler>>,
    config: Mutex<Config>,
    /// The file the config came from (None: built from defaults and arguments).
    config_file: Option<PathBuf>,
}

/// The time zone the config names, or the system's.
pub fn timezone_of(config: &Config) -> TimeZone {
    // Checked when the config was loaded; a zone database that lost it since falls back.
    config.time_zone().unwrap_or_else(|e| {
        warn!("time zone {:?}: {e}; using the system's", config.timezone);
        TimeZone::system()
    })
}

/// What the engine follows under `config`.
pub fn rules_of(config: &Config) -> Rules {
    Rules {
        policy: config.policy.clone(),
        groups: config.groups.clone(),
        timezone: timezone_of(config),
        max_store_bytes: config.max_store_bytes,
    }
}

impl Lifecycle {
    /// Put `config` in force on `engine` and start the scheduler.
    pub fn start(
        engine: Arc<Engine>,
        config: Config,
        config_file: Option<PathBuf>,
    ) -> std::io::Result<Lifecycle> {
        engine.reconfigure(rules_of(&config));
        let scheduled = config
            .groups
            .iter()
            .filter(|g| g.schedule.is_some())
            .count();
        let scheduler = if scheduled > 0 {
            info!("scheduler: {scheduled} group(s) with a schedule");
            Some(Scheduler::start(
                engine.clone(),
                config.groups.clone(),
                timezone_of(&config),
            )?)
        } else {
            None
        };
        Ok(Lifecycle {
            engine,
            scheduler: Mutex::new(scheduler),
            config: Mutex::new(config),
            config_file,
        })
    }

    /// Read the config file again and follow it; returns what changed, one line each.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let Some(path) = &self.config_file else {
            return Err(
                "this mount was started without a config file (-c FILE): there is nothing to \
                 read again"
                    .into(),
            );
        };
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let mut cur = self.config.lock().unwrap_or_else(|p| p.into_inner());
        cur.check_reload(&new).map_err(|e| e.to_string())?;
        let changes = changes(&cur, &new);
        self.engine.reconfigure(rules_of(&new));
        let mut sched = self.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        let wants = new.groups.iter().any(|g| g.schedule.is_some());
        match (sched.as_ref(), wants) {
            (Some(s), _) => s.reconfigure(new.groups.clone(), timezone_of(&new)),
            (None, true) => {
                *sched = Some(
                    Scheduler::start(self.engine.clone(), new.groups.clone(), timezone_of(&new))
                        .map_err(|e| format!("starting the scheduler: {e}"))?,
                )
            }
            (None, false) => {}
        }
        if let Some(level) = &new.log_level {
            if let Ok(l) = level.parse::<log::LevelFilter>() {
                log::set_max_level(l);
            }
        }
        *cur = new;
        info!(
            "reloaded {}: {}",
            path.display(),
            if changes.is_empty() {
                "no change".to_string()
            } else {
                changes.join("; ")
            }
        );
        Ok(changes)
    }

    /// Every group configured or found in the store, as `status` shows it.
    pub fn groups(&self) -> Vec<GroupStatus> {
        let config = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let runs = self
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.runs())
            .unwrap_or_default();
        let mut out = group_status(&config, Some(self.engine.store()));
        for g in &mut out {
            if let Some(r) = runs.get(&g.name) {
                g.next_run_ns = r.next_ns;
                g.last_failure = r.last_failure.clone();
            }
        }
        out
    }

    /// Stop the scheduler (a run in progress finishes first).
    pub fn stop(&self) {
        if let Some(s) = self
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            s.stop();
        }
    }
}

/// The groups of `config` and of `store`, with their newest snapshots (what the daemon and
/// the offline `status` both show).
pub fn group_status(config: &Config, store: Option<&crate::store::Store>) -> Vec<GroupStatus> {
    let tz = timezone_of(config);
    let now = realtime_ns();
    let mut out: Vec<GroupStatus> = config
        .groups
        .iter()
        .map(|g| GroupStatus {
            name: g.name.clone(),
            schedule: g.schedule.as_ref().map(|s| s.to_string()),
            period_ns: g.schedule.as_ref().and_then(|s| period_ns(s, now, &tz)),
            keep: describe_keep(&KeepRules::from(&g.keep)),
            ..GroupStatus::default()
        })
        .collect();
    let list = match store.map(|s| s.list()).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            warn!("status: cannot list the store: {e}");
            Vec::new()
        }
    };
    for info in list.into_iter().filter_map(|l| l.info.ok()) {
        let i = match out.iter().position(|g| g.name == info.group) {
            Some(i) => i,
            None => {
                out.push(GroupStatus {
                    name: info.group.clone(),
                    keep: "none".into(),
                    ..GroupStatus::default()
                });
                out.len() - 1
            }
        };
        let g = &mut out[i];
        g.snapshots += 1;
        if g.last_snapshot_ns.is_none_or(|t| info.created_ns >= t) {
            g.last_snapshot_ns = Some(info.created_ns);
            g.last_snapshot = Some(info.name.clone());
        }
    }
    out
}

/// What differs between two configs a reload may switch between, one line each.
fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let find = |c: &Config, name: &str| c.groups.iter().find(|g| g.name == name).cloned();
    for g in &new.groups {
        match find(old, &g.name) {
            None => out.push(format!("group {} added", g.name)),
            Some(o) => out.extend(group_changes(&o, g)),
        }
    }
    for g in &old.groups {
        if find(new, &g.name).is_none() {
            out.push(format!(
                "group {} removed (its snapshots stay until deleted)",
                g.name
            ));
        }
    }
    if old.policy != new.policy {
        out.push("policy changed".into());
    }
    if old.timezone != new.timezone {
        out.push(format!("timezone {:?} -> {:?}", old.timezone, new.timezone));
    }
    if old.max_store_bytes != new.max_store_bytes {
        out.push(format!(
            "max_store_bytes {:?} -> {:?}",
            old.max_store_bytes, new.max_store_bytes
        ));
    }
    if old.log_level != new.log_level {
        out.push(format!(
            "log_level {:?} -> {:?}",
            old.log_level, new.log_level
        ));
    }
    out
}

fn group_changes(old: &GroupConfig, new: &GroupConfig) -> Vec<String> {
    let mut out = Vec::new();
    let show = |s: &Option<crate::config::Schedule>| {
        s.as_ref().map_or("none".to_string(), |s| s.to_string())
    };
    if old.schedule != new.schedule {
        out.push(format!(
            "group {}: schedule {} -> {}",
            new.name,
            show(&old.schedule),
            show(&new.schedule)
        ));
    }
    if old.keep != new.keep {
        out.push(format!(
            "group {}: keep {} -> {}",
            new.name,
            describe_keep(&KeepRules::from(&old.keep)),
            describe_keep(&KeepRules::from(&new.keep))
        ));
    }
    if old.volumes != new.volumes {
        out.push(format!("group {}: volumes changed", new.name));
    }
    if old.policy != new.policy {
        out.push(format!("group {}: policy changed", new.name));
    }
    out
}
