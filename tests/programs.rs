//! Real programs on the mount: sqlite3 (rollback journal and WAL), qemu-img and qemu-io (qcow2,
//! O_DIRECT), git and tar. Each must work exactly as on a plain directory, and what it leaves
//! behind must be right when read from the backing dir too. A test whose program is missing
//! says so and passes; CI installs them all.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::Mount;

/// Run `cmd`, feeding `stdin`, and return its output; panic with everything it said on failure.
fn run_with_input(cmd: &mut Command, stdin: &str) -> Output {
    use std::io::Write;
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_owned();
    let feeder = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("wait");
    feeder.join().expect("stdin feeder").expect("write stdin");
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cmd` with no input and return its stdout as text; panic on failure.
fn run(cmd: &mut Command) -> String {
    let out = run_with_input(cmd, "");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// sqlite3

/// SQL for transaction `n` of 100 rows each, ids 100n+1..=100n+100, with a 3000-byte blob so
/// the rows span many pages.
fn insert_batch(n: u32) -> String {
    format!(
        "BEGIN;\n\
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 100)\n\
         INSERT INTO t(id, v, b) SELECT {base} + i, 'row ' || ({base} + i), \
         randomblob(3016) FROM k;\n\
         COMMIT;\n",
        base = n * 100
    )
}

/// Integrity check and (row count, sum of ids, total blob bytes) of the db at `db`.
fn sqlite_check(db: &Path) -> (String, String) {
    let out = run(Command::new("sqlite3").arg(db).arg(
        "PRAGMA integrity_check; SELECT count(*) || ' ' || sum(id) || ' ' || sum(length(b)) FROM t;",
    ));
    let mut lines = out.lines();
    let integrity = lines.next().unwrap_or_default().to_owned();
    let summary = lines.next().unwrap_or_default().to_owned();
    (integrity, summary)
}

fn sqlite_on_mount(journal_mode: &str) {
    if common::missing("sqlite3") {
        return;
    }
    let m = Mount::new();
    let db = m.path().join(format!("{journal_mode}.db"));
    let mode = run(Command::new("sqlite3").arg(&db).arg(format!(
        "PRAGMA journal_mode={journal_mode}; \
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, b BLOB);"
    )));
    assert_eq!(mode.trim(), journal_mode.to_lowercase(), "journal mode");
    // Five committed transactions, each from its own sqlite3 process, then several in one.
    for n in 0..3 {
        run(Command::new("sqlite3").arg(&db).arg(insert_batch(n)));
    }
    run_with_input(
        Command::new("sqlite3").arg(&db),
        &format!("{}{}", insert_batch(3), insert_batch(4)),
    );
    // A transaction that inserts, updates and deletes, then rolls back: nothing may stick.
    run_with_input(
        Command::new("sqlite3").arg(&db),
        "BEGIN;\n\
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 300)\n\
         INSERT INTO t(id, v, b) SELECT 1000 + i, 'doomed', randomblob(5000) FROM k;\n\
         UPDATE t SET b = NULL WHERE id % 2 = 0;\n\
         DELETE FROM t WHERE id < 250;\n\
         ROLLBACK;\n",
    );
    let want = format!("500 {} {}", 500 * 501 / 2, 500 * 3016);
    let (integrity, summary) = sqlite_check(&db);
    assert_eq!(integrity, "ok", "integrity_check through the mount");
    assert_eq!(summary, want, "rows through the mount");
    let journal = run(Command::new("sqlite3").arg(&db).arg("PRAGMA journal_mode;"));
    assert_eq!(journal.trim(), journal_mode.to_lowercase());

    // Every sqlite3 process has exited: the file in the backing dir is the whole database.
    let backing_db = m.backing().join(db.file_name().expect("name"));
    let (integrity, summary) = sqlite_check(&backing_db);
    assert_eq!(integrity, "ok", "integrity_check in the backing dir");
    assert_eq!(summary, want, "rows in the backing dir");
    assert_eq!(
        std::fs::read(&backing_db).expect("read backing db"),
        std::fs::read(&db).expect("read db through mount"),
        "backing file and mounted file differ"
    );
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}

#[test]
fn sqlite_rollback_journal() {
    sqlite_on_mount("DELETE");
}

#[test]
fn sqlite_wal() {
    sqlite_on_mount("WAL");
}

// ---------------------------------------------------------------------------------------------
// qemu-img and qemu-io

const GIB: u64 = 1 << 30;
const MIB: usize = 1 << 20;

/// Read `len` bytes at `offset` of `path`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

fn qemu_io(args: &[&str], image: &Path) -> String {
    let out = run(Command::new("qemu-io").args(args).arg(image));
    // Older qemu-io exits 0 even when a command fails; it always says so, though.
    for bad in ["failed", "error", "Error"] {
        assert!(!out.contains(bad), "qemu-io {args:?}: {out}");
    }
    out
}

#[test]
fn qemu_img_qcow2() {
    if common::missing("qemu-img") {
        return;
    }
    let m = Mount::new();
    let disk = m.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("1G"));
    let has_io = !common::missing("qemu-io");
    if has_io {
        qemu_io(&["-f", "qcow2", "-c", "write -P 0xab 0 4M"], &disk);
        qemu_io(&["-f", "qcow2", "-c", "read -P 0xab 0 4M"], &disk);
    }
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&disk));
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk));
    assert!(
        info.contains(&format!("\"virtual-size\": {GIB}")),
        "qemu-img info: {info}"
    );
    assert!(
        info.contains("\"format\": \"qcow2\""),
        "qemu-img info: {info}"
    );

    let raw = m.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw));
    let md = std::fs::metadata(&raw).expect("stat raw");
    assert_eq!(md.len(), GIB, "raw image size");
    let head = read_at(&raw, 0, 8 * MIB);
    let written = if has_io { 4 * MIB } else { 0 };
    assert!(
        head[..written].iter().all(|&b| b == 0xab),
        "raw image: the written region is not all 0xab"
    );
    assert!(
        head[written..].iter().all(|&b| b == 0),
        "raw image: the unwritten region is not all zero"
    );
    // convert skips zero runs with SEEK_DATA/SEEK_HOLE and holes: the copy must stay sparse.
    let backing_raw = std::fs::metadata(m.backing().join("disk.raw")).expect("stat backing");
    assert!(
        backing_raw.blocks() * 512 < 64 * MIB as u64,
        "raw image allocates {} bytes of its 1 GiB: holes were lost",
        backing_raw.blocks() * 512
    );
    assert_eq!(
        read_at(&m.backing().join("disk.raw"), 0, 8 * MIB),
        head,
        "backing raw image differs from the mounted one"
    );
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}

/// qemu's cache=none opens with O_DIRECT; the mount must accept it and write unaligned-safe.
#[test]
fn qemu_io_cache_none() {
    if common::missing("qemu-img") || common::missing("qemu-io") {
        return;
    }
    let m = Mount::new();
    for format in ["qcow2", "raw"] {
        let disk = m.path().join(format!("direct.{format}"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&disk)
            .arg("64M"));
        qemu_io(
            &[
                "-t",
                "none",
                "-f",
                format,
                "-c",
                "write -P 0xcd 1M 3M",
                "-c",
                "write -P 0x5a 8M 4k",
            ],
            &disk,
        );
        qemu_io(
            &[
                "-t",
                "none",
                "-f",
                format,
                "-c",
                "read -P 0xcd 1M 3M",
                "-c",
                "read -P 0x5a 8M 4k",
                "-c",
                "read -P 0 0 1M",
            ],
            &disk,
        );
        // And once more through the page cache, to see what O_DIRECT left on the file.
        qemu_io(
            &[
                "-f",
                format,
                "-c",
                "read -P 0xcd 1M 3M",
                "-c",
                "read -P 0x5a 8M 4k",
            ],
            &disk,
        );
        if format == "qcow2" {
            run(Command::new("qemu-img").args(["check", "-q"]).arg(&disk));
        } else {
            let b = m.backing().join(format!("direct.{format}"));
            assert!(read_at(&b, MIB as u64, 3 * MIB).iter().all(|&x| x == 0xcd));
            assert!(read_at(&b, 8 * MIB as u64, 4096).iter().all(|&x| x == 0x5a));
        }
    }
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}

// ---------------------------------------------------------------------------------------------
// git

fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=grainfs test",
            "-c",
            "user.email=test@grainfs.invalid",
        ])
        .args(["-c", "init.defaultBranch=main", "-c", "gc.auto=0"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1");
    c
}

#[test]
fn git_repository_on_mount() {
    if common::missing("git") {
        return;
    }
    let m = Mount::new();
    let repo = m.path().join("repo");
    std::fs::create_dir(&repo).expect("mkdir repo");
    run(git(&repo).arg("init").arg("-q"));
    std::fs::create_dir_all(repo.join("src/deep")).expect("mkdir src");
    std::fs::write(repo.join("README"), "grainfs test repo\n").expect("write");
    std::fs::write(repo.join("src/lib.rs"), "pub fn f() {}\n".repeat(1000)).expect("write");
    std::fs::write(
        repo.join("src/deep/data.bin"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
    )
    .expect("write");
    let script = repo.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("src/lib.rs", repo.join("link")).expect("symlink");
    run(git(&repo).args(["add", "-A"]));
    run(git(&repo).args(["commit", "-q", "-m", "first commit on grainfs"]));
    std::fs::write(repo.join("README"), "grainfs test repo, second line\n").expect("write");
    std::fs::remove_file(repo.join("src/deep/data.bin")).expect("rm");
    run(git(&repo).args(["commit", "-q", "-a", "-m", "second commit"]));

    let status = run(git(&repo).args(["status", "--porcelain"]));
    assert_eq!(status, "", "git status after commit");
    run(git(&repo).args(["fsck", "--full", "--strict"]));
    let log = run(git(&repo).args(["log", "--format=%s"]));
    assert_eq!(log, "second commit\nfirst commit on grainfs\n");
    let files = run(git(&repo).args(["ls-tree", "-r", "--format=%(objectmode) %(path)", "HEAD"]));
    assert_eq!(
        files,
        "100644 README\n120000 link\n100755 run.sh\n100644 src/lib.rs\n"
    );

    // Packing rewrites the object store with renames and deletes; a clone reads it all back.
    run(git(&repo).args(["gc", "-q", "--prune=now"]));
    run(git(&repo).args(["fsck", "--full", "--strict"]));
    let clone = m.path().join("clone");
    run(git(m.path()).arg("clone").arg("-q").arg(&repo).arg(&clone));
    assert_eq!(run(git(&clone).args(["status", "--porcelain"])), "");
    assert_eq!(
        std::fs::read(clone.join("src/lib.rs")).expect("read clone"),
        std::fs::read(repo.join("src/lib.rs")).expect("read repo")
    );
    // The backing dir holds a valid repository too.
    run(git(&m.backing().join("repo")).args(["fsck", "--full", "--strict"]));
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}

// ---------------------------------------------------------------------------------------------
// tar

/// A tree with nested dirs, assorted modes, a symlink, a hard link, an empty dir and a file
/// large enough to need many writes.
fn make_tree(root: &Path) {
    use std::fs;
    let mode =
        |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
    fs::create_dir_all(root.join("etc/conf.d")).expect("mkdir");
    fs::create_dir_all(root.join("var/lib/empty")).expect("mkdir");
    fs::create_dir_all(root.join("bin")).expect("mkdir");
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").expect("write");
    fs::write(root.join("etc/conf.d/secret"), "key=value\n").expect("write");
    mode(&root.join("etc/conf.d/secret"), 0o600);
    fs::write(root.join("etc/readonly"), "ro\n").expect("write");
    mode(&root.join("etc/readonly"), 0o444);
    fs::write(root.join("bin/tool"), "#!/bin/sh\nexit 0\n").expect("write");
    mode(&root.join("bin/tool"), 0o755);
    fs::write(root.join("bin/suid"), "#!/bin/sh\n").expect("write");
    mode(&root.join("bin/suid"), 0o4755);
    let big: Vec<u8> = (0..3 * MIB + 12345)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    fs::write(root.join("var/lib/big.bin"), big).expect("write");
    fs::write(root.join("var/empty-file"), b"").expect("write");
    fs::hard_link(root.join("etc/hosts"), root.join("var/hosts.hardlink")).expect("link");
    std::os::unix::fs::symlink("../etc/hosts", root.join("bin/hosts.symlink")).expect("symlink");
    std::os::unix::fs::symlink("nowhere", root.join("bin/dangling")).expect("symlink");
    mode(&root.join("var/lib"), 0o750);
    mode(&root.join("etc/conf.d"), 0o700);
}

fn tar_create(dir: &Path, name: &str, archive: &Path) {
    run(Command::new("tar")
        .args(["--sort=name", "--format=gnu", "-cf"])
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .arg(name));
}

fn tar_list(archive: &Path) -> String {
    run(Command::new("tar")
        .args(["--numeric-owner", "--full-time", "-tvf"])
        .arg(archive))
}

#[test]
fn tar_round_trip() {
    if common::missing("tar") {
        return;
    }
    let m = Mount::new();
    let scratch = m.scratch();
    let plain = scratch.join("plain");
    std::fs::create_dir(&plain).expect("mkdir plain");
    std::fs::create_dir(plain.join("tree")).expect("mkdir tree");
    make_tree(&plain.join("tree"));
    let from_plain = scratch.join("plain.tar");
    tar_create(&plain, "tree", &from_plain);

    run(Command::new("tar")
        .arg("-xpf")
        .arg(&from_plain)
        .arg("-C")
        .arg(m.path()));
    let from_mount = scratch.join("mount.tar");
    tar_create(m.path(), "tree", &from_mount);

    let (want, got) = (tar_list(&from_plain), tar_list(&from_mount));
    assert_eq!(want, got, "tar -tvf listings differ (plain, mount)");
    assert!(
        want.contains("tree/var/hosts.hardlink link to tree/etc/hosts"),
        "{want}"
    );
    assert!(
        want.contains("tree/bin/hosts.symlink -> ../etc/hosts"),
        "{want}"
    );
    run(Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(plain.join("tree"))
        .arg(m.path().join("tree")));
    assert_eq!(
        std::fs::read(&from_plain).expect("read"),
        std::fs::read(&from_mount).expect("read"),
        "the archives differ although their listings match"
    );
    // The hard link is one inode through the mount as well.
    let a = std::fs::metadata(m.path().join("tree/etc/hosts")).expect("stat");
    let b = std::fs::metadata(m.path().join("tree/var/hosts.hardlink")).expect("stat");
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}
