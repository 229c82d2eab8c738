"""Semaphore and BoundedSemaphore: ``multiprocessing``'s, and the permits of a dead process come back.

API: ``acquire(block=True, timeout=None)`` (``blocking=`` too),
``release(n=1)``, use as a context manager, ``get_value()``; ``name=None``,
``close()`` and pickling by name as ``shmem.Lock``.

Who holds what: each handle that acquires takes a process slot of the block
(``sync_wait.Slots``: an OFD lock on one byte of the block's file, dropped
by the kernel when the process dies) and the block counts the permits held
through each slot. An acquirer that finds no permit, and a waiter after
each slice, gives back the counts of slots whose lock is free - their
process died - under the internal mutex. A ``release`` by a handle holding
none (a semaphore may be released by anyone) takes the permit off the first
slot that holds one: whoever holds it, it is given back now, not again when
its holder dies. OFD locks are shared by ``fork()``: a child keeps its
parent's slot alive while it lives (it takes a slot of its own for its own
acquisitions).

Two stores change the state (the value, a slot's count): both go through a
journal (``W_J_*``) that the next taker of the mutex replays if the writer
died between them.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from . import lock_layout, sync_async, sync_wait
from .sync_block import Primitive
from .sync_layout import (
    SLOTS,
    TYPE_BOUNDED,
    TYPE_NAMES,
    TYPE_SEMAPHORE,
    VALUE_MAX,
    W_J_COUNT,
    W_J_SLOT,
    W_J_VALID,
    W_J_VALUE,
    W_SEQ,
    W_TABLE,
    W_VALUE,
)
from .sync_wait import MUTEX_OFFSET, WORDS_OFFSET, Deadline, Memory

# The C extension's whole-in-C uncontended acquire and own-slot release (None on the
# pure-Python path, which does the same in the methods below): told the layout once.
_FAST: Any = sync_wait._sync
if _FAST is not None:
    _FAST.sem_layout(
        MUTEX_OFFSET, WORDS_OFFSET, W_SEQ, W_VALUE, W_J_VALID, W_J_SLOT, W_J_VALUE, W_J_COUNT, W_TABLE, SLOTS, VALUE_MAX
    )

_UNSET: Any = object()


def _commit(mem: Memory, value: int, slot: int, count: int) -> None:
    """Set the value and slot ``slot``'s count as one step (under the mutex)."""
    words = mem.words
    words[W_J_VALUE], words[W_J_SLOT], words[W_J_COUNT] = value, slot, count
    words[W_J_VALID] = 1
    words[W_VALUE], words[W_TABLE + slot] = value, count
    words[W_J_VALID] = 0


def _wait_ns(block: bool, timeout: Any) -> int:
    return lock_layout.wait_ns(block, timeout)


class Semaphore(Primitive):
    """A semaphore between processes whose permits come back when their holder dies.

    Args:
        value: The initial number of permits (0 to 2**31 - 1).
        name: Every process that asks for this name gets the same semaphore
            (created by whichever comes first, with its ``value``). None: a
            new semaphore, shared by passing the object to other processes.

    Raises:
        TypeError: ``value`` is not an int, ``name`` not a str or None.
        ValueError: ``value`` is negative (or too large); ``shmem.InvalidName``
            for a bad name; ``shmem.CorruptSegment`` when ``name`` is a block
            that is not this kind of semaphore, or is damaged.
        OSError: ``shmem.NoSpace`` when /dev/shm is full.
    """

    _TYPE = TYPE_SEMAPHORE
    _TYPES = {TYPE_SEMAPHORE: TYPE_NAMES[TYPE_SEMAPHORE]}

    def __init__(self, value: int = 1, *, name: Optional[str] = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a semaphore's value must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        if value > VALUE_MAX:
            raise ValueError(f"semaphore initial value must be at most {VALUE_MAX}")
        self._bound = self._open(name, self._TYPE, value, create=True).value

    @classmethod
    def _attach(cls, name: str) -> Semaphore:
        sem = cls.__new__(cls)
        sem._bound = sem._open(name, cls._TYPE, 0, create=False).value
        return sem

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError(f"cannot pickle a closed {type(self).__name__}")
        return (type(self)._attach, (self._block.name,))

    # ------------------------------------------------------------ the state

    def _repair(self, mem: Memory) -> None:
        words = mem.words
        if words[W_J_VALID]:
            slot = words[W_J_SLOT]
            if slot < SLOTS:
                words[W_VALUE], words[W_TABLE + slot] = words[W_J_VALUE], words[W_J_COUNT]
            words[W_J_VALID] = 0

    def _reclaim(self, mem: Memory) -> int:
        """Give back the permits of dead processes' slots (under the mutex); how many."""
        words, slots = mem.words, self._checker()
        total = 0
        for i, count in enumerate(words[W_TABLE : W_TABLE + SLOTS]):
            if count and not slots.alive(i):
                _commit(mem, min(VALUE_MAX, words[W_VALUE] + count), i, 0)
                total += count
        return total

    def _claimed(self, i: int) -> None:
        mem = self._memory()
        count = mem.words[W_TABLE + i]
        if count:  # left by a dead process that had this slot
            _commit(mem, min(VALUE_MAX, mem.words[W_VALUE] + count), i, 0)
            mem.bump()

    def _try(self, mem: Memory, slot: int, reclaim: bool) -> Tuple[bool, int]:
        """One locked look: take a permit if there is one. (taken, the sequence word seen)."""
        self._enter()
        try:
            words = mem.words
            if reclaim and not words[W_VALUE] and self._reclaim(mem):
                mem.bump()
                woke = True
            else:
                woke = False
            value = words[W_VALUE]
            seen = words[W_SEQ]
            if value:
                _commit(mem, value - 1, slot, min(VALUE_MAX, words[W_TABLE + slot] + 1))
                return True, seen
            return False, seen
        finally:
            self._leave()
            if reclaim and woke:
                mem.wake()

    def acquire(self, block: Any = _UNSET, timeout: Any = None, *, blocking: Any = _UNSET) -> bool:
        """Take a permit, waiting for one if there is none (``block``; ``blocking`` is a synonym).

        Args:
            block: False: return False at once when there is no permit.
            timeout: The longest wait in seconds (None or -1: no limit);
                ignored when not blocking, as in multiprocessing.

        Returns:
            True when a permit was taken.

        Raises:
            ValueError: a negative timeout other than -1, or NaN.
            OSError: all of the block's process slots are taken.
            KeyboardInterrupt: Ctrl-C (or what a signal handler raises) while waiting.
        """
        if _FAST is not None and timeout is None and blocking is _UNSET and self._slots is not None:
            # A permit free and this handle's slot claimed: all in one C call (the same
            # steps as below, under the same mutex); anything else goes the long way.
            own, block_ = self._slots.own(), self._block
            if own >= 0 and block_ is not None and _FAST.sem_take(block_.mapping, own):
                return True
        if blocking is not _UNSET:
            if block is not _UNSET:
                raise TypeError("acquire() got 'block' (or 'blocking') twice")
            block = blocking
        wait = True if block is _UNSET else bool(block)
        deadline = Deadline(_wait_ns(wait, timeout))
        mem = self._memory()
        slot = self._slot(self._claimed)
        taken, seen = self._try(mem, slot, False)
        if taken:
            return True
        taken, seen = self._try(mem, slot, True)  # no permit: any held by the dead?
        while not taken:
            left = deadline.left()
            if not wait or left == 0:
                return False
            woken = mem.wait(seen, left)
            taken, seen = self._try(mem, slot, not woken)  # after a whole slice: look for the dead
        return True

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> None:
        """``async with semaphore``: take a permit waiting in the event loop (``shmem.aio``)."""
        await sync_async.poll(lambda: bool(self.acquire(False)), None, f"acquiring {self!r}")

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self, n: int = 1) -> None:
        """Give back ``n`` permits and wake up to ``n`` waiters.

        Raises:
            TypeError, ValueError: ``n`` is not a positive int.
            ValueError: a BoundedSemaphore would exceed its initial value (nothing is released).
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError("n must be one or more")
        if _FAST is not None and n <= VALUE_MAX and self._slots is not None:
            # Giving back permits this handle's slot holds: one C call (the loop below, its first case).
            own, block_ = self._slots.own(), self._block
            limit = self._bound if self._TYPE == TYPE_BOUNDED else VALUE_MAX
            if own >= 0 and block_ is not None and _FAST.sem_give(block_.mapping, own, n, limit):
                return
        mem = self._enter()
        try:
            words = mem.words
            value = words[W_VALUE]
            if value + n > (self._bound if self._TYPE == TYPE_BOUNDED else VALUE_MAX):
                if self._TYPE == TYPE_BOUNDED:
                    raise ValueError("Semaphore released too many times")
                raise ValueError(f"the semaphore's value would exceed {VALUE_MAX}")
            own = -1 if self._slots is None else self._slots.own()
            left = n
            while left:
                slot = own if own >= 0 and words[W_TABLE + own] else -1
                if slot < 0:
                    slot = next((i for i, c in enumerate(words[W_TABLE : W_TABLE + SLOTS]) if c), -1)
                if slot < 0:  # nobody holds one: a new permit
                    words[W_VALUE] = value + left
                    value += left
                    break
                step = min(left, words[W_TABLE + slot])
                value += step
                _commit(mem, value, slot, words[W_TABLE + slot] - step)
                left -= step
            mem.bump()
        finally:
            self._leave()
        mem.wake(n)

    def get_value(self) -> int:
        """The number of permits free now, after giving back those of dead processes (a snapshot)."""
        mem = self._enter()
        try:
            if self._reclaim(mem):
                mem.bump()
            return int(mem.words[W_VALUE])
        finally:
            self._leave()

    def _state(self) -> str:
        return f"value={self._memory().words[W_VALUE]}"


class BoundedSemaphore(Semaphore):
    """A semaphore whose ``release()`` raises ValueError past its initial value.

    Arguments, errors and death handling as ``shmem.Semaphore``.
    """

    _TYPE = TYPE_BOUNDED
    _TYPES = {TYPE_BOUNDED: TYPE_NAMES[TYPE_BOUNDED]}


Semaphore.__module__ = BoundedSemaphore.__module__ = "shmem"
