#!/usr/bin/env bash
# fio benchmark: the same jobs on a plain directory, on grainfs mount(s) and on bindfs, all
# backed by the same filesystem. Prints a markdown table and writes it to $OUT.
# Run as root from anywhere:  sudo benches/fio/run.sh   (see benches/README.md)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
JOBS_DIR="$HERE/jobs"

# ---- knobs (environment) ------------------------------------------------------------------
SEQ_SIZE="${SEQ_SIZE:-1g}"      # file size of the sequential jobs
RAND_SIZE="${RAND_SIZE:-256m}"  # file size of the random jobs
RAND_IO="${RAND_IO:-64m}"       # bytes moved by each random job
RUNTIME="${RUNTIME:-300}"       # wall-clock cap per job, seconds (jobs are size-based)
REPEAT="${REPEAT:-1}"           # repetitions; the table shows the median
OUT="${OUT:-/tmp/grainfs-fio-results.md}"
KEEP="${KEEP:-0}"               # 1: keep $BENCH_DIR (raw fio JSON) at exit
SKIP_BUILD="${SKIP_BUILD:-0}"   # 1: do not run cargo build (use $GRAINFS_BIN as it is)
GRAINFS_BIN="${GRAINFS_BIN:-$REPO/target/release/grainfs}"
BASELINE_BIN="${BASELINE_BIN:-}" # another grainfs binary: one more column, "grainfs (baseline)"

# grainfs variants, one column each: "label|extra mount args" (args are split on spaces).
# e.g. "grainfs (tracking off)|-c $HERE/conf/tracking-off.toml"
GRAINFS_VARIANTS=(
  "grainfs|"
  "grainfs (write-back)|-c $HERE/conf/writeback.toml"
  "grainfs (tracking off)|-c $HERE/conf/tracking-off.toml"
  "grainfs (/dev/fuse)|-c $HERE/conf/transport-dev.toml"  # the others: transport auto (io_uring where offered)
)

# Measured jobs, in table order. rand-layout runs before rand-write but is not reported.
JOBS=(seq-write seq-read rand-write rand-read)

# ---- helpers ------------------------------------------------------------------------------
log() { printf '[fio-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bytes() { numfmt --from=iec "${1^^}"; }   # fio sizes (1g, 256m) are powers of 1024

slug() { printf '%s' "$1" | tr -c 'A-Za-z0-9' '-' | sed 's/--*/-/g; s/-$//'; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

MOUNTS=()   # "mountpoint|kind" of every mount we made, unmounted by cleanup

wait_mounted() {
  local mnt="$1" i
  for i in $(seq 50); do
    mountpoint -q "$mnt" && return 0
    sleep 0.1
  done
  return 1
}

unmount() {
  local mnt="$1" kind="$2" i
  mountpoint -q "$mnt" || return 0
  if [[ "$kind" == grainfs ]]; then
    "$GRAINFS_BIN" umount "$mnt" || log "grainfs umount $mnt failed; trying fusermount3"
  fi
  mountpoint -q "$mnt" && { fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || true; }
  for i in $(seq 50); do
    mountpoint -q "$mnt" || return 0
    sleep 0.1
  done
  log "$mnt still mounted; lazy unmount"
  umount -l "$mnt" || true
}

cleanup() {
  local rc=$? mnt
  set +e
  for mnt in "${MOUNTS[@]}"; do
    mountpoint -q "${mnt%|*}" && { log "cleanup: unmounting ${mnt%|*}"; unmount "${mnt%|*}" "${mnt#*|}"; }
  done
  if [[ -n "${BENCH_DIR:-}" && -d "$BENCH_DIR" ]]; then
    for mnt in "${MOUNTS[@]}"; do
      mnt="${mnt%|*}"
      mountpoint -q "$mnt" && { log "cleanup: $mnt is still mounted; leaving $BENCH_DIR"; exit "$rc"; }
    done
    rm -rf "$BENCH_DIR"/backing-* "$BENCH_DIR"/mnt-*
    if [[ "$KEEP" == 1 ]]; then
      log "raw fio JSON kept in $BENCH_DIR/results"
    elif [[ "${OWN_BENCH_DIR:-0}" == 1 ]]; then
      rm -rf "$BENCH_DIR"
    else
      rm -rf "$BENCH_DIR/results"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- checks -------------------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "run as root (drop_caches, mounts)"
for t in fio bindfs fusermount3 python3 numfmt mountpoint findmnt; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install fio bindfs fuse3)"
done
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"
SEQ_BYTES=$(bytes "$SEQ_SIZE") || die "bad SEQ_SIZE=$SEQ_SIZE"
RAND_BYTES=$(bytes "$RAND_SIZE") || die "bad RAND_SIZE=$RAND_SIZE"
RAND_IO_BYTES=$(bytes "$RAND_IO") || die "bad RAND_IO=$RAND_IO"
export SEQ_SIZE RAND_SIZE RAND_IO RUNTIME SEQ_BYTES RAND_IO_BYTES

if [[ "$SKIP_BUILD" != 1 ]]; then
  # cargo decides whether the binary is stale; a no-op build takes well under a second.
  log "cargo build --release --bin grainfs"
  (cd "$REPO" && cargo build --release --bin grainfs) >&2 || die "cargo build failed"
fi
[[ -x "$GRAINFS_BIN" ]] || die "no grainfs binary at $GRAINFS_BIN"

if [[ -n "${BENCH_DIR:-}" ]]; then
  mkdir -p "$BENCH_DIR"; OWN_BENCH_DIR=0
else
  BENCH_DIR="$(mktemp -d /var/tmp/grainfs-fio.XXXXXX)"; OWN_BENCH_DIR=1
fi
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
RESULTS="$BENCH_DIR/results"
mkdir -p "$RESULTS"

# Every target's backing dir exists at once (each rep runs a job on all of them in turn), and
# the sequential file is removed before the random ones are laid out.
need=$(( (SEQ_BYTES > RAND_BYTES ? SEQ_BYTES : RAND_BYTES) * (${#GRAINFS_VARIANTS[@]} + 3) + 64 * 1024 * 1024 ))
avail=$(( $(df --output=avail -B1 "$BENCH_DIR" | tail -1) ))
(( avail > need )) || die "$BENCH_DIR has $avail bytes free, needs $need"

# Targets in column order: label|kind|extra args. plain first, bindfs last (report.py relies on it).
TARGETS=("plain|plain|")
for v in "${GRAINFS_VARIANTS[@]}"; do TARGETS+=("${v%%|*}|grainfs|${v#*|}"); done
if [[ -n "$BASELINE_BIN" ]]; then
  [[ -x "$BASELINE_BIN" ]] || die "no grainfs binary at BASELINE_BIN=$BASELINE_BIN"
  TARGETS+=("grainfs (baseline)|grainfs-baseline|")
fi
TARGETS+=("bindfs|bindfs|")

# ---- header -------------------------------------------------------------------------------
git_rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]] && git_rev+=" (dirty)"
HEADER="# grainfs fio benchmark

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- kernel: $(uname -srvm)
- CPUs: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))
- memory: $(free -h | awk '/^Mem:/{print $2}')
- backing filesystem: $(findmnt -n -o FSTYPE,SOURCE,OPTIONS --target "$BENCH_DIR" | awk '{print $1" on "$2" ("$3")"}') at $BENCH_DIR
- fio: $(fio --version), $(bindfs --version 2>&1 | head -1), grainfs $git_rev
- jobs: psync, numjobs=1, iodepth=1, direct=0, end_fsync=1 on writes, runtime cap ${RUNTIME}s;
  seq 1 MiB blocks on a $SEQ_SIZE file; rand 4 KiB blocks, $RAND_IO of I/O on a $RAND_SIZE file;
  page cache dropped before every job
- cells: median of $REPEAT run(s); seq in MB/s (10^6 B/s), rand in IOPS; ratios > 1 mean grainfs is faster
"

# ---- run ----------------------------------------------------------------------------------
run_job() {   # run_job JOB FILE SLUG REP
  local job="$1" file="$2" slug="$3" rep="$4" out
  mkdir -p "$RESULTS/$slug"
  out="$RESULTS/$slug/$job.$rep.fio.json"
  drop_caches
  FILE="$file" fio --output-format=json --output="$out" "$JOBS_DIR/$job.fio" >&2 \
    || die "fio $job failed on $slug (see $out)"
  if [[ "$job" != rand-layout ]]; then
    python3 - "$out" "$job" <<'EOF' >&2
import json, sys
t = open(sys.argv[1]).read(); j = json.loads(t[t.find("{"):])["jobs"][0]
d = j["write" if "write" in sys.argv[2] else "read"]
print(f"[fio-bench]   {sys.argv[2]:<10} {d['bw_bytes']/1e6:9.1f} MB/s {d['iops']:10.0f} IOPS  ({d['io_bytes']>>20} MiB in {j['elapsed']} s)")
EOF
  fi
}

# Each rep mounts every target on a fresh backing dir, then runs each job on every target in
# turn, the targets' order rotated per rep: a target's ratio to the plain dir compares runs made
# minutes apart at most, on a machine whose speed drifts (ratios are medians of per-rep ratios).
rotate() {   # rotate N ITEMS...: ITEMS starting at index N mod count
  local n="$1"; shift; local a=("$@") i
  for i in "${!a[@]}"; do printf '%s\n' "${a[$(( (i + n) % ${#a[@]} ))]}"; done
}
for rep in $(seq "$REPEAT"); do
  DIRS=()   # "slug|dir|kind|mnt" of this rep's targets, in this rep's order
  mapfile -t order < <(rotate $((rep - 1)) "${TARGETS[@]}")
  for t in "${order[@]}"; do
    label="${t%%|*}"; rest="${t#*|}"; kind="${rest%%|*}"; extra="${rest#*|}"
    s="$(slug "$label")"
    backing="$BENCH_DIR/backing-$s"; mnt="$BENCH_DIR/mnt-$s"
    rm -rf "$backing"; mkdir -p "$backing"
    case "$kind" in
      plain) dir="$backing" ;;
      grainfs|grainfs-baseline)
        bin="$GRAINFS_BIN"; [[ "$kind" == grainfs ]] || bin="$BASELINE_BIN"
        mkdir -p "$mnt"; MOUNTS+=("$mnt|grainfs"); read -ra args <<<"$extra"
        log "mount: $bin mount ${args[*]:+${args[*]} }$backing $mnt"
        "$bin" mount "${args[@]}" "$backing" "$mnt" >&2 || die "grainfs mount failed"
        wait_mounted "$mnt" || die "grainfs mount did not appear at $mnt"
        dir="$mnt" ;;
      bindfs)
        mkdir -p "$mnt"; MOUNTS+=("$mnt|bindfs"); read -ra args <<<"$extra"
        bindfs "${args[@]}" "$backing" "$mnt" || die "bindfs mount failed"
        wait_mounted "$mnt" || die "bindfs mount did not appear at $mnt"
        dir="$mnt" ;;
    esac
    DIRS+=("$s|$dir|$kind|$mnt")
  done
  log "rep $rep/$REPEAT, targets in order: ${order[*]%%|*}"
  each() {   # each JOB FILE: JOB on every target of this rep
    local d
    for d in "${DIRS[@]}"; do
      IFS='|' read -r s dir _ _ <<<"$d"
      log "  $s"
      run_job "$1" "$dir/$2" "$s" "$rep"
    done
  }
  for d in "${DIRS[@]}"; do IFS='|' read -r _ dir _ _ <<<"$d"; rm -f "$dir/seq.dat"; done
  each seq-write seq.dat
  each seq-read seq.dat
  # free the space before the random files are laid out
  for d in "${DIRS[@]}"; do IFS='|' read -r _ dir _ _ <<<"$d"; rm -f "$dir/seq.dat"; done
  each rand-layout rand.dat
  each rand-write rand.dat
  each rand-read rand.dat
  for d in "${DIRS[@]}"; do
    IFS='|' read -r s dir kind mnt <<<"$d"
    [[ "$kind" == plain ]] || unmount "$mnt" "${kind%-baseline}"
    rm -rf "$BENCH_DIR/backing-$s"
  done
done

# ---- report -------------------------------------------------------------------------------
spec=""
for t in "${TARGETS[@]}"; do spec+="${spec:+,}${t%%|*}=$(slug "${t%%|*}")"; done
jobs_csv="$(IFS=,; echo "${JOBS[*]}")"
table="$(python3 "$HERE/report.py" "$RESULTS" "$jobs_csv" "$spec")"
mkdir -p "$(dirname "$OUT")"
printf '%s\n%s\n' "$HEADER" "$table" | tee "$OUT"
log "written to $OUT"
