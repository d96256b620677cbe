//! Calls on byte ranges through a real mount, checked against a plain dir: fallocate (preallocate,
//! punch hole, zero range), SEEK_DATA and SEEK_HOLE over the backing file's holes, and
//! copy_file_range.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::posix::*;
use common::Mount;

// ---- fallocate, lseek, copy_file_range ----

#[test]
fn fallocate_preallocates_punches_and_zeroes_like_plain_dir() {
    let p = Pair::new();
    let open = |r: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("f"))
    };
    p.expect("preallocate grows size", Ok(MIB), |r| {
        fallocate(&open(r)?, 0, 0, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });
    let blocks = fs::metadata(p.mnt().join("f")).unwrap().blocks();
    assert!(blocks * 512 >= MIB, "preallocated st_blocks {blocks}");
    assert_eq!(
        fs::metadata(p.mount.backing().join("f")).unwrap().size(),
        MIB
    );
    p.expect("preallocation reads as zeros", Ok(true), |r| {
        Ok(fs::read(r.join("f"))?.iter().all(|b| *b == 0))
    });
    p.expect("KEEP_SIZE does not grow size", Ok(MIB), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });

    p.both("fill", |r| {
        let f = open(r)?;
        f.set_len(MIB)?;
        f.write_all_at(&vec![0xaa; MIB as usize], 0)?;
        f.sync_all()
    });
    let full_blocks = fs::metadata(p.mnt().join("f")).unwrap().blocks();
    let mut want = vec![0xaa; MIB as usize];
    want[256 * KIB as usize..768 * KIB as usize].fill(0);
    p.expect(
        "punch hole zeroes the range and keeps size",
        Ok((true, MIB)),
        |r| {
            let f = open(r)?;
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                256 * KIB,
                512 * KIB,
            )?;
            Ok((fs::read(r.join("f"))? == want, f.metadata()?.size()))
        },
    );
    for root in [p.mnt(), p.mount.backing()] {
        let after = fs::metadata(root.join("f")).unwrap().blocks();
        assert!(
            after * 512 <= full_blocks * 512 - 512 * KIB,
            "st_blocks in {} did not drop by the hole: {full_blocks} -> {after}",
            root.display()
        );
    }
    p.expect("punch hole without KEEP_SIZE", Err(libc::EOPNOTSUPP), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)
    });

    want[..4096].fill(0);
    want[900 * KIB as usize..(900 * KIB + 100) as usize].fill(0);
    p.expect("zero range", Ok((true, MIB)), |r| {
        let f = open(r)?;
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 4096)?;
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 900 * KIB, 100)?;
        Ok((fs::read(r.join("f"))? == want, f.metadata()?.size()))
    });
    p.expect("zero range past end grows size", Ok(2 * MIB), |r| {
        fallocate(&open(r)?, libc::FALLOC_FL_ZERO_RANGE, MIB, MIB)?;
        Ok(fs::metadata(r.join("f"))?.size())
    });
    assert_eq!(
        common::blake3_file(&p.mount.backing().join("f")),
        common::blake3_file(&p.plain().join("f"))
    );
}

#[test]
fn seek_data_and_hole_see_the_backing_holes() {
    let m = Mount::new();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path().join("sparse"))
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], GIB).unwrap();
    f.sync_all().unwrap();
    let size = GIB + 4096;
    assert_eq!(f.metadata().unwrap().size(), size);
    let backing = File::open(m.backing().join("sparse")).unwrap();
    let probes = [
        (0, libc::SEEK_DATA),
        (0, libc::SEEK_HOLE),
        (100, libc::SEEK_DATA),
        (4096, libc::SEEK_DATA),
        (4096, libc::SEEK_HOLE),
        (MIB, libc::SEEK_DATA),
        (GIB - 1, libc::SEEK_HOLE),
        (GIB, libc::SEEK_DATA),
        (GIB, libc::SEEK_HOLE),
        (GIB + 100, libc::SEEK_HOLE),
        (size, libc::SEEK_DATA),
        (size, libc::SEEK_HOLE),
        (size + 1, libc::SEEK_HOLE),
    ];
    for (off, whence) in probes {
        let on_mount = outcome(lseek(&f, off, whence));
        let on_backing = outcome(lseek(&backing, off, whence));
        assert_eq!(
            on_mount,
            on_backing,
            "lseek({off}, {}) mount vs backing",
            if whence == libc::SEEK_DATA {
                "SEEK_DATA"
            } else {
                "SEEK_HOLE"
            }
        );
    }
    // The interesting ones, spelled out.
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0);
    assert!(lseek(&f, 0, libc::SEEK_HOLE).unwrap() < GIB, "hole between");
    assert_eq!(lseek(&f, 4096, libc::SEEK_DATA).unwrap(), GIB);
    assert_eq!(lseek(&f, GIB, libc::SEEK_HOLE).unwrap(), size);
    assert_eq!(outcome(lseek(&f, size, libc::SEEK_DATA)), Err(libc::ENXIO));
    // Ordinary seeks are unaffected.
    assert_eq!(lseek(&f, 0, libc::SEEK_END).unwrap(), size);
}

#[test]
fn copy_file_range_copies_content() {
    let p = Pair::new();
    let data = pattern(3, 0, 5 * MIB as usize + 8 * 13);
    p.both("source", |r| fs::write(r.join("src"), &data));
    let copy = |r: &Path, off_in: u64, off_out: u64, len: u64| -> io::Result<u64> {
        let src = File::open(r.join("src"))?;
        let dst = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("dst"))?;
        let (mut i, mut o) = (off_in as libc::loff_t, off_out as libc::loff_t);
        let mut done = 0;
        while done < len {
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut i,
                    dst.as_raw_fd(),
                    &mut o,
                    (len - done) as usize,
                    0,
                )
            };
            let n = cvt_size(n)? as u64;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    };
    p.expect("whole file", Ok(data.len() as u64), |r| {
        copy(r, 0, 0, data.len() as u64)
    });
    assert_eq!(fs::read(p.mnt().join("dst")).unwrap(), data);
    assert_eq!(fs::read(p.mount.backing().join("dst")).unwrap(), data);
    p.expect("range at offsets", Ok(10000), |r| {
        copy(r, 4096 + 8, 3 * MIB + 1, 10000)
    });
    p.same("content after range copy", |r| {
        Ok(blake3::hash(&fs::read(r.join("dst"))?).to_hex().to_string())
    })
    .unwrap();
    p.expect("past end of source copies nothing", Ok(0), |r| {
        copy(r, data.len() as u64 + 10, 0, 100)
    });
    let dst = fs::read(p.mnt().join("dst")).unwrap();
    assert_eq!(
        &dst[..data.len()],
        &{
            let mut w = data.clone();
            w[3 * MIB as usize + 1..3 * MIB as usize + 10001]
                .copy_from_slice(&data[4104..4104 + 10000]);
            w
        }[..]
    );
}
