#!/usr/bin/env python3
"""Table of benches/metadata/run.sh results: report.py RESULTS SPEC JOB...

RESULTS holds <slug>/<job>.<round> files of "ops seconds"; SPEC is "label=slug,..." with the
plain dir first. Prints a markdown table of median ops/s per target and the ratio to plain,
then the spread (max-min)/median of every cell with more than one round.
"""

import os
import statistics
import sys


def rate(res, slug, job):
    vals = []
    d = os.path.join(res, slug)
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if f.rsplit(".", 1)[0] == job:
            fields = open(os.path.join(d, f)).read().split()
            if len(fields) == 2:  # an interrupted job leaves an empty file
                vals.append(float(fields[0]) / float(fields[1]))
    return (statistics.median(vals), min(vals), max(vals), len(vals)) if vals else None


def rates(res, slug, job):
    """{round: ops/s} of one target and job."""
    out = {}
    d = os.path.join(res, slug)
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        name, _, rnd = f.rpartition(".")
        fields = open(os.path.join(d, f)).read().split()
        if name == job and len(fields) == 2:
            out[rnd] = float(fields[0]) / float(fields[1])
    return out


def ratio(res, slug, plain_slug, job):
    a, p = rates(res, slug, job), rates(res, plain_slug, job)
    r = [a[k] / p[k] for k in a if k in p]
    return statistics.median(r) if r else None


def main():
    res, spec, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
    targets = [t.split("=", 1) for t in spec.split(",")]
    head = ["job"] + [f"{l} ops/s" for l, _ in targets] + [f"{l}/plain" for l, _ in targets[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    spread = []
    for job in jobs:
        r = {l: rate(res, s, job) for l, s in targets}
        plain = r[targets[0][0]]
        row = [job] + [f"{r[l][0]:,.1f}" if r[l] else "-" for l, _ in targets]
        q = [ratio(res, sl, targets[0][1], job) for _, sl in targets[1:]]
        row += [f"{x:.3f}" if x is not None else "-" for x in q]
        print("| " + " | ".join(row) + " |")
        cells = [f"{l} {100 * (r[l][2] - r[l][1]) / r[l][0]:.0f}%" for l, _ in targets if r[l] and r[l][3] > 1]
        if cells:
            spread.append(f"{job}: " + ", ".join(cells))
    if spread:
        print()
        print("Spread of the rounds, (max - min) / median:")
        print()
        for s in spread:
            print(f"- {s}")


if __name__ == "__main__":
    main()
