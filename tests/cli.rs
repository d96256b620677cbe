//! The grainfs binary as a user runs it: background and foreground mounts, umount, the errors a
//! user meets (each naming the path), config files, an unprivileged mount through fusermount3,
//! and --help. Every test detaches its mounts on drop, even when it panics.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{force_unmount, grainfs_bin, is_mounted, wait_timeout};

/// A fresh temp dir with an empty `backing` and `mnt` in it.
struct Dirs {
    tmp: tempfile::TempDir,
    root: PathBuf,
    backing: PathBuf,
    mnt: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::Builder::new()
        .prefix("grainfs-cli-")
        .tempdir()
        .expect("tempdir");
    let root = tmp.path().canonicalize().expect("canonicalize");
    let backing = root.join("backing");
    let mnt = root.join("mnt");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    Dirs {
        tmp,
        root,
        backing,
        mnt,
    }
}

/// Detaches every listed mount point on drop and kills the listed children, panic or not.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Cleanup {
    fn of(p: &Path) -> Cleanup {
        let mut c = Cleanup::default();
        c.mount(p);
        c
    }

    fn mount(&mut self, p: &Path) {
        self.mounts.push(p.to_path_buf());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            force_unmount(m);
        }
        for c in &mut self.children {
            if wait_timeout(c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn grainfs(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(grainfs_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.stdin(Stdio::null()).output().expect("run grainfs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert failure with a message on stderr containing every one of `needles`.
fn assert_fails_naming(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got {}; stderr: {err}",
        o.status
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not name {n:?}: {err}");
    }
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        stderr(o)
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// True if some process holds the store's daemon lock.
fn store_locked(backing: &Path) -> bool {
    let f = File::open(backing.join(".grainfs").join("daemon.lock")).expect("daemon.lock");
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == -1
}

fn log_text(backing: &Path) -> String {
    std::fs::read_to_string(backing.join(".grainfs").join("grainfs.log")).unwrap_or_default()
}

fn wait_mounted(mnt: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(mnt) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "grainfs exited ({st}) before mounting: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "mount not live after 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn background_mount_is_live_on_return_and_umount_stops_the_daemon() {
    let d = dirs();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    std::fs::write(d.backing.join("a.img"), b"hello volume").unwrap();

    let o = grainfs(&[&"mount", &d.backing, &d.mnt]);
    assert_ok(&o, "grainfs mount");
    // No sleep, no poll: the command returned only once the mount was live.
    assert_eq!(
        std::fs::read(d.mnt.join("a.img")).expect("read through the mount right away"),
        b"hello volume"
    );
    assert!(is_mounted(&d.mnt));

    // The daemon outlives the command and keeps serving.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(d.mnt.join("b.img"), b"written later").unwrap();
    assert_eq!(
        std::fs::read(d.backing.join("b.img")).unwrap(),
        b"written later"
    );
    assert_eq!(std::fs::read(d.mnt.join("a.img")).unwrap(), b"hello volume");
    assert!(
        store_locked(&d.backing),
        "a live daemon holds the store lock"
    );

    // Logs go to the store, which is private to its owner.
    let store = d.backing.join(".grainfs");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "store mode {mode:o}");
    let log = log_text(&d.backing);
    assert!(log.contains("mounted"), "log: {log:?}");
    assert!(
        !d.mnt.join(".grainfs").exists(),
        "store visible through the mount"
    );

    let o = grainfs(&[&"umount", &d.mnt]);
    assert_ok(&o, "grainfs umount");
    assert!(!is_mounted(&d.mnt), "still mounted after grainfs umount");
    assert!(
        !store_locked(&d.backing),
        "the daemon still holds the store after umount returned"
    );
    let log = log_text(&d.backing);
    assert!(log.contains("unmounted"), "log: {log:?}");
    // The files stay in the backing dir, the mount point is an empty dir again.
    assert_eq!(
        std::fs::read(d.backing.join("b.img")).unwrap(),
        b"written later"
    );
    assert_eq!(std::fs::read_dir(&d.mnt).unwrap().count(), 0);
}

#[test]
fn missing_backing_dir_is_an_error_naming_it() {
    let d = dirs();
    let _clean = Cleanup::of(&d.mnt);
    let missing = d.root.join("no-such-backing");
    let o = grainfs(&[&"mount", &missing, &d.mnt]);
    assert_fails_naming(&o, &[&s(&missing)]);
    assert!(!is_mounted(&d.mnt));
}

#[test]
fn missing_mount_point_is_an_error_naming_it() {
    let d = dirs();
    let missing = d.root.join("no-such-mnt");
    let o = grainfs(&[&"mount", &d.backing, &missing]);
    assert_fails_naming(&o, &[&s(&missing)]);
    assert!(!missing.exists());
}

#[test]
fn backing_that_is_a_file_is_an_error_naming_it() {
    let d = dirs();
    let _clean = Cleanup::of(&d.mnt);
    let file = d.root.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let o = grainfs(&[&"mount", &file, &d.mnt]);
    assert_fails_naming(&o, &[&s(&file), "not a directory"]);
    assert!(!is_mounted(&d.mnt));
}

#[test]
fn mounting_twice_on_one_mount_point_is_busy() {
    let d = dirs();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    let o = grainfs(&[&"mount", &d.backing, &d.mnt]);
    assert_ok(&o, "first mount");
    let o = grainfs(&[&"mount", &d.backing, &d.mnt]);
    assert_fails_naming(&o, &[&s(&d.mnt), "busy"]);
    // The first mount is unharmed.
    std::fs::write(d.mnt.join("x"), b"still here").unwrap();
    assert_eq!(std::fs::read(d.backing.join("x")).unwrap(), b"still here");
    assert_ok(&grainfs(&[&"umount", &d.mnt]), "umount");
}

#[test]
fn second_daemon_on_one_backing_dir_is_refused() {
    let d = dirs();
    let mnt2 = d.root.join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    clean.mount(&mnt2);
    assert_ok(&grainfs(&[&"mount", &d.backing, &d.mnt]), "first mount");
    let o = grainfs(&[&"mount", &d.backing, &mnt2]);
    assert_fails_naming(&o, &[&s(&d.backing), "in use by another grainfs daemon"]);
    assert!(
        !is_mounted(&mnt2),
        "the second mount point must stay unmounted"
    );
    assert!(is_mounted(&d.mnt));
    std::fs::write(d.mnt.join("x"), b"x").unwrap();
    assert_ok(&grainfs(&[&"umount", &d.mnt]), "umount");
}

#[test]
fn mount_point_inside_the_backing_dir_is_refused() {
    let d = dirs();
    let inner = d.backing.join("inner");
    std::fs::create_dir(&inner).unwrap();
    let _clean = Cleanup::of(&inner);
    let o = grainfs(&[&"mount", &d.backing, &inner]);
    assert_fails_naming(&o, &[&s(&inner), "inside the backing dir"]);
    assert!(!is_mounted(&inner));
}

#[test]
fn umount_of_a_dir_that_is_not_mounted_fails() {
    let d = dirs();
    let o = grainfs(&[&"umount", &d.mnt]);
    assert_fails_naming(&o, &[&s(&d.mnt), "not mounted"]);
    let missing = d.root.join("nowhere");
    let o = grainfs(&[&"umount", &missing]);
    assert_fails_naming(&o, &[&s(&missing)]);
}

#[test]
fn umount_while_a_process_works_in_the_mount_is_busy() {
    let d = dirs();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    std::fs::create_dir(d.backing.join("sub")).unwrap();
    std::fs::write(d.backing.join("f"), b"data").unwrap();
    assert_ok(&grainfs(&[&"mount", &d.backing, &d.mnt]), "mount");

    let sleeper = Command::new("sleep")
        .arg("60")
        .current_dir(d.mnt.join("sub"))
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id() as libc::pid_t;
    clean.children.push(sleeper);
    // Be sure the child has its cwd in place (spawn returns after exec).
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, d.mnt.join("sub"));

    let o = grainfs(&[&"umount", &d.mnt]);
    assert_fails_naming(&o, &[&s(&d.mnt), "busy"]);
    assert!(is_mounted(&d.mnt), "a refused umount must leave the mount");
    assert_eq!(std::fs::read(d.mnt.join("f")).unwrap(), b"data");
    assert!(store_locked(&d.backing), "the daemon must still be serving");

    unsafe { libc::kill(pid, libc::SIGKILL) };
    for c in &mut clean.children {
        let _ = c.wait();
    }
    assert_ok(&grainfs(&[&"umount", &d.mnt]), "umount once idle");
    assert!(!is_mounted(&d.mnt));
}

fn foreground_signal_unmounts(signal: libc::c_int) {
    let d = dirs();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    std::fs::write(d.backing.join("f"), b"fg").unwrap();
    let log = d.root.join("fg.log");
    let child = Command::new(grainfs_bin())
        .arg("mount")
        .arg("-f")
        .arg(&d.backing)
        .arg(&d.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn grainfs -f");
    clean.children.push(child);
    let child = clean.children.last_mut().unwrap();
    wait_mounted(&d.mnt, child, &log);
    assert_eq!(std::fs::read(d.mnt.join("f")).unwrap(), b"fg");

    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let status = wait_timeout(child, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "grainfs -f did not exit on signal {signal}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "exit status {status}; log: {text}");
    assert!(!is_mounted(&d.mnt), "still mounted after signal {signal}");
    assert!(text.contains("unmounted"), "log: {text}");
    assert!(!store_locked(&d.backing));
}

#[test]
fn foreground_sigterm_unmounts_cleanly() {
    foreground_signal_unmounts(libc::SIGTERM);
}

#[test]
fn foreground_sigint_unmounts_cleanly() {
    foreground_signal_unmounts(libc::SIGINT);
}

#[test]
fn mount_with_a_config_naming_backing_and_mountpoint() {
    let d = dirs();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    std::fs::write(d.backing.join("c.img"), b"from config").unwrap();
    let cfg = d.root.join("grainfs.toml");
    std::fs::write(
        &cfg,
        format!(
            "backing = \"{}\"\nmountpoint = \"{}\"\nthreads = 2\n",
            s(&d.backing),
            s(&d.mnt)
        ),
    )
    .unwrap();
    let o = grainfs(&[&"mount", &"-c", &cfg]);
    assert_ok(&o, "grainfs mount -c");
    assert_eq!(std::fs::read(d.mnt.join("c.img")).unwrap(), b"from config");
    let o = grainfs(&[&"umount", &d.mnt]);
    assert_ok(&o, "grainfs umount");
    assert!(!is_mounted(&d.mnt));
}

#[test]
fn check_config_accepts_the_documented_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/grainfs.toml");
    let o = grainfs(&[&"check-config", &example]);
    assert_ok(&o, "check-config conf/grainfs.toml");
}

#[test]
fn check_config_names_an_unknown_key_and_its_line() {
    let d = dirs();
    let cfg = d.root.join("bad.toml");
    std::fs::write(
        &cfg,
        "backing = \"/srv/volumes\"\n# a comment\nbogus_key = 1\n",
    )
    .unwrap();
    let o = grainfs(&[&"check-config", &cfg]);
    assert_fails_naming(&o, &["bogus_key", ":3:", &s(&cfg)]);

    // In a table too.
    std::fs::write(
        &cfg,
        "[tracking]\nblock_size = \"64KiB\"\nblok_size = \"4KiB\"\n",
    )
    .unwrap();
    let o = grainfs(&[&"check-config", &cfg]);
    assert_fails_naming(&o, &["blok_size", ":3:"]);

    // A mount with that config fails the same way and mounts nothing.
    let _clean = Cleanup::of(&d.mnt);
    let o = grainfs(&[&"mount", &"-c", &cfg, &d.backing, &d.mnt]);
    assert_fails_naming(&o, &["blok_size"]);
    assert!(!is_mounted(&d.mnt));
}

/// Run `args` as uid/gid 65534 with no supplementary groups.
fn as_nobody(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        grainfs_bin(),
    ]);
    for a in args {
        cmd.arg(a);
    }
    cmd.stdin(Stdio::null()).output().expect("run setpriv")
}

#[test]
#[ignore = "environment: /dev/fuse is crw------- root:root here, so fuser 0.18 fails to open it \
            (EACCES) for uid 65534 before trying its fusermount3 fallback; the same scenario passes \
            with a 0666 /dev/fuse, see unprivileged_mount_with_a_world_usable_dev_fuse"]
fn unprivileged_mount_through_fusermount3() {
    if unsafe { libc::geteuid() } != 0 || common::missing("setpriv") {
        return;
    }
    let d = dirs();
    std::fs::set_permissions(d.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut clean = Cleanup::default();
    clean.mount(&d.mnt);
    std::fs::write(d.backing.join("u.img"), b"user data").unwrap();
    for p in [&d.backing, &d.mnt, &d.backing.join("u.img")] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let o = as_nobody(&[&"mount", &d.backing, &d.mnt]);
    assert_ok(&o, "grainfs mount as uid 65534");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(d.mnt.join("u.img"))
        .output()
        .unwrap();
    assert_ok(&o, "cat as uid 65534");
    assert_eq!(o.stdout, b"user data");
    let o = as_nobody(&[&"umount", &d.mnt]);
    assert_ok(&o, "grainfs umount as uid 65534");
    assert!(!is_mounted(&d.mnt));
}

/// On drop, SIGTERM the daemon that holds the store of this backing dir, if any still does.
struct StopDaemon(PathBuf);

impl Drop for StopDaemon {
    fn drop(&mut self) {
        let lock = self.0.join(".grainfs").join("daemon.lock");
        if lock.exists() && store_locked(&self.0) {
            let pid = std::fs::read_to_string(&lock).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// The unprivileged scenario in a private mount namespace whose /dev/fuse is a fresh 0666 node
/// (what udev gives on a normal system), everything else real: the setuid fusermount3, uid
/// 65534, and the binary under test. Runs only as root with unshare available.
#[test]
fn unprivileged_mount_with_a_world_usable_dev_fuse() {
    if unsafe { libc::geteuid() } != 0
        || common::missing("setpriv")
        || common::missing("unshare")
        || common::missing("fusermount3")
    {
        return;
    }
    let d = dirs();
    std::fs::set_permissions(d.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.backing.join("u.img"), b"user data").unwrap();
    for p in [&d.backing, &d.mnt, &d.backing.join("u.img")] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let dev = d.root.join("dev");
    std::fs::create_dir(&dev).unwrap();
    // The mount lives in the private namespace, out of force_unmount's reach: if the script
    // dies early, stop the daemon it started (SIGTERM unmounts) by the pid in its lock file.
    let _stop = StopDaemon(d.backing.clone());
    let script = r#"
set -u
dev=$1 bin=$2 b=$3 m=$4
mount -t tmpfs tmpfs "$dev" || exit 90
mknod -m 666 "$dev/fuse" c 10 229 || exit 91
mount --bind "$dev/fuse" /dev/fuse || exit 92
# If anything below goes wrong, the mount still goes away with this namespace's last process.
trap 'fusermount3 -uz "$m" 2>/dev/null' EXIT
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
nobody "$bin" mount "$b" "$m"; echo "mount=$?"
echo "content=$(nobody cat "$m/u.img")"
grep -q " $m " /proc/self/mountinfo && echo "mounted=yes"
grep " $m " /proc/self/mountinfo | grep -q "user_id=65534" && echo "owner=65534"
echo "written" | nobody tee "$m/new.img" >/dev/null; echo "write=$?"
nobody "$bin" umount "$m"; echo "umount=$?"
grep -q " $m " /proc/self/mountinfo && echo "after=mounted" || echo "after=gone"
"#;
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(&dev)
        .arg(grainfs_bin())
        .arg(&d.backing)
        .arg(&d.mnt)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = stderr(&o);
    if o.status.code().is_some_and(|c| (90..=92).contains(&c)) {
        eprintln!(
            "SKIP: cannot set up a private /dev/fuse ({}): {err}",
            o.status
        );
        return;
    }
    let log = log_text(&d.backing);
    for want in [
        "mount=0",
        "content=user data",
        "mounted=yes",
        "owner=65534",
        "write=0",
        "umount=0",
        "after=gone",
    ] {
        assert!(
            out.lines().any(|l| l == want),
            "missing {want:?}\nstdout:\n{out}\nstderr:\n{err}\nlog:\n{log}"
        );
    }
    assert_eq!(
        std::fs::read(d.backing.join("new.img")).unwrap(),
        b"written\n"
    );
    let st = std::fs::metadata(d.backing.join("new.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((st.uid(), st.gid()), (65534, 65534));
    let store = std::fs::metadata(d.backing.join(".grainfs")).unwrap();
    assert_eq!(store.uid(), 65534);
    assert_eq!(store.permissions().mode() & 0o7777, 0o700);
}

#[test]
fn help_exits_zero() {
    let o = grainfs(&[&"--help"]);
    assert_ok(&o, "grainfs --help");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("mount") && out.contains("umount"), "{out}");
    let o = grainfs(&[&"mount", &"--help"]);
    assert_ok(&o, "grainfs mount --help");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("--foreground") && out.contains("--config"),
        "{out}"
    );
    assert!(!out.contains("--daemonized"), "internal flag shown: {out}");
}

#[test]
fn a_store_owned_by_another_user_is_refused_and_left_alone() {
    // Someone else made <backing>/.grainfs (possible through an earlier mount with another
    // store): the root daemon must not write into a directory another user controls.
    let d = dirs();
    let store = d.backing.join(".grainfs");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
    let victim = d.root.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, store.join("daemon.lock")).unwrap();
    let _clean = Cleanup::of(&d.mnt);
    let o = grainfs(&[&"mount", &d.backing, &d.mnt]);
    assert_fails_naming(&o, &[".grainfs", "owned by uid 65534"]);
    assert!(!is_mounted(&d.mnt));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_store_that_is_a_symlink_is_refused() {
    let d = dirs();
    let elsewhere = d.root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, d.backing.join(".grainfs")).unwrap();
    let _clean = Cleanup::of(&d.mnt);
    let o = grainfs(&[&"mount", &d.backing, &d.mnt]);
    assert_fails_naming(&o, &[".grainfs", "not a directory"]);
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
}

#[test]
fn a_store_nested_below_the_backing_root_is_refused() {
    let d = dirs();
    let cfg = d.root.join("nested.toml");
    std::fs::write(
        &cfg,
        format!("store = \"{}\"\n", s(&d.backing.join("state/store"))),
    )
    .unwrap();
    let _clean = Cleanup::of(&d.mnt);
    let o = grainfs(&[&"mount", &d.backing, &d.mnt, &"-c", &cfg]);
    assert_fails_naming(&o, &["state/store", "directly in its root"]);
    assert!(!is_mounted(&d.mnt));
}

#[test]
fn a_mount_point_that_contains_the_backing_dir_is_refused() {
    let d = dirs();
    let _clean = Cleanup::of(&d.root);
    let o = grainfs(&[&"mount", &d.backing, &d.root]);
    assert_fails_naming(&o, &[&s(&d.root), "contains the backing dir"]);
    assert!(!is_mounted(&d.root));
}

/// A user who may not read a root-owned store is told so, not that there are no snapshots.
#[test]
fn a_user_who_cannot_read_the_store_is_told_permission_denied() {
    if common::missing("setpriv") {
        return;
    }
    let m = common::Mount::with_setup(|b| std::fs::write(b.join("vol.img"), b"x").unwrap(), None);
    // The temp dir is 0700: let the other user reach the mount, not the store (0700, root's).
    let top = m.backing().parent().unwrap();
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(grainfs_bin())
        .current_dir(m.path())
        .args(["snapshot", "create", "--name", "s1"])
        .output()
        .unwrap();
    assert_ok(&out, "snapshot create");
    for cmd in [&["snapshot", "list"][..], &["snapshot", "verify"][..]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(grainfs_bin())
            .args(cmd)
            .arg("-m")
            .arg(m.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd:?} succeeded for nobody");
        let err = stderr(&out);
        assert!(
            err.contains("Permission denied") && !err.contains("no snapshots"),
            "{cmd:?} as nobody: {err}"
        );
    }
}

/// A real `.snapshots` in the backing root is shadowed by the snapshot view: the daemon says so
/// at mount, and the implicit group `all` leaves it out.
#[test]
fn a_real_snapshots_entry_in_the_backing_root_is_reported_and_left_out() {
    let m = common::Mount::with_setup(
        |b| {
            std::fs::create_dir(b.join(".snapshots")).unwrap();
            std::fs::write(b.join(".snapshots/hidden.img"), b"h").unwrap();
            std::fs::write(b.join("vol.img"), b"v").unwrap();
        },
        None,
    );
    let log = m.log_text();
    assert!(
        log.contains(".snapshots exists in the backing dir"),
        "not reported at mount: {log}"
    );
    let out = Command::new(grainfs_bin())
        .current_dir(m.path())
        .args(["snapshot", "create", "--name", "s1", "--json"])
        .output()
        .unwrap();
    assert_ok(&out, "snapshot create");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = r["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["vol.img"]);
}

/// `grainfs snapshot ARGS -m AT` (a mount, or a backing dir with no daemon).
fn snap(at: &Path, args: &[&str]) -> Output {
    Command::new(grainfs_bin())
        .arg("snapshot")
        .args(args)
        .arg("-m")
        .arg(at)
        .stdin(Stdio::null())
        .output()
        .expect("run grainfs snapshot")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

/// Names of the snapshots `snapshot list --json` shows.
fn listed(at: &Path) -> Vec<String> {
    let o = snap(at, &["list", "--json"]);
    assert_ok(&o, "snapshot list");
    json_of(&o)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// A held snapshot cannot be deleted: the refusal names its holds (exit 1) until every tag is
/// released; `list` shows the holds and the kind.
#[test]
fn a_held_snapshot_is_not_deleted_until_released() {
    let m = common::Mount::with_setup(|b| std::fs::write(b.join("vol.img"), b"v").unwrap(), None);
    let at = m.path();
    assert_ok(&snap(at, &["create", "--name", "s1"]), "snapshot create");
    let o = snap(at, &["hold", "s1", "--tag", "legal"]);
    assert_ok(&o, "snapshot hold");
    assert_eq!(stdout(&o), "held s1 (tag legal)\n");
    let o = snap(at, &["hold", "s1", "--json"]);
    assert_ok(&o, "snapshot hold --json");
    assert_eq!(
        json_of(&o),
        serde_json::json!({"name": "s1", "tag": "keep", "added": true})
    );

    let o = snap(at, &["list", "--json"]);
    assert_ok(&o, "snapshot list --json");
    let l = json_of(&o);
    assert_eq!(l[0]["holds"], serde_json::json!(["keep", "legal"]));
    assert_eq!(l[0]["kinds"], serde_json::json!({"FULL": 1}));
    let o = snap(at, &["list"]);
    assert_ok(&o, "snapshot list");
    let text = stdout(&o);
    let mut lines = text.lines();
    let head = lines.next().unwrap();
    assert!(
        head.contains("KIND") && head.contains(" HOLD ") && head.ends_with("KEPT BY"),
        "{text}"
    );
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("s1 ")
            && row.contains(" FULL ")
            && row.contains(" keep,legal ")
            && row.contains("held"),
        "{text}"
    );

    let o = snap(at, &["delete", "s1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_fails_naming(&o, &["s1", "keep", "legal", "release"]);
    let o = snap(at, &["release", "s1", "--tag", "legal"]);
    assert_ok(&o, "snapshot release --tag");
    assert_eq!(stdout(&o), "released s1 (tag legal)\n");
    let o = snap(at, &["delete", "s1"]);
    assert_eq!(o.status.code(), Some(1));
    assert_fails_naming(&o, &["keep"]);
    assert!(!stderr(&o).contains("legal"), "{}", stderr(&o));
    let o = snap(at, &["release", "s1", "--json"]);
    assert_ok(&o, "snapshot release --json");
    assert_eq!(
        json_of(&o),
        serde_json::json!({"name": "s1", "released": ["keep"]})
    );
    let o = snap(at, &["delete", "s1"]);
    assert_ok(&o, "snapshot delete");
    assert_eq!(stdout(&o), "deleted s1\n");
    assert!(listed(at).is_empty());
}

/// `snapshot show` reads what the manifest records, with the daemon gone; `create --dry-run`
/// estimates at most what it would store, and `--full` forces FULL partitions.
#[test]
fn show_reads_the_manifest_offline_and_dry_runs_estimate() {
    let config = "[tracking]\nblock_size = \"4KiB\"\npartition_size = \"64KiB\"\n";
    let mut m = common::Mount::with_setup(
        |b| std::fs::write(b.join("vol.img"), vec![7u8; 3 * 64 * 1024]).unwrap(),
        Some(config),
    );
    let at = m.path().to_path_buf();
    assert_ok(&snap(&at, &["create", "--name", "s1"]), "create s1");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(at.join("vol.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 70 * 1024).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let o = snap(&at, &["create", "--dry-run"]);
    assert_ok(&o, "create --dry-run");
    let text = stdout(&o);
    assert!(
        text.contains("at most 4.0 KiB") && text.contains("no time estimate"),
        "{text}"
    );
    let o = snap(&at, &["create", "--dry-run", "--full", "--json"]);
    assert_ok(&o, "create --dry-run --full");
    let plan = json_of(&o);
    assert_eq!(plan["estimated_bytes"], 3 * 64 * 1024);
    for p in plan["volumes"][0]["partitions"].as_array().unwrap() {
        assert_eq!(p["kind"], "FULL");
        assert_eq!(p["reason"], "forced by --full");
    }
    assert_ok(&snap(&at, &["create", "--name", "s2"]), "create s2");
    assert_eq!(m.stop().code(), Some(0));

    let backing = m.backing().to_path_buf();
    let o = snap(&backing, &["show", "s2", "--json"]);
    assert_ok(&o, "show --json, no daemon");
    let s = json_of(&o);
    assert_eq!(s["name"], "s2");
    assert_eq!(s["group"], "all");
    assert_eq!(s["parent"], "s1");
    assert_eq!(s["holds"], serde_json::json!([]));
    assert!(s["created"].as_str().unwrap().starts_with("20"), "{s}");
    let v = &s["volumes"][0];
    assert_eq!(
        (&v["path"], &v["size"]),
        (&"vol.img".into(), &(3 * 64 * 1024).into())
    );
    assert_eq!(v["kind"], "INCREMENTAL");
    assert_eq!(v["stored_bytes"], 4096);
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[1]["depth"], 2);
    assert_eq!(parts[1]["reason"], "1 of 16 blocks changed");

    assert_ok(&snap(&backing, &["hold", "s1"]), "hold, no daemon");
    let o = snap(&backing, &["show", "s1"]);
    assert_ok(&o, "show");
    let text = stdout(&o);
    for want in [
        "snapshot s1\n",
        "  parent   none\n",
        "  holds    keep\n",
        " ago)",
        "volume vol.img: 192.0 KiB, FULL, 192.0 KiB stored",
        "no parent snapshot has this partition",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let o = snap(&backing, &["show", "nope"]);
    assert_fails_naming(&o, &["\"nope\""]);
}

/// `snapshot delete` takes several names and globs, deletes newest first (so a chain goes
/// child before parent), lists them with --dry-run, and deletes nothing when a glob matches
/// nothing.
#[test]
fn delete_takes_globs_and_goes_newest_first() {
    let mut m =
        common::Mount::with_setup(|b| std::fs::write(b.join("vol.img"), b"v").unwrap(), None);
    let at = m.path().to_path_buf();
    for name in ["b-1", "a-1", "a-2", "a-3"] {
        assert_ok(&snap(&at, &["create", "--name", name]), "create");
    }
    let o = snap(&at, &["delete", "--dry-run", "a-*"]);
    assert_ok(&o, "delete --dry-run");
    assert_eq!(
        stdout(&o),
        "would delete a-3\nwould delete a-2\nwould delete a-1\n"
    );
    let o = snap(&at, &["delete", "a-[12]", "zz-*"]);
    assert_eq!(o.status.code(), Some(1));
    assert_fails_naming(&o, &["\"zz-*\"", "nothing was deleted"]);
    assert_eq!(listed(&at).len(), 4);
    // Through the daemon.
    let o = snap(&at, &["delete", "a-3", "a-?"]);
    assert_ok(&o, "delete a-3 a-?");
    assert_eq!(stdout(&o), "deleted a-3\ndeleted a-2\ndeleted a-1\n");
    assert_eq!(listed(&at), vec!["b-1"]);
    // Without one.
    m.stop();
    let o = snap(m.backing(), &["delete", "b-*"]);
    assert_ok(&o, "delete, no daemon");
    assert_eq!(stdout(&o), "deleted b-1\n");
}
