"""Shapes and sizes that cannot be: refused at once, before anything is made or iterated.

A shape no array can have is ValueError (as NumPy says it); one that cannot fit
in /dev/shm is NoSpace - before a byte of its contents exists, however large
it is. ``full`` writes its value into the block a bounded piece at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from typing import Any, Callable, Dict, List

import pytest
from conftest import PYTHON

import shmem

np = pytest.importorskip("numpy")
arrays = pytest.importorskip("shmem._kinds.array")

# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")

UNREPRESENTABLE: Dict[str, Callable[[], Any]] = {
    "2**61 float64": lambda: shmem.zeros((2**61,)),  # 2**64 bytes: struct.error before
    "2**40 x 2**40": lambda: shmem.zeros((2**40, 2**40)),
    "full 2**64 items": lambda: shmem.full((2**64,), 1.0),
    "a dimension past int64": lambda: shmem.empty((2**63,), dtype="u1"),
    # NumPy refuses these even though the array is empty: the block must not be made first
    "zero beside huge": lambda: shmem.zeros((0, 2**40, 2**40)),
    "zero beside huge, full": lambda: shmem.full((2**62, 0, 4), 7, dtype="u1"),
    "subarray dtype makes it huge": lambda: shmem.zeros((2**31,), dtype=("<f8", (2**31,))),
    "ten million dimensions": lambda: shmem.zeros(range(1, 10**7)),  # never iterated to the end
}


@pytest.mark.parametrize("call", list(UNREPRESENTABLE.values()), ids=list(UNREPRESENTABLE))
def test_shapes_no_array_can_have_raise_value_error_at_once(call: Callable[[], Any]) -> None:
    started = time.monotonic()
    with pytest.raises((ValueError, OverflowError)) as info:
        call()
    assert time.monotonic() - started < 0.5
    assert "struct" not in type(info.value).__module__
    # the leak guard checks that no block was made


# Run in a child with its address space capped just above what it uses: a call
# that builds its contents (or a list of pieces) in memory fails with
# MemoryError there instead of taking the test machine's memory.
NO_SPACE = textwrap.dedent(
    """
    import json, resource, time
    import numpy as np
    import shmem

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    calls = {
        "full 10**6 x 10**6 float64": lambda: shmem.full((10**6, 10**6), 1.0),
        "full 2**45 uint8": lambda: shmem.full((2**45,), 1, dtype="u1"),
        "zeros 2**45 uint8": lambda: shmem.zeros((2**45,), dtype="u1"),
        "9-byte records, 2**44 of them": lambda: shmem.full((2**40, 16), np.array((1, 2.0), "u1,<f8")),
    }
    shmem.zeros(1).unlink()  # everything imported and warmed up before the cap
    cap = vm_size() + (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = {}
    for label, call in calls.items():
        started = time.monotonic()
        try:
            call()
            outcome = "made"
        except BaseException as err:
            outcome = type(err).__name__
        out[label] = [outcome, time.monotonic() - started]
    print(json.dumps(out))
    """
)


def test_arrays_that_cannot_fit_raise_no_space_at_once_and_build_nothing() -> None:
    """Before: full((10**6, 10**6), 1.0) spent seconds and 1.7 GB before NoSpace,
    full((2**45,), 1, dtype='u1') grew until MemoryError."""
    run = subprocess.run([PYTHON, "-c", NO_SPACE], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    for label, (outcome, seconds) in json.loads(run.stdout).items():
        assert outcome == "NoSpace", (label, outcome)
        assert seconds < 1.0, (label, seconds)


@pytest.mark.parametrize(
    "shape, value, dtype",
    [
        ((2**20 + 3,), 7, "u1"),  # one byte past a whole copy of the pattern
        ((131073,), 2.5, "<f8"),  # 1 MiB + one item
        ((3, 100001), -1, ">i4"),
        ((70001,), np.array((1, 2.0), "u1,<f8"), "u1,<f8"),  # 9-byte records: copies of whole items
        ((1000, 999), 3.0, "<f4"),
        ((5,), b"xyz", "S3"),
    ],
    ids=str,
)
@pytest.mark.parametrize("order", ["C", "F"])
def test_full_fills_every_item_whatever_the_size(shape: Any, value: Any, dtype: Any, order: str) -> None:
    arr = shmem.full(shape, value, dtype=dtype, order=order)
    try:
        np.testing.assert_array_equal(arr, np.full(shape, value, dtype=dtype))
        np.testing.assert_array_equal(shmem.attach_array(arr.name), np.full(shape, value, dtype=dtype))
    finally:
        arr.unlink()


@pytest.mark.usefixtures("python_platform")  # os.pwrite is called, not bypassed in C
def test_full_writes_a_bounded_piece_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MiB of a value: written as copies of one 1 MiB piece, never as one buffer."""
    sizes: List[int] = []
    real_write = os.pwrite

    def recording_write(fd: int, data: Any, offset: int) -> int:
        sizes.append(len(memoryview(data).cast("B")))
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_write)
    arr = shmem.full((8 << 20,), 1.5)
    monkeypatch.undo()
    try:
        assert max(sizes) <= arrays._FILL_CHUNK
        assert sum(sizes) >= arr.nbytes
        assert float(arr.sum()) == 1.5 * (8 << 20)
    finally:
        arr.unlink()
