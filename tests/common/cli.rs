//! The `grainfs` binary as the tests run it: a command against a mount (or a backing dir
//! offline), a snapshot taken by name, the snapshots listed; and the small geometry the
//! snapshot tests share.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::mount::{grainfs_bin, Mount};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Small blocks and partitions, so that a few MiB span several partitions and a chain mixes
/// FULL and INCREMENTAL ones.
pub const SMALL_GEOMETRY: &str = r#"
[tracking]
block_size = "4KiB"
partition_size = "1MiB"
interval = "1s"
"#;

/// `grainfs ARGS... -m AT` (AT: a mount, or a backing dir for the offline commands).
pub fn grainfs_at(args: &[&str], at: &Path) -> Output {
    Command::new(grainfs_bin())
        .args(args)
        .arg("-m")
        .arg(at)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run grainfs {args:?}: {e}"))
}

/// `grainfs snapshot create --name NAME --json` through mount `m`, which must succeed; its
/// JSON report.
pub fn create_snapshot(m: &Mount, name: &str) -> serde_json::Value {
    let out = grainfs_at(&["snapshot", "create", "--json", "--name", name], m.path());
    assert!(
        out.status.success(),
        "snapshot create {name}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    serde_json::from_slice(&out.stdout).expect("snapshot create --json")
}

/// The names `snapshot list --json` gives for AT, oldest first.
pub fn snapshot_names(at: &Path) -> Vec<String> {
    let out = grainfs_at(&["snapshot", "list", "--json"], at);
    assert!(
        out.status.success(),
        "snapshot list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snapshot list --json");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect()
}

/// Wait (at most 3 minutes) until no snapshot of AT has blocks without a blake3: on a
/// filesystem with reflink (XFS, btrfs) FULL partitions are cloned and hashed after the commit,
/// in the background; elsewhere this returns after one `snapshot verify`. For tests that
/// damage or remove packs and expect the hashes to be there.
pub fn wait_hashed(at: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let out = grainfs_at(&["snapshot", "verify", "--json"], at);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let left: u64 = v
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["unhashed_blocks"].as_u64()).sum())
            .unwrap_or(0);
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} blocks still not hashed after 3 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
