#!/usr/bin/env python3
"""Helpers of benches/snapshot/run.sh (standard library only).

usage:
  snapbench.py change FILE PERCENT SEED [BLOCK]
      Overwrite PERCENT % of the BLOCK-sized blocks of FILE (default 64 KiB), chosen at random
      without repetition (seeded), with random data, one aligned os.pwrite per block, then
      fsync. Prints JSON: blocks, changed_bytes, total_blocks, seconds.
  snapbench.py writer FILE OUT_PREFIX SEED [IOPS]
      Write 4 KiB of random data at random 4 KiB-aligned offsets of FILE (O_RDWR, os.pwrite,
      no fsync) until SIGTERM or SIGINT, as fast as it can (IOPS 0) or paced to IOPS. Records
      for every write its start (CLOCK_REALTIME ns) and its latency (ns) in OUT_PREFIX.start
      and OUT_PREFIX.lat (native int64 arrays), written at exit.
  snapbench.py depths MANIFEST
      Prints JSON: min and max chain depth over the partitions of the manifest's volumes, and
      the count of each partition kind.
"""
import array
import json
import os
import random
import signal
import sys
import time


def change(path, percent, seed, block=65536):
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        total = size // block
        k = round(total * percent / 100.0)
        rng = random.Random(seed)
        blocks = rng.sample(range(total), k)  # distinct blocks, random order
        t0 = time.monotonic()
        for b in blocks:
            data = os.urandom(block)
            n = os.pwrite(fd, data, b * block)
            if n != block:
                raise SystemExit(f"short write at block {b}: {n}")
        os.fsync(fd)
        dt = time.monotonic() - t0
    finally:
        os.close(fd)
    print(json.dumps({
        "percent": percent,
        "block_size": block,
        "total_blocks": total,
        "blocks": k,
        "changed_bytes": k * block,
        "seconds": round(dt, 3),
    }))


def writer(path, prefix, seed, iops=0.0):
    stop = False

    def on_signal(_sig, _frm):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fd = os.open(path, os.O_RDWR)
    nblk = os.fstat(fd).st_size // 4096
    rng = random.Random(seed)
    bufs = [os.urandom(4096) for _ in range(16)]
    starts = array.array("q")
    lats = array.array("q")
    period = 1e9 / iops if iops > 0 else 0.0
    now_real, now_perf = time.time_ns, time.perf_counter_ns
    pwrite, randrange = os.pwrite, rng.randrange
    i = 0
    next_at = now_perf()
    # Ready: the driver waits for this file before it starts measuring.
    with open(prefix + ".ready", "w") as f:
        f.write(str(os.getpid()))
    while not stop:
        if period:
            wait = next_at - now_perf()
            if wait > 0:
                time.sleep(wait / 1e9)
            next_at += period
        off = randrange(nblk) * 4096
        t = now_real()
        p0 = now_perf()
        pwrite(fd, bufs[i & 15], off)
        lats.append(now_perf() - p0)
        starts.append(t)
        i += 1
    os.close(fd)
    with open(prefix + ".start", "wb") as f:
        starts.tofile(f)
    with open(prefix + ".lat", "wb") as f:
        lats.tofile(f)


def depths(manifest):
    with open(manifest) as f:
        m = json.load(f)
    ds, kinds = [], {}
    for v in m["volumes"]:
        for p in v["partitions"]:
            ds.append(p["depth"])
            kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    print(json.dumps({"min_depth": min(ds), "max_depth": max(ds), "kinds": kinds}))


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "change" and len(args) in (3, 4):
        change(args[0], float(args[1]), int(args[2]), int(args[3]) if len(args) == 4 else 65536)
    elif cmd == "writer" and len(args) in (3, 4):
        writer(args[0], args[1], int(args[2]), float(args[3]) if len(args) == 4 else 0.0)
    elif cmd == "depths" and len(args) == 1:
        depths(args[0])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
