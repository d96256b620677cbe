//! Links and special files through a real mount: hard links as one inode, symlinks and fifos
//! like a plain dir, symlinks leading out of the backing dir followed by the kernel as the
//! caller (never by the daemon), and `..` resolved by the kernel.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::posix::*;
use common::Mount;

// ---- namespace ----

#[test]
fn hard_links_are_one_inode_through_the_mount() {
    let p = Pair::new();
    p.expect("link", Ok((2, 2)), |r| {
        fs::write(r.join("one"), b"first")?;
        fs::hard_link(r.join("one"), r.join("two"))?;
        Ok((
            fs::metadata(r.join("one"))?.nlink(),
            fs::metadata(r.join("two"))?.nlink(),
        ))
    });
    let one = fs::metadata(p.mnt().join("one")).unwrap();
    let two = fs::metadata(p.mnt().join("two")).unwrap();
    assert_eq!(one.ino(), two.ino(), "same inode number through the mount");
    assert_eq!(
        fs::metadata(p.mount.backing().join("one")).unwrap().nlink(),
        2
    );
    p.expect(
        "write through one name, read through the other",
        Ok(b"fiXXt".to_vec()),
        |r| {
            OpenOptions::new()
                .write(true)
                .open(r.join("two"))?
                .write_all_at(b"XX", 2)?;
            fs::read(r.join("one"))
        },
    );
    p.expect(
        "chmod through one name shows on the other",
        Ok(0o600),
        |r| {
            fs::set_permissions(r.join("one"), fs::Permissions::from_mode(0o600))?;
            Ok(fs::metadata(r.join("two"))?.mode() & 0o7777)
        },
    );
    p.expect("link in a subdir", Ok(3), |r| {
        fs::create_dir(r.join("sub"))?;
        fs::hard_link(r.join("two"), r.join("sub/three"))?;
        Ok(fs::metadata(r.join("one"))?.nlink())
    });
    p.expect("unlink one name", Ok((2, b"fiXXt".to_vec())), |r| {
        fs::remove_file(r.join("one"))?;
        Ok((
            fs::metadata(r.join("two"))?.nlink(),
            fs::read(r.join("sub/three"))?,
        ))
    });
    p.expect("link onto existing name", Err(libc::EEXIST), |r| {
        fs::hard_link(r.join("two"), r.join("sub/three"))
    });
}

#[test]
fn symlinks_and_fifos_match_plain_dir() {
    let p = Pair::new();
    p.expect(
        "symlink + readlink",
        Ok(PathBuf::from("some/where/../target")),
        |r| {
            std::os::unix::fs::symlink("some/where/../target", r.join("rel"))?;
            fs::read_link(r.join("rel"))
        },
    );
    p.same("symlink attributes", |r| lshape(&r.join("rel")))
        .unwrap();
    p.expect(
        "symlink to absolute path",
        Ok(PathBuf::from("/etc/hostname")),
        |r| {
            std::os::unix::fs::symlink("/etc/hostname", r.join("abs"))?;
            fs::read_link(r.join("abs"))
        },
    );
    p.expect("follow relative symlink", Ok(b"via link".to_vec()), |r| {
        fs::write(r.join("real"), b"via link")?;
        std::os::unix::fs::symlink("real", r.join("to-real"))?;
        fs::read(r.join("to-real"))
    });
    p.expect("write through symlink", Ok(b"changed".to_vec()), |r| {
        fs::write(r.join("to-real"), b"changed")?;
        fs::read(r.join("real"))
    });
    p.expect("dangling symlink", Err(libc::ENOENT), |r| {
        std::os::unix::fs::symlink("missing", r.join("dangle"))?;
        fs::read(r.join("dangle"))
    });
    let long_target = "x".repeat(4000);
    p.expect("long target", Ok(PathBuf::from(&long_target)), |r| {
        std::os::unix::fs::symlink(&long_target, r.join("long"))?;
        fs::read_link(r.join("long"))
    });
    p.expect("mkfifo", Ok(()), |r| mkfifo(&r.join("fifo"), 0o640));
    p.same("fifo attributes", |r| lshape(&r.join("fifo")))
        .unwrap();
    assert_eq!(lshape(&p.mnt().join("fifo")).unwrap().kind, "fifo");
    assert_eq!(
        lshape(&p.mount.backing().join("fifo")).unwrap().kind,
        "fifo"
    );
    // The fifo is the kernel's: a reader and a writer through the mount meet.
    let fifo = p.mnt().join("fifo");
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || fs::write(fifo, b"through the pipe")
    });
    let got = fs::read(&fifo).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(got, b"through the pipe");
}

// ---- symlinks leading out of the backing dir, and `..` ----

#[test]
fn symlink_out_of_backing_is_followed_as_the_caller() {
    let m = Mount::new();
    open_to_others(&m);
    let outside = m.scratch().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(outside.join("secret"), b"root secret").unwrap();
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&outside, m.backing().join("out")).unwrap();

    let link = m.path().join("out");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), outside);
    assert_eq!(
        read_as_nobody(&link.join("secret")),
        libc::EACCES,
        "uid {NOBODY} read the secret through the symlink"
    );
    let listed = cpath(&link);
    assert_eq!(
        as_nobody(|| unsafe {
            let fd = libc::open(listed.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            if fd < 0 {
                return -1;
            }
            libc::close(fd)
        }),
        libc::EACCES,
        "uid {NOBODY} listed the 0700 dir through the symlink"
    );
    if !common::missing("setpriv") {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(link.join("secret"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "cat as nobody succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "secret leaked: {:?}", out.stdout);
    }
    // Root may follow it, as on any filesystem: the kernel resolves the target, not the daemon.
    assert_eq!(fs::read(link.join("secret")).unwrap(), b"root secret");
    // A relative symlink that climbs out works the same way.
    std::os::unix::fs::symlink("../scratch/outside", m.backing().join("rel-out")).unwrap();
    assert_eq!(
        read_as_nobody(&m.path().join("rel-out/secret")),
        libc::EACCES
    );
    assert_eq!(
        fs::canonicalize(m.path().join("rel-out")).unwrap(),
        m.path().parent().unwrap().join("scratch/outside")
    );
}

#[test]
fn dotdot_is_resolved_by_the_kernel_not_the_daemon() {
    let m = Mount::with_setup(
        |b| {
            fs::create_dir_all(b.join("sub/deeper")).unwrap();
        },
        None,
    );
    let temp_root = m.path().parent().unwrap().to_path_buf();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&m.path().join("..")), ino(&temp_root), "<mnt>/..");
    assert_eq!(
        ino(&m.path().join("sub/../..")),
        ino(&temp_root),
        "<mnt>/sub/../.."
    );
    assert_eq!(
        ino(&m.path().join("sub/deeper/../../..")),
        ino(&temp_root),
        "<mnt>/sub/deeper/../../.."
    );
    assert_eq!(ino(&m.path().join("sub/..")), ino(m.path()), "<mnt>/sub/..");
    assert_eq!(
        fs::canonicalize(m.path().join("sub/../..")).unwrap(),
        temp_root
    );
    // `..` of the mount is the temp dir, which holds the backing dir: never the backing's parent
    // seen as if it were inside the mount.
    let above: Vec<_> = listing(&m.path().join("sub/../.."))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(above.contains(&"mnt".to_string()), "{above:?}");
    assert!(above.contains(&"backing".to_string()), "{above:?}");
}
