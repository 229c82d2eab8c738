"""Defect 7: one file descriptor per open block (the standard library holds two)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import implementations
from test_defects import run_child

# ================================================================ 7. file descriptors

FD_CHILD = r"""
import importlib, json, os, sys
mod = importlib.import_module(sys.argv[1])
prefix = os.environ["SHMEM_NAME_PREFIX"]

def open_fds():
    return len(os.listdir("/proc/self/fd"))

warm = mod.SharedMemory(prefix + "warm", create=True, size=16)  # starts the reaper / resource tracker
before = open_fds()
created, attached = [], []
try:
    for i in range(200):
        created.append(mod.SharedMemory(prefix + "c%d" % i, create=True, size=4096))
    for shm in created:
        attached.append(mod.SharedMemory(shm.name))
    after = open_fds()
finally:
    for shm in attached + created + [warm]:
        shm.close()
    for shm in created + [warm]:
        shm.unlink()
print(json.dumps({"handles": len(created) + len(attached), "increase": after - before}))
"""

MANY_BLOCKS_CHILD = r"""
import importlib, inspect, json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4000, 4000))
mod = importlib.import_module(sys.argv[1])
prefix = os.environ["SHMEM_NAME_PREFIX"]
kwargs = {"track": False} if "track" in inspect.signature(mod.SharedMemory).parameters else {}
blocks, error = [], None
try:
    for i in range(3000):
        blocks.append(mod.SharedMemory(prefix + "m%d" % i, create=True, size=1, **kwargs))
        blocks[-1].buf[0] = i % 256
    ok = all(shm.buf[0] == i % 256 for i, shm in enumerate(blocks))
except OSError as err:
    error, ok = repr(err), False
finally:
    for shm in blocks:
        shm.close()
        shm.unlink()
print(json.dumps({"created": len(blocks), "error": error, "ok": ok}))
"""


@pytest.mark.parametrize("impl", implementations())
def test_one_file_descriptor_per_handle(impl: Any) -> None:
    """200 created + 200 attached handles hold at most 400 fds (stdlib: 800)."""
    out = run_child(FD_CHILD, impl.__name__)
    assert out["increase"] <= out["handles"], out


@pytest.mark.parametrize("impl", implementations())
def test_3000_blocks_open_under_a_4000_fd_limit(impl: Any) -> None:
    """stdlib needs two fds per block and hits EMFILE near 2000."""
    out = run_child(MANY_BLOCKS_CHILD, impl.__name__)
    assert out == {"created": 3000, "error": None, "ok": True}


CLOSERANGE_CHILD = r"""
import json, os, sys, tempfile
import shmem
prefix = os.environ["SHMEM_NAME_PREFIX"]
made = shmem.SharedMemory(prefix + "made", create=True, size=4096)
attached = shmem.SharedMemory(made.name)
untracked = shmem.SharedMemory(made.name, track=False)
os.closerange(3, 4096)  # as daemonizing code does, with the blocks mapped
logs = [tempfile.TemporaryFile() for _ in range(32)]  # the freed numbers go to the program's files
for shm in (untracked, attached, made):
    shm.close()
made.unlink()
intact = []
for log in logs:
    try:
        os.fstat(log.fileno())
        intact.append(True)
    except OSError:
        intact.append(False)
print(json.dumps({"intact": all(intact)}))
"""


def test_closing_blocks_after_closerange_never_closes_another_file() -> None:
    """mmap closes the descriptor number it keeps when its mapping goes: after
    os.closerange() that number may be the program's log file. shmem's mappings
    keep none (Python >= 3.13), or are kept mapped rather than close it."""
    assert run_child(CLOSERANGE_CHILD) == {"intact": True}
