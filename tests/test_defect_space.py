"""Defect 1: a full /dev/shm. Creation reserves the memory, so a block that does
not fit raises ENOSPC at creation and leaves nothing; a created block can be
written entirely without SIGBUS (CPython gh-114390). Runs in a private mount
namespace with a 1 MiB tmpfs on /dev/shm."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from typing import Any, Dict

import pytest
from conftest import PYTHON, implementations
from test_defects import is_stdlib

# ================================================================ 1. full /dev/shm

_PRIVATE_SHM = 'mount -t tmpfs -o size=1M tmpfs /dev/shm && code="$1" && shift && exec "$0" -c "$code" "$@"'


@pytest.fixture(scope="module")
def private_shm_available() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a private tmpfs")
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not available")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /dev/shm"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs: {probe.stderr.decode(errors='replace')}")


def run_in_private_shm(code: str, *args: str) -> Dict[str, Any]:
    """Run ``code`` in a child whose /dev/shm is a fresh, private 1 MiB tmpfs."""
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", _PRIVATE_SHM, PYTHON, code, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"child died with returncode {proc.returncode} (-7 is SIGBUS)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


FULL_SHM_CHILD = r"""
import importlib, json, os, resource, sys, types
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
mod = importlib.import_module(sys.argv[1])
case, name = sys.argv[2], sys.argv[3]
KiB = 1024
out = {}

def entries():  # everything, hidden temporary files included
    return sorted(os.listdir("/dev/shm"))

def all_space_free():
    st = os.statvfs("/dev/shm")
    return st.f_bfree == st.f_blocks

def create(name, size):
    try:
        return mod.SharedMemory(name, create=True, size=size), None
    except OSError as err:
        return None, [type(err).__name__, err.errno]

if case in ("too_big", "kernel_refuses"):
    real_statvfs = os.statvfs
    if case == "kernel_refuses":
        # Claim plenty of room, so that it is posix_fallocate itself that fails.
        os.statvfs = lambda path: types.SimpleNamespace(f_bavail=1 << 40, f_frsize=4096, f_bsize=4096)
    shm, out["error"] = create(name, 2048 * KiB)
    os.statvfs = real_statvfs
    out["left"] = entries()
    out["all_space_free"] = all_space_free()
    if shm is not None:
        shm.close()
        shm.unlink()
else:  # two_blocks: the first fits, the second does not
    first, err = create(name + "_1", 600 * KiB)
    assert err is None, err
    first.buf[:] = b"\x01" * len(first.buf)
    second, out["error"] = create(name + "_2", 600 * KiB)
    if second is not None:
        second.buf[:] = b"\x02" * len(second.buf)  # the standard library dies here: SIGBUS
        second.close()
        second.unlink()
    out["left"] = entries()
    out["first_intact"] = bytes(first.buf) == b"\x01" * len(first.buf)
    first.close()
    first.unlink()
    out["left_at_end"] = entries()
print(json.dumps(out))
"""


@pytest.mark.parametrize("case", ["too_big", "kernel_refuses"])
@pytest.mark.parametrize("impl", implementations())
def test_block_that_does_not_fit_raises_enospc_and_leaves_nothing(
    impl: Any, case: str, shm_name: Any, private_shm_available: None
) -> None:
    """2 MiB in a 1 MiB /dev/shm: ENOSPC at creation, no file (hidden ones
    included), no space kept. ``kernel_refuses`` bypasses shmem's free-space
    pre-check, so the kernel's fallocate is what fails."""
    out = run_in_private_shm(FULL_SHM_CHILD, impl.__name__, case, shm_name())
    assert out["error"] is not None, "creation of a block that cannot fit succeeded"
    assert out["error"][1] == errno.ENOSPC
    if not is_stdlib(impl):
        assert out["error"][0] == "NoSpace"
    assert out["left"] == []
    assert out["all_space_free"]


@pytest.mark.parametrize("impl", implementations())
def test_writing_every_byte_of_a_created_block_never_sigbus(
    impl: Any, shm_name: Any, private_shm_available: None
) -> None:
    """gh-114390: the stdlib's second 600 KiB block is created sparse and writing
    it kills the process with SIGBUS; shmem refuses the second block with ENOSPC."""
    name = shm_name()
    out = run_in_private_shm(FULL_SHM_CHILD, impl.__name__, "two_blocks", name)
    assert out["error"] == ["NoSpace", errno.ENOSPC]
    assert out["left"] == [name + "_1"]
    assert out["first_intact"]
    assert out["left_at_end"] == []
