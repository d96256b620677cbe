//! Write-back mode (`[fuse] writeback_cache = true`) through a real mount, beside write-through
//! where the promise is the same: every fsync'd write survives a kill -9 of the daemon; a write
//! that returned before `snapshot create` (no fsync, the file still open, or a store through a
//! shared mapping) is in the backing file when the snapshot's flush is done and in the snapshot;
//! a rollback is not undone by cached writes landing after it; the daemon says what it set.
//! The rest of the real-mount suite runs in write-back mode in part (`posix_io::write_back`,
//! `snapshots.rs`'s `*_write_back` tests), or whole with `GRAINFS_TEST_WRITEBACK=1`.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::{create_snapshot, grainfs_at, open_rw, Mount, Noise, MIB, SMALL_GEOMETRY};

/// Bytes written without fsync before `snapshot create`.
const WRITTEN: u64 = 16 * MIB;

/// Both modes, write-through first.
const MODES: [bool; 2] = [false, true];

fn mode_name(writeback: bool) -> &'static str {
    if writeback {
        "write-back"
    } else {
        "write-through"
    }
}

#[test]
fn fsynced_writes_survive_kill9_in_both_modes() {
    for writeback in MODES {
        let mode = mode_name(writeback);
        let mut m = Mount::in_mode(writeback, |_| {}, Some(SMALL_GEOMETRY));
        let mut noise = Noise::new(11);
        let mut expect = Vec::new();
        {
            let mut f = File::create(m.path().join("v")).unwrap();
            let a = noise.bytes(MIB as usize + 5);
            f.write_all(&a).unwrap();
            f.sync_all().unwrap();
            expect.extend_from_slice(&a);
            let b = noise.bytes(4099);
            f.write_all_at(&b, 8191).unwrap();
            f.sync_data().unwrap();
            expect[8191..8191 + b.len()].copy_from_slice(&b);
            m.kill9();
            drop(f);
        }
        m.remount();
        assert!(
            fs::read(m.path().join("v")).unwrap() == expect,
            "{mode}: through the mount"
        );
        assert!(
            fs::read(m.backing().join("v")).unwrap() == expect,
            "{mode}: backing"
        );
    }
}

/// A shared writable mapping of `len` bytes of `f`.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(f: &File, len: usize) -> Mapping {
        // SAFETY: a fresh shared mapping of a file we hold open, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn store(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: within the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn writes_that_returned_before_snapshot_create_are_in_the_backing_file_and_the_snapshot() {
    for writeback in MODES {
        let mode = mode_name(writeback);
        let m = Mount::in_mode(writeback, |_| {}, Some(SMALL_GEOMETRY));
        let mut noise = Noise::new(7);
        // Written and kept open, no fsync: in write-back mode these stay in the kernel's page
        // cache until something pushes them. (A `syncfs` of the mount, which on Linux 6.18
        // starts their writeback without waiting for it, left pages missing from the backing
        // file when it was read at once; through `snapshot create` the engine's own delay
        // hides that race, so this checks the promise, not that particular flaw.)
        let mut expect_w = noise.bytes(WRITTEN as usize);
        let w = open_rw(&m.path().join("written.img"));
        w.write_all_at(&expect_w, 0).unwrap();
        for (off, len) in [(5, 1), (4095, 2), (70_001, 9_000), (WRITTEN - 3, 10)] {
            let b = noise.bytes(len as usize);
            w.write_all_at(&b, off).unwrap();
            let end = (off + len) as usize;
            if expect_w.len() < end {
                expect_w.resize(end, 0);
            }
            expect_w[off as usize..end].copy_from_slice(&b);
        }
        // Stores through a shared mapping, no msync.
        let mut expect_m = noise.bytes(MIB as usize);
        fs::write(m.path().join("mapped.img"), &expect_m).unwrap();
        let mf = open_rw(&m.path().join("mapped.img"));
        let map = Mapping::new(&mf, MIB as usize);
        for at in [0usize, 4096 * 3 + 17, MIB as usize - 100] {
            let b = noise.bytes(64);
            map.store(at, &b);
            expect_m[at..at + 64].copy_from_slice(&b);
        }

        create_snapshot(&m, "s1");
        // The flush before the barrier put every byte in the backing files, with the writer
        // still open and the mapping still there.
        assert!(
            fs::read(m.backing().join("written.img")).unwrap() == expect_w,
            "{mode}: the backing file lacks writes made before snapshot create"
        );
        assert!(
            fs::read(m.backing().join("mapped.img")).unwrap() == expect_m,
            "{mode}: the backing file lacks stores made before snapshot create"
        );
        let snap = m.path().join(".snapshots/s1");
        assert!(
            fs::read(snap.join("written.img")).unwrap() == expect_w,
            "{mode}: the snapshot lacks writes made before it"
        );
        assert!(
            fs::read(snap.join("mapped.img")).unwrap() == expect_m,
            "{mode}: the snapshot lacks stores made before it"
        );

        // A rollback with writes still cached: they land before it, never after.
        let before_rollback = noise.bytes(MIB as usize);
        w.write_all_at(&before_rollback, MIB).unwrap();
        let out = grainfs_at(&["rollback", "--json", "s1"], m.path());
        assert!(
            out.status.success(),
            "{mode}: rollback: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(w);
        drop(map);
        drop(mf);
        assert!(
            fs::read(m.path().join("written.img")).unwrap() == expect_w,
            "{mode}: a cached write undid part of the rollback"
        );
        assert!(
            fs::read(m.backing().join("written.img")).unwrap() == expect_w,
            "{mode}: a cached write undid part of the rollback (backing)"
        );
        if writeback {
            let log = m.log_text();
            assert!(log.contains("kernel write-back cache on"), "{log}");
            if unsafe { libc::geteuid() } == 0 {
                assert!(log.contains("write-back: bdi"), "{log}");
            }
        }
        assert!(m.unmount().success(), "{mode}: unmount");
    }
}
