//! Ground floor: the typed ids every layer shares (volumes, geometry, snapshot names, block
//! indexes). It depends on nothing of grainfs and does no I/O; a value that exists here has
//! been checked once, at the edge where it came in.

use serde::{Deserialize, Serialize};

/// The name of the read-only snapshot view in the mount root.
pub const SNAPDIR_NAME: &str = ".snapshots";

/// Identity of a volume: its backing inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{}", self.dev, self.ino)
    }
}

/// Block and partition sizes (powers of two; a partition is a whole number of blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub block_size: u64,
    pub partition_size: u64,
}

impl Geometry {
    pub fn block_shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }

    /// Blocks per partition.
    pub fn blocks_per_partition(&self) -> u64 {
        self.partition_size / self.block_size
    }

    /// Number of blocks covering `size` bytes.
    pub fn blocks(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }

    /// Number of partitions covering `size` bytes.
    pub fn partitions(&self, size: u64) -> u64 {
        size.div_ceil(self.partition_size)
    }
}

/// The index of a block in a volume (byte offset / block size): never a byte offset. Used
/// where the two meet (a block stored from an offset of the volume's fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockIdx(pub u64);

impl std::fmt::Display for BlockIdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Geometry {
    /// The byte offset where block `b` starts (saturating: a block past any volume's end).
    pub fn block_start(&self, b: BlockIdx) -> u64 {
        b.0.saturating_mul(self.block_size)
    }
}

/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 128;

/// Why a string is not a snapshot name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot name {name:?}: {why} (use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.')")]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

/// The name of a snapshot: `[A-Za-z0-9._-]{1,128}`, not starting with '.' (dot names are the
/// store's own: temp dirs of builds and deletions), so it is always one plain path component.
/// Parsed once where a name comes in (the CLI, the control socket, a lookup in the snapshot
/// view); one that exists is valid, and deserialising one checks it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotName(String);

impl SnapshotName {
    /// Check `name` and make it a `SnapshotName`.
    pub fn parse(name: &str) -> Result<SnapshotName, NameError> {
        Self::check(name)?;
        Ok(SnapshotName(name.to_string()))
    }

    fn check(name: &str) -> Result<(), NameError> {
        let bad = |why| {
            Err(NameError {
                name: name.to_string(),
                why,
            })
        };
        if name.is_empty() {
            return bad("empty");
        }
        if name.len() > MAX_SNAPSHOT_NAME {
            return bad("longer than 128 characters");
        }
        if name.starts_with('.') {
            return bad("starts with '.'");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return bad("has a character other than A-Z a-z 0-9 . _ -");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SnapshotName {
    type Error = NameError;
    fn try_from(name: String) -> Result<SnapshotName, NameError> {
        Self::check(&name)?;
        Ok(SnapshotName(name))
    }
}

impl From<SnapshotName> for String {
    fn from(n: SnapshotName) -> String {
        n.0
    }
}

impl std::str::FromStr for SnapshotName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<SnapshotName, NameError> {
        SnapshotName::parse(s)
    }
}

impl std::ops::Deref for SnapshotName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SnapshotName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for SnapshotName {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl std::borrow::Borrow<str> for SnapshotName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SnapshotName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SnapshotName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for SnapshotName {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl std::fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_follow_the_rules() {
        for ok in ["a", "vms-2024-01-01T00.00.00Z", "x_y.z", &"a".repeat(128)] {
            assert_eq!(SnapshotName::parse(ok).unwrap().as_str(), ok);
        }
        for (bad, why) in [
            ("", "empty"),
            (".tmp-a", "starts with '.'"),
            (".", "starts with '.'"),
            ("..", "starts with '.'"),
            ("a/b", "has a character other than A-Z a-z 0-9 . _ -"),
            ("a b", "has a character other than A-Z a-z 0-9 . _ -"),
            ("é", "has a character other than A-Z a-z 0-9 . _ -"),
            (&"a".repeat(129), "longer than 128 characters"),
        ] {
            assert_eq!(SnapshotName::parse(bad).unwrap_err().why, why, "{bad:?}");
        }
    }

    #[test]
    fn deserialising_a_snapshot_name_checks_it_and_says_what_is_wrong() {
        let n: SnapshotName = serde_json::from_str(r#""nightly-1""#).unwrap();
        assert_eq!(n, "nightly-1");
        assert_eq!(serde_json::to_string(&n).unwrap(), r#""nightly-1""#);
        let e = serde_json::from_str::<SnapshotName>(r#""../etc""#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid snapshot name \"../etc\": starts with '.'"),
            "{e}"
        );
    }
}
