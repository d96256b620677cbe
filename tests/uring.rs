//! FUSE over io_uring (`[fuse] transport = "io_uring"`). A representative part of the real-mount
//! suite runs again over it: the POSIX I/O tests of `posix_io.rs` and the snapshot tests of
//! `snapshots.rs` (the seeded oracle, the two-volume group snapshotted in lockstep, kill -9
//! during a capture, writes racing a capture, sqlite and qcow2 under snapshots), included here
//! as modules so that they are the same tests, not copies: in this binary the fixture mounts
//! with `transport = "io_uring"` (`common::test_transport`). Then what only this transport
//! has: the daemon says it serves over io_uring with ring threads for every CPU, `dev` still
//! serves without them, and unmount, kill -9 and `umount -l` with requests in flight end
//! without hanging. Where the kernel lacks FUSE over io_uring, the tests say so and run over
//! /dev/fuse.

// posix_io.rs and snapshots.rs each declare `mod common;`, as every test file does: included
// here, each gets its own copy of the support modules.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "posix_io.rs"]
mod posix_io;
#[path = "snapshots.rs"]
mod snapshots;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{open_rw, uring_unavailable, Mount, MIB};

/// The names of the daemon's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// The number of queues the kernel makes: one per possible CPU.
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last = text
        .trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok());
    last.max().unwrap() + 1
}

/// Whether process `pid` has ended (gone, or a zombie its parent has not reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
    }
}

fn wait_ended(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ended(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Writers that write, fsync and read back on the mount until told to stop or until the mount
/// fails them; each says on `done` when it ended.
fn busy_writers(mnt: &Path, n: usize, stop: &Arc<AtomicBool>) -> mpsc::Receiver<usize> {
    let (done, ended) = mpsc::channel();
    for i in 0..n {
        let f = open_rw(&mnt.join(format!("busy{i}.img")));
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let block = vec![i as u8 + 1; 4096];
            let mut back = vec![0; 4096];
            let mut at = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ok = f.write_all_at(&block, at).is_ok()
                    && f.sync_data().is_ok()
                    && f.read_exact_at(&mut back, at).is_ok();
                if !ok {
                    break;
                }
                at = (at + 4096) % MIB;
            }
            let _ = done.send(i);
        });
    }
    ended
}

fn skipped() -> bool {
    match uring_unavailable() {
        Some(why) => {
            eprintln!("skipped: FUSE over io_uring is not available here ({why})");
            true
        }
        None => false,
    }
}

#[test]
fn the_daemon_serves_over_io_uring_with_ring_threads_for_every_cpu() {
    if skipped() {
        return;
    }
    let m = Mount::new();
    let data: Vec<u8> = (0..3 * MIB + 123).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.path().join("f"), &data).unwrap();
    assert_eq!(std::fs::read(m.path().join("f")).unwrap(), data);
    assert_eq!(std::fs::read(m.backing().join("f")).unwrap(), data);
    let log = m.log_text();
    assert!(log.contains("transport io_uring"), "{log}");
    let rings = thread_names(m.pid())
        .iter()
        .filter(|n| n.starts_with("fuse-ring-"))
        .count();
    assert!(
        rings >= possible_cpus(),
        "{rings} ring threads for {} CPUs",
        possible_cpus()
    );
    assert!(m.unmount().success());
}

#[test]
fn transport_dev_serves_over_dev_fuse_alone() {
    let m = Mount::with_setup(|_| {}, Some("[fuse]\ntransport = \"dev\"\n"));
    std::fs::write(m.path().join("f"), b"over /dev/fuse").unwrap();
    assert_eq!(
        std::fs::read(m.path().join("f")).unwrap(),
        b"over /dev/fuse"
    );
    let log = m.log_text();
    assert!(log.contains("transport dev"), "{log}");
    let names = thread_names(m.pid());
    assert!(
        !names.iter().any(|n| n.starts_with("fuse-ring-")),
        "{names:?}"
    );
    assert!(m.unmount().success());
}

#[test]
fn unmount_with_writers_in_flight_ends_the_daemon() {
    if skipped() {
        return;
    }
    let m = Mount::new();
    let stop = Arc::new(AtomicBool::new(false));
    let finished = busy_writers(m.path(), 4, &stop);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for _ in 0..4 {
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a writer hung");
    }
    let pid = m.pid();
    let status = m.unmount();
    assert!(status.success(), "{status}");
    assert!(ended(pid));
}

#[test]
fn kill9_with_requests_in_flight_fails_them_and_hangs_nothing() {
    if skipped() {
        return;
    }
    let mut m = Mount::new();
    let stop = Arc::new(AtomicBool::new(false));
    let finished = busy_writers(m.path(), 4, &stop);
    std::thread::sleep(Duration::from_millis(300));
    m.kill9();
    // Every writer's next request fails (the connection is gone): none waits forever.
    for _ in 0..4 {
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a writer hung after kill -9 of the daemon");
    }
    let mnt = m.path().to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(m); // detaches the dead mount
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("detaching the mount of a killed daemon hung");
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn lazy_unmount_with_open_files_ends_the_daemon_once_they_close() {
    if skipped() {
        return;
    }
    let m = Mount::new();
    let stop = Arc::new(AtomicBool::new(false));
    let finished = busy_writers(m.path(), 2, &stop);
    std::thread::sleep(Duration::from_millis(200));
    let pid = m.pid();
    let status = std::process::Command::new("umount")
        .arg("-l")
        .arg(m.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!common::is_mounted(m.path()));
    // The writers keep their files (a lazy unmount only detaches the name)...
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !ended(pid),
        "the daemon ended while its files were still open"
    );
    // ...and when they close them the connection ends, and the daemon with it.
    stop.store(true, Ordering::Relaxed);
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a writer hung");
    }
    assert!(
        wait_ended(pid, Duration::from_secs(20)),
        "the daemon did not end after a lazy unmount:\n{}",
        m.log_text()
    );
}
