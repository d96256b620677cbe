//! Extended attributes through a real mount: user xattrs set, read, listed and removed like on a
//! plain dir, with the same errnos.

mod common;

use std::fs::{self};

use common::posix::*;

// ---- xattrs ----

#[test]
fn user_xattrs_round_trip_like_plain_dir() {
    let p = Pair::new();
    p.both("create", |r| {
        fs::write(r.join("f"), b"x")?;
        fs::create_dir(r.join("d"))
    });
    if let Err(e) = setxattr(&p.plain().join("f"), "user.probe", b"1", 0) {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            eprintln!(
                "SKIP: no user xattrs on the filesystem of {}",
                p.plain().display()
            );
            return;
        }
        panic!("setxattr probe: {e}");
    }
    removexattr(&p.plain().join("f"), "user.probe").unwrap();
    for name in ["f", "d"] {
        p.expect(&format!("set on {name}"), Ok(()), |r| {
            setxattr(&r.join(name), "user.test", b"value one", 0)
        });
        p.expect(&format!("get on {name}"), Ok(b"value one".to_vec()), |r| {
            getxattr(&r.join(name), "user.test")
        });
        assert_eq!(
            getxattr(&p.mount.backing().join(name), "user.test").unwrap(),
            b"value one"
        );
        p.expect(
            &format!("XATTR_CREATE on existing {name}"),
            Err(libc::EEXIST),
            |r| setxattr(&r.join(name), "user.test", b"v", libc::XATTR_CREATE),
        );
        p.expect(
            &format!("XATTR_REPLACE on missing {name}"),
            Err(libc::ENODATA),
            |r| setxattr(&r.join(name), "user.other", b"v", libc::XATTR_REPLACE),
        );
        p.expect(&format!("replace on {name}"), Ok(b"2".to_vec()), |r| {
            setxattr(&r.join(name), "user.test", b"2", libc::XATTR_REPLACE)?;
            getxattr(&r.join(name), "user.test")
        });
        p.expect(&format!("empty value on {name}"), Ok(Vec::new()), |r| {
            setxattr(&r.join(name), "user.empty", b"", 0)?;
            getxattr(&r.join(name), "user.empty")
        });
        p.expect(
            &format!("list on {name}"),
            Ok(vec!["user.empty".to_string(), "user.test".to_string()]),
            |r| list_user_xattrs(&r.join(name)),
        );
        p.expect(
            &format!("remove on {name}"),
            Ok(vec!["user.empty".to_string()]),
            |r| {
                removexattr(&r.join(name), "user.test")?;
                list_user_xattrs(&r.join(name))
            },
        );
        p.expect(&format!("get removed on {name}"), Err(libc::ENODATA), |r| {
            getxattr(&r.join(name), "user.test")
        });
        p.expect(
            &format!("remove missing on {name}"),
            Err(libc::ENODATA),
            |r| removexattr(&r.join(name), "user.test"),
        );
    }
    let big = vec![b'v'; 3000];
    p.expect("3000-byte value", Ok(big.clone()), |r| {
        setxattr(&r.join("f"), "user.big", &big, 0)?;
        getxattr(&r.join("f"), "user.big")
    });
    p.expect("get on missing file", Err(libc::ENOENT), |r| {
        getxattr(&r.join("missing"), "user.test")
    });
}
