"""Condition: ``threading.Condition`` between processes, over a ``shmem.Lock`` or ``shmem.RLock``.

API: ``Condition(lock=None, *, name=None)``, ``wait(timeout=None)``,
``wait_for(predicate, timeout=None)``, ``notify(n=1)``, ``notify_all()``,
``acquire``/``release`` and the context manager (the lock's). Pickled by
name, with its lock.

The block holds the futex sequence word, the number of registered waiters
and the number of wake tokens (``sync_layout``). ``wait`` registers (under
the internal mutex, before releasing the user's lock: a notify after that
release is seen), then sleeps on the sequence word; a waiter that wakes
takes a token if there is one and returns, else sleeps again. ``notify(n)``
adds up to ``n`` tokens (never more than there are waiters), bumps the word
and wakes ``n`` sleepers. A waiter that dies keeps its registration (the
count is never lowered for it): a later waiter may take a token meant for
it - a spurious wake-up, which ``threading`` allows too; use ``wait_for``. A
notifier that dies between its stores leaves waiters to the next notify or
their timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional, Tuple, TypeVar

from . import sync_async
from .lock import Lock, RLock
from .sync_block import Primitive
from .sync_layout import TYPE_CONDITION, TYPE_NAMES, W_SEQ, W_TO_WAKE, W_WAITERS
from .sync_wait import Deadline, block_signals, forever_or_ns, restore_signals

_T = TypeVar("_T")


def _take_back(lock: Any, depth: int) -> None:
    """Take ``lock`` ``depth`` times, as a wait let it go, with signals blocked: a handler
    that raised in between would leave it held fewer times than the caller's ``with``
    releases. What a handler due raises comes after, with the lock held."""
    pending: Optional[BaseException] = None
    while True:
        try:
            mask = block_signals()
            break
        except BaseException as err:  # a handler due raised before the mask changed
            pending = err
    try:
        for _ in range(depth):
            lock.acquire()
    finally:
        restore_signals(mask)
    if pending is not None:
        raise pending


class Condition(Primitive):
    """A condition variable between processes.

    Args:
        lock: A ``shmem.Lock`` or ``shmem.RLock`` (None: a new ``shmem.RLock``).
            Every process must use the condition with the same lock: pass
            both, or the condition (it carries its lock).
        name: Every process that asks for this name gets the same condition
            (created by whichever comes first). None: a new one.

    Raises:
        TypeError: ``lock`` is not a shmem lock; ``name`` not a str or None.
        ValueError: ``shmem.InvalidName`` for a bad name;
            ``shmem.CorruptSegment`` when ``name`` is a block that is not a
            condition, or is damaged.
        OSError: ``shmem.NoSpace`` when /dev/shm is full.
    """

    _TYPES = {TYPE_CONDITION: TYPE_NAMES[TYPE_CONDITION]}
    _lock: Any = None
    _owns_lock = False

    def __init__(self, lock: Optional[Lock] = None, *, name: Optional[str] = None) -> None:
        owned = lock is None
        if lock is None:
            lock = RLock()
        elif not isinstance(lock, Lock):
            raise TypeError(f"a shmem.Condition needs a shmem.Lock or shmem.RLock, not {type(lock).__name__}")
        if lock.name is None:
            raise ValueError("the lock is closed")
        self._open(name, TYPE_CONDITION, 0, create=True)
        self._lock, self._owns_lock = lock, owned

    @classmethod
    def _attach(cls, name: str, lock: Lock) -> Condition:
        cond = cls.__new__(cls)
        cond._open(name, TYPE_CONDITION, 0, create=False)
        cond._lock, cond._owns_lock = lock, True  # the unpickled lock is this handle's alone
        return cond

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError("cannot pickle a closed Condition")
        return (type(self)._attach, (self._block.name, self._lock))

    @property
    def lock(self) -> Lock:
        """The lock the condition uses."""
        return self._lock  # type: ignore[no-any-return]

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        """The lock's ``acquire``."""
        return bool(self._lock.acquire(*args, **kwargs))

    def release(self) -> None:
        """The lock's ``release``."""
        self._lock.release()

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    async def __aenter__(self) -> None:
        """``async with cond``: take its lock waiting in the event loop (a ``shmem.Lock``; an RLock is refused)."""
        await self._lock.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Release the lock, wait for a notify or ``timeout`` seconds, take the lock again.

        An RLock held several times is released fully and taken back as many
        times. Wake-ups may be spurious (threading allows them too): check
        the state, or use ``wait_for``.

        Returns:
            False if the timeout expired, else True.

        Raises:
            RuntimeError: this thread does not hold the lock.
            KeyboardInterrupt: Ctrl-C (or what a signal handler raises), with the lock held again.
        """
        wait_ns = forever_or_ns(timeout)
        lock = self._lock
        if not lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        mem = self._memory()
        words = mem.words
        seen = self._register()
        deadline = Deadline(wait_ns)
        depth = 0
        notified = False
        try:
            mask = block_signals()  # no signal handler (which may raise) between a release and its count
            try:
                while lock._is_owned():
                    lock.release()
                    depth += 1
            finally:
                restore_signals(mask)
            while True:
                left = deadline.left()
                if left == 0:
                    return False
                woken = mem.wait(seen, left)
                if not woken and words[W_SEQ] == seen and not words[W_TO_WAKE]:
                    continue
                notified, seen = self._take_token()
                if notified:
                    return True
        finally:
            try:
                if not notified:
                    self._unregister()
            finally:
                _take_back(lock, depth)

    # The steps of a wait, shared by wait() and shmem.aio.wait_condition(): register, then
    # _take_token() after each wake-up (or poll), then _unregister() unless a token was taken.

    def _register(self) -> int:
        """Count this waiter in (before the user's lock is released: a notify after the release sees it).

        Returns:
            The sequence word, to wait on.
        """
        mem = self._enter()
        try:
            words = mem.words
            words[W_WAITERS] = words[W_WAITERS] + 1
            return int(words[W_SEQ])
        finally:
            self._leave()

    def _take_token(self) -> Tuple[bool, int]:
        """Check once, without waiting: take a wake token if a notify left one.

        Returns:
            (True, _) when taken: this waiter is notified and counted out;
            (False, the sequence word to wait on next) otherwise.
        """
        mem = self._enter()
        try:
            words = mem.words
            if words[W_TO_WAKE]:
                words[W_TO_WAKE] = words[W_TO_WAKE] - 1
                words[W_WAITERS] = max(0, words[W_WAITERS] - 1)
                return True, 0
            return False, int(words[W_SEQ])
        finally:
            self._leave()

    def _unregister(self) -> None:
        """Count out a waiter that took no token (timeout, exception, cancellation)."""
        if self._mem is None:
            return  # closed meanwhile (by another thread): nothing to count out
        mem = self._enter()
        try:
            words = mem.words
            waiters = max(0, words[W_WAITERS] - 1)
            words[W_WAITERS] = waiters
            words[W_TO_WAKE] = min(words[W_TO_WAKE], waiters)
        finally:
            self._leave()

    def wait_for(self, predicate: Callable[[], _T], timeout: Optional[float] = None) -> _T:
        """Wait until ``predicate()`` is true (it is called with the lock held), or the timeout.

        Returns:
            The last value of ``predicate()``.
        """
        deadline = Deadline(forever_or_ns(timeout))
        result = predicate()
        while not result:
            left = deadline.left()
            if left == 0:
                break
            self.wait(None if left < 0 else left / 1e9)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters (in any process). The lock must be held.

        Raises:
            RuntimeError: this thread does not hold the lock.
            TypeError, ValueError: ``n`` is not a non-negative int.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError("n must not be negative")
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        if n == 0:
            return
        mem = self._enter()
        try:
            words = mem.words
            waiters = words[W_WAITERS]
            if not waiters:
                return
            words[W_TO_WAKE] = min(waiters, words[W_TO_WAKE] + n)
            mem.bump()
        finally:
            self._leave()
        mem.wake(min(n, 0x7FFFFFFF))

    def notify_all(self) -> None:
        """Wake every waiter. The lock must be held (RuntimeError otherwise)."""
        self.notify(0x7FFFFFFF)

    def close(self) -> None:
        """Let go of this handle (idempotent), and of its lock if the condition
        made it (``lock=None``) or was unpickled with it; a lock you passed in
        stays open."""
        super().close()
        if self._owns_lock and self._lock is not None:
            self._lock.close()

    def _state(self) -> str:
        return f"waiters={self._memory().words[W_WAITERS]}"


# ------------------------------------------------------------------ asyncio (shmem.aio)


async def wait_async(cond: Condition, timeout: Any = None) -> bool:
    """``Condition.wait`` in a coroutine: register, release the lock, poll for a
    wake token in the event loop, take the lock back (polling) - the same steps.

    Cancelled, it counts itself out, takes the lock back (even when cancelled
    again meanwhile) and then raises ``CancelledError``; a notify it had
    already taken goes on to another waiter (``notify(1)``), as in
    ``asyncio.Condition``.

    Raises:
        TypeError: the condition's lock is an RLock; a timeout not a number.
        ValueError: a negative or NaN timeout; the condition is closed.
        RuntimeError: the lock is not held (by this thread: by any coroutine of this loop).
    """
    lock = cond._lock
    what = f"waiting on {cond!r}"
    if isinstance(lock, RLock):
        raise TypeError(
            "shmem.aio needs a Condition over a shmem.Lock, not an RLock: an RLock belongs to a thread, "
            "and every coroutine of an event loop runs in the same one (they would all own it)"
        )
    end = sync_async.deadline(timeout, what)
    if not lock._is_owned():
        raise RuntimeError("cannot wait on un-acquired lock")
    cond._register()
    notified = False

    def attempt() -> bool:
        nonlocal notified
        notified = cond._take_token()[0]
        return notified

    try:
        lock.release()
        return await sync_async.poll_until(attempt, end)
    finally:
        try:
            if not notified:
                cond._unregister()
        finally:
            cancelled: Optional[BaseException] = None
            while True:  # the lock comes back whatever happens, as with asyncio.Condition
                try:
                    await sync_async.poll_until(lambda: bool(lock.acquire(False)), None)
                    break
                except asyncio.CancelledError as err:
                    cancelled = err
            if cancelled is not None:
                if notified:
                    cond.notify(1)  # a notify this waiter took and will not act on: pass it on
                raise cancelled


async def wait_for_async(cond: Condition, predicate: Callable[[], _T], timeout: Any = None) -> _T:
    """``Condition.wait_for`` in a coroutine (``wait_async`` until ``predicate()`` is true, or the timeout)."""
    end = sync_async.deadline(timeout, f"waiting on {cond!r}")
    result = predicate()
    while not result:
        left = sync_async.left(end)
        if left == 0:
            break
        await wait_async(cond, left)
        result = predicate()
    return result


Condition.__module__ = "shmem"
