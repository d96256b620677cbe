#!/usr/bin/env bash
# Snapshot read throughput through `.snapshots`, two grainfs binaries A/B, interleaved, with the
# plain backing file read in the same rounds as the yardstick. Used to measure what checking
# each stored block against its blake3 costs (issue 9): A = a build without the check, B = one
# with it. Prints per round MB/s (and the daemon's CPU ms for the read, all threads) for:
#   cold        caches dropped: packs come from disk, every block is hashed
#   warm        packs in the page cache, every block proven already (nothing hashed)
#   warm-first  packs in the page cache, a fresh daemon: every block hashed once
# then the medians and the ratio B/A per case.
#
#   A=/path/grainfs-old B=target/release/grainfs ROUNDS=5 SIZE=512M benches/snapread/ab.sh
set -euo pipefail
A=${A:?set A to the baseline grainfs binary}
B=$(realpath "${B:-target/release/grainfs}")
A=$(realpath "$A")
ROUNDS=${ROUNDS:-5}
SIZE=${SIZE:-512M}
W=${WORKDIR:-/var/tmp/grainfs-snapread}
BACK=$W/backing MNT=$W/mnt
mkdir -p "$BACK" "$MNT"
if [ ! -e "$BACK/vol.img" ]; then
    head -c "$SIZE" /dev/urandom > "$BACK/vol.img"
    "$A" mount "$BACK" "$MNT"
    "$A" snapshot create --name s -m "$MNT" > /dev/null
    "$A" umount "$MNT"
fi
F=$MNT/.snapshots/s/vol.img
PID=
cpu() { cat /proc/"$PID"/task/*/schedstat | awk '{s+=$1} END {printf "%.0f", s/1e6}'; }
mbps() { dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {for(i=1;i<=NF;i++) if($i=="copied,") t=$(i+1); printf "%.0f", $1/t/1e6}'; }
rate() { local c0; c0=$(cpu); local r; r=$(mbps "$F"); echo "$r $(( $(cpu) - c0 ))"; }
up() { "$1" mount "$BACK" "$MNT"; PID=$(pgrep -n -f "^$1 mount $BACK"); }
out=$W/rounds.txt; : > "$out"
for r in $(seq "$ROUNDS"); do
    sync; echo 3 > /proc/sys/vm/drop_caches
    echo "plain cold $(mbps "$BACK/vol.img") 0" >> "$out"
    for side in A B; do
        bin=${!side}
        up "$bin"
        sync; echo 3 > /proc/sys/vm/drop_caches
        echo "$side cold $(rate)" >> "$out"
        dd if="$F" iflag=nocache count=0 status=none
        echo "$side warm $(rate)" >> "$out"
        "$bin" umount "$MNT"
        cat "$BACK"/.grainfs/snapshots/s/pack-* > /dev/null
        up "$bin"
        echo "$side warm-first $(rate)" >> "$out"
        "$bin" umount "$MNT"
    done
    tail -7 "$out"
done
python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = lambda side, case, col: statistics.median(float(r[col]) for r in rows if r[0] == side and r[1] == case)
print(f"plain backing file, cold: {med('plain','cold',2):.0f} MB/s")
print("case        A MB/s  B MB/s  B/A   A cpu ms  B cpu ms")
for case in ("cold", "warm", "warm-first"):
    a, b = med("A", case, 2), med("B", case, 2)
    print(f"{case:<11} {a:6.0f}  {b:6.0f}  {b/a:4.2f}  {med('A',case,3):8.0f}  {med('B',case,3):8.0f}")
PY
