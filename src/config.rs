//! The grainfs configuration: turns TOML text into a typed [`Config`], filling in the embedded
//! defaults (an empty file, or no file at all, gives [`Config::default`]) and checking every value.
//! Every error names the dotted key (`tracking.block_size`, `group[0].keep.daily`) and the line and
//! column in the file, and unknown keys are errors at every level, so a typo never passes
//! silently. Relative paths (`backing`, `mountpoint`, `store`) are resolved against the directory
//! of the config file. This module must never do I/O beyond reading the config file, and never
//! touches fuse, the store or the backing dir.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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

/// When a group is snapshotted automatically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `every 15m`: a fixed interval.
    Every(Duration),
    /// A syntax-checked 5-field cron expression (minute hour day-of-month month day-of-week).
    Cron(String),
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

/// The dotted key whose value sits at byte `at` of `text` (`policy.max_chain`,
/// `group[1].name`), for errors the TOML parser reports without one (a number too large for
/// any integer, say); empty when `at` is not in a `key = value` line's value.
fn key_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some(eq) = line.find('=') else {
        return String::new();
    };
    let key = line[..eq].trim();
    if at < line_start + eq
        || key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return String::new();
    }
    // The table the line is in: the last header above it; `[[x]]` counts as x[n].
    let mut table = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
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
        let locate = |at: usize, key: String, message: String| {
            let (line, column) = line_column(text, at);
            ConfigError::Invalid {
                origin: origin.to_path_buf(),
                line,
                column,
                key,
                message,
            }
        };
        let root: Node = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().replace('\n', "; ");
            locate(at, key_at(text, at), message)
        })?;
        let mut decoder = Decoder {
            origin,
            positions: HashMap::new(),
        };
        let config = decoder
            .config(&root)
            .map_err(|e| locate(e.at, e.key, e.message))?;
        config
            .validate()
            .map_err(|v| locate(decoder.position(&v.key), v.key, v.message))?;
        Ok(config)
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

    /// Semantic rules; the first broken one is returned with the dotted key it concerns.
    fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: key.to_string(),
                message,
            })
        };
        for (key, path) in [
            ("backing", &self.backing),
            ("mountpoint", &self.mountpoint),
            ("store", &self.store),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return fail(key, "must be an absolute path".into());
            }
        }
        if !(1..=256).contains(&self.threads) {
            return fail("threads", format!("must be 1..=256, got {}", self.threads));
        }
        if let Some(level) = &self.log_level {
            if !LOG_LEVELS.contains(&level.as_str()) {
                let msg = format!(
                    "unknown level \"{level}\"; use one of: {}",
                    LOG_LEVELS.join(", ")
                );
                return fail("log_level", msg);
            }
        }
        for (key, timeout) in [
            ("cache.attr_timeout", self.cache.attr_timeout),
            ("cache.entry_timeout", self.cache.entry_timeout),
        ] {
            if timeout > Duration::from_secs(3600) {
                return fail(
                    key,
                    format!("must be 0s..=3600s, got {}", fmt_duration(timeout)),
                );
            }
        }
        let t = &self.tracking;
        if !t.block_size.is_power_of_two() || !(4 * KIB..=MIB).contains(&t.block_size) {
            let got = fmt_size(t.block_size);
            let msg = format!("must be a power of two from 4KiB to 1MiB, got {got}");
            return fail("tracking.block_size", msg);
        }
        if t.partition_size < t.block_size
            || !t.partition_size.is_multiple_of(t.block_size)
            || t.partition_size > 64 * GIB
        {
            let (got, block) = (fmt_size(t.partition_size), fmt_size(t.block_size));
            let msg = format!("must be a multiple of block_size ({block}) up to 64GiB, got {got}");
            return fail("tracking.partition_size", msg);
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&t.interval) {
            let msg = format!("must be 1s..=300s, got {}", fmt_duration(t.interval));
            return fail("tracking.interval", msg);
        }
        let p = &self.policy;
        if !(p.full_rate.is_finite() && p.full_rate >= 0.0) {
            return fail(
                "policy.full_rate",
                format!("must be >= 0, got {}", p.full_rate),
            );
        }
        if !(p.full_dirty_fraction > 0.0 && p.full_dirty_fraction <= 1.0) {
            let msg = format!("must be in (0, 1], got {}", p.full_dirty_fraction);
            return fail("policy.full_dirty_fraction", msg);
        }
        if !(1..=1000).contains(&p.max_chain) {
            return fail(
                "policy.max_chain",
                format!("must be 1..=1000, got {}", p.max_chain),
            );
        }
        for (i, group) in self.groups.iter().enumerate() {
            let key = |field: &str| format!("group[{i}].{field}");
            if let Err(msg) = check_group_name(&group.name) {
                return fail(&key("name"), msg);
            }
            if let Some(first) = self.groups[..i].iter().position(|g| g.name == group.name) {
                let msg = format!(
                    "duplicate group name \"{}\" (also group[{first}])",
                    group.name
                );
                return fail(&key("name"), msg);
            }
            if group.volumes.is_empty() {
                return fail(&key("volumes"), "needs at least one volume glob".into());
            }
            for (j, glob) in group.volumes.iter().enumerate() {
                if let Err(msg) = check_volume_glob(glob) {
                    return fail(&key(&format!("volumes[{j}]")), msg);
                }
            }
            if let Some(Schedule::Every(every)) = group.schedule {
                if every < Duration::from_secs(1) {
                    return fail(&key("schedule"), "interval must be at least 1s".into());
                }
            }
        }
        Ok(())
    }
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

impl FromStr for Schedule {
    type Err = String;

    /// `every <duration>` or a 5-field cron expression.
    fn from_str(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        if let Some(every) = s.strip_prefix("every ") {
            return parse_duration(every).map(Schedule::Every);
        }
        check_cron(s)?;
        Ok(Schedule::Cron(
            s.split_whitespace().collect::<Vec<_>>().join(" "),
        ))
    }
}

/// Fields of a cron expression and their bounds (day of week: 0 and 7 are Sunday).
const CRON_FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

fn check_cron(expr: &str) -> Result<(), String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != CRON_FIELDS.len() {
        return Err(format!(
            "\"{expr}\" is neither \"every <duration>\" (e.g. \"every 15m\") nor a 5-field cron \
             expression (minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\")"
        ));
    }
    for (field, (name, lo, hi)) in fields.iter().zip(CRON_FIELDS) {
        for part in field.split(',') {
            check_cron_part(part, lo, hi)
                .map_err(|e| format!("cron {name} field \"{field}\": {e}"))?;
        }
    }
    Ok(())
}

fn check_cron_part(part: &str, lo: u32, hi: u32) -> Result<(), String> {
    let number = |s: &str| -> Result<u32, String> {
        let n = (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
            .ok_or_else(|| format!("\"{s}\" is not *, */N, N, N-M or a list of them"))?;
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is outside {lo}..={hi}"))
        }
    };
    if part == "*" {
        return Ok(());
    }
    if let Some(step) = part.strip_prefix("*/") {
        return match step.parse::<u32>() {
            Ok(n) if (1..=hi).contains(&n) => Ok(()),
            _ => Err(format!("step \"{step}\" must be 1..={hi}")),
        };
    }
    if let Some((from, to)) = part.split_once('-') {
        let (from, to) = (number(from)?, number(to)?);
        if from > to {
            return Err(format!("range {from}-{to} runs backwards"));
        }
        return Ok(());
    }
    number(part).map(drop)
}

/// Parses a byte size: a plain integer or one followed by B, K/KiB, M/MiB, G/GiB or T/TiB
/// (all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let usage = "write an integer with B, KiB, MiB, GiB or TiB, e.g. \"64KiB\"";
    if digits == 0 {
        return Err(format!("invalid size \"{s}\": {usage}"));
    }
    let unit = t[digits..].trim_start();
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => KIB,
        "M" | "MiB" => MIB,
        "G" | "GiB" => GIB,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" | "MB" | "GB" | "TB" => {
            return Err(format!(
                "invalid size \"{s}\": \"{unit}\" is ambiguous (1000 or 1024?); {usage}"
            ))
        }
        _ => {
            return Err(format!(
                "invalid size \"{s}\": unknown unit \"{unit}\"; {usage}"
            ))
        }
    };
    t[..digits]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

/// Parses a duration: integers with units d, h, m, s, ms, largest first, e.g. "1h30m", "500ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let usage = "write e.g. \"10s\", \"500ms\", \"15m\" or \"1h30m\" (units d, h, m, s, ms)";
    if t.is_empty() {
        return Err(format!("empty duration; {usage}"));
    }
    let mut rest = t;
    let mut millis: u64 = 0;
    let mut previous_rank = None;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let (number, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        rest = &rest[digits + unit_len..];
        let (rank, unit_millis) = match unit {
            _ if number.is_empty() => return Err(format!("invalid duration \"{s}\"; {usage}")),
            "d" => (0, 86_400_000),
            "h" => (1, 3_600_000),
            "m" => (2, 60_000),
            "s" => (3, 1_000),
            "ms" => (4, 1),
            "" => return Err(format!("duration \"{s}\" lacks a unit; {usage}")),
            _ => {
                return Err(format!(
                    "duration \"{s}\" has unknown unit \"{unit}\"; {usage}"
                ))
            }
        };
        if previous_rank.is_some_and(|p| p >= rank) {
            return Err(format!(
                "duration \"{s}\": units must go largest first, each once"
            ));
        }
        previous_rank = Some(rank);
        millis = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_millis))
            .and_then(|m| m.checked_add(millis))
            .ok_or_else(|| format!("duration \"{s}\" is too large"))?;
    }
    Ok(Duration::from_millis(millis))
}

fn fmt_size(bytes: u64) -> String {
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", GIB),
        ("MiB", MIB),
        ("KiB", KIB),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
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

/// A semantic rule broken by a decoded config, located later through the key's position.
struct Violation {
    key: String,
    message: String,
}

/// A decoding error at byte offset `at`.
struct Located {
    at: usize,
    key: String,
    message: String,
}

// The TOML tree with byte spans. toml 0.8 gives spans through serde_spanned's private protocol:
// a struct with these name and fields is fed as a map {start, end, value}. toml::Spanned cannot
// be used directly because the tables made by dotted keys (`a.b = 1`) carry no span and
// toml::Spanned then fails; these types fall back to "no span" instead.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

struct Key {
    name: String,
    span: Option<Range<usize>>,
}

struct Node {
    span: Option<Range<usize>>,
    value: Value,
}

enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<(Key, Node)>),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                let name = v.to_string();
                Ok(Key { name, span: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
                let _start: Option<IgnoredAny> = map.next_key()?;
                let (span, name) = spanned_rest(&mut map)?;
                Ok(Key {
                    name,
                    span: Some(span),
                })
            }
        }
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, NodeVisitor)
    }
}

/// A node read without asking for its span: the `value` inside a spanned map (asking again there
/// would recurse forever).
struct Bare(Node);

impl<'de> Deserialize<'de> for Bare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bare, D::Error> {
        d.deserialize_any(NodeVisitor).map(Bare)
    }
}

/// Reads `end` and `value` of a spanned map whose `start` key has just been read.
fn spanned_rest<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
) -> Result<(Range<usize>, T), A::Error> {
    let start: usize = map.next_value()?;
    let _end: Option<IgnoredAny> = map.next_key()?;
    let end: usize = map.next_value()?;
    let _value: Option<IgnoredAny> = map.next_key()?;
    Ok((start..end, map.next_value()?))
}

struct NodeVisitor;

fn bare<E>(value: Value) -> Result<Node, E> {
    Ok(Node { span: None, value })
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        bare(Value::String(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        bare(Value::Integer(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        let v = i64::try_from(v).map_err(|_| E::custom("integer too large"))?;
        bare(Value::Integer(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        bare(Value::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        bare(Value::Boolean(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        bare(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        match map.next_key::<Key>()? {
            Some(key) if key.name == SPANNED_START && key.span.is_none() => {
                let (span, Bare(node)) = spanned_rest(&mut map)?;
                let span = Some(span);
                return Ok(Node { span, ..node });
            }
            Some(key) if key.name == DATETIME_FIELD => {
                map.next_value::<IgnoredAny>()?;
                return bare(Value::Datetime);
            }
            Some(key) => entries.push((key, map.next_value()?)),
            None => {}
        }
        while let Some(key) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        bare(Value::Table(entries))
    }
}

/// One value in the file: its dotted key and the byte offset where it is.
struct Item<'n> {
    key: String,
    at: usize,
    node: &'n Node,
}

/// A table whose keys have all been checked against the known ones.
struct Section<'n> {
    key: String,
    at: usize,
    entries: &'n [(Key, Node)],
}

impl<'n> Section<'n> {
    fn get(&self, name: &str) -> Option<Item<'n>> {
        let (key, node) = self.entries.iter().find(|(k, _)| k.name == name)?;
        Some(entry(&self.key, self.at, key, node))
    }

    /// Decodes `name` into `slot` if the key is present; the default stays otherwise.
    fn read<T>(
        &self,
        name: &str,
        slot: &mut T,
        decode: impl FnOnce(&Item<'n>) -> Result<T, Located>,
    ) -> Result<(), Located> {
        if let Some(item) = self.get(name) {
            *slot = decode(&item)?;
        }
        Ok(())
    }
}

/// The item for `key = node` inside the table at `parent`: positioned at the value, else the key.
fn entry<'n>(parent: &str, parent_at: usize, key: &Key, node: &'n Node) -> Item<'n> {
    let span = node.span.as_ref().or(key.span.as_ref());
    let key = match parent {
        "" => key.name.clone(),
        parent => format!("{parent}.{}", key.name),
    };
    let at = span.map_or(parent_at, |s| s.start);
    Item { key, at, node }
}

/// Turns the spanned tree into a [`Config`], remembering where each dotted key is.
struct Decoder<'a> {
    origin: &'a Path,
    positions: HashMap<String, usize>,
}

impl Decoder<'_> {
    /// Position of `key`, or of the nearest enclosing key that has one.
    fn position(&self, key: &str) -> usize {
        let mut key = key;
        loop {
            if let Some(&at) = self.positions.get(key) {
                return at;
            }
            match key.rfind(['.', '[']) {
                Some(i) => key = &key[..i],
                None => return 0,
            }
        }
    }

    fn config(&mut self, root: &Node) -> Result<Config, Located> {
        let root = Item {
            key: String::new(),
            at: root.span.as_ref().map_or(0, |s| s.start),
            node: root,
        };
        let s = self.section(
            &root,
            &[
                "backing",
                "mountpoint",
                "store",
                "threads",
                "snapdir",
                "snapshot_setuid",
                "allow_other",
                "log_level",
                "cache",
                "tracking",
                "policy",
                "group",
            ],
        )?;
        let mut c = Config::default();
        let origin = self.origin;
        let path = |it: &Item| resolve(origin, it).map(Some);
        s.read("backing", &mut c.backing, path)?;
        s.read("mountpoint", &mut c.mountpoint, path)?;
        s.read("store", &mut c.store, path)?;
        s.read("threads", &mut c.threads, integer)?;
        s.read("snapdir", &mut c.snapdir, |it| match string(it)? {
            "hidden" => Ok(SnapDir::Hidden),
            "visible" => Ok(SnapDir::Visible),
            other => Err(it.error(format!("\"{other}\" is not hidden or visible"))),
        })?;
        s.read("snapshot_setuid", &mut c.snapshot_setuid, boolean)?;
        s.read("allow_other", &mut c.allow_other, |it| {
            boolean(it).map(Some)
        })?;
        s.read("log_level", &mut c.log_level, |it| {
            Ok(Some(string(it)?.into()))
        })?;
        if let Some(it) = s.get("cache") {
            let s = self.section(&it, &["attr_timeout", "entry_timeout"])?;
            s.read("attr_timeout", &mut c.cache.attr_timeout, duration)?;
            s.read("entry_timeout", &mut c.cache.entry_timeout, duration)?;
        }
        if let Some(it) = s.get("tracking") {
            let keys = ["enabled", "block_size", "partition_size", "interval"];
            let (s, t) = (self.section(&it, &keys)?, &mut c.tracking);
            s.read("enabled", &mut t.enabled, boolean)?;
            s.read("block_size", &mut t.block_size, size)?;
            s.read("partition_size", &mut t.partition_size, size)?;
            s.read("interval", &mut t.interval, duration)?;
        }
        if let Some(it) = s.get("policy") {
            let keys = ["full_rate", "full_dirty_fraction", "max_chain"];
            let (s, p) = (self.section(&it, &keys)?, &mut c.policy);
            s.read("full_rate", &mut p.full_rate, float)?;
            s.read("full_dirty_fraction", &mut p.full_dirty_fraction, float)?;
            s.read("max_chain", &mut p.max_chain, integer)?;
        }
        if let Some(it) = s.get("group") {
            if !matches!(it.node.value, Value::Array(_)) {
                return Err(it.type_error("an array of tables ([[group]])"));
            }
            for group in self.elements(&it)? {
                c.groups.push(self.group(&group)?);
            }
        }
        Ok(c)
    }

    fn group(&mut self, it: &Item) -> Result<GroupConfig, Located> {
        let s = self.section(it, &["name", "volumes", "schedule", "keep"])?;
        let missing = |field: &str| Located {
            at: it.at,
            key: format!("{}.{field}", it.key),
            message: format!("missing; every [[group]] needs a {field}"),
        };
        let name = s.get("name").ok_or_else(|| missing("name"))?;
        let volumes = s.get("volumes").ok_or_else(|| missing("volumes"))?;
        let mut group = GroupConfig {
            name: string(&name)?.to_string(),
            volumes: Vec::new(),
            schedule: None,
            keep: KeepConfig::default(),
        };
        for glob in self.elements(&volumes)? {
            group.volumes.push(string(&glob)?.to_string());
        }
        s.read("schedule", &mut group.schedule, |it| {
            parsed(it, "a string such as \"every 15m\"", str::parse).map(Some)
        })?;
        if let Some(it) = s.get("keep") {
            let keys = ["last", "hourly", "daily", "weekly", "monthly"];
            let (s, k) = (self.section(&it, &keys)?, &mut group.keep);
            s.read("last", &mut k.last, integer)?;
            s.read("hourly", &mut k.hourly, integer)?;
            s.read("daily", &mut k.daily, integer)?;
            s.read("weekly", &mut k.weekly, integer)?;
            s.read("monthly", &mut k.monthly, integer)?;
        }
        Ok(group)
    }

    /// Opens a table after checking that every key in it is one of `known`.
    fn section<'n>(&mut self, it: &Item<'n>, known: &[&str]) -> Result<Section<'n>, Located> {
        let Value::Table(entries) = &it.node.value else {
            return Err(it.type_error("a table"));
        };
        for (key, node) in entries {
            let item = entry(&it.key, it.at, key, node);
            if !known.contains(&key.name.as_str()) {
                let mut message = "unknown key".to_string();
                if let Some(close) = known.iter().find(|k| edit_distance(k, &key.name) <= 2) {
                    message += &format!(" (did you mean \"{close}\"?)");
                }
                message += &format!("; expected one of: {}", known.join(", "));
                let at = key.span.as_ref().map_or(item.at, |s| s.start);
                return Err(Located {
                    at,
                    key: item.key,
                    message,
                });
            }
            self.positions.insert(item.key, item.at);
        }
        Ok(Section {
            key: it.key.clone(),
            at: it.at,
            entries,
        })
    }

    /// The elements of an array, keyed `key[i]`.
    fn elements<'n>(&mut self, it: &Item<'n>) -> Result<Vec<Item<'n>>, Located> {
        let Value::Array(nodes) = &it.node.value else {
            return Err(it.type_error("an array"));
        };
        let mut items = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            let key = format!("{}[{i}]", it.key);
            let at = node.span.as_ref().map_or(it.at, |s| s.start);
            self.positions.insert(key.clone(), at);
            items.push(Item { key, at, node });
        }
        Ok(items)
    }
}

/// A path; a relative one is taken relative to the directory of the config file `origin`.
fn resolve(origin: &Path, it: &Item) -> Result<PathBuf, Located> {
    let path = Path::new(string(it)?);
    if path.as_os_str().is_empty() {
        return Err(it.error("must not be empty".into()));
    }
    let dir = origin.parent().unwrap_or(Path::new(""));
    std::path::absolute(dir.join(path))
        .map_err(|e| it.error(format!("cannot resolve relative path: {e}")))
}

impl Item<'_> {
    fn error(&self, message: String) -> Located {
        let key = self.key.clone();
        Located {
            at: self.at,
            key,
            message,
        }
    }

    fn type_error(&self, expected: &str) -> Located {
        let found = match &self.node.value {
            Value::String(s) => format!("string \"{s}\""),
            Value::Integer(i) => format!("integer {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Boolean(b) => format!("boolean {b}"),
            Value::Datetime => "a datetime".into(),
            Value::Array(_) => "an array".into(),
            Value::Table(_) => "a table".into(),
        };
        self.error(format!("expected {expected}, found {found}"))
    }
}

fn string<'n>(it: &Item<'n>) -> Result<&'n str, Located> {
    match &it.node.value {
        Value::String(s) => Ok(s),
        _ => Err(it.type_error("a string")),
    }
}

fn boolean(it: &Item) -> Result<bool, Located> {
    match it.node.value {
        Value::Boolean(b) => Ok(b),
        _ => Err(it.type_error("true or false")),
    }
}

fn integer<T: TryFrom<i64>>(it: &Item) -> Result<T, Located> {
    match it.node.value {
        Value::Integer(i) => T::try_from(i).map_err(|_| it.error(format!("{i} is out of range"))),
        _ => Err(it.type_error("an integer")),
    }
}

fn float(it: &Item) -> Result<f64, Located> {
    match it.node.value {
        Value::Float(f) => Ok(f),
        // Whole numbers are written without a point often enough to accept them.
        Value::Integer(i) => Ok(i as f64),
        _ => Err(it.type_error("a number")),
    }
}

// Sizes and durations are strings, so the unit is always explicit.
fn size(it: &Item) -> Result<u64, Located> {
    parsed(it, "a size string such as \"64KiB\"", parse_size)
}

fn duration(it: &Item) -> Result<Duration, Located> {
    parsed(it, "a duration string such as \"10s\"", parse_duration)
}

fn parsed<T>(
    it: &Item,
    expected: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, Located> {
    match &it.node.value {
        Value::String(s) => parse(s).map_err(|message| it.error(message)),
        _ => Err(it.type_error(expected)),
    }
}

/// Levenshtein distance, for "did you mean" on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../conf/grainfs.toml");

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
            schedule: Some(Schedule::Every(Duration::from_secs(900))),
            keep: KeepConfig {
                last: 4,
                hourly: 24,
                daily: 7,
                weekly: 4,
                monthly: 6,
            },
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
    fn snapshot_setuid_is_off_unless_set() {
        assert!(!Config::default().snapshot_setuid);
        let c = parse("snapshot_setuid = true\n").expect("parse");
        assert!(c.snapshot_setuid);
    }

    #[test]
    fn empty_text_gives_the_embedded_defaults() {
        assert_eq!(parse("").ok(), Some(Config::default()));
        assert_eq!(Config::default().validate().map_err(|v| v.key), Ok(()));
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

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096", 4096),
            ("0", 0),
            ("12B", 12),
            ("64KiB", 64 << 10),
            ("64K", 64 << 10),
            ("1MiB", 1 << 20),
            (" 2 MiB ", 2 << 20),
            ("1GiB", 1 << 30),
            ("3G", 3 << 30),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for text in [
            "", "KiB", "-1", "1.5MiB", "64KB", "1MB", "64kib", "1PiB", "64 KiBs",
        ] {
            assert!(parse_size(text).is_err(), "{text} should be rejected");
        }
        assert!(parse_size("99999999999TiB").is_err_and(|e| e.contains("too large")));
        assert!(parse_size("1MB").is_err_and(|e| e.contains("ambiguous")));
    }

    #[test]
    fn durations() {
        let s = Duration::from_secs;
        for (text, expected) in [
            ("10s", s(10)),
            ("0s", s(0)),
            ("500ms", Duration::from_millis(500)),
            ("15m", s(900)),
            ("1h", s(3600)),
            ("1h30m", s(5400)),
            ("2d", s(172_800)),
            ("1m30s250ms", Duration::from_millis(90_250)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            "10",
            "s",
            "1.5h",
            "10sec",
            "30m1h",
            "1h1h",
            "-1s",
            "1 h",
            "99999999999999d",
        ] {
            assert!(parse_duration(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn schedules() {
        let every = "every 1h30m".parse::<Schedule>();
        assert_eq!(every, Ok(Schedule::Every(Duration::from_secs(5400))));
        for cron in [
            "*/15 * * * *",
            "0 3 * * *",
            "0,30 8-18 * * 1-5",
            "5 0 1 1,4,7,10 *",
            "59 23 31 12 7",
            "0  */6  *  *  0",
        ] {
            let parsed = cron.parse::<Schedule>();
            assert!(
                matches!(parsed, Ok(Schedule::Cron(_))),
                "{cron}: {parsed:?}"
            );
        }
        for bad in [
            "every",
            "every 15",
            "hourly",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "10-5 * * * *",
            "1,,2 * * * *",
            "a * * * *",
            "-1 * * * *",
            "*/ * * * *",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn any_text_gives_a_config_or_a_located_error(text in "[ -~\n]{0,200}") {
            if let Err(ConfigError::Invalid { line, column, .. }) = parse(&text) {
                prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
                prop_assert!(column >= 1);
            }
        }

        #[test]
        fn sizes_round_trip(n in 0u64..(1 << 40)) {
            prop_assert_eq!(parse_size(&fmt_size(n)), Ok(n));
        }
    }
}
