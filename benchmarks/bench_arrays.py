#!/usr/bin/env python3
"""Benchmark shmem's NumPy arrays against the other ways to hand an array to a worker, in one run.

    python benchmarks/bench_arrays.py [--quick | --smoke] [--json PATH] [--sizes 1M,100M,1G] [--no-ray]

Four parts (benchmarks/README.md explains each row):

1. hand-off: a float64 array goes to a worker process that sums it and sends
   the sum back - shmem (a SharedArray as the argument of Pool.apply) against
   Pool.apply with a plain ndarray, multiprocessing.Queue, the standard
   library's SharedMemory used by hand, and Ray (ray.put, then a task taking
   the ref) when ``ray`` is installed.
2. attach by name in another process, by size, against the standard
   library's attach + np.ndarray + close: must not depend on the size; goals:
   the first attach in a process within 1.5x of the standard library's, an
   attach of a block the process has mapped already faster than it.
3. filling a new array: first touch of every page, and what the ways of
   preparing the memory at creation do to it.
4. a SharedArray against a plain ndarray of the same 1,000 float64, one
   operation at a time (x[5], x[10:20], x + 1, x.sum(), np.add(x, 1, out=x)):
   goal within 1.2x.

Standard library + NumPy + shmem (+ Ray, optional); Linux only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import mmap
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
import timeit
from multiprocessing import shared_memory as stdlib_shm
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from _common import SHM_DIR, GiB, KiB, MiB, fmt_ns, parse_size, remove_prefixed, shm_free_bytes, size_label, summarize

import shmem
from shmem._kinds import array_mappings

# Bound once: ``shmem.attach_array`` is resolved through the package's lazy __getattr__ on every use.
attach_array = shmem.attach_array

# Blocks made here without shmem (stdlib, raw files) carry this prefix: cleanup removes exactly those.
PREFIX = f"shmbencharr_{os.getpid()}_{secrets.token_hex(3)}_"
# shmem's own blocks too, unless a caller (the tests) chose a prefix: inherited by the workers.
os.environ.setdefault("SHMEM_NAME_PREFIX", PREFIX + "s")
MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (<linux/mman.h>); Python's mmap module does not name it
now = time.perf_counter_ns
_serial = iter(range(1 << 30))

Results = Dict[Tuple[str, str], Dict[str, List[float]]]  # (part/operation, size) -> implementation -> ns samples


def cleanup() -> None:
    remove_prefixed(PREFIX)


def new_name() -> str:
    return f"{PREFIX}{next(_serial)}"


def record(results: Results, row: Tuple[str, str], impl: str, ns: float) -> None:
    results.setdefault(row, {}).setdefault(impl, []).append(ns)


def rotated(items: List[Any], r: int) -> List[Any]:
    """Round r's order: everyone goes first in turn, so a slow phase of a noisy
    machine hits every implementation alike."""
    k = r % len(items)
    return items[k:] + items[:k]


# ===================================================================== worker side


def total(arr: Any) -> float:
    return float(arr.sum())


def total_stdlib(name: str, shape: Tuple[int, ...], dtype: str) -> float:
    """The standard library by hand: attach by name, wrap, sum, let go."""
    kwargs = {"track": False} if sys.version_info >= (3, 13) else {}
    shm = stdlib_shm.SharedMemory(name, **kwargs)
    arr = np.ndarray(shape, dtype, buffer=shm.buf)
    result = float(arr.sum())
    del arr
    shm.close()
    return result


def forget_mappings() -> None:
    """Make the worker's next receive a first one: no cached mapping."""
    array_mappings.drop_cached_mappings()
    gc.collect()


def drop_mappings() -> None:
    """As forget_mappings, without gc.collect(), which leaves the next allocations
    slow for a while (the standard library's samples get none either). Arrays
    go with their last reference: there is no cycle to collect."""
    array_mappings.drop_cached_mappings()


def queue_worker(inbox: Any, outbox: Any) -> None:
    while True:
        arr = inbox.get()
        if arr is None:
            return
        outbox.put(float(arr.sum()))


def attach_probe(name: str, count: int, cached: bool) -> List[int]:
    """attach_array(name) and drop it, timed here in the worker: no pipe, no start-up."""
    samples = []
    for _ in range(count):
        if not cached:
            drop_mappings()
        t0 = now()
        arr = attach_array(name)
        del arr
        samples.append(now() - t0)
    forget_mappings()
    return samples


def attach_probe_stdlib(name: str, shape: Tuple[int, ...], count: int) -> List[int]:
    kwargs = {"track": False} if sys.version_info >= (3, 13) else {}
    samples = []
    for _ in range(count):
        t0 = now()
        shm = stdlib_shm.SharedMemory(name, **kwargs)
        arr = np.ndarray(shape, np.float64, buffer=shm.buf)
        del arr
        shm.close()
        samples.append(now() - t0)
    return samples


# ===================================================================== 1. hand-off

POOL_APPLY = "Pool.apply(ndarray)"
QUEUE = "mp.Queue(ndarray)"
STDLIB = "stdlib shm by hand"
SHMEM = "shmem Pool.apply(SharedArray)"
SHMEM_COLD = "shmem, first hand-off to the worker"
RAY = "Ray get(task(ref))"


class Ray:
    """Ray, when installed: one local instance for the whole run."""

    def __init__(self, store_bytes: int) -> None:
        import ray  # noqa: F401 - optional

        self.ray = ray
        t0 = now()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=store_bytes,
            logging_level="ERROR",
        )
        self.init_ns = now() - t0
        self.task = ray.remote(total)
        self.refs: Dict[int, Any] = {}
        self.put_ns: Dict[int, List[int]] = {}

    def put(self, size: int, arr: np.ndarray) -> None:
        t0 = now()
        self.refs[size] = self.ray.put(arr)
        self.put_ns.setdefault(size, []).append(now() - t0)
        self.ray.get(self.task.remote(self.refs[size]))  # warm-up: the worker starts, maps the store

    def run(self, size: int) -> float:
        return float(self.ray.get(self.task.remote(self.refs[size])))

    def drop(self, size: int) -> None:
        del self.refs[size]

    def shutdown(self) -> None:
        self.ray.shutdown()


def run_handoff(sizes: List[int], reps: Dict[int, Tuple[int, int]], ray: Optional[Ray], results: Results) -> None:
    ctx = multiprocessing.get_context("spawn")  # a clean worker, as with any start method but fork
    with ctx.Pool(1) as pool:
        inbox, outbox = ctx.Queue(), ctx.Queue()
        qproc = ctx.Process(target=queue_worker, args=(inbox, outbox), daemon=True)
        qproc.start()
        try:
            for size in sizes:
                if shm_free_bytes() < 3 * size + 256 * MiB:
                    free = shm_free_bytes() / GiB
                    print(f"skipped hand-off of {size_label(size)}: {SHM_DIR} has {free:.1f} GiB free")
                    continue
                print(f"... hand-off, {size_label(size)}", file=sys.stderr)
                n = size // 8
                plain = np.ones(n)
                shared = shmem.array(plain)
                std = stdlib_shm.SharedMemory(new_name(), create=True, size=size)
                np.ndarray((n,), np.float64, buffer=std.buf)[:] = 1.0
                if ray is not None:
                    ray.put(size, plain)

                # Each closure binds this iteration's arrays (default arguments): called in this iteration only.
                def apply_shmem(shared: Any = shared) -> float:
                    return float(pool.apply(total, (shared,)))

                def apply_shmem_cold() -> float:
                    pool.apply(forget_mappings)  # untimed below: only the hand-off after it is
                    return -1.0

                def apply_plain(plain: Any = plain) -> float:
                    return float(pool.apply(total, (plain,)))

                def via_queue(plain: Any = plain) -> float:
                    inbox.put(plain)
                    return float(outbox.get(timeout=600))

                def stdlib_by_hand(std: Any = std, n: int = n) -> float:
                    return float(pool.apply(total_stdlib, (std.name, (n,), "<f8")))

                fast: Dict[str, Callable[[], float]] = {SHMEM: apply_shmem, STDLIB: stdlib_by_hand}
                if ray is not None:
                    fast[RAY] = lambda: ray.run(size)  # noqa: B023 - called in this iteration only
                slow: Dict[str, Callable[[], float]] = {POOL_APPLY: apply_plain, QUEUE: via_queue}
                fast_reps, slow_reps = reps[size]
                label = size_label(size)
                for impl, fn in list(fast.items()) + list(slow.items()):  # warm-up, discarded
                    assert fn() == n, impl
                gc.disable()
                try:
                    for r in range(max(fast_reps, slow_reps)):
                        todo = list(fast) if r < fast_reps else []
                        todo += list(slow) if r < slow_reps else []
                        todo += [SHMEM_COLD] if r < fast_reps else []
                        for impl in rotated(todo, r):
                            if impl == SHMEM_COLD:
                                apply_shmem_cold()
                                fn = apply_shmem
                            else:
                                fn = {**fast, **slow}[impl]
                            t0 = now()
                            value = fn()
                            record(results, ("hand-off: worker sums it", label), impl, now() - t0)
                            assert value == n, (impl, value)
                finally:
                    gc.enable()
                if ray is not None:
                    ray.drop(size)
                shared.unlink()  # the memory goes when the next size (or the return) drops the arrays
                std.close()
                std.unlink()
                gc.collect()
                pool.apply(forget_mappings)
        finally:
            inbox.put(None)
            qproc.join(30)


# ===================================================================== 2. attach by name

ATTACH_FIRST = "shmem attach_array (first in the process)"
ATTACH_CACHED = "shmem attach_array (block mapped already)"
ATTACH_STDLIB = "stdlib SharedMemory + np.ndarray + close"


def run_attach(sizes: List[int], reps: int, results: Results) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        for size in sizes:
            if shm_free_bytes() < 2 * size + 256 * MiB:
                continue
            print(f"... attach by name, {size_label(size)}", file=sys.stderr)
            arr = shmem.zeros(size // 8)
            std = stdlib_shm.SharedMemory(new_name(), create=True, size=size)
            label = size_label(size)
            pool.apply(attach_probe, (arr.name, 3, False))  # warm-up
            for r in range(3):
                for impl in rotated(["cold", "cached", "stdlib"], r):
                    if impl == "cold":
                        samples = pool.apply(attach_probe, (arr.name, reps, False))
                        key = ATTACH_FIRST
                    elif impl == "cached":
                        samples = pool.apply(attach_probe, (arr.name, reps, True))[1:]
                        key = ATTACH_CACHED
                    else:
                        samples = pool.apply(attach_probe_stdlib, (std.name, (size // 8,), reps))
                        key = ATTACH_STDLIB
                    for ns in samples:
                        record(results, ("attach by name, other process", label), key, ns)
            arr.unlink()
            del arr
            std.close()
            std.unlink()
            gc.collect()


# ===================================================================== 3. filling a new array


def raw_block(size: int, reserve: bool, map_flags: int, advice: Optional[int]) -> Tuple[int, mmap.mmap, str]:
    """What shmem could do at creation, done by hand on a plain /dev/shm file."""
    name = new_name()
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if reserve:
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, flags=map_flags)
    if advice is not None:
        mm.madvise(advice)
    return fd, mm, name


Made = Tuple[Any, Callable[[], None]]  # a fresh float64 array of the block, and how to release both


def timed_fills(make: Callable[[], Made]) -> Tuple[int, int, int]:
    """(prepare ns, first fill ns, second fill ns) of one fresh block made by ``make``."""
    t0 = now()
    arr, release = make()
    t1 = now()
    arr.fill(1.0)
    t2 = now()
    arr.fill(2.0)
    t3 = now()
    del arr
    release()
    return t1 - t0, t2 - t1, t3 - t2


def fill_variants(size: int) -> Dict[str, Callable[[], Tuple[int, int, int]]]:
    """Each returns (prepare ns, first fill ns, second fill ns) for a fresh block."""
    n = size // 8

    def shmem_empty() -> Made:
        arr = shmem.empty(n)
        return arr, arr.unlink

    def stdlib() -> Made:
        shm = stdlib_shm.SharedMemory(new_name(), create=True, size=size)

        def release() -> None:
            shm.close()
            shm.unlink()

        return np.ndarray((n,), np.float64, buffer=shm.buf), release

    def private() -> Made:
        return np.empty(n), lambda: None

    def raw(reserve: bool, flags: int = mmap.MAP_SHARED, advice: Optional[int] = None) -> Callable[[], Made]:
        def make() -> Made:
            fd, mm, name = raw_block(size, reserve, flags, advice)

            def release() -> None:
                mm.close()
                os.close(fd)
                os.unlink(os.path.join(SHM_DIR, name))

            return np.frombuffer(mm, np.float64), release

        return make

    variants = {
        "shmem.empty (fallocate, as now)": shmem_empty,
        "stdlib SharedMemory (ftruncate: sparse)": stdlib,
        "np.empty (private memory)": private,
        "fallocate + MADV_HUGEPAGE": raw(True, advice=mmap.MADV_HUGEPAGE),
        "fallocate + MADV_POPULATE_WRITE": raw(True, advice=MADV_POPULATE_WRITE),
        "ftruncate + MADV_POPULATE_WRITE": raw(False, advice=MADV_POPULATE_WRITE),
    }
    if hasattr(mmap, "MAP_POPULATE"):  # Python >= 3.10
        variants["fallocate + MAP_POPULATE"] = raw(True, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    return {impl: functools.partial(timed_fills, make) for impl, make in variants.items()}


def run_fill(size: int, reps: int, results: Results) -> None:
    if shm_free_bytes() < size + 256 * MiB:
        print(f"skipped fill of {size_label(size)}: {SHM_DIR} has {shm_free_bytes() / GiB:.1f} GiB free")
        return
    print(f"... first touch, {size_label(size)}", file=sys.stderr)
    variants = fill_variants(size)
    label = size_label(size)
    for impl, fn in list(variants.items()):
        try:
            fn()  # warm-up, and does this kernel have it?
        except OSError as err:
            print(f"skipped {impl}: {err}", file=sys.stderr)
            del variants[impl]
            cleanup()
    for r in range(reps):
        for impl in rotated(list(variants), r):
            gc.collect()
            prepare, first, again = variants[impl]()
            record(results, ("new array: create (prepare memory)", label), impl, prepare)
            record(results, ("new array: first fill (first touch)", label), impl, first)
            record(results, ("new array: create + first fill", label), impl, prepare + first)
            record(results, ("new array: fill again (touched)", label), impl, again)


# ===================================================================== 4. SharedArray against ndarray

OPS_PART = "SharedArray vs ndarray"  # 1,000 float64
#: Each operation, as written against an array ``x`` (``np`` is NumPy).
OPERATIONS = ("x[5]", "x[10:20]", "x + 1", "x.sum()", "np.add(x, 1, out=x)")
OPS_GOAL = 1.2
OPS_SIZE = size_label(8000)
EMPTY_SUBCLASS = "empty ndarray subclass"


class _EmptySubclass(np.ndarray):  # type: ignore[type-arg]
    """A subclass with nothing in it: what NumPy itself charges any subclass."""


def run_operations(samples: int, number: int, results: Results) -> None:
    """Each operation ``number`` times per sample, on a SharedArray and on a plain
    ndarray holding the same data, the two interleaved (rotated each round).
    Timed in this thread's CPU time: what other processes do meanwhile (the
    load of a shared machine) does not count, the operation itself does."""
    print("... SharedArray against ndarray", file=sys.stderr)
    shared = shmem.zeros(1000)
    plain = np.zeros(1000)
    # The floor for any ndarray subclass: NumPy's own cost of giving a result the subclass's type.
    arrays = {"SharedArray": shared, "ndarray": plain, EMPTY_SUBCLASS: plain.view(_EmptySubclass)}
    try:
        for label in OPERATIONS:
            timers = {
                impl: timeit.Timer(label, timer=time.thread_time, globals={"x": x, "np": np})
                for impl, x in arrays.items()
            }
            for timer in timers.values():
                timer.timeit(number)  # warm-up
            gc.disable()
            try:
                for r in range(samples):
                    for impl in rotated(list(timers), r):
                        ns = timers[impl].timeit(number) * 1e9 / number
                        record(results, (f"{OPS_PART}: {label}", OPS_SIZE), impl, round(ns, 1))
            finally:
                gc.enable()
    finally:
        shared.unlink()


# ===================================================================== report


def rows_of(results: Results, reference: Dict[str, str]) -> List[Dict[str, Any]]:
    rows = []
    for (operation, size), by_impl in results.items():
        part = operation.split(":")[0]
        ref = reference.get(part)
        ref_median = statistics.median(by_impl[ref]) if ref in by_impl else None
        for impl, samples in by_impl.items():
            stats = summarize(samples)
            row: Dict[str, Any] = {"operation": operation, "size": size, "implementation": impl, **stats}
            if ref_median:
                row["ratio"] = stats["median"] / ref_median
                row["reference"] = ref
            rows.append(row)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    fmt = "{:<44} {:>7}  {:<42} {:>9}  {:>21} {:>4}  {:>8}"
    print(fmt.format("operation", "size", "implementation", "median", "p25 - p75", "n", "ratio"))
    print("-" * 146)
    for i, row in enumerate(rows):
        first = i == 0 or (row["operation"], row["size"]) != (rows[i - 1]["operation"], rows[i - 1]["size"])
        if first and i:
            print()
        ratio = f"{row['ratio']:.3g}x" if "ratio" in row else ""
        print(
            fmt.format(
                row["operation"] if first else "",
                row["size"] if first else "",
                row["implementation"],
                fmt_ns(row["median"]),
                f"{fmt_ns(row['p25'])} - {fmt_ns(row['p75'])}",
                row["n"],
                ratio,
            )
        )
    print(
        "\nratio = median / median of the row's reference (hand-off: shmem; attach: the standard library;"
        " new array: shmem.empty; SharedArray vs ndarray: ndarray): > 1 is slower than the reference.\n"
    )


def median_of(rows: List[Dict[str, Any]], operation: str, size: str, impl: str) -> Optional[float]:
    for row in rows:
        if (row["operation"], row["size"], row["implementation"]) == (operation, size, impl):
            return float(row["median"])
    return None


def print_goals(rows: List[Dict[str, Any]], ray: Optional[Ray], ray_note: str) -> List[str]:
    lines = []
    handoff = "hand-off: worker sums it"
    for size in sorted({r["size"] for r in rows if r["operation"] == handoff}, key=parse_label):
        ours = median_of(rows, handoff, size, SHMEM)
        pool = median_of(rows, handoff, size, POOL_APPLY)
        theirs = median_of(rows, handoff, size, RAY)
        if ours and pool:
            lines.append(
                f"{size}: shmem is {pool / ours:.0f}x faster than Pool.apply"
                + (f" (goal at 1 GiB: >= 50x, {'met' if pool / ours >= 50 else 'NOT met'})" if size == "1 GiB" else "")
            )
        if ours and theirs:
            lines.append(
                f"{size}: shmem / Ray = {ours / theirs:.2f}"
                + (
                    f" (goal at 1 GiB: <= 1.2, {'met' if ours / theirs <= 1.2 else 'NOT met'})"
                    if size == "1 GiB"
                    else ""
                )
            )
    if ray is None:
        lines.append(f"Ray: {ray_note}")
    else:
        puts = ", ".join(f"{size_label(s)} {fmt_ns(statistics.median(v))}" for s, v in ray.put_ns.items())
        lines.append(f"Ray: ray.init {fmt_ns(ray.init_ns)}; ray.put {puts} (not in the hand-off times)")
    attach = "attach by name, other process"
    sizes = sorted({r["size"] for r in rows if r["operation"] == attach}, key=parse_label)
    if len(sizes) >= 2:
        key = ATTACH_FIRST
        small, large = median_of(rows, attach, sizes[0], key), median_of(rows, attach, sizes[-1], key)
        if small and large:
            lines.append(
                f"attach_array in another process: {sizes[-1]} / {sizes[0]} = {large / small:.2f} "
                "(independent of size: ~1)"
            )
    for size in sizes:
        std = median_of(rows, attach, size, ATTACH_STDLIB)
        first, cached = median_of(rows, attach, size, ATTACH_FIRST), median_of(rows, attach, size, ATTACH_CACHED)
        if std and first and cached:
            lines.append(
                f"{size}: attach_array, first in the process / standard library = {first / std:.2f} "
                f"(goal <= 1.5, {'met' if first / std <= 1.5 else 'NOT met'}); "
                f"block mapped already / standard library = {cached / std:.2f} "
                f"(goal < 1, {'met' if cached < std else 'NOT met'})"
            )
    for label in OPERATIONS:
        operation = f"{OPS_PART}: {label}"
        ours = median_of(rows, operation, OPS_SIZE, "SharedArray")
        theirs = median_of(rows, operation, OPS_SIZE, "ndarray")
        floor = median_of(rows, operation, OPS_SIZE, EMPTY_SUBCLASS)
        if ours and theirs:
            ratio = ours / theirs
            lines.append(
                f"SharedArray {label}: {fmt_ns(ours)} vs ndarray {fmt_ns(theirs)} = {ratio:.2f}x "
                f"(goal <= {OPS_GOAL}x, {'met' if ratio <= OPS_GOAL else 'NOT met'})"
                + (f"; an empty ndarray subclass: {floor / theirs:.2f}x" if floor else "")
            )
    for line in lines:
        print("goal:", line)
    return lines


def parse_label(label: str) -> int:
    number, unit = label.split()
    return int(number) * {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (< 30 s without Ray): 1 MiB and 100 MiB")
    parser.add_argument("--smoke", action="store_true", help="seconds: proves every part runs (used by the tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        help="hand-off and attach sizes (default 1M,100M,1G; --quick 1M,100M)",
    )
    parser.add_argument("--fill-size", type=parse_size, help="size of the fill part (default 1G; --quick 256M)")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out even if it is installed")
    args = parser.parse_args()

    if args.smoke:
        sizes, fill_size, reps, attach_reps, fill_reps = [MiB, 8 * MiB], 16 * MiB, {MiB: (2, 2), 8 * MiB: (2, 1)}, 5, 1
        op_samples, op_number = 5, 200
    elif args.quick:
        sizes, fill_size, attach_reps, fill_reps = [MiB, 100 * MiB], 256 * MiB, 200, 2
        reps = {MiB: (15, 15), 100 * MiB: (5, 3)}
        op_samples, op_number = 41, 2000
    else:
        sizes, fill_size, attach_reps, fill_reps = [MiB, 100 * MiB, GiB], GiB, 500, 5
        reps = {MiB: (41, 41), 100 * MiB: (15, 7), GiB: (9, 3)}
        op_samples, op_number = 101, 5000
    sizes = args.sizes or sizes
    fill_size = args.fill_size or fill_size
    reps = {s: reps.get(s, (5, 3 if s >= GiB else 5)) for s in sizes}

    ray: Optional[Ray] = None
    ray_note = "left out (--no-ray / --smoke)"
    if not (args.no_ray or args.smoke):
        try:
            ray = Ray(store_bytes=max(2 * max(sizes), 512 * MiB))
        except ImportError:
            ray_note = "not installed (pip install ray): its row is skipped"

    print(f"shmem array benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"Python {platform.python_version()}, NumPy {np.__version__}"
        + (f", Ray {ray.ray.__version__}" if ray is not None else "")
        + f" on {platform.platform()}"
    )
    with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
        thp = f.read().strip()
    print(f"os.cpu_count()={os.cpu_count()}, {SHM_DIR} free {shm_free_bytes() / GiB:.1f} GiB, THP for shmem: {thp}\n")

    results: Results = {}
    try:
        run_handoff(sizes, reps, ray, results)
        run_attach(sizes, attach_reps, results)
        run_fill(fill_size, fill_reps, results)
        run_operations(op_samples, op_number, results)
    finally:
        if ray is not None:
            ray.shutdown()
        cleanup()
    rows = rows_of(
        results,
        {
            "hand-off": SHMEM,
            "attach by name, other process": ATTACH_STDLIB,
            "new array": "shmem.empty (fallocate, as now)",
            OPS_PART: "ndarray",
        },
    )
    print_table(rows)
    goals = print_goals(rows, ray, ray_note)
    if args.json:
        meta = {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
            "ray": ray.ray.__version__ if ray is not None else None,
            "thp_shmem": thp,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "goals": goals}, f, indent=1)


if __name__ == "__main__":
    main()
