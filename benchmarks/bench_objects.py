#!/usr/bin/env python3
"""shmem.put / shmem.get and shmem.ObjectStore against Ray's object store and multiprocessing (issue 14).

Rows, each measured in this run:

* first put in a fresh process, start-up included: a new interpreter (with
  its bytecode cache written, as after ``pip install``) imports shmem, then
  puts a 1 MiB array - the put starts the process tree's reaper. Against
  ``ray.init`` + ``ray.put``. Import and first put are shown apart; the goal
  (<= 10 ms) is checked on their sum. NumPy's import is left out: both sides
  need it.
* put of a large float64 array (1 GiB; --quick 64 MiB) - against ``ray.put``.
  Goal: <= 1x Ray.
* put of that array into a ``shmem.ObjectStore`` (one block for many objects,
  its memory reused from one put to the next): each round drops the previous
  reference first, so the median is of puts into memory already written once;
  the first put (fresh pages) is shown apart. Against ``ray.put`` and
  ``shmem.put``. Goal: <= 1x Ray.
* get of that array in another process (a warm worker, timed there): zero-copy,
  so it must not grow with the size - two sizes are shown. Goal: <= 1 ms. The
  same from a store (goal: <= 1 ms too).
* small objects (a dict of 10 ints): put in this process, get in another, by
  reference through a shmem.Queue, objects/s - against the dict itself through
  multiprocessing.Queue, and Ray put + get by a task. Goal: >= 10x Ray. Its
  pickle is small enough to travel inside the reference, so a store's put
  (shown too) never touches the store. Objects of 2 KiB (a dict of 185
  str -> int) do: ObjectStore.put against shmem.put (a block each) and the
  dict itself through multiprocessing.Queue - the sender keeps its last
  references until the receiver has its own (a reference in flight does not
  keep its object), the queues bounded to match; half as many objects.
* a pandas DataFrame of 100 MB (when pandas is installed): a round trip to a
  warm worker that reads its last row - shmem.put and the reference through
  Pool.apply, the frame itself through Pool.apply (pickled), and Ray put + a
  task; and ObjectStore.put in this process (the worker keeps the store open:
  it was passed to the pool's initializer), the reference through Pool.apply.
  Goals, for shmem.put and for the store each: <= 1x Ray, >= 20x Pool.

Ray is compared when installed (``pip install shmem[bench]``), else its rows
say so. Results are medians of a few rounds on a shared machine: read ratios.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import pickle
import statistics
import subprocess
import sys
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
from _common import GiB, KiB, MiB, fmt_ns, remove_prefixed, shm_free_bytes, size_label

import shmem

now = time.perf_counter_ns
# The run's own block names (shmem.put names its blocks with SHMEM_NAME_PREFIX): cleaned up at the end.
PREFIX = os.environ.get("SHMBENCH_PREFIX") or f"shmbenchobj{os.getpid()}_"
os.environ["SHMBENCH_PREFIX"] = PREFIX
os.environ["SHMEM_NAME_PREFIX"] = PREFIX
SMALL = {f"k{i}": i for i in range(10)}
MEDIUM = {f"key{i:03d}": i for i in range(185)}  # pickled: 2 KiB, beyond INLINE_MAX - in a block, or in the store
WINDOW = 1024  # references the sender of MEDIUM objects keeps (the queue holds at most this many)
_KEPT: List[Any] = []  # a Pool worker's handles on the run's stores (keep_store)

FIRST_PUT = r"""
import sys, time
import numpy as np
arr = np.ones(1 << 17)
t0 = time.perf_counter_ns()
if sys.argv[1] == "shmem":
    import shmem
    t1 = time.perf_counter_ns()
    ref = shmem.put(arr)
else:
    import ray
    t1 = time.perf_counter_ns()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ref = ray.put(arr)
t2 = time.perf_counter_ns()
print(t1 - t0, t2 - t1)
"""


def first_put(which: str) -> Optional[Tuple[float, float]]:
    """(import, first put) in ns, in a new interpreter allowed to write its bytecode cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = subprocess.run([sys.executable, "-c", FIRST_PUT, which], capture_output=True, text=True, timeout=600, env=env)
    if run.returncode != 0:
        print(f"first put ({which}) failed: {run.stderr[-500:]}", file=sys.stderr)
        return None
    imported, put = run.stdout.strip().splitlines()[-1].split()
    return float(imported), float(put)


def timed_get(ref: Any, rounds: int) -> float:
    """In a worker: the median time of shmem.get(ref) plus reading one element (no copy)."""
    samples = []
    for _ in range(rounds):
        t0 = now()
        arr = shmem.get(ref)
        float(arr[-1])
        samples.append(now() - t0)
        del arr
    return float(statistics.median(samples))


def keep_store(store: Any) -> None:
    """A Pool initializer: the store (unpickled here: opened by name) stays open in the worker,
    attached between objects."""
    _KEPT.append(store)


def drop_stores() -> None:
    """A Pool task: close the stores keep_store kept (before the pool ends its workers)."""
    while _KEPT:
        _KEPT.pop().close()


def consume(q: Any, n: int, done: Any, store: Any = None) -> None:
    """Get ``n`` objects (or references to them) from ``q``; ``store``: a store kept open meanwhile."""
    total = 0
    for _ in range(n):
        item = q.get()
        total += len(shmem.get(item) if isinstance(item, shmem.ObjectRef) else item)
    del item
    if store is not None:
        store.close()
    done.put(total)


def size_of(obj: Any) -> int:
    """Ray's task for the small-object row: the worker gets the object, says its size."""
    return len(obj)


def small_rate(ctx: Any, n: int, how: str, obj: Any = SMALL, store: Any = None, window: int = 0) -> float:
    """Objects/s: ``obj`` put here, got in another process. ``how``: "shmem" (shmem.put, the
    reference through a shmem.Queue), "store" (``store.put``, likewise; the receiver keeps the
    store open) or "mp" (the object itself through multiprocessing.Queue). ``window``: the queue
    holds at most that many and the sender keeps its last window + 1 references - when the put
    returns, the receiver has taken all older ones (needed for objects not inline in the reference)."""
    q = ctx.Queue(window) if how == "mp" else shmem.Queue(window)
    done = ctx.Queue()
    worker = ctx.Process(target=consume, args=(q, n, done, store if how == "store" else None))
    worker.start()
    put = shmem.put if how == "shmem" else store.put if how == "store" else None
    kept: Deque[Any] = collections.deque(maxlen=window + 1)
    t0 = now()
    for _ in range(n):
        if put is None:
            q.put(obj)
        elif window:
            ref = put(obj)
            q.put(ref)
            kept.append(ref)
        else:
            q.put(put(obj))
    done.get(timeout=600)
    elapsed = now() - t0
    worker.join()
    kept.clear()
    q.close()
    return n / (elapsed / 1e9)


def read_frame(arg: Any, by_ref: bool) -> float:
    """A worker's task: the frame's last row's first value (the frame comes by reference or itself)."""
    frame = shmem.get(arg) if by_ref else arg
    return float(frame.iat[len(frame) - 1, 0])


def frame_round_trips(pool: Any, frame: Any, rounds: int, ray: Any, store: Any) -> Dict[str, float]:
    """Median ns of a round trip of ``frame`` to the pool's worker (and to a Ray task), each way."""
    want = float(frame.iat[len(frame) - 1, 0])
    times: Dict[str, List[float]] = {"shmem": [], "store": [], "Pool.apply (pickled)": []}
    task = ray.remote(read_frame) if ray is not None else None
    if task is not None:
        times["ray"] = []
    for i in range(rounds + 1):  # the first round warms every path up, untimed
        t0 = now()
        ref = shmem.put(frame)
        assert pool.apply(read_frame, (ref, True)) == want
        del ref
        t1 = now()
        assert pool.apply(read_frame, (frame, False)) == want
        t2 = now()
        ref = store.put(frame)  # into the memory the previous round's frame had
        assert pool.apply(read_frame, (ref, True)) == want
        del ref
        t3 = now()
        if i:
            times["shmem"].append(t1 - t0)
            times["Pool.apply (pickled)"].append(t2 - t1)
            times["store"].append(t3 - t2)
        if task is not None:
            t0 = now()
            assert ray.get(task.remote(ray.put(frame), False)) == want
            if i:
                times["ray"].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round, no Ray: that it runs")
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    big = 4 * MiB if args.smoke else 64 * MiB if args.quick else GiB
    small_n = 500 if args.smoke else 20_000 if args.quick else 100_000
    rounds = 1 if args.smoke else 3 if args.quick else 5
    try:
        if args.smoke:
            raise ImportError("not in a smoke run")
        import ray  # noqa: F401 - optional
    except ImportError:
        ray = None
    rows: Dict[str, Any] = {}
    goals: List[str] = []
    notes: List[str] = []

    first_put("shmem")  # untimed: writes the bytecode cache, as pip install does
    ours = [x for x in (first_put("shmem") for _ in range(rounds)) if x is not None]
    imported = statistics.median(x[0] for x in ours)
    put_first = statistics.median(x[1] for x in ours)
    rows["fresh process: import shmem"] = {"shmem": imported}
    rows["fresh process: first put (starts the reaper)"] = {"shmem": put_first}
    if ray is not None:
        theirs = first_put("ray")
        if theirs is not None:
            rows["fresh process: import shmem"]["ray (import ray)"] = theirs[0]
            rows["fresh process: first put (starts the reaper)"]["ray (ray.init + ray.put)"] = theirs[1]
    first = imported + put_first
    goals.append(
        f"first put in a fresh process, start-up included, <= 10 ms: import {fmt_ns(imported)} + put "
        f"{fmt_ns(put_first)} = {fmt_ns(first)} -> {'met' if first <= 10e6 else 'NOT met'}"
    )

    if shm_free_bytes() < 4 * big:  # a block, a store and Ray's copy at once, and room to spare
        big = 64 * MiB
    arr = np.ones(big // 8)
    puts = []
    for _ in range(rounds):
        t0 = now()
        ref = shmem.put(arr)
        puts.append(now() - t0)
        del ref
    rows[f"put {size_label(big)}"] = {"shmem": statistics.median(puts)}
    ray_put: Optional[float] = None
    if ray is not None:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        samples = []
        for _ in range(rounds):
            t0 = now()
            r = ray.put(arr)
            samples.append(now() - t0)
            del r
        ray_put = statistics.median(samples)
        rows[f"put {size_label(big)}"]["ray"] = ray_put
        ratio = rows[f"put {size_label(big)}"]["shmem"] / ray_put
        goals.append(f"put of {size_label(big)} <= 1x Ray: {ratio:.2f}x -> {'met' if ratio <= 1 else 'NOT met'}")
    else:
        goals.append(f"put of {size_label(big)} <= 1x Ray: Ray not installed, not measured")

    # One store for the big array and, beside it, the 1 MiB one of the get rows.
    store = shmem.ObjectStore(capacity=big + 4 * MiB)
    puts = []
    for _ in range(rounds + 1):  # the first put writes fresh pages: shown apart
        t0 = now()
        ref = store.put(arr)
        puts.append(now() - t0)
        del ref  # the last reference: its memory is the next put's
    store_put = statistics.median(puts[1:])
    rows[f"store put {size_label(big)}"] = {
        "store (memory reused)": store_put,
        "store, first put (fresh pages)": puts[0],
    }
    notes.append(
        f"store put of {size_label(big)} vs shmem.put: {store_put / rows[f'put {size_label(big)}']['shmem']:.2f}x"
    )
    if ray_put is not None:
        ratio = store_put / ray_put
        goals.append(f"store put of {size_label(big)} <= 1x Ray: {ratio:.2f}x -> {'met' if ratio <= 1 else 'NOT met'}")
    else:
        goals.append(f"store put of {size_label(big)} <= 1x Ray: Ray not installed, not measured")

    ctx = multiprocessing.get_context("spawn")
    get_rounds = 5 if args.smoke else 50 if args.quick else 200
    with ctx.Pool(1) as pool:
        gets = {}
        for size in (MiB, big):
            ref = shmem.put(np.ones(size // 8))
            gets[size] = pool.apply(timed_get, (ref, get_rounds))
            del ref
        rows["get in another process"] = {size_label(s): t for s, t in gets.items()}
        store_gets = {}
        for size in (MiB, big):
            ref = store.put(arr if size == big else np.ones(size // 8))
            store_gets[size] = pool.apply(timed_get, (ref, get_rounds))
            del ref
        rows["store get in another process"] = {size_label(s): t for s, t in store_gets.items()}
    store.close()  # the worker has let go (or was ended with the pool): the store goes
    for what, found in (("", gets), ("store ", store_gets)):
        goals.append(
            f"{what}get in another process <= 1 ms at every size: "
            + ", ".join(f"{size_label(s)} {fmt_ns(t)}" for s, t in found.items())
            + f" -> {'met' if max(found.values()) <= 1e6 else 'NOT met'}"
        )
    del arr

    # Small objects through a store too: SMALL travels inside its reference, MEDIUM in the store.
    store = shmem.ObjectStore(capacity=16 * MiB)
    by_ref = statistics.median([small_rate(ctx, small_n, "shmem") for _ in range(rounds)])
    mp_rate = statistics.median([small_rate(ctx, small_n, "mp") for _ in range(rounds)])
    in_store = statistics.median([small_rate(ctx, small_n, "store", store=store) for _ in range(rounds)])
    rows["small objects/s, put here + get there"] = {
        "shmem": by_ref,
        "multiprocessing.Queue (the dict itself)": mp_rate,
        "store (inline in the reference)": in_store,
    }
    medium_label = f"{size_label(len(pickle.dumps(MEDIUM, 5)) // KiB * KiB)} objects/s, put here + get there"
    medium_n = small_n // 2  # slower than the inline ones: fewer, for the run's time
    medium = {
        how: statistics.median([small_rate(ctx, medium_n, how, MEDIUM, store, WINDOW) for _ in range(rounds)])
        for how in ("store", "shmem", "mp")
    }
    rows[medium_label] = {
        "store": medium["store"],
        "shmem": medium["shmem"],
        "multiprocessing.Queue (the dict itself)": medium["mp"],
    }
    notes.append(
        f"{medium_label.split(' objects')[0]} objects, store vs shmem.put: {medium['store'] / medium['shmem']:.2f}x"
    )
    store.close()
    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is not None:
        columns = 1 if args.smoke else 10
        rows_n = (1 << 12) if args.smoke else (100 * MiB) // (8 * columns)
        frame = pandas.DataFrame({f"c{i}": np.arange(rows_n, dtype=np.float64) for i in range(columns)})
        label = f"DataFrame {size_label(rows_n * 8 * columns)} round trip"
        # Room for two frames: the worker may still hold the last round's when the next is put.
        store = shmem.ObjectStore(capacity=2 * rows_n * 8 * columns + 16 * MiB)
        with ctx.Pool(1, initializer=keep_store, initargs=(store,)) as pool:
            rows[label] = frame_round_trips(pool, frame, rounds, ray, store)
            pool.apply(drop_stores)
        store.close()
        del frame
        trip = rows[label]
        for what, key in (("", "shmem"), ("store ", "store")):
            vs_pool = trip["Pool.apply (pickled)"] / trip[key]
            met = "met" if vs_pool >= 20 else "NOT met"
            goals.append(f"DataFrame {what}round trip >= 20x Pool.apply: {vs_pool:.1f}x -> {met}")
            if "ray" in trip:
                vs_ray = trip[key] / trip["ray"]
                goals.append(
                    f"DataFrame {what}round trip <= 1x Ray: {vs_ray:.2f}x -> {'met' if vs_ray <= 1 else 'NOT met'}"
                )
    else:
        goals.append("DataFrame round trip: pandas not installed, not measured")

    if ray is not None:
        get_len = ray.remote(size_of)
        t0 = now()
        for _ in range(small_n // 10):
            ray.get(get_len.remote(ray.put(SMALL)))
        ray_rate = (small_n // 10) / ((now() - t0) / 1e9)
        rows["small objects/s, put here + get there"]["ray"] = ray_rate
        goals.append(
            f"small objects >= 10x Ray: {by_ref / ray_rate:.1f}x -> {'met' if by_ref >= 10 * ray_rate else 'NOT met'}"
        )
        ray.shutdown()
    else:
        goals.append("small objects >= 10x Ray: Ray not installed, not measured")

    for title, row in rows.items():
        cells = ", ".join(
            f"{k}: {fmt_ns(v) if 'objects/s' not in title else f'{v:,.0f}/s'}" for k, v in row.items() if v
        )
        print(f"{title:40} {cells}")
    print(f"small objects vs multiprocessing.Queue of the dict itself: {by_ref / mp_rate:.2f}x")
    for line in notes:
        print(line)
    for line in goals:
        print("goal:", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "goals": goals, "notes": notes}, f, indent=1)
    # shmem.put keeps this process's first default store (objects up to 64 KiB) while it runs:
    # let go of it, so that what remains under our prefix is a leftover of a crash.
    from shmem._kinds.objects import _drop_default_stores

    _drop_default_stores()
    remove_prefixed(PREFIX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
