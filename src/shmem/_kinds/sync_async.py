"""asyncio waits on the synchronisation primitives, without a thread per waiter.

A coroutine that waits for a Lock, a Semaphore's permit or an Event tries the
non-blocking operation, and between tries sleeps with ``asyncio.sleep`` - 0.1 ms
at first, doubling up to ``MAX_DELAY`` - so the event loop runs everything
else meanwhile and no thread is parked per waiter. The price is latency: a
waiter notices a release up to ``MAX_DELAY`` late, and under heavy contention
a thread blocked in ``acquire()`` (woken by the kernel at once) tends to win.
The kernel-level guarantees do not change: a holder's death still hands the
lock on (``owner_died``), a dead holder's permits still come back.

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


def _deadline(loop: asyncio.AbstractEventLoop, timeout: Any, what: str) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what}: timeout must be a non-negative number or None, not {timeout!r}")
    return loop.time() + timeout


async def poll(attempt: Callable[[], bool], timeout: Any, what: str) -> bool:
    """Call ``attempt()`` until it returns True (-> True) or ``timeout`` seconds
    pass (-> False; None: no limit), sleeping in the event loop in between."""
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout, what)
    delay = _FIRST_DELAY
    while True:
        if attempt():
            return True
        now = loop.time()
        if deadline is not None and now >= deadline:
            return False
        await asyncio.sleep(delay if deadline is None else min(delay, deadline - now))
        delay = min(delay * 2, MAX_DELAY)
