//! What a snapshot and the store grant, through a real mount: a setuid-root program in a
//! snapshot runs without privilege for an ordinary user and shows without its setuid and
//! setgid bits (unless `snapshot_setuid = true`), no snapshot file shows
//! `security.capability`, and every directory and file the daemon makes in the store is
//! private to it (0700, 0600) although it runs with umask 0.
//!
//! The ordinary user is nobody (65534), through util-linux `setpriv`; the tests skip when it
//! is missing or when they do not run as root.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::Mount;

const NOBODY: u32 = 65534;
/// From linux/capability.h.
const CAP_SETUID: u32 = 7;
/// `/usr/bin/id` copied into the tree: `id -u` prints the effective uid.
const PROGRAM: &str = "bin/whoami-id";

fn root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (to make a setuid-root program and to become nobody)");
        return false;
    }
    true
}

/// Run `program -u` as nobody; its output, the effective uid it saw.
fn euid_as_nobody(program: &Path) -> u32 {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(program)
        .arg("-u")
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "{} as nobody: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("id -u printed {text:?}"))
}

/// A mount whose temp dirs nobody may traverse (the fixture makes them private).
fn mount(config: Option<&str>) -> Mount {
    Mount::with_setup(
        |backing| {
            let tmp = backing.parent().expect("temp dir");
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        },
        config,
    )
}

fn snapshot(m: &Mount, name: &str) {
    let out = Command::new(common::grainfs_bin())
        .args(["snapshot", "create", "--name", name, "-m"])
        .arg(m.path())
        .output()
        .expect("run grainfs snapshot create");
    assert!(
        out.status.success(),
        "snapshot create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Put a setuid-and-setgid root copy of `id` in the live tree; false (skip) when the mount
/// does not honour setuid at all (a nosuid backing filesystem), where the test proves nothing.
fn setuid_program(m: &Mount) -> bool {
    if common::missing("setpriv") {
        return false;
    }
    let live = m.path().join(PROGRAM);
    fs::create_dir_all(live.parent().expect("parent")).expect("mkdir");
    fs::copy("/usr/bin/id", &live).expect("copy id");
    fs::set_permissions(&live, fs::Permissions::from_mode(0o6755)).expect("chmod 6755");
    if euid_as_nobody(&live) != 0 {
        eprintln!("SKIP: the mount does not honour setuid here (nosuid backing filesystem?)");
        return false;
    }
    true
}

fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    let mut buf = vec![0u8; 256];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `security.capability` granting CAP_SETUID (version 2, effective), as `setcap
/// cap_setuid+ep` writes it.
fn set_capability(path: &Path) -> bool {
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(&(1u32 << CAP_SETUID).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new("security.capability").expect("name");
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r != 0 {
        eprintln!(
            "SKIP (capability part): setxattr security.capability: {}",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}

#[test]
fn a_setuid_root_program_in_a_snapshot_runs_without_privilege() {
    if !root() {
        return;
    }
    let m = mount(None);
    if !setuid_program(&m) {
        return;
    }
    let live = m.path().join(PROGRAM);
    let capable = set_capability(&live);
    snapshot(&m, "s1");
    // The hole is fixed in the live tree; the snapshot keeps the program as it was.
    fs::set_permissions(&live, fs::Permissions::from_mode(0o755)).expect("chmod 755");
    assert_eq!(euid_as_nobody(&live), NOBODY);

    let old = m.path().join(".snapshots/s1").join(PROGRAM);
    let st = fs::metadata(&old).expect("stat snapshot copy");
    assert_eq!(st.mode() & 0o7777, 0o755, "mode {:o}", st.mode());
    assert_eq!(st.uid(), 0, "still owned by root, as recorded");
    assert_eq!(
        euid_as_nobody(&old),
        NOBODY,
        "a setuid program in a snapshot ran as root"
    );
    if capable {
        assert!(getxattr(&live, "security.capability").is_ok());
        assert_eq!(
            getxattr(&old, "security.capability"),
            Err(libc::ENODATA),
            "a snapshot file shows a capability"
        );
    }
    m.unmount();
}

/// `snapshot_setuid = true` shows the recorded bits, for restores that copy modes.
#[test]
fn snapshot_setuid_true_shows_the_recorded_bits() {
    if !root() {
        return;
    }
    let m = mount(Some("snapshot_setuid = true\n"));
    let live = m.path().join(PROGRAM);
    fs::create_dir_all(live.parent().expect("parent")).expect("mkdir");
    fs::copy("/usr/bin/id", &live).expect("copy id");
    fs::set_permissions(&live, fs::Permissions::from_mode(0o6755)).expect("chmod 6755");
    snapshot(&m, "s1");
    fs::set_permissions(&live, fs::Permissions::from_mode(0o755)).expect("chmod 755");
    let old = m.path().join(".snapshots/s1").join(PROGRAM);
    let st = fs::metadata(&old).expect("stat snapshot copy");
    assert_eq!(st.mode() & 0o7777, 0o6755, "mode {:o}", st.mode());
    m.unmount();
}

/// Every directory and file under `dir` with its mode, as (path, is_dir, mode & 0o7777).
fn walk(dir: &Path, out: &mut Vec<(String, bool, u32)>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}")) {
        let e = e.expect("entry");
        let st = fs::symlink_metadata(e.path()).expect("lstat");
        out.push((
            e.path().display().to_string(),
            st.is_dir(),
            st.mode() & 0o7777,
        ));
        if st.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn the_store_is_private_to_the_daemon_whatever_the_umask() {
    let mut m = mount(None);
    let mnt = m.path().to_path_buf();
    fs::create_dir(mnt.join("vms")).expect("mkdir");
    fs::write(mnt.join("vms/a.img"), vec![7u8; 300_000]).expect("write");
    snapshot(&m, "s1");
    fs::write(mnt.join("vms/a.img"), vec![9u8; 100_000]).expect("write");
    snapshot(&m, "s2");
    assert_eq!(
        fs::read(mnt.join(".snapshots/s1/vms/a.img")).expect("read s1"),
        vec![7u8; 300_000]
    );
    let status = m.stop();
    assert!(status.success(), "daemon exit: {status}");

    let store = m.store();
    let top = fs::metadata(&store).expect("stat store").mode() & 0o7777;
    let mut entries = vec![(store.display().to_string(), true, top)];
    walk(&store, &mut entries);
    assert!(
        entries.iter().any(|(p, ..)| p.ends_with("pack-000000")),
        "{entries:#?}"
    );
    // No exceptions: the lock file and the control socket are 0600 too (the socket is
    // removed at unmount anyway).
    let wrong: Vec<String> = entries
        .iter()
        .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
        .map(|(p, dir, mode)| format!("{p} ({}) {mode:o}", if *dir { "dir" } else { "file" }))
        .collect();
    assert!(
        wrong.is_empty(),
        "not 0700 (dirs) / 0600 (files): {wrong:#?}"
    );
}
