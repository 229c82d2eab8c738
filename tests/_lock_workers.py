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


# The state block of ``kill_rounds``: int64 slots.
A, B, ACQUIRED, DIED, BAD, STOP, BACKWARDS, HUNG, REPAIRED = range(9)
STATE_SIZE = 72


def _critical_section(lock: Any, v: memoryview, died: bool) -> None:
    """Under ``lock``: check the protected pair (A == B unless the previous owner
    died mid-update), repair it, then update it in two steps - a kill between
    them leaves A != B, which the next owner must be told of by ``owner_died``."""
    if v[A] != v[B]:
        if not died:
            v[BAD] += 1  # a half-done update the lock did not announce
        v[REPAIRED] += 1
        v[B] = v[A]  # repaired
    if died:
        v[DIED] += 1
    v[A] += 1
    for _ in range(20):  # a window for the kill between the two halves
        pass
    v[B] += 1


def _holder(lock: Any, v: memoryview) -> None:
    while True:
        with lock:
            _critical_section(lock, v, lock.owner_died)


def _waiter(lock: Any, v: memoryview) -> None:
    last = 0
    while not v[STOP]:
        if not lock.acquire(timeout=10):
            v[HUNG] += 1
            return
        try:
            if v[A] < last:
                v[BACKWARDS] += 1
            _critical_section(lock, v, lock.owner_died)
            last = v[A]
            v[ACQUIRED] += 1
        finally:
            lock.release()
        time.sleep(0.0001)  # let the holder take it most of the time


def kill_rounds(lock_name: str, state_name: str, rounds: int, seed: int) -> None:
    """The prepared parent of ``test_holder_sigkilled_at_random_points``: one
    long-lived waiter, then ``rounds`` short-lived holders forked from here, each
    SIGKILLed after a random delay (0-3 ms: before, in or between its critical
    sections, or while it waits). After each kill, the waiter must acquire the
    lock again within 10 s. Prints a JSON summary; the counts are in the block."""
    import json
    import random
    import signal
    import warnings

    warnings.simplefilter("ignore", shmem.OwnerDiedWarning)
    lock = shmem.Lock(name=lock_name)
    shm = shmem.SharedMemory(state_name)
    assert shm.buf is not None
    v = shm.buf.cast("q")
    rng = random.Random(seed)
    waiter = os.fork()
    if waiter == 0:
        code = 1
        try:
            _waiter(lock, v)
            code = 0
        finally:
            os._exit(code)
    worst = 0
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            try:
                _holder(lock, v)
            finally:
                os._exit(1)
        time.sleep(rng.random() * 0.003)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen, start = v[ACQUIRED], time.monotonic_ns()
        while v[ACQUIRED] == seen:  # the waiter gets the lock after every kill
            if time.monotonic_ns() - start > 10_000_000_000:
                v[HUNG] += 1
                break
            time.sleep(0.00005)
        worst = max(worst, time.monotonic_ns() - start)
        if v[HUNG]:
            break
    v[STOP] = 1
    _, status = os.waitpid(waiter, 0)
    print(json.dumps({"waiter_exit": os.waitstatus_to_exitcode(status), "worst_ns": worst}), flush=True)
    v.release()
    shm.close()
    lock.close()
