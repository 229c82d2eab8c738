"""Functions the array tests run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

import gc
import os
from typing import Any, Dict, List, Tuple

import numpy as np

import shmem


def total(arr: Any) -> float:
    return float(arr.sum())


def describe(arr: Any) -> Dict[str, Any]:
    """What a worker received: a SharedArray on the same block, not a copy."""
    return {
        "type": type(arr).__name__,
        "name": arr.name,
        "shape": arr.shape,
        "strides": arr.strides,
        "dtype": arr.dtype.str,
        "writeable": bool(arr.flags.writeable),
        "data": arr.tobytes(),
    }


def fill(arr: Any, value: Any) -> str:
    """Writes in place through the received view; returns the block's name."""
    arr[...] = value
    return str(arr.name)


def fill_star(args: Tuple[Any, Any]) -> str:
    return fill(*args)


def attach_and_fill(name: str, value: Any) -> None:
    arr = shmem.attach_array(name)
    arr[...] = value


def try_write(arr: Any) -> str:
    try:
        arr[...] = 1
    except ValueError as err:
        return f"ValueError: {err}"
    return "written"


def from_queue(inbox: Any, outbox: Any) -> None:
    """Receives (array, value) pairs on a Queue until None; writes each in place."""
    for arr, value in iter(inbox.get, None):
        arr[...] = value
        outbox.put(arr.name)


def create_and_send(outbox: Any, inbox: Any, shape: Tuple[int, ...]) -> None:
    """Creates an array, sends it to the parent, and exits once the parent
    says it has it: the parent then holds the block alone."""
    arr = shmem.full(shape, 7.0)
    outbox.put(arr)
    inbox.get()


def _held(name: str) -> Tuple[int, int]:
    """This process's mappings and descriptors of block ``name``."""
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith("/dev/shm/" + name)]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # the descriptor listdir used
    return len(maps), sum(f == "/dev/shm/" + name for f in fds)


def mappings_after_receiving(slices: List[Any]) -> Dict[str, Any]:
    """How many mappings and descriptors many received slices of one block
    cost, and how many are left once they are dropped (the mapping stays cached)."""
    name = slices[0].name
    mappings, fds = _held(name)
    total = sum(float(s.sum()) for s in slices)
    del slices[:]
    gc.collect()
    mappings_after, fds_after = _held(name)
    return {"mappings": mappings, "fds": fds, "total": total, "mappings_after": mappings_after, "fds_after": fds_after}


def dtype_round_trip(arr: Any) -> Tuple[str, bytes, bytes]:
    """The received array's dtype and bytes, and the same by name."""
    again = shmem.attach_array(arr.name)
    out = (repr(arr.dtype), arr.tobytes(), again.tobytes())
    del again
    gc.collect()
    return out


def sum_then_drop(arr: Any) -> float:
    result = float(np.asarray(arr).sum())
    del arr
    gc.collect()
    return result
