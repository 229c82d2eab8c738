"""Shared test fixtures.

Every test runs under a unique name prefix (``SHMEM_NAME_PREFIX`` in the
environment, inherited by subprocesses, so even generated names carry it).
After the test, the guard waits briefly for reapers to finish, then *fails*
the test if a block with its prefix is left in /dev/shm or still mapped in
this process - and removes those blocks, which the test made by construction.
Nothing else in /dev/shm is ever touched: other programs use it.

Tests that create blocks with the standard library must name them with
``shm_name()`` (the standard library ignores the prefix variable).
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.shared_memory
import os
import secrets
import sys
import time
from typing import Callable, Iterator, List

import pytest

import shmem

SHM_DIR = "/dev/shm"
_counter = itertools.count()
_RUN = secrets.token_hex(2)

#: How long the guard waits for a reaper to remove blocks of processes that exited.
REAP_WAIT = 5.0


def blocks_with_prefix(prefix: str) -> List[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def mapped_with_prefix(prefix: str) -> List[str]:
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if f"{SHM_DIR}/{prefix}" in line]


def wait_until(predicate: Callable[[], bool], timeout: float = REAP_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(autouse=True)
def shm_prefix(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The unique name prefix of this test; guards against leaked blocks and mappings."""
    prefix = f"shmt{_RUN}_{os.getpid()}_{next(_counter)}_"
    monkeypatch.setenv(shmem._core.names.PREFIX_ENV, prefix)
    yield prefix
    gc.collect()
    expected_failure = request.node.get_closest_marker("xfail") is not None
    wait_until(lambda: not blocks_with_prefix(prefix))
    leaked = blocks_with_prefix(prefix)
    mapped = mapped_with_prefix(prefix)
    for name in leaked:
        os.unlink(f"{SHM_DIR}/{name}")
    if (leaked or mapped) and not expected_failure:
        pytest.fail(f"test leaked blocks {leaked} / mappings {mapped}")


@pytest.fixture
def shm_name(shm_prefix: str) -> Callable[[], str]:
    """Call it for a fresh block name under this test's prefix."""
    counter = itertools.count()
    return lambda: f"{shm_prefix}{next(counter)}"


@pytest.fixture
def drop_cached_array_mappings() -> Iterator[None]:
    """shmem keeps recently used array blocks mapped (by design, across tests):
    drop that cache after the test, before the leak guard looks at /proc/self/maps."""
    yield
    from shmem._kinds import array as _array  # needs NumPy: only array tests use this fixture

    _array._forget_all()
    gc.collect()


STDLIB_FAILS = "the standard library has this defect"


def implementations(reason: str = STDLIB_FAILS) -> list:
    """Parametrize a test over shmem and the standard library; the standard
    library variant is a strict xfail, so the test must fail on it - proof that
    the test can fail, and that it checks a defect shmem fixes."""
    return [
        pytest.param(shmem.shared_memory, id="shmem"),
        pytest.param(
            multiprocessing.shared_memory,
            id="stdlib",
            marks=pytest.mark.xfail(strict=True, reason=reason),
        ),
    ]


START_METHODS = [m for m in ("spawn", "fork", "forkserver") if m in multiprocessing.get_all_start_methods()]


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(request.param)


PYTHON = sys.executable


def run_to_completion(processes: List[multiprocessing.process.BaseProcess], timeout: float = 60) -> None:
    """Start every process, wait for all of them, and require that each exited with 0."""
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
