#!/usr/bin/env python3
"""Every shmem benchmark, one after the other: the README's benchmark command.

    python benchmarks/bench.py [--quick] [--only core,list,arrays,manager,locks,queues,objects]

Each suite measures shmem and its baselines in the same run and prints ratios;
see benchmarks/README.md. Suites whose optional requirements are missing
(NumPy for arrays) say so and are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SUITES = {
    "core": ("bench_core.py", None),
    "list": ("bench_list.py", None),
    "arrays": ("bench_arrays.py", "numpy"),
    "manager": ("bench_manager.py", None),
    "locks": ("bench_locks.py", None),
    "queues": ("bench_queues.py", None),
    "objects": ("bench_objects.py", "numpy"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every suite")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suites (default: all)")
    args = parser.parse_args()
    failed = 0
    for suite in args.only.split(","):
        script, needs = SUITES[suite]
        path = os.path.join(HERE, script)
        if needs and importlib.util.find_spec(needs) is None:
            print(f"=== {suite}: skipped ({needs} is not installed)\n", flush=True)
            continue
        if not os.path.exists(path):
            print(f"=== {suite}: skipped ({script} is missing)\n", flush=True)
            continue
        print(f"=== {suite}", flush=True)
        failed |= subprocess.call([sys.executable, path] + (["--quick"] if args.quick else []))
        print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
