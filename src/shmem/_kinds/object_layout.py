"""The codec of an object block (``shmem.put``): where its pickle and its buffers are.

An object too large to travel inside its reference is one block, written
whole before anyone can see it (blocks are published complete)::

    offset 0          the pickle (protocol 5), its out-of-band buffers left out
    each buffer       at a multiple of 64 bytes (a cache line: SIMD loads of
                      an array's data never straddle one)

Kind header (``extra`` of the block's trailer, checksummed with it), all
integers little-endian::

    0   8s  magic b"shmobjct"
    8   H   version (1)
    10  H   buffer count n (at most MAX_BUFFERS)
    12  I   0
    16  Q   pickle length
    24  n x (Q offset, Q length)   each buffer

The header is hostile input: ``parse`` checks every field against the block's
size before anything is read at those offsets; CorruptSegment otherwise.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Sequence, Tuple

from .._core.header import EXTRA_MAX
from .._errors import CorruptSegment

MAGIC = b"shmobjct"
VERSION = 1
ALIGN = 64
_FIXED = struct.Struct("<8sHHIQ")
_BUFFER = struct.Struct("<QQ")
#: The most out-of-band buffers an object block describes (more: the object is pickled in-band).
MAX_BUFFERS = (EXTRA_MAX - _FIXED.size) // _BUFFER.size


class ObjectLayout(NamedTuple):
    pickle_length: int
    buffers: Tuple[Tuple[int, int], ...]  # (offset, length) of each
    size: int  # bytes of block data it needs


def plan(pickle_length: int, buffer_lengths: Sequence[int]) -> ObjectLayout:
    """Where a pickle of ``pickle_length`` bytes and buffers of these lengths go."""
    at = pickle_length
    buffers: List[Tuple[int, int]] = []
    for length in buffer_lengths:
        at = -(-at // ALIGN) * ALIGN
        buffers.append((at, length))
        at += length
    return ObjectLayout(pickle_length, tuple(buffers), max(at, 1))


def kind_header(layout: ObjectLayout) -> bytes:
    if len(layout.buffers) > MAX_BUFFERS:
        raise ValueError(f"{len(layout.buffers)} buffers; an object block describes at most {MAX_BUFFERS}")
    head = _FIXED.pack(MAGIC, VERSION, len(layout.buffers), 0, layout.pickle_length)
    return head + b"".join(_BUFFER.pack(offset, length) for offset, length in layout.buffers)


def parse(extra: bytes, block_size: int) -> ObjectLayout:
    """The layout an object block's kind header describes, every field checked
    against the block's size. CorruptSegment (a ValueError) if anything does not add up."""
    if len(extra) < _FIXED.size:
        raise CorruptSegment("not an object header (too short)")
    magic, version, count, zero, pickle_length = _FIXED.unpack_from(extra)
    if magic != MAGIC:
        raise CorruptSegment("not an object header (wrong magic)")
    if version != VERSION:
        raise CorruptSegment(f"object header version {version}, this shmem reads {VERSION}; upgrade shmem everywhere")
    if zero or count > MAX_BUFFERS or len(extra) != _FIXED.size + count * _BUFFER.size:
        raise CorruptSegment(f"an object header of {len(extra)} bytes does not describe {count} buffers")
    if pickle_length > block_size:
        raise CorruptSegment(f"a pickle of {pickle_length} bytes in a block of {block_size}")
    buffers = tuple(_BUFFER.unpack_from(extra, _FIXED.size + i * _BUFFER.size) for i in range(count))
    for offset, length in buffers:
        if offset < pickle_length or offset > block_size or length > block_size - offset:
            raise CorruptSegment(f"a buffer of {length} bytes at {offset} reaches past a block of {block_size}")
    return ObjectLayout(pickle_length, buffers, block_size)


def describe(extra: bytes, block_size: int) -> str:
    """The listing's description: "pickle 120 B + 2 buffers, 8000016 B"."""
    layout = parse(extra, block_size)
    if not layout.buffers:
        return f"pickle {layout.pickle_length} B"
    total = sum(length for _, length in layout.buffers)
    plural = "s" if len(layout.buffers) != 1 else ""
    return f"pickle {layout.pickle_length} B + {len(layout.buffers)} buffer{plural}, {total} B"


__all__ = ["ALIGN", "MAGIC", "MAX_BUFFERS", "ObjectLayout", "describe", "kind_header", "parse", "plan"]
