#!/usr/bin/env bash
# Metadata benchmark: small-file operations, untar and git status of a source tree, and
# stress-ng's metadata stressors, on a plain directory, grainfs mount(s) and bindfs, all on the
# same backing filesystem. Rounds are interleaved (round 1 on every target, then round 2...),
# the page cache is dropped before every job, each cell is the median of $REPEAT rounds.
# Run as root:  sudo benches/metadata/run.sh   (see benches/README.md)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

# ---- knobs (environment) ------------------------------------------------------------------
FILES="${FILES:-2000}"          # files of the small-file jobs
REPEAT="${REPEAT:-3}"           # rounds; cells are medians
TREE="${TREE:-}"                # source tree to tar (default: crate sources, see below)
TREE_FILES="${TREE_FILES:-3000}" # with the default tree: crates taken until this many files
DIR_OPS="${DIR_OPS:-500}"       # stress-ng --dir-ops
FILENAME_OPS="${FILENAME_OPS:-500}"
LINK_OPS="${LINK_OPS:-3}"
XATTR_OPS="${XATTR_OPS:-200}"
JOBS="${JOBS:-create stat readdir xattr rename unlink untar git-status git-status-warm stress-dir stress-filename stress-link stress-xattr}"
OUT="${OUT:-/tmp/grainfs-metadata-results.md}"
SKIP_BUILD="${SKIP_BUILD:-0}"
GRAINFS_BIN="${GRAINFS_BIN:-$REPO/target/release/grainfs}"
# A second grainfs binary measured in the same rounds (before/after), column "grainfs-base".
GRAINFS_BASE_BIN="${GRAINFS_BASE_BIN:-}"
# Extra grainfs columns: "label|extra mount args" (args split on spaces), separated by ';'.
IFS=';' read -ra EXTRA_VARIANTS <<<"${GRAINFS_VARIANTS:-}"

log() { printf '[meta-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
slug() { printf '%s' "$1" | tr -c 'A-Za-z0-9' '-' | sed 's/--*/-/g; s/-$//'; }

MOUNTS=()
wait_mounted() { local i; for i in $(seq 50); do mountpoint -q "$1" && return 0; sleep 0.1; done; return 1; }
unmount() {
  local mnt="$1" bin="$2" i
  mountpoint -q "$mnt" || return 0
  [[ -n "$bin" ]] && { "$bin" umount "$mnt" || log "grainfs umount $mnt failed"; }
  mountpoint -q "$mnt" && { fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || true; }
  for i in $(seq 50); do mountpoint -q "$mnt" || return 0; sleep 0.1; done
  umount -l "$mnt" || true
}
cleanup() {
  local rc=$? m
  set +e
  for m in "${MOUNTS[@]}"; do mountpoint -q "${m%%|*}" && unmount "${m%%|*}" "${m#*|}"; done
  if [[ -n "${BENCH_DIR:-}" && -d "$BENCH_DIR" ]]; then
    for m in "${MOUNTS[@]}"; do mountpoint -q "${m%%|*}" && { log "leaving $BENCH_DIR"; exit "$rc"; }; done
    rm -rf "$BENCH_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $EUID -eq 0 ]] || die "run as root (drop_caches, mounts)"
for t in stress-ng bindfs fusermount3 python3 git tar mountpoint findmnt; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install stress-ng bindfs fuse3 git)"
done
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"
if [[ "$SKIP_BUILD" != 1 ]]; then
  (cd "$REPO" && cargo build --release --bin grainfs) >&2 || die "cargo build failed"
fi
[[ -x "$GRAINFS_BIN" ]] || die "no grainfs binary at $GRAINFS_BIN"

BENCH_DIR="$(mktemp -d /var/tmp/grainfs-meta.XXXXXX)"
RESULTS="$BENCH_DIR/results"; mkdir -p "$RESULTS"

# ---- the source tree: a tarball and a git repository of it (made once, on the plain fs) ----
if [[ -z "$TREE" ]]; then
  reg="$(ls -d "$HOME"/.cargo/registry/src/*/ 2>/dev/null | head -1 || true)"
  [[ -n "$reg" ]] || die "no TREE given and no ~/.cargo/registry/src: set TREE=/some/source/tree"
  # Crate sources in name order until TREE_FILES files (Windows import libraries left out).
  crates=(); n=0
  while read -r c; do
    crates+=("$c"); n=$(( n + $(find "$reg/$c" -type f | wc -l) ))
    (( n >= TREE_FILES )) && break
  done < <(ls "$reg" | grep -v -e 'winapi-.*-gnu' -e '^windows' | sort)
  tar cf "$BENCH_DIR/tree.tar" -C "$reg" "${crates[@]}"
  TREE_DESC="${#crates[@]} crate sources from $reg (${crates[0]} .. ${crates[-1]})"
else
  tar cf "$BENCH_DIR/tree.tar" -C "$(dirname "$TREE")" "$(basename "$TREE")"
  TREE_DESC="$TREE"
fi
TREE_ENTRIES=$(tar tf "$BENCH_DIR/tree.tar" | wc -l)
TREE_REGS=$(tar tvf "$BENCH_DIR/tree.tar" | grep -c '^-' || true)
TREE_MB=$(( $(stat -c %s "$BENCH_DIR/tree.tar") / 1000000 ))
mkdir -p "$BENCH_DIR/gitsrc"
tar xf "$BENCH_DIR/tree.tar" -C "$BENCH_DIR/gitsrc"
( cd "$BENCH_DIR/gitsrc" && git init -q && git add -A && \
  git -c user.name=bench -c user.email=bench@localhost commit -qm tree && git gc -q ) \
  || die "git repository of the tree"

# ---- targets ------------------------------------------------------------------------------
TARGETS=("plain|plain||")
[[ -n "$GRAINFS_BASE_BIN" ]] && TARGETS+=("grainfs-base|grainfs|$GRAINFS_BASE_BIN|")
TARGETS+=("grainfs|grainfs|$GRAINFS_BIN|")
for v in "${EXTRA_VARIANTS[@]}"; do TARGETS+=("${v%%|*}|grainfs|$GRAINFS_BIN|${v#*|}"); done
TARGETS+=("bindfs|bindfs||")

git_rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$REPO" status --porcelain -- src 2>/dev/null)" ]] && git_rev+=" (dirty)"
HEADER="# grainfs metadata benchmark

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), kernel $(uname -sr), $(nproc) CPUs, load before: $(cut -d' ' -f1-3 /proc/loadavg)
- backing filesystem: $(findmnt -n -o FSTYPE,SOURCE --target "$BENCH_DIR" | awk '{print $1" on "$2}') at $BENCH_DIR
- $(stress-ng --version | head -1), $(bindfs --version 2>&1 | head -1), grainfs $git_rev${GRAINFS_BASE_BIN:+, base: $GRAINFS_BASE_BIN}
- small-file jobs: $FILES files in one directory; tree: $TREE_DESC: $TREE_ENTRIES entries ($TREE_REGS files), $TREE_MB MB
- stress-ng ops: dir $DIR_OPS, filename $FILENAME_OPS, link $LINK_OPS, xattr $XATTR_OPS (one instance each)
- cells: ops/s, median of $REPEAT round(s); in a round each job runs on every target back to back; page cache
  dropped before every job; ratio = median over rounds of target/plain in the same round
"

# ---- jobs ---------------------------------------------------------------------------------
# Each job writes "ops seconds" to its result file.
stress() {   # stress NAME OPS DIR OUTFILE
  local y="$BENCH_DIR/sn.yaml" d="$3/stress-$1"
  mkdir -p "$d"
  stress-ng --"$1" 1 --"$1"-ops "$2" --temp-path "$d" --metrics-brief --yaml "$y" >/dev/null 2>&1 \
    || die "stress-ng --$1 failed in $d"
  python3 - "$y" "$1" >"$4" <<'EOF'
import sys
ops = secs = None
for line in open(sys.argv[1]):
    k, _, v = line.strip().partition(": ")
    if k == "bogo-ops": ops = float(v)
    if k == "wall-clock-time": secs = float(v)
print(ops, secs)
EOF
  rm -rf "$d"
}

timed() {    # timed OPS OUTFILE CMD...: wall time of CMD
  local ops="$1" out="$2" t0 t1; shift 2
  t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N)
  python3 -c "print($ops, $t1 - $t0)" >"$out"
}

run_job() {  # run_job JOB DIR OUTFILE
  local job="$1" dir="$2" out="$3"
  drop_caches
  case "$job" in
    create|stat|readdir|xattr|rename|unlink) python3 "$HERE/metabench.py" "$job" "$dir" "$FILES" >"$out" ;;
    untar) timed "$TREE_ENTRIES" "$out" tar xf "$BENCH_DIR/tree.tar" -C "$dir/tree" ;;
    git-status|git-status-warm)
      [[ "$job" == git-status-warm ]] && git -C "$dir/tree" status --porcelain >/dev/null
      timed "$TREE_REGS" "$out" git -C "$dir/tree" status --porcelain >"$BENCH_DIR/git.out"
      [[ ! -s "$BENCH_DIR/git.out" ]] || die "git status in $dir/tree is not clean: $(head -3 "$BENCH_DIR/git.out")" ;;
    stress-dir) stress dir "$DIR_OPS" "$dir" "$out" ;;
    stress-filename) stress filename "$FILENAME_OPS" "$dir" "$out" ;;
    stress-link) stress link "$LINK_OPS" "$dir" "$out" ;;
    stress-xattr) stress xattr "$XATTR_OPS" "$dir" "$out" ;;
    *) die "unknown job $job" ;;
  esac
  awk '{printf "%10.1f ops/s (%s ops in %.2f s)\n", $1/$2, $1, $2}' "$out" >&2
}

for rep in $(seq "$REPEAT"); do
  # Every target gets a fresh backing dir and mount for the round; then each job runs on every
  # target back to back, so a job's numbers on the targets are seconds apart, not minutes.
  DIRS=()
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r label kind bin extra <<<"$t"
    s="$(slug "$label")"; backing="$BENCH_DIR/backing-$s"; mnt="$BENCH_DIR/mnt-$s"
    rm -rf "$backing"; mkdir -p "$backing" "$RESULTS/$s"
    case "$kind" in
      plain) dir="$backing" ;;
      grainfs)
        mkdir -p "$mnt"; MOUNTS+=("$mnt|$bin"); read -ra args <<<"$extra"
        "$bin" mount "${args[@]}" "$backing" "$mnt" >&2 || die "grainfs mount failed"
        wait_mounted "$mnt" || die "no grainfs mount at $mnt"; dir="$mnt" ;;
      bindfs)
        mkdir -p "$mnt"; MOUNTS+=("$mnt|")
        bindfs "$backing" "$mnt" || die "bindfs mount failed"
        wait_mounted "$mnt" || die "no bindfs mount at $mnt"; dir="$mnt" ;;
    esac
    mkdir -p "$dir/tree"
    DIRS+=("$dir")
  done
  for job in $JOBS; do
    log "round $rep/$REPEAT: $job"
    for i in "${!TARGETS[@]}"; do
      label="${TARGETS[$i]%%|*}"; dir="${DIRS[$i]}"
      if [[ "$job" == git-status && ! -d "$dir/tree/.git" ]]; then
        # The repository of the tree (untimed): its .git copied in, the index refreshed by a
        # first status (it holds the stat data of the copy git made it from).
        [[ -n "$(ls -A "$dir/tree")" ]] || tar xf "$BENCH_DIR/tree.tar" -C "$dir/tree"
        cp -a "$BENCH_DIR/gitsrc/.git" "$dir/tree/.git"
        git -C "$dir/tree" status --porcelain >/dev/null
      fi
      printf '[meta-bench]   %-14s' "$label" >&2
      run_job "$job" "$dir" "$RESULTS/$(slug "$label")/$job.$rep"
    done
  done
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r label kind bin extra <<<"$t"
    s="$(slug "$label")"
    [[ "$kind" == plain ]] || unmount "$BENCH_DIR/mnt-$s" "$bin"
    rm -rf "$BENCH_DIR/backing-$s"
  done
done

# ---- report -------------------------------------------------------------------------------
spec=""; for t in "${TARGETS[@]}"; do spec+="${spec:+,}${t%%|*}=$(slug "${t%%|*}")"; done
table="$(python3 "$HERE/report.py" "$RESULTS" "$spec" $JOBS)"
printf '%s\n%s\n' "$HEADER" "$table" | tee "$OUT"
[[ -z "${KEEP_RESULTS:-}" ]] || { mkdir -p "$KEEP_RESULTS"; cp -r "$RESULTS/." "$KEEP_RESULTS/"; }
log "written to $OUT"
