//! What the FUSE-free benches share: an `OverlayFs` over a tmpfs dir with tracking on or off
//! and one 256 MiB volume open in it, seeded offsets, the median of rounds.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use grainfs::fs::{inode::ROOT_INO, Caller, OverlayFs, OverlayOptions};
use grainfs::ids::Geometry;
use grainfs::track::Tracker;

pub const FILE_SIZE: u64 = 256 << 20;
pub const ROUNDS: usize = 7;

/// `n` offsets below `size`, multiples of `align`, from `seed` (xorshift).
pub fn offsets(n: usize, size: u64, align: u64, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / align)) * align
        })
        .collect()
}

/// An overlay of `<dir>/on` or `<dir>/off` with one volume `vol.img` of `FILE_SIZE`, open.
pub fn overlay(dir: &Path, tracking: bool) -> (OverlayFs, u64) {
    let backing = dir.join(if tracking { "on" } else { "off" });
    std::fs::create_dir_all(&backing).unwrap();
    let store = backing.join(".grainfs");
    let tracker = tracking.then(|| {
        let geometry = Geometry {
            block_size: 64 << 10,
            partition_size: 64 << 20,
        };
        let (t, _) = Tracker::open(&backing, &store, geometry, Duration::from_secs(10)).unwrap();
        Arc::new(t)
    });
    let fs = OverlayFs::new(
        &backing,
        OverlayOptions {
            store: Some(store),
            tracker,
        },
    )
    .unwrap();
    let caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
    let (_, opened) = fs
        .create(
            caller,
            ROOT_INO,
            OsStr::new("vol.img"),
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    fs.write(opened.fh, FILE_SIZE - 1, &[0]).unwrap();
    (fs, opened.fh)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
