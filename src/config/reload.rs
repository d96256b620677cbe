//! Reloading the config of a running mount: groups (their schedules, keep and policy),
//! `[policy]`, timezone, max_store_bytes and log_level may change; the keys the mount, the store
//! or the tracker were built from may not, and a reload that changes one is refused naming the
//! key and its line in the new file, in the form of every other config error. This module
//! compares two configs; it never applies one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::file::{ConfigFile, Field};
use super::values::{fmt_duration, fmt_size};
use super::{line_column, Config, ConfigError, SnapDir};

/// Where a config file sets each key that needs a remount (line and column, 1-based), and the
/// file's name, so that a refused reload points at the line to undo. Any two are equal: where a
/// key is written does not change what a config says.
#[derive(Debug, Clone, Default)]
pub struct KeySpans {
    origin: PathBuf,
    at: BTreeMap<&'static str, (usize, usize)>,
}

impl PartialEq for KeySpans {
    fn eq(&self, _: &KeySpans) -> bool {
        true
    }
}

impl KeySpans {
    /// The places in `text` (read into `file`) of the keys [`remount_keys`] lists.
    pub(super) fn of(file: &ConfigFile, origin: &Path, text: &str) -> KeySpans {
        fn at<T>(field: &Option<Field<T>>) -> Option<usize> {
            field.as_ref().map(Field::at)
        }
        let (cache, tracking) = (&file.cache.0, &file.tracking.0);
        let offsets = [
            ("backing", at(&file.backing)),
            ("mountpoint", at(&file.mountpoint)),
            ("store", at(&file.store)),
            ("threads", at(&file.threads)),
            ("snapdir", at(&file.snapdir)),
            ("snapshot_setuid", at(&file.snapshot_setuid)),
            ("allow_other", at(&file.allow_other)),
            ("cache.attr_timeout", at(&cache.attr_timeout)),
            ("cache.entry_timeout", at(&cache.entry_timeout)),
            ("fuse.writeback_cache", at(&file.fuse.0.writeback_cache)),
            ("fuse.transport", at(&file.fuse.0.transport)),
            ("tracking.enabled", at(&tracking.enabled)),
            ("tracking.block_size", at(&tracking.block_size)),
            ("tracking.partition_size", at(&tracking.partition_size)),
            ("tracking.interval", at(&tracking.interval)),
        ];
        let at = offsets
            .into_iter()
            .filter_map(|(key, offset)| offset.map(|o| (key, line_column(text, o))))
            .collect();
        KeySpans {
            origin: origin.to_path_buf(),
            at,
        }
    }
}

/// The keys that need a remount, each with its value as a message shows it. The tracking tick
/// is among them: the tracker is started with it and does not take another while running.
fn remount_keys(c: &Config) -> [(&'static str, String); 15] {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("unset".into(), |p| format!("\"{}\"", p.display()))
    };
    let snapdir = match c.snapdir {
        SnapDir::Hidden => "\"hidden\"",
        SnapDir::Visible => "\"visible\"",
    };
    let allow_other = c.allow_other.map_or("unset".into(), |b| b.to_string());
    let (cache, tracking) = (&c.cache, &c.tracking);
    [
        ("backing", path(&c.backing)),
        ("mountpoint", path(&c.mountpoint)),
        ("store", path(&c.store)),
        ("threads", c.threads.to_string()),
        ("snapdir", snapdir.into()),
        ("snapshot_setuid", c.snapshot_setuid.to_string()),
        ("allow_other", allow_other),
        ("cache.attr_timeout", fmt_duration(cache.attr_timeout)),
        ("cache.entry_timeout", fmt_duration(cache.entry_timeout)),
        ("fuse.writeback_cache", c.fuse.writeback_cache.to_string()),
        (
            "fuse.transport",
            format!("\"{}\"", c.fuse.transport.as_str()),
        ),
        ("tracking.enabled", tracking.enabled.to_string()),
        ("tracking.block_size", fmt_size(tracking.block_size)),
        ("tracking.partition_size", fmt_size(tracking.partition_size)),
        ("tracking.interval", fmt_duration(tracking.interval)),
    ]
}

const REMOUNT: &str = "cannot change on reload; unmount and mount again";

impl Config {
    /// Whether a running mount made from `self` may take `new` (read from the file again): groups,
    /// their schedules, keep and policy, `[policy]`, timezone, max_store_bytes and log_level may
    /// change; any other key must keep its value, and the first that does not is named with its
    /// line in the new file (or, when the new file leaves it out, the line it had).
    pub fn check_reload(&self, new: &Config) -> Result<(), ConfigError> {
        let changed = remount_keys(self)
            .into_iter()
            .zip(remount_keys(new))
            .find(|((_, was), (_, now))| was != now);
        let Some(((key, was), (_, now))) = changed else {
            return Ok(());
        };
        let ((line, column), message) = match (new.spans.at.get(key), self.spans.at.get(key)) {
            (Some(&at), _) => (
                at,
                format!("the mount uses {was}, this file says {now}: {REMOUNT}"),
            ),
            (None, Some(&(line, column))) => (
                (line, column),
                format!(
                    "removed (it was {was} at line {line} when mounted; left out it means {now}): \
                     {REMOUNT}"
                ),
            ),
            (None, None) => (
                (1, 1),
                format!("the mount uses {was}, now {now}: {REMOUNT}"),
            ),
        };
        let origin = if new.spans.origin.as_os_str().is_empty() {
            PathBuf::from("(no config file)")
        } else {
            new.spans.origin.clone()
        };
        Err(ConfigError::Invalid {
            origin,
            line,
            column,
            key: key.to_string(),
            message,
        })
    }
}
