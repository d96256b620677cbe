//! The grainfs configuration: turns TOML text into a typed [`Config`], filling in the embedded
//! defaults (an empty file, or no file at all, gives [`Config::default`]) and checking every value.
//! Every error names the dotted key (`tracking.block_size`, `group[0].keep.daily`) and the line and
//! column in the file, and unknown keys are errors at every level, so a typo never passes
//! silently. Relative paths (`backing`, `mountpoint`, `store`) are resolved against the directory
//! of the config file. This module must never do I/O beyond reading the config file, and never
//! touches fuse, the store or the backing dir.

mod file;
mod values;

use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use file::{ConfigFile, Field, Globs, GroupFile, Located, Size, Table};
use toml::Spanned;
use values::{fmt_duration, fmt_size, GIB, KIB, MIB};

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
    /// FUSE worker threads, 1..=256; defaults to the number of CPUs.
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
    /// Kernel attribute and entry cache timeouts.
    pub cache: CacheConfig,
    /// Change tracking geometry and tick.
    pub tracking: TrackingConfig,
    /// Thresholds for the full-or-incremental choice per partition.
    pub policy: PolicyConfig,
    /// Named groups of volumes snapshotted together.
    pub groups: Vec<GroupConfig>,
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
}

/// Retention: how many snapshots each rule keeps; 0 = the rule keeps none, all 0 = keep all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepConfig {
    /// The newest N snapshots.
    pub last: u32,
    /// The newest snapshot of each of the last N hours.
    pub hourly: u32,
    /// The newest snapshot of each of the last N days.
    pub daily: u32,
    /// The newest snapshot of each of the last N weeks.
    pub weekly: u32,
    /// The newest snapshot of each of the last N months.
    pub monthly: u32,
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
            cache: CacheConfig {
                attr_timeout: Duration::from_secs(1),
                entry_timeout: Duration::from_secs(1),
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
        }
    }
}

impl Config {
    /// Parses and validates `text`. `origin` names the file in errors, and relative `backing`,
    /// `mountpoint` and `store` are taken relative to its directory (the current directory when
    /// `origin` has none).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        file::read(text)
            .and_then(|file| build(file, origin))
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
}

/// The [`Config`] that `file` asks for: defaults where it is silent, and every rule checked on
/// what it says; an error points at the value that breaks a rule.
fn build(file: ConfigFile, origin: &Path) -> Result<Config, Located> {
    let d = Config::default();
    let (cache, tracking, policy) = (file.cache.0, file.tracking.0, file.policy.0);
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
    let fraction = d.policy.full_dirty_fraction;
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
        policy: PolicyConfig {
            full_rate: policy
                .full_rate
                .read("policy.full_rate", d.policy.full_rate, rate_rule)?,
            full_dirty_fraction: (policy.full_dirty_fraction).read(
                "policy.full_dirty_fraction",
                fraction,
                fraction_rule,
            )?,
            max_chain: policy.max_chain.read(
                "policy.max_chain",
                d.policy.max_chain,
                within(1..=1000, |n| n.to_string()),
            )?,
        },
        groups: groups(file.group.0)?,
    })
}

/// The `[[group]]` tables, each checked, in the order of the file.
fn groups(tables: Vec<Spanned<Table<GroupFile>>>) -> Result<Vec<GroupConfig>, Located> {
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
                _ => Err(NO_SCHEDULES.into()),
            })
        });
        let Table(keep) = table.keep;
        let count = |field: Option<Field<u32>>, name| {
            field.read(&key(&format!("keep.{name}")), 0, |n: &u32| {
                if *n == 0 {
                    Ok(())
                } else {
                    Err(NO_RETENTION.into())
                }
            })
        };
        groups.push(GroupConfig {
            name,
            volumes,
            schedule: schedule.transpose()?,
            keep: KeepConfig {
                last: count(keep.last, "last")?,
                hourly: count(keep.hourly, "hourly")?,
                daily: count(keep.daily, "daily")?,
                weekly: count(keep.weekly, "weekly")?,
                monthly: count(keep.monthly, "monthly")?,
            },
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
/// Schedules and retention are parsed (so a config written for them is checked) but refused
/// until the daemon acts on them: a key that is accepted and does nothing would be a silent lie.
const NO_SCHEDULES: &str = "automatic snapshots are not implemented yet, so this key is refused rather than ignored; take snapshots with `grainfs snapshot create GROUP` from cron or a systemd timer";
const NO_RETENTION: &str = "retention is not implemented yet, so a nonzero count is refused rather than ignored; remove snapshots with `grainfs snapshot delete`";

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
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../conf/grainfs.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/grainfs/conf.toml"))
    }

    /// The error's Display, asserting it names `key` at `line`.
    fn error_at(text: &str, key: &str, line: usize) -> String {
        let err = parse(text).expect_err("config should be rejected");
        let shown = err.to_string();
        let ConfigError::Invalid {
            line: got,
            key: got_key,
            ..
        } = &err
        else {
            panic!("not an Invalid error: {shown}");
        };
        assert_eq!((got_key.as_str(), *got), (key, line), "{shown}");
        let prefix = format!("/etc/grainfs/conf.toml:{line}:");
        assert!(shown.starts_with(&prefix) && shown.contains(key), "{shown}");
        shown
    }

    #[test]
    fn example_config_loads_with_documented_values() {
        let c = parse(EXAMPLE).expect("conf/grainfs.toml must load");
        assert_eq!(c.backing.as_deref(), Some(Path::new("/srv/volumes")));
        assert_eq!(c.mountpoint.as_deref(), Some(Path::new("/mnt/volumes")));
        let store = c.store_dir(Path::new("/srv/volumes"));
        assert_eq!(store, Path::new("/srv/volumes/.grainfs"));
        let defaults = Config::default();
        assert_eq!(c.cache, defaults.cache);
        assert_eq!(c.tracking, defaults.tracking);
        assert_eq!(c.policy, defaults.policy);
        assert_eq!(c.tracking.block_size, 65536);
        assert_eq!(c.tracking.partition_size, 64 << 20);
        assert_eq!(c.tracking.interval, Duration::from_secs(10));
        let vms = GroupConfig {
            name: "vms".into(),
            volumes: vec!["vms/*.img".into()],
            schedule: None,
            keep: KeepConfig::default(),
        };
        assert_eq!(c.groups, vec![vms]);
        let without_examples = Config {
            backing: None,
            mountpoint: None,
            groups: Vec::new(),
            ..c
        };
        assert_eq!(without_examples, defaults);
    }

    #[test]
    fn schedules_and_retention_are_refused_until_the_daemon_acts_on_them() {
        let every = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nschedule = \"every 15m\"\n";
        assert!(error_at(every, "group[0].schedule", 4).contains("not implemented yet"));
        let cron = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nschedule = \"@daily\"\n";
        error_at(cron, "group[0].schedule", 4);
        let keep = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { last = 0, daily = 7 }\n";
        assert!(error_at(keep, "group[0].keep.daily", 4).contains("not implemented yet"));
        let zeros = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { last = 0 }\n";
        assert!(
            parse(zeros).is_ok(),
            "all zero means keep every snapshot, which is what happens"
        );
    }

    #[test]
    fn snapshot_setuid_is_off_unless_set() {
        assert!(!Config::default().snapshot_setuid);
        let c = parse("snapshot_setuid = true\n").expect("parse");
        assert!(c.snapshot_setuid);
    }

    #[test]
    fn empty_text_gives_the_embedded_defaults() {
        assert_eq!(parse("").ok(), Some(Config::default()));
    }

    #[test]
    fn a_number_the_parser_cannot_hold_names_its_key_and_line() {
        let e = parse("[tracking]\nenabled = true\nblock_size = 99999999999999999999\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3:") && e.contains("tracking.block_size:"),
            "{e}"
        );
        let e = parse("[[group]]\nname = \"a\"\nvolumes = [\"*\"]\n[[group]]\nname = \"b\"\nvolumes = [\"*\"]\n[policy]\nfull_rate = 1e400\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":8:") && e.contains("policy.full_rate:"), "{e}");
        let e = parse("[[group]]\nname = \"a\"\n[[group]]\nname = \"b\"\nkeep = { last = 99999999999999999999 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":5:") && e.contains("group[1].keep:"), "{e}");
    }

    #[test]
    fn load_reads_the_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grainfs.toml");
        std::fs::write(&path, "backing = \"volumes\"\nstore = \"/var/lib/g\"\n").expect("write");
        let c = Config::load(&path).expect("load");
        // A relative path is taken relative to the config file's directory.
        assert_eq!(c.backing, Some(dir.path().join("volumes")));
        assert_eq!(c.store_dir(Path::new("/x")), Path::new("/var/lib/g"));
        let missing = dir.path().join("nope.toml");
        let err = Config::load(&missing).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let shown = error_at("threads = 2\nthread = 4\n", "thread", 2);
        assert!(shown.contains("did you mean \"threads\""), "{shown}");
        let shown = error_at(
            "# c\n\n[tracking]\nenabled = true\n\n\nblok_size = \"64KiB\"\n",
            "tracking.blok_size",
            7,
        );
        assert_eq!(
            shown,
            "/etc/grainfs/conf.toml:7:1: tracking.blok_size: unknown key (did you mean \
             \"block_size\"?); expected one of: enabled, block_size, partition_size, interval"
        );
        error_at("[trackin]\nenabled = true\n", "trackin", 1);
        error_at("tracking.size = 1\n", "tracking.size", 1);
        let groups = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n\
                      [[group]]\nname = \"b\"\nvolumes = [\"b\"]\nretain = 3\n";
        error_at(groups, "group[1].retain", 7);
        let keep = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { last = 1, yearly = 2 }\n";
        error_at(keep, "group[0].keep.yearly", 4);
        let keep_table = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n[group.keep]\nhours = 1\n";
        error_at(keep_table, "group[0].keep.hours", 5);
    }

    #[test]
    fn wrong_types_are_named_with_their_line() {
        let shown = error_at("\n[tracking]\nblock_size = 12\n", "tracking.block_size", 3);
        assert!(shown.contains("found integer 12"), "{shown}");
        error_at("threads = \"4\"\n", "threads", 1);
        error_at("[policy]\nfull_rate = \"fast\"\n", "policy.full_rate", 2);
        error_at("[group]\nname = \"a\"\n", "group", 1);
        let keep = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { daily = \"7\" }\n";
        error_at(keep, "group[0].keep.daily", 4);
        error_at(
            "[[group]]\nname = \"a\"\nvolumes = [\"a\", 3]\n",
            "group[0].volumes[1]",
            3,
        );
        error_at("threads = -1\n", "threads", 1);
        let shown = error_at("\nthreads = 1979-05-27\n", "threads", 2);
        assert!(
            shown.ends_with("expected an integer, found a datetime"),
            "{shown}"
        );
        error_at("tracking.enabled = \"yes\"\n", "tracking.enabled", 1);
    }

    #[test]
    fn shapes_serde_would_take_are_refused_in_plain_words() {
        // A derived struct also reads an array of its fields in order.
        let shown = error_at("policy = [1]\n", "policy", 1);
        assert!(
            shown.ends_with("expected a table, found an array"),
            "{shown}"
        );
        // A table made by a dotted key has no span of its own.
        let shown = error_at("\nthreads.x = 1\n", "threads", 2);
        assert!(
            shown.ends_with("expected an integer, found a table"),
            "{shown}"
        );
        let shown = error_at("[group]\nname = \"a\"\n", "group", 1);
        assert!(shown.contains("([[group]]), found a table"), "{shown}");
        // A wrong type inside an array points at the element, not the array.
        let multiline = "[[group]]\nname = \"a\"\nvolumes = [\"a\",\n  3]\n";
        let shown = error_at(multiline, "group[0].volumes[1]", 4);
        assert!(shown.ends_with("found integer 3"), "{shown}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        let shown = error_at(
            "[tracking]\nblock_size = \"3KiB\"\n",
            "tracking.block_size",
            2,
        );
        assert!(shown.contains("power of two"), "{shown}");
        error_at(
            "[tracking]\nblock_size = \"64KB\"\n",
            "tracking.block_size",
            2,
        );
        error_at("[tracking]\ninterval = \"0s\"\n", "tracking.interval", 2);
        error_at("[tracking]\ninterval = \"5min\"\n", "tracking.interval", 2);
        let part = "[tracking]\nblock_size = \"1MiB\"\npartition_size = \"1536KiB\"\n";
        error_at(part, "tracking.partition_size", 3);
        error_at("[cache]\nattr_timeout = \"2h\"\n", "cache.attr_timeout", 2);
        error_at(
            "[policy]\nfull_dirty_fraction = 0.0\n",
            "policy.full_dirty_fraction",
            2,
        );
        error_at("[policy]\nfull_rate = -1\n", "policy.full_rate", 2);
        error_at("[policy]\nmax_chain = 0\n", "policy.max_chain", 2);
        error_at("threads = 1000\n", "threads", 1);
        error_at("snapdir = \"shown\"\n", "snapdir", 1);
        error_at(
            "threads = 2\nsnapshot_setuid = \"yes\"\n",
            "snapshot_setuid",
            2,
        );
        error_at("log_level = \"verbose\"\n", "log_level", 1);
        error_at("backing = \"\"\n", "backing", 1);
        let dup = "[[group]]\nname = \"vms\"\nvolumes = [\"a\"]\n\
                   [[group]]\nname = \"vms\"\nvolumes = [\"b\"]\n";
        let shown = error_at(dup, "group[1].name", 5);
        assert!(shown.contains("duplicate"), "{shown}");
        error_at(
            "[[group]]\nname = \"all\"\nvolumes = [\"a\"]\n",
            "group[0].name",
            2,
        );
        error_at(
            "[[group]]\nname = \"a b\"\nvolumes = [\"a\"]\n",
            "group[0].name",
            2,
        );
        error_at("\n[[group]]\nvolumes = [\"a\"]\n", "group[0].name", 2);
        error_at(
            "[[group]]\nname = \"a\"\nvolumes = []\n",
            "group[0].volumes",
            3,
        );
        let abs = "[[group]]\nname = \"a\"\nvolumes = [\"ok/*\",\n  \"/abs/*\"]\n";
        error_at(abs, "group[0].volumes[1]", 4);
        error_at(
            "[[group]]\nname = \"a\"\nvolumes = [\"../x\"]\n",
            "group[0].volumes[0]",
            3,
        );
        let cron = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nschedule = \"61 * * * *\"\n";
        error_at(cron, "group[0].schedule", 4);
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("threads = 2\nbacking = \n").expect_err("syntax");
        let shown = err.to_string();
        assert!(shown.starts_with("/etc/grainfs/conf.toml:2:"), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
        let dup = parse("threads = 2\nthreads = 3\n").expect_err("duplicate key");
        assert!(
            dup.to_string().starts_with("/etc/grainfs/conf.toml:2:"),
            "{dup}"
        );
    }

    proptest! {
        #[test]
        fn any_text_gives_a_config_or_a_located_error(text in "[ -~\n]{0,200}") {
            if let Err(ConfigError::Invalid { line, column, .. }) = parse(&text) {
                prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
                prop_assert!(column >= 1);
            }
        }
    }
}
