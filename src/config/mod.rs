//! The grainfs configuration: turns TOML text into a typed [`Config`], filling in the embedded
//! defaults (an empty file, or no file at all, gives [`Config::default`]) and checking every value.
//! Every error names the dotted key (`tracking.block_size`, `group[0].keep.daily`) and the line and
//! column in the file, and unknown keys are errors at every level, so a typo never passes
//! silently. Relative paths (`backing`, `mountpoint`, `store`) are resolved against the directory
//! of the config file. A reload is checked against the running config (`check_reload`): keys
//! that need a remount must stay as they are. This module must never do I/O beyond reading the
//! config file (and the time zone database, to check `timezone`), and never touches fuse, the
//! store or the backing dir.

mod file;
mod reload;
mod values;

use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use file::{ConfigFile, Field, Globs, GroupFile, Located, PolicyFile, Size, Table};
use toml::Spanned;
use values::{fmt_duration, fmt_size, GIB, KIB, MIB};

pub use reload::KeySpans;
pub use values::{parse_duration, parse_size, CronExpr, Schedule};

/// The whole configuration, defaults filled in and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Directory of the real files; required for mount unless given on the command line.
    pub backing: Option<PathBuf>,
    /// Where the overlay is mounted.
    pub mountpoint: Option<PathBuf>,
    /// Snapshot and tracking store; `None` means `<backing>/.grainfs` (see [`Config::store_dir`]).
    pub store: Option<PathBuf>,
    /// FUSE worker threads, 1..=256; defaults to the number of CPUs. Over io_uring they are
    /// spread over the CPUs' queues, at least two each.
    pub threads: usize,
    /// Whether `.snapshots` shows up in directory listings of the mount root.
    pub snapdir: SnapDir,
    /// Show setuid and setgid bits of files under `.snapshots` as recorded (for restores that
    /// copy modes from there); false by default, so a snapshot grants no privilege.
    pub snapshot_setuid: bool,
    /// Mount with `allow_other`; `None` means "true when running as root".
    pub allow_other: Option<bool>,
    /// One of error, warn, info, debug, trace; `None` leaves the logger's default.
    pub log_level: Option<String>,
    /// IANA time zone name ("Europe/Berlin", "UTC") in which cron schedules and retention
    /// buckets are read, checked at load; `None` means the system's local zone
    /// (see [`Config::time_zone`]).
    pub timezone: Option<String>,
    /// Most bytes the store may hold, > 0: over it, the oldest unheld snapshots are removed, but
    /// never the newest of a group; `None` means no bound.
    pub max_store_bytes: Option<u64>,
    /// Kernel attribute and entry cache timeouts.
    pub cache: CacheConfig,
    /// How the FUSE mount talks to the kernel.
    pub fuse: FuseConfig,
    /// Change tracking geometry and tick.
    pub tracking: TrackingConfig,
    /// Thresholds for the full-or-incremental choice per partition.
    pub policy: PolicyConfig,
    /// Named groups of volumes snapshotted together.
    pub groups: Vec<GroupConfig>,
    /// Where the file sets each key that needs a remount, for [`Config::check_reload`]'s errors;
    /// equal for any two configs, so `==` compares what the config says, not where.
    pub spans: KeySpans,
}

/// Visibility of the `.snapshots` directory at the mount root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapDir {
    /// Reachable by name but not listed (like ZFS `snapdir=hidden`).
    #[default]
    Hidden,
    /// Listed in the mount root.
    Visible,
}

/// `[cache]`: how long the kernel may cache attributes and lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Attribute cache timeout, 0s..=3600s.
    pub attr_timeout: Duration,
    /// Directory entry cache timeout, 0s..=3600s.
    pub entry_timeout: Duration,
}

/// `[fuse]`: how the mount talks to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseConfig {
    /// Let the kernel's page cache absorb writes and send them later in large requests
    /// (FUSE_WRITEBACK_CACHE): a write returns before the daemon has it, so a kill -9 of the
    /// daemon loses what no fsync covered, as a power cut would. Snapshots, rollback and
    /// `diff ... live` flush the mount first either way.
    pub writeback_cache: bool,
    /// How requests reach the daemon: FUSE over io_uring or /dev/fuse reads.
    pub transport: Transport,
}

/// `[fuse] transport`: the request path between the kernel and the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// FUSE over io_uring where the kernel offers it (turning the fuse module's
    /// `enable_uring` on as root, and saying so), /dev/fuse otherwise.
    #[default]
    Auto,
    /// FUSE over io_uring, or the mount fails naming why it is not available.
    IoUring,
    /// /dev/fuse reads and writes only.
    Dev,
}

impl Transport {
    /// The value as the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::IoUring => "io_uring",
            Transport::Dev => "dev",
        }
    }
}

/// `[tracking]`: change tracking geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingConfig {
    /// Track changes at all; when false every snapshot is a full copy.
    pub enabled: bool,
    /// Bytes per block, a power of two from 4 KiB to 1 MiB.
    pub block_size: u64,
    /// Bytes per partition, a multiple of `block_size`, at most 64 GiB.
    pub partition_size: u64,
    /// Tracking tick: change maps are published and rates smoothed this often, 1s..=300s.
    pub interval: Duration,
}

/// `[policy]`: when a partition is stored as a full copy instead of changed blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Changed blocks per second above which a partition is stored in full.
    pub full_rate: f64,
    /// Dirty fraction of a partition, in (0, 1], at which it is stored in full.
    pub full_dirty_fraction: f64,
    /// Longest chain of incremental partitions before a full copy, 1..=1000.
    pub max_chain: u32,
}

/// One `[[group]]`: volumes snapshotted together at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// Group name, `[A-Za-z0-9._-]{1,64}`, unique, not `all`.
    pub name: String,
    /// Path globs relative to the backing dir.
    pub volumes: Vec<String>,
    /// When to take snapshots automatically; `None` means only on request.
    pub schedule: Option<Schedule>,
    /// Retention rules.
    pub keep: KeepConfig,
    /// This group's thresholds: `[policy]`, with the keys of the group's own `policy` over it.
    pub policy: PolicyConfig,
}

/// Retention, with restic's `forget --keep-*` meaning; field for field `schedule::KeepRules`.
/// A snapshot kept by any rule stays; a count of 0 keeps none by that rule; all counts 0 and no
/// `within` keep every snapshot. Held snapshots are never removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepConfig {
    /// The newest N snapshots.
    pub last: u32,
    /// The newest snapshot of each of the last N hours that have snapshots.
    pub hourly: u32,
    /// The newest snapshot of each of the last N days that have snapshots.
    pub daily: u32,
    /// The newest snapshot of each of the last N (ISO) weeks that have snapshots.
    pub weekly: u32,
    /// The newest snapshot of each of the last N months that have snapshots.
    pub monthly: u32,
    /// The newest snapshot of each of the last N years that have snapshots.
    pub yearly: u32,
    /// Every snapshot taken within this long of the newest one; more than 0 when set.
    pub within: Option<Duration>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid TOML or a value is wrong; `key` is empty for pure syntax errors.
    #[error("{}:{line}:{column}: {}{message}", origin.display(), key_prefix(key))]
    Invalid {
        origin: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

impl Default for Config {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            backing: None,
            mountpoint: None,
            store: None,
            threads: cpus.clamp(1, 256),
            snapdir: SnapDir::Hidden,
            snapshot_setuid: false,
            allow_other: None,
            log_level: None,
            timezone: None,
            max_store_bytes: None,
            cache: CacheConfig {
                attr_timeout: Duration::from_secs(1),
                entry_timeout: Duration::from_secs(1),
            },
            fuse: FuseConfig {
                writeback_cache: false,
                transport: Transport::Auto,
            },
            tracking: TrackingConfig {
                enabled: true,
                block_size: 64 * KIB,
                partition_size: 64 * MIB,
                interval: Duration::from_secs(10),
            },
            policy: PolicyConfig {
                full_rate: 100.0,
                full_dirty_fraction: 0.5,
                max_chain: 8,
            },
            groups: Vec::new(),
            spans: KeySpans::default(),
        }
    }
}

impl Config {
    /// Parses and validates `text`. `origin` names the file in errors, and relative `backing`,
    /// `mountpoint` and `store` are taken relative to its directory (the current directory when
    /// `origin` has none).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        file::read(text)
            .and_then(|file| build(file, origin, text))
            .map_err(|e| {
                let (line, column) = line_column(text, e.at);
                ConfigError::Invalid {
                    origin: origin.to_path_buf(),
                    line,
                    column,
                    key: e.key,
                    message: e.message,
                }
            })
    }

    /// Reads the file at `path` and parses it with [`Config::from_toml`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// The store directory: `store` if set, else `<backing>/.grainfs`.
    pub fn store_dir(&self, backing: &Path) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| backing.join(".grainfs"))
    }

    /// The zone cron schedules and retention buckets are read in: `timezone` (checked at load),
    /// else the system's local zone.
    pub fn time_zone(&self) -> Result<jiff::tz::TimeZone, jiff::Error> {
        match &self.timezone {
            Some(name) => jiff::tz::TimeZone::get(name),
            None => Ok(jiff::tz::TimeZone::system()),
        }
    }
}

/// The [`Config`] that `file` asks for: defaults where it is silent, and every rule checked on
/// what it says; an error points at the value that breaks a rule. `text` is the file, to place
/// the keys that need a remount.
fn build(file: ConfigFile, origin: &Path, text: &str) -> Result<Config, Located> {
    let d = Config::default();
    let spans = KeySpans::of(&file, origin, text);
    let (cache, fuse, tracking) = (file.cache.0, file.fuse.0, file.tracking.0);
    let path = |field: Option<Field<String>>, key| field.map(|f| resolve(origin, f, key));
    let timeout = within(Duration::ZERO..=Duration::from_secs(3600), fmt_duration);
    let interval = within(
        Duration::from_secs(1)..=Duration::from_secs(300),
        fmt_duration,
    );
    let block_rule = |&Size(b): &Size| {
        let ok = b.is_power_of_two() && (4 * KIB..=MIB).contains(&b);
        let got = fmt_size(b);
        ensure(ok, || {
            format!("must be a power of two from 4KiB to 1MiB, got {got}")
        })
    };
    let default = Size(d.tracking.block_size);
    let Size(block) = tracking
        .block_size
        .read("tracking.block_size", default, block_rule)?;
    let partition_rule = |&Size(p): &Size| {
        let ok = p >= block && p.is_multiple_of(block) && p <= 64 * GIB;
        let (got, block) = (fmt_size(p), fmt_size(block));
        ensure(ok, || {
            format!("must be a multiple of block_size ({block}) up to 64GiB, got {got}")
        })
    };
    let default = Size(d.tracking.partition_size);
    let Size(partition) =
        (tracking.partition_size).read("tracking.partition_size", default, partition_rule)?;
    let level_rule = |level: &String| {
        let levels = LOG_LEVELS.join(", ");
        let message = || format!("unknown level \"{level}\"; use one of: {levels}");
        ensure(LOG_LEVELS.contains(&level.as_str()), message)
    };
    let budget_rule = |&Size(b): &Size| {
        ensure(b > 0, || {
            "must be more than 0; leave it out for no bound".into()
        })
    };
    let policy = policy(file.policy.0, "policy", &d.policy)?;
    Ok(Config {
        backing: path(file.backing, "backing").transpose()?,
        mountpoint: path(file.mountpoint, "mountpoint").transpose()?,
        store: path(file.store, "store").transpose()?,
        threads: file
            .threads
            .read("threads", d.threads, within(1..=256, |n| n.to_string()))?,
        snapdir: file.snapdir.read("snapdir", d.snapdir, any)?,
        snapshot_setuid: file
            .snapshot_setuid
            .read("snapshot_setuid", d.snapshot_setuid, any)?,
        allow_other: file
            .allow_other
            .map(|f| f.check("allow_other", any))
            .transpose()?,
        log_level: file
            .log_level
            .map(|f| f.check("log_level", level_rule))
            .transpose()?,
        timezone: file
            .timezone
            .map(|f| f.check("timezone", check_timezone))
            .transpose()?,
        max_store_bytes: file
            .max_store_bytes
            .map(|f| f.check("max_store_bytes", budget_rule).map(|Size(b)| b))
            .transpose()?,
        cache: CacheConfig {
            attr_timeout: cache.attr_timeout.read(
                "cache.attr_timeout",
                d.cache.attr_timeout,
                &timeout,
            )?,
            entry_timeout: cache.entry_timeout.read(
                "cache.entry_timeout",
                d.cache.entry_timeout,
                &timeout,
            )?,
        },
        fuse: FuseConfig {
            writeback_cache: fuse.writeback_cache.read(
                "fuse.writeback_cache",
                d.fuse.writeback_cache,
                any,
            )?,
            transport: fuse
                .transport
                .read("fuse.transport", d.fuse.transport, any)?,
        },
        tracking: TrackingConfig {
            enabled: tracking
                .enabled
                .read("tracking.enabled", d.tracking.enabled, any)?,
            block_size: block,
            partition_size: partition,
            interval: tracking
                .interval
                .read("tracking.interval", d.tracking.interval, interval)?,
        },
        groups: groups(file.group.0, &policy)?,
        policy,
        spans,
    })
}

/// The policy keys of `file`, each checked, named `<prefix>.<key>` in errors; `base` gives the
/// ones left out (the defaults for `[policy]`, `[policy]` for a group's own).
fn policy(file: PolicyFile, prefix: &str, base: &PolicyConfig) -> Result<PolicyConfig, Located> {
    let key = |name: &str| format!("{prefix}.{name}");
    let rate_rule = |&r: &f64| {
        ensure(r.is_finite() && r >= 0.0, || {
            format!("must be >= 0, got {r}")
        })
    };
    let fraction_rule = |&f: &f64| {
        ensure(f > 0.0 && f <= 1.0, || {
            format!("must be in (0, 1], got {f}")
        })
    };
    Ok(PolicyConfig {
        full_rate: file
            .full_rate
            .read(&key("full_rate"), base.full_rate, rate_rule)?,
        full_dirty_fraction: file.full_dirty_fraction.read(
            &key("full_dirty_fraction"),
            base.full_dirty_fraction,
            fraction_rule,
        )?,
        max_chain: file.max_chain.read(
            &key("max_chain"),
            base.max_chain,
            within(1..=1000, |n| n.to_string()),
        )?,
    })
}

/// The `[[group]]` tables, each checked, in the order of the file; `policy` is `[policy]`, which
/// a group's own `policy` keys override.
fn groups(
    tables: Vec<Spanned<Table<GroupFile>>>,
    policy: &PolicyConfig,
) -> Result<Vec<GroupConfig>, Located> {
    let mut groups: Vec<GroupConfig> = Vec::with_capacity(tables.len());
    for (i, table) in tables.into_iter().enumerate() {
        let key = |field: &str| format!("group[{i}].{field}");
        let at = table.span().start;
        let missing = |field: &str| Located {
            at,
            key: key(field),
            message: format!("missing; every [[group]] needs a {field}"),
        };
        let Table(table) = table.into_inner();
        let name = table.name.ok_or_else(|| missing("name"))?;
        let Globs(volumes) = table.volumes.ok_or_else(|| missing("volumes"))?;
        let name = name.check(&key("name"), |name| {
            check_group_name(name)?;
            let first = groups.iter().position(|g| g.name == *name);
            first.map_or(Ok(()), |first| {
                Err(format!(
                    "duplicate group name \"{name}\" (also group[{first}])"
                ))
            })
        })?;
        let volumes = (volumes.into_iter().enumerate())
            .map(|(j, glob)| glob.check(&key(&format!("volumes[{j}]")), |g| check_volume_glob(g)))
            .collect::<Result<_, _>>()?;
        let schedule = table.schedule.map(|s| {
            s.check(&key("schedule"), |s| match s {
                Schedule::Every(every) if *every < Duration::from_secs(1) => {
                    Err("interval must be at least 1s".into())
                }
                _ => Ok(()),
            })
        });
        let Table(keep) = table.keep;
        let count = |field: Option<Field<u32>>, name| field.read(&key(name), 0, any);
        let within = keep.within.map(|f| {
            f.check(&key("keep.within"), |d| {
                ensure(!d.is_zero(), || {
                    "must be more than 0s; leave it out to keep by the counts alone".into()
                })
            })
        });
        groups.push(GroupConfig {
            name,
            volumes,
            schedule: schedule.transpose()?,
            keep: KeepConfig {
                last: count(keep.last, "keep.last")?,
                hourly: count(keep.hourly, "keep.hourly")?,
                daily: count(keep.daily, "keep.daily")?,
                weekly: count(keep.weekly, "keep.weekly")?,
                monthly: count(keep.monthly, "keep.monthly")?,
                yearly: count(keep.yearly, "keep.yearly")?,
                within: within.transpose()?,
            },
            policy: self::policy(table.policy.0, &key("policy"), policy)?,
        });
    }
    Ok(groups)
}

/// A key the file may leave out.
trait Optional<T> {
    /// The value if `rule` accepts it, or `default` when the key is left out (the defaults obey
    /// the rules).
    fn read(
        self,
        key: &str,
        default: T,
        rule: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, Located>;
}

impl<T> Optional<T> for Option<Field<T>> {
    fn read(
        self,
        key: &str,
        default: T,
        rule: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, Located> {
        self.map_or(Ok(default), |f| f.check(key, rule))
    }
}

/// The rule of a value that needs no more than its type.
fn any<T>(_: &T) -> Result<(), String> {
    Ok(())
}

/// A rule that a value lie in `range`, shown with `show` in the message.
fn within<T: PartialOrd + Copy>(
    range: RangeInclusive<T>,
    show: fn(T) -> String,
) -> impl Fn(&T) -> Result<(), String> {
    move |&v| {
        let (lo, hi) = (show(*range.start()), show(*range.end()));
        ensure(range.contains(&v), || {
            format!("must be {lo}..={hi}, got {}", show(v))
        })
    }
}

fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message())
    }
}

/// A path; a relative one is taken relative to the directory of the config file `origin`.
fn resolve(origin: &Path, field: Field<String>, key: &str) -> Result<PathBuf, Located> {
    let dir = origin.parent().unwrap_or(Path::new(""));
    field.then(key, |path| {
        ensure(!path.is_empty(), || "must not be empty".into())?;
        std::path::absolute(dir.join(path))
            .map_err(|e| format!("cannot resolve relative path: {e}"))
    })
}

/// An IANA zone name that jiff's time zone database knows.
fn check_timezone(name: &String) -> Result<(), String> {
    jiff::tz::TimeZone::get(name).map(drop).map_err(|_| {
        format!(
            "unknown time zone \"{name}\"; use an IANA name such as \"Europe/Berlin\" or \"UTC\", \
             or leave it out for the system's local zone"
        )
    })
}

fn check_group_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(format!("\"{name}\" must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    // "all" names the implicit group of every file; "." and ".." cannot be snapshot folders.
    if matches!(name, "all" | "." | "..") {
        return Err(format!("\"{name}\" is reserved"));
    }
    Ok(())
}

fn check_volume_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() {
        return Err("empty glob".into());
    }
    if glob.starts_with('/') {
        return Err(format!("\"{glob}\" must be relative to the backing dir"));
    }
    if glob.split('/').any(|c| c == "..") {
        return Err(format!("\"{glob}\" must not contain \"..\""));
    }
    Ok(())
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests;
