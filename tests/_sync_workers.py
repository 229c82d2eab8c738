"""Workers for the Event/Condition/Semaphore/Barrier tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def wait_event(event: Any, timeout: float) -> None:
    if not event.wait(timeout):
        raise SystemExit(3)


def set_event(event: Any) -> None:
    event.set()


def barrier_party(barrier: Any, timeout: float) -> int:
    return int(barrier.wait(timeout))


def barrier_party_exit(barrier: Any, timeout: float) -> None:
    barrier.wait(timeout)


def consume(cond: Any, items_name: str) -> None:
    """Wait under ``cond`` until the first byte of block ``items_name`` is nonzero, then take it."""
    import shmem

    shm = shmem.SharedMemory(items_name)
    buf = shm.buf
    assert buf is not None
    try:
        with cond:
            assert cond.wait_for(lambda: buf[0] > 0, 30)
            buf[0] -= 1
    finally:
        buf.release()
        shm.close()


def hold_and_die(sem: Any, ready: Any, delay: float) -> None:
    sem.acquire()
    ready.set()
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)
