"""One publisher, any number of subscribers, through one shared memory block:
``shmem.Broadcast`` and ``shmem.Subscriber``.

A broadcast is a ring of numbered records in one block (``broadcast_layout``
draws it), written and read in place under a robust mutex, as a queue's:

* ``publish`` pickles the object and copies it into the ring, dropping the
  oldest records when the ring is full: the publisher never waits for a
  subscriber (it only takes the mutex, which every process holds for a few
  loads and one copy).
* Every subscriber keeps its own position (the number of the next message it
  wants) in its own process and sees every message published from the moment
  it subscribed, in order. One that fell further behind than the ring holds
  gets ``MessagesLost`` (with ``.count``, how many it missed) from its next
  ``get``, and the ``get`` after that continues with the oldest message still
  there: a loss is always declared, never silent.
* A process killed anywhere inside ``publish`` or ``get`` costs nothing: a
  half-written record was never committed; the next process to take the
  mutex hears that its holder died and walks the ring to repair the words.
* A ``get`` with nothing new sleeps in the kernel (a futex, 50 ms slices)
  until a publish wakes it; a publish pays for a wake-up only when someone
  sleeps.

Lifetime: as for every shmem block. ``Broadcast(name=None)`` makes a new block
under a generated name, shared by passing the object (it pickles by name);
``Broadcast(name="ticks")`` creates it or opens the one that exists, and
``Subscriber("ticks")`` opens an existing one, so unrelated programs share it
by name. The block lives while any handle (publisher or subscriber) is open;
the last to close (or to exit, however) removes it.

Trust: ``get`` unpickles what other processes published, as
``multiprocessing`` does: use a broadcast between your own processes
(mode 0600), never as a channel from other users.
"""

from __future__ import annotations

import pickle
import queue as _stdlib_queue
import struct
import time
from typing import Any, Callable, Optional, Tuple

from .._core.block import Block
from .._core.header import KIND_BROADCAST
from .._errors import CorruptSegment, MessagesLost
from . import broadcast_layout, named_block, sync_wait
from .broadcast_layout import (
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    MIN_CAPACITY,
    OFF_HEAD,
    OFF_NEXT,
    OFF_OLDEST,
    OFF_SEQ_WORD,
    OFF_SLEEPERS,
    OFF_TAIL,
    REC,
    RING,
    TAG_BYTES,
    TAG_PICKLE,
    TAG_WRAP,
    BroadcastHeader,
    record_size,
)
from .queue_ring import wait_ns
from .sync_wait import Flight, block_signals, in_flight, let_go, restore_signals

__all__ = ["Broadcast", "Empty", "MessagesLost", "Subscriber"]

Empty = _stdlib_queue.Empty

PROTOCOL = pickle.HIGHEST_PROTOCOL
SLICE_NS = sync_wait.SLICE_NS
_M64 = 0xFFFFFFFFFFFFFFFF
#: Positions and numbers only grow, by at most the ring's size per publish: none reaches this
#: in any machine's life, so a word beyond it is damage (and sums of words never overflow a u64).
_LIMIT = 1 << 62
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_REC = struct.Struct("<IIQ")  # length, tag, seq
_ENDS = struct.Struct("<QQQQ")  # next_seq, oldest_seq, head, tail
_dumps, _loads = pickle.dumps, pickle.loads


def _corrupt(what: str) -> CorruptSegment:
    return CorruptSegment(f"broadcast ring is damaged: {what}")


def _capacity(capacity: Optional[int]) -> int:
    if capacity is None:
        return DEFAULT_CAPACITY
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int (bytes), not {type(capacity).__name__}")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be between {MIN_CAPACITY} and {MAX_CAPACITY} bytes, not {capacity}")
    return (capacity + 7) & ~7


class _Ring:
    """The mutex, the words and the records of one broadcast block, seen from one handle.
    ``publish``, ``get`` and ``snapshot`` count as calls in flight (``sync_wait.Flight``):
    a ``release`` by another thread meanwhile leaves the mapping to the last of them."""

    def __init__(self, block: Block, capacity: int) -> None:
        mapping = block.mapping
        assert mapping is not None
        view = memoryview(mapping)
        if len(view) < RING + capacity:
            view.release()
            raise CorruptSegment("the broadcast's capacity does not fit its block")
        self.view: Optional[memoryview] = view
        self.calls = sync_wait.calls(mapping)
        self.capacity = capacity
        self.flight = Flight("the broadcast handle")

    def buf(self) -> memoryview:
        view = self.view
        if view is None:
            raise ValueError("the broadcast is closed")
        return view

    def release(self, then: Callable[[], None] = lambda: None) -> None:
        """This handle is closed: the mapping goes, and ``then()`` runs, once no call is inside."""

        def let_go_view() -> None:
            view, self.view = self.view, None
            if view is not None:
                self.calls.release()
                view.release()
            then()

        self.flight.close(let_go_view)

    # ------------------------------------------------------------ the mutex

    def lock(self) -> Any:
        """Block signals, take the mutex (repair if its holder died); the old signal mask."""
        mask = block_signals()
        try:
            if self.calls.lock(0):
                self.repair()
        except BaseException:
            restore_signals(mask)
            raise
        return mask

    def unlock(self, mask: Any) -> None:
        try:
            self.calls.unlock(0)
        finally:
            restore_signals(mask)

    def repair(self) -> None:
        """After a holder died: keep the longest run of intact, consecutively numbered
        records from the head, and make the words say so (best effort on a damaged ring:
        the checks of every later call still stand)."""
        buf, cap = self.buf(), self.capacity
        next_seq, oldest, head, tail = _ENDS.unpack_from(buf, OFF_NEXT)
        if not 0 <= tail - head <= cap or head % 8 or tail >= _LIMIT or tail % 8:
            head = tail = head & ~7 if head < _LIMIT else 0
        pos, first, expected = head, -1, -1
        while pos != tail:
            at = pos % cap
            room = cap - at
            if room < REC:
                if (tail - pos) & _M64 < room:
                    break
                pos = (pos + room) & _M64
                continue
            if (tail - pos) & _M64 < REC:
                break
            length, tag, seq = _REC.unpack_from(buf, RING + at)
            if tag == TAG_WRAP:
                if (tail - pos) & _M64 < room:
                    break
                pos = (pos + room) & _M64
                continue
            size = record_size(length)
            if size > room or size > (tail - pos) & _M64 or (expected >= 0 and seq != expected):
                break
            if first < 0:
                first = seq
            expected = (seq + 1) & _M64
            pos = (pos + size) & _M64
        if first < 0:  # no record: an empty ring after the last number anyone was given
            last = max(next_seq, oldest)
            _ENDS.pack_into(buf, OFF_NEXT, last, last, pos, pos)
        else:
            _ENDS.pack_into(buf, OFF_NEXT, expected, first, head, pos)

    # ------------------------------------------------------------ the words

    def ends(self) -> Tuple[int, int, int, int]:
        """next_seq, oldest_seq, head, tail - checked against each other and the capacity."""
        next_seq, oldest, head, tail = _ENDS.unpack_from(self.buf(), OFF_NEXT)
        used = tail - head
        if not 0 <= used <= self.capacity or head % 8 or tail >= _LIMIT or tail % 8:
            raise _corrupt("head and tail do not fit the ring")
        held = next_seq - oldest
        if not 0 <= held <= used // REC or (held == 0) != (used == 0) or next_seq >= _LIMIT:
            raise _corrupt("the message numbers do not fit the records the ring holds")
        return next_seq, oldest, head, tail

    # ------------------------------------------------------------ publish

    @in_flight
    def publish(self, data: Any, tag: int) -> int:
        """Append one record (dropping the oldest until it fits); its number."""
        view = memoryview(data).cast("B")
        length = len(view)
        cap = self.capacity
        size = record_size(length)
        if size > cap or length > 0xFFFFFFFF:
            raise ValueError(
                f"a message of {length} bytes does not fit in this broadcast's ring of {cap} bytes "
                f"(at most {cap - REC}; make the broadcast with a larger capacity=)"
            )
        buf = self.buf()
        mask = self.lock()
        try:
            next_seq, oldest, head, tail = self.ends()
            at = tail % cap
            room = cap - at
            skip = room if room < size else 0
            while True:
                if head == tail and skip:  # an empty ring restarts at offset 0
                    head = tail = tail + skip
                    _U64.pack_into(buf, OFF_HEAD, head)
                    _U64.pack_into(buf, OFF_TAIL, tail)
                    at, skip = 0, 0
                if cap - (tail - head) >= skip + size:
                    break
                # Drop the oldest record (or the unused end of the ring before it).
                hat = head % cap
                hroom = cap - hat
                if hroom < REC:
                    head += hroom
                else:
                    hlen, htag, hseq = _REC.unpack_from(buf, RING + hat)
                    if htag == TAG_WRAP:
                        if tail - head < hroom:
                            raise _corrupt("a wrap record reaches past the tail")
                        head += hroom
                    else:
                        hsize = record_size(hlen)
                        if hsize > hroom or hsize > tail - head or hseq != oldest:
                            raise _corrupt("the oldest record does not fit the ring or its number")
                        head += hsize
                        oldest += 1
                        _U64.pack_into(buf, OFF_OLDEST, oldest)
                _U64.pack_into(buf, OFF_HEAD, head)
            if skip:
                if skip >= REC:
                    _REC.pack_into(buf, RING + at, 0, TAG_WRAP, next_seq)
                tail += skip
                at = 0
            start = RING + at
            _REC.pack_into(buf, start, length, tag, next_seq)
            buf[start + REC : start + REC + length] = view
            _U64.pack_into(buf, OFF_TAIL, (tail + size) & _M64)  # the commit
            _U64.pack_into(buf, OFF_NEXT, (next_seq + 1) & _M64)
            wake = _U32.unpack_from(buf, OFF_SLEEPERS)[0] != 0
            if wake:
                _U32.pack_into(buf, OFF_SEQ_WORD, (_U32.unpack_from(buf, OFF_SEQ_WORD)[0] + 1) & 0xFFFFFFFF)
                _U32.pack_into(buf, OFF_SLEEPERS, 0)
        finally:
            self.unlock(mask)
        if wake:
            self.calls.wake(OFF_SEQ_WORD, 0x7FFFFFFF)
        return int(next_seq)

    # ------------------------------------------------------------ read

    def find(self, want: int, hint: int, oldest: int, head: int, tail: int) -> Tuple[int, bytes, int]:
        """Under the mutex: the record numbered ``want`` (oldest <= want < next_seq, the
        words checked): (tag, payload, byte position past it). ``hint`` is where this
        subscriber's last record ended: checked by the number of the record found there,
        else the walk starts at the head, where the records must number on from oldest."""
        buf, cap = self.buf(), self.capacity
        fresh = not 0 <= hint - head < tail - head
        pos = head if fresh else hint
        expected = oldest
        while True:
            left = tail - pos
            if left <= 0:
                if not fresh:
                    pos, fresh = head, True
                    continue
                raise _corrupt(f"message {want} is not in the ring")
            at = pos % cap
            room = cap - at
            if room < REC:
                pos += room
                continue
            if left < REC:
                raise _corrupt("a record header is cut short")
            length, tag, seq = _REC.unpack_from(buf, RING + at)
            if tag == TAG_WRAP:
                if left < room:
                    raise _corrupt("a wrap record reaches past the tail")
                pos += room
                continue
            size = record_size(length)
            if size > room or size > left:
                raise _corrupt("a record is longer than the ring holds")
            if not fresh:
                if seq != want:  # not where this subscriber left off: walk from the head
                    pos, fresh = head, True
                    continue
            elif seq != expected:
                raise _corrupt(f"record {seq} where record {expected} belongs")
            if seq == want:
                return tag, bytes(buf[RING + at + REC : RING + at + REC + length]), pos + size
            expected += 1
            pos += size

    @in_flight
    def get(self, sub: Subscriber, timeout_ns: int) -> Tuple[int, Any]:
        """(status, info): status 0 = message (info: (tag, data)), 1 = lost (info: (how many,
        where to continue)), 2 = nothing in time.

        The subscriber's position (``sub._seq``, ``sub._hint``) is read and moved here, under
        the mutex with signals blocked: a signal handler that calls ``get`` on the same
        subscriber (after this one got its message, or while it sleeps) never sees the old
        position, so no message is got twice. (It was read and moved by the caller, outside
        the blocked section: a handler between the two got the same message again.)"""
        buf = self.buf()
        end = -1 if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
        mask = self.lock()
        try:
            while True:
                self.flight.check_open()  # after a sleep: another thread closed this handle
                want, hint = sub._seq, sub._hint  # anew after each sleep: a handler may have moved it
                next_seq, oldest, head, tail = self.ends()
                if want < oldest:
                    sub._seq, sub._hint = oldest, head
                    return 1, (oldest - want, oldest)
                if want > next_seq:
                    raise _corrupt(f"the publisher is at message {next_seq}, behind this subscriber's {want}")
                if want < next_seq:
                    tag, data, after = self.find(want, hint, oldest, head, tail)
                    sub._seq, sub._hint = want + 1, after
                    return 0, (tag, data)
                left = -1 if end < 0 else end - time.monotonic_ns()
                if end >= 0 and left <= 0:
                    return 2, None
                # Sleep one slice with the mutex free, counted as a sleeper.
                seen = _U32.unpack_from(buf, OFF_SEQ_WORD)[0]
                _U32.pack_into(buf, OFF_SLEEPERS, (_U32.unpack_from(buf, OFF_SLEEPERS)[0] + 1) & 0xFFFFFFFF)
                if left < 0 or left > SLICE_NS:
                    left = SLICE_NS
                woken = False
                try:  # signal handlers run from the unlock on, and may raise
                    self.unlock(mask)
                    woken = self.calls.wait(OFF_SEQ_WORD, seen, left)
                finally:  # also when a signal handler raised: count ourselves out
                    mask = self.lock()
                    if not woken and _U32.unpack_from(buf, OFF_SEQ_WORD)[0] == seen:
                        sleepers = _U32.unpack_from(buf, OFF_SLEEPERS)[0]
                        if sleepers:
                            _U32.pack_into(buf, OFF_SLEEPERS, sleepers - 1)
        finally:  # (the mutex is free if a signal handler raised in the lock after a sleep)
            try:
                let_go(self.calls, 0)
            finally:
                restore_signals(mask)

    @in_flight
    def snapshot(self) -> Tuple[int, int]:
        """(next_seq, tail), under the mutex and checked."""
        mask = self.lock()
        try:
            next_seq, _, _, tail = self.ends()
        finally:
            self.unlock(mask)
        return next_seq, tail


def _open(name: Optional[str], capacity: int, create: bool) -> Tuple[Block, _Ring]:
    def check_attached(block: Block) -> BroadcastHeader:
        header = named_block.header_of_kind(block, KIND_BROADCAST, "a broadcast")
        parsed = broadcast_layout.parse_kind_header(header.extra, block.size)
        assert block.mapping is not None
        broadcast_layout.check_mutex(block.mapping[:RING], block.name)
        return parsed

    block, parsed = named_block.create_or_attach(
        name,
        create,
        broadcast_layout.data_size(capacity),
        KIND_BROADCAST,
        broadcast_layout.kind_header(capacity),
        [(0, broadcast_layout.initial())],
        check_attached,
    )
    header = parsed if parsed is not None else BroadcastHeader(capacity)
    try:
        ring = _Ring(block, header.capacity)
    except BaseException:
        block.release()
        raise
    return block, ring


class _Handle:
    _ring: Optional[_Ring] = None  # class defaults: a half-built handle can still be closed and shown
    _block: Optional[Block] = None

    @property
    def name(self) -> Optional[str]:
        """The block's name (open it elsewhere by it); None once closed."""
        return None if self._block is None else self._block.name

    @property
    def capacity(self) -> int:
        """The ring's size in bytes."""
        return self._use("capacity").capacity

    def _use(self, doing: str) -> _Ring:
        ring = self._ring
        if ring is None:
            raise ValueError(f"cannot {doing}: the shmem.{type(self).__name__} is closed")
        return ring

    def close(self) -> None:
        """This handle is done (idempotent). The broadcast lives on while other handles
        have it open; the last one to close (or to exit) removes it."""
        ring, block = self._ring, self._block
        self._ring = self._block = None
        if block is None:
            return
        block.release()
        if ring is not None:  # another thread inside a call keeps the mapping until it is out
            ring.release(then=lambda: named_block.remove_if_unused(block))
        else:
            named_block.remove_if_unused(block)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Broadcast(_Handle):
    """The publishing side of a broadcast: one writer, any number of ``Subscriber``s.

    Args:
        name: Create the broadcast under this name, or open the one that exists
            (its capacity wins); None: a new one, shared by passing this object.
        capacity: The ring's size in bytes (default 1 MiB): how far behind a
            subscriber may fall before it loses messages. A message larger than
            the ring (less a 16-byte record header) raises ValueError.

    ``publish`` never waits for a subscriber: when the ring is full, the oldest
    messages are dropped (subscribers that had not read them are told so).
    Several publishers on one broadcast are safe (each publish is atomic), but
    the order between them is whichever took the mutex first.
    """

    def __init__(self, name: Optional[str] = None, *, capacity: Optional[int] = None) -> None:
        self._block, self._ring = _open(name, _capacity(capacity), create=True)
        self._ring.flight.what = f"the shmem.{type(self).__name__}"

    @classmethod
    def _attach(cls, name: str) -> Broadcast:
        bc = cls.__new__(cls)
        bc._block, bc._ring = _open(name, DEFAULT_CAPACITY, create=False)
        return bc

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError("cannot pickle a closed shmem.Broadcast")
        return (type(self)._attach, (self._block.name,))

    def publish(self, obj: Any) -> int:
        """Publish ``obj`` (pickled) to every subscriber; its message number. Never waits
        for a subscriber. ValueError (nothing published) if the pickle exceeds the ring."""
        ring = self._use("publish")
        return ring.publish(_dumps(obj, PROTOCOL), TAG_PICKLE)

    def publish_bytes(self, data: Any) -> int:
        """Publish the bytes of ``data`` (any bytes-like object), not pickled; its message number."""
        return self._use("publish").publish(data, TAG_BYTES)

    def subscribe(self) -> Subscriber:
        """A new subscriber of this broadcast (in this process), from the next message on."""
        name = self.name
        if name is None:
            raise ValueError("cannot subscribe: the shmem.Broadcast is closed")
        return Subscriber(name)

    @property
    def published(self) -> int:
        """How many messages were published so far (the next message's number)."""
        return self._use("read the count").snapshot()[0]

    def __enter__(self) -> Broadcast:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._block is None or self._ring is None:
            return "<shmem.Broadcast closed>"
        return f"<shmem.Broadcast {self._block.name!r} capacity={self._ring.capacity}>"


class Subscriber(_Handle):
    """The receiving side of a broadcast, opened by name: sees every message published
    after it subscribed, in order.

    Args:
        name: The broadcast's name (``Broadcast.name``); FileNotFoundError
            (``shmem.SegmentNotFound``) if there is none.

    ``get`` raises ``MessagesLost`` once when the subscriber fell further behind
    than the ring holds, then continues with the oldest message still there.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a broadcast's name must be a str, not {type(name).__name__}")
        self._block, self._ring = _open(name, DEFAULT_CAPACITY, create=False)
        self._ring.flight.what = f"the shmem.{type(self).__name__}"
        self._seq, self._hint = self._ring.snapshot()  # its first message goes at the tail

    @classmethod
    def _resume(cls, name: str, seq: int) -> Subscriber:
        sub = cls(name)
        sub._seq = seq
        return sub

    def __reduce__(self) -> Tuple[Any, ...]:
        """A copy of the subscription: the copy continues from where this one is."""
        if self._block is None:
            raise ValueError("cannot pickle a closed shmem.Subscriber")
        return (type(self)._resume, (self._block.name, self._seq))

    @property
    def position(self) -> int:
        """The number of the next message this subscriber reads."""
        return self._seq

    def pending(self) -> int:
        """How many messages were published that this subscriber has not read yet
        (some may be lost already)."""
        return max(0, self._use("count").snapshot()[0] - self._seq)

    def _next(self, block: bool, timeout: Optional[float]) -> Tuple[int, bytes]:
        ring = self._use("get")
        status, info = ring.get(self, wait_ns(block, timeout))  # moves self._seq and self._hint
        if status == 0:
            return info  # type: ignore[no-any-return]
        if status == 1:
            raise MessagesLost(*info)
        raise Empty

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """The next message, waiting for one if ``block`` (at most ``timeout`` seconds).
        Raises ``queue.Empty`` when none came in time, ``MessagesLost`` when messages
        were dropped before this subscriber read them (the next call continues).
        A message published with ``publish_bytes`` comes back as ``bytes``."""
        tag, data = self._next(block, timeout)
        return _loads(data) if tag == TAG_PICKLE else data

    def get_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        """The next message as bytes (a ``publish``ed one comes as its pickle)."""
        return self._next(block, timeout)[1]

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._block is None:
            return "<shmem.Subscriber closed>"
        return f"<shmem.Subscriber {self._block.name!r} at message {self._seq}>"
