#!/usr/bin/env python3
"""Turn the fio JSON files written by run.sh into a markdown table.

usage: report.py RESULTS_DIR JOBS TARGETS
  RESULTS_DIR  holds <slug>/<job>.<rep>.fio.json
  JOBS         comma-separated job names in table order (seq-write,seq-read,...)
  TARGETS      comma-separated label=slug pairs in column order; the first is the
               plain directory, the last is bindfs, the ones between are grainfs variants.

Each value cell is the median over the repetitions; each ratio the median over the
repetitions of the two targets' ratio within that repetition (run.sh runs a job on every
target in turn, so those are minutes apart at most). seq-* jobs are reported in MB/s
(10^6 bytes per second), rand-* jobs in IOPS. Prints the table on stdout, then issue 13's
targets table (ratios to the plain dir, write-through and write-back).
"""
import glob
import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        text = f.read()
    # fio may put notes before the JSON object; skip to the first brace.
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"{path}: no JSON in fio output")
    data = json.loads(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    return job


def metric(job_name, job):
    direction = "write" if "write" in job_name else "read"
    stats = job[direction]
    if job_name.startswith("seq"):
        return stats["bw_bytes"] / 1e6, stats["io_bytes"]
    return stats["iops"], stats["io_bytes"]


def fmt(v, unit):
    if v is None:
        return "n/a"
    return f"{v:,.1f}" if unit == "MB/s" else f"{v:,.0f}"


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}"


def main():
    results, jobs, targets = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    targets = [t.split("=", 1) for t in targets]
    plain, bindfs, variants = targets[0], targets[-1], targets[1:-1]

    header = ["job", "unit"] + [label for label, _ in targets]
    for label, _ in variants:
        header += [f"{label}/plain", f"{label}/bindfs"]
    # With a tracking-off variant, the cost of tracking: tracking on / tracking off (both
    # write-through).
    off = [label for label, _ in variants if "tracking off" in label]
    on = [label for label, _ in variants if "tracking off" not in label]
    on = [label for label in on if "write-back" not in label] + [
        label for label in on if "write-back" in label
    ]
    if off and on:
        header += [f"{on[0]}/{off[0]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    ratios_to_plain = {}

    for job_name in jobs:
        unit = "MB/s" if job_name.startswith("seq") else "IOPS"
        values, by_rep = {}, {}
        for label, slug in targets:
            files = sorted(glob.glob(os.path.join(results, slug, f"{job_name}.*.fio.json")))
            samples, short = [], False
            by_rep[label] = {}
            for path in files:
                v, io_bytes = metric(job_name, load(path))
                samples.append(v)
                by_rep[label][os.path.basename(path).split(".")[1]] = v
                expected = os.environ.get(
                    "SEQ_BYTES" if job_name.startswith("seq") else "RAND_IO_BYTES"
                )
                if expected and io_bytes < int(expected):
                    short = True
            values[label] = statistics.median(samples) if samples else None
            if short:
                notes.append(
                    f"{job_name} on {label}: stopped by the runtime cap before the full size"
                )
        def rep_ratio(a, b):
            """Median over the reps of a/b measured in the same rep (None without a pair)."""
            pairs = [
                by_rep[a][r] / by_rep[b][r]
                for r in by_rep[a]
                if r in by_rep[b] and by_rep[b][r]
            ]
            return statistics.median(pairs) if pairs else None

        ratios_to_plain[job_name] = {
            label: rep_ratio(label, plain[0]) for label, _ in variants
        }
        row = [job_name, unit] + [fmt(values[label], unit) for label, _ in targets]
        for label, _ in variants:
            row += [
                fmt_ratio(rep_ratio(label, plain[0])),
                fmt_ratio(rep_ratio(label, bindfs[0])),
            ]
        if off and on:
            row += [fmt_ratio(rep_ratio(on[0], off[0]))]
        lines.append("| " + " | ".join(row) + " |")

    print("\n".join(lines))
    for n in notes:
        print(f"\nNote: {n}")
    print_targets(ratios_to_plain, on, [label for label, _ in variants if "write-back" in label])


# Issue 13's targets: the least ratio to the plain directory, write-through and write-back.
TARGETS = {
    "seq-write": (0.55, 0.75),
    "seq-read": (0.90, 0.90),
    "rand-write": (0.40, 0.65),
    "rand-read": (0.85, 0.85),
}


def print_targets(ratios, on, writeback):
    """The targets table: per job, each mode's ratio to the plain dir against its target."""
    through = [label for label in on if "write-back" not in label]
    if not through:
        return
    cols = [("write-through", through[0], 0)]
    if writeback:
        cols.append(("write-back", writeback[0], 1))
    header = ["job"]
    for mode, _, _ in cols:
        header += [f"{mode} target", f"{mode} /plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job_name, r in ratios.items():
        if job_name not in TARGETS:
            continue
        row = [job_name]
        for _, label, i in cols:
            want, got = TARGETS[job_name][i], r.get(label)
            mark = "n/a" if got is None else f"{got:.2f} {'met' if got >= want else 'missed'}"
            row += [f">= {want:.2f}", mark]
        lines.append("| " + " | ".join(row) + " |")
    print("\nTargets (issue 13; ratio to the plain dir, medians):\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
