"""The codec of an object store block (``shmem.ObjectStore``): its tables and its heap.

A store is one block that many objects share: a heap of ``capacity`` bytes
cut into 64-byte units, and tables that say which units hold which object
and which processes hold it. Every table is changed only under the block's
internal mutex (``sync_wait``; a holder that dies inside is repaired from the
tables, see ``store``). The block's data::

    0          64     internal mutex (sync_wait: robust, process-shared)
    64         64     words (u32): [0] the futex sequence word, bumped when
                      an object is freed (room for a waiting put) or a
                      promised one is stored (``shmem.wait``)
    128        64     counters (u64): [0] units in use, [1] objects (both
                      rebuilt from the tables after a crash), [2..7] 0
    192   SLOTS*32    slot records, one per attached process:
                      u32 used, u32 pid, u64 start time, u64 pid namespace, u64 0
    holds  SLOTS*N/8  per slot, a bitmap over the N entries: bit j set = the
                      process in that slot holds entry j (a reference or a view)
    emap        N     entry map: one byte per entry, 0 free, 1 taken
    entries  N*48     entry j: Q id (random, never 0 while taken), Q offset (in
                      the heap), Q extent (bytes), Q size (bytes written),
                      I state (1 being written, 2 ready, 3 deleted, 4
                      promised: no memory yet, offset, extent and size 0),
                      I holders (set bits across the slots), Q 0
    umap   C/UNIT     unit map: one byte per 64-byte heap unit, 0 free, 1 taken
    heap        C     (at a multiple of 4096) the objects

An object's extent in the heap: ``<II`` (object header length, 0), the object
header (``object_layout.kind_header``: where its pickle and buffers lie), then
at the next multiple of 64 the object's data as ``object_layout`` plans it.

Kind header (``extra`` of the block's trailer)::

    0   8s  magic b"shmstore"
    8   H   version (1)
    10  H   slots
    12  I   unit (64)
    16  Q   capacity
    24  Q   max objects (N, a multiple of 64)

Every offset follows from those three numbers: ``parse`` recomputes the
layout and checks it against the block's real size. Entries are hostile
input too: ``entry`` checks each against the heap before anything is read
at its offset.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Tuple

from .._errors import CorruptSegment

MAGIC = b"shmstore"
VERSION = 1
UNIT = 64
SLOTS = 128  # processes attached at once
MAX_CAPACITY = 1 << 44
MAX_ENTRIES = 1 << 24

STATE_WRITING, STATE_READY, STATE_DELETED, STATE_PROMISED = 1, 2, 3, 4
STATE_NAMES = {
    STATE_WRITING: "being written",
    STATE_READY: "ready",
    STATE_DELETED: "deleted",
    STATE_PROMISED: "promised",  # an entry with no memory yet (ObjectStore.promise)
}

WORDS = 64
COUNTERS = 128
C_UNITS, C_OBJECTS = 0, 1
SLOT_TABLE = 192
SLOT = struct.Struct("<IIQQQ")
ENTRY = struct.Struct("<QQQQIIQ")
EXTENT_HEAD = struct.Struct("<II")

_KIND = struct.Struct("<8sHHIQQ")


class StoreLayout(NamedTuple):
    capacity: int
    entries: int
    slots: int
    holds: int  # offset of slot 0's bitmap
    bitmap: int  # bytes of one slot's bitmap
    emap: int
    table: int  # offset of entry 0
    umap: int
    units: int
    heap: int
    size: int  # bytes of block data


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(capacity: int, entries: int, slots: int = SLOTS) -> StoreLayout:
    """Where everything lies in a store of ``capacity`` heap bytes and ``entries`` objects."""
    bitmap = entries // 8
    holds = SLOT_TABLE + slots * SLOT.size
    emap = holds + slots * bitmap
    table = _up(emap + entries, 64)
    umap = table + entries * ENTRY.size
    units = capacity // UNIT
    heap = _up(umap + units, 4096)
    return StoreLayout(capacity, entries, slots, holds, bitmap, emap, table, umap, units, heap, heap + capacity)


def default_entries(capacity: int) -> int:
    """One entry per KiB of heap, between 1,024 and 262,144: room for small objects."""
    return min(max(capacity // 1024, 1024), 1 << 18) // 64 * 64


def plan(capacity: int, entries: int) -> StoreLayout:
    """The layout of a new store; ValueError (naming the limits) for sizes out of range."""
    for what, value, low, high in (
        ("capacity", capacity, UNIT, MAX_CAPACITY),
        ("max_objects", entries, 1, MAX_ENTRIES),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{what} must be between {low} and {high}, not {value}")
    return layout(_up(capacity, UNIT), _up(entries, 64))


def kind_header(shape: StoreLayout) -> bytes:
    return _KIND.pack(MAGIC, VERSION, shape.slots, UNIT, shape.capacity, shape.entries)


def parse(extra: bytes, block_size: int) -> StoreLayout:
    """The layout a store block's kind header describes, checked against the
    block's size. CorruptSegment (a ValueError) if anything does not add up."""
    if len(extra) != _KIND.size:
        raise CorruptSegment("not an object store header (wrong length)")
    magic, version, slots, unit, capacity, entries = _KIND.unpack(extra)
    if magic != MAGIC:
        raise CorruptSegment("not an object store header (wrong magic)")
    if version != VERSION:
        raise CorruptSegment(f"object store version {version}, this shmem reads {VERSION}; upgrade shmem everywhere")
    if slots != SLOTS or unit != UNIT:
        raise CorruptSegment(f"an object store of {slots} slots and {unit}-byte units; this shmem makes {SLOTS}/{UNIT}")
    if capacity % UNIT or not UNIT <= capacity <= MAX_CAPACITY or entries % 64 or not 64 <= entries <= MAX_ENTRIES:
        raise CorruptSegment(f"an object store of {capacity} bytes and {entries} entries is not one shmem makes")
    shape = layout(capacity, entries, slots)
    if shape.size != block_size:
        raise CorruptSegment(
            f"an object store of {capacity} bytes takes {shape.size} bytes, its block holds {block_size}"
        )
    return shape


class Entry(NamedTuple):
    id: int
    offset: int
    extent: int
    size: int
    state: int
    holders: int


def entry(shape: StoreLayout, raw: bytes) -> Entry:
    """An entry read from the table, checked against the heap (CorruptSegment otherwise)."""
    parsed = Entry(*ENTRY.unpack(raw)[:6])
    if parsed.state == STATE_PROMISED and parsed.extent == 0 and parsed.size == 0:
        return parsed
    if (
        parsed.offset % UNIT
        or parsed.extent % UNIT
        or parsed.extent < UNIT
        or parsed.offset + parsed.extent > shape.capacity
        or parsed.size > parsed.extent
        or parsed.state not in STATE_NAMES
        or parsed.holders > shape.slots
    ):
        raise CorruptSegment(f"object store entry {parsed} does not fit the store's heap")
    return parsed


def describe(extra: bytes, block_size: int) -> str:
    """ "67108864 bytes, 65536 objects at most" for listings (CorruptSegment if the header does not validate)."""
    shape = parse(extra, block_size)
    return f"{shape.capacity} bytes, {shape.entries} objects at most"


def store_state(extra: bytes, block_size: int, counters: bytes) -> Optional[Tuple[int, int]]:
    """(objects, used bytes) from a copy of a store's counters (``COUNTERS``, 16 bytes at
    least); None when they cannot be a live store's. ValueError if the header does not validate."""
    shape = parse(extra, block_size)
    if len(counters) < 16:
        return None
    units, objects = struct.unpack_from("<QQ", counters)
    if units > shape.units or objects > shape.entries:
        return None
    return objects, units * UNIT
