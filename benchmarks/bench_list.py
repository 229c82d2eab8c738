#!/usr/bin/env python3
"""Benchmark shmem.ShareableList against the standard library's, in one run.

    python benchmarks/bench_list.py [--quick] [--json PATH]

Rows: one item read and one item write (int, float, and str - the path in
Python, under the item's sequence lock), iterating a list of 100,000 ints, and
building ShareableList(range(100_000)). Each row times both
libraries alternately, repeats, and reports the median, the p25-p75 spread and
the ratio shmem / standard library (< 1: shmem is faster). Standard library
plus shmem only. The issue's goals are printed under the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import timeit
from multiprocessing import shared_memory as stdlib_shm
from typing import Callable, Dict, List, Tuple

import shmem
from shmem._kinds import list as _list

IMPLS = {"shmem": shmem.ShareableList, "stdlib": stdlib_shm.ShareableList}
N = 100_000


def _close(sl: object) -> None:
    shm = sl.shm  # type: ignore[attr-defined]
    shm.close()
    shm.unlink()


def per_call_ns(stmt: str, env: Dict[str, object], number: int, repeat: int) -> List[float]:
    """Nanoseconds per execution of ``stmt``, one sample per repetition."""
    timer = timeit.Timer(stmt, globals=env)
    return [t / number * 1e9 for t in timer.repeat(repeat=repeat, number=number)]


def bulk_ms(action: Callable[[], object], repeat: int) -> List[float]:
    return [timeit.timeit(action, number=1) * 1e3 for _ in range(repeat)]


def run(quick: bool) -> List[Tuple[str, str, List[float], str]]:
    number, repeat = (20_000, 5) if quick else (200_000, 15)
    rows: List[Tuple[str, str, List[float], str]] = []
    lists = {key: (cls(range(N)), cls([0.5] * 1000), cls(["abcdefgh"] * 100)) for key, cls in IMPLS.items()}
    try:
        for label, stmt, which in [
            ("read an int item", "sl[500]", 0),
            ("write an int item", "sl[500] = 7", 0),
            ("read a float item", "sl[5]", 1),
            ("write a float item", "sl[5] = 2.5", 1),
            ("read a str item", "sl[5]", 2),
            ("write a str item", "sl[5] = 'xyz'", 2),
        ]:
            samples: Dict[str, List[float]] = {key: [] for key in IMPLS}
            for _ in range(repeat):  # alternate the libraries: the machine's noise hits both
                for key in IMPLS:
                    samples[key] += per_call_ns(stmt, {"sl": lists[key][which]}, number, 1)
            for key in IMPLS:
                rows.append((label, key, samples[key], "ns"))
        bulk_repeat = 3 if quick else 9
        for label, make in [
            (f"iterate {N:,} ints (list(sl))", lambda key: lambda: list(lists[key][0])),
            (f"build ShareableList(range({N:,}))", lambda key: lambda: _close(IMPLS[key](range(N)))),
        ]:
            samples = {key: [] for key in IMPLS}
            for _ in range(bulk_repeat):
                for key in IMPLS:
                    samples[key] += bulk_ms(make(key), 1)
            for key in IMPLS:
                rows.append((label, key, samples[key], "ms"))
    finally:
        for pair in lists.values():
            for sl in pair:
                _close(sl)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, a few seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    print(f"shmem ShareableList benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"Python {platform.python_version()} on {platform.platform()}, cpus={os.cpu_count()}, "
        f"C fast path: {'yes' if _list.ACCELERATED else 'no (pure Python)'}"
    )
    rows = run(args.quick)
    medians = {(label, key): statistics.median(s) for label, key, s, _ in rows}
    print(f"\n{'operation':<40} {'impl':<7} {'median':>10} {'p25 - p75':>20} {'shmem/stdlib':>13}")
    for label, key, samples, unit in rows:
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        ratio = medians[(label, "shmem")] / medians[(label, "stdlib")]
        print(
            f"{label:<40} {key:<7} {medians[(label, key)]:>8.1f} {unit} "
            f"{q[0]:>8.1f} - {q[2]:<8.1f} {(f'{ratio:.3f}' if key == 'shmem' else ''):>13}"
        )
    print()
    for label, limit, unit in [
        ("read an int item", 300, "ns"),
        ("write an int item", 400, "ns"),
        ("read a float item", 300, "ns"),
        ("write a float item", 400, "ns"),
    ]:
        m, s = medians[(label, "shmem")], medians[(label, "stdlib")]
        print(
            f"goal: {label} <= {limit} {unit} and >= 8x the stdlib: {m:.0f} {unit}, {s / m:.1f}x "
            f"-> {'met' if m <= limit and s / m >= 8 else 'NOT met'}"
        )
    for label in (f"iterate {N:,} ints (list(sl))", f"build ShareableList(range({N:,}))"):
        speedup = medians[(label, "stdlib")] / medians[(label, "shmem")]
        print(f"goal: {label} >= 10x faster: {speedup:.1f}x -> {'met' if speedup >= 10 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"operation": op, "impl": k, "samples": s, "unit": u} for op, k, s, u in rows], f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
