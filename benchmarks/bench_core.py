#!/usr/bin/env python3
"""Benchmark shmem.SharedMemory against multiprocessing.shared_memory, in one run.

    python benchmarks/bench_core.py [--quick] [--json PATH] [--sizes 4K,1G]

See benchmarks/README.md for what each row measures and how to read it.
Standard library plus shmem only; Linux only (like shmem).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import multiprocessing
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as stdlib_shm
from typing import Callable, Dict, List, Optional, Tuple

import shmem
from _common import GiB, KiB, MiB, SHM_DIR, fmt_ns, parse_size, remove_prefixed, shm_free_bytes, size_label, summarize

SMALL_LIMIT = 1 * MiB  # sizes up to this get the per-operation suite, larger ones the large-block suite
# Every block this script makes starts with this (pid + random token), so cleanup
# removes exactly ours. Fresh-process probes get the parent's prefix via the environment.
PREFIX = os.environ.get("SHMBENCH_PREFIX") or f"shmbench_{os.getpid()}_{secrets.token_hex(3)}_"
_serial = itertools.count()
now = time.perf_counter_ns


class _TrackerOff:
    """Switches the stdlib's resource-tracker calls off for the duration of a call.

    Patches the functions on the resource_tracker module itself: 3.10-3.12 call
    them through that module, 3.9 imports them from it inside each call."""

    def __enter__(self) -> None:
        self.saved = (resource_tracker.register, resource_tracker.unregister)
        resource_tracker.register = resource_tracker.unregister = lambda *a: None  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        resource_tracker.register, resource_tracker.unregister = self.saved  # type: ignore[assignment]


class _StdlibUntrackedEmulated(stdlib_shm.SharedMemory):
    """The stdlib's track=False for Python < 3.13, which lacks the parameter: the
    same class with its resource-tracker calls switched off, which is all that
    track=False changes in 3.13. The swap and the extra call frame add ~0.4 µs
    per call to the stdlib's time, which flatters shmem's ratios slightly."""

    def __init__(self, name: Optional[str] = None, create: bool = False, size: int = 0) -> None:
        with _TrackerOff():
            super().__init__(name, create, size)

    def unlink(self) -> None:
        with _TrackerOff():
            super().unlink()


# Like for like: shmem track=True against the stdlib's default (tracked: its
# resource tracker hears of every create *and attach*), track=False against track=False.
STDLIB_HAS_TRACK = sys.version_info >= (3, 13)
STDLIB_TRACKED = "stdlib (default, tracked)"
STDLIB_UNTRACKED = "stdlib track=False" + ("" if STDLIB_HAS_TRACK else "*")
IMPLS: Dict[str, Tuple[type, dict]] = {
    "shmem track=True": (shmem.SharedMemory, {"track": True}),
    "shmem track=False": (shmem.SharedMemory, {"track": False}),
    STDLIB_TRACKED: (stdlib_shm.SharedMemory, {}),
    STDLIB_UNTRACKED: (stdlib_shm.SharedMemory, {"track": False}) if STDLIB_HAS_TRACK
    else (_StdlibUntrackedEmulated, {}),
}

Row = Tuple[str, str]  # (operation, size label)
Op = Callable[[], Dict[Row, List[int]]]  # one timed round of one implementation
Results = Dict[Row, Dict[str, List[int]]]  # row -> implementation -> samples in ns


def cleanup() -> None:
    remove_prefixed(PREFIX)


def new_name() -> str:
    return f"{PREFIX}{next(_serial)}"














def time_create_close_unlink(cls: type, kw: dict, size: int) -> int:
    name = new_name()
    t0 = now()
    block = cls(name, create=True, size=size, **kw)
    block.close()
    block.unlink()
    return now() - t0


def time_attach_close(cls: type, kw: dict, name: str) -> int:
    t0 = now()
    cls(name, **kw).close()
    return now() - t0


_CHUNK = memoryview(b"\x01" * MiB)


def first_write(buf: memoryview) -> None:
    # 1 MiB slice assignments (memcpy): loop overhead is negligible next to the
    # page faults, and both implementations get exactly the same writes.
    for off in range(0, len(buf), MiB):
        end = min(off + MiB, len(buf))
        buf[off:end] = _CHUNK[: end - off]


def _worker_loop(conn) -> None:  # runs in the worker process
    for key, name, count in iter(conn.recv, None):
        conn.send([time_attach_close(*IMPLS[key], name) for _ in range(count)])


class Worker:
    """A long-lived process that attaches blocks by name on request and sends
    back its own timings: its start-up and the pipe are never timed."""

    def __enter__(self) -> "Worker":
        # spawn: a clean interpreter, no inherited mappings or reaper pipe. On
        # Python < 3.13 it shares our resource tracker, so its registrations of
        # stdlib blocks are undone by our unlink() and nothing warns at exit.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_loop, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        return self

    def attach_close(self, key: str, name: str, count: int) -> List[int]:
        self._conn.send((key, name, count))
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass  # it died already; the error that killed it is the one to see
        self._proc.join(10)


def interleaved(ops: Dict[str, Op], reps: int, warmup: int = 1) -> Results:
    """Run each implementation's op once per round, rotating who goes first, so
    slow phases of a noisy shared machine hit every implementation alike."""
    results: Results = {}
    keys = list(ops)
    gc.disable()  # as timeit does: no collection pause lands in one sample
    try:
        for r in range(warmup + reps):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                rows = ops[key]()
                if r < warmup:
                    continue  # warm-up rounds are discarded
                for row, samples in rows.items():
                    results.setdefault(row, {}).setdefault(key, []).extend(samples)
            if r + 1 == warmup:
                time.sleep(0.3)  # helpers the warm-up started (reaper, resource tracker) finish booting
    finally:
        gc.enable()
    return results


def _as_row(row: Row, timed: Callable[[str], List[int]], key: str) -> Dict[Row, List[int]]:
    return {row: timed(key)}


def run_small(size: int, reps: int, worker: Worker, batch: int = 10) -> Results:
    label = size_label(size)
    # The blocks attached to, made beforehand (one per implementation, alive throughout).
    targets = {key: cls(new_name(), create=True, size=size, **kw) for key, (cls, kw) in IMPLS.items()}
    suite = {  # operation: (rounds, timed op of one implementation)
        "create+close+unlink": (reps, lambda key: [time_create_close_unlink(*IMPLS[key], size)]),
        "attach+close, same process": (reps, lambda key: [time_attach_close(*IMPLS[key], targets[key].name)]),
        # A batch per request: fewer wake-ups; the worker's first attach after one is still in.
        "attach+close, other process": (reps // batch, lambda key: worker.attach_close(key, targets[key].name, batch)),
    }
    results: Results = {}
    try:
        # One loop per row rather than one loop doing all three: the kernel and cache
        # state one operation leaves behind (a pipe round trip, an unlink) would slow the next.
        for operation, (rounds, timed) in suite.items():
            ops = {key: functools.partial(_as_row, (operation, label), timed, key) for key in IMPLS}
            results.update(interleaved(ops, rounds))
    finally:
        for block in targets.values():
            block.close()
            block.unlink()
    return results


def large_op(key: str, size: int, worker: Worker) -> Dict[Row, List[int]]:
    """One large block's whole life; if it fails, cleanup() removes the name."""
    cls, kw = IMPLS[key]
    label = size_label(size)
    t0 = now()
    block = cls(new_name(), create=True, size=size, **kw)
    t1 = now()
    first_write(block.buf)
    t2 = now()
    remote = worker.attach_close(key, block.name, 20)
    t3 = now()
    block.close()
    t4 = now()
    block.unlink()
    t5 = now()
    return {
        ("create", label): [t1 - t0],
        ("create + first write of every page", label): [t2 - t0],
        ("attach+close, other process", label): remote,
        ("close (after the write)", label): [t4 - t3],
        ("unlink", label): [t5 - t4],
    }


def run_large(size: int, reps: int, worker: Worker) -> Results:
    return interleaved({key: functools.partial(large_op, key, size, worker) for key in IMPLS}, reps)


def probe_main(index: int, later: int) -> None:
    """Child side of run_first_create: a fresh process, nothing created yet."""
    cls, kw = list(IMPLS.values())[index]
    print(json.dumps([time_create_close_unlink(cls, kw, 4 * KiB) for _ in range(1 + later)]))


def first_create_op(index: int, later: int) -> Dict[Row, List[int]]:
    argv = [sys.executable, os.path.abspath(__file__), "--probe", str(index), "--later", str(later)]
    env = {**os.environ, "SHMBENCH_PREFIX": PREFIX + "p"}
    first, *rest = json.loads(subprocess.run(argv, env=env, stdout=subprocess.PIPE, check=True).stdout)
    return {
        ("first create+close+unlink, fresh process", "4 KiB"): [first],
        ("later create+close+unlink, same process", "4 KiB"): [int(statistics.median(rest))],
    }


def run_first_create(reps: int, later: int = 20) -> Results:
    """One-time cost of a process's first create (shmem track=True spawns its
    reaper there; the stdlib's default tracking starts its resource tracker).
    Each sample is a fresh subprocess; imports happen before the timing."""
    ops = {key: functools.partial(first_create_op, i, later) for i, key in enumerate(IMPLS)}
    return interleaved(ops, reps, warmup=0)


def print_header() -> None:
    print(f"shmem benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"/dev/shm free {shm_free_bytes() / GiB:.1f} GiB")
    if not STDLIB_HAS_TRACK:
        print("* Python < 3.13 has no track=False: emulated by switching off the stdlib's resource-tracker")
        print("  calls around each call (see _StdlibUntrackedEmulated).")
    print()


def table_rows(results: Results) -> List[dict]:
    rows = []
    for (operation, size), by_impl in results.items():
        untracked, tracked = (statistics.median(by_impl[k]) for k in (STDLIB_UNTRACKED, STDLIB_TRACKED))
        for key in IMPLS:
            stats = summarize(by_impl[key])
            ratios = {"ratio_untracked": stats["median"] / untracked, "ratio_tracked": stats["median"] / tracked}
            rows.append({"operation": operation, "size": size, "implementation": key,
                         **(ratios if key.startswith("shmem") else {}), **stats})
    return rows


def print_table(rows: List[dict]) -> None:
    fmt = "{:<42} {:>7}  {:<26} {:>9}  {:>21} {:>5}  {:>9} {:>9}"
    print(fmt.format("operation", "size", "implementation", "median", "p25 - p75", "n", "÷stdlib", "÷stdlib"))
    print(fmt.format("", "", "", "", "", "", "untracked", "tracked"))
    print("-" * 135)
    for i, row in enumerate(rows):
        first = i == 0 or (row["operation"], row["size"]) != (rows[i - 1]["operation"], rows[i - 1]["size"])
        ratios = [f"{row[k]:.2f}" if k in row else "" for k in ("ratio_untracked", "ratio_tracked")]
        print(fmt.format(
            row["operation"] if first else "", row["size"] if first else "", row["implementation"],
            fmt_ns(row["median"]), f"{fmt_ns(row['p25'])} - {fmt_ns(row['p75'])}", row["n"], *ratios,
        ))
    print(f"ratios = shmem median / median of {STDLIB_UNTRACKED!r} or {STDLIB_TRACKED!r}: < 1 is faster.")
    print("Like for like: track=False vs untracked, track=True vs tracked.\n")


def print_goal(rows: List[dict]) -> None:
    for row in rows:
        if row["operation"].startswith("attach+close") and row["implementation"] == "shmem track=False":
            verdict = "met" if row["ratio_untracked"] <= 1.5 else "NOT met"
            print(f"goal: shmem track=False {row['operation']} ({row['size']}) <= 1.5x {STDLIB_UNTRACKED}: "
                  f"{row['ratio_untracked']:.2f}x, {verdict}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (< 20 s): few repetitions, 256 MiB")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                        help=f"comma-separated sizes; up to {size_label(SMALL_LIMIT)}: per-operation suite, "
                             "larger: large-block suite (default 4K,1G; with --quick 4K,256M)")
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # internal: the fresh-process child
    parser.add_argument("--later", type=int, default=20, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_all(sizes: List[int], quick: bool) -> Results:
    small_reps, large_reps, probe_reps = (300, 2, 2) if quick else (3000, 7, 11)
    results: Results = {}
    with Worker() as worker:
        for size in sizes:
            if size <= SMALL_LIMIT:
                print(f"... {size_label(size)}: per-operation suite", file=sys.stderr)
                results.update(run_small(size, small_reps, worker))
            elif shm_free_bytes() < size + size // 8 + 64 * MiB:  # one block at a time, plus slack
                print(f"skipped {size_label(size)}: {SHM_DIR} has only {shm_free_bytes() / GiB:.2f} GiB free\n")
            else:
                print(f"... {size_label(size)}: large-block suite", file=sys.stderr)
                results.update(run_large(size, large_reps, worker))
    print("... first create in a fresh process", file=sys.stderr)
    results.update(run_first_create(probe_reps))
    return results


def main() -> None:
    args = parse_args()
    if args.probe is not None:
        return probe_main(args.probe, args.later)
    print_header()
    try:
        results = run_all(args.sizes or ([4 * KiB, 256 * MiB] if args.quick else [4 * KiB, GiB]), args.quick)
    finally:
        cleanup()
    rows = table_rows(results)
    print_table(rows)
    print_goal(rows)
    if args.json:
        meta = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
                "stdlib_track_emulated": not STDLIB_HAS_TRACK}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
