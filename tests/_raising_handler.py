"""Run as a script: a SIGALRM handler raises ``Boom`` every 0.3 ms while this (single-threaded)
process calls one shmem primitive after another, each for ``argv[1]`` seconds. Prints one
JSON line: per case, how many calls ended, how many Boom interrupted, and anything else
that came out (the defect) or a signal left blocked afterwards.

A fresh interpreter, so that no thread of a test runner can catch the signal: a process
signal then goes to the main thread, which is the case a critical section written in Python
can make airtight (``sync_wait`` says why a thread catching it for the process differs).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import shmem


class Boom(Exception):
    """What the handler raises."""


armed = [False]


def handler(signum: int, frame: Any) -> None:
    if armed[0]:
        armed[0] = False
        raise Boom


def cases() -> Tuple[Dict[str, Callable[[], Any]], List[Any], int]:
    """The calls, the objects to close, and the pid of a child that holds ``lock``."""
    empty = shmem.Queue(capacity=4096)
    full = shmem.Queue(maxsize=1)
    full.put(1)
    cycled = shmem.Queue()
    big = b"b" * 100_000
    pub = shmem.Broadcast(capacity=1 << 16)
    sub = pub.subscribe()
    lock, rlock = shmem.Lock(), shmem.RLock()
    event, cycled_event = shmem.Event(), shmem.Event()
    none_left, one_left = shmem.Semaphore(0), shmem.Semaphore(1)
    cond = shmem.Condition()
    barrier = shmem.Barrier(2)
    ready_r, ready_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # holds `lock` until killed
        lock.acquire()
        os.write(ready_w, b"x")
        time.sleep(120)
        os._exit(0)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)

    def queue_cycle() -> None:
        cycled.put(("x", 1))
        cycled.get(timeout=5)
        cycled.put(big)
        cycled.get(timeout=5)

    def rlock_cycle() -> None:
        with rlock:
            with rlock:
                pass

    def semaphore_cycle() -> None:
        one_left.acquire(timeout=5)
        one_left.release()

    def condition_wait() -> None:
        with cond:
            cond.wait(0.0005)

    def condition_notify() -> None:
        with cond:
            cond.notify_all()

    def event_cycle() -> None:
        cycled_event.set()
        cycled_event.clear()

    def barrier_wait() -> None:
        barrier.reset()
        barrier.wait(0.0005)

    calls = {
        "Queue.get on an empty queue": lambda: empty.get(timeout=0.0005),
        "Queue.put on a full queue": lambda: full.put(2, timeout=0.0005),
        "Queue.put and get, small and large": queue_cycle,
        "Subscriber.get": lambda: sub.get(timeout=0.0005),
        "Lock.acquire of a held lock": lambda: lock.acquire(timeout=0.0005),
        "RLock taken twice": rlock_cycle,
        "Event.wait": lambda: event.wait(0.0005),
        "Event.set and clear": event_cycle,
        "Semaphore.acquire with no permit": lambda: none_left.acquire(timeout=0.0005),
        "Semaphore.acquire and release": semaphore_cycle,
        "Condition.wait": condition_wait,
        "Condition.notify_all": condition_notify,
        "Barrier.wait": barrier_wait,
    }
    return (
        calls,
        [empty, full, cycled, sub, pub, lock, rlock, event, cycled_event, none_left, one_left, cond, barrier],
        holder,
    )


def main() -> None:
    seconds = float(sys.argv[1])
    signal.signal(signal.SIGALRM, handler)
    calls, objects, holder = cases()
    expected = (queue.Empty, queue.Full, threading.BrokenBarrierError)
    report: Dict[str, Dict[str, Any]] = {}
    for name, call in calls.items():
        ended = booms = masked = 0
        other: Dict[str, int] = {}
        signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                armed[0] = True
                try:
                    call()
                except expected:
                    pass
                armed[0] = False
                ended += 1
            except Boom:
                armed[0] = False
                booms += 1
            except Exception as err:  # the defect: anything but Boom
                armed[0] = False
                key = f"{type(err).__name__}: {err}"[:200]
                other[key] = other.get(key, 0) + 1
            if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
                masked += 1
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        report[name] = {"ended": ended, "booms": booms, "other": other, "left_blocked": masked}
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    # A handler that raised right after a `with` statement's __enter__ took a lock, before the
    # block began, leaves that lock held (Python's own gap, threading's locks have it too):
    # ours to let go here, not shmem's.
    for user_lock in (objects[6], objects[11]._lock):
        while user_lock._is_owned():
            user_lock.release()
    for obj in objects:
        obj.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
