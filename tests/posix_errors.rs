//! Errors through a real mount: every failing call returns the errno the backing filesystem
//! returns on a plain dir, and leaves both trees unchanged.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::posix::*;

// ---- errors ----

#[test]
fn errors_are_the_backing_filesystems() {
    let p = Pair::new();
    p.both("populate", |r| {
        fs::write(r.join("f"), b"file")?;
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("d/x"), b"x")?;
        fs::create_dir(r.join("e"))?;
        std::os::unix::fs::symlink("f", r.join("l"))?;
        Ok(())
    });
    let long_name = "n".repeat(256);
    let fails = |what: &str, errno: i32, op: &dyn Fn(&Path) -> io::Result<()>| {
        p.expect(what, Err(errno), op)
    };
    fails("open missing", libc::ENOENT, &|r| {
        File::open(r.join("missing")).map(drop)
    });
    fails("create in missing dir", libc::ENOENT, &|r| {
        File::create(r.join("no/f")).map(drop)
    });
    fails("path through a file", libc::ENOTDIR, &|r| {
        File::open(r.join("f/x")).map(drop)
    });
    fails("rmdir a file", libc::ENOTDIR, &|r| {
        fs::remove_dir(r.join("f"))
    });
    fails("rmdir non-empty", libc::ENOTEMPTY, &|r| {
        fs::remove_dir(r.join("d"))
    });
    fails("rmdir missing", libc::ENOENT, &|r| {
        fs::remove_dir(r.join("missing"))
    });
    fails("rmdir dot", libc::EINVAL, &|r| {
        fs::remove_dir(r.join("e/."))
    });
    fails("unlink a dir", libc::EISDIR, &|r| {
        fs::remove_file(r.join("e"))
    });
    fails("unlink missing", libc::ENOENT, &|r| {
        fs::remove_file(r.join("missing"))
    });
    fails("mkdir existing file", libc::EEXIST, &|r| {
        fs::create_dir(r.join("f"))
    });
    fails("mkdir over symlink", libc::EEXIST, &|r| {
        fs::create_dir(r.join("l"))
    });
    fails("mkfifo existing", libc::EEXIST, &|r| {
        mkfifo(&r.join("f"), 0o644)
    });
    fails("symlink existing", libc::EEXIST, &|r| {
        std::os::unix::fs::symlink("x", r.join("d"))
    });
    fails("link a dir", libc::EPERM, &|r| {
        fs::hard_link(r.join("e"), r.join("e2"))
    });
    fails("link missing", libc::ENOENT, &|r| {
        fs::hard_link(r.join("missing"), r.join("m2"))
    });
    fails("open dir for writing", libc::EISDIR, &|r| {
        OpenOptions::new().write(true).open(r.join("e")).map(drop)
    });
    fails("read a dir", libc::EISDIR, &|r| {
        File::open(r.join("e"))?
            .read_to_end(&mut Vec::new())
            .map(drop)
    });
    fails("O_DIRECTORY on a file", libc::ENOTDIR, &|r| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(r.join("f"))
            .map(drop)
    });
    fails("O_NOFOLLOW on a symlink", libc::ELOOP, &|r| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(r.join("l"))
            .map(drop)
    });
    fails("readlink a file", libc::EINVAL, &|r| {
        fs::read_link(r.join("f")).map(drop)
    });
    fails("truncate a dir", libc::EISDIR, &|r| {
        truncate_path(&r.join("e"), 0)
    });
    fails("truncate negative", libc::EINVAL, &|r| {
        let c = cpath(&r.join("f"));
        cvt(unsafe { libc::truncate(c.as_ptr(), -1) }).map(drop)
    });
    fails("name too long", libc::ENAMETOOLONG, &|r| {
        File::create(r.join(&long_name)).map(drop)
    });
    fails("rename missing", libc::ENOENT, &|r| {
        fs::rename(r.join("missing"), r.join("m2"))
    });
    fails("rename file over dir", libc::EISDIR, &|r| {
        fs::rename(r.join("f"), r.join("e"))
    });
    fails("rename dir over file", libc::ENOTDIR, &|r| {
        fs::rename(r.join("e"), r.join("f"))
    });
    fails("rename dir over non-empty dir", libc::ENOTEMPTY, &|r| {
        fs::rename(r.join("e"), r.join("d"))
    });
    fails("rename dir into itself", libc::EINVAL, &|r| {
        fs::rename(r.join("d"), r.join("d/sub"))
    });
    fails("rename with both flags", libc::EINVAL, &|r| {
        renameat2(
            &r.join("f"),
            &r.join("g"),
            libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE,
        )
    });
    fails("chmod missing", libc::ENOENT, &|r| {
        fs::set_permissions(r.join("missing"), fs::Permissions::from_mode(0o644))
    });
    fails("getxattr missing name", libc::ENODATA, &|r| {
        getxattr(&r.join("f"), "user.none").map(drop)
    });
    fails("setxattr bad namespace", libc::EOPNOTSUPP, &|r| {
        setxattr(&r.join("f"), "bogus.name", b"v", 0)
    });
    fails(
        "fallocate punch without keep-size",
        libc::EOPNOTSUPP,
        &|r| {
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 1)
        },
    );
    fails("fallocate on O_RDONLY", libc::EBADF, &|r| {
        fallocate(&File::open(r.join("f"))?, 0, 0, 4096)
    });
    fails("SEEK_DATA past end", libc::ENXIO, &|r| {
        lseek(&File::open(r.join("f"))?, 100, libc::SEEK_DATA).map(drop)
    });
    // Nothing above changed the trees.
    p.same("listing after errors", listing).unwrap();
    p.expect("content after errors", Ok(b"file".to_vec()), |r| {
        fs::read(r.join("f"))
    });
}
