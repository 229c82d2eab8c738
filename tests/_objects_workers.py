"""Workers for test_objects.py: importable by spawned and forkserver processes."""

from __future__ import annotations

import gc
import os
import pickle
import sys
from typing import Any

import shmem

SHM_DIR = "/dev/shm"


class Point:
    """A custom class: an instance pickles by reference to this module."""

    def __init__(self, x: int, y: int, label: str) -> None:
        self.x, self.y, self.label = x, y, label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y, self.label) == (other.x, other.y, other.label)

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y}, {self.label!r})"


def sum_of(ref: Any) -> float:
    """A Pool task: the sum of the array ``ref`` refers to (and its pid)."""
    return float(shmem.get(ref).sum())


def check_sum(ref: Any, expected: float) -> None:
    """A Process target: exit code 0 only if the array sums to ``expected``."""
    got = float(shmem.get(ref).sum())
    if got != expected:
        sys.exit(f"sum {got} != {expected}")


def hold_then_let_go(pickled_ref: bytes, conn: Any) -> None:
    """Unpickle a reference (this process now holds the object), read it, wait for
    the parent to drop its own reference, read it again, then let go."""
    ref = pickle.loads(pickled_ref)
    name = ref.name
    conn.send(("ready", float(shmem.get(ref).sum())))
    assert conn.recv() == "parent dropped"
    again = float(shmem.get(ref).sum())
    exists_before = os.path.exists(f"{SHM_DIR}/{name}")
    del ref
    gc.collect()
    conn.send(("let go", again, exists_before, os.path.exists(f"{SHM_DIR}/{name}")))
    conn.close()


# An impostor's pickle calls this: if it is ever unpickled, the test sees the marker file.
def tripwire(path: str) -> str:
    with open(path, "w") as f:
        f.write("unpickled the impostor")
    return "impostor"


class Tripwire:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (tripwire, (self.path,))
