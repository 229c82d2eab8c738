"""The codec of a broadcast block: its kind header, its control words, its records.

A broadcast is one block (kind ``broadcast``)::

    offset 0     internal mutex: glibc robust, process-shared, error-checking (MUTEX_SIZE bytes)
    offset 64    control words, all changed under the mutex (by publishers only)
                   64  u64 next_seq    the number the next message published gets
                   72  u64 oldest_seq  the number of the oldest message still in the ring
                                       (== next_seq: the ring is empty)
                   80  u64 head        byte position of the oldest record  (positions grow without
                   88  u64 tail        byte position past the newest one    end; the ring offset is
                                                                            position % capacity)
                   96  u32 seq_word    futex word subscribers sleep on (bumped by a publish that
                                       wakes them)
                  100  u32 sleepers    subscribers asleep (a hint: the publisher pays a FUTEX_WAKE
                                       only when it is not 0, and zeroes it; a sleeper that died
                                       leaves one wake-up for nobody)
    offset 128   the ring: ``capacity`` bytes (a multiple of 8) of records, each
                   u32 length, u32 tag, u64 seq, payload padded to 8 bytes
                 tag 1: a pickle; 2: bytes (publish_bytes); 0xFFFFFFFF: a wrap record - the
                 rest of the ring up to its end is unused, the next record is at ring offset 0.
                 Fewer than 16 bytes left before the ring's end are skipped the same way,
                 without a wrap record (there is no room for one).

The records from head to tail carry the numbers oldest_seq .. next_seq - 1,
consecutive, in order. A publish drops records at the head until the new
one fits (the publisher never waits for anyone), writes the record past the
tail, and only then moves the tail (its commit) and next_seq; a publisher
killed anywhere leaves a record that was never committed, and the next
process to take the mutex hears that its holder died and walks the ring
(``broadcast.repair``) to make the words agree with the records again.

Kind header (``extra`` of the block's trailer, checksummed with it)::

    0   8s  magic b"shmbcast"      12  I  mutex size
    8   H   version (1)            16  Q  capacity (ring bytes)
    10  H   flags (0)              24  16s C library of the mutex (b"glibc")

Subscribers keep their own position (the next number they want, and a cached
byte position checked against the record's number): nothing in the block says
who subscribes, so the publisher cannot wait for anyone even if it wanted to.
Everything read from the block is hostile: ``broadcast`` checks the words and
every record against the capacity and the numbering before it copies anything.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

from .._errors import CorruptSegment
from . import sync_wait

MAGIC = b"shmbcast"
VERSION = 1

OFF_NEXT, OFF_OLDEST, OFF_HEAD, OFF_TAIL = 64, 72, 80, 88
OFF_SEQ_WORD, OFF_SLEEPERS = 96, 100
RING = 128
REC = 16  # a record's header: u32 length, u32 tag, u64 seq

TAG_PICKLE, TAG_BYTES, TAG_WRAP = 1, 2, 0xFFFFFFFF

DEFAULT_CAPACITY = 1 << 20
MIN_CAPACITY = 64
#: Records carry a u32 length; a ring beyond this could hold a message its header cannot describe.
MAX_CAPACITY = 1 << 32

_KIND_HEADER = struct.Struct("<8sHHIQ16s")
CONTROL = struct.Struct("<QQQQII")  # next_seq, oldest_seq, head, tail, seq_word, sleepers


class BroadcastHeader(NamedTuple):
    capacity: int


def record_size(length: int) -> int:
    """Bytes a record of a ``length``-byte payload takes in the ring."""
    return REC + ((length + 7) & ~7)


def data_size(capacity: int) -> int:
    return RING + capacity


def kind_header(capacity: int) -> bytes:
    return _KIND_HEADER.pack(MAGIC, VERSION, 0, sync_wait.MUTEX_SIZE, capacity, b"glibc")


def initial() -> bytes:
    """The block's first bytes: an initialised mutex, zero control words."""
    mutex = sync_wait.new_sync_mutex()
    return mutex + bytes(RING - len(mutex))


def parse_kind_header(extra: bytes, block_size: Optional[int] = None) -> BroadcastHeader:
    """The kind header, every field checked (against the block's size too, when given)."""
    if len(extra) != _KIND_HEADER.size:
        raise CorruptSegment(f"broadcast header of {len(extra)} bytes, expected {_KIND_HEADER.size}")
    magic, version, flags, mutex_size, capacity, libc = _KIND_HEADER.unpack(extra)
    if magic != MAGIC:
        raise CorruptSegment("not a broadcast header (wrong magic)")
    if version != VERSION:
        raise CorruptSegment(
            f"broadcast header version {version}, this shmem reads {VERSION}; upgrade shmem everywhere"
        )
    if flags:
        raise CorruptSegment(f"unknown broadcast flags {flags:#x}")
    if mutex_size != sync_wait.MUTEX_SIZE or libc.rstrip(b"\0") != b"glibc":
        raise CorruptSegment("the broadcast's mutex was made by another C library or build")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity % 8:
        raise CorruptSegment(f"bad broadcast capacity {capacity}")
    if block_size is not None and data_size(capacity) > block_size:
        raise CorruptSegment(f"a ring of {capacity} bytes does not fit in a block of {block_size}")
    return BroadcastHeader(capacity)


def check_mutex(data: bytes, name: str) -> None:
    """The block's mutex is one this build can use (the kind word it initialises)."""
    kind = sync_wait.mutex_kind()
    if data[sync_wait.KIND_OFFSET : sync_wait.KIND_OFFSET + 4] != kind:
        raise CorruptSegment(
            f"shared memory block {name!r}: the broadcast's mutex is not a robust process-shared mutex"
        )


class BroadcastState(NamedTuple):
    """A snapshot of a broadcast's control words, read without the mutex (for a listing)."""

    capacity: int
    published: int  # next_seq: messages published since the block was made
    held: int  # messages still in the ring
    used_bytes: int
    sleepers: int


def broadcast_state(extra: bytes, data: bytes) -> Optional[BroadcastState]:
    """The state of a broadcast block from its kind header and its first 128 bytes; None if damaged."""
    try:
        header = parse_kind_header(extra)
    except CorruptSegment:
        return None
    if len(data) < RING:
        return None
    next_seq, oldest, head, tail, _, sleepers = CONTROL.unpack_from(data, OFF_NEXT)
    used = (tail - head) & 0xFFFFFFFFFFFFFFFF
    if used > header.capacity or oldest > next_seq:
        return None
    return BroadcastState(header.capacity, next_seq, next_seq - oldest, used, sleepers)


def describe(extra: bytes) -> str:
    """The listing's description of a broadcast block, after its kind: "ring 1048576 B"."""
    return f"ring {parse_kind_header(extra).capacity} B"
