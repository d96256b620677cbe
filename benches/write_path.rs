//! The cost of change tracking on the write path, without FUSE and without a disk: the same
//! writes through `OverlayFs` with tracking on and off, and plain `pwrite` on the same tmpfs
//! file for reference, interleaved in rounds. Run: `cargo bench --bench write_path`.
//! Reports ns per write (median of the rounds) and the ratios.

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

    println!("| job | plain ns/write | tracking off ns/write | tracking on ns/write | on/off | on - off (ns) |");
    println!("|---|---|---|---|---|---|");
    for (job, bs, n) in [
        ("random 4 KiB", 4096usize, 100_000usize),
        ("sequential 1 MiB", 1 << 20, 1_000),
    ] {
        let buf = vec![0xa5u8; bs];
        let offs = if bs == 4096 {
            offsets(n, FILE_SIZE, 4096, 0x9e3779b97f4a7c15)
        } else {
            (0..n as u64).map(|i| (i * bs as u64) % FILE_SIZE).collect()
        };
        let (mut p, mut f, mut t) = (vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            let s = Instant::now();
            for &o in &offs {
                plain.write_all_at(&buf, o).unwrap();
            }
            p.push(s.elapsed().as_nanos() as f64 / n as f64);
            let s = Instant::now();
            for &o in &offs {
                off.write(fh_off, o, &buf).unwrap();
            }
            f.push(s.elapsed().as_nanos() as f64 / n as f64);
            let s = Instant::now();
            for &o in &offs {
                on.write(fh_on, o, &buf).unwrap();
            }
            t.push(s.elapsed().as_nanos() as f64 / n as f64);
        }
        let (p, f, t) = (median(p), median(f), median(t));
        println!(
            "| {job} | {p:.0} | {f:.0} | {t:.0} | {:.3} | {:.0} |",
            t / f,
            t - f
        );
    }
}
