#!/usr/bin/env bash
# FULL snapshot of a volume on XFS with reflink (partitions cloned, FICLONERANGE) against the
# copying path on ext4 (issue 13 item 4). Two loop filesystems on the same disk, one grainfs
# mount on each, a volume of SIZE random bytes in each; REPEAT rounds, interleaved (XFS then
# ext4 in each round): an unpaced 4 KiB random writer (snapbench.py writer) runs through the
# mount, and after GAP s `snapshot create --full` is taken. Per run: the wall time of the
# create call, the engine's barrier_us and capture_ms, the writer's longest write and its p99
# during the call, and its longest write in the GAP s before it (no snapshot: the floor), and
# the time until the background pass has hashed the cloned blocks (XFS). Each snapshot is
# deleted before the next round. Prints a markdown table with the medians.
# Run as root:  sudo benches/snapshot/reflink.sh        (SIZE=2G REPEAT=3 by default)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SIZE_MIB="${SIZE_MIB:-2048}"   # volume size, MiB
REPEAT="${REPEAT:-3}"
GAP="${GAP:-1}"                # seconds of writing before (and after) each snapshot
SKIP_BUILD="${SKIP_BUILD:-0}"
GRAINFS_BIN="${GRAINFS_BIN:-$REPO/target/release/grainfs}"
PY="${PYTHON:-python3}"
WORKDIR="${WORKDIR:-$(mktemp -d /var/tmp/grainfs-reflink.XXXXXX)}"

log() { printf '[reflink-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ns() { date +%s%N; }
[[ $(id -u) == 0 ]] || die "run as root (loop devices, FUSE mount)"
for c in losetup mkfs.xfs mkfs.ext4 "$PY"; do command -v "$c" >/dev/null || die "needs $c"; done
[[ "$SKIP_BUILD" == 1 ]] || (cd "$REPO" && cargo build --release --bin grainfs >&2)

FSES="xfs ext4"
declare -A DEV
WRITER_PID=""
cleanup() {
  [[ -n "$WRITER_PID" ]] && { kill -TERM "$WRITER_PID" 2>/dev/null; wait "$WRITER_PID" 2>/dev/null || true; }
  for fs in $FSES; do
    local d="$WORKDIR/$fs"
    mountpoint -q "$d/mnt" 2>/dev/null && { "$GRAINFS_BIN" umount "$d/mnt" >&2 || fusermount3 -u "$d/mnt" || true; }
    mountpoint -q "$d" 2>/dev/null && umount "$d"
    [[ -n "${DEV[$fs]:-}" ]] && losetup -d "${DEV[$fs]}"
  done
  rm -rf "$WORKDIR"
}
trap cleanup EXIT

IMG_MIB=$(( SIZE_MIB * 3 + 1024 ))
for fs in $FSES; do
  d="$WORKDIR/$fs"
  mkdir -p "$d"
  truncate -s "${IMG_MIB}M" "$WORKDIR/$fs.img"
  case $fs in
    xfs) mkfs.xfs -q -f -m reflink=1 "$WORKDIR/$fs.img" ;;
    ext4) mkfs.ext4 -q -F -b 4096 "$WORKDIR/$fs.img" ;;
  esac
  DEV[$fs]=$(losetup -f --show "$WORKDIR/$fs.img")
  mount "${DEV[$fs]}" "$d"
  mkdir -p "$d/backing" "$d/mnt"
  log "$fs: writing a ${SIZE_MIB} MiB volume of random bytes"
  dd if=/dev/urandom of="$d/backing/vol.img" bs=1M count="$SIZE_MIB" status=none conv=fsync
  RUST_LOG=info "$GRAINFS_BIN" mount "$d/backing" "$d/mnt" 2>"$d.log" >&2 || die "mount $fs"
  for _ in $(seq 100); do mountpoint -q "$d/mnt" && break; sleep 0.1; done
  mountpoint -q "$d/mnt" || die "no mount on $fs"
done

RES="$WORKDIR/results"
mkdir -p "$RES"
for r in $(seq "$REPEAT"); do
  for fs in $FSES; do
    d="$WORKDIR/$fs"
    p="$RES/$fs-$r"
    "$PY" "$HERE/snapbench.py" writer "$d/mnt/vol.img" "$p" $(( 77 + r )) 0 &
    WRITER_PID=$!
    for _ in $(seq 100); do [[ -e "$p.ready" ]] && break; sleep 0.05; done
    before=$(now_ns)
    sleep "$GAP"
    t0=$(now_ns)
    "$GRAINFS_BIN" snapshot create --full --json --name "full-$r" -m "$d/mnt" > "$p.json"
    t1=$(now_ns)
    sleep "$GAP"
    kill -TERM "$WRITER_PID"; wait "$WRITER_PID" || true; WRITER_PID=""
    hashed_s=""
    if [[ $fs == xfs ]]; then
      while "$GRAINFS_BIN" snapshot verify --json "full-$r" -m "$d/mnt" | grep -q '"unhashed_blocks": [1-9]'; do sleep 0.5; done
      hashed_s=$(( ( $(now_ns) - t1 ) / 1000000 ))
    fi
    echo "$before $t0 $t1 ${hashed_s:-0}" > "$p.times"
    "$GRAINFS_BIN" snapshot delete "full-$r" -m "$d/mnt" >/dev/null
    log "round $r $fs: create $(( (t1 - t0) / 1000000 )) ms"
  done
done

"$PY" - "$RES" "$REPEAT" "$SIZE_MIB" <<'PYEOF'
import array, json, statistics, sys
res, repeat, size = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def lat(prefix, lo, hi):
    s, l = array.array("q"), array.array("q")
    s.frombytes(open(prefix + ".start", "rb").read())
    l.frombytes(open(prefix + ".lat", "rb").read())
    # A write that started before the window but was still running inside it counts too.
    w = sorted(x for t, x in zip(s, l) if t + x >= lo and t <= hi)
    if not w:
        return 0.0, 0.0, 0
    return w[-1] / 1e6, w[min(len(w) - 1, int(len(w) * 0.99))] / 1e6, len(w)
rows = {}
print(f"| fs | run | create (ms) | barrier (us) | capture (ms) | writer max during (ms) | writer p99 during (ms) | writes during | writer max before (ms) | hashed after (s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for fs in ("xfs", "ext4"):
    for r in range(1, repeat + 1):
        p = f"{res}/{fs}-{r}"
        before, t0, t1, hashed = map(int, open(p + ".times").read().split())
        j = json.load(open(p + ".json"))
        mx, p99, n = lat(p, t0, t1)
        mx0, _, _ = lat(p, before, t0)
        row = dict(create=(t1 - t0) / 1e6, barrier=j["barrier_us"], capture=j["capture_ms"],
                   mx=mx, p99=p99, n=n, mx0=mx0, hashed=hashed / 1000)
        rows.setdefault(fs, []).append(row)
        print(f"| {fs} | {r} | {row['create']:.0f} | {row['barrier']} | {row['capture']} | {mx:.1f} | {p99:.2f} | {n} | {mx0:.1f} | {row['hashed'] if fs == 'xfs' else '-'} |")
print()
print(f"Medians of {repeat} ({size} MiB volume, `snapshot create --full`):")
print()
print("| fs | create (ms) | capture (ms) | writer max during (ms) | writer max before (ms) | hashed after (s) |")
print("|---|---|---|---|---|---|")
med = {}
for fs, rs in rows.items():
    m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    med[fs] = m
    print(f"| {fs} | {m['create']:.0f} | {m['capture']:.0f} | {m['mx']:.1f} | {m['mx0']:.1f} | {m['hashed'] if fs == 'xfs' else '-'} |")
if med["ext4"]["create"] > 0:
    print()
    print(f"XFS reflink / ext4 copy, create time: {med['xfs']['create'] / med['ext4']['create']:.3f}")
PYEOF
