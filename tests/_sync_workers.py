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


# The state block of ``sem_kill_rounds``: int64 slots.
ACQUIRED, STOP, HUNG, MISSING, DEAD_HELD = range(5)
STATE_SIZE = 40


def _sem_holder(sem: Any, k: int) -> None:
    while True:
        for _ in range(k):
            sem.acquire()
        for _ in range(2000):  # a window for the kill while it holds them
            pass
        sem.release(k)


def _sem_waiter(sem: Any, v: Any) -> None:
    while not v[STOP]:
        if not sem.acquire(timeout=10):
            v[HUNG] += 1
            return
        v[ACQUIRED] += 1
        sem.release()
        time.sleep(0.0001)


def sem_kill_rounds(sem_name: str, state_name: str, permits: int, rounds: int, seed: int) -> None:
    """The prepared parent of ``test_semaphore_holders_sigkilled_at_random_points``: one
    long-lived waiter (acquire one, release it, again), then ``rounds`` short-lived
    holders forked from here, each taking 1 to ``permits`` permits over and over
    and SIGKILLed after a random delay (0-3 ms: before its first acquire, while it
    holds some, in a state change, while it waits). After each kill the waiter
    must acquire again, and this process must get every permit back within 10 s.
    Prints a JSON summary; the counts are in the block."""
    import json
    import random

    import shmem
    from shmem._kinds import sync_layout

    sem = shmem.Semaphore(name=sem_name)
    extra, size = sem._block.header.extra, sync_layout.data_size(sync_layout.TYPE_SEMAPHORE)
    shm = shmem.SharedMemory(state_name)
    assert shm.buf is not None
    v = shm.buf.cast("q")
    rng = random.Random(seed)
    waiter = os.fork()
    if waiter == 0:
        code = 1
        try:
            _sem_waiter(sem, v)
            code = 0
        finally:
            os._exit(code)
    worst = 0
    for _ in range(rounds):
        k = rng.randint(1, permits)
        pid = os.fork()
        if pid == 0:
            try:
                _sem_holder(sem, k)
            finally:
                os._exit(1)
        time.sleep(rng.random() * 0.003)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        now = sync_layout.semaphore_state(extra, bytes(sem._block.mapping[:size]))
        if now is not None and sum(permits for _, permits in now.held) >= 2:  # the waiter holds one at most
            v[DEAD_HELD] += 1  # the kill caught the holder holding permits: they must come back
        seen, start = v[ACQUIRED], time.monotonic_ns()
        while v[ACQUIRED] == seen:  # the waiter goes on after every kill
            if time.monotonic_ns() - start > 10_000_000_000:
                v[HUNG] += 1
                break
            time.sleep(0.00005)
        worst = max(worst, time.monotonic_ns() - start)
        got = 0
        while got < permits and sem.acquire(timeout=10):  # all permits are back (the waiter's in turn)
            got += 1
        if got < permits:
            v[MISSING] += 1
        if got:
            sem.release(got)
        if v[HUNG] or v[MISSING]:
            break
    v[STOP] = 1
    _, status = os.waitpid(waiter, 0)
    value = sem.get_value()
    print(json.dumps({"waiter_exit": os.waitstatus_to_exitcode(status), "worst_ns": worst, "value": value}), flush=True)
    v.release()
    shm.close()
    sem.close()
