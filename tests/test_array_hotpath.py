"""A SharedArray costs what an ndarray costs: no shmem code runs on the hot path.

Issue 10: element access, slicing, arithmetic, reductions and in-place ufuncs
on a 1,000-float64 SharedArray cost 3-10x a plain ndarray's, all of it in
shmem's Python-level ``__getitem__``, ``__array_ufunc__``, ``__array_wrap__``
and ``__array_finalize__``. The mapping's lifetime is now kept by the views'
``.base`` chain, results are made plain by NumPy itself, and none of those
runs Python code of shmem's - which is what this checks, exactly (timings
are for ``benchmarks/bench_arrays.py``: its rows hold the 1.2x goal).
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
from typing import Any, Callable, Dict, List

import pytest

import shmem

np = pytest.importorskip("numpy")
array_mappings = pytest.importorskip("shmem._kinds.array_mappings")

# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")

SHMEM_DIR = os.path.dirname(shmem.__file__)

HOT: Dict[str, Callable[[Any], Any]] = {
    "x[5]": lambda x: x[5],
    "x[10:20]": lambda x: x[10:20],
    "x[5] = 1.0": lambda x: x.__setitem__(5, 1.0),
    "x + 1": lambda x: x + 1,
    "x * x": lambda x: x * x,
    "-x": lambda x: -x,
    "x.sum()": lambda x: x.sum(),
    "x.sum(axis=0)": lambda x: x.sum(axis=0),
    "x.max()": lambda x: x.max(),
    "np.sqrt(x)": lambda x: np.sqrt(x),
    "np.add(x, 1, out=x)": lambda x: np.add(x, 1, out=x),
    "x += 1": lambda x: x.__iadd__(1),
    "x.T": lambda x: x.T,
    "x[::-2]": lambda x: x[::-2],
}


def _shmem_frames(call: Callable[[], Any]) -> List[str]:
    """The shmem Python functions entered while ``call`` runs."""
    entered: List[str] = []

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(SHMEM_DIR):
            entered.append(f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)})")

    sys.setprofile(profiler)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.parametrize("op", list(HOT.values()), ids=list(HOT))
def test_no_shmem_code_runs_on_the_hot_path(op: Callable[[Any], Any]) -> None:
    x = shmem.zeros(1000)
    op(x)  # warm
    assert _shmem_frames(lambda: op(x)) == []
    x.unlink()


def test_hot_path_results_are_what_they_were() -> None:
    """Views stay SharedArrays on the block (and pickle as handles); new memory is
    a plain ndarray; scalars are NumPy scalars; ``out=`` gives back the array itself."""
    x = shmem.zeros(1000)
    assert type(x[5]) is np.float64 and type(x.sum()) is np.float64
    for view in (x[10:20], x.T, x[::-2], x[None]):
        assert type(view) is shmem.SharedArray and view.name == x.name
        assert pickle.loads(pickle.dumps(view)).name == x.name
    for new in (x + 1, x * x, -x, np.sqrt(x), x.sum(axis=0, keepdims=True)):
        assert type(new) is np.ndarray
    assert np.add(x, 1, out=x) is x
    same = x
    x += 1
    assert x is same and x[0] == 2.0
    x.unlink()


def test_every_view_keeps_the_mapping_alive(shm_prefix: str) -> None:
    """No per-view bookkeeping: a view of a view of a plain ndarray view still
    keeps the block mapped, and still knows its block."""
    x = shmem.full(1000, 3.0)
    name = x.name
    chain = np.asarray(x)[100:200].view(shmem.SharedArray)[::2]
    del x
    array_mappings.drop_cached_mappings()
    gc.collect()
    assert chain.name == name and float(chain.sum()) == 150.0
    chain.unlink()
    del chain
    gc.collect()
    with open("/proc/self/maps") as f:
        assert not [line for line in f if name in line]
