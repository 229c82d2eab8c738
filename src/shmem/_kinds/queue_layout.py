"""The codec of a queue block: its kind header, its control words, its records.

A queue is one block (kind ``queue``)::

    offset 0     the ring's mutex: glibc robust, process-shared, error-checking (MUTEX_SIZE bytes)
    offset 64    control words, all changed under the ring's mutex
                   64  u64 head        byte position of the first record (grows without end;
                   72  u64 tail        byte position past the last record  the ring offset is
                   80  u64 count       items in the ring                   position % capacity)
                   88  u64 unfinished  JoinableQueue: items put and not yet task_done()
                   96  u32 seq_get     futex word consumers sleep on (bumped by a put that wakes one)
                  100  u32 seq_put     futex word producers sleep on (bumped by a get that wakes one)
                  104  u32 get_sleepers, 108 u32 put_sleepers: who to wake (a hint, never a count
                       anyone trusts: a sleeper that died leaves one too many, which costs one
                       wake-up for nobody, and then it is gone)
                  112  u32 seq_join, 116 u32 join_sleepers: join() waits there
                  120  u32 seq_watch, 124 u32 watchers: fileno()'s watcher threads wait there
                       for the queue to change between empty and not (bumped, and every
                       watcher woken, by a put and by a get that empties the queue)
    offset 128   the producers' mutex (as the ring's). A producer of a large record (BIG_COPY
                 bytes or more) holds it from finding room to committing, and copies the record
                 with the ring's mutex free, past the tail, where no one reads;
                 176  u32 put_busy: 1 while it does (set and cleared under the ring's mutex).
                 A small put takes the ring's mutex alone, unless put_busy is set: then it waits
                 for the copy by taking the producers' mutex first. Whoever holds the producers'
                 mutex clears a put_busy left set by a copier that died.
    offset 192   the consumers' mutex, and 240 u32 get_busy: the same for a consumer copying a
                 large record out, between head and tail, where no one writes.
                 Lock order: a side's mutex, then the ring's.
    offset 256   the ring: ``capacity`` bytes (a multiple of 8) of records, each
                   u32 length, u32 tag, payload padded to 8 bytes
                 tag 1: a pickle; 2: bytes (send_bytes); 3: a pickle with out-of-band buffers
                 (an array's data beside its pickle, not inside it):
                   u32 n, u32 0, u64 pickle length, n x u64 buffer lengths,
                   the pickle, then each buffer - every one of them padded to 8 bytes;
                 tag 4: a batch (``put_many``): u32 n, u32 taken, then the pickle of a list of the n
                   items - one pickle for them all, ~4x cheaper than n. A take of items
                   taken..k-1 commits by storing k in ``taken`` (by moving head when k == n);
                   ``count`` and ``repair`` count the n - taken items left;
                 tag 5: an object made of small builtins only, in the plain encoding
                   (``queue_plain``: no pickle either way);
                 tag 6: a batch as tag 4 whose list is in the plain encoding;
                 0xFFFFFFFF: a wrap record - the rest of the ring up to its end is unused, the
                 next record is at ring offset 0.

Kind header (``extra`` of the block's trailer, checksummed with it)::

    0   8s  magic b"shmqueue"      16  Q  capacity (ring bytes)
    8   H   version (3)            24  Q  maxsize (items; 0: only the ring's bytes limit it)
    10  H   flags (1: joinable)    32  16s C library of the mutex (b"glibc")
    12  I   mutex size

The records are written and read by ``queue_ring`` (C: ``shmem._queue``; a
pure-Python twin), which checks head, tail and every record length against
the capacity before it copies anything: the ring is hostile input.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

from .._errors import CorruptSegment
from . import sync_wait

MAGIC = b"shmqueue"
VERSION = 3  # 2: batch records, ``count`` counts items; 3: the producers' and consumers' mutexes
FLAG_JOINABLE = 1

OFF_HEAD, OFF_TAIL, OFF_COUNT, OFF_UNFINISHED = 64, 72, 80, 88
OFF_SEQ_GET, OFF_SEQ_PUT, OFF_GET_SLEEPERS, OFF_PUT_SLEEPERS = 96, 100, 104, 108
OFF_SEQ_JOIN, OFF_JOIN_SLEEPERS = 112, 116
OFF_SEQ_WATCH, OFF_WATCHERS = 120, 124
OFF_MUTEX, OFF_PUT_MUTEX, OFF_GET_MUTEX = 0, 128, 192
#: A side's busy word lies this far past its mutex (put_busy 176, get_busy 240).
BUSY_AFTER_MUTEX = 48
MUTEX_OFFSETS = (OFF_MUTEX, OFF_PUT_MUTEX, OFF_GET_MUTEX)
RING = 256
#: A record whose payload is this long or longer is copied into and out of the ring with only
#: its side's mutex held (C), and is taken alone: get_many stops before one, or returns it by itself.
BIG_COPY = 1 << 16
REC = 8  # a record's header: u32 length, u32 tag

TAG_PICKLE, TAG_BYTES, TAG_PICKLE_OOB, TAG_BATCH, TAG_PLAIN, TAG_PLAIN_BATCH, TAG_WRAP = 1, 2, 3, 4, 5, 6, 0xFFFFFFFF
BATCH_TAGS = (TAG_BATCH, TAG_PLAIN_BATCH)
BATCH_HEAD = 8  # a batch record's u32 items, u32 taken
#: put_many puts up to this many objects in one batch record (one pickle of their list).
BATCH_ITEMS = 64
#: The most out-of-band buffers one record may carry (more are pickled in-band).
MAX_OOB_BUFFERS = 1024

#: The ring's size when none is given: room for ~16k small messages or a few large ones.
DEFAULT_CAPACITY = 1 << 20
MIN_CAPACITY = 64
#: Records carry a u32 length; a ring beyond this could hold a message its header cannot describe.
MAX_CAPACITY = 1 << 40

_KIND_HEADER = struct.Struct("<8sHHIQQ16s")
_CONTROL = struct.Struct("<QQQQIIIIIIII")


class QueueHeader(NamedTuple):
    capacity: int
    maxsize: int
    joinable: bool


def record_size(length: int) -> int:
    """Bytes a record of a ``length``-byte payload takes in the ring."""
    return REC + ((length + 7) & ~7)


def data_size(capacity: int) -> int:
    return RING + capacity


def kind_header(capacity: int, maxsize: int, joinable: bool) -> bytes:
    flags = FLAG_JOINABLE if joinable else 0
    return _KIND_HEADER.pack(MAGIC, VERSION, flags, sync_wait.MUTEX_SIZE, capacity, maxsize, b"glibc")


def initial() -> bytes:
    """The block's first ``RING`` bytes: its three mutexes initialised, zero control words."""
    mutex = sync_wait.new_sync_mutex()
    out = bytearray(RING)
    for off in MUTEX_OFFSETS:
        out[off : off + len(mutex)] = mutex
    return bytes(out)


def parse_kind_header(extra: bytes, block_size: Optional[int] = None) -> QueueHeader:
    """The kind header, every field checked (against the block's size too, when given)."""
    if len(extra) != _KIND_HEADER.size:
        raise CorruptSegment(f"queue header of {len(extra)} bytes, expected {_KIND_HEADER.size}")
    magic, version, flags, mutex_size, capacity, maxsize, libc = _KIND_HEADER.unpack(extra)
    if magic != MAGIC:
        raise CorruptSegment("not a queue header (wrong magic)")
    if version != VERSION:
        raise CorruptSegment(f"queue header version {version}, this shmem reads {VERSION}; upgrade shmem everywhere")
    if flags & ~FLAG_JOINABLE:
        raise CorruptSegment(f"unknown queue flags {flags:#x}")
    if mutex_size != sync_wait.MUTEX_SIZE or libc.rstrip(b"\0") != b"glibc":
        raise CorruptSegment("the queue's mutex was made by another C library or build")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity % 8:
        raise CorruptSegment(f"bad queue capacity {capacity}")
    if maxsize >= 1 << 62:
        raise CorruptSegment(f"bad queue maxsize {maxsize}")
    if block_size is not None and data_size(capacity) > block_size:
        raise CorruptSegment(f"a ring of {capacity} bytes does not fit in a block of {block_size}")
    return QueueHeader(capacity, maxsize, bool(flags & FLAG_JOINABLE))


def check_mutex(data: bytes, name: str) -> None:
    """The block's mutex is one this build can use (the kind word it initialises)."""
    kind = sync_wait.mutex_kind()
    for off in MUTEX_OFFSETS:
        if data[off + sync_wait.KIND_OFFSET : off + sync_wait.KIND_OFFSET + 4] != kind:
            raise CorruptSegment(
                f"shared memory block {name!r}: the queue's mutex at {off} is not a robust process-shared mutex"
            )


class QueueState(NamedTuple):
    """What ``shmem ls`` shows of a queue: a snapshot of its control words, read without the mutex."""

    capacity: int
    maxsize: int
    joinable: bool
    items: int
    used_bytes: int
    unfinished: int
    getters_waiting: int
    putters_waiting: int


def queue_state(extra: bytes, data: bytes) -> Optional[QueueState]:
    """The state of a queue block from its kind header and its first 128 bytes; None if either is damaged."""
    try:
        header = parse_kind_header(extra)
    except CorruptSegment:
        return None
    if len(data) < RING:
        return None
    head, tail, count, unfinished, _, _, get_sleepers, put_sleepers, *_ = _CONTROL.unpack_from(data, OFF_HEAD)
    used = tail - head
    if not 0 <= used <= header.capacity:
        return None
    return QueueState(
        header.capacity, header.maxsize, header.joinable, count, used, unfinished, get_sleepers, put_sleepers
    )


def describe(extra: bytes) -> str:
    """The listing's description of a queue block, after its kind: "ring 1048576 B, maxsize 5"
    ("JoinableQueue, ring ..." for a JoinableQueue)."""
    header = parse_kind_header(extra)
    text = f"ring {header.capacity} B" + (f", maxsize {header.maxsize}" if header.maxsize else "")
    return ("JoinableQueue, " if header.joinable else "") + text
