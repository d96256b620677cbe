#!/usr/bin/env python3
"""Turn the raw results of benches/snapshot/run.sh into markdown tables and a JSON file.

usage: report.py RESULTS_DIR JSON_OUT --fractions "1 10 50" --chain-depth 8 --size BYTES
                 --pause-incs N --pause-fulls N --read-repeat N --writers "0 1000"

RESULTS_DIR holds, per step (see run.sh): STEP.time ("start_ns end_ns", wall clock around the
command), STEP.json (`grainfs snapshot create --json`), STEP.txt (`rsync --stats`),
STEP.jsonl and STEP.repo (`restic backup --json`, repo bytes before and after), change-*.json
(what snapbench.py changed), read-*.read ("start end bytes"), writer.start / writer.lat (the
4 KiB writer's per-write start and latency, int64 ns; writer-<pace>.*, plainwriter.* on a
plain file). Prints the tables on stdout and writes
every number to JSON_OUT.
"""
import argparse
import array
import bisect
import json
import os
import re
import statistics

MiB = 1 << 20


def rd(results, name):
    with open(os.path.join(results, name)) as f:
        return f.read()


def exists(results, name):
    return os.path.exists(os.path.join(results, name))


def seconds(results, step):
    t0, t1 = rd(results, f"{step}.time").split()[:2]
    return (int(t1) - int(t0)) / 1e9


def window(results, step):
    t0, t1 = rd(results, f"{step}.time").split()[:2]
    return int(t0), int(t1)


def kinds_of(report):
    k = {}
    for v in report["volumes"]:
        for p in v["partitions"]:
            k[p["kind"]] = k.get(p["kind"], 0) + 1
    return k


def full_reasons(report):
    """Why partitions went FULL, by the policy rule named in the reason."""
    rules = [("no parent", "no parent"), ("max_chain", "max_chain"),
             ("full_rate", "change rate"), ("full_dirty_fraction", "dirty fraction")]
    out = {}
    for v in report["volumes"]:
        for p in v["partitions"]:
            if p["kind"] != "FULL":
                continue
            why = next((name for key, name in rules if key in p["reason"]), "other")
            out[why] = out.get(why, 0) + 1
    return out


def kinds_str(k, why=None):
    order = ["FULL", "INCREMENTAL"]
    parts = []
    for x in order:
        if x not in k:
            continue
        s = f"{k[x]} {x}"
        if x == "FULL" and why and set(why) != {"no parent"}:
            s += " (" + ", ".join(f"{w}: {n}" if len(why) > 1 else w for w, n in why.items()) + ")"
        parts.append(s)
    return " + ".join(parts) or "-"


def grainfs(results, step):
    r = json.loads(rd(results, f"{step}.json"))
    rescan = sum(p["rescan"] for v in r["volumes"] for p in v["partitions"])
    return {
        "tool": "grainfs",
        "seconds": seconds(results, step),
        "stored_bytes": r["stored_bytes"],
        "barrier_us": r["barrier_us"],
        "capture_ms": r["capture_ms"],
        "partitions": kinds_of(r),
        "full_reasons": full_reasons(r),
        "rescanned_partitions": rescan,
        "blocks_by_writers": r["blocks_by_writers"],
        "blocks_by_workers": r["blocks_by_workers"],
        "blocks_unchanged": r["blocks_unchanged"],
        "parent": r["parent"],
    }


def num(text, label):
    m = re.search(re.escape(label) + r":\s*([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else None


def rsync(results, step):
    t = rd(results, f"{step}.txt")
    return {
        "tool": "rsync",
        "seconds": seconds(results, step),
        # What rsync writes into the copy (--inplace leaves matched data where it is).
        "stored_bytes": num(t, "Literal data"),
        "matched_bytes": num(t, "Matched data"),
        "bytes_sent": num(t, "Total bytes sent"),
    }


def restic(results, step):
    summary = None
    for line in rd(results, f"{step}.jsonl").splitlines():
        line = line.strip()
        if line.startswith("{") and '"summary"' in line:
            summary = json.loads(line)
    b0, b1 = map(int, rd(results, f"{step}.repo").split())
    return {
        "tool": "restic",
        "seconds": seconds(results, step),
        # Growth of the repository on disk (packs, index, snapshot): what the backup stored.
        "stored_bytes": b1 - b0,
        "data_added": summary.get("data_added") if summary else None,
        "restic_duration": summary.get("total_duration") if summary else None,
    }


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def lat_stats(sel):
    """sel: sorted latencies (ns)."""
    return {
        "writes": len(sel),
        "max_ms": sel[-1] / 1e6 if sel else None,
        "p99_ms": pct(sel, 0.99) / 1e6 if sel else None,
        "p999_ms": pct(sel, 0.999) / 1e6 if sel else None,
        "median_ms": pct(sel, 0.5) / 1e6 if sel else None,
        "over_10ms": sum(1 for x in sel if x > 10_000_000),
    }


def writer_stats(results, prefix, windows):
    """windows: list of (label, t0, t1). Per window: the writes overlapping it; "outside": the
    writes overlapping none."""
    if not exists(results, f"{prefix}.start"):
        return None
    starts, lats = array.array("q"), array.array("q")
    with open(os.path.join(results, f"{prefix}.start"), "rb") as f:
        starts.frombytes(f.read())
    with open(os.path.join(results, f"{prefix}.lat"), "rb") as f:
        lats.frombytes(f.read())
    n = min(len(starts), len(lats))
    inside = [False] * n
    maxlat = max(lats[:n]) if n else 0
    out = {}
    for label, t0, t1 in windows:
        # Writes that overlap [t0, t1]: start < t1 and start + lat > t0 (lat <= maxlat).
        lo = bisect.bisect_left(starts, t0 - maxlat, 0, n)
        hi = bisect.bisect_left(starts, t1, 0, n)
        sel = []
        for i in range(lo, hi):
            if starts[i] + lats[i] > t0:
                sel.append(lats[i])
                inside[i] = True
        sel.sort()
        out[label] = lat_stats(sel)
    rest = sorted(lats[i] for i in range(n) if not inside[i])
    span = (starts[n - 1] - starts[0]) / 1e9 if n > 1 else 0
    out["outside"] = lat_stats(rest)
    out["all"] = {"writes": n, "seconds": span, "iops": n / span if span else None}
    return out


def f1(v, nd=1):
    return "n/a" if v is None else f"{v:,.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("json_out")
    ap.add_argument("--fractions", required=True)
    ap.add_argument("--chain-depth", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--pause-fulls", type=int, required=True)
    ap.add_argument("--pause-incs", type=int, required=True)
    ap.add_argument("--read-repeat", type=int, required=True)
    ap.add_argument("--writers", default="0")
    a = ap.parse_args()
    R = a.results
    fracs = a.fractions.split()
    data = {"volume_bytes": a.size, "first_copy": {}, "fractions": {}}

    # ---- copies ----
    data["first_copy"] = {
        "grainfs_full": grainfs(R, "base"),
        "rsync": rsync(R, "rsync-base"),
        "restic": restic(R, "restic-base"),
    }
    for f in fracs:
        fs = f.replace(".", "_")
        ch = json.loads(rd(R, f"change-{fs}.json"))
        data["fractions"][f] = {
            "change": ch,
            "grainfs_incremental": grainfs(R, f"inc-{fs}"),
            "grainfs_full": grainfs(R, f"full-{fs}"),
            "rsync": rsync(R, f"rsync-{fs}"),
            "restic": restic(R, f"restic-{fs}"),
            "grainfs_rebase": grainfs(R, f"rebase-{fs}"),
        }

    lines = []
    P = lines.append
    P("## Incremental and full snapshots against rsync and restic")
    P("")
    P("| changed | method | partitions | time (s) | stored (MiB) | stored / changed | time / grainfs incremental |")
    P("|---|---|---|---|---|---|---|")
    fc = data["first_copy"]
    P(f"| first copy ({a.size / MiB:,.0f} MiB) | grainfs snapshot (FULL) | {kinds_str(fc['grainfs_full']['partitions'])} "
      f"| {fc['grainfs_full']['seconds']:.2f} | {fc['grainfs_full']['stored_bytes'] / MiB:,.1f} | | |")
    P(f"| | rsync (new copy) | | {fc['rsync']['seconds']:.2f} | {fc['rsync']['stored_bytes'] / MiB:,.1f} | | |")
    P(f"| | restic backup (first) | | {fc['restic']['seconds']:.2f} | {fc['restic']['stored_bytes'] / MiB:,.1f} | | |")
    for f in fracs:
        d = data["fractions"][f]
        ch = d["change"]
        changed = ch["changed_bytes"]
        inc_t = d["grainfs_incremental"]["seconds"]
        label = f"{f} % ({ch['blocks']:,} blocks, {changed / MiB:,.1f} MiB)"
        for key, name in [
            ("grainfs_incremental", "grainfs snapshot (incremental by policy)"),
            ("grainfs_full", "grainfs snapshot (FULL, no parent)"),
            ("rsync", "rsync --inplace --no-whole-file"),
            ("restic", "restic backup"),
        ]:
            m = d[key]
            part = kinds_str(m["partitions"], m["full_reasons"]) if "partitions" in m else ""
            ratio = m["stored_bytes"] / changed if changed else None
            speed = m["seconds"] / inc_t if inc_t else None
            P(f"| {label} | {name} | {part} | {m['seconds']:.2f} | {m['stored_bytes'] / MiB:,.1f} "
              f"| {f1(ratio, 2)} | {'1' if key == 'grainfs_incremental' else f1(speed, 1) + 'x'} |")
            label = ""
    P("")
    P("stored: grainfs `stored_bytes` of `snapshot create --json`; rsync `Literal data` of "
      "`--stats` (what it writes into the copy); restic growth of the repository on disk. "
      "time: wall clock of the command, page cache dropped before it.")
    rb = [(f, data["fractions"][f]["grainfs_rebase"]) for f in fracs]
    P("After each FULL (a separate group), the `vol` chain is re-based by an untimed snapshot "
      "that rescans the volume against its parent (the FULL took the dirty bits): "
      + ", ".join(f"{f} %: {r['seconds']:.1f} s, {r['stored_bytes'] / MiB:.1f} MiB stored, "
                  f"{r['rescanned_partitions']} partitions rescanned" for f, r in rb) + ".")

    # ---- read at depth ----
    P("")
    P(f"## Reading a snapshot at chain depth {a.chain_depth} against the live file")
    P("")
    depths = json.loads(rd(R, "chain.depths.json")) if exists(R, "chain.depths.json") else None
    data["chain"] = {"depths": depths, "reads": {}}
    chain_steps = [s for s in (f"chain-{i}" for i in range(1, a.chain_depth + 1)) if exists(R, f"{s}.json")]
    data["chain"]["snapshots"] = {s: grainfs(R, s) for s in chain_steps}
    cmp = rd(R, "read.cmp").strip() if exists(R, "read.cmp") else "missing"
    data["chain"]["deep_equals_live"] = cmp
    reads = {}
    for kind in ("live", "deep", "depth1"):
        mbs = []
        for r in range(1, a.read_repeat + 1):
            if exists(R, f"read-{kind}-{r}.read"):
                t0, t1, n = map(int, rd(R, f"read-{kind}-{r}.read").split())
                mbs.append(n / ((t1 - t0) / 1e9) / 1e6)
        reads[kind] = {"mb_s": mbs, "median": statistics.median(mbs) if mbs else None}
    data["chain"]["reads"] = reads
    live = reads["live"]["median"]
    dstr = (f"depth {depths['min_depth']}" + (f" to {depths['max_depth']}" if depths["max_depth"] != depths["min_depth"] else "")
            if depths else "n/a")
    P(f"| file | chain depth | MB/s (median of {a.read_repeat}, each cold) | / live |")
    P("|---|---|---|---|")
    P(f"| live `vol.img` through the mount | - | {f1(live)} | 1.00 |")
    for kind, name, dep in [("deep", f"`.snapshots/chain-{a.chain_depth}/vol.img`", dstr),
                            ("depth1", "`.snapshots/chain-1/vol.img` (FULL)", "1")]:
        v = reads[kind]["median"]
        P(f"| {name} | {dep} | {f1(v)} | {f1(v / live, 2) if v and live else 'n/a'} |")
    P("")
    if cmp == "missing":
        P("The `.snapshots` view was not readable in this build: reads not measured.")
    else:
        P(f"Each read: `dd bs=1M` of the whole file after `drop_caches`; per run (MB/s): "
          + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in reads[k]["mb_s"]) for k in reads)
          + f". Depth-{a.chain_depth} snapshot byte-identical to the live file: "
          + ("yes" if cmp == "same" else "NO") + ".")

    # ---- writer pause ----
    writers = a.writers.split()
    plain = writer_stats(R, "plainwriter", [])
    data["plain_writer"] = plain
    data["writers"] = {}
    P("")
    P("## Longest pause of a concurrent 4 KiB writer during a snapshot")
    P("")
    P("Writer: 4 KiB `os.pwrite` of random data at random 4 KiB-aligned offsets of the mounted "
      "volume, no fsync, from one thread, unpaced (back to back) or paced. A write counts for a "
      "snapshot when it overlaps the wall-clock window of `grainfs snapshot create`; "
      "\"no snapshot running\" is every other write of the same writer.")
    P("")
    P("| writer | snapshot | partitions | create (ms) | barrier (us) | blocks saved by the writer | writes during it | longest write (ms) | p99 (ms) | p99.9 (ms) | writes > 10 ms |")
    P("|---|---|---|---|---|---|---|---|---|---|---|")
    for w in writers:
        windows = [(f"w{w}-pause-inc-{i}", "incremental") for i in range(1, a.pause_incs + 1)]
        windows += [(f"w{w}-pause-full-{r}", "FULL") for r in range(1, a.pause_fulls + 1)]
        windows = [(s, k) for s, k in windows if exists(R, f"{s}.time")]
        dels = [f"w{w}-pause-delete-{r}" for r in range(2, a.pause_fulls + 1) if exists(R, f"w{w}-pause-delete-{r}.time")]
        ws = writer_stats(R, f"writer-{w}", [(s, *window(R, s)) for s, _ in windows] + [(s, *window(R, s)) for s in dels])
        if ws is None:
            continue
        rate = "unpaced" if w == "0" else f"paced {int(w):,}/s"
        wl = f"{rate}: {f1(ws['all']['iops'], 0)} writes/s"
        snaps = {}
        for s, asked in windows:
            g = grainfs(R, s)
            snaps[s] = dict(g, asked=asked, writes=ws[s])
            x = ws[s]
            P(f"| {wl} | {s.split('-', 1)[1]} ({asked}) | {kinds_str(g['partitions'], g['full_reasons'])} | {g['seconds'] * 1000:,.0f} "
              f"| {g['barrier_us']:,} | {g['blocks_by_writers']:,} | {x['writes']:,} | {f1(x['max_ms'], 2)} "
              f"| {f1(x['p99_ms'], 2)} | {f1(x['p999_ms'], 2)} | {x['over_10ms']} |")
            wl = ""
        for s in dels:
            x = ws[s]
            P(f"| | (`snapshot delete` of the FULL before) | | | | | {x['writes']:,} | {f1(x['max_ms'], 2)} "
              f"| {f1(x['p99_ms'], 2)} | {f1(x['p999_ms'], 2)} | {x['over_10ms']} |")
        o = ws["outside"]
        P(f"| | (no snapshot running) | | | | | {o['writes']:,} | {f1(o['max_ms'], 2)} "
          f"| {f1(o['p99_ms'], 2)} | {f1(o['p999_ms'], 2)} | {o['over_10ms']} |")
        data["writers"][w] = {"stats": ws, "snapshots": snaps}
    if plain is not None:
        o = plain["outside"]
        P(f"| plain file, no FUSE, unpaced: {f1(plain['all']['iops'], 0)} writes/s | (no snapshot) | | | | "
          f"| {o['writes']:,} | {f1(o['max_ms'], 2)} | {f1(o['p99_ms'], 2)} | {f1(o['p999_ms'], 2)} | {o['over_10ms']} |")

    # ---- targets ----
    P("")
    P("## Targets (issue 4)")
    P("")
    P("| target | measured | met? |")
    P("|---|---|---|")
    tg = {}
    if "1" in data["fractions"]:
        d = data["fractions"]["1"]
        inc = d["grainfs_incremental"]
        rs, rc = d["rsync"]["seconds"] / inc["seconds"], d["restic"]["seconds"] / inc["seconds"]
        st = inc["stored_bytes"] / d["change"]["changed_bytes"]
        tg["speedup_vs_rsync"] = rs
        tg["speedup_vs_restic"] = rc
        tg["stored_over_changed"] = st
        P(f"| 1 %: incremental >= 20x faster than rsync | {rs:.1f}x ({inc['seconds']:.2f} s vs {d['rsync']['seconds']:.2f} s) | {'yes' if rs >= 20 else 'no'} |")
        P(f"| 1 %: incremental >= 20x faster than restic | {rc:.1f}x ({inc['seconds']:.2f} s vs {d['restic']['seconds']:.2f} s) | {'yes' if rc >= 20 else 'no'} |")
        P(f"| 1 %: incremental stores <= 1.1x the changed bytes | {st:.3f}x | {'yes' if st <= 1.1 else 'no'} |")
    for w, wd in data["writers"].items():
        rate = "unpaced writer" if w == "0" else f"writer paced at {int(w):,}/s"
        for asked in ("incremental", "FULL"):
            ms = [x["writes"]["max_ms"] for x in wd["snapshots"].values()
                  if x["asked"] == asked and x["writes"]["max_ms"] is not None]
            if ms:
                tg[f"writer_{w}_max_pause_ms_{asked.lower()}"] = max(ms)
                base = wd["stats"]["outside"]["max_ms"]
                P(f"| writer's longest pause < 10 ms ({rate}, {asked} snapshots) | {max(ms):.2f} ms (worst of {len(ms)}; "
                  f"no snapshot running: {f1(base, 2)} ms) | {'yes' if max(ms) < 10 else 'no'} |")
    deep = reads["deep"]["median"]
    if deep and live:
        tg["deep_read_over_live"] = deep / live
        P(f"| depth-{a.chain_depth} read >= 50 % of the live read | {deep / live * 100:.0f} % ({deep:.0f} vs {live:.0f} MB/s) | {'yes' if deep / live >= 0.5 else 'no'} |")
    else:
        P(f"| depth-{a.chain_depth} read >= 50 % of the live read | not measured | n/a |")
    data["targets"] = tg

    with open(a.json_out, "w") as f:
        json.dump(data, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
