"""Standard-library defects shmem fixes: shared helpers, and exception parity.

The defects themselves are in ``test_defect_<topic>.py``: each test is
parametrized over shmem and the standard library, whose variant is a strict
xfail - it must fail there. Where the standard library behaves correctly the
test runs on shmem only, or on both without xfail (API parity). Children run
with ``sys.executable``; every block is named with ``shm_name()`` or generated
under the test's prefix.
"""

from __future__ import annotations

import json
import multiprocessing.shared_memory
import os
import subprocess
from typing import Any, Dict

import pytest
from conftest import PYTHON, SHM_DIR, STDLIB_FAILS, blocks_with_prefix

import shmem

STDLIB = multiprocessing.shared_memory
NAME_MAX = os.pathconf(SHM_DIR, "PC_NAME_MAX")


def is_stdlib(impl: Any) -> bool:
    return impl is STDLIB


def stdlib_xfail_if(condition: bool, reason: str = STDLIB_FAILS) -> list:
    """Like ``implementations()``, but the standard library must fail only where ``condition``."""
    return [
        pytest.param(shmem.shared_memory, id="shmem"),
        pytest.param(STDLIB, id="stdlib", marks=pytest.mark.xfail(condition, strict=True, reason=reason)),
    ]


BOTH = [pytest.param(shmem.shared_memory, id="shmem"), pytest.param(STDLIB, id="stdlib")]


def run_child(code: str, *args: str, timeout: float = 120) -> Dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last.

    Asserts it exited normally: a crash (SIGBUS, SIGSEGV) shows as a negative returncode."""
    proc = subprocess.run([PYTHON, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child died with returncode {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def path_of(name: str) -> str:
    return f"{SHM_DIR}/{name}"


def make_foreign_file(path: str, content: bytes) -> None:
    """Stand-in for a block another process made."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ================================================================ parity: exception types


def _attach_missing(impl: Any, name: str) -> None:
    impl.SharedMemory(name)


def _create_existing(impl: Any, name: str) -> None:
    shm = impl.SharedMemory(name, create=True, size=16)
    try:
        impl.SharedMemory(name, create=True, size=16)
    finally:
        shm.close()
        shm.unlink()


def _second_unlink(impl: Any, name: str) -> None:
    shm = impl.SharedMemory(name, create=True, size=16)
    shm.close()
    shm.unlink()
    shm.unlink()


PARITY_CASES = {
    "attach_missing": (_attach_missing, FileNotFoundError),
    "create_existing": (_create_existing, FileExistsError),
    "size_0": (lambda impl, name: impl.SharedMemory(name, create=True, size=0), ValueError),
    "size_negative": (lambda impl, name: impl.SharedMemory(name, create=True, size=-1), ValueError),
    "no_name_no_create": (lambda impl, name: impl.SharedMemory(None), ValueError),
    "second_unlink": (_second_unlink, FileNotFoundError),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("impl", BOTH)
def test_same_exception_types_as_stdlib(impl: Any, case: str, shm_name: Any, shm_prefix: str) -> None:
    action, expected = PARITY_CASES[case]
    with pytest.raises(expected):
        action(impl, shm_name())
    assert blocks_with_prefix(shm_prefix) == []
