#!/usr/bin/env python3
"""Compare this checkout's SharedMemory create / attach with another revision's, in one run.

    python benchmarks/bench_versions.py [--rev b74e138] [--rounds 8] [--quick]

"No slower than before" is a claim about two versions of shmem, so both are
measured here, on this machine, now: the other revision is checked out into a
temporary git worktree (removed afterwards), and fresh processes of each
version alternate, so that whatever else the machine is doing weighs on both
alike. Each process reports the best of five batches per operation; the table
shows each version's median over the rounds and the ratio this ÷ other
(< 1 is faster). The standard library's create is measured in every process
too, as a yardstick.

Only the pure-Python core is compared (SharedMemory); nothing needs building.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The last release before issue 9's second pass of the core.
DEFAULT_REV = "b74e138"

PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
batch = int(sys.argv[2])
import shmem
from multiprocessing import shared_memory as stdlib
untracked = {"track": False} if sys.version_info >= (3, 13) else {}
name = "shmbenchv_%d" % os.getpid()
held = shmem.SharedMemory(name, create=True, size=4096, track=False)

def create_tracked():
    s = shmem.SharedMemory(create=True, size=4096); s.close(); s.unlink()
def create_untracked():
    s = shmem.SharedMemory(create=True, size=4096, track=False); s.close(); s.unlink()
def attach_untracked():
    s = shmem.SharedMemory(name, track=False); s.close()
def attach_tracked():
    s = shmem.SharedMemory(name); s.close()
def stdlib_create():
    s = stdlib.SharedMemory(create=True, size=4096, **untracked); s.close(); s.unlink()

result = {}
# Tracked operations last: the first one starts a reaper, whose start-up must not
# overlap the other rows.
for label, op in [("stdlib create+close+unlink (yardstick)", stdlib_create),
                  ("create+close+unlink, track=False", create_untracked),
                  ("attach+close, track=False", attach_untracked),
                  ("attach+close, track=True", attach_tracked),
                  ("create+close+unlink, track=True", create_tracked)]:
    for _ in range(batch // 10):
        op()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(batch):
            op()
        best = min(best, (time.perf_counter_ns() - start) / batch / 1000)
    result[label] = best
held.close()
held.unlink()
print(json.dumps(result))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default=DEFAULT_REV, help=f"the revision to compare with (default {DEFAULT_REV})")
    parser.add_argument("--rounds", type=int, default=8, help="processes of each version (default 8)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of small batches")
    parser.add_argument(
        "--cpu", type=int, default=None, help="run every probe on this CPU (taskset): one CPU's speed for both versions"
    )
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be between 1 and 100")
    rounds, batch = (2, 200) if args.quick else (args.rounds, 2000)
    pin = ["taskset", "-c", str(args.cpu)] if args.cpu is not None else []
    # A fresh reaper per version: neither inherits this process's.
    env = {k: v for k, v in os.environ.items() if k != "SHMEM_REAPER"}
    with tempfile.TemporaryDirectory(prefix="shmem-bench-") as tmp:
        other = os.path.join(tmp, "other")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", other, args.rev], check=True)
        try:
            trees = {"this": os.path.join(ROOT, "src"), args.rev: os.path.join(other, "src")}
            results = {key: [] for key in trees}
            for i in range(rounds):
                order = list(trees.items()) if i % 2 else list(trees.items())[::-1]
                for key, src in order:
                    out = subprocess.run(
                        pin + [sys.executable, "-c", PROBE, src, str(batch)],
                        capture_output=True,
                        text=True,
                        env=env,
                        check=True,
                    )
                    results[key].append(json.loads(out.stdout))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other], check=False)
    print(
        f"shmem {sys.version.split()[0]}: this checkout vs {args.rev}, {rounds} alternating processes each, "
        "medians of per-process bests"
    )
    print(f"{'operation (4 KiB)':42} {'this':>9} {args.rev:>9} {'ratio':>7}  goal")
    for label in results["this"][0]:
        mine = statistics.median(r[label] for r in results["this"])
        theirs = statistics.median(r[label] for r in results[args.rev])
        goal = "" if "yardstick" in label else ("<= 1.00 (no slower than before)" if "create" in label else "<= 1.00")
        print(f"{label:42} {mine:7.2f}µs {theirs:7.2f}µs {mine / theirs:7.2f}  {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
