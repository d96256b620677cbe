//! Ownership and permissions through a real mount, for callers other than the daemon's root:
//! new entries belong to the caller, access(2) and unreadable files answer as on a plain dir,
//! the mount is never less restrictive than the backing filesystem (nosuid, nodev), and every
//! change that must clear setuid, setgid or file capabilities clears them as a plain dir does.
//! Non-root callers are forked children dropped to uid/gid 65534; the tests need root.

mod common;

use std::fmt::Debug;
use std::fs::{self};
use std::io::{self};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::posix::*;
use common::Mount;

// ---- ownership and permissions for non-root callers ----

#[test]
fn new_files_dirs_symlinks_and_fifos_belong_to_the_caller() {
    let p = Pair::new();
    open_to_others(&p.mount);
    p.both("chmod 0777", |r| {
        fs::set_permissions(r, fs::Permissions::from_mode(0o777))
    });
    for root in [p.mnt(), p.plain()] {
        let file = cpath(&root.join("file"));
        let dir = cpath(&root.join("dir"));
        let link = cpath(&root.join("link"));
        let fifo = cpath(&root.join("fifo"));
        let nested = cpath(&root.join("dir/nested"));
        let target = c"file";
        let where_ = root.display();
        assert_eq!(
            as_nobody(|| unsafe {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o644,
                );
                if fd < 0 {
                    return -1;
                }
                if libc::write(fd, b"mine".as_ptr().cast(), 4) != 4 {
                    return -1;
                }
                libc::close(fd)
            }),
            0,
            "create in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkdir(dir.as_ptr(), 0o755) }),
            0,
            "mkdir in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }),
            0,
            "symlink in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }),
            0,
            "mkfifo in {where_}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::mkdir(nested.as_ptr(), 0o700) }),
            0,
            "mkdir in own dir in {where_}"
        );
    }
    for name in ["file", "dir", "link", "fifo", "dir/nested"] {
        for root in [p.mnt(), p.plain(), p.mount.backing()] {
            let md = fs::symlink_metadata(root.join(name)).unwrap();
            assert_eq!(
                (md.uid(), md.gid()),
                (NOBODY, NOBODY),
                "owner of {}",
                root.join(name).display()
            );
        }
        assert_eq!(
            lshape(&p.mnt().join(name)).unwrap(),
            lshape(&p.plain().join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(fs::read(p.mount.backing().join("file")).unwrap(), b"mine");
    // The new owner's rights hold: root's 0700 dir created by 65534 is 65534's to use.
    let inner = cpath(&p.mnt().join("dir/nested/x"));
    assert_eq!(
        as_nobody(|| unsafe { libc::mkdir(inner.as_ptr(), 0o700) }),
        0
    );
}

#[test]

fn setuid_and_setgid_bits_asked_for_at_create_are_kept_for_a_non_root_caller() {
    let p = Pair::new();
    open_to_others(&p.mount);
    p.both("chmod 0777", |r| {
        fs::set_permissions(r, fs::Permissions::from_mode(0o777))
    });
    for root in [p.mnt(), p.plain()] {
        let file = cpath(&root.join("tool"));
        assert_eq!(
            as_nobody(|| unsafe {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o6755,
                );
                if fd < 0 {
                    return -1;
                }
                libc::close(fd)
            }),
            0,
            "create in {}",
            root.display()
        );
    }
    let want = lshape(&p.plain().join("tool")).unwrap();
    assert_eq!(want.perm, 0o6755, "plain dir keeps both bits");
    assert_eq!(
        lshape(&p.mnt().join("tool")).unwrap(),
        want,
        "mode and owner through the mount"
    );
}

#[test]
fn root_only_file_is_unreadable_by_others() {
    let p = Pair::new();
    open_to_others(&p.mount);
    fs::set_permissions(p.plain(), fs::Permissions::from_mode(0o755)).unwrap();
    p.both("create secret", |r| {
        fs::write(r.join("secret"), b"root only")?;
        fs::set_permissions(r.join("secret"), fs::Permissions::from_mode(0o600))?;
        fs::write(r.join("public"), b"anyone")?;
        fs::set_permissions(r.join("public"), fs::Permissions::from_mode(0o644))?;
        fs::create_dir(r.join("private"))?;
        fs::set_permissions(r.join("private"), fs::Permissions::from_mode(0o700))?;
        fs::write(r.join("private/inner"), b"x")?;
        fs::set_permissions(r.join("private/inner"), fs::Permissions::from_mode(0o644))
    });
    for root in [p.mnt(), p.plain()] {
        let w = root.display();
        assert_eq!(read_as_nobody(&root.join("secret")), libc::EACCES, "{w}");
        assert_eq!(read_as_nobody(&root.join("public")), 0, "{w}");
        assert_eq!(
            read_as_nobody(&root.join("private/inner")),
            libc::EACCES,
            "search permission on private dir in {w}"
        );
        let public = cpath(&root.join("public"));
        assert_eq!(
            as_nobody(|| unsafe { libc::open(public.as_ptr(), libc::O_WRONLY) }),
            libc::EACCES,
            "write open of a 0644 root file in {w}"
        );
        let newfile = cpath(&root.join("new"));
        assert_eq!(
            as_nobody(|| unsafe {
                libc::open(newfile.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644)
            }),
            libc::EACCES,
            "create in a 0755 root dir in {w}"
        );
        let secret = cpath(&root.join("secret"));
        assert_eq!(
            as_nobody(|| unsafe { libc::chmod(secret.as_ptr(), 0o666) }),
            libc::EPERM,
            "chmod of another's file in {w}"
        );
        assert_eq!(
            as_nobody(|| unsafe { libc::unlink(public.as_ptr()) }),
            libc::EACCES,
            "unlink in a 0755 root dir in {w}"
        );
    }
    assert_eq!(fs::read(p.mnt().join("secret")).unwrap(), b"root only");
}

// ---- namespace ----

#[test]
fn access_checks_match_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| {
        fs::write(r.join("rw"), b"x")?;
        fs::write(r.join("none"), b"x")?;
        fs::set_permissions(r.join("none"), fs::Permissions::from_mode(0o000))?;
        fs::write(r.join("exec"), b"x")?;
        fs::set_permissions(r.join("exec"), fs::Permissions::from_mode(0o100))
    });
    for name in ["rw", "none", "exec", "missing", "."] {
        for (mask, label) in [
            (libc::F_OK, "F_OK"),
            (libc::R_OK, "R_OK"),
            (libc::W_OK, "W_OK"),
            (libc::X_OK, "X_OK"),
            (libc::R_OK | libc::W_OK, "R_OK|W_OK"),
        ] {
            let _ = p.same(&format!("access({name}, {label}) as root"), |r| {
                access(&r.join(name), mask)
            });
        }
    }
    p.expect("root may read a 0000 file", Ok(()), |r| {
        access(&r.join("none"), libc::R_OK)
    });
    p.expect(
        "root may not exec a file without x",
        Err(libc::EACCES),
        |r| access(&r.join("rw"), libc::X_OK),
    );

    // As another user, against the mode bits.
    open_to_others(&p.mount);
    fs::set_permissions(p.plain(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mask, want) in [
        ("rw", libc::F_OK, 0),
        ("rw", libc::R_OK, 0),
        ("rw", libc::W_OK, libc::EACCES),
        ("none", libc::R_OK, libc::EACCES),
        ("missing", libc::F_OK, libc::ENOENT),
    ] {
        for root in [p.mnt(), p.plain()] {
            let c = cpath(&root.join(name));
            let got = as_nobody(|| unsafe { libc::access(c.as_ptr(), mask) });
            assert_eq!(
                got,
                want,
                "access({}, {mask}) as uid {NOBODY}",
                root.join(name).display()
            );
        }
    }
}

// ---- errors ----

#[test]
fn the_mount_is_never_less_restrictive_than_the_backing_filesystem() {
    // A backing dir on a nosuid,nodev filesystem: the overlay must be nosuid,nodev too, or a
    // setuid file there would run as its owner through the root daemon's mount.
    let tmp = tempfile::tempdir().unwrap();
    let fsdir = tmp.path().join("fs");
    fs::create_dir(&fsdir).unwrap();
    let c_fs = cpath(&fsdir);
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c_fs.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"size=16m".as_ptr().cast(),
        )
    };
    assert_eq!(r, 0, "mount tmpfs: {}", io::Error::last_os_error());
    let backing = fsdir.join("b");
    let mnt = tmp.path().join("m");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut child = std::process::Command::new(common::grainfs_bin())
        .arg("mount")
        .arg(&backing)
        .arg(&mnt)
        .arg("-f")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !common::is_mounted(&mnt) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let c = cpath(&mnt);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) });
    common::force_unmount(&mnt);
    let _ = common::wait_timeout(&mut child, std::time::Duration::from_secs(10));
    unsafe { libc::umount2(c_fs.as_ptr(), libc::MNT_DETACH) };
    r.unwrap();
    assert_ne!(
        st.f_flag & libc::ST_NOSUID,
        0,
        "mount over a nosuid fs must be nosuid"
    );
    assert_ne!(
        st.f_flag & libc::ST_NODEV,
        0,
        "mount over a nodev fs must be nodev"
    );
}

#[test]
fn o_trunc_by_another_user_clears_setuid_and_setgid_like_plain_dir() {
    let m = Mount::new();
    let plain = common::plain_dir();
    open_to_others(&m);
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut modes = vec![];
    for dir in [m.path(), plain.path()] {
        let f = dir.join("tool");
        fs::write(&f, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
        let c = cpath(&f);
        let errno = as_nobody(|| unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_TRUNC);
            if fd < 0 {
                return -1;
            }
            libc::close(fd)
        });
        assert_eq!(errno, 0, "O_TRUNC as uid 65534 in {}", dir.display());
        modes.push(fs::metadata(&f).unwrap().permissions().mode() & 0o7777);
    }
    assert_eq!(modes[0], modes[1], "mount vs plain dir after O_TRUNC");
    assert_eq!(
        modes[0] & 0o6000,
        0,
        "setuid/setgid must go: {:o}",
        modes[0]
    );
}

/// Who runs a change on a setuid/setgid file: uid/gid 65534, which lacks CAP_FSETID, or the test
/// process itself, root with CAP_FSETID.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Nobody,
    Root,
}

/// A change to a file's content or size, made with raw system calls only so that the forked child
/// of `as_nobody` may run it; `run(file, source)` returns -1 with errno set on failure.
struct Modification {
    name: &'static str,
    run: fn(&std::ffi::CStr, &std::ffi::CStr) -> libc::c_int,
    /// The file's length afterwards, which proves the change happened at all.
    len_after: u64,
}

/// What the write modifications put into the file.
const PATCH: &[u8] = b"exit 0 # patched\n";

/// open(2) `file` O_WRONLY without O_TRUNC (O_TRUNC clears the bits by itself and has its own
/// test), run `op` on the fd and close it.
fn on_wronly_fd(file: &std::ffi::CStr, op: impl FnOnce(libc::c_int) -> isize) -> libc::c_int {
    unsafe {
        let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return -1;
        }
        if op(fd) < 0 {
            // close(2) must not replace the errno that says why `op` failed.
            let errno = *libc::__errno_location();
            libc::close(fd);
            *libc::__errno_location() = errno;
            return -1;
        }
        libc::close(fd)
    }
}

/// Every way, besides O_TRUNC, that changing a file's data is meant to take its privileges away.
fn privilege_dropping_modifications() -> [Modification; 6] {
    [
        Modification {
            name: "write",
            run: |f, _| {
                on_wronly_fd(f, |fd| unsafe {
                    libc::write(fd, PATCH.as_ptr().cast(), PATCH.len())
                })
            },
            len_after: PATCH.len() as u64,
        },
        Modification {
            name: "pwrite",
            run: |f, _| {
                on_wronly_fd(f, |fd| unsafe {
                    libc::pwrite(fd, PATCH.as_ptr().cast(), PATCH.len(), 100)
                })
            },
            len_after: 100 + PATCH.len() as u64,
        },
        Modification {
            name: "ftruncate",
            run: |f, _| on_wronly_fd(f, |fd| unsafe { libc::ftruncate(fd, 4) as isize }),
            len_after: 4,
        },
        Modification {
            name: "truncate",
            run: |f, _| unsafe { libc::truncate(f.as_ptr(), 3) },
            len_after: 3,
        },
        Modification {
            name: "fallocate",
            run: |f, _| on_wronly_fd(f, |fd| unsafe { libc::fallocate(fd, 0, 0, 8192) as isize }),
            len_after: 8192,
        },
        Modification {
            name: "copy_file_range",
            run: |f, source| unsafe {
                let src = libc::open(source.as_ptr(), libc::O_RDONLY);
                if src < 0 {
                    return -1;
                }
                let r = on_wronly_fd(f, |fd| {
                    let null = std::ptr::null_mut();
                    libc::copy_file_range(src, null, fd, null, 4096, 0)
                });
                libc::close(src);
                r
            },
            len_after: 4096,
        },
    ]
}

/// Make `dir/name` a short script owned by 65534:65534 with exactly `mode`. Owning the group lets
/// uid 65534 keep a setgid bit without group exec, which the kernel takes from anyone outside the
/// group; that would hide whether the mount tells the two cases apart.
fn setid_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let f = dir.join(name);
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    // chown(2) clears both bits even for root, so the mode has to come after it.
    std::os::unix::fs::chown(&f, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    assert_eq!(mode_bits(&f), mode, "mode set on {}", f.display());
    f
}

fn mode_bits(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Run `m` on `file` as `caller`, reading from `source`; panics if it fails.
fn modify_as(caller: Caller, m: &Modification, file: &Path, source: &Path) {
    let (f, s) = (cpath(file), cpath(source));
    let errno = match caller {
        Caller::Nobody => as_nobody(|| (m.run)(&f, &s)),
        Caller::Root => outcome(cvt((m.run)(&f, &s))).err().unwrap_or(0),
    };
    assert_eq!(errno, 0, "{} as {caller:?} on {}", m.name, file.display());
}

#[test]
fn writes_truncates_and_fallocate_by_another_user_clear_setuid_setgid_and_caps_like_plain_dir() {
    let m = Mount::new();
    let plain = common::plain_dir();
    open_to_others(&m);
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let source = pattern(9, 0, 4096);
    for dir in [m.path(), plain.path()] {
        fs::write(dir.join("source"), &source).unwrap();
    }

    // Without CAP_FSETID any change to the data drops setuid; setgid goes only along with group
    // exec, since setgid without it marks mandatory locking, not privilege. CAP_FSETID keeps both.
    let cases = [
        (Caller::Nobody, 0o6777, 0o0777),
        (Caller::Nobody, 0o6767, 0o2767),
        (Caller::Root, 0o6777, 0o6777),
    ];
    for modification in &privilege_dropping_modifications() {
        for (caller, before, after) in cases {
            let case = format!("{} as {caller:?} on {before:o}", modification.name);
            let name = format!("{}-{caller:?}-{before:o}", modification.name);
            let mut seen = vec![];
            for dir in [m.path(), plain.path()] {
                let f = setid_file(dir, &name, before);
                modify_as(caller, modification, &f, &dir.join("source"));
                let content = fs::read(&f).unwrap();
                assert_eq!(
                    content.len() as u64,
                    modification.len_after,
                    "length after {case} in {}",
                    dir.display()
                );
                seen.push((mode_bits(&f), content));
            }
            assert_eq!(
                seen[0].0, seen[1].0,
                "mode after {case}: mount vs plain dir"
            );
            assert_eq!(
                seen[0].1, seen[1].1,
                "content after {case}: mount vs plain dir"
            );
            assert_eq!(seen[1].0, after, "mode after {case} in the plain dir");
            // The daemon must clear the bits on disk, not just report them cleared.
            assert_eq!(
                mode_bits(&m.backing().join(&name)),
                after,
                "mode after {case} in the backing dir"
            );
        }
    }

    // File capabilities are privilege too, and a write removes them even when root makes it.
    // A VFS_CAP_REVISION_2 blob: magic without the effective bit, CAP_NET_BIND_SERVICE permitted.
    let mut caps = Vec::with_capacity(20);
    for word in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        caps.extend_from_slice(&word.to_le_bytes());
    }
    let capable = setid_file(plain.path(), "capable", 0o755);
    match outcome(setxattr(&capable, "security.capability", &caps, 0)) {
        Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOTSUP => {
            eprintln!("skipping security.capability: the plain dir's filesystem has no xattrs");
            return;
        }
        r => r.expect("set security.capability in the plain dir"),
    }
    let capable_mnt = setid_file(m.path(), "capable", 0o755);
    setxattr(&capable_mnt, "security.capability", &caps, 0)
        .expect("set security.capability through the mount");
    let write = &privilege_dropping_modifications()[0];
    for f in [&capable_mnt, &capable] {
        // Seen before the write, so that its absence afterwards means it was removed.
        assert_eq!(
            getxattr(f, "security.capability").unwrap(),
            caps,
            "capability on {}",
            f.display()
        );
        modify_as(Caller::Root, write, f, &plain.path().join("source"));
        assert_eq!(
            outcome(getxattr(f, "security.capability")),
            Err(libc::ENODATA),
            "capability after a root write to {}",
            f.display()
        );
    }
    assert_eq!(
        outcome(getxattr(
            &m.backing().join("capable"),
            "security.capability"
        )),
        Err(libc::ENODATA),
        "capability after a root write, in the backing dir"
    );
    assert_eq!(
        mode_bits(&capable_mnt),
        mode_bits(&capable),
        "mode after a root write to a file with capabilities: mount vs plain dir"
    );
    assert_eq!(mode_bits(&capable), 0o755);
}

/// Root of a user namespace (a rootless container, `unshare -Ur`) holds every capability
/// there and none over our files: its truncate, fallocate and write must clear setuid and
/// setgid as on a plain directory, although /proc shows CAP_FSETID in its effective set.
#[test]
fn root_of_a_user_namespace_loses_setuid_and_setgid_like_plain_dir() {
    if common::missing("unshare") || common::missing("fallocate") || common::missing("truncate") {
        return;
    }
    let probe = std::process::Command::new("unshare")
        .args(["-Ur", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: no user namespaces here (unshare -Ur true failed)");
        return;
    }
    let m = Mount::new();
    let plain = common::plain_dir();
    let cases: [(&str, &str); 3] = [
        ("truncate", "truncate -s 10 \"$1\""),
        ("fallocate", "fallocate -l 8192 \"$1\""),
        ("write", "printf x >> \"$1\""),
    ];
    for (name, script) in cases {
        let mut modes = vec![];
        for dir in [m.path(), plain.path()] {
            let f = dir.join(name);
            fs::write(&f, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
            let st = std::process::Command::new("unshare")
                .args(["-Ur", "sh", "-c", script, "sh"])
                .arg(&f)
                .status()
                .expect("run unshare");
            assert!(
                st.success(),
                "{name} in a user namespace on {}",
                f.display()
            );
            modes.push(fs::metadata(&f).unwrap().permissions().mode() & 0o7777);
        }
        assert_eq!(modes[0], modes[1], "{name}: mount vs plain dir");
        assert_eq!(modes[0], 0o777, "{name}: setuid/setgid must go");
    }
}
