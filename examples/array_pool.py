#!/usr/bin/env python3
"""A parent fills a large array; a pool of workers standardizes it, a slice each, in place.

    python examples/array_pool.py [--mib 256] [--workers 2] [--start-method spawn]

Nothing is copied: each worker receives a handle of a few hundred bytes to its
slice of the parent's array, attaches the same memory, and its writes are the
parent's data. Works with every start method (spawn, fork, forkserver).
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import time

import numpy as np

import shmem


def standardize(rows: shmem.SharedArray) -> int:
    """Runs in a worker: ``rows`` is a view of the parent's array, not a copy."""
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= rows.std(axis=1, keepdims=True)
    return rows.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="size of the array (default 256 MiB)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", default="spawn", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()

    cols = 1024
    rows = args.mib * 2**20 // (8 * cols)
    t0 = time.perf_counter()
    data = shmem.empty((rows, cols))  # a new shared block; the parent fills it
    rng = np.random.default_rng(0)
    for start in range(0, rows, 4096):
        data[start : start + 4096] = rng.normal(5.0, 3.0, size=data[start : start + 4096].shape)
    print(f"parent: filled {data.nbytes / 2**20:.0f} MiB in block {data.name!r} ({time.perf_counter() - t0:.2f} s)")

    step = -(-rows // (4 * args.workers))  # a few slices per worker
    slices = [data[i : i + step] for i in range(0, rows, step)]
    print(f"parent: each of the {len(slices)} slices pickles to {len(pickle.dumps(slices[0]))} bytes")
    t1 = time.perf_counter()
    with multiprocessing.get_context(args.start_method).Pool(args.workers) as pool:
        done = sum(pool.map(standardize, slices))
    print(
        f"workers: standardized {done} rows in place ({time.perf_counter() - t1:.2f} s, "
        f"{args.workers} workers, {args.start_method})"
    )

    means, stds = data.mean(axis=1), data.std(axis=1)  # the parent sees the workers' writes
    assert done == rows and np.allclose(means, 0.0) and np.allclose(stds, 1.0)
    print(f"parent: every row now has mean 0 and std 1 (max |mean| {abs(means).max():.1e})")
    data.unlink()  # the name goes now; the memory with the last array
    print("ok")


if __name__ == "__main__":
    main()
