#!/usr/bin/env python3
"""Small-file metadata jobs for benches/metadata/run.sh (standard library only).

    metabench.py JOB DIR N

runs one job on N files in DIR/files and prints "ops seconds" on stdout. The jobs run in this
order on one directory (each expects what the previous one left):

    create   open(O_CREAT|O_EXCL|O_WRONLY), write 100 bytes, close
    stat     os.lstat of every file, by name (cold lookups after a cache drop)
    readdir  os.scandir of the directory plus lstat of each entry (what `ls -l` does)
    xattr    setxattr user.grainfs then getxattr of it, per file (two operations)
    rename   rename every file to a new name in the same directory
    unlink   unlink every file
"""

import os
import sys
import time


def names(n):
    return [f"f{i:06d}" for i in range(n)]


def create(d, n):
    data = b"x" * 100
    for name in names(n):
        fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, data)
        os.close(fd)
    return n


def stat(d, n):
    for name in names(n):
        os.lstat(os.path.join(d, name))
    return n


def readdir(d, n):
    seen = 0
    with os.scandir(d) as it:
        for e in it:
            e.stat(follow_symlinks=False)
            seen += 1
    if seen != n:
        raise SystemExit(f"readdir saw {seen} entries, expected {n}")
    return n


def xattr(d, n):
    for name in names(n):
        p = os.path.join(d, name)
        os.setxattr(p, "user.grainfs", b"0123456789abcdef", follow_symlinks=False)
        if os.getxattr(p, "user.grainfs", follow_symlinks=False) != b"0123456789abcdef":
            raise SystemExit(f"xattr of {p} read back wrong")
    return 2 * n


def rename(d, n):
    for name in names(n):
        os.rename(os.path.join(d, name), os.path.join(d, "r" + name))
    return n


def unlink(d, n):
    for name in names(n):
        os.unlink(os.path.join(d, "r" + name))
    return n


JOBS = {f.__name__: f for f in (create, stat, readdir, xattr, rename, unlink)}


def main():
    job, top, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    d = os.path.join(top, "files")
    if job == "create":
        os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    ops = JOBS[job](d, n)
    dt = time.perf_counter() - t0
    print(ops, f"{dt:.6f}")


if __name__ == "__main__":
    main()
