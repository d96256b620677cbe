//! The cost of the read path, without FUSE and without a disk: 4 KiB random and 1 MiB
//! sequential reads through `OverlayFs` with tracking on and off, and plain `pread` on the same
//! tmpfs file for reference, interleaved in rounds; the rollback's read hold (`track::hold`)
//! is on this path. Run: `cargo bench --bench read_path`. Reports ns per read (median).

use std::os::unix::fs::FileExt;
use std::time::Instant;

mod common;

use common::{median, offsets, overlay, FILE_SIZE, ROUNDS};

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("grainfs-bench-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs at /dev/shm");
    let (on, fh_on) = overlay(dir.path(), true);
    let (off, fh_off) = overlay(dir.path(), false);
    let plain = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.path().join("plain.img"))
        .unwrap();
    plain.set_len(FILE_SIZE).unwrap();
    // Data everywhere, so reads copy pages rather than zeros of holes.
    let fill = vec![0x5au8; 1 << 20];
    for o in (0..FILE_SIZE).step_by(1 << 20) {
        plain.write_all_at(&fill, o).unwrap();
        on.write(fh_on, o, &fill).unwrap();
        off.write(fh_off, o, &fill).unwrap();
    }

    println!("| job | plain ns/read | tracking off ns/read | tracking on ns/read | on/off |");
    println!("|---|---|---|---|---|");
    for (job, bs, n) in [
        ("random 4 KiB", 4096usize, 200_000usize),
        ("sequential 1 MiB", 1 << 20, 2_000),
    ] {
        let mut buf = vec![0u8; bs];
        let offs = if bs == 4096 {
            offsets(n, FILE_SIZE, 4096, 0x9e3779b97f4a7c15)
        } else {
            (0..n as u64).map(|i| (i * bs as u64) % FILE_SIZE).collect()
        };
        let (mut p, mut f, mut t) = (vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            let s = Instant::now();
            for &o in &offs {
                plain.read_exact_at(&mut buf, o).unwrap();
            }
            p.push(s.elapsed().as_nanos() as f64 / n as f64);
            let s = Instant::now();
            for &o in &offs {
                off.read(fh_off, o, bs as u32, |d| d.len()).unwrap();
            }
            f.push(s.elapsed().as_nanos() as f64 / n as f64);
            let s = Instant::now();
            for &o in &offs {
                on.read(fh_on, o, bs as u32, |d| d.len()).unwrap();
            }
            t.push(s.elapsed().as_nanos() as f64 / n as f64);
        }
        let (p, f, t) = (median(p), median(f), median(t));
        println!("| {job} | {p:.0} | {f:.0} | {t:.0} | {:.3} |", t / f);
    }
}
