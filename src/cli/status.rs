//! `grainfs status [PATH...] [--json] [--heatmap]`: the change maps of the volumes of a mount,
//! from the live daemon over the control socket, or from the saved state when no daemon runs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;

use super::CliError;
use crate::config::Config;
use crate::control::{self, GroupStatus, Request, Response, StatusReport};
use crate::daemon;
use crate::track::{self, counters::AccessPattern, ChangeMap};

/// Arguments of `grainfs status`.
#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    /// Volumes or directories inside a grainfs mount (default: the whole mount).
    pub paths: Vec<PathBuf>,
    /// Print the report as JSON (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Draw each volume as a row of partitions shaded by how much of each is dirty.
    #[arg(long)]
    pub heatmap: bool,
    /// The config the mount was started with (to find a store outside the backing dir, or the
    /// mount when no PATH is given).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// For monitoring: one line per scheduled group, and exit status 1 when a group's newest
    /// snapshot is older than twice its schedule's interval (or it has none, or its last
    /// scheduled run failed).
    #[arg(long)]
    pub check: bool,
}

/// A grainfs mount found from a path.
pub(super) struct Target {
    pub backing: PathBuf,
    pub mountpoint: Option<PathBuf>,
    /// Paths relative to the mount root.
    pub rel: Vec<String>,
}

fn grainfs_mounts() -> Vec<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mp = l.split(' ').nth(4)?;
            let e = daemon::mount_entry(Path::new(&unescape(mp)))?;
            Some((e.mountpoint, e.backing?))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The mount (or backing dir) that `paths` are in; with none, the one the working directory is
/// in, the config's, or the only mount there is.
pub(super) fn find_target(paths: &[PathBuf], config: &Config) -> Result<Target, CliError> {
    let mounts = grainfs_mounts();
    let containing = |p: &Path| -> Option<(PathBuf, PathBuf)> {
        mounts
            .iter()
            .filter(|(mp, _)| p.starts_with(mp))
            .max_by_key(|(mp, _)| mp.as_os_str().len())
            .cloned()
    };
    if !paths.is_empty() {
        let mut target: Option<Target> = None;
        for p in paths {
            let abs = std::fs::canonicalize(p).map_err(|source| CliError::Io {
                what: format!("{}", p.display()),
                source,
            })?;
            let Some((mp, backing)) = containing(&abs) else {
                // Not mounted: a path inside a backing dir with a store reads the saved state.
                let backing = abs
                    .ancestors()
                    .find(|a| config.store_dir(a).join("tracking").is_dir())
                    .ok_or_else(|| {
                        CliError::Usage(format!(
                            "{} is neither inside a grainfs mount nor inside a backing dir with a store",
                            abs.display()
                        ))
                    })?
                    .to_path_buf();
                let rel = abs
                    .strip_prefix(&backing)
                    .unwrap_or(Path::new(""))
                    .to_string_lossy()
                    .into_owned();
                match &mut target {
                    Some(t) if t.backing == backing => t.rel.push(rel),
                    Some(_) => {
                        return Err(CliError::Usage(
                            "the paths are in different backing dirs; ask one at a time".into(),
                        ))
                    }
                    None => {
                        target = Some(Target {
                            backing,
                            mountpoint: None,
                            rel: vec![rel],
                        })
                    }
                }
                continue;
            };
            let rel = abs
                .strip_prefix(&mp)
                .unwrap_or(Path::new(""))
                .to_string_lossy()
                .into_owned();
            match &mut target {
                Some(t) if t.mountpoint.as_deref() == Some(mp.as_path()) => t.rel.push(rel),
                Some(_) => {
                    return Err(CliError::Usage(
                        "the paths are in different grainfs mounts; ask one at a time".into(),
                    ))
                }
                None => {
                    target = Some(Target {
                        backing,
                        mountpoint: Some(mp),
                        rel: vec![rel],
                    })
                }
            }
        }
        return target.ok_or_else(|| CliError::Usage("no path".into()));
    }
    if let Ok(cwd) = std::env::current_dir() {
        if let Some((mp, backing)) = containing(&cwd) {
            return Ok(Target {
                backing,
                mountpoint: Some(mp),
                rel: vec![],
            });
        }
    }
    if let Some(b) = &config.backing {
        let mp = mounts
            .iter()
            .find(|(_, mb)| mb == b)
            .map(|(mp, _)| mp.clone());
        return Ok(Target {
            backing: b.clone(),
            mountpoint: mp.or_else(|| config.mountpoint.clone()),
            rel: vec![],
        });
    }
    match mounts.as_slice() {
        [(mp, backing)] => Ok(Target {
            backing: backing.clone(),
            mountpoint: Some(mp.clone()),
            rel: vec![],
        }),
        [] => Err(CliError::Usage(
            "no grainfs mount found; name a path inside one, or give -c CONFIG".into(),
        )),
        _ => Err(CliError::Usage(format!(
            "{} grainfs mounts; name a path inside the one you mean",
            mounts.len()
        ))),
    }
}

/// The report from the saved state, when no daemon answers.
fn offline_report(t: &Target, store: &Path, config: &Config) -> Result<StatusReport, CliError> {
    let state = track::load_state(store).map_err(|source| CliError::Io {
        what: format!("reading tracking state in {}", store.display()),
        source,
    })?;
    let files = track::walk_volumes(&t.backing, store);
    // The same recovery rules a new daemon would apply: partitions in the write-intent record
    // (left by a daemon that died) and volumes changed behind our back are unknown.
    let (left, damaged) = match track::intent::IntentLog::open(&track::tracking_dir(store)) {
        Ok((_, left)) => (left, false),
        Err(_) => (Default::default(), true),
    };
    let geometry = state.as_ref().map_or(
        crate::ids::Geometry {
            block_size: config.tracking.block_size,
            partition_size: config.tracking.partition_size,
        },
        |s| s.geometry,
    );
    let mut rec = track::Recovery::default();
    let restored = track::restore(state.as_ref(), &left, &files, geometry, &mut rec);
    let now = state.as_ref().map_or(0, |s| s.saved_at_ns);
    let mut volumes: Vec<ChangeMap> = restored
        .volumes
        .values()
        .filter_map(|v| {
            if damaged {
                v.mark_unknown_all();
            }
            let path = files.get(&v.id).map(|(p, _)| p.clone());
            daemon::path_selected(path.as_deref(), &t.rel).then(|| v.change_map(path, now))
        })
        .collect();
    volumes.sort_by(|a, b| a.path.cmp(&b.path));
    let (bs, ps) = state.as_ref().map_or(
        (config.tracking.block_size, config.tracking.partition_size),
        |s| (s.geometry.block_size, s.geometry.partition_size),
    );
    Ok(StatusReport {
        live: false,
        backing: t.backing.display().to_string(),
        mountpoint: t.mountpoint.as_ref().map(|m| m.display().to_string()),
        tracking: state.is_some(),
        block_size: bs,
        partition_size: ps,
        interval_secs: state
            .as_ref()
            .map_or(config.tracking.interval.as_secs_f64(), |s| {
                s.interval_ns as f64 / 1e9
            }),
        volumes,
        groups: offline_groups(store, config),
    })
}

pub(super) fn run(args: &StatusArgs) -> Result<(), CliError> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let target = find_target(&args.paths, &config)?;
    let store = config.store_dir(&target.backing);
    let report = match control::request(
        &store,
        &Request::Status {
            paths: target.rel.clone(),
        },
    ) {
        Ok(Response::Status(r)) => r,
        Ok(Response::Error { message }) => {
            return Err(CliError::Usage(format!("daemon: {message}")))
        }
        Ok(other) => {
            return Err(CliError::Usage(format!(
                "daemon: unexpected answer {other:?}"
            )))
        }
        // No daemon (or an old socket): read-only commands work from the saved state.
        Err(_) => offline_report(&target, &store, &config)?,
    };
    if args.check {
        return check(&report, args.json);
    }
    if args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    print_report(&report, args.heatmap, tty);
    Ok(())
}

/// Bytes for humans, binary units.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn pattern(p: AccessPattern) -> &'static str {
    match p {
        AccessPattern::Idle => "-",
        AccessPattern::Sequential => "SEQUENTIAL",
        AccessPattern::Random => "RANDOM",
        AccessPattern::Mixed => "MIXED",
    }
}

fn print_report(r: &StatusReport, heatmap: bool, tty: bool) {
    println!(
        "{} -> {} ({}), tracking {}, block {}, partition {}{}",
        r.backing,
        r.mountpoint.as_deref().unwrap_or("not mounted"),
        if r.live {
            "live"
        } else {
            "saved state, no daemon"
        },
        if r.tracking { "on" } else { "off" },
        human(r.block_size),
        human(r.partition_size),
        if r.live {
            format!(", published every {}s", r.interval_secs)
        } else {
            String::new()
        },
    );
    print_groups(&r.groups);
    if r.volumes.is_empty() {
        println!("no tracked volumes (a file becomes one when written through the mount)");
        return;
    }
    if heatmap {
        print_heatmap(r, tty);
        return;
    }
    println!(
        "{:<32} {:>10} {:>10} {:>12} {:>10} {:<10} UNKNOWN",
        "VOLUME", "SIZE", "DIRTY", "CHANGE/S", "WRITES/S", "PATTERN"
    );
    for v in &r.volumes {
        let name = v
            .path
            .clone()
            .unwrap_or_else(|| format!("(inode {})", v.volume_id));
        let unknown = if v.unknown_all {
            "all".to_string()
        } else if v.unknown_partitions.is_empty() {
            "-".to_string()
        } else {
            format!("{:?}", v.unknown_partitions)
        };
        println!(
            "{:<32} {:>10} {:>10} {:>12.1} {:>10.1} {:<10} {}",
            name,
            human(v.size),
            human(v.dirty_bytes),
            v.change_rate,
            v.write_rate,
            pattern(v.access_pattern),
            unknown
        );
        for p in v
            .partitions
            .iter()
            .filter(|p| p.writes > 0 || p.dirty_blocks > 0 || p.unknown)
        {
            println!(
                "  partition {:<6} {:>10} dirty, {:>8} writes, {:>8} overwrites, {:>8.1} blk/s, {:<10}{}",
                p.index,
                human(p.dirty_bytes),
                p.writes,
                p.overwrites,
                p.change_rate,
                pattern(p.access_pattern),
                if p.unknown { " UNKNOWN" } else { "" }
            );
        }
    }
}

/// Shades from clean to fully dirty; '?' is unknown.
const PLAIN_SHADES: [char; 5] = ['.', ':', '+', '#', '@'];
const TTY_SHADES: [char; 5] = ['·', '░', '▒', '▓', '█'];
/// 256-colour palette from cool to hot.
const COLOURS: [u8; 5] = [240, 33, 220, 208, 196];

fn print_heatmap(r: &StatusReport, tty: bool) {
    let per_line = 64;
    let bpp = (r.partition_size / r.block_size.max(1)).max(1);
    for v in &r.volumes {
        let name = v
            .path
            .clone()
            .unwrap_or_else(|| format!("(inode {})", v.volume_id));
        println!(
            "{name}  {} dirty of {}",
            human(v.dirty_bytes),
            human(v.size)
        );
        let mut line = String::from("  ");
        for (i, p) in v.partitions.iter().enumerate() {
            if i > 0 && i % per_line == 0 {
                println!("{line}");
                line = String::from("  ");
            }
            if p.unknown {
                line.push_str(if tty { "\x1b[35m?\x1b[0m" } else { "?" });
                continue;
            }
            let density = p.dirty_blocks as f64 / bpp as f64;
            let level = if p.dirty_blocks == 0 {
                0
            } else {
                1 + ((density * 4.0).min(3.999) as usize)
            };
            let level = level.min(4);
            if tty {
                line.push_str(&format!(
                    "\x1b[38;5;{}m{}\x1b[0m",
                    COLOURS[level], TTY_SHADES[level]
                ));
            } else {
                line.push(PLAIN_SHADES[level]);
            }
        }
        println!("{line}");
    }
    let shades = if tty { TTY_SHADES } else { PLAIN_SHADES };
    println!(
        "legend: {} clean  {} <25%  {} <50%  {} <75%  {} >=75% of the partition dirty  ? unknown",
        shades[0], shades[1], shades[2], shades[3], shades[4]
    );
}

/// The groups as the saved state shows them: configured ones and those in the store (no
/// scheduler runs without a daemon).
fn offline_groups(store: &Path, config: &Config) -> Vec<GroupStatus> {
    if !store.join("snapshots").is_dir() {
        return daemon::lifecycle::group_status(config, None);
    }
    match crate::store::Store::open(store) {
        Ok(s) => daemon::lifecycle::group_status(config, Some(&s)),
        Err(_) => daemon::lifecycle::group_status(config, None),
    }
}

/// `2h 5m ago` / `in 3m` from a span in ns.
fn span(ns: u64) -> String {
    let s = crate::schedule::fmt_span(ns - ns % 1_000_000_000);
    if ns < 1_000_000_000 {
        "0s".into()
    } else {
        s
    }
}

fn print_groups(groups: &[GroupStatus]) {
    if groups.is_empty() {
        return;
    }
    let now = crate::sys::realtime_ns();
    println!(
        "{:<16} {:<18} {:<28} {:>5} {:<14} {:<10} LAST FAILURE",
        "GROUP", "SCHEDULE", "KEEP", "SNAPS", "NEWEST", "NEXT RUN"
    );
    for g in groups {
        let newest = g.last_snapshot_ns.map_or("-".to_string(), |t| {
            format!("{} ago", span(now.saturating_sub(t)))
        });
        let next = g.next_run_ns.map_or("-".to_string(), |t| {
            format!("in {}", span(t.saturating_sub(now)))
        });
        let failure = g.last_failure.as_ref().map_or("-".to_string(), |f| {
            format!("{} ago: {}", span(now.saturating_sub(f.at_ns)), f.message)
        });
        println!(
            "{:<16} {:<18} {:<28} {:>5} {:<14} {:<10} {}",
            g.name,
            g.schedule.as_deref().unwrap_or("on request"),
            g.keep,
            g.snapshots,
            newest,
            next,
            failure
        );
    }
    println!();
}

/// One scheduled group's health for `status --check`.
#[derive(serde::Serialize)]
struct Health {
    group: String,
    ok: bool,
    message: String,
}

/// `status --check`: like `sanoid --monitor-snapshots`, a line per scheduled group and a
/// non-zero exit when one is stale.
fn check(r: &StatusReport, json: bool) -> Result<(), CliError> {
    let now = crate::sys::realtime_ns();
    let mut out = Vec::new();
    for g in &r.groups {
        let (Some(schedule), Some(period)) = (&g.schedule, g.period_ns) else {
            continue;
        };
        let limit = period.saturating_mul(2);
        let (ok, message) = match (g.last_snapshot_ns, &g.last_failure) {
            (_, Some(f)) => (
                false,
                format!(
                    "the last scheduled run failed {} ago: {}",
                    span(now.saturating_sub(f.at_ns)),
                    f.message
                ),
            ),
            (None, None) => (false, format!("no snapshot yet (schedule {schedule})")),
            (Some(t), None) => {
                let age = now.saturating_sub(t);
                (
                    age <= limit,
                    format!(
                        "newest snapshot {} old, limit {} (2 x {schedule})",
                        span(age),
                        span(limit)
                    ),
                )
            }
        };
        out.push(Health {
            group: g.name.clone(),
            ok,
            message,
        });
    }
    if json {
        let text =
            serde_json::to_string_pretty(&out).map_err(|e| CliError::Usage(e.to_string()))?;
        println!("{text}");
    } else if out.is_empty() {
        println!("OK: no group has a schedule");
    } else {
        for h in &out {
            let word = if h.ok { "OK" } else { "CRITICAL" };
            println!("{word} group {}: {}", h.group, h.message);
        }
    }
    let bad: Vec<&str> = out
        .iter()
        .filter(|h| !h.ok)
        .map(|h| h.group.as_str())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "status --check: stale or failing group(s): {}",
            bad.join(", ")
        )))
    }
}
