"""asyncio for shmem's synchronisation primitives: wait in a coroutine, not a thread.

``async with lock:`` works on ``shmem.Lock``, ``shmem.Semaphore`` and
``shmem.BoundedSemaphore`` themselves; these functions add timeouts and
events::

    import shmem, shmem.aio

    async def worker(lock, ready):
        if await shmem.aio.wait(ready, timeout=5):
            async with lock:
                ...
        got = await shmem.aio.acquire(lock, timeout=0.5)

Waiting does not park a thread: the coroutine tries, then sleeps in the event
loop between tries (at most 5 ms apart), so a release is noticed up to 5 ms
late. ``shmem.RLock`` is refused: it belongs to a thread, and every coroutine
of one event loop runs in the same thread, so they would all "own" it.
Condition and Barrier waits are not available here yet.
"""

from __future__ import annotations

from typing import Any, Optional

from ._kinds.event import Event
from ._kinds.lock import Lock, RLock
from ._kinds.semaphore import Semaphore
from ._kinds.sync_async import MAX_DELAY, poll

__all__ = ["MAX_DELAY", "acquire", "wait"]


async def acquire(primitive: Any, timeout: Optional[float] = None) -> bool:
    """Acquire ``primitive`` (a ``shmem.Lock``, ``Semaphore`` or
    ``BoundedSemaphore``), waiting in the event loop.

    Args:
        primitive: What to acquire; release it with its ``release()``.
        timeout: The longest wait in seconds; None waits as long as it takes.

    Returns:
        True once acquired, False when the timeout passed first.

    Raises:
        TypeError: ``primitive`` is not one of those (an ``RLock`` included).
        ValueError: a negative or NaN timeout.
    """
    if isinstance(primitive, RLock) or not isinstance(primitive, (Lock, Semaphore)):
        raise TypeError(
            f"shmem.aio.acquire takes a shmem.Lock, Semaphore or BoundedSemaphore, not {type(primitive).__name__}"
            + (
                " (an RLock belongs to a thread, and an event loop's coroutines share one)"
                if isinstance(primitive, RLock)
                else ""
            )
        )
    return await poll(lambda: bool(primitive.acquire(False)), timeout, f"acquiring {primitive!r}")


async def wait(event: Event, timeout: Optional[float] = None) -> bool:
    """Wait in the event loop until ``event`` (a ``shmem.Event``) is set.

    Returns:
        True when it is set, False when the timeout passed first.

    Raises:
        TypeError: ``event`` is not a ``shmem.Event``.
        ValueError: a negative or NaN timeout.
    """
    if not isinstance(event, Event):
        raise TypeError(f"shmem.aio.wait takes a shmem.Event, not {type(event).__name__}")
    return await poll(event.is_set, timeout, f"waiting for {event!r}")
