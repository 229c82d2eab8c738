"""Defect 2: close() while NumPy arrays or memoryview slices still use ``buf``."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import implementations
from test_defects import run_child

# ================================================================ 2. close() with live views

VIEWS_CHILD = r"""
import gc, importlib, json, sys
import numpy as np
mod = importlib.import_module(sys.argv[1])
name, kinds = sys.argv[2], sys.argv[3].split(",")
N = 64
out = {"close_error": None}

def mapped():
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "/dev/shm/" + name in line]

def use_views_after_close(shm):
    views = {}
    if "ndarray" in kinds:
        views["ndarray"] = np.ndarray((N,), dtype=np.uint8, buffer=shm.buf)
    if "frombuffer" in kinds:
        views["frombuffer"] = np.frombuffer(shm.buf, dtype=np.uint8)
    if "slice" in kinds:
        views["slice"] = shm.buf[2:5]
    try:
        shm.close()
    except BufferError as err:
        out["close_error"] = repr(err)
    out["read"] = {kind: list(bytes(view)[:3]) for kind, view in views.items()}
    writes = {"ndarray": (10, 210), "frombuffer": (11, 211), "slice": (0, 202)}
    for kind, view in views.items():
        index, value = writes[kind]
        view[index] = value
    out["reread"] = {kind: int(view[writes[kind][0]]) for kind, view in views.items()}
    other = mod.SharedMemory(name)  # the writes reached the shared block
    out["block"] = list(bytes(other.buf[:N]))
    other.close()

shm = mod.SharedMemory(name, create=True, size=N)
shm.buf[:N] = bytes(range(N))
use_views_after_close(shm)
gc.collect()
out["mapped_after_del"] = mapped()
shm.unlink()
print(json.dumps(out))
"""

VIEW_KINDS = ["ndarray", "frombuffer", "slice", "ndarray,frombuffer,slice"]


@pytest.mark.parametrize("kinds", VIEW_KINDS, ids=["ndarray", "frombuffer", "slice", "all"])
@pytest.mark.parametrize("impl", implementations())
def test_close_with_live_views(impl: Any, kinds: str, shm_name: Any) -> None:
    """close() while NumPy arrays / memoryview slices use buf: no BufferError, the
    views keep reading and writing the block (no crash), and the mapping goes
    away once they are deleted."""
    pytest.importorskip("numpy")
    out = run_child(VIEWS_CHILD, impl.__name__, shm_name(), kinds)
    assert out["close_error"] is None
    expected_read = {"ndarray": [0, 1, 2], "frombuffer": [0, 1, 2], "slice": [2, 3, 4]}
    assert out["read"] == {k: expected_read[k] for k in kinds.split(",")}
    written = {"ndarray": (10, 210), "frombuffer": (11, 211), "slice": (2, 202)}
    assert out["reread"] == {k: written[k][1] for k in kinds.split(",")}
    block = list(range(64))
    for k in kinds.split(","):
        block[written[k][0]] = written[k][1]
    assert out["block"] == block
    assert out["mapped_after_del"] == []
