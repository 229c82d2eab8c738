"""Helpers for the core's crash, signal and reaper tests, run in child processes.

Importable under spawn and forkserver (Pool workers), and from the scripts the
tests run with ``python -c`` (``script()`` puts this directory on their path).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from typing import Any, List, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def script(code: str) -> List[str]:
    """argv that runs ``code`` (dedented) in a fresh interpreter that can import this module."""
    prelude = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(code)]


# Attaches (tracked) the blocks named in argv, says "held", waits on stdin. Run as
# ``python -c HOLDER NAME...``; Ctrl-C kills it outright.
HOLDER = """
import signal, sys
import shmem
signal.signal(signal.SIGINT, signal.SIG_DFL)
held = [shmem.SharedMemory(name) for name in sys.argv[1:]]
print("held", flush=True)
sys.stdin.readline()
"""


def say(**record: Any) -> None:
    """One JSON line on stdout: how a child reports to its test."""
    print(json.dumps(record), flush=True)


def reaper_pid() -> Optional[int]:
    from shmem._core import tracking

    return tracking.reaper_pid()


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return True
    return raw[raw.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` (our child or not) has exited; reap it if it is our child."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if gone(pid):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still runs after {timeout} s")
        time.sleep(0.01)


# ------------------------------------------------------------ Pool workers

_barrier: Any = None
_kept: List[Any] = []


def init_pool_worker(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def create_tracked_and_report(prefix: str, index: int) -> tuple[int, str, Optional[int]]:
    """Create a tracked block and keep it until this worker exits; report
    (worker pid, block name, the reaper this worker uses).

    Every worker waits at the barrier first, so each of the pool's workers runs
    exactly one of these calls (with chunksize=1)."""
    from shmem import SharedMemory

    _barrier.wait(60)
    shm = SharedMemory(f"{prefix}pool{index}", create=True, size=4096)
    _kept.append(shm)
    return os.getpid(), shm.name, reaper_pid()
