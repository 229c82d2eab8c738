"""asyncio waits on the synchronisation primitives, without a thread per waiter.

A coroutine that waits for a Lock, a Semaphore's permit, an Event, a
Condition's notify or a Barrier's other parties tries the non-blocking step
(the one the blocking wait takes after each wake-up), and between tries
sleeps with ``asyncio.sleep`` - 0.1 ms at first, doubling up to
``MAX_DELAY`` - so the event loop runs everything else meanwhile and no
thread is parked per waiter. The price is latency: a waiter notices a
release up to ``MAX_DELAY`` late, and under heavy contention a thread
blocked in ``acquire()`` (woken by the kernel at once) tends to win. The
kernel-level guarantees do not change: a holder's death still hands the lock
on (``owner_died``), a dead holder's permits still come back, a dead
barrier party still breaks the barrier.

Why not the futex itself: a coroutine cannot block in the kernel without a
thread to block in, and one thread multiplexing every waiter's futex word
(``futex_waitv``, Linux >= 5.16) would still need polling for the robust
mutex, whose waiters the kernel only wakes when they announced themselves in
glibc's private protocol. Polling is what is left; it is bounded and cheap.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Optional

#: The longest sleep between two tries.
MAX_DELAY = 0.005
_FIRST_DELAY = 0.0001


def deadline(timeout: Any, what: str) -> Optional[float]:
    """The event loop's time at which a wait of ``timeout`` seconds ends (None: never).

    Raises:
        TypeError: ``timeout`` is not a number or None.
        ValueError: it is negative or NaN (``what`` names the wait in the message).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what}: timeout must be a non-negative number or None, not {timeout!r}")
    return asyncio.get_running_loop().time() + timeout


async def poll(attempt: Callable[[], bool], timeout: Any, what: str) -> bool:
    """Call ``attempt()`` until it returns True (-> True) or ``timeout`` seconds
    pass (-> False; None: no limit), sleeping in the event loop in between."""
    return await poll_until(attempt, deadline(timeout, what))


async def poll_until(attempt: Callable[[], bool], end: Optional[float]) -> bool:
    """``poll`` up to the loop time ``end`` (a ``deadline()``; None: no limit)."""
    loop = asyncio.get_running_loop()
    delay = _FIRST_DELAY
    while True:
        if attempt():
            return True
        now = loop.time()
        if end is not None and now >= end:
            return False
        await asyncio.sleep(delay if end is None else min(delay, end - now))
        delay = min(delay * 2, MAX_DELAY)


def left(end: Optional[float]) -> Optional[float]:
    """Seconds from now to the loop time ``end`` (None: no limit), at least 0."""
    return None if end is None else max(0.0, end - asyncio.get_running_loop().time())
