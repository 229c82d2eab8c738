#!/usr/bin/env python3
"""Two separately started programs share one array by its name alone.

    python examples/array_by_name.py publish          # prints the name, waits for Enter
    python examples/array_by_name.py read NAME        # in another terminal

``publish`` creates a 1000 x 3 float32 array of (x, y, z) points and keeps it
until Enter; ``read`` attaches it read-only by name - dtype, shape and order
come from the block - and prints what it sees. The block is removed when the
publisher is gone and nobody has it open, however they exit.
"""

from __future__ import annotations

import sys

import numpy as np

import shmem


def publish() -> None:
    points = shmem.zeros((1000, 3), dtype=np.float32)
    points[:, 0] = np.arange(1000)
    points[:, 1] = np.arange(1000) * 2
    points[:, 2] = -1
    print(points.name, flush=True)
    sys.stdin.readline()  # keep the block until told
    print(f"publisher: a reader changed the last point to {points[-1].tolist()}")


def read(name: str) -> None:
    points = shmem.attach_array(name, readonly=True)
    print(f"reader: {points.shape} {points.dtype}, sums {points.sum(axis=0).tolist()}")
    try:
        points[0, 0] = 1
    except ValueError as err:
        print(f"reader: read-only, as asked ({err})")
    shmem.attach_array(name)[-1] = (7, 8, 9)  # a writable attach of the same block


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        publish()
    elif sys.argv[1:2] == ["read"] and len(sys.argv) == 3:
        read(sys.argv[2])
    else:
        sys.exit(__doc__)
