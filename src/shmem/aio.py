"""asyncio for shmem's synchronisation primitives and queues: wait in a coroutine, not a thread.

``async with`` works on ``shmem.Lock``, ``shmem.Semaphore``,
``shmem.BoundedSemaphore`` and a ``shmem.Condition`` over a ``shmem.Lock``
themselves; these functions add timeouts, events, conditions and barriers::

    import shmem, shmem.aio

    async def worker(lock, ready, cond, barrier):
        if await shmem.aio.wait(ready, timeout=5):
            async with lock:
                ...
        got = await shmem.aio.acquire(lock, timeout=0.5)
        async with cond:
            await shmem.aio.wait_condition_for(cond, lambda: ..., timeout=5)
        index = await shmem.aio.wait_barrier(barrier, timeout=5)

    async def consumer(q):  # a shmem.Queue, SimpleQueue or JoinableQueue
        item = await shmem.aio.get(q, timeout=5)
        await shmem.aio.put(q, item)

Waiting does not park a thread: the coroutine tries, then sleeps in the event
loop between tries (at most 5 ms apart), so a release is noticed up to 5 ms
late. ``get`` does better: it sleeps on the queue's ``fileno()``, and an item
wakes it at once. ``shmem.RLock`` is refused (so is a Condition over one): it belongs to
a thread, and every coroutine of one event loop runs in the same thread, so
they would all "own" it.

Cancellation: a cancelled ``acquire`` takes nothing; a cancelled condition
wait counts itself out and takes the lock back before ``CancelledError``
propagates (as ``asyncio.Condition``); a cancelled barrier wait breaks the
barrier, as a timeout does (``asyncio.Barrier`` would let the task leave
instead; here the other parties are processes that must not wait for it).
Timeouts here must be None or non-negative (ValueError otherwise).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Optional, Set, Tuple, TypeVar

from ._kinds import barrier as _barrier
from ._kinds import condition as _condition
from ._kinds.barrier import Barrier
from ._kinds.condition import Condition
from ._kinds.event import Event
from ._kinds.lock import Lock, RLock
from ._kinds.queue import Queue
from ._kinds.semaphore import Semaphore
from ._kinds.sync_async import MAX_DELAY, deadline, left, poll

__all__ = ["MAX_DELAY", "acquire", "get", "put", "wait", "wait_barrier", "wait_condition", "wait_condition_for"]

_T = TypeVar("_T")


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


def _condition_only(cond: Any, function: str) -> None:
    if not isinstance(cond, Condition):
        raise TypeError(f"shmem.aio.{function} takes a shmem.Condition, not {type(cond).__name__}")


async def wait_condition(cond: Condition, timeout: Optional[float] = None) -> bool:
    """``cond.wait(timeout)`` in the event loop: use it inside ``async with cond:``.

    Releases the condition's lock, waits for a ``notify`` (from any process)
    or the timeout, and takes the lock back, polling in the event loop for
    both. Wake-ups may be spurious, as with ``Condition.wait``: check the
    state, or use ``wait_condition_for``.

    If the task is cancelled, the wait counts itself out and takes the lock
    back before ``asyncio.CancelledError`` propagates (a notify it already
    took goes on to another waiter), as ``asyncio.Condition.wait`` does.

    Args:
        cond: A ``shmem.Condition`` whose lock is a ``shmem.Lock``, held.
        timeout: The longest wait in seconds; None waits as long as it takes.

    Returns:
        True when notified, False when the timeout passed first.

    Raises:
        TypeError: ``cond`` is not a ``shmem.Condition``, or its lock is an
            ``RLock`` (it belongs to a thread, and an event loop's
            coroutines share one).
        RuntimeError: the lock is not held.
        ValueError: a negative or NaN timeout.
    """
    _condition_only(cond, "wait_condition")
    return await _condition.wait_async(cond, timeout)


async def wait_condition_for(cond: Condition, predicate: Callable[[], _T], timeout: Optional[float] = None) -> _T:
    """``cond.wait_for(predicate, timeout)`` in the event loop: ``wait_condition``
    until ``predicate()`` (called with the lock held) is true, or the timeout.

    Returns:
        The last value of ``predicate()``.

    Raises:
        TypeError: as ``wait_condition``.
        RuntimeError: the lock is not held.
        ValueError: a negative or NaN timeout.
    """
    _condition_only(cond, "wait_condition_for")
    return await _condition.wait_for_async(cond, predicate, timeout)


async def wait_barrier(barrier: Barrier, timeout: Optional[float] = None) -> int:
    """``barrier.wait(timeout)`` in the event loop: count this party in, then
    wait until all parties (in any process) have arrived.

    The last party to arrive runs the barrier's action, in the event loop's
    thread. A party that dies breaks the barrier (noticed within about 50 ms).
    The timeout breaks it too, as in ``threading``; so does cancelling the task
    once it is counted in (``asyncio.Barrier`` lets a cancelled task leave
    instead: here the others would wait for it in vain).

    Args:
        barrier: A ``shmem.Barrier``.
        timeout: Seconds; None: the barrier's default timeout.

    Returns:
        This party's arrival index, 0 to ``parties - 1``.

    Raises:
        threading.BrokenBarrierError: the barrier is or gets broken
            (``abort()``, ``reset()``, a timeout, a party's death or
            cancellation, an action that raised).
        TypeError: ``barrier`` is not a ``shmem.Barrier``.
        ValueError: a negative or NaN timeout.
    """
    if not isinstance(barrier, Barrier):
        raise TypeError(f"shmem.aio.wait_barrier takes a shmem.Barrier, not {type(barrier).__name__}")
    return await _barrier.wait_async(barrier, timeout)


async def get(q: Queue, timeout: Optional[float] = None) -> Any:
    """``q.get(timeout=timeout)`` in the event loop: the first item of a
    ``shmem.Queue`` (``SimpleQueue``, ``JoinableQueue``), waiting without a thread.

    The coroutine sleeps in the event loop on the queue's ``fileno()`` (a
    readiness pipe its watcher thread keeps: one per queue handle, not per
    waiter), so an item wakes it at once and an idle wait costs no CPU. Any
    number of coroutines of one loop may wait on one queue.

    Raises:
        queue.Empty: nothing came within ``timeout`` seconds.
        TypeError: ``q`` is not a shmem queue.
        ValueError: a negative or NaN timeout, or a closed queue.
    """
    import queue as _stdlib_queue

    if not isinstance(q, Queue):
        raise TypeError(f"shmem.aio.get takes a shmem queue, not {type(q).__name__}")
    end = deadline(timeout, "shmem.aio.get")
    fd = -1
    while True:
        try:
            return Queue.get(q, False)
        except _stdlib_queue.Empty:
            pass
        remaining = left(end)
        if remaining == 0:
            raise _stdlib_queue.Empty
        if fd < 0:
            fd = q.fileno()
            continue  # look once more: the watcher only reports changes from now on
        await _readable(fd, remaining)


# Coroutines waiting for a descriptor to become readable, per (event loop, fd): a loop
# keeps one reader callback per descriptor, so the waiters of one queue share it.
_readers: Dict[Tuple[Any, int], Set[Any]] = {}


async def _readable(fd: int, timeout: Optional[float]) -> None:
    """Wait (at most ``timeout`` seconds) until ``fd`` is readable, or the time is up."""
    loop = asyncio.get_running_loop()
    key = (loop, fd)
    ready = loop.create_future()
    waiters = _readers.get(key)
    if waiters is None:
        waiters = _readers[key] = set()

        def wake_all() -> None:
            for waiter in list(_readers.get(key, ())):
                if not waiter.done():
                    waiter.set_result(None)

        loop.add_reader(fd, wake_all)
    waiters.add(ready)
    try:
        await asyncio.wait_for(ready, timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        waiters.discard(ready)
        if not waiters:
            del _readers[key]
            loop.remove_reader(fd)


async def put(q: Queue, obj: Any, timeout: Optional[float] = None) -> None:
    """``q.put(obj, timeout=timeout)`` in the event loop: waits without a thread
    while the queue is full.

    Raises:
        queue.Full: no room came within ``timeout`` seconds.
        TypeError: ``q`` is not a shmem queue.
        ValueError: a negative or NaN timeout, a closed queue, or an object
            whose pickle is larger than the queue's ring.
    """
    import queue as _stdlib_queue

    if not isinstance(q, Queue):
        raise TypeError(f"shmem.aio.put takes a shmem queue, not {type(q).__name__}")

    def attempt() -> bool:
        try:
            Queue.put(q, obj, False)
        except _stdlib_queue.Full:
            return False
        return True

    if not await poll(attempt, timeout, "shmem.aio.put"):
        raise _stdlib_queue.Full
