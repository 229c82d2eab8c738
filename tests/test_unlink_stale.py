"""Defect 5 of issue 9: a stale handle never removes a newer block.

``a`` refers to a block that was removed (by another handle, ``remove_segment``
or another process) and re-created under the same name as ``b``. Then
``a.unlink()`` raises FileNotFoundError - the block it refers to is gone - and
``b``'s block stays, with its data.
"""

from __future__ import annotations

import inspect
import os
import subprocess
from typing import Any, Callable

import pytest
from conftest import PYTHON, SHM_DIR, implementations, wait_until

import shmem


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


def _remove_by_other_handle(name: str) -> None:
    other = shmem.SharedMemory(name)
    other.close()
    other.unlink()


def _remove_by_other_process(name: str) -> None:
    code = "import sys, shmem; s = shmem.SharedMemory(sys.argv[1]); s.close(); s.unlink()"
    subprocess.run([PYTHON, "-c", code, name], check=True, timeout=60)


REMOVERS = {
    "other-handle": _remove_by_other_handle,
    "remove_segment": lambda name: shmem.remove_segment(name, force=True),
    "other-process": _remove_by_other_process,
}


def _raw(name: str, track: bool) -> Any:
    shm = shmem.SharedMemory(name, create=True, size=64, track=track)
    shm.buf[:6] = b"first!"
    return shm


def _list(name: str, track: bool) -> Any:
    return shmem.ShareableList(["first!", 1, 2.5], name=name, track=track)


def _array(name: str, track: bool) -> Any:
    np = pytest.importorskip("numpy")
    arr = shmem.full(8, 7, dtype=np.int64, name=name, track=track)
    return arr


KINDS = {"raw": _raw, "list": _list, "array": _array}


def _close(handle: Any) -> None:
    if isinstance(handle, shmem.SharedMemory):
        handle.close()
    elif isinstance(handle, shmem.ShareableList):
        handle.shm.close()
    # an array's mapping goes with its last reference (and the array cache)


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("remover", list(REMOVERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_stale_handle_unlink_leaves_the_newer_block(
    kind: str, remover: str, track: bool, closed: bool, shm_name: Callable[[], str], request: pytest.FixtureRequest
) -> None:
    if kind == "array":
        request.getfixturevalue("drop_cached_array_mappings")
    name = shm_name()
    stale = KINDS[kind](name, track)
    if closed:
        _close(stale)
    REMOVERS[remover](name)
    assert not _exists(name)
    newer = shmem.SharedMemory(name, create=True, size=32, track=False)
    newer.buf[:6] = b"newer!"
    try:
        with pytest.raises(FileNotFoundError):
            stale.unlink()
        assert _exists(name), "the stale handle removed the newer block"
        check = shmem.SharedMemory(name, track=False)
        assert bytes(check.buf[:6]) == b"newer!" and check.size == 32
        check.close()
    finally:
        _close(stale)
        del stale
        newer.close()
        if _exists(name):
            newer.unlink()


_TRACKED_NEWER = """
import os, sys
import shmem
name = sys.argv[1]
stale = shmem.SharedMemory(name, create=True, size=64)
other = shmem.SharedMemory(name)
other.close()
other.unlink()
newer = shmem.SharedMemory(name, create=True, size=64)
try:
    stale.unlink()
except FileNotFoundError:
    print("FileNotFoundError", flush=True)
else:
    print("removed", flush=True)
os._exit(0)  # no exit handlers: only the reaper can remove `newer` now
"""


def test_stale_unlink_leaves_the_newer_block_tracked(shm_name: Callable[[], str]) -> None:
    """Both blocks tracked by one process: the stale unlink must not untrack the
    newer block either - it is still removed once its creator is gone."""
    name = shm_name()
    done = subprocess.run([PYTHON, "-c", _TRACKED_NEWER, name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FileNotFoundError", "the stale handle removed the newer block"
    assert wait_until(lambda: not _exists(name)), "the newer block was no longer tracked"


def test_unlink_after_the_block_is_gone_raises_and_creates_nothing(shm_name: Callable[[], str]) -> None:
    """The standard library's contract, kept: unlink() of a block already
    removed raises FileNotFoundError (and nothing appears under the name)."""
    name = shm_name()
    shm = shmem.SharedMemory(name, create=True, size=16)
    _remove_by_other_handle(name)
    with pytest.raises(FileNotFoundError):
        shm.unlink()
    assert not _exists(name)
    shm.close()


def test_unlink_of_the_current_block_still_works(shm_name: Callable[[], str]) -> None:
    """Control: the staleness check does not refuse a handle whose block is still published,
    even when another handle to the same block exists."""
    name = shm_name()
    first = shmem.SharedMemory(name, create=True, size=16)
    second = shmem.SharedMemory(name)
    second.close()
    second.unlink()
    assert not _exists(name)
    first.close()


@pytest.mark.parametrize("impl", implementations("it unlinks by name: a stale handle removes the newer block"))
def test_stale_unlink_against_the_standard_library(impl: Any, shm_name: Callable[[], str]) -> None:
    """The same defect, shmem beside the standard library (a strict xfail there)."""
    kwargs = {"track": False} if "track" in inspect.signature(impl.SharedMemory).parameters else {}
    name = shm_name()
    stale = impl.SharedMemory(name, create=True, size=64, **kwargs)
    other = impl.SharedMemory(name, **kwargs)
    other.close()
    other.unlink()
    newer = impl.SharedMemory(name, create=True, size=64, **kwargs)
    newer.buf[:5] = b"newer"
    try:
        with pytest.raises(FileNotFoundError):
            stale.unlink()
        assert _exists(name), "the stale handle's unlink removed the newer block"
    finally:
        stale.close()
        newer.close()
        if _exists(name):
            newer.unlink()
