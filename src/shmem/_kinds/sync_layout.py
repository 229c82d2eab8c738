"""The codec of Event, Condition, Semaphore, BoundedSemaphore and Barrier blocks.

One kind header for the family (each primitive has its own block kind in the
trailer, ``_core.header``; the type field here must agree with it)::

    off  len  field
      0    8  magic        b"shmsync\\0"
      8    2  version      1
     10    2  type         1 Event, 2 Condition, 3 Semaphore, 4 BoundedSemaphore, 5 Barrier
     12    4  mutex_size   sizeof(pthread_mutex_t) of the creator's C library
     16    4  slots        process slots (Semaphore, Barrier: SLOTS; else 0)
     20    4  value        Semaphore: initial value (BoundedSemaphore: its bound); Barrier: parties; else 0
     24   16  libc         b"glibc", NUL-padded

The data (``sync_wait`` draws the protocol; all words 32-bit, little-endian
on the machines shmem supports, as the creator's native order)::

    0      the internal mutex: robust, process-shared, error-checking
    64     word 0  seq: the futex sequence word
           Event      word 1 flag
           Condition  word 1 waiters (registered, dead ones included), word 2 to_wake (tokens)
           Semaphore  word 1 value, words 2..5 a journal (valid, slot, value, count)
           Barrier    word 1 gen, word 2 count, word 3 broken
    128    Semaphore  SLOTS words: permits held through slot i
           Barrier    OUTCOMES words: the outcome of generation g at g % OUTCOMES
                      (1 passed, 2 broken), then SLOTS pairs (gen, waiting): how
                      many of slot i's parties wait in generation gen

Everything read back is hostile input: the header is checked on attach (and
the mutex's kind word, the block's size), and words are only ever read
through bounds-checked views, so garbage in them costs wrong answers or a
clear error, never a crash.

``event_state``, ``condition_state``, ``semaphore_state`` and
``barrier_state`` (or ``sync_state``, whichever the header says) read a
block's live state for ``shmem ls``/``info``, as ``lock_layout.lock_state``
does a lock's: from a *copy* of its data, never the mapping, without the
internal mutex (a snapshot: it may change as soon as it is read), and with
every word checked - None when the words cannot be a live primitive's. Which
process slots are alive, and whose they are, takes the block's file (its
OFD locks): ``_segments`` adds that.
"""

from __future__ import annotations

import struct
from typing import Dict, NamedTuple, Optional, Tuple, Union

from .._core.header import KIND_BARRIER, KIND_CONDITION, KIND_EVENT, KIND_NAMES, KIND_SEMAPHORE, Header
from .._errors import CorruptSegment
from .sync_wait import KIND_OFFSET, MUTEX_SIZE, WORDS_OFFSET, mutex_kind, new_sync_mutex

TYPE_EVENT, TYPE_CONDITION, TYPE_SEMAPHORE, TYPE_BOUNDED, TYPE_BARRIER = 1, 2, 3, 4, 5
TYPE_NAMES = {
    TYPE_EVENT: "Event",
    TYPE_CONDITION: "Condition",
    TYPE_SEMAPHORE: "Semaphore",
    TYPE_BOUNDED: "BoundedSemaphore",
    TYPE_BARRIER: "Barrier",
}
TYPE_KINDS = {
    TYPE_EVENT: KIND_EVENT,
    TYPE_CONDITION: KIND_CONDITION,
    TYPE_SEMAPHORE: KIND_SEMAPHORE,
    TYPE_BOUNDED: KIND_SEMAPHORE,
    TYPE_BARRIER: KIND_BARRIER,
}

SLOTS = 256
OUTCOMES = 64
VALUE_MAX = 2**31 - 1  # a semaphore's value and a barrier's parties fit in a signed 32-bit word
PASSED, BROKEN = 1, 2

# Word indices (of the 32-bit words at WORDS_OFFSET).
W_SEQ = 0
W_FLAG = 1  # Event
W_WAITERS, W_TO_WAKE = 1, 2  # Condition
W_VALUE, W_J_VALID, W_J_SLOT, W_J_VALUE, W_J_COUNT = 1, 2, 3, 4, 5  # Semaphore
W_GEN, W_COUNT, W_BROKEN = 1, 2, 3  # Barrier
W_TABLE = (128 - WORDS_OFFSET) // 4  # the first word of a Semaphore's slots, a Barrier's outcomes
W_BARRIER_SLOTS = W_TABLE + OUTCOMES


def words(type_: int) -> int:
    """How many 32-bit words a primitive of this type uses."""
    if type_ in (TYPE_SEMAPHORE, TYPE_BOUNDED):
        return W_TABLE + SLOTS
    if type_ == TYPE_BARRIER:
        return W_BARRIER_SLOTS + 2 * SLOTS
    return W_TABLE


def data_size(type_: int) -> int:
    return WORDS_OFFSET + 4 * words(type_)


_KIND_HEADER = struct.Struct("<8sHHIII16s")
_MAGIC = b"shmsync\0"
_VERSION = 1
LIBC = b"glibc"


class SyncHeader(NamedTuple):
    type: int
    slots: int
    value: int


def kind_header(type_: int, value: int = 0) -> bytes:
    slots = SLOTS if type_ in (TYPE_SEMAPHORE, TYPE_BOUNDED, TYPE_BARRIER) else 0
    return _KIND_HEADER.pack(_MAGIC, _VERSION, type_, MUTEX_SIZE, slots, value, LIBC)


def initial(type_: int, value: int = 0) -> bytes:
    """The block's first bytes: the internal mutex, then the words a new primitive starts with."""
    head = new_sync_mutex().ljust(WORDS_OFFSET, b"\0")
    if type_ in (TYPE_SEMAPHORE, TYPE_BOUNDED):
        return head + struct.pack("<II", 0, value)
    return head


def parse_kind_header(extra: bytes) -> SyncHeader:
    """The fields of the kind header, each checked; CorruptSegment (without the
    block's name: the caller adds it) otherwise."""
    if len(extra) != _KIND_HEADER.size:
        raise CorruptSegment(f"synchronisation header of {len(extra)} bytes, expected {_KIND_HEADER.size}")
    magic, version, type_, mutex_size, slots, value, libc = _KIND_HEADER.unpack(extra)
    if magic != _MAGIC:
        raise CorruptSegment("not a synchronisation primitive's header (wrong magic)")
    if version != _VERSION:
        raise CorruptSegment(
            f"synchronisation layout version {version}, this shmem reads {_VERSION}; "
            "use one shmem version in every process that shares it"
        )
    if type_ not in TYPE_NAMES:
        raise CorruptSegment(f"unknown synchronisation primitive type {type_}")
    libc = libc.rstrip(b"\0")
    if libc != LIBC or mutex_size != MUTEX_SIZE:
        shown = libc.decode("ascii", "replace")
        raise CorruptSegment(
            f"made for another C library ({shown!r}, a {mutex_size}-byte mutex); this process uses "
            f"{LIBC.decode()}'s {MUTEX_SIZE}-byte mutex and cannot take part in it"
        )
    wanted_slots = SLOTS if type_ in (TYPE_SEMAPHORE, TYPE_BOUNDED, TYPE_BARRIER) else 0
    if slots != wanted_slots:
        raise CorruptSegment(f"{slots} process slots, this shmem uses {wanted_slots}")
    if value > VALUE_MAX or (type_ == TYPE_BARRIER and value < 1) or (type_ < TYPE_SEMAPHORE and value):
        raise CorruptSegment(f"a {TYPE_NAMES[type_]} with value {value}")
    return SyncHeader(type_, slots, value)


def check(header: Optional[Header], data: bytes, size: int, name: str, types: Dict[int, str]) -> SyncHeader:
    """Check a block before its mutex or words are used: ``header`` (None: not
    made by shmem) must be one of ``types`` (type: the class's name), the block
    big enough, the mutex's kind word (in ``data``, a copy of the block's first
    bytes) this process's. CorruptSegment naming the block otherwise."""
    wanted = " or ".join(f"shmem.{t}" for t in types.values())
    if header is None:
        raise CorruptSegment(f"shared memory block {name!r} was not made by shmem: it holds no {wanted}")
    kinds = {TYPE_KINDS[t] for t in types}
    if header.kind not in kinds:
        raise CorruptSegment(f"shared memory block {name!r} holds a {KIND_NAMES[header.kind]} block, not a {wanted}")
    try:
        parsed = parse_kind_header(header.extra)
    except CorruptSegment as err:
        raise CorruptSegment(f"shmem primitive {name!r}: {err}") from None
    if parsed.type not in types or TYPE_KINDS[parsed.type] != header.kind:
        raise CorruptSegment(f"shared memory block {name!r} holds a shmem.{TYPE_NAMES[parsed.type]}, not a {wanted}")
    need = data_size(parsed.type)
    if size < need or len(data) < WORDS_OFFSET:
        raise CorruptSegment(f"shmem primitive {name!r}: its block holds {size} bytes, a {wanted} takes {need}")
    if data[KIND_OFFSET : KIND_OFFSET + 4] != mutex_kind():
        raise CorruptSegment(f"shmem primitive {name!r}: its internal mutex is not one shmem made (overwritten?)")
    return parsed


def describe(extra: bytes) -> str:
    """ "Event", "Semaphore(3)", "Barrier(4)"... for listings; CorruptSegment if the header does not validate."""
    parsed = parse_kind_header(extra)
    name = TYPE_NAMES[parsed.type]
    if parsed.type in (TYPE_SEMAPHORE, TYPE_BOUNDED, TYPE_BARRIER):
        return f"{name}({parsed.value})"
    return name


# ------------------------------------------------------------------ live state, for listings


class EventState(NamedTuple):
    """An Event's flag (``event_state``)."""

    is_set: bool


class ConditionState(NamedTuple):
    """A Condition's waiters (``condition_state``)."""

    waiters: int  # registered waiters; one that died stays counted (until a notify's token is taken for it)
    to_wake: int  # wake tokens not yet taken (notified, not yet returned)


class SemaphoreState(NamedTuple):
    """A semaphore's permits (``semaphore_state``)."""

    initial: int  # the header's value: the initial value (a BoundedSemaphore's bound)
    available: int  # permits free now (those of dead holders come back at the next acquire that finds none)
    held: Tuple[Tuple[int, int], ...]  # (slot, permits) of each process slot holding permits, by slot


class BarrierState(NamedTuple):
    """A barrier's generation (``barrier_state``)."""

    parties: int
    n_waiting: int  # parties waiting now (0 when broken), as ``Barrier.n_waiting``
    broken: bool
    waiting: Tuple[Tuple[int, int], ...]  # (slot, parties) of each process slot with parties waiting now


SyncState = Union[EventState, ConditionState, SemaphoreState, BarrierState]


def _words(extra: bytes, data: bytes, wanted: Tuple[int, ...]) -> Optional[Tuple[SyncHeader, Tuple[int, ...]]]:
    """The kind header (CorruptSegment if it does not validate) and the words of
    ``data`` (a copy of the block's data), or None when the header is not one of
    ``wanted``, ``data`` is short, or its mutex is not one this shmem makes."""
    parsed = parse_kind_header(extra)
    if parsed.type not in wanted or len(data) < data_size(parsed.type):
        return None
    if data[KIND_OFFSET : KIND_OFFSET + 4] != mutex_kind():
        return None
    n = words(parsed.type)
    return parsed, struct.unpack_from(f"<{n}I", data, WORDS_OFFSET)


def event_state(extra: bytes, data: bytes) -> Optional[EventState]:
    """An Event block's flag: ``extra`` is its kind header, ``data`` a copy of its
    data (``data_size(TYPE_EVENT)`` bytes). CorruptSegment when the header does
    not validate; None when the data cannot be an event's."""
    got = _words(extra, data, (TYPE_EVENT,))
    if got is None or got[1][W_FLAG] > 1:
        return None
    return EventState(bool(got[1][W_FLAG]))


def condition_state(extra: bytes, data: bytes) -> Optional[ConditionState]:
    """A Condition block's waiters (as ``event_state``)."""
    got = _words(extra, data, (TYPE_CONDITION,))
    if got is None:
        return None
    waiters, to_wake = got[1][W_WAITERS], got[1][W_TO_WAKE]
    if waiters > VALUE_MAX or to_wake > VALUE_MAX:
        return None
    return ConditionState(waiters, min(to_wake, waiters))  # read unlocked: a waiter may be between two stores


def semaphore_state(extra: bytes, data: bytes) -> Optional[SemaphoreState]:
    """A Semaphore or BoundedSemaphore block's permits (as ``event_state``).

    A pending journal entry (a change in progress, or one whose writer died)
    is applied to the copy, as the next taker of the mutex would.
    """
    got = _words(extra, data, (TYPE_SEMAPHORE, TYPE_BOUNDED))
    if got is None:
        return None
    parsed, w = got
    table = list(w[W_TABLE : W_TABLE + SLOTS])
    value = w[W_VALUE]
    if w[W_J_VALID] > 1:
        return None
    if w[W_J_VALID]:
        if w[W_J_SLOT] >= SLOTS:
            return None
        value, table[w[W_J_SLOT]] = w[W_J_VALUE], w[W_J_COUNT]
    if value > VALUE_MAX or any(count > VALUE_MAX for count in table):
        return None
    held = tuple((i, count) for i, count in enumerate(table) if count)
    return SemaphoreState(parsed.value, value, held)


def barrier_state(extra: bytes, data: bytes) -> Optional[BarrierState]:
    """A Barrier block's waiting parties and broken flag (as ``event_state``)."""
    got = _words(extra, data, (TYPE_BARRIER,))
    if got is None:
        return None
    parsed, w = got
    gen, count, broken = w[W_GEN], w[W_COUNT], w[W_BROKEN]
    if broken > 1 or count > parsed.value:
        return None
    waiting = []
    if not broken:
        for i in range(SLOTS):
            at = W_BARRIER_SLOTS + 2 * i
            if w[at + 1] and w[at] == gen:
                if w[at + 1] > parsed.value:
                    return None
                waiting.append((i, w[at + 1]))
    return BarrierState(parsed.value, 0 if broken else count, bool(broken), tuple(waiting))


def sync_state(extra: bytes, data: bytes) -> Optional[SyncState]:
    """The live state of whichever primitive the kind header names (as ``event_state``)."""
    type_ = parse_kind_header(extra).type
    if type_ == TYPE_EVENT:
        return event_state(extra, data)
    if type_ == TYPE_CONDITION:
        return condition_state(extra, data)
    if type_ == TYPE_BARRIER:
        return barrier_state(extra, data)
    return semaphore_state(extra, data)
