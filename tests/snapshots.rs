//! Snapshots through a real mount, taken with `grainfs snapshot create` and read back at
//! `<mount>/.snapshots/<name>/<path>` as a user would: a random oracle of writes, truncates,
//! creates, unlinks and snapshot deletes; cross-volume consistency under a live writer;
//! copy-before-write under a writer racing the capture; sqlite3 (WAL and rollback journal) and
//! qemu images snapshotted while they work; ENOSPC in the store; kill -9 during a capture; and
//! what a user can and cannot do in `.snapshots`.
//!
//! The oracle everywhere: the blake3 of a volume's content at the snapshot's instant equals the
//! blake3 of the file read back from the snapshot.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{open_rw, Mount, Noise, Rng, KIB, MIB, SMALL_GEOMETRY};
use grainfs::snapshot::CreateReport;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Where a user reads file `rel` of snapshot `snap`: the one place that says how snapshots are
/// read back.
fn snap_file(m: &Mount, snap: &str, rel: &str) -> PathBuf {
    m.path().join(".snapshots").join(snap).join(rel)
}

/// The `grainfs snapshot` CLI for one mount (and the config it was started with, when the
/// store is not the default one).
struct Cli<'a> {
    m: &'a Mount,
    config: Option<PathBuf>,
}

impl<'a> Cli<'a> {
    fn new(m: &'a Mount) -> Cli<'a> {
        Cli { m, config: None }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::grainfs_bin());
        c.args(args).arg("-m").arg(self.m.path());
        if let Some(cfg) = &self.config {
            c.arg("-c").arg(cfg);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("run grainfs {args:?}: {e}"))
    }

    /// `grainfs snapshot create --json ARGS`, which must succeed.
    fn create(&self, args: &[&str]) -> CreateReport {
        let mut all = vec!["snapshot", "create", "--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "grainfs {all:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.m.log_text()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "snapshot create --json printed no CreateReport ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `grainfs snapshot create ARGS`, which must fail with exit status 1; returns stderr.
    fn create_fails(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshot", "create"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(1),
            "grainfs {all:?} should fail with status 1:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Names of the committed snapshots, from `snapshot list --json`.
    fn list(&self) -> BTreeSet<String> {
        let out = self.run(&["snapshot", "list", "--json"]);
        assert!(
            out.status.success(),
            "snapshot list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("snapshot list --json is JSON");
        v.as_array()
            .expect("snapshot list --json is an array")
            .iter()
            .map(|s| {
                assert!(s.get("error").is_none(), "unreadable snapshot in list: {s}");
                s["name"].as_str().expect("name").to_string()
            })
            .collect()
    }

    fn delete(&self, name: &str) -> Output {
        self.run(&["snapshot", "delete", name])
    }

    fn delete_ok(&self, name: &str) {
        let out = self.delete(name);
        assert!(
            out.status.success(),
            "snapshot delete {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `grainfs snapshot verify`: every snapshot must verify.
    fn verify_all(&self) {
        let out = self.run(&["snapshot", "verify", "--json"]);
        assert!(
            out.status.success(),
            "snapshot verify failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Write `size` pseudo-random bytes to `path` in 4 MiB pieces; returns the blake3 of the whole
/// file and of each `block` bytes of it.
fn write_random_file(path: &Path, size: u64, seed: u64, block: u64) -> (String, Vec<String>) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    let mut noise = Noise::new(seed);
    let mut whole = blake3::Hasher::new();
    let mut blocks = Vec::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(4 * MIB);
        let chunk = noise.bytes(n as usize);
        whole.update(&chunk);
        blocks.extend(chunk.chunks(block as usize).map(hash));
        f.write_all(&chunk)
            .unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        left -= n;
    }
    (whole.finalize().to_hex().to_string(), blocks)
}

/// blake3 of each `block` bytes of the file at `path`.
fn block_hashes(path: &Path, block: u64) -> Vec<String> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut out = Vec::new();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("read {path:?}: {e}"),
            }
        }
        out.extend(buf[..n].chunks(block as usize).map(hash));
        if n < buf.len() {
            return out;
        }
    }
}

/// blake3 of a file, streamed (the fixture's `blake3_file` reads it whole).
fn hash_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    h.finalize().to_hex().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {p:?}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// Names in a directory.
fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Entries of `<store>/snapshots` that are builds in progress or crashed (`.tmp-*`).
fn tmp_dirs(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Total bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(md) if md.is_dir() => du(&e.path()),
            Ok(md) => md.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// 1. The oracle through a mount

/// A file of the model at a snapshot's instant.
#[derive(Clone, Debug, PartialEq)]
struct FileState {
    hash: String,
    size: u64,
    mode: u32,
}

const POOL: [&str; 4] = ["a.img", "b.img", "c.img", "d.img"];

/// One seeded run: random writes (some of zeros, some past the end), truncates both ways,
/// creates, unlinks and chmods across the volumes of `vols/`, snapshots at random points and
/// deletes of the newest snapshot. Every snapshot is checked when taken and again at the end.
/// Returns how many volumes of each kind (and rescanned partitions) the snapshots had.
fn oracle_run(seed: u64, steps: usize, writeback: bool) -> BTreeMap<String, usize> {
    let m = Mount::in_mode(writeback, |_| {}, Some(SMALL_GEOMETRY));
    let cli = Cli::new(&m);
    let dir = m.path().join("vols");
    std::fs::create_dir(&dir).unwrap();
    let mut rng = Rng::new(seed);
    let mut noise = Noise::new(seed);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for name in &POOL[..3] {
        let data = noise.bytes((rng.below(2 * MIB) + 1) as usize);
        std::fs::write(dir.join(name), &data).unwrap();
        model.insert(name.to_string(), data);
    }
    let mut alive: Vec<(String, BTreeMap<String, FileState>)> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    let mut taken = 0;
    let mut log: Vec<String> = Vec::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for step in 0..steps {
        let names: Vec<String> = model.keys().cloned().collect();
        let pick = names[rng.below(names.len() as u64) as usize].clone();
        let path = dir.join(&pick);
        let r = rng.below(100);
        if r < 38 {
            let len = model[&pick].len() as u64;
            let off = rng.below(len + 256 * KIB);
            let n = rng.below(160 * KIB) + 1;
            let data = if rng.below(8) == 0 {
                vec![0u8; n as usize]
            } else {
                noise.bytes(n as usize)
            };
            open_rw(&path).write_all_at(&data, off).unwrap();
            let v = model.get_mut(&pick).unwrap();
            let end = (off + n) as usize;
            if v.len() < end {
                v.resize(end, 0);
            }
            v[off as usize..end].copy_from_slice(&data);
            log.push(format!("write {pick} {off}+{n}"));
        } else if r < 52 {
            let size = rng.below(4 * MIB);
            open_rw(&path).set_len(size).unwrap();
            model.get_mut(&pick).unwrap().resize(size as usize, 0);
            log.push(format!("truncate {pick} {size}"));
        } else if r < 59 {
            if let Some(name) = POOL.iter().find(|n| !model.contains_key(**n)) {
                let data = noise.bytes(rng.below(MIB) as usize);
                std::fs::write(dir.join(name), &data).unwrap();
                model.insert(name.to_string(), data);
                log.push(format!("create {name}"));
            }
        } else if r < 65 {
            if model.len() > 1 {
                std::fs::remove_file(&path).unwrap();
                model.remove(&pick);
                log.push(format!("unlink {pick}"));
            }
        } else if r < 70 {
            // The same volume (inode) under another name.
            if let Some(to) = POOL.iter().rev().find(|n| !model.contains_key(**n)) {
                std::fs::rename(&path, dir.join(to)).unwrap();
                let data = model.remove(&pick).unwrap();
                model.insert(to.to_string(), data);
                log.push(format!("rename {pick} {to}"));
            }
        } else if r < 74 {
            let mode = [0o600, 0o644, 0o640, 0o755][rng.below(4) as usize];
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            log.push(format!("chmod {pick} {mode:o}"));
        } else if r < 92 {
            let name = format!("s{taken}");
            taken += 1;
            // No writer runs now: the state before the call is the state at the instant.
            let mut state = BTreeMap::new();
            for (n, data) in &model {
                let live = dir.join(n);
                let st = FileState {
                    hash: hash(data),
                    size: data.len() as u64,
                    mode: mode(&live),
                };
                assert_eq!(
                    hash_file(&live),
                    st.hash,
                    "seed {seed} step {step}: the live {n} differs from the model; ops:\n{}",
                    log.join("\n")
                );
                state.insert(n.clone(), st);
            }
            let report = cli.create(&["--name", &name]);
            let paths: BTreeSet<String> = report.volumes.iter().map(|v| v.path.clone()).collect();
            let want: BTreeSet<String> = model.keys().map(|n| format!("vols/{n}")).collect();
            assert_eq!(paths, want, "seed {seed}: volumes of {name}");
            for v in &report.volumes {
                *kinds.entry(v.kind.clone()).or_default() += 1;
                *kinds.entry("rescanned partitions".into()).or_default() +=
                    v.partitions.iter().filter(|p| p.rescan).count();
            }
            check_snapshot(&m, &name, &state, &format!("seed {seed} step {step}"), &log);
            log.push(format!("snapshot {name} (parent {:?})", report.parent));
            alive.push((name, state));
        } else if let Some((name, _)) = alive.pop() {
            cli.delete_ok(&name);
            log.push(format!("delete {name}"));
            deleted.push(name);
        }
    }
    for (name, state) in &alive {
        check_snapshot(&m, name, state, &format!("seed {seed} at the end"), &log);
    }
    for name in &deleted {
        assert!(
            !snap_file(&m, name, "").exists(),
            "seed {seed}: deleted snapshot {name} still in .snapshots"
        );
    }
    let listed = cli.list();
    let want: BTreeSet<String> = alive.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed, want, "seed {seed}: snapshot list");
    cli.verify_all();
    assert!(m.unmount().success());
    kinds
}

/// Every file of `state` reads back from snapshot `name` with its hash, size and mode, and
/// `vols/` of the snapshot holds nothing else.
fn check_snapshot(
    m: &Mount,
    name: &str,
    state: &BTreeMap<String, FileState>,
    when: &str,
    log: &[String],
) {
    let dir = snap_file(m, name, "vols");
    let listed = names_in(&dir);
    let want: BTreeSet<String> = state.keys().cloned().collect();
    assert_eq!(
        listed,
        want,
        "{when}: files of snapshot {name}; ops:\n{}",
        log.join("\n")
    );
    for (n, st) in state {
        let p = dir.join(n);
        let md = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{when}: stat {p:?}: {e}"));
        let got = FileState {
            hash: hash_file(&p),
            size: md.len(),
            mode: md.permissions().mode() & 0o7777,
        };
        assert_eq!(
            &got,
            st,
            "{when}: {n} in snapshot {name}; ops:\n{}",
            log.join("\n")
        );
    }
}

#[test]
fn every_snapshot_reads_back_as_the_volumes_were_at_its_instant() {
    let t = Instant::now();
    let seeds: Vec<u64> = match std::env::var("GRAINFS_SEED") {
        Ok(s) => vec![s.parse().expect("GRAINFS_SEED is a number")],
        Err(_) => vec![1, 2, 3, 4, 5],
    };
    let fixed = std::env::var("GRAINFS_SEED").is_err();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for seed in seeds {
        for (k, n) in oracle_run(seed, 80, false) {
            *kinds.entry(k).or_default() += n;
        }
    }
    eprintln!("oracle: {kinds:?} in {:.1} s", secs(t));
    if fixed {
        // The sequences must reach what they are for: chains of incremental snapshots, mixed
        // volumes, and rescans after a delete.
        for k in ["FULL", "INCREMENTAL", "HYBRID", "rescanned partitions"] {
            assert!(kinds.get(k).is_some_and(|&n| n > 0), "no {k}: {kinds:?}");
        }
    }
}

#[test]
fn every_snapshot_reads_back_as_the_volumes_were_at_its_instant_write_back() {
    let t = Instant::now();
    let kinds = oracle_run(1, 80, true);
    eprintln!("oracle (write-back): {kinds:?} in {:.1} s", secs(t));
}

// ---------------------------------------------------------------------------------------------
// 2. Consistency across volumes

/// The counter at offset 0 of a volume.
fn counter(p: &Path) -> u64 {
    let mut b = [0u8; 8];
    File::open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
        .read_exact_at(&mut b, 0)
        .unwrap_or_else(|e| panic!("read {p:?}: {e}"));
    u64::from_le_bytes(b)
}

#[test]
fn a_group_is_snapshotted_at_one_instant_across_its_volumes() {
    lockstep(false)
}

/// In write-back mode unsynced writes reach the volumes in no set order (as after a power
/// cut), so only the order of fsync'd writes across volumes holds: a's every 8th write is
/// fsync'd before b gets the same count.
#[test]
fn a_group_keeps_the_order_of_fsynced_writes_across_its_volumes_write_back() {
    lockstep(true)
}

/// Two volumes a and b written in lockstep (a first), snapshotted as a group ten times.
fn lockstep(writeback: bool) {
    let t = Instant::now();
    let config =
        format!("{SMALL_GEOMETRY}\n[[group]]\nname = \"pair\"\nvolumes = [\"a.img\", \"b.img\"]\n");
    let m = Mount::in_mode(
        writeback,
        |b| {
            for (n, seed) in [("a.img", 1), ("b.img", 2), ("c.img", 3)] {
                write_random_file(&b.join(n), 2 * MIB, seed, MIB);
                // The counters start at 0.
                OpenOptions::new()
                    .write(true)
                    .open(b.join(n))
                    .unwrap()
                    .write_all_at(&[0; 8], 0)
                    .unwrap();
            }
        },
        Some(&config),
    );
    let cli = Cli::new(&m);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (a, b) = (
            open_rw(&m.path().join("a.img")),
            open_rw(&m.path().join("b.img")),
        );
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // a first, then b: at any instant a is b or b + 1.
                a.write_all_at(&n.to_le_bytes(), 0).unwrap();
                if n.is_multiple_of(8) {
                    a.sync_data().unwrap();
                }
                b.write_all_at(&n.to_le_bytes(), 0).unwrap();
                written.store(n, Ordering::Relaxed);
            }
        })
    };
    let mut seen = Vec::new();
    for i in 0..10 {
        let before = written.load(Ordering::Relaxed);
        let name = format!("p{i}");
        let r = cli.create(&["pair", "--name", &name]);
        assert_eq!(r.group, "pair");
        let after = written.load(Ordering::Relaxed);
        let (a, b) = (
            counter(&snap_file(&m, &name, "a.img")),
            counter(&snap_file(&m, &name, "b.img")),
        );
        if writeback {
            assert!(
                a >= b / 8 * 8,
                "snapshot {name}: a = {a}, b = {b}: a's fsync'd write {} is missing",
                b / 8 * 8
            );
        } else {
            assert!(
                a >= b && a - b <= 1,
                "snapshot {name}: a = {a}, b = {b}: not one instant (a is always written first)"
            );
        }
        assert!(
            b >= before && b <= after + 1,
            "snapshot {name}: b = {b}, but the writer was at {before} before the call and {after} after"
        );
        assert!(
            !snap_file(&m, &name, "c.img").exists(),
            "c.img is not in group pair"
        );
        seen.push((a, b));
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        seen.windows(2).all(|w| w[0].1 <= w[1].1),
        "counters went back between snapshots: {seen:?}"
    );
    assert!(
        seen.last().unwrap().1 > seen[0].1,
        "the writer made no progress during the snapshots: {seen:?}"
    );
    cli.verify_all();
    eprintln!("consistency: {seen:?} in {:.1} s", secs(t));
    assert!(m.unmount().success());
}

// ---------------------------------------------------------------------------------------------
// 3. Copy-before-write

/// What writer write `i` of attempt `attempt` puts in its block.
fn marker(attempt: u64, i: u64, len: u64) -> Vec<u8> {
    let mut v = vec![(i as u8) | 0x80; len as usize];
    v[..16].copy_from_slice(b"grainfs-marker--");
    v[16..24].copy_from_slice(&attempt.to_le_bytes());
    v[24..32].copy_from_slice(&i.to_le_bytes());
    v
}

#[test]
fn writes_racing_a_capture_land_in_the_snapshot_exactly_when_they_returned_before_it() {
    let t = Instant::now();
    const BS: u64 = 64 * KIB;
    const SIZE: u64 = 256 * MIB;
    let nblocks = SIZE / BS;
    let mut pre: Vec<String> = Vec::new();
    let m = Mount::with_setup(
        |b| pre = write_random_file(&b.join("big.img"), SIZE, 42, BS).1,
        None,
    );
    let cli = Cli::new(&m);
    let path = m.path().join("big.img");
    let mut by_writers = Vec::new();
    for attempt in 0..3u64 {
        let name = format!("cbw{attempt}");
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let writer = {
            let f = open_rw(&path);
            let (stop, started, done) = (stop.clone(), started.clone(), done.clone());
            // One writer: completion order is index order. Block nblocks-1-i gets write i.
            std::thread::spawn(move || {
                for i in 0..nblocks {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let data = marker(attempt, i, BS);
                    started.store(i + 1, Ordering::SeqCst);
                    f.write_all_at(&data, (nblocks - 1 - i) * BS).unwrap();
                    done.store(i + 1, Ordering::SeqCst);
                }
            })
        };
        let wait = Instant::now();
        while done.load(Ordering::SeqCst) < 8 {
            assert!(wait.elapsed() < Duration::from_secs(10), "writer stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
        let done_before = done.load(Ordering::SeqCst);
        let report = cli.create(&["--name", &name]);
        let started_after = started.load(Ordering::SeqCst);
        // More writes after the snapshot, which it must not show.
        let wait = Instant::now();
        while done.load(Ordering::SeqCst) < (started_after + 64).min(nblocks) {
            assert!(wait.elapsed() < Duration::from_secs(10), "writer stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        let total = done.load(Ordering::SeqCst);
        assert_eq!(report.volumes.len(), 1);
        assert_eq!(
            report.volumes[0].kind, "FULL",
            "attempt {attempt}: no parent, the snapshot must be FULL: {report:?}"
        );

        // Which writes are in the snapshot.
        let got = block_hashes(&snap_file(&m, &name, "big.img"), BS);
        assert_eq!(got.len() as u64, nblocks);
        let mut in_snap = Vec::new();
        for i in 0..total {
            let b = (nblocks - 1 - i) as usize;
            let w = hash(&marker(attempt, i, BS));
            in_snap.push(if got[b] == w {
                true
            } else if got[b] == pre[b] {
                false
            } else {
                panic!("attempt {attempt}: block {b} (write {i}) is neither before nor after it")
            });
        }
        for b in 0..(nblocks - total) as usize {
            assert_eq!(got[b], pre[b], "attempt {attempt}: untouched block {b}");
        }
        let k = in_snap.iter().take_while(|x| **x).count() as u64;
        assert!(
            in_snap[k as usize..].iter().all(|x| !x),
            "attempt {attempt}: the writes in the snapshot are not a prefix of the write sequence: {:?}",
            in_snap
                .iter()
                .enumerate()
                .filter(|(_, x)| **x)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        );
        assert!(
            k >= done_before && k <= started_after,
            "attempt {attempt}: {k} writes in the snapshot, but {done_before} had returned before the call and {started_after} had started when it returned"
        );
        eprintln!(
            "copy-before-write attempt {attempt}: {total} writes, the first {k} in the snapshot; by writers {}, by workers {}, capture {} ms, barrier {} us",
            report.blocks_by_writers, report.blocks_by_workers, report.capture_ms, report.barrier_us
        );
        // Every block of a FULL capture of noise is saved once, by a writer or a worker, and
        // a writer saves only blocks it overwrites after the barrier.
        assert_eq!(
            report.blocks_by_writers + report.blocks_by_workers,
            nblocks,
            "attempt {attempt}: blocks saved: {report:?}"
        );
        assert!(
            report.blocks_by_writers <= total - k,
            "attempt {attempt}: {} blocks saved by writers, but only {} writes came after the barrier",
            report.blocks_by_writers,
            total - k
        );
        by_writers.push(report.blocks_by_writers);
        // The live content now holds every write; the next attempt starts from it, FULL again
        // once this snapshot is gone.
        for i in 0..total {
            pre[(nblocks - 1 - i) as usize] = hash(&marker(attempt, i, BS));
        }
        cli.delete_ok(&name);
        if report.blocks_by_writers > 0 {
            break;
        }
    }
    // On a filesystem with reflink the FULL capture is a few clones that take milliseconds,
    // and the writer rarely meets it: the prefix check above is what counts there.
    let cloned = m
        .log_text()
        .lines()
        .any(|l| l.contains("blocks by reflink") && !l.contains("(0 blocks by reflink)"));
    assert!(
        cloned || by_writers.iter().any(|&n| n > 0),
        "no write ever copied a block before changing it (blocks_by_writers {by_writers:?}): the writer never met the capture"
    );
    assert_eq!(block_hashes(&path, BS), pre, "the live volume");
    eprintln!("copy-before-write: {:.1} s", secs(t));
    assert!(m.unmount().success());
}

// ---------------------------------------------------------------------------------------------
// 4. sqlite3 committing while snapshots are taken

const ROWS_PER_TXN: u64 = 20;

/// sqlite3 run on `db`, which must succeed; returns stdout.
fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {db:?} {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copy the database `name` of snapshot `snap` with its journal or WAL (not the -shm, which
/// sqlite rebuilds) into `to`; returns the copy's path.
fn copy_db_out(m: &Mount, snap: &str, name: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    let dir = snap_file(m, snap, "");
    for n in names_in(&dir) {
        if n.starts_with(name) && !n.ends_with("-shm") {
            std::fs::copy(dir.join(&n), to.join(&n))
                .unwrap_or_else(|e| panic!("copy {n} out of {snap}: {e}"));
        }
    }
    to.join(name)
}

fn sqlite_under_snapshots(journal_mode: &str) {
    if common::missing("sqlite3") {
        return;
    }
    let t = Instant::now();
    let m = Mount::new();
    let cli = Cli::new(&m);
    let name = format!("{}.db", journal_mode.to_lowercase());
    let db = m.path().join(&name);
    let mode = sqlite(
        &db,
        &format!(
            "PRAGMA journal_mode={journal_mode}; CREATE TABLE t(id INTEGER PRIMARY KEY, txn INTEGER, b BLOB);"
        ),
    );
    assert_eq!(mode.trim(), journal_mode.to_lowercase());

    // One sqlite3 process keeps committing transactions fed on its stdin; after each COMMIT
    // it prints the transaction's number, so `acked` counts the commits that have returned.
    let mut child = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let out = child.stdout.take().unwrap();
        let acked = acked.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let line = line.expect("sqlite3 stdout");
                if let Ok(n) = line.trim().parse::<u64>() {
                    acked.store(n, Ordering::SeqCst);
                }
            }
        })
    };
    let feeder = {
        let mut input = child.stdin.take().unwrap();
        let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Keep at most two transactions in the pipe, so `sent` stays close to what
                // sqlite3 has done.
                if n >= acked.load(Ordering::SeqCst) + 2 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                n += 1;
                sent.store(n, Ordering::SeqCst);
                let sql = format!(
                    "BEGIN;\nWITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {ROWS_PER_TXN})\n\
                     INSERT INTO t(txn, b) SELECT {n}, randomblob(3000) FROM k;\nCOMMIT;\nSELECT {n};\n"
                );
                if input.write_all(sql.as_bytes()).is_err() {
                    return;
                }
            }
        })
    };

    let mut taken = Vec::new();
    let mut sent_at_last = 0;
    for i in 0..5 {
        // Commits since the last snapshot returned: the row count must grow.
        let wait = Instant::now();
        while acked.load(Ordering::SeqCst) <= sent_at_last + 1 {
            assert!(
                wait.elapsed() < Duration::from_secs(20),
                "sqlite3 stopped committing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let acked_before = acked.load(Ordering::SeqCst);
        let snap = format!("{}{i}", journal_mode.to_lowercase());
        cli.create(&["--name", &snap]);
        sent_at_last = sent.load(Ordering::SeqCst);
        taken.push((snap, acked_before, sent_at_last));
    }
    // More commits after the last snapshot, which none may show; then the checks.
    let wait = Instant::now();
    while acked.load(Ordering::SeqCst) <= sent_at_last + 2 {
        assert!(
            wait.elapsed() < Duration::from_secs(20),
            "sqlite3 stopped committing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder");
    let status = child.wait().expect("wait sqlite3");
    reader.join().expect("reader");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(status.success(), "sqlite3: {err}");
    let scratch = m.scratch();
    let mut counts = Vec::new();
    for (snap, acked_before, sent_after) in &taken {
        let copy = copy_db_out(&m, snap, &name, &scratch.join(snap));
        let out = sqlite(
            &copy,
            "PRAGMA integrity_check; SELECT count(*), count(DISTINCT txn), max(txn) FROM t;",
        );
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("ok"),
            "{journal_mode}: integrity_check of snapshot {snap}:\n{out}"
        );
        let nums: Vec<u64> = lines
            .next()
            .unwrap_or_default()
            .split('|')
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let (rows, txns, max) = (nums[0], nums[1], nums[2]);
        assert_eq!(
            rows,
            txns * ROWS_PER_TXN,
            "{journal_mode}: snapshot {snap} holds part of a transaction"
        );
        assert_eq!(
            txns, max,
            "{journal_mode}: snapshot {snap} lost a transaction"
        );
        assert!(
            txns >= *acked_before && txns <= *sent_after,
            "{journal_mode}: snapshot {snap} has {txns} transactions; {acked_before} had committed before it, {sent_after} were sent when it returned"
        );
        counts.push(rows);
    }
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "{journal_mode}: row counts do not grow across snapshots: {counts:?}"
    );
    assert_eq!(
        sqlite(&db, "PRAGMA integrity_check;").trim(),
        "ok",
        "the live database"
    );
    cli.verify_all();
    eprintln!("sqlite {journal_mode}: rows {counts:?} in {:.1} s", secs(t));
    assert!(m.unmount().success());
}

#[test]
fn sqlite_wal_snapshots_open_clean_while_it_commits() {
    sqlite_under_snapshots("WAL");
}

#[test]
fn sqlite_rollback_journal_snapshots_open_clean_while_it_commits() {
    sqlite_under_snapshots("DELETE");
}

// ---------------------------------------------------------------------------------------------
// 5. qemu images written while snapshots are taken

fn qemu_io(args: &[&str], image: &Path) -> String {
    let out = Command::new("qemu-io")
        .args(args)
        .arg(image)
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Older qemu-io exits 0 even when a command fails; it always says so, though.
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("rror"),
        "qemu-io {args:?} {image:?}: {text}"
    );
    text
}

/// `qemu-img check` of `image`: no corruption. Leaked clusters (exit 3) are what a crash in the
/// middle of an allocation leaves by qcow2's design, and are reported but accepted.
fn qemu_img_check(image: &Path, what: &str) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(image)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {}
        Some(3) => eprintln!("note: {what}: qemu-img check found only leaked clusters:\n{text}"),
        _ => panic!(
            "{what}: qemu-img check ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn qcow2_snapshots_pass_qemu_img_check_while_qemu_io_writes() {
    if common::missing("qemu-img") || common::missing("qemu-io") {
        return;
    }
    let t = Instant::now();
    let m = Mount::new();
    let cli = Cli::new(&m);
    let disk = m.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("1G")
        .output()
        .expect("qemu-img create");
    assert!(out.status.success(), "{out:?}");
    // Write i fills MiB i with pattern i % 250 + 1, each in its own qemu-io process.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let pattern = |i: u64| i % 250 + 1;
    let writer = {
        let (stop, started, done, disk) =
            (stop.clone(), started.clone(), done.clone(), disk.clone());
        std::thread::spawn(move || {
            for i in 0..1000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                started.store(i + 1, Ordering::SeqCst);
                qemu_io(
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        &format!("write -P {} {i}M 1M", pattern(i)),
                    ],
                    &disk,
                );
                done.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let mut taken = Vec::new();
    for s in 0..4 {
        let wait = Instant::now();
        while done.load(Ordering::SeqCst) < 2 * (s + 1) {
            assert!(wait.elapsed() < Duration::from_secs(30), "qemu-io stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
        let done_before = done.load(Ordering::SeqCst);
        let snap = format!("q{s}");
        cli.create(&["--name", &snap]);
        taken.push((snap, done_before, started.load(Ordering::SeqCst)));
    }
    // More writes after the last snapshot, which none may show; then the checks.
    let last = taken.last().map_or(0, |t| t.2);
    let wait = Instant::now();
    while done.load(Ordering::SeqCst) < last + 2 {
        assert!(wait.elapsed() < Duration::from_secs(30), "qemu-io stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("qemu-io writer");
    let scratch = m.scratch();
    for (snap, done_before, started_after) in &taken {
        let copy = scratch.join(format!("{snap}.qcow2"));
        std::fs::copy(snap_file(&m, snap, "disk.qcow2"), &copy).expect("copy the image out");
        qemu_img_check(&copy, &format!("snapshot {snap}"));
        // Writes that returned before the call are there; those begun after it are not.
        let mut cmds: Vec<String> = (0..*done_before)
            .map(|i| format!("read -P {} {i}M 1M", pattern(i)))
            .collect();
        cmds.push(format!("read -P 0 {started_after}M 16M"));
        let mut args = vec!["-r", "-f", "qcow2"];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        qemu_io(&args, &copy);
        eprintln!("qemu snapshot {snap}: writes 0..{done_before} there, {started_after}.. absent");
    }
    qemu_img_check(&disk, "the live image");
    cli.verify_all();
    eprintln!("qemu: {:.1} s", secs(t));
    assert!(m.unmount().success());
}

// ---------------------------------------------------------------------------------------------
// 6. ENOSPC in the store

/// A tmpfs mounted on a temp dir, unmounted on drop (even when the test panics).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (and a note) when not root.
    fn mount(size: &str) -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("grainfs-tmpfs-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            eprintln!(
                "SKIP: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c =
            std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).expect("path");
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Dirty blocks of volume `path` from `grainfs status --json`.
fn dirty_blocks(m: &Mount, config: &Path, path: &str) -> u64 {
    let out = Command::new(common::grainfs_bin())
        .args(["status", "--json", "-c"])
        .arg(config)
        .arg(m.path())
        .output()
        .expect("run grainfs status");
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: grainfs::control::StatusReport =
        serde_json::from_slice(&out.stdout).expect("status --json");
    assert!(r.live, "{r:?}");
    r.volumes
        .iter()
        .find(|v| v.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no {path} in status: {r:?}"))
        .dirty_blocks
}

#[test]
fn a_full_store_aborts_the_snapshot_and_keeps_every_change_tracked() {
    // Declared before the mount, so the mount goes first on drop.
    let Some(tmpfs) = Tmpfs::mount("16m") else {
        return;
    };
    let t = Instant::now();
    let store = tmpfs.path().join("store");
    let config = format!("store = \"{}\"\n", store.display());
    let m = Mount::with_setup(
        |b| {
            write_random_file(&b.join("small.img"), MIB, 7, MIB);
        },
        Some(&config),
    );
    let cfg = m.scratch().join("cli.toml");
    std::fs::write(&cfg, &config).unwrap();
    let cli = Cli {
        m: &m,
        config: Some(cfg.clone()),
    };
    assert!(
        !m.backing().join(".grainfs").exists(),
        "the store is on the tmpfs, not in the backing dir"
    );
    cli.create(&["--name", "first"]);

    // 64 MiB of noise, written through the mount so that every block is tracked dirty.
    let big = m.path().join("big.img");
    {
        let f = open_rw(&big);
        let mut noise = Noise::new(8);
        for i in 0..16 {
            f.write_all_at(&noise.bytes((4 * MIB) as usize), i * 4 * MIB)
                .unwrap();
        }
    }
    let live = (hash_file(&m.path().join("small.img")), hash_file(&big));
    let dirty = dirty_blocks(&m, &cfg, "big.img");
    assert_eq!(dirty, 64 * MIB / (64 * KIB), "big.img is all dirty");

    let err = cli.create_fails(&["--name", "second"]);
    eprintln!("enospc: snapshot create said: {}", err.trim());
    assert!(
        err.contains("No space left") || err.contains("ENOSPC"),
        "the error must say the store is full: {err}"
    );
    assert!(
        err.contains("aborted"),
        "the error must say the snapshot was aborted: {err}"
    );
    assert!(
        err.contains(&store.display().to_string()) && !err.contains("/proc/self/fd"),
        "the error must name the real store path: {err}"
    );
    assert_eq!(cli.list(), BTreeSet::from(["first".to_string()]));
    assert_eq!(
        tmp_dirs(&store),
        Vec::<String>::new(),
        "partial data left in the store"
    );
    assert!(!snap_file(&m, "second", "").exists());
    assert_eq!(
        (hash_file(&m.path().join("small.img")), hash_file(&big)),
        live,
        "the live volumes changed"
    );
    assert_eq!(
        dirty_blocks(&m, &cfg, "big.img"),
        dirty,
        "the taken dirty bits were not given back"
    );

    // Room again: the next snapshot takes every change.
    open_rw(&big).set_len(MIB).unwrap();
    let r = cli.create(&["--name", "third"]);
    assert_eq!(r.parent.as_deref(), Some("first"));
    for n in ["small.img", "big.img"] {
        assert_eq!(
            hash_file(&snap_file(&m, "third", n)),
            hash_file(&m.path().join(n)),
            "{n} in snapshot third"
        );
    }
    assert_eq!(
        hash_file(&snap_file(&m, "first", "small.img")),
        live.0,
        "snapshot first"
    );
    assert!(!snap_file(&m, "first", "big.img").exists());
    cli.verify_all();
    eprintln!("enospc: {:.1} s", secs(t));
    assert!(m.unmount().success());
    drop(tmpfs);
}

// ---------------------------------------------------------------------------------------------
// 7. kill -9 during a capture

#[test]
fn kill9_during_a_capture_leaves_no_trace_and_loses_no_change() {
    let t = Instant::now();
    let config = "[tracking]\ninterval = \"1s\"\n";
    let mut small_data = Vec::new();
    let mut m = Mount::with_setup(
        |b| {
            small_data = Noise::new(70).bytes((4 * MIB) as usize);
            std::fs::write(b.join("small.img"), &small_data).unwrap();
        },
        Some(config),
    );
    let store = m.store();
    let cli = Cli::new(&m);
    let s0 = cli.create(&["--path", "small.img", "--name", "s0"]);
    assert_eq!(s0.volumes.len(), 1);
    let small_s0 = hash(&small_data);

    // Changes before the snapshot that will be killed.
    let small = m.path().join("small.img");
    let mut noise = Noise::new(71);
    for off in [0, MIB + 5, 3 * MIB + 64 * KIB] {
        let data = noise.bytes((100 * KIB) as usize);
        open_rw(&small).write_all_at(&data, off).unwrap();
        small_data[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    // A big new volume, so that the next capture runs for seconds.
    let big = m.path().join("big.img");
    let big_hash = {
        let f = open_rw(&big);
        let mut h = blake3::Hasher::new();
        let mut noise = Noise::new(72);
        for i in 0..128 {
            let chunk = noise.bytes((4 * MIB) as usize);
            h.update(&chunk);
            f.write_all_at(&chunk, i * 4 * MIB).unwrap();
        }
        h.finalize().to_hex().to_string()
    };
    eprintln!("kill -9: volumes written at {:.1} s", secs(t));
    // Let a tracking tick save the dirty bits of small.img (and clear the intent record).
    std::thread::sleep(Duration::from_millis(2500));
    drop(cli);

    let mut create = Command::new(common::grainfs_bin())
        .args([
            "snapshot", "create", "--path", "*.img", "--name", "s1", "-m",
        ])
        .arg(m.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapshot create");
    let tmp = store.join("snapshots/.tmp-s1");
    let wait = Instant::now();
    loop {
        if du(&tmp) >= 64 * MIB {
            break;
        }
        if let Ok(Some(s)) = create.try_wait() {
            panic!(
                "the capture ended ({s}) before it could be killed: {}",
                m.log_text()
            );
        }
        assert!(
            wait.elapsed() < Duration::from_secs(30),
            "the capture never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    m.kill9();
    let out = create.wait_with_output().expect("wait snapshot create");
    assert!(
        !out.status.success(),
        "snapshot create claimed success although the daemon died: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    eprintln!("kill -9: killed at {:.1} s", secs(t));
    m.remount();
    let cli = Cli::new(&m);
    assert_eq!(
        tmp_dirs(&store),
        Vec::<String>::new(),
        "crashed build not swept"
    );
    assert_eq!(cli.list(), BTreeSet::from(["s0".to_string()]));
    assert!(!snap_file(&m, "s1", "").exists());
    assert_eq!(hash_file(&small), hash(&small_data), "live small.img");
    assert_eq!(hash_file(&big), big_hash, "live big.img");

    // Changes after the restart; the next snapshot must hold them and those before the kill.
    for off in [2 * MIB, 4 * MIB - 10] {
        let data = noise.bytes((10 * KIB) as usize);
        open_rw(&small).write_all_at(&data, off).unwrap();
        let end = off as usize + data.len();
        if small_data.len() < end {
            small_data.resize(end, 0);
        }
        small_data[off as usize..end].copy_from_slice(&data);
    }
    open_rw(&big)
        .write_all_at(b"after the crash", 100 * MIB)
        .unwrap();
    let big_hash = hash_file(&m.backing().join("big.img"));
    let r = cli.create(&["--path", "*.img", "--name", "s2"]);
    eprintln!("kill -9: s2 taken at {:.1} s", secs(t));
    assert_eq!(r.parent.as_deref(), Some("s0"), "{r:?}");
    assert_eq!(
        hash_file(&snap_file(&m, "s2", "small.img")),
        hash(&small_data),
        "small.img in s2 (changes before the killed snapshot and after the restart)"
    );
    assert_eq!(hash_file(&snap_file(&m, "s2", "big.img")), big_hash);
    assert_eq!(hash_file(&snap_file(&m, "s0", "small.img")), small_s0);
    cli.verify_all();
    eprintln!(
        "kill -9: small.img in s2 {:?} stored {} bytes; {:.1} s",
        r.volumes
            .iter()
            .map(|v| (&v.path, &v.kind))
            .collect::<Vec<_>>(),
        r.stored_bytes,
        secs(t)
    );
}

// ---------------------------------------------------------------------------------------------
// 8. What a user can and cannot do

#[test]
fn snapshots_are_read_only_names_are_checked_and_dry_runs_take_nothing() {
    let m = Mount::with_setup(
        |b| {
            write_random_file(&b.join("vol.img"), 3 * MIB, 80, MIB);
            std::fs::create_dir(b.join("dir")).unwrap();
            write_random_file(&b.join("dir/other.img"), 100 * KIB, 81, MIB);
        },
        Some(SMALL_GEOMETRY),
    );
    let cli = Cli::new(&m);
    let vol = m.path().join("vol.img");
    assert_eq!(cli.list(), BTreeSet::new());

    // A dry run says what it would do, and why, and takes nothing.
    let plan = cli.create(&["--dry-run", "--name", "planned"]);
    assert!(plan.dry_run);
    assert_eq!(plan.volumes.len(), 2, "{plan:?}");
    for v in &plan.volumes {
        assert_eq!(v.stored_bytes, 0);
        assert!(!v.partitions.is_empty(), "{v:?}");
        assert!(v.partitions.iter().all(|p| !p.reason.is_empty()), "{v:?}");
    }
    let text = cli.run(&["snapshot", "create", "--dry-run"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("nothing taken") && text.contains("no parent snapshot"),
        "dry run text:\n{text}"
    );
    assert_eq!(cli.list(), BTreeSet::new(), "a dry run took a snapshot");
    assert!(!snap_file(&m, "planned", "").exists());

    let before = hash_file(&vol);
    cli.create(&["--name", "s1"]);
    assert!(
        !names_in(m.path()).contains(".snapshots"),
        ".snapshots is hidden from the root listing"
    );
    assert_eq!(
        names_in(&snap_file(&m, "s1", "")),
        ["dir", "vol.img"].map(String::from).into()
    );
    assert_eq!(hash_file(&snap_file(&m, "s1", "vol.img")), before);

    // Nothing in a snapshot can be changed.
    let erofs = |what: &str, r: std::io::Result<()>| match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
        Ok(()) => panic!("{what} in a snapshot succeeded"),
    };
    let sv = snap_file(&m, "s1", "vol.img");
    erofs(
        "open for writing",
        OpenOptions::new().write(true).open(&sv).map(drop),
    );
    erofs(
        "open with O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&sv)
            .map(drop),
    );
    erofs(
        "create",
        File::create(snap_file(&m, "s1", "new.img")).map(drop),
    );
    erofs("unlink", std::fs::remove_file(&sv));
    erofs("mkdir", std::fs::create_dir(snap_file(&m, "s1", "newdir")));
    erofs(
        "chmod",
        std::fs::set_permissions(&sv, std::fs::Permissions::from_mode(0o777)),
    );
    erofs(
        "rename",
        std::fs::rename(&sv, snap_file(&m, "s1", "renamed.img")),
    );
    erofs("rmdir", std::fs::remove_dir(snap_file(&m, "s1", "dir")));
    erofs(
        "mkdir in .snapshots",
        std::fs::create_dir(m.path().join(".snapshots/mine")),
    );
    assert_eq!(hash_file(&vol), before, "the live volume changed");
    assert_eq!(hash_file(&sv), before, "the snapshot changed");
    assert_eq!(mode(&sv), mode(&vol));

    // Names are checked, and not reused.
    let err = cli.create_fails(&["--name", "bad/name"]);
    assert!(
        err.contains("bad/name") && err.contains("invalid snapshot name"),
        "{err}"
    );
    let err = cli.create_fails(&["--name", ".hidden"]);
    assert!(err.contains("invalid snapshot name"), "{err}");
    let err = cli.create_fails(&["--name", "s1"]);
    assert!(
        err.contains("\"s1\"") && err.contains("already exists"),
        "{err}"
    );
    let err = cli.create_fails(&["nosuchgroup"]);
    assert!(err.contains("no group \"nosuchgroup\""), "{err}");
    assert_eq!(cli.list(), BTreeSet::from(["s1".to_string()]));

    // A snapshot another depends on: either refused, saying which, or deleted with the other
    // one left byte-identical.
    open_rw(&vol).write_all_at(b"changed", 0).unwrap();
    let r = cli.create(&["--name", "s2"]);
    assert_eq!(r.parent.as_deref(), Some("s1"));
    let s2 = hash_file(&snap_file(&m, "s2", "vol.img"));
    assert_eq!(s2, hash_file(&vol));
    let out = cli.delete("s1");
    if out.status.success() {
        assert_eq!(cli.list(), BTreeSet::from(["s2".to_string()]));
    } else {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("s2"),
            "the refusal must name the dependent: {err}"
        );
        assert_eq!(
            cli.list(),
            BTreeSet::from(["s1".to_string(), "s2".to_string()])
        );
        assert_eq!(hash_file(&snap_file(&m, "s1", "vol.img")), before);
    }
    assert_eq!(hash_file(&snap_file(&m, "s2", "vol.img")), s2);
    let out = cli.delete("nosuch");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot named \"nosuch\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cli.delete_ok("s2");
    if cli.list().contains("s1") {
        cli.delete_ok("s1");
    }
    assert_eq!(cli.list(), BTreeSet::new());
    assert!(!snap_file(&m, "s1", "").exists() && !snap_file(&m, "s2", "").exists());
    assert_eq!(
        hash_file(&vol),
        s2,
        "deleting snapshots changed the live volume"
    );
    assert!(m.unmount().success());
}

/// `snapshot verify` proves every byte: a flipped byte in a pack is reported with the volume
/// and the block, and the exit status is 1; the other snapshots still verify.
#[test]
fn verify_reports_a_damaged_block_by_volume_and_block() {
    let m = Mount::with_setup(
        |b| {
            write_random_file(&b.join("vol.img"), 3 * MIB, 90, MIB);
            write_random_file(&b.join("other.img"), MIB, 91, MIB);
        },
        Some(SMALL_GEOMETRY),
    );
    let cli = Cli::new(&m);
    cli.create(&["--name", "good", "--path", "other.img"]);
    cli.create(&["--name", "bad", "--path", "vol.img"]);
    // Reflinked blocks are only hashed after the commit: damage before that is not caught.
    common::wait_hashed(m.path());
    cli.verify_all();
    // Flip one byte of block data in the second snapshot's pack.
    let pack = m.store().join("snapshots/bad/pack-000000");
    let f = open_rw(&pack);
    let at = 4096 + 100;
    let mut x = [0u8; 1];
    f.read_exact_at(&mut x, at).unwrap();
    f.write_all_at(&[x[0] ^ 0xff], at).unwrap();
    drop(f);
    let out = cli.run(&["snapshot", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "verify must fail on damage");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["snapshot"] == "bad")
        .unwrap();
    let problem = &bad["problems"][0];
    assert_eq!(problem["volume"], "vol.img", "{bad}");
    assert!(problem["block"].is_u64(), "{bad}");
    assert!(
        problem["what"].as_str().unwrap().contains("blake3"),
        "{bad}"
    );
    let good = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["snapshot"] == "good")
        .unwrap();
    assert_eq!(good["problems"].as_array().unwrap().len(), 0);
    let text = cli.run(&["snapshot", "verify", "good"]);
    assert!(text.status.success());
    let stderr = String::from_utf8_lossy(&cli.run(&["snapshot", "verify"]).stderr).into_owned();
    assert!(stderr.contains("failed verification: bad"), "{stderr}");
}
