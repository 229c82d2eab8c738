"""Lock workers run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Tuple

import shmem

COUNTER = struct.Struct("<q")


def count(lock: Any, counter_name: str, rounds: int) -> None:
    """Add 1 to the counter at offset 0 of block ``counter_name``, ``rounds`` times,
    each as a read, a pause and a write under ``lock``: without mutual exclusion
    updates get lost."""
    shm = shmem.SharedMemory(counter_name)
    buf = shm.buf
    assert buf is not None
    try:
        for i in range(rounds):
            with lock:
                (value,) = COUNTER.unpack_from(buf, 0)
                if i % 64 == 0:
                    time.sleep(0)  # give the others a chance to run into the lock
                COUNTER.pack_into(buf, 0, value + 1)
    finally:
        buf.release()
        shm.close()


def locked_job(lock: Any, value: int) -> Tuple[int, str, int]:
    """A Pool task: take the lock it was given (pickled by name), report who ran it."""
    with lock:
        assert lock.locked()
        return os.getpid(), lock.name, value * 2
