//! Long work seen from the command line: a snapshot's capture reports its progress over the
//! control socket, and Ctrl-C (SIGINT) on `grainfs snapshot create` cancels it: nothing is
//! committed, no temp dir is left, the daemon keeps serving, writers are released and the next
//! snapshot is right.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{blake3_file, grainfs_bin, open_rw, Mount, Noise};
use grainfs::control::{self, Request, Response};
use grainfs::snapshot::CreateRequest;
use std::os::unix::fs::FileExt;

/// Big enough that a FULL capture takes a while (it reads, hashes and copies every byte).
const BIG: u64 = 1 << 30;

fn big_volume(backing: &Path) {
    let chunk = Noise::named("cancel").bytes(1 << 20);
    let f = std::fs::File::create(backing.join("big.img")).unwrap();
    for i in 0..BIG / chunk.len() as u64 {
        let mut c = chunk.clone();
        c[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(&c, i * chunk.len() as u64).unwrap();
    }
}

fn names(m: &Mount) -> Vec<String> {
    common::snapshot_names(m.path())
}

fn temp_dirs(m: &Mount) -> Vec<String> {
    std::fs::read_dir(m.store().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".del-"))
        .collect()
}

#[test]
fn a_capture_reports_its_progress_then_its_snapshot() {
    let m = Mount::with_setup(big_volume, None);
    let mut seen = Vec::new();
    let r = control::request_watching(
        &m.store(),
        &Request::SnapshotCreate(CreateRequest::default()),
        None,
        &mut |p| seen.push(p.clone()),
        None,
    )
    .unwrap();
    let Response::Snapshot(report) = r else {
        panic!("{r:?}\n{}", m.log_text())
    };
    assert!(!seen.is_empty(), "no progress line for a 1 GiB capture");
    let last = seen.last().unwrap();
    assert_eq!(last.phase, "capture");
    assert!(last.total >= BIG / 2 && last.done == last.total, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert_eq!(report.logical_bytes, BIG);
}

#[test]
fn ctrl_c_on_snapshot_create_cancels_the_capture_and_keeps_the_daemon() {
    let m = Mount::with_setup(big_volume, None);
    let live = m.path().join("big.img");
    let mut cancelled = 0;
    for attempt in 0..4 {
        let name = format!("cut{attempt}");
        let mut child = Command::new(grainfs_bin())
            .args(["snapshot", "create", "--full", "--name", &name, "-m"])
            .arg(m.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Mid-capture: the snapshot's temp dir exists.
        let tmp = m.store().join("snapshots").join(format!(".tmp-{name}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !tmp.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // The capture beat the signal: it says so, and the snapshot is whole.
            assert!(names(&m).contains(&name), "{stderr}");
            continue;
        }
        assert!(
            stderr.contains("cancelled by the user") && stderr.contains("Nothing of it was kept"),
            "{stderr}\n{}",
            m.log_text()
        );
        assert!(!names(&m).contains(&name), "a cancelled snapshot is listed");
        assert!(temp_dirs(&m).is_empty(), "left behind: {:?}", temp_dirs(&m));
        cancelled += 1;
        break;
    }
    assert_eq!(
        cancelled,
        1,
        "no attempt was cancelled mid-capture\n{}",
        m.log_text()
    );
    // Writers are released, the daemon serves, and the next snapshot is right.
    let f = open_rw(&live);
    f.write_all_at(b"after the cancel", 12345).unwrap();
    f.sync_all().unwrap();
    let out = Command::new(grainfs_bin())
        .args(["snapshot", "create", "--name", "after", "-m"])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = m.path().join(".snapshots/after/big.img");
    assert_eq!(blake3_file(&snap), blake3_file(&live));
}

#[test]
fn ctrl_c_on_rollback_during_its_safety_snapshot_changes_nothing() {
    let m = Mount::with_setup(big_volume, None);
    let live = m.path().join("big.img");
    let out = Command::new(grainfs_bin())
        .args(["snapshot", "create", "--name", "s0", "-m"])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cancelled = false;
    for attempt in 0..3 {
        // Every block changes: the safety snapshot has the whole volume to capture.
        let chunk = Noise::named(format!("after {attempt}")).bytes(1 << 20);
        let f = open_rw(&live);
        for i in 0..BIG / chunk.len() as u64 {
            f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
        }
        drop(f);
        let before = blake3_file(&live);
        let listed = names(&m);
        let mut child = Command::new(grainfs_bin())
            .args(["rollback", "s0", "-m"])
            .arg(m.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while temp_dirs(&m).is_empty()
            && Instant::now() < deadline
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // It beat the signal: the rollback is whole.
            assert_eq!(
                blake3_file(&live),
                blake3_file(&m.path().join(".snapshots/s0/big.img"))
            );
            continue;
        }
        assert!(
            stderr.contains("cancelled by the user") && stderr.contains("nothing was changed"),
            "{stderr}\n{}",
            m.log_text()
        );
        assert_eq!(
            blake3_file(&live),
            before,
            "a cancelled rollback changed the volume"
        );
        assert_eq!(names(&m), listed, "a cancelled safety snapshot is listed");
        assert!(temp_dirs(&m).is_empty(), "left behind: {:?}", temp_dirs(&m));
        cancelled = true;
        break;
    }
    assert!(
        cancelled,
        "no attempt was cancelled before its writes\n{}",
        m.log_text()
    );
    // The daemon serves on, and the rollback runs to its end when let be.
    let out = Command::new(grainfs_bin())
        .args(["rollback", "s0", "--no-safety-snapshot", "-m"])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        blake3_file(&live),
        blake3_file(&m.path().join(".snapshots/s0/big.img"))
    );
}
