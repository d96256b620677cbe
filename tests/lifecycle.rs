//! The snapshot lifecycle as a user meets it on a real mount with the real binary: a scheduled
//! group snapshotted on time and pruned to its keep rules while a writer runs; the config read
//! again on SIGHUP and on `grainfs reload` (schedule and retention follow, a bad file or a
//! remount-only key is refused with its key and line, and the old config stays); `grainfs
//! prune` with its dry run and holds; `status --check` for monitoring; and deleting snapshots
//! from the middle of a chain, with a kill -9 during a delete, every survivor reading back its
//! recorded blake3 through `.snapshots`; and `snapshot list` running while a prune deletes.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{blake3_file, grainfs_bin, open_rw, status_json, Mount, Noise, Rng};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECOND_NS: u64 = 1_000_000_000;

fn grainfs(args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut cmd = Command::new(grainfs_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.stdin(Stdio::null()).output().expect("run grainfs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command's stdout; it must have succeeded.
fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// The config file the fixture wrote and started the mount with (`-c`).
fn config_path(m: &Mount) -> PathBuf {
    m.backing()
        .parent()
        .expect("backing has a parent")
        .join("grainfs.toml")
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// Poll `f` every 50 ms until it returns Some, for at most `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, m: &Mount, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n--- daemon log ---\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One snapshot as `snapshot list --json` shows it.
#[derive(Clone, Debug)]
struct Snap {
    name: String,
    group: String,
    created_ns: u64,
    holds: Vec<String>,
}

/// `grainfs snapshot list --json -m AT`, oldest first; every snapshot listed must be readable.
fn list(at: &Path) -> Vec<Snap> {
    listed(at)
        .into_iter()
        .map(|s| s.unwrap_or_else(|e| panic!("unreadable snapshot listed: {e}")))
        .collect()
}

/// `list` while the scheduler prunes: a snapshot deleted between the listing's directory read
/// and its manifest read shows as unreadable ("no snapshot named ..."), a known bug that
/// `listing_snapshots_while_the_scheduler_prunes_disturbs_neither` pins; such an entry is left
/// out here, so that the tests of scheduling are not about it.
fn list_racing_prune(at: &Path) -> Vec<Snap> {
    listed(at)
        .into_iter()
        .filter_map(|s| match s {
            Ok(s) => Some(s),
            Err(e) if e.contains("no snapshot named") => None,
            Err(e) => panic!("unreadable snapshot listed: {e}"),
        })
        .collect()
}

/// Every entry of `grainfs snapshot list --json -m AT`, oldest first; an unreadable one as the
/// JSON the command printed for it.
fn listed(at: &Path) -> Vec<Result<Snap, String>> {
    let out = ok(
        grainfs(&[&"snapshot", &"list", &"--json", &"-m", &at]),
        "snapshot list",
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("snapshot list --json is JSON");
    let mut snaps: Vec<Result<Snap, String>> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| {
            if s.get("error").is_some() {
                return Err(s.to_string());
            }
            Ok(Snap {
                name: s["name"].as_str().expect("name").to_string(),
                group: s["group"].as_str().expect("group").to_string(),
                created_ns: s["created_ns"].as_u64().expect("created_ns"),
                holds: s["holds"]
                    .as_array()
                    .map(|h| {
                        h.iter()
                            .filter_map(|t| t.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect();
    snaps.sort_by_key(|s| s.as_ref().map_or(u64::MAX, |s| s.created_ns));
    snaps
}

fn names(snaps: &[Snap]) -> Vec<String> {
    snaps.iter().map(|s| s.name.clone()).collect()
}

/// `grainfs snapshot verify NAMES -m AT`, which must pass.
fn verify(at: &Path, names: &[String]) {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"snapshot", &"verify", &"-m", &at];
    for n in names {
        args.push(n);
    }
    ok(grainfs(&args), &format!("snapshot verify {names:?}"));
}

/// `grainfs snapshot create GROUP [--name NAME] --json` on the mount; another snapshot operation
/// under way (a scheduled run) makes it busy, so it is tried again for a while. Returns the
/// snapshot's name.
fn create(m: &Mount, group: &str, name: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args: Vec<&dyn AsRef<OsStr>> =
            vec![&"snapshot", &"create", &group, &"--json", &"-m"];
        let mnt = m.path();
        args.push(&mnt);
        if let Some(n) = &name {
            args.push(&"--name");
            args.push(n);
        }
        let out = grainfs(&args);
        if !out.status.success()
            && stderr(&out).contains("another snapshot operation is running")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let text = ok(out, &format!("snapshot create {group}"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("create --json is JSON");
        return v["name"].as_str().expect("name").to_string();
    }
}

/// Where a user reads file `rel` of snapshot `snap`.
fn snap_file(m: &Mount, snap: &str, rel: &str) -> PathBuf {
    m.path().join(".snapshots").join(snap).join(rel)
}

/// Bytes on disk under `dir` (allocated blocks, as `du` counts them).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        total += md.blocks() * 512;
        if md.is_dir() {
            total += du(&e.path());
        }
    }
    total
}

/// A volume of `size` pseudo-random bytes in the backing dir (written before the mount).
fn volume(backing: &Path, rel: &str, size: u64, seed: u64) {
    std::fs::write(backing.join(rel), Noise::new(seed).bytes(size as usize)).expect("write volume");
}

/// Overwrite `count` random 64 KiB blocks of the volume at `path` (through the mount).
fn scribble(path: &Path, size: u64, count: u64, rng: &mut Rng, noise: &mut Noise) {
    let f = open_rw(path);
    let blocks = size / (64 * KIB);
    for _ in 0..count {
        let at = rng.below(blocks) * 64 * KIB;
        f.write_all_at(&noise.bytes(64 * KIB as usize), at)
            .expect("write through the mount");
    }
    f.sync_all().expect("fsync through the mount");
}

fn exit_code(o: &Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn a_scheduled_group_takes_snapshots_on_time_and_prunes_to_its_keep_rules() {
    const SIZE: u64 = 4 * MIB;
    let config = r#"
[[group]]
name = "vms"
volumes = ["vm.img"]
schedule = "every 2s"
keep = { last = 3 }
"#;
    let mut m = Mount::with_setup(|b| volume(b, "vm.img", SIZE, 1), Some(config));
    let snapshots_dir = m.store().join("snapshots");

    // A writer overwrites random 64 KiB blocks through the mount the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let path = m.path().join("vm.img");
        std::thread::spawn(move || {
            let f = open_rw(&path);
            let (mut rng, mut noise) = (Rng::new(7), Noise::new(7));
            while !stop.load(Ordering::Relaxed) {
                let at = rng.below(SIZE / (64 * KIB)) * 64 * KIB;
                f.write_all_at(&noise.bytes(64 * KIB as usize), at)
                    .expect("write through the mount");
                writes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = Instant::now();
    let mut most_on_disk = 0;
    while started.elapsed() < Duration::from_secs(10) {
        most_on_disk = most_on_disk.max(du(&snapshots_dir));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let stopped_ns = now_ns();
    assert!(
        writes.load(Ordering::Relaxed) > 100,
        "the writer hardly ran"
    );

    // The first run after the writer stopped, and its prune, leave exactly 3.
    let snaps = wait_for(
        Duration::from_secs(10),
        "a run after the writer stopped",
        &m,
        || {
            let s = list_racing_prune(m.path());
            (s.len() == 3 && s.last().is_some_and(|l| l.created_ns > stopped_ns)).then_some(s)
        },
    );
    let live = blake3_file(&m.path().join("vm.img"));
    let newest = snaps.last().expect("3 snapshots").name.clone();
    assert_eq!(
        blake3_file(&snap_file(&m, &newest, "vm.img")),
        live,
        "the snapshot taken after the writer stopped reads as the live volume"
    );

    let status = status_json(m.path());
    let g = status
        .groups
        .iter()
        .find(|g| g.name == "vms")
        .unwrap_or_else(|| panic!("status shows no group vms: {:?}", status.groups));
    assert_eq!(g.schedule.as_deref(), Some("every 2s"));
    assert_eq!(g.period_ns, Some(2 * SECOND_NS));
    assert_eq!(g.keep, "last=3");
    assert!(g.last_snapshot.is_some(), "no last_snapshot: {g:?}");
    assert!((3..=4).contains(&g.snapshots), "{g:?}");
    let now = now_ns();
    // The scheduler looks once a second: the slot it last saw ahead may have just passed.
    assert!(
        g.next_run_ns
            .is_some_and(|t| t + 1500 * 1_000_000 > now && t < now + 2500 * 1_000_000),
        "next_run_ns is not the next 2 s slot (now {now}): {g:?}"
    );
    assert!(g.last_failure.is_none(), "{g:?}");
    let check = grainfs(&[&"status", &"--check", &m.path()]);
    assert_eq!(
        exit_code(&check),
        Some(0),
        "status --check: {}{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("OK group vms"),
        "{}",
        stdout(&check)
    );

    let log = m.log_text();
    let runs = log.matches("scheduled snapshot vms-").count();
    assert!(runs >= 5, "{runs} scheduled snapshot lines in 10 s:\n{log}");
    assert!(log.contains("pruned group vms: removed"), "{log}");

    // What stays after the daemon stops: exactly 3 snapshots about 2 s apart, all verifying,
    // and a store that did not grow with the number of runs.
    m.stop();
    let snaps = list(m.backing());
    assert_eq!(snaps.len(), 3, "{snaps:?}\n{}", m.log_text());
    assert!(snaps.iter().all(|s| s.group == "vms"), "{snaps:?}");
    for w in snaps.windows(2) {
        let gap = (w[1].created_ns - w[0].created_ns) as f64 / 1e9;
        assert!(
            (1.0..=3.5).contains(&gap),
            "{} and {} are {gap:.2} s apart, schedule every 2s",
            w[0].name,
            w[1].name
        );
    }
    verify(m.backing(), &names(&snaps));
    let on_disk = du(&snapshots_dir);
    assert!(
        on_disk < 4 * SIZE,
        "the snapshots take {on_disk} bytes on disk for a {SIZE}-byte volume"
    );
    assert!(
        most_on_disk < 6 * SIZE,
        "at most {most_on_disk} bytes on disk while running, for a {SIZE}-byte volume"
    );
}

/// The group of tests 2 and 3: `vm.img`, with `extra` TOML lines in the group table.
fn group_config(extra: &str) -> String {
    format!("[[group]]\nname = \"vms\"\nvolumes = [\"vm.img\"]\n{extra}")
}

#[test]
fn reload_changes_schedule_and_retention_and_refuses_a_bad_config() {
    const SIZE: u64 = MIB;
    let mut m = Mount::with_setup(|b| volume(b, "vm.img", SIZE, 2), Some(&group_config("")));
    let cfg = config_path(&m);
    let vm = m.path().join("vm.img");
    let (mut rng, mut noise) = (Rng::new(2), Noise::new(2));
    for _ in 0..4 {
        scribble(&vm, SIZE, 4, &mut rng, &mut noise);
        create(&m, "vms", None);
    }
    assert_eq!(list(m.path()).len(), 4);

    // SIGHUP: retention changes (no schedule yet, so nothing runs by itself).
    std::fs::write(&cfg, group_config("keep = { last = 2 }\n")).unwrap();
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) }, 0);
    wait_for(Duration::from_secs(5), "SIGHUP reload", &m, || {
        let s = status_json(m.path());
        s.groups
            .iter()
            .any(|g| g.name == "vms" && g.keep == "last=2")
            .then_some(())
    });
    assert!(
        m.log_text().contains("group vms: keep none -> last=2"),
        "{}",
        m.log_text()
    );

    // `grainfs reload`: a schedule; the scheduler starts, and each run prunes to 2.
    std::fs::write(
        &cfg,
        group_config("schedule = \"every 1s\"\nkeep = { last = 2 }\n"),
    )
    .unwrap();
    let reloaded_ns = now_ns();
    let out = ok(grainfs(&[&"reload", &m.path()]), "grainfs reload");
    assert!(
        out.contains("group vms: schedule none -> every 1s"),
        "reload printed: {out}"
    );
    let snaps = wait_for(
        Duration::from_secs(8),
        "scheduled runs pruned to 2",
        &m,
        || {
            let s = list_racing_prune(m.path());
            let scheduled = s.iter().filter(|s| s.created_ns > reloaded_ns).count();
            (s.len() == 2 && scheduled == 2).then_some(s)
        },
    );
    assert!(snaps.iter().all(|s| s.group == "vms"), "{snaps:?}");
    assert!(m.log_text().contains("scheduled snapshot vms-"));

    // A bad value: refused with the file and line; the config in force stays.
    let bad = group_config("schedule = \"every 1s\"\nkeep = { last = -1 }\n");
    let bad_line = bad.lines().position(|l| l.starts_with("keep")).unwrap() + 1;
    std::fs::write(&cfg, &bad).unwrap();
    let out = grainfs(&[&"reload", &m.path()]);
    assert_ne!(exit_code(&out), Some(0), "a bad config was taken");
    let err = stderr(&out);
    let at = format!("{}:{bad_line}:", cfg.display());
    assert!(err.contains(&at), "the error does not name {at}: {err}");
    assert!(err.contains("reload refused"), "{err}");
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) }, 0);
    wait_for(Duration::from_secs(5), "SIGHUP refusal logged", &m, || {
        let log = m.log_text();
        (log.contains("SIGHUP: reload refused") && log.contains(&at)).then_some(())
    });
    let s = status_json(m.path());
    assert!(s.live, "status does not come from the live daemon");
    let g = s
        .groups
        .iter()
        .find(|g| g.name == "vms")
        .expect("group vms");
    assert_eq!(g.schedule.as_deref(), Some("every 1s"), "{g:?}");
    assert_eq!(g.keep, "last=2", "{g:?}");
    let manual_ns = now_ns();
    create(&m, "vms", Some("by-hand"));
    // The schedule and keep in force go on: later runs prune back to 2.
    wait_for(
        Duration::from_secs(8),
        "runs after the refused reload",
        &m,
        || {
            let s = list_racing_prune(m.path());
            (s.len() == 2 && s.iter().all(|s| s.created_ns > manual_ns)).then_some(())
        },
    );

    // A key that needs a remount: refused, naming it and its line.
    let remount = format!(
        "{}\n[tracking]\nblock_size = \"128KiB\"\n",
        group_config("schedule = \"every 1s\"\nkeep = { last = 2 }\n")
    );
    let key_line = remount
        .lines()
        .position(|l| l.starts_with("block_size"))
        .unwrap()
        + 1;
    std::fs::write(&cfg, &remount).unwrap();
    let out = grainfs(&[&"reload", &m.path()]);
    assert_ne!(exit_code(&out), Some(0), "a block_size change was taken");
    let err = stderr(&out);
    assert!(err.contains("tracking.block_size"), "{err}");
    let at = format!("{}:{key_line}:", cfg.display());
    assert!(err.contains(&at), "the error does not name {at}: {err}");
    let s = status_json(m.path());
    assert_eq!(s.block_size, 64 * KIB);
    // The original file back: the daemon takes it (the refusals left nothing half-applied).
    std::fs::write(&cfg, group_config("keep = { last = 2 }\n")).unwrap();
    let out = ok(grainfs(&[&"reload", &m.path()]), "reload of a good file");
    assert!(out.contains("schedule every 1s -> none"), "{out}");
    m.stop();
}

#[test]
fn prune_dry_run_shows_the_rule_that_keeps_each_snapshot() {
    const SIZE: u64 = MIB;
    let m = Mount::with_setup(
        |b| volume(b, "vm.img", SIZE, 3),
        Some(&group_config("keep = { last = 2 }\n")),
    );
    let vm = m.path().join("vm.img");
    let (mut rng, mut noise) = (Rng::new(3), Noise::new(3));
    let mut hashes = std::collections::BTreeMap::new();
    let mut take = |name: &str, hashes: &mut std::collections::BTreeMap<String, String>| {
        scribble(&vm, SIZE, 3, &mut rng, &mut noise);
        hashes.insert(name.to_string(), blake3_file(&vm));
        assert_eq!(create(&m, "vms", Some(name)), name);
    };
    for name in ["p1", "p2", "p3", "p4"] {
        take(name, &mut hashes);
    }

    let out = ok(
        grainfs(&[&"prune", &"--dry-run", &"-m", &m.path()]),
        "prune --dry-run",
    );
    let line = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("prune --dry-run shows no {name}:\n{out}"))
            .to_string()
    };
    for kept in ["p3", "p4"] {
        let l = line(kept);
        assert!(
            l.trim_start().starts_with("keep") && l.contains("last snapshot"),
            "{kept}: {l}"
        );
    }
    for gone in ["p1", "p2"] {
        assert!(
            line(gone).trim_start().starts_with("would remove"),
            "{gone}:\n{out}"
        );
    }
    assert!(out.contains("would remove 2 snapshot(s)"), "{out}");
    assert_eq!(names(&list(m.path())), ["p1", "p2", "p3", "p4"]);

    let report = |out: &str| -> serde_json::Value {
        serde_json::from_str(out).unwrap_or_else(|e| panic!("prune --json: {e}: {out}"))
    };
    let r = report(&ok(
        grainfs(&[&"prune", &"--json", &"-m", &m.path()]),
        "prune --json",
    ));
    assert_eq!(r["removed"], serde_json::json!(["p1", "p2"]), "{r}");
    assert_eq!(r["failed"], serde_json::json!([]), "{r}");
    let left = names(&list(m.path()));
    assert_eq!(left, ["p3", "p4"]);
    verify(m.path(), &left);
    for n in &left {
        assert_eq!(blake3_file(&snap_file(&m, n, "vm.img")), hashes[n], "{n}");
    }

    // A held snapshot stays, whatever the rules say.
    take("p5", &mut hashes);
    take("p6", &mut hashes);
    ok(
        grainfs(&[&"snapshot", &"hold", &"p3", &"-m", &m.path()]),
        "snapshot hold",
    );
    let r = report(&ok(
        grainfs(&[&"prune", &"--json", &"-m", &m.path()]),
        "prune --json with a hold",
    ));
    assert_eq!(r["removed"], serde_json::json!(["p4"]), "{r}");
    let p3 = r["groups"][0]["snapshots"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "p3"))
        .unwrap_or_else(|| panic!("no p3 in the report: {r}"));
    assert_eq!(p3["keep"], true, "{p3}");
    assert!(
        p3["reasons"]
            .as_array()
            .is_some_and(|r| r.iter().any(|w| w == "held")),
        "{p3}"
    );
    let snaps = list(m.path());
    assert_eq!(names(&snaps), ["p3", "p5", "p6"]);
    assert!(!snaps[0].holds.is_empty(), "{snaps:?}");
    ok(
        grainfs(&[&"snapshot", &"release", &"p3", &"-m", &m.path()]),
        "snapshot release",
    );
    let r = report(&ok(
        grainfs(&[&"prune", &"--json", &"-m", &m.path()]),
        "prune --json after release",
    ));
    assert_eq!(r["removed"], serde_json::json!(["p3"]), "{r}");
    let left = names(&list(m.path()));
    assert_eq!(left, ["p5", "p6"]);
    verify(m.path(), &left);
    for n in &left {
        assert_eq!(blake3_file(&snap_file(&m, n, "vm.img")), hashes[n], "{n}");
    }
}

/// `grainfs status --check ARGS`: its exit code and stdout.
fn check(args: &[&dyn AsRef<OsStr>]) -> (Option<i32>, String, String) {
    let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"status", &"--check"];
    all.extend_from_slice(args);
    let o = grainfs(&all);
    (exit_code(&o), stdout(&o), stderr(&o))
}

#[test]
fn status_check_fails_when_a_scheduled_group_is_stale() {
    let config = r#"
[[group]]
name = "yearly"
volumes = ["y.img"]
schedule = "0 0 1 1 *"

[[group]]
name = "hourly"
volumes = ["h.img"]
schedule = "every 1h"

[[group]]
name = "often"
volumes = ["o.img"]
schedule = "every 1s"
"#;
    let mut m = Mount::with_setup(
        |b| {
            volume(b, "y.img", 256 * KIB, 41);
            volume(b, "h.img", 256 * KIB, 42);
            volume(b, "o.img", 64 * KIB, 43);
        },
        Some(config),
    );
    // A group without a snapshot is due at once, whatever its schedule: the daemon takes one
    // of each on start.
    wait_for(Duration::from_secs(10), "first runs", &m, || {
        let s = list(m.path());
        ["yearly", "hourly", "often"]
            .iter()
            .all(|g| s.iter().any(|s| s.group == *g))
            .then_some(())
    });
    let (code, out, err) = check(&[&m.path()]);
    assert_eq!(code, Some(0), "{out}{err}");
    for g in ["yearly", "hourly", "often"] {
        assert!(out.contains(&format!("OK group {g}")), "{out}");
    }

    // Its snapshot deleted, a group has none: critical, and named.
    ok(
        grainfs(&[&"snapshot", &"delete", &"yearly-*", &"-m", &m.path()]),
        "snapshot delete yearly-*",
    );
    let (code, out, err) = check(&[&m.path()]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("CRITICAL group yearly: no snapshot yet"),
        "{out}"
    );
    assert!(out.contains("OK group hourly"), "{out}");
    assert!(out.contains("OK group often"), "{out}");
    assert!(
        err.contains("yearly") && !err.contains("hourly") && !err.contains("often"),
        "{err}"
    );

    // A fresh snapshot by hand counts as one the schedule took.
    ok(
        grainfs(&[&"snapshot", &"delete", &"hourly-*", &"-m", &m.path()]),
        "snapshot delete hourly-*",
    );
    create(&m, "hourly", Some("hourly-by-hand"));
    let (code, out, err) = check(&[&m.path()]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("OK group hourly"), "{out}");
    assert!(err.contains("yearly") && !err.contains("hourly"), "{err}");
    create(&m, "yearly", Some("yearly-by-hand"));
    let (code, out, err) = check(&[&m.path()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let s = status_json(m.path());
    let hourly = s
        .groups
        .iter()
        .find(|g| g.name == "hourly")
        .expect("hourly");
    assert_eq!(hourly.last_snapshot.as_deref(), Some("hourly-by-hand"));
    assert_eq!(hourly.period_ns, Some(3600 * SECOND_NS));

    // The daemon gone, nothing takes snapshots: past twice its interval a group is stale
    // (read offline from the store with the config).
    m.stop();
    std::thread::sleep(Duration::from_millis(2500));
    let cfg = config_path(&m);
    let (code, out, err) = check(&[&"-c", &cfg, &m.backing()]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("CRITICAL group often: newest snapshot"),
        "{out}"
    );
    assert!(out.contains("OK group hourly"), "{out}");
    assert!(out.contains("OK group yearly"), "{out}");
    assert!(err.contains("often"), "{err}");
}

#[test]
fn deleting_a_middle_snapshot_through_the_mount_keeps_the_others_byte_identical() {
    const SIZE: u64 = 64 * MIB;
    let mut m = Mount::with_setup(|b| volume(b, "disk.img", SIZE, 5), None);
    let disk = m.path().join("disk.img");
    let (mut rng, mut noise) = (Rng::new(5), Noise::new(5));
    let mut hashes = std::collections::BTreeMap::new();
    for i in 1..=4 {
        let name = format!("mid-{i}");
        if i > 1 {
            scribble(&disk, SIZE, 48, &mut rng, &mut noise);
        }
        hashes.insert(name.clone(), blake3_file(&disk));
        assert_eq!(create(&m, "all", Some(name.as_str())), name);
    }
    let check_all = |m: &Mount, expect: &[&str]| {
        let left = names(&list(m.path()));
        assert_eq!(left, expect);
        for n in &left {
            assert_eq!(
                blake3_file(&snap_file(m, n, "disk.img")),
                hashes[n],
                "{n} reads back otherwise"
            );
        }
        verify(m.path(), &left);
    };

    for gone in ["mid-2", "mid-1"] {
        ok(
            grainfs(&[&"snapshot", &"delete", &gone, &"-m", &m.path()]),
            &format!("snapshot delete {gone}"),
        );
    }
    check_all(&m, &["mid-3", "mid-4"]);

    // kill -9 while mid-3 is being deleted (its blocks merged into mid-4), at a random moment
    // of the ~100 ms the delete takes from its record on: the next daemon finishes the delete,
    // and mid-4 reads as before.
    let delay_ms = now_ns() / 1000 % 100;
    let record = m.store().join("snapshots").join(".deleting.json");
    let noted =
        |record: &Path| std::fs::read_to_string(record).is_ok_and(|t| t.contains("\"mid-3\""));
    let mut delete = Command::new(grainfs_bin())
        .args(["snapshot", "delete", "mid-3", "-m"])
        .arg(m.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn snapshot delete");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !noted(&record) && delete.try_wait().ok().flatten().is_none()
    {
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    m.kill9();
    let interrupted = noted(&record);
    let _ = delete.wait();
    let when = format!(
        "kill -9 {delay_ms} ms after the delete of mid-3 was noted, {}",
        if interrupted {
            "while it ran"
        } else {
            "after it ended"
        }
    );
    eprintln!("{when}");
    m.remount();
    let left = names(&list(m.path()));
    assert_eq!(left, ["mid-4"], "{when}\n{}", m.log_text());
    if interrupted {
        assert!(
            m.log_text()
                .contains("finished interrupted delete(s) of mid-3"),
            "{when}\n{}",
            m.log_text()
        );
    }
    check_all(&m, &["mid-4"]);
    let record = std::fs::read_to_string(&record).unwrap_or_default();
    assert!(
        !record.contains("mid-3"),
        "a delete is still noted: {record}"
    );
    // The live volume is untouched by all of it.
    assert_eq!(blake3_file(&disk), hashes["mid-4"]);
}

#[test]
fn listing_snapshots_while_prune_runs_disturbs_neither() {
    let m = Mount::with_setup(
        |b| volume(b, "vm.img", 64 * KIB, 6),
        Some(&group_config("keep = { last = 2 }\n")),
    );
    let mut failures: Vec<String> = Vec::new();
    // A few rounds: many snapshots, then one prune that deletes all but 2 of them while three
    // `snapshot list` loops run, as monitoring or a user would.
    for round in 0..3 {
        for i in 0..24 {
            create(&m, "vms", Some(&format!("r{round}-{i:02}")));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let listers: Vec<_> = (0..3)
            .map(|_| {
                let (stop, mnt) = (stop.clone(), m.path().to_path_buf());
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        seen.extend(listed(&mnt).into_iter().filter_map(Result::err));
                    }
                    seen
                })
            })
            .collect();
        let out = ok(
            grainfs(&[&"prune", &"--json", &"-m", &m.path()]),
            "prune --json",
        );
        stop.store(true, Ordering::Relaxed);
        for l in listers {
            failures.extend(
                l.join()
                    .expect("lister")
                    .into_iter()
                    .map(|e| format!("snapshot list showed {e}")),
            );
        }
        let r: serde_json::Value = serde_json::from_str(&out).expect("prune --json");
        if let Some(failed) = r["failed"].as_array().filter(|f| !f.is_empty()) {
            failures.push(format!("prune could not remove {failed:?}"));
        }
        let left = names(&list(m.path()));
        if left.len() != 2 {
            failures.push(format!("after prune: {left:?}"));
        }
        if !failures.is_empty() {
            break;
        }
    }
    let record = std::fs::read_to_string(m.store().join("snapshots").join(".deleting.json"))
        .unwrap_or_default();
    assert!(
        failures.is_empty(),
        "{}\n.deleting.json: {record}\n--- daemon log ---\n{}",
        failures.join("\n"),
        m.log_text()
    );
}
