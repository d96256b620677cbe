//! `grainfs snapshot show NAME`: what one snapshot's manifest records (group, instant, parent,
//! holds; per volume its path, size, kind and stored bytes; per partition its kind, chain depth
//! and the policy's reason), as text or as a stable JSON object. It reads the manifest and the
//! holds record only, with or without a daemon: never a block table or a pack.

use serde::Serialize;

use super::super::status::human;
use super::list::tags_of;
use super::table::{Align, Table};
use super::{locate, open_store, parse_name, print_json, store_error, CliError, Where};
use crate::store::{Manifest, PartitionKind, SnapshotInfo};
use crate::sys::now_ns;

/// `snapshot show --json`: these fields and names stay stable for scripts.
#[derive(Debug, Serialize)]
pub(super) struct Shown {
    pub name: String,
    pub group: String,
    /// The snapshot's instant, Unix ns.
    pub created_ns: u64,
    /// The same instant in the local time zone, RFC 3339.
    pub created: String,
    pub parent: Option<String>,
    /// Hold tags, sorted (empty: not held).
    pub holds: Vec<String>,
    /// Block data this snapshot itself stores.
    pub stored_bytes: u64,
    /// Sum of its volumes' sizes.
    pub logical_bytes: u64,
    pub volumes: Vec<ShownVolume>,
}

/// One volume of `snapshot show --json`.
#[derive(Debug, Serialize)]
pub(super) struct ShownVolume {
    pub path: String,
    pub size: u64,
    /// FULL, INCREMENTAL or HYBRID.
    pub kind: String,
    pub stored_bytes: u64,
    /// Block records in its table (stored blocks and blocks that became zeros).
    pub records: u64,
    pub partitions: Vec<ShownPartition>,
}

/// One partition of `snapshot show --json`.
#[derive(Debug, Serialize)]
pub(super) struct ShownPartition {
    pub index: u64,
    /// FULL or INCREMENTAL.
    pub kind: String,
    /// Snapshots a read of it may visit (1: stored FULL here).
    pub depth: u32,
    pub reason: String,
}

pub(super) fn run(name: &str, json: bool, at: &Where) -> Result<(), CliError> {
    let name = parse_name(name)?;
    let (_, _, store) = locate(at)?;
    let store = open_store(&store)?;
    let m = store.manifest(&name).map_err(store_error)?;
    let holds = tags_of(&store.holds().map_err(store_error)?, name.as_str());
    let shown = shown(&m, holds);
    if json {
        print_json(&shown)
    } else {
        print!("{}", text(&shown, now_ns()));
        Ok(())
    }
}

/// What `show` prints, from a manifest and the snapshot's hold tags.
pub(super) fn shown(m: &Manifest, holds: Vec<String>) -> Shown {
    let info = SnapshotInfo::of(m);
    let volumes = m
        .volumes
        .iter()
        .zip(&info.volumes)
        .map(|(v, i)| ShownVolume {
            path: v.path.clone(),
            size: v.size,
            kind: i.kind.to_string(),
            stored_bytes: v.stored_bytes,
            records: v.records,
            partitions: v
                .partitions
                .iter()
                .map(|p| ShownPartition {
                    index: p.index,
                    kind: match p.kind {
                        PartitionKind::Full => "FULL",
                        PartitionKind::Incremental => "INCREMENTAL",
                    }
                    .into(),
                    depth: p.depth,
                    reason: p.reason.clone(),
                })
                .collect(),
        })
        .collect();
    Shown {
        name: m.name.clone(),
        group: m.group.clone(),
        created_ns: m.created_ns,
        created: local_time(m.created_ns, "%Y-%m-%dT%H:%M:%S%:z"),
        parent: m.parent.clone(),
        holds,
        stored_bytes: info.stored_bytes,
        logical_bytes: info.logical_bytes,
        volumes,
    }
}

/// `ns` (Unix) in the local time zone, formatted with `strftime` directives.
fn local_time(ns: u64, format: &str) -> String {
    match jiff::Timestamp::from_nanosecond(ns as i128) {
        Ok(t) => t
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime(format)
            .to_string(),
        Err(_) => format!("{ns} ns after the epoch"),
    }
}

/// How long ago, roughly: `40 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

/// `show` as text, at `now_ns`.
fn text(s: &Shown, now_ns: u64) -> String {
    let when = if now_ns >= s.created_ns {
        format!("{} ago", age((now_ns - s.created_ns) / 1_000_000_000))
    } else {
        "in the future: check the clock".into()
    };
    let mut out = format!("snapshot {}\n", s.name);
    let mut field = |k: &str, v: String| out.push_str(&format!("  {k:<8} {v}\n"));
    field("group", s.group.clone());
    field(
        "created",
        format!(
            "{} ({when})",
            local_time(s.created_ns, "%Y-%m-%d %H:%M:%S %Z")
        ),
    );
    field("parent", s.parent.clone().unwrap_or_else(|| "none".into()));
    field(
        "holds",
        if s.holds.is_empty() {
            "none".into()
        } else {
            s.holds.join(", ")
        },
    );
    field(
        "stored",
        format!(
            "{} for {} logical in {} volume(s)",
            human(s.stored_bytes),
            human(s.logical_bytes),
            s.volumes.len()
        ),
    );
    for v in &s.volumes {
        out.push_str(&format!(
            "\nvolume {}: {}, {}, {} stored in {} record(s)\n",
            v.path,
            human(v.size),
            v.kind,
            human(v.stored_bytes),
            v.records
        ));
        let mut t = Table::new(&[
            ("  PART", Align::Right),
            ("KIND", Align::Left),
            ("DEPTH", Align::Right),
            ("REASON", Align::Left),
        ]);
        for p in &v.partitions {
            t.row(vec![
                p.index.to_string(),
                p.kind.clone(),
                p.depth.to_string(),
                p.reason.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_a_person_says_them() {
        assert_eq!(age(5), "5 s");
        assert_eq!(age(12 * 60 + 5), "12 min");
        assert_eq!(age(3 * 3600 + 5 * 60), "3 h 5 min");
        assert_eq!(age(2 * 86400 + 4 * 3600 + 1), "2 d 4 h");
    }
}
