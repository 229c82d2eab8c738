#!/usr/bin/env python3
"""Benchmark creating blocks through shmem's SharedMemoryManager, in one run.

    python benchmarks/bench_manager.py [--quick] [--json PATH] [--size 4096]

One row per way of giving a 4 KiB block a whole short life - create, close,
unlink - in one process:

* shmem direct          shmem.SharedMemory(create=True, size=...)   (track=True, the default)
* shmem manager         shmem's SharedMemoryManager().SharedMemory(size)
* stdlib direct         multiprocessing.shared_memory.SharedMemory(create=True, size=...)
* stdlib manager        multiprocessing.managers.SharedMemoryManager().SharedMemory(size)

The four alternate, batch by batch, so the machine's noise hits them alike;
each sample is the mean of one batch. The table shows the median, the p25-p75
spread and each manager's cost over creating directly with its own library.
The issue's goal (shmem's manager <= 2x shmem direct) is printed under it.
Standard library plus shmem only; Linux only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import secrets
import statistics
import sys
import time
from multiprocessing import managers as stdlib_managers
from multiprocessing import shared_memory as stdlib_shm
from typing import Callable, Dict, List

# Every block this script makes under its own names starts with this prefix, so
# leftovers (an interrupted run) are recognisable; shmem's manager inherits it.
PREFIX = f"shmbench_{os.getpid()}_{secrets.token_hex(3)}_"
os.environ["SHMEM_NAME_PREFIX"] = PREFIX

import shmem  # noqa: E402  (after the prefix is set)
from shmem.managers import SharedMemoryManager  # noqa: E402

SHM_DIR = "/dev/shm"
GOAL = 2.0
_serial = itertools.count()


def operations(
    size: int, shmem_smm: SharedMemoryManager, stdlib_smm: stdlib_managers.SharedMemoryManager
) -> Dict[str, Callable[[], None]]:
    def shmem_direct() -> None:
        shm = shmem.SharedMemory(create=True, size=size)
        shm.close()
        shm.unlink()

    def shmem_manager() -> None:
        shm = shmem_smm.SharedMemory(size)
        shm.close()
        shm.unlink()

    def stdlib_direct() -> None:
        shm = stdlib_shm.SharedMemory(f"{PREFIX}{next(_serial)}", create=True, size=size)
        shm.close()
        shm.unlink()

    def stdlib_manager() -> None:
        shm = stdlib_smm.SharedMemory(size)
        shm.close()
        shm.unlink()

    return {
        "shmem direct": shmem_direct,
        "shmem manager": shmem_manager,
        "stdlib direct": stdlib_direct,
        "stdlib manager": stdlib_manager,
    }


def measure(ops: Dict[str, Callable[[], None]], batches: int, per_batch: int) -> Dict[str, List[float]]:
    """Microseconds per operation, one sample per batch, the implementations alternating."""
    for op in ops.values():  # warm up: start reapers and trackers, fill caches
        for _ in range(20):
            op()
    samples: Dict[str, List[float]] = {key: [] for key in ops}
    keys = list(ops)
    gc.disable()
    try:
        for batch in range(batches):
            for key in keys[batch % len(keys) :] + keys[: batch % len(keys)]:  # rotate who goes first
                op = ops[key]
                start = time.perf_counter_ns()
                for _ in range(per_batch):
                    op()
                samples[key].append((time.perf_counter_ns() - start) / per_batch / 1e3)
    finally:
        gc.enable()
    return samples


def leftovers() -> List[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, < 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the samples and ratios as JSON")
    parser.add_argument("--size", type=int, default=4096, help="block size in bytes (default 4096)")
    args = parser.parse_args()
    batches, per_batch = (6, 100) if args.quick else (25, 300)

    print(f"shmem SharedMemoryManager benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"Python {platform.python_version()} on {platform.platform()}, cpus={os.cpu_count()}; "
        f"create+close+unlink of a {args.size}-byte block, {batches} batches of {per_batch}"
    )
    shmem_smm = SharedMemoryManager()
    stdlib_smm = stdlib_managers.SharedMemoryManager()
    with shmem_smm, stdlib_smm:
        samples = measure(operations(args.size, shmem_smm, stdlib_smm), batches, per_batch)
    medians = {key: statistics.median(s) for key, s in samples.items()}
    ratios = {
        "shmem manager / shmem direct": medians["shmem manager"] / medians["shmem direct"],
        "stdlib manager / stdlib direct": medians["stdlib manager"] / medians["stdlib direct"],
        "shmem manager / stdlib manager": medians["shmem manager"] / medians["stdlib manager"],
        "shmem manager / stdlib direct": medians["shmem manager"] / medians["stdlib direct"],
    }

    print(f"\n{'create+close+unlink':<22} {'median':>10} {'p25 - p75':>20} {'manager / direct':>17}")
    for key, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        own = ""
        if key.endswith("manager"):
            own = f"{ratios[key + ' / ' + key.split()[0] + ' direct']:.2f}x"
        print(f"{key:<22} {medians[key]:>7.1f} us {q[0]:>8.1f} - {q[2]:<8.1f} {own:>17}")
    print()
    for label, ratio in ratios.items():
        print(f"{label:<32} {ratio:6.2f}x")
    met = ratios["shmem manager / shmem direct"] <= GOAL
    print(
        f"\ngoal: a block through shmem's manager costs <= {GOAL:g}x creating it directly: "
        f"{ratios['shmem manager / shmem direct']:.2f}x -> {'met' if met else 'NOT met'}"
    )

    left = leftovers()
    for name in left:  # ours by construction (see PREFIX)
        os.unlink(os.path.join(SHM_DIR, name))
    if left:
        print(f"warning: {len(left)} blocks were left behind and removed", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "unit": "us",
                    "samples": samples,
                    "medians": medians,
                    "ratios": ratios,
                    "goal": GOAL,
                    "goal_met": met,
                    "leftovers": left,
                },
                f,
                indent=1,
            )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
