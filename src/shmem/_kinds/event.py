"""Event: ``threading.Event`` between processes.

``set()``, ``clear()``, ``is_set()``, ``wait(timeout=None)`` (returns the
flag, as threading's does), plus ``name=None``, ``close()`` and pickling by
name (``shmem.Lock``'s rules). The block holds a flag and the futex
sequence word (``sync_layout``); ``set`` changes the flag and bumps the word
under the internal mutex, then wakes every waiter. A waiter keeps nothing
in the block, so one that dies never blocks ``set``; a setter that dies
between its two stores leaves the flag set, and waiters see it within a
slice (they look at the flag after each).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from .sync_block import Primitive
from .sync_layout import TYPE_EVENT, TYPE_NAMES, W_FLAG, W_SEQ
from .sync_wait import Deadline, forever_or_ns


class Event(Primitive):
    """An event between processes: ``threading.Event``'s methods.

    Args:
        name: Every process that asks for this name gets the same event
            (created by whichever comes first). None: a new event, shared by
            passing the object to other processes.

    Raises:
        TypeError: ``name`` is not a str or None.
        ValueError: ``shmem.InvalidName`` for a bad name;
            ``shmem.CorruptSegment`` when ``name`` is a block that is not an
            event, or whose header is damaged or made for another C library.
        OSError: ``shmem.NoSpace`` when /dev/shm is full.
    """

    _TYPES = {TYPE_EVENT: TYPE_NAMES[TYPE_EVENT]}

    def __init__(self, name: Optional[str] = None) -> None:
        self._open(name, TYPE_EVENT, 0, create=True)

    @classmethod
    def _attach(cls, name: str) -> Event:
        event = cls.__new__(cls)
        event._open(name, TYPE_EVENT, 0, create=False)
        return event

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError("cannot pickle a closed Event")
        return (type(self)._attach, (self._block.name,))

    def is_set(self) -> bool:
        """Whether the flag is set (a snapshot)."""
        return bool(self._memory().words[W_FLAG])

    def set(self) -> None:
        """Set the flag and wake every waiter, in every process."""
        mem = self._enter()
        try:
            mem.words[W_FLAG] = 1
            mem.bump()
        finally:
            self._leave()
        mem.wake()

    def clear(self) -> None:
        """Reset the flag: later ``wait()`` calls block until ``set()``."""
        self._enter()
        try:
            self._memory().words[W_FLAG] = 0
        finally:
            self._leave()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the flag is set, or ``timeout`` seconds (None: no limit) have passed.

        Returns:
            The flag: True unless the wait timed out (as ``threading.Event.wait``).

        Raises:
            TypeError, ValueError: ``timeout`` is not a number (or is NaN).
            KeyboardInterrupt: Ctrl-C (or what a signal handler raises) while waiting.
        """
        deadline = Deadline(forever_or_ns(timeout))
        mem = self._memory()
        words = mem.words
        while True:
            seen = words[W_SEQ]
            if words[W_FLAG]:
                return True
            left = deadline.left()
            if left == 0:
                return False
            mem.wait(seen, left)

    def _state(self) -> str:
        return "set" if self.is_set() else "unset"


Event.__module__ = "shmem"
