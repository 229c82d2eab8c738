"""A block this process has mapped already is checked again before it is reused.

``attach_array(name)`` (and unpickling) reuse this process's mapping of a
block - the creator's, or one cached after an attach - only after an O(1)
check that the file behind the name is still that block, whole and unchanged:
same file, same size, same header. Otherwise the block is attached afresh, and
the caller gets exactly what a process that never mapped it would get. Issue
10: the cached mapping was returned unchecked - after a truncation, touching
it killed the process with SIGBUS; a rewritten header was accepted.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import textwrap
from typing import Tuple

import pytest
from _forge import forge_kind_header
from conftest import PYTHON, SHM_DIR

import shmem

np = pytest.importorskip("numpy")
array_layout = pytest.importorskip("shmem._kinds.array_layout")
array_mappings = pytest.importorskip("shmem._kinds.array_mappings")

# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")

# What a process that never mapped the block gets from attach_array (and touching the result).
FRESH = textwrap.dedent(
    """
    import sys, shmem
    try:
        arr = shmem.attach_array(sys.argv[1])
        arr[:] = 2.0
        print("touched", arr.shape)
    except Exception as err:
        print(type(err).__name__, err)
    """
)

# A process that has the block mapped (cached, and with an array alive if told
# to keep one) when it is damaged, then attaches it again and touches the result.
CACHED = textwrap.dedent(
    """
    import gc, sys, shmem
    name, keep = sys.argv[1], sys.argv[2] == "keep"
    first = shmem.attach_array(name)
    first[:] = 1.0
    if not keep:
        del first
        gc.collect()
    print("mapped", flush=True)
    sys.stdin.readline()  # the test damages the block now
    try:
        arr = shmem.attach_array(name)
        arr[:] = 2.0
        print("touched", arr.shape)
    except Exception as err:
        print(type(err).__name__, err)
    """
)


def _fresh_attach(name: str) -> str:
    run = subprocess.run([PYTHON, "-c", FRESH, name], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, (run.returncode, run.stderr)
    return run.stdout.strip()


def _untracked_block(shm_name, shape: Tuple[int, ...] = (100_000,)) -> str:
    """A block nothing in this process maps (so that damaging it cannot hurt this process)."""
    arr = shmem.zeros(shape, track=False, name=shm_name())
    name = arr.name
    del arr
    array_mappings.drop_cached_mappings()
    gc.collect()
    return name


@pytest.mark.parametrize("truncate_to", [4096, 0], ids=["to-one-page", "to-nothing"])
@pytest.mark.parametrize("keep", ["keep", "drop"], ids=["array-alive", "cached-only"])
def test_cached_attach_after_truncation_raises_what_a_fresh_process_gets(shm_name, truncate_to: int, keep: str) -> None:
    name = _untracked_block(shm_name)
    proc = subprocess.Popen(
        [PYTHON, "-c", CACHED, name, keep],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "mapped"
        os.truncate(f"{SHM_DIR}/{name}", truncate_to)  # another process truncates the file
        out, err = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != -signal.SIGBUS, "the cached mapping was reused over a truncated file"
    assert proc.returncode == 0, err
    expected = _fresh_attach(name)
    assert not expected.startswith("touched"), expected
    assert out.strip() == expected
    os.unlink(f"{SHM_DIR}/{name}")  # this test made it


def test_the_creator_checks_its_own_mapping_too() -> None:
    """The creator's mapping is reused by attach_array in the creator: a
    truncated block is refused there too (nothing here touches the old array)."""
    arr = shmem.zeros(100_000)
    name = arr.name
    os.truncate(f"{SHM_DIR}/{name}", 4096)
    with pytest.raises(shmem.CorruptSegment, match="not made by shmem"):
        shmem.attach_array(name)
    with pytest.raises(shmem.CorruptSegment):
        pickle.loads(pickle.dumps(arr[10:20]))
    arr.unlink()
    del arr


def test_cached_attach_after_the_header_was_rewritten_raises_corrupt_segment(shm_name) -> None:
    name = _untracked_block(shm_name, (10,))
    held = shmem.attach_array(name)  # mapped and cached here
    handle = pickle.dumps(held[2:4])
    forge_kind_header(name, b"\x93SHMARR\n" + b"\xff" * 40)  # checksums fixed: only the array header is wrong
    with pytest.raises(shmem.CorruptSegment, match="corrupt array header") as info:
        shmem.attach_array(name)
    assert _fresh_attach(name) == f"CorruptSegment {info.value}"
    with pytest.raises(shmem.CorruptSegment, match="corrupt array header"):
        pickle.loads(handle)
    held[:] = 1.0  # the array mapped before is untouched by all this
    del held
    array_mappings.drop_cached_mappings()
    gc.collect()
    os.unlink(f"{SHM_DIR}/{name}")


def test_cached_attach_sees_a_rewritten_header_as_a_fresh_process_does(shm_name) -> None:
    """A header rewritten to another valid one: the array it now describes,
    not the one this process mapped before."""
    name = _untracked_block(shm_name, (10,))
    assert shmem.attach_array(name).shape == (10,)
    forge_kind_header(name, array_layout.pack("C", (5,), b'"<i8"', 8))
    seen = shmem.attach_array(name)
    assert (seen.shape, seen.dtype) == ((5,), np.dtype("<i8"))
    assert _fresh_attach(name) == "touched (5,)"
    del seen
    array_mappings.drop_cached_mappings()
    gc.collect()
    os.unlink(f"{SHM_DIR}/{name}")


def test_an_unchanged_block_is_reused_not_mapped_again(shm_prefix: str) -> None:
    arr = shmem.zeros(1000)
    seen = [shmem.attach_array(arr.name) for _ in range(3)]
    uses = {id(array_mappings.use_of(s).mapping) for s in [arr, *seen]}
    assert len(uses) == 1
    with open("/proc/self/maps") as f:
        assert sum(arr.name in line for line in f) == 1
    arr.unlink()


CLOSERANGE_ARRAY = r"""
import os, sys
import shmem

arr = shmem.attach_array(sys.argv[1])  # tracked: a lease descriptor holds the users lock
log = sys.argv[2]
os.closerange(3, 65536)  # daemonizing code: every descriptor above stderr goes
with open(log, "w") as f:  # ... and the numbers are reused
    f.write("precious")
    f.flush()
    del arr  # the lease goes: it must not close the log's descriptor
    f.write(" log")
with open(log) as f:
    assert f.read() == "precious log"
again = shmem.attach_array(sys.argv[1])  # attaching works on
assert again[3] == 7
print("ok")
"""


def test_dropping_an_array_after_os_closerange_never_closes_another_file(tmp_path: os.PathLike[str]) -> None:
    arr = shmem.zeros((10,))
    arr[3] = 7
    try:
        done = subprocess.run(
            [PYTHON, "-c", CLOSERANGE_ARRAY, arr.name, str(tmp_path / "app.log")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    finally:
        arr.unlink()
