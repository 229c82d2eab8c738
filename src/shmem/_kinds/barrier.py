"""Barrier: ``threading.Barrier`` between processes; a party that dies breaks it.

API: ``Barrier(parties, action=None, timeout=None, *, name=None)``,
``wait(timeout=None)`` (returns the arrival index, 0 .. parties - 1),
``reset()``, ``abort()``, ``parties``, ``n_waiting``, ``broken``; pickled by
name (with its action and default timeout, which stay per handle).

The block holds the generation number, the count of arrivals in it, the
broken flag, the outcome of recent generations (passed or broken, a ring of
``OUTCOMES``) and, per process slot (``sync_wait.Slots``), how many of its
parties wait in which generation. A waiter sleeps on the sequence word and
after each slice looks for slots with waiting parties in the current
generation whose process died: it then breaks the barrier, and every
waiter gets ``threading.BrokenBarrierError`` within about a slice. The last
party to arrive runs ``action`` (in its process, as threading runs it in one
thread), then opens the barrier; its death during the action breaks it
too. A process that dies inside a state change of the barrier (the internal
mutex reports it) is a dead party: the barrier is broken.
"""

from __future__ import annotations

import asyncio
from threading import BrokenBarrierError
from typing import Any, Callable, Optional, Tuple

from . import sync_async
from .sync_block import Primitive
from .sync_layout import (
    BROKEN,
    OUTCOMES,
    PASSED,
    SLOTS,
    TYPE_BARRIER,
    TYPE_NAMES,
    VALUE_MAX,
    W_BARRIER_SLOTS,
    W_BROKEN,
    W_COUNT,
    W_GEN,
    W_SEQ,
    W_TABLE,
)
from .sync_wait import SLICE_NS, Deadline, Memory, forever_or_ns


class Barrier(Primitive):
    """A barrier for ``parties`` processes (or threads), with ``threading.Barrier``'s API.

    Args:
        parties: How many must call ``wait()`` before all pass (1 or more).
        action: Called by one of them (the last to arrive) before all pass.
        timeout: The default timeout of ``wait()`` in seconds (None: none).
        name: Every process that asks for this name gets the same barrier
            (created by whichever comes first, with its ``parties``). None:
            a new one, shared by passing the object to other processes.

    Raises:
        TypeError: ``parties`` is not an int, ``action`` not callable,
            ``name`` not a str or None.
        ValueError: ``parties`` < 1 (or too large); ``shmem.InvalidName``;
            ``shmem.CorruptSegment`` when ``name`` is a block that is not a
            barrier, or is damaged.
        OSError: ``shmem.NoSpace`` when /dev/shm is full.
    """

    _TYPES = {TYPE_BARRIER: TYPE_NAMES[TYPE_BARRIER]}

    def __init__(
        self,
        parties: int,
        action: Optional[Callable[[], Any]] = None,
        timeout: Optional[float] = None,
        *,
        name: Optional[str] = None,
    ) -> None:
        if isinstance(parties, bool) or not isinstance(parties, int):
            raise TypeError(f"parties must be an int, not {type(parties).__name__}")
        if parties < 1 or parties > VALUE_MAX:
            raise ValueError(f"parties must be between 1 and {VALUE_MAX}")
        if action is not None and not callable(action):
            raise TypeError("action must be callable or None")
        forever_or_ns(timeout)  # checked now
        self._action, self._timeout = action, timeout
        self._parties = self._open(name, TYPE_BARRIER, parties, create=True).value

    @classmethod
    def _attach(cls, name: str, action: Optional[Callable[[], Any]], timeout: Optional[float]) -> Barrier:
        barrier = cls.__new__(cls)
        barrier._action, barrier._timeout = action, timeout
        barrier._parties = barrier._open(name, TYPE_BARRIER, 1, create=False).value
        return barrier

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError("cannot pickle a closed Barrier")
        return (type(self)._attach, (self._block.name, self._action, self._timeout))

    @property
    def parties(self) -> int:
        """The number of parties the barrier waits for."""
        return self._parties

    @property
    def n_waiting(self) -> int:
        """How many parties wait now (0 when broken)."""
        words = self._memory().words
        return 0 if words[W_BROKEN] else min(int(words[W_COUNT]), self._parties)

    @property
    def broken(self) -> bool:
        """Whether the barrier is broken (until ``reset()``)."""
        return bool(self._memory().words[W_BROKEN])

    # ------------------------------------------------------------ under the mutex

    def _repair(self, mem: Memory) -> None:
        self._break(mem)  # a process died inside a change of the barrier: a dead party

    def _break(self, mem: Memory) -> None:
        words = mem.words
        if not words[W_BROKEN]:
            gen = words[W_GEN]
            words[W_TABLE + gen % OUTCOMES] = BROKEN
            words[W_BROKEN] = 1
            words[W_GEN] = (gen + 1) & 0xFFFFFFFF
            words[W_COUNT] = 0
        mem.bump()

    def _pass(self, mem: Memory) -> None:
        words = mem.words
        gen = words[W_GEN]
        words[W_TABLE + gen % OUTCOMES] = PASSED
        words[W_GEN] = (gen + 1) & 0xFFFFFFFF
        words[W_COUNT] = 0
        mem.bump()

    def _claimed(self, i: int) -> None:
        words = self._memory().words
        words[W_BARRIER_SLOTS + 2 * i + 1] = 0  # what a dead owner of the slot left waiting

    def _dead_party(self, mem: Memory) -> bool:
        words, slots = mem.words, self._checker()
        gen = words[W_GEN]
        for i in range(SLOTS):
            at = W_BARRIER_SLOTS + 2 * i
            if words[at + 1] and words[at] == gen and not slots.alive(i):
                return True
        return False

    def _leave_slot(self, mem: Memory, slot: int, gen: int) -> None:
        words, at = mem.words, W_BARRIER_SLOTS + 2 * slot
        if words[at] == gen and words[at + 1]:
            words[at + 1] = words[at + 1] - 1

    # ------------------------------------------------------------ the API

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait until all parties have called ``wait()``, then pass together.

        Args:
            timeout: Seconds (None: the barrier's default). When it expires
                the barrier breaks, as in threading.

        Returns:
            This party's arrival index, 0 to ``parties - 1`` (the last: ``parties - 1``).

        Raises:
            threading.BrokenBarrierError: the barrier is or gets broken
                (``abort()``, ``reset()`` while waiting, a timeout, a party's
                death, an ``action`` that raised).
            KeyboardInterrupt: Ctrl-C (or what a signal handler raises); the barrier breaks.
        """
        deadline = Deadline(forever_or_ns(self._timeout if timeout is None else timeout))
        mem = self._memory()
        slot = self._slot(self._claimed)
        gen = index = -1
        try:
            while gen < 0:  # wait while the last arriver runs the action
                gen, index, seen = self._arrive(mem, slot)
                if gen < 0:
                    self._sleep(mem, seen, deadline)
            if index == self._parties - 1:
                if self._action is not None:
                    self._action()
                if self._let_pass(mem, slot, gen):
                    gen = -1
                    return index
            while True:
                outcome, seen = self._outcome(mem, slot, gen)
                if outcome is not None:
                    gen = -1
                    if outcome != PASSED:
                        raise BrokenBarrierError
                    return index
                self._sleep(mem, seen, deadline)
        except BaseException:
            if gen >= 0:
                self._give_up(mem, slot, gen)
            raise

    def _sleep(self, mem: Memory, seen: int, deadline: Deadline) -> None:
        """One slice; then look for dead parties. Breaks the barrier (and raises) at the deadline."""
        left = deadline.left()
        if left == 0:
            raise BrokenBarrierError  # the caller breaks the barrier
        if mem.wait(seen, left):
            return
        self._look_for_the_dead(mem)

    # The steps of a wait, shared by wait() and shmem.aio.wait_barrier(): _arrive() until it counts
    # this party in; the last one runs the action and calls _let_pass(); the others call _outcome() after
    # each wake-up (or poll), and _look_for_the_dead() after each quiet slice; _give_up() when a
    # counted-in party leaves early (timeout, exception, cancellation): that breaks the barrier.

    def _arrive(self, mem: Memory, slot: int) -> Tuple[int, int, int]:
        """Try once to count this party in (in process slot ``slot``).

        Returns:
            (generation, arrival index, sequence word); generation -1 while the
            last party of the previous round runs the action: try again.

        Raises:
            BrokenBarrierError: the barrier is broken.
        """
        words = mem.words
        self._enter()
        try:
            if words[W_BROKEN]:
                raise BrokenBarrierError
            count = words[W_COUNT]
            seen = int(words[W_SEQ])
            if count >= self._parties:
                return -1, -1, seen
            gen = int(words[W_GEN])
            at = W_BARRIER_SLOTS + 2 * slot
            if words[at] != gen:
                words[at + 1] = 0
                words[at] = gen
            words[at + 1] = words[at + 1] + 1
            words[W_COUNT] = count + 1
            return gen, int(count), seen
        finally:
            self._leave()

    def _let_pass(self, mem: Memory, slot: int, gen: int) -> bool:
        """The last party, after the action: let generation ``gen`` pass. False if it broke meanwhile."""
        words = mem.words
        self._enter()
        try:
            passed = words[W_GEN] == gen and not words[W_BROKEN]
            if passed:
                self._leave_slot(mem, slot, gen)
                self._pass(mem)
        finally:
            self._leave()
        mem.wake()
        return passed

    def _outcome(self, mem: Memory, slot: int, gen: int) -> Tuple[Optional[int], int]:
        """Check once, without waiting, whether generation ``gen`` is over.

        Returns:
            (PASSED or BROKEN, _) once it is (this party has left its slot);
            (None, the sequence word to wait on) while it is not.
        """
        words = mem.words
        self._enter()
        try:
            if words[W_GEN] != gen:
                self._leave_slot(mem, slot, gen)
                return int(words[W_TABLE + gen % OUTCOMES]), 0
            return None, int(words[W_SEQ])
        finally:
            self._leave()

    def _look_for_the_dead(self, mem: Memory) -> None:
        """Break the barrier if a party of the current generation died."""
        self._enter()
        try:
            dead = self._dead_party(mem)
            if dead:
                self._break(mem)
        finally:
            self._leave()
        if dead:
            mem.wake()

    def _give_up(self, mem: Memory, slot: int, gen: int) -> None:
        """A party counted in to ``gen`` leaves before it is over: it breaks the barrier."""
        if self._mem is None:
            return  # closed meanwhile
        words = mem.words
        self._enter()
        try:
            self._leave_slot(mem, slot, gen)
            if words[W_GEN] == gen:
                self._break(mem)
        finally:
            self._leave()
        mem.wake()

    def reset(self) -> None:
        """Return the barrier to its empty, unbroken state; parties waiting get BrokenBarrierError."""
        mem = self._enter()
        try:
            words = mem.words
            if words[W_BROKEN]:
                words[W_BROKEN] = 0
                mem.bump()
            elif words[W_COUNT]:
                self._break(mem)
                words[W_BROKEN] = 0
        finally:
            self._leave()
        mem.wake()

    def abort(self) -> None:
        """Break the barrier: waiting parties, and later ``wait()`` calls until ``reset()``, get BrokenBarrierError."""
        mem = self._enter()
        try:
            self._break(mem)
        finally:
            self._leave()
        mem.wake()

    def _state(self) -> str:
        return f"parties={self._parties} waiting={self.n_waiting}{' broken' if self.broken else ''}"


# ------------------------------------------------------------------ asyncio (shmem.aio)


async def wait_async(barrier: Barrier, timeout: Any = None) -> int:
    """``Barrier.wait`` in a coroutine: the same steps, polled in the event loop.

    Dead parties are looked for every ``SLICE_NS`` (50 ms), as a blocking
    waiter does after each quiet slice. The last party runs the action in the
    event loop's thread. Timed out or cancelled once counted in, the party
    breaks the barrier (as a timeout or Ctrl-C in ``wait()`` does), then raises.

    Raises:
        threading.BrokenBarrierError: as ``Barrier.wait``.
        TypeError, ValueError: a timeout that is not a non-negative number or None.
    """
    if timeout is None and barrier._timeout is not None:
        timeout = max(0.0, barrier._timeout)  # the default, as wait() reads it (negative: no wait)
    end = sync_async.deadline(timeout, f"waiting at {barrier!r}")
    mem = barrier._memory()
    slot = barrier._slot(barrier._claimed)
    loop = asyncio.get_running_loop()
    look_every = SLICE_NS / 1e9
    next_look = loop.time() + look_every
    gen = index = -1
    outcome: Optional[int] = None

    def look() -> None:
        nonlocal next_look
        now = loop.time()
        if now >= next_look:
            next_look = now + look_every
            barrier._look_for_the_dead(mem)

    def arrive() -> bool:
        nonlocal gen, index
        gen, index, _ = barrier._arrive(mem, slot)
        if gen < 0:
            look()
        return gen >= 0

    def over() -> bool:
        nonlocal outcome
        outcome, _ = barrier._outcome(mem, slot, gen)
        if outcome is None:
            look()
        return outcome is not None

    try:
        if not await sync_async.poll_until(arrive, end):
            raise BrokenBarrierError  # not counted in yet: the barrier stays as it is, as in wait()
        if index == barrier._parties - 1:
            if barrier._action is not None:
                barrier._action()
            if barrier._let_pass(mem, slot, gen):
                gen = -1
                return index
        if not await sync_async.poll_until(over, end):
            raise BrokenBarrierError  # the timeout: the handler below breaks the barrier
        gen = -1
        if outcome != PASSED:
            raise BrokenBarrierError
        return index
    except BaseException:
        if gen >= 0:
            barrier._give_up(mem, slot, gen)
        raise


Barrier.__module__ = "shmem"
