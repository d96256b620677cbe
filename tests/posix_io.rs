//! File I/O through a real mount, checked against a plain dir: open flags, reads and writes at
//! offsets, shared mmap, changes made in the backing dir, close and the fsync family, files
//! kept open after unlink, a sparse 1 GiB volume and concurrent writers; each in write-through
//! and in write-back mode (`[fuse] writeback_cache = true`).

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use common::posix::*;
use common::{Mount, Rng};

// ---- open, create, read, write, sync ----

fn open_flags_behave_like_plain_dir(writeback: bool) {
    let p = Pair::in_mode(writeback);
    p.both("create", |r| fs::write(r.join("f"), b"hello"));
    p.expect("O_EXCL on existing", Err(libc::EEXIST), |r| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(r.join("f"))
            .map(drop)
    });
    p.expect("O_EXCL on new", Ok(0), |r| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(r.join("new"))?;
        Ok(f.metadata()?.size())
    });
    p.same("mode of new file", |r| lshape(&r.join("new")))
        .unwrap();
    p.expect("O_TRUNC empties", Ok(Vec::new()), |r| {
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(r.join("f"))?;
        fs::read(r.join("f"))
    });
    p.expect(
        "O_CREAT without O_EXCL keeps content",
        Ok(b"abc".to_vec()),
        |r| {
            fs::write(r.join("g"), b"abc")?;
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(r.join("g"))?;
            fs::read(r.join("g"))
        },
    );

    // O_APPEND writes at the end even after another descriptor extended the file.
    p.expect("O_APPEND", Ok(b"0123ABBBBC".to_vec()), |r| {
        fs::write(r.join("log"), b"0123")?;
        let mut appender = OpenOptions::new().append(true).open(r.join("log"))?;
        appender.write_all(b"A")?;
        let other = OpenOptions::new().write(true).open(r.join("log"))?;
        other.write_all_at(b"BBBB", 5)?;
        appender.write_all(b"C")?;
        drop((appender, other));
        fs::read(r.join("log"))
    });
    assert_eq!(
        fs::read(p.mount.backing().join("log")).unwrap(),
        b"0123ABBBBC"
    );

    p.expect("O_RDONLY refuses writes", Err(libc::EBADF), |r| {
        File::open(r.join("g"))?.write_all(b"x")
    });
    p.expect("O_WRONLY refuses reads", Err(libc::EBADF), |r| {
        let mut s = String::new();
        OpenOptions::new()
            .write(true)
            .open(r.join("g"))?
            .read_to_string(&mut s)
            .map(drop)
    });
}

fn reads_and_writes_at_offsets_match_plain_dir(writeback: bool) {
    let p = Pair::in_mode(writeback);
    p.expect(
        "pwrite past end leaves zeros",
        Ok(b"hello\0\0\0\0\0xyz".to_vec()),
        |r| {
            fs::write(r.join("f"), b"hello")?;
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            f.write_all_at(b"xyz", 10)?;
            fs::read(r.join("f"))
        },
    );
    p.expect("pread in the middle", Ok(b"o\0\0\0\0\0x".to_vec()), |r| {
        let mut buf = [0u8; 7];
        File::open(r.join("f"))?.read_exact_at(&mut buf, 4)?;
        Ok(buf.to_vec())
    });
    p.expect("short read at end", Ok(b"yz".to_vec()), |r| {
        let mut buf = [0u8; 64];
        let n = File::open(r.join("f"))?.read_at(&mut buf, 11)?;
        Ok(buf[..n].to_vec())
    });
    p.expect("read past end", Ok(0), |r| {
        let mut buf = [0u8; 64];
        File::open(r.join("f"))?.read_at(&mut buf, 1000)
    });
    p.expect(
        "seek + write + read",
        Ok(b"heLLo\0\0\0\0\0xyz!".to_vec()),
        |r| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("f"))?;
            f.seek(SeekFrom::Start(2))?;
            f.write_all(b"LL")?;
            f.seek(SeekFrom::End(0))?;
            f.write_all(b"!")?;
            f.seek(SeekFrom::Start(0))?;
            let mut out = Vec::new();
            f.read_to_end(&mut out)?;
            Ok(out)
        },
    );
    // Larger than one FUSE request, unaligned.
    let big = pattern(7, 0, 3 * MIB as usize + 8 * 1001);
    p.expect("big unaligned pwrite", Ok(true), |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(r.join("big"))?;
        f.write_all_at(&big, 12345)?;
        let mut back = vec![0u8; big.len()];
        f.read_exact_at(&mut back, 12345)?;
        Ok(back == big && f.metadata()?.size() == 12345 + big.len() as u64)
    });
    assert_eq!(
        common::blake3_file(&p.mnt().join("big")),
        common::blake3_file(&p.plain().join("big"))
    );
    assert_eq!(
        common::blake3_file(&p.mount.backing().join("big")),
        common::blake3_file(&p.plain().join("big"))
    );

    // O_DIRECT opens work (qemu cache=none depends on it) and reach the backing file.
    #[repr(C, align(4096))]
    struct Aligned([u8; 8192]);
    let mut out = Box::new(Aligned([0; 8192]));
    out.0.copy_from_slice(&pattern(9, 0, 8192));
    p.expect(
        "O_DIRECT aligned pwrite and pread",
        Ok((true, 12288)),
        |r| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(r.join("direct"))?;
            f.write_all_at(&out.0, 4096)?;
            let mut back = Box::new(Aligned([0; 8192]));
            f.read_exact_at(&mut back.0, 4096)?;
            Ok((back.0 == out.0, f.metadata()?.size()))
        },
    );
    assert_eq!(
        &fs::read(p.mount.backing().join("direct")).unwrap()[4096..],
        &out.0[..]
    );
}

fn mmap_shared_writes_reach_the_file(writeback: bool) {
    let p = Pair::in_mode(writeback);
    let len = 256 * KIB as usize;
    let data = pattern(11, 0, len);
    p.expect(
        "write through MAP_SHARED, read with read(2)",
        Ok(true),
        |r| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(r.join("m"))?;
            f.set_len(len as u64)?;
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), map.cast::<u8>(), len);
                let synced = cvt(libc::msync(map, len, libc::MS_SYNC));
                libc::munmap(map, len);
                synced?;
            }
            drop(f);
            Ok(fs::read(r.join("m"))? == data)
        },
    );
    assert!(
        fs::read(p.mount.backing().join("m")).unwrap() == data,
        "backing"
    );
    p.expect("read through a private map", Ok(true), |r| {
        let f = File::open(r.join("m"))?;
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let same = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) } == &data[..];
        unsafe { libc::munmap(map, len) };
        Ok(same)
    });
}

fn file_changed_in_backing_shows_through_the_mount_on_reopen(writeback: bool) {
    let m = Mount::in_mode(
        writeback,
        |b| fs::write(b.join("v"), b"aaaa").unwrap(),
        None,
    );
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"aaaa");
    // Same size, new content and mtime: the kernel's page cache must not serve the old bytes.
    fs::write(m.backing().join("v"), b"bbbb").unwrap();
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"bbbb");
    // Unchanged: still right when the cache is kept.
    assert_eq!(fs::read(m.path().join("v")).unwrap(), b"bbbb");
}

fn close_fsync_fdatasync_and_dir_fsync_succeed(writeback: bool) {
    let p = Pair::in_mode(writeback);
    p.expect("fsync, fdatasync, close", Ok(0), |r| {
        let mut f = File::create(r.join("f"))?;
        f.write_all(b"data")?;
        f.flush()?;
        f.sync_data()?;
        f.sync_all()?;
        // close(2) is where FUSE flush reports errors: check its return value.
        cvt(unsafe { libc::close(f.into_raw_fd()) })
    });
    p.expect("fsync on a directory fd", Ok(()), |r| {
        fs::create_dir(r.join("d"))?;
        File::open(r.join("d"))?.sync_all()?;
        File::open(r)?.sync_all()?;
        File::open(r.join("d"))?.sync_data()
    });
    p.expect("fsync on an O_RDONLY fd", Ok(()), |r| {
        File::open(r.join("f"))?.sync_all()
    });
}

// ---- open-but-unlinked files ----

fn unlinked_file_keeps_working_through_its_fd(writeback: bool) {
    let p = Pair::in_mode(writeback);
    p.expect(
        "write, read, fstat after unlink",
        Ok((b"helloXY".to_vec(), 0, 7)),
        |r| {
            fs::write(r.join("f"), b"hello")?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("f"))?;
            fs::remove_file(r.join("f"))?;
            if r.join("f").exists() {
                return Ok((b"name still there".to_vec(), 99, 0));
            }
            f.write_all_at(b"XY", 5)?;
            let mut buf = Vec::new();
            (&f).seek(SeekFrom::Start(0))?;
            (&f).read_to_end(&mut buf)?;
            let st = fstat(&f);
            Ok((buf, st.st_nlink, st.st_size as u64))
        },
    );
    p.expect("ftruncate and fsync after unlink", Ok(3), |r| {
        fs::write(r.join("g"), b"abcdef")?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("g"))?;
        fs::remove_file(r.join("g"))?;
        f.set_len(3)?;
        f.sync_all()?;
        Ok(f.metadata()?.size())
    });
    p.expect(
        "a new file under the old name is a different file",
        Ok(b"new".to_vec()),
        |r| {
            fs::write(r.join("h"), b"old")?;
            let old = File::open(r.join("h"))?;
            fs::remove_file(r.join("h"))?;
            fs::write(r.join("h"), b"new")?;
            let mut s = Vec::new();
            (&old).read_to_end(&mut s)?;
            assert_eq!(s, b"old");
            fs::read(r.join("h"))
        },
    );
    let names: Vec<_> = listing(p.mount.backing())
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != ".grainfs")
        .collect();
    assert_eq!(
        names,
        vec![("h".to_string(), "file")],
        "no leftover hidden files in backing"
    );
}

// ---- large sparse volume and concurrency ----

fn sparse_1gib_random_writes_read_back_exactly(writeback: bool) {
    const BLOCK: u64 = 4096;
    let m = Mount::in_mode(writeback, |_| {}, None);
    let path = m.path().join("volume.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(GIB).unwrap();
    let mut rng = Rng::new(1);
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for _ in 0..200 {
        let off = (rng.next_u64() % (GIB / BLOCK)) * BLOCK;
        let tag = rng.next_u64();
        let data: Vec<u8> = (0..BLOCK / 8)
            .flat_map(|w| (w ^ tag).to_le_bytes())
            .collect();
        f.write_all_at(&data, off).unwrap();
        model.insert(off, data);
    }
    f.sync_all().unwrap();
    drop(f);

    let on_mount = File::open(&path).unwrap();
    let on_backing = File::open(m.backing().join("volume.img")).unwrap();
    assert_eq!(on_mount.metadata().unwrap().size(), GIB);
    let chunk = 4 * MIB;
    let mut got = vec![0u8; chunk as usize];
    let mut raw = vec![0u8; chunk as usize];
    for start in (0..GIB).step_by(chunk as usize) {
        let mut want = vec![0u8; chunk as usize];
        for (off, data) in model.range(start..start + chunk) {
            let at = (off - start) as usize;
            want[at..at + data.len()].copy_from_slice(data);
        }
        on_mount.read_exact_at(&mut got, start).unwrap();
        on_backing.read_exact_at(&mut raw, start).unwrap();
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("mount differs from model at byte {}", start + first as u64);
        }
        assert!(
            raw == want,
            "backing differs from model in chunk at {start}"
        );
    }
    for p in [&path, &m.backing().join("volume.img")] {
        let blocks = fs::metadata(p).unwrap().blocks();
        assert!(
            blocks * 512 <= 2 * 200 * BLOCK + MIB,
            "{} is not sparse: {} bytes allocated",
            p.display(),
            blocks * 512
        );
    }
}

fn concurrent_writers_lose_nothing(writeback: bool) {
    const FILE_SIZE: u64 = 8 * MIB;
    const CHUNK: usize = 64 * KIB as usize;
    let m = Mount::in_mode(writeback, |_| {}, None);
    let shared = m.path().join("shared");
    File::create(&shared).unwrap().set_len(4 * MIB).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let path = m.path().join(format!("file{t}"));
            s.spawn(move || {
                let mut f = File::create(path).unwrap();
                for off in (0..FILE_SIZE).step_by(CHUNK) {
                    f.write_all(&pattern(t, off, CHUNK)).unwrap();
                }
                f.sync_all().unwrap();
            });
        }
        for t in 0..4u64 {
            let shared = &shared;
            s.spawn(move || {
                let f = OpenOptions::new().write(true).open(shared).unwrap();
                let start = t * MIB;
                // Interleave small writes so the threads' requests really overlap in time.
                for off in (start..start + MIB).step_by(4096) {
                    f.write_all_at(&pattern(100, off, 4096), off).unwrap();
                }
            });
        }
    });
    for t in 0..4u8 {
        for root in [m.path(), m.backing()] {
            let got = fs::read(root.join(format!("file{t}"))).unwrap();
            assert_eq!(
                got.len() as u64,
                FILE_SIZE,
                "file{t} size in {}",
                root.display()
            );
            assert!(
                got == pattern(t, 0, FILE_SIZE as usize),
                "file{t} content in {}",
                root.display()
            );
        }
    }
    for root in [m.path(), m.backing()] {
        let got = fs::read(root.join("shared")).unwrap();
        assert!(
            got == pattern(100, 0, 4 * MIB as usize),
            "shared file content in {}",
            root.display()
        );
    }
}

/// Each test above in both modes: `write_through::NAME` and `write_back::NAME`.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod write_through {
            $(#[test]
            fn $name() {
                super::$name(false)
            })*
        }
        mod write_back {
            $(#[test]
            fn $name() {
                super::$name(true)
            })*
        }
    };
}

in_both_modes!(
    open_flags_behave_like_plain_dir,
    reads_and_writes_at_offsets_match_plain_dir,
    mmap_shared_writes_reach_the_file,
    file_changed_in_backing_shows_through_the_mount_on_reopen,
    close_fsync_fdatasync_and_dir_fsync_succeed,
    unlinked_file_keeps_working_through_its_fd,
    sparse_1gib_random_writes_read_back_exactly,
    concurrent_writers_lose_nothing,
);
