//! The config file as serde reads it: one struct per table, every key optional, unknown keys
//! refused, each value kept with its byte span so that the rules in `super` can point at it.
//! A decoding error comes out as a [`Located`]: the dotted key (`group[1].keep.daily`, tracked
//! by serde_path_to_error), the byte offset (toml's span) and a message in grainfs's words.
//! This module applies no defaults and no rules beyond a value's type and syntax.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;
use serde_spanned::__unstable as spanned;
use toml::{Spanned, Value};

use super::values::{parse_duration, parse_size};
use super::{Schedule, SnapDir, Transport};

/// The whole file; a table left out reads as empty.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct ConfigFile {
    pub backing: Option<Field<String>>,
    pub mountpoint: Option<Field<String>>,
    pub store: Option<Field<String>>,
    pub threads: Option<Field<usize>>,
    pub snapdir: Option<Field<SnapDir>>,
    pub snapshot_setuid: Option<Field<bool>>,
    pub allow_other: Option<Field<bool>>,
    pub log_level: Option<Field<String>>,
    pub timezone: Option<Field<String>>,
    pub max_store_bytes: Option<Field<Size>>,
    pub cache: Table<CacheFile>,
    pub fuse: Table<FuseFile>,
    pub tracking: Table<TrackingFile>,
    pub policy: Table<PolicyFile>,
    pub group: Groups,
}

/// `[cache]`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct CacheFile {
    pub attr_timeout: Option<Field<Duration>>,
    pub entry_timeout: Option<Field<Duration>>,
}

/// `[fuse]`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FuseFile {
    pub writeback_cache: Option<Field<bool>>,
    pub transport: Option<Field<Transport>>,
}

/// `[tracking]`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct TrackingFile {
    pub enabled: Option<Field<bool>>,
    pub block_size: Option<Field<Size>>,
    pub partition_size: Option<Field<Size>>,
    pub interval: Option<Field<Duration>>,
}

/// `[policy]`, and a group's `policy` (its overrides of `[policy]`).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub full_rate: Option<Field<f64>>,
    pub full_dirty_fraction: Option<Field<f64>>,
    pub max_chain: Option<Field<u32>>,
}

/// One `[[group]]`; `name` and `volumes` are required, which `super` reports with the group's
/// position.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupFile {
    pub name: Option<Field<String>>,
    pub volumes: Option<Globs>,
    pub schedule: Option<Field<Schedule>>,
    #[serde(default)]
    pub keep: Table<KeepFile>,
    #[serde(default)]
    pub policy: Table<PolicyFile>,
}

/// A group's `keep`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct KeepFile {
    pub last: Option<Field<u32>>,
    pub hourly: Option<Field<u32>>,
    pub daily: Option<Field<u32>>,
    pub weekly: Option<Field<u32>>,
    pub monthly: Option<Field<u32>>,
    pub yearly: Option<Field<u32>>,
    pub within: Option<Field<Duration>>,
}

/// A TOML table read into `T`. serde's derived structs would also take an array of their
/// fields in order, which a config must not: `policy = [1]` is a mistake, not `full_rate = 1`.
#[derive(Default)]
pub(super) struct Table<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Table<T>, D::Error> {
        struct TableVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
            type Value = Table<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        d.deserialize_map(TableVisitor(PhantomData))
    }
}

/// The `[[group]]` tables. A visitor of its own, so that `[group]` (a table) is answered with
/// the `[[group]]` spelling.
#[derive(Default)]
pub(super) struct Groups(pub Vec<Spanned<Table<GroupFile>>>);

impl<'de> Deserialize<'de> for Groups {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Groups, D::Error> {
        struct GroupsVisitor;
        impl<'de> Visitor<'de> for GroupsVisitor {
            type Value = Groups;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of tables ([[group]])")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Groups, A::Error> {
                let mut groups = Vec::new();
                while let Some(group) = seq.next_element()? {
                    groups.push(group);
                }
                Ok(Groups(groups))
            }
        }
        d.deserialize_seq(GroupsVisitor)
    }
}

/// A group's `volumes`: at least one glob, each with its span.
pub(super) struct Globs(pub Vec<Field<String>>);

impl<'de> Deserialize<'de> for Globs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Globs, D::Error> {
        struct GlobsVisitor;
        impl<'de> Visitor<'de> for GlobsVisitor {
            type Value = Globs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Globs, A::Error> {
                let mut globs = Vec::new();
                while let Some(glob) = seq.next_element()? {
                    globs.push(glob);
                }
                if globs.is_empty() {
                    return Err(de::Error::custom("needs at least one volume glob"));
                }
                Ok(Globs(globs))
            }
        }
        d.deserialize_seq(GlobsVisitor)
    }
}

/// A size in bytes, written as a string with its unit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Size(pub u64);

/// A value from the file, or why it is not a `T`, and the bytes of the file it was read from.
/// A wrong type is told when the value is used (`super::build`), where its key is known, so
/// the error points at the value itself even inside an array.
pub(super) struct Field<T> {
    value: Result<T, String>,
    span: Range<usize>,
}

impl<T> Field<T> {
    /// Byte offset of the value in the file.
    pub fn at(&self) -> usize {
        self.span.start
    }

    /// The value if it has the right type and `rule` accepts it, else an error at the value.
    pub fn check(
        self,
        key: &str,
        rule: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, Located> {
        self.then(key, |v| rule(&v).map(|()| v))
    }

    /// `convert` applied to the value if it has the right type; its error is located at the value.
    pub fn then<U>(
        self,
        key: &str,
        convert: impl FnOnce(T) -> Result<U, String>,
    ) -> Result<U, Located> {
        self.value.and_then(convert).map_err(|message| Located {
            at: self.span.start,
            key: key.to_string(),
            message,
        })
    }
}

impl<'de, T: Scalar> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field<T>, D::Error> {
        let fields = &[
            spanned::START_FIELD,
            spanned::END_FIELD,
            spanned::VALUE_FIELD,
        ];
        d.deserialize_struct(spanned::NAME, fields, FieldVisitor(PhantomData))
    }
}

/// Reads a value through toml's span protocol, that of `toml::Spanned`: a value comes as the
/// map {start, end, value}. A table made by a dotted key (`threads.x = 1`) has no span and
/// comes as itself, which `toml::Spanned` would report in the protocol's terms; here it is the
/// wrong type it is.
struct FieldVisitor<T>(PhantomData<T>);

impl<'de, T: Scalar> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<T>, A::Error> {
        if map.next_key::<String>()?.as_deref() != Some(spanned::START_FIELD) {
            let message = format!("expected {}, found a table", T::EXPECTED);
            return Err(de::Error::custom(message));
        }
        let start = map.next_value()?;
        map.next_key::<IgnoredAny>()?;
        let end = map.next_value()?;
        map.next_key::<IgnoredAny>()?;
        let value: Value = map.next_value()?;
        let value = T::decode(&value).unwrap_or_else(|| {
            Err(format!(
                "expected {}, found {}",
                T::EXPECTED,
                describe(&value)
            ))
        });
        Ok(Field {
            value,
            span: start..end,
        })
    }
}

/// A value type of the file: how errors name it, and how it is read from a TOML value; `decode`
/// gives `None` for a value of the wrong type and an error message for a bad one.
pub(super) trait Scalar: Sized {
    const EXPECTED: &'static str;
    fn decode(value: &Value) -> Option<Result<Self, String>>;
}

macro_rules! scalars {
    ($($t:ty: $expected:literal, |$v:ident| $decode:expr;)*) => {$(
        impl Scalar for $t {
            const EXPECTED: &'static str = $expected;
            fn decode($v: &Value) -> Option<Result<$t, String>> {
                $decode
            }
        }
    )*};
}

// Whole numbers are written without a point often enough to accept them as floats. Sizes and
// durations are strings, so the unit is always explicit.
scalars! {
    bool: "true or false", |v| v.as_bool().map(Ok);
    String: "a string", |v| v.as_str().map(|s| Ok(s.to_string()));
    f64: "a number", |v| v.as_float().or(v.as_integer().map(|i| i as f64)).map(Ok);
    u32: "an integer", |v| v.as_integer().map(|i| i.try_into().map_err(|_| out_of_range(i)));
    usize: "an integer", |v| v.as_integer().map(|i| i.try_into().map_err(|_| out_of_range(i)));
    Size: "a size string such as \"64KiB\"", |v| v.as_str().map(|s| parse_size(s).map(Size));
    Duration: "a duration string such as \"10s\"", |v| v.as_str().map(parse_duration);
    Schedule: "a string such as \"every 15m\"", |v| v.as_str().map(str::parse);
    SnapDir: "a string", |v| v.as_str().map(|s| match s {
        "hidden" => Ok(SnapDir::Hidden),
        "visible" => Ok(SnapDir::Visible),
        other => Err(format!("\"{other}\" is not hidden or visible")),
    });
    Transport: "a string", |v| v.as_str().map(|s| match s {
        "auto" => Ok(Transport::Auto),
        "io_uring" => Ok(Transport::IoUring),
        "dev" => Ok(Transport::Dev),
        other => Err(format!("\"{other}\" is not auto, io_uring or dev")),
    });
}

fn out_of_range(i: i64) -> String {
    format!("{i} is out of range")
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(_) => "a datetime".into(),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}

/// An error at byte offset `at` of the file, about the dotted `key` (empty when there is none).
pub(super) struct Located {
    pub at: usize,
    pub key: String,
    pub message: String,
}

/// Reads `text` into a [`ConfigFile`], checking syntax, keys and the type of every value.
pub(super) fn read(text: &str) -> Result<ConfigFile, Located> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let at = e.inner().span().map_or(0, |s| s.start);
        let message = e.inner().message().trim().replace('\n', "; ");
        match dotted(e.path()) {
            // Pure syntax errors happen before serde walks any key; the text tells the key.
            key if key.is_empty() => Located {
                at,
                key: key_at(text, at),
                message,
            },
            key => Located {
                at,
                message: reword(message),
                key,
            },
        }
    })
}

/// `group[1].keep`, from serde_path_to_error's path; the fields of toml's span protocol
/// (`$__serde_spanned_private_value`) are no keys of the file.
fn dotted(path: &serde_path_to_error::Path) -> String {
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key += &format!("[{index}]"),
            Segment::Map { key: name } if !name.starts_with("$__") => {
                if !key.is_empty() {
                    key.push('.');
                }
                key += name;
            }
            _ => {}
        }
    }
    key
}

/// serde's words for an unknown key and a wrong type ("unknown field `x`, expected one of `a`,
/// `b`"; "invalid type: map, expected a table"), put the way the rest of the config errors are.
/// Text that is not one of those two comes back as it is.
fn reword(message: String) -> String {
    // toml hands a datetime over as a map with one key of its own.
    if message.starts_with("unknown field `$__toml_private_datetime`") {
        return "expected a table, found a datetime".into();
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest
            .split_once("`, expected ")
            .unwrap_or((rest.trim_end_matches("`, there are no fields"), ""));
        // serde quotes each expected name in backticks: "one of `a`, `b`" or "`a` or `b`".
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let mut reworded = "unknown key".to_string();
        if let Some(close) = known.iter().find(|k| edit_distance(k, name) <= 2) {
            reworded += &format!(" (did you mean \"{close}\"?)");
        }
        return reworded + &format!("; expected one of: {}", known.join(", "));
    }
    if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    {
        let found = match found {
            "map" => "a table".to_string(),
            "sequence" => "an array".to_string(),
            // "integer `5`", "floating point `1.5`": the other errors say "integer 5", "float 1.5".
            other => other.replace("floating point", "float").replace('`', ""),
        };
        return format!("expected {expected}, found {found}");
    }
    message
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
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
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
