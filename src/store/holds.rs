//! Holds: tags that pin a snapshot, as `zfs hold` does. A held snapshot is never pruned and
//! cannot be deleted until every tag on it is released. Holds are one store-wide record
//! (`holds.json`, format [`HOLDS_FORMAT`]) beside the snapshots, never inside one: a snapshot
//! stays immutable, and a child rewritten by delete with merge keeps its holds by name. This
//! module reads and writes that record only; it never deletes a snapshot.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::error::{Result, StoreError};
use crate::ids::SnapshotName;

/// The record's name in the store.
pub const HOLDS: &str = "holds.json";
/// Format of the holds record.
pub const HOLDS_FORMAT: u32 = 1;
/// The tag `snapshot hold` uses when none is given.
pub const DEFAULT_TAG: &str = "keep";

/// Tags per snapshot name.
pub type Holds = BTreeMap<String, BTreeSet<String>>;

#[derive(Serialize, Deserialize)]
struct Record {
    format: u32,
    holds: Holds,
}

/// Check a hold tag: 1 to 64 printable characters, no whitespace.
pub fn check_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.len() > 64 || tag.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(StoreError::Refused(format!(
            "hold tag {tag:?}: use 1 to 64 printable characters without spaces"
        )));
    }
    Ok(())
}

/// Every hold in the store (none if the record was never written).
pub fn load(b: &dyn Backend) -> Result<Holds> {
    let r: Option<Record> = super::format::load_record(b, HOLDS, HOLDS_FORMAT)?;
    Ok(r.map(|r| r.holds).unwrap_or_default())
}

/// Write `holds` whole, durably, dropping snapshots without tags.
pub fn save(b: &dyn Backend, mut holds: Holds) -> Result<()> {
    holds.retain(|_, tags| !tags.is_empty());
    let bytes = serde_json::to_vec_pretty(&Record {
        format: HOLDS_FORMAT,
        holds,
    })
    .map_err(|e| StoreError::Misuse(format!("encoding holds: {e}")))?;
    b.write_record(HOLDS, &bytes)
}

/// Put hold `tag` on snapshot `name` (which must exist). Returns false if it was already
/// there.
pub fn hold(b: &dyn Backend, name: &SnapshotName, tag: &str) -> Result<bool> {
    check_tag(tag)?;
    if !b.exists(name)? {
        return Err(StoreError::NotFound(name.to_string()));
    }
    let mut holds = load(b)?;
    let added = holds
        .entry(name.to_string())
        .or_default()
        .insert(tag.to_string());
    if added {
        save(b, holds)?;
    }
    Ok(added)
}

/// Release hold `tag` (or, with None, every hold) on snapshot `name`; returns the tags
/// released. Releasing a tag that is not there is an error naming the tags that are.
pub fn release(b: &dyn Backend, name: &SnapshotName, tag: Option<&str>) -> Result<Vec<String>> {
    let mut holds = load(b)?;
    let had: Vec<String> = holds
        .get(name.as_str())
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    let released = match tag {
        None if !had.is_empty() => {
            holds.remove(name.as_str());
            had
        }
        Some(t) if had.iter().any(|h| h == t) => {
            if let Some(tags) = holds.get_mut(name.as_str()) {
                tags.remove(t);
            }
            vec![t.to_string()]
        }
        None => {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} has no hold"
            )))
        }
        Some(t) if had.is_empty() => {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} has no hold {t:?}"
            )))
        }
        Some(t) => {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} has no hold {t:?} (it has {had:?})"
            )))
        }
    };
    save(b, holds)?;
    Ok(released)
}

/// Drop the holds of snapshots no longer in the store (after a delete by hand, say).
pub fn forget_missing(b: &dyn Backend) -> Result<()> {
    let holds = load(b)?;
    let names: BTreeSet<String> = b.names()?.into_iter().collect();
    if holds.keys().all(|k| names.contains(k)) {
        return Ok(());
    }
    save(
        b,
        holds
            .into_iter()
            .filter(|(k, _)| names.contains(k))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::StageMode;
    use crate::store::memory::MemoryStore;

    fn n(s: &str) -> SnapshotName {
        SnapshotName::parse(s).unwrap()
    }

    #[test]
    fn holds_are_kept_per_tag_and_released_by_tag_or_all() {
        let b = MemoryStore::default();
        assert!(matches!(
            hold(&b, &n("a"), "x"),
            Err(StoreError::NotFound(_))
        ));
        b.stage(&n("a"), StageMode::New)
            .unwrap()
            .commit(b"m")
            .unwrap();
        assert!(hold(&b, &n("a"), "x").unwrap());
        assert!(!hold(&b, &n("a"), "x").unwrap());
        assert!(hold(&b, &n("a"), "y").unwrap());
        assert_eq!(load(&b).unwrap()["a"].len(), 2);
        let e = release(&b, &n("a"), Some("z")).unwrap_err().to_string();
        assert!(e.contains("\"z\"") && e.contains("\"x\""), "{e}");
        assert_eq!(
            release(&b, &n("a"), Some("x")).unwrap(),
            vec!["x".to_string()]
        );
        assert_eq!(release(&b, &n("a"), None).unwrap(), vec!["y".to_string()]);
        assert!(load(&b).unwrap().is_empty());
        assert!(release(&b, &n("a"), None).is_err());
        assert!(check_tag("two words").is_err());
    }

    #[test]
    fn the_record_is_durable_and_versioned_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let b = crate::store::local::LocalDir::open(tmp.path()).unwrap();
        b.stage(&n("a"), StageMode::New)
            .unwrap()
            .commit(b"m")
            .unwrap();
        hold(&b, &n("a"), DEFAULT_TAG).unwrap();
        let again = crate::store::local::LocalDir::open(tmp.path()).unwrap();
        assert!(load(&again).unwrap()["a"].contains(DEFAULT_TAG));
        // Not a snapshot.
        assert_eq!(again.names().unwrap(), vec!["a".to_string()]);
        b.remove(&n("a")).unwrap();
        forget_missing(&b).unwrap();
        assert!(load(&b).unwrap().is_empty());
    }
}
