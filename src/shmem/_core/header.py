"""The header shmem keeps in every block it creates, and the block's layout.

A block created by shmem is one file in /dev/shm::

    0                      size        round_up(size, 4096)       +4096
    +-----------------------+-----------+---------------------------+
    | user data (buf)       | zero pad  | trailer                   |
    +-----------------------+-----------+---------------------------+

The user's bytes start at offset 0, exactly where the standard library puts
them, so a ``multiprocessing.shared_memory`` process attaching a shmem block
reads and writes the same data (it reports the file's full size, which its
documentation allows: "may be larger or equal to the size requested").
The trailer, in the last 4096 bytes, all integers little-endian::

    off  len  field
      0    8  magic       b"\\x93SHMEM\\r\\n"  (a non-ASCII byte and CR LF, as in PNG)
      8    2  version     1
     10    2  kind        0 raw block, 1 ShareableList, 2 NumPy array, 3 Lock/RLock,
                          4 Event, 5 Condition, 6 (Bounded)Semaphore, 7 Barrier
     12    4  flags       bit 0: auto-remove (created with track=True); bit 1: manager-owned
     16    8  size        the size the creator asked for; size + 4096 <= file size
     24    8  block_id    random: tells apart two blocks that had the same name
     32    8  pid         creator's pid            \\
     40    8  start_time  creator's start time      > who made it (platform.ProcessIdentity)
     48    8  pid_ns      creator's pid namespace  /
     56    8  created_ns  creation time, ns since the epoch
     64    4  extra_len   length of the kind's own header at 256 (at most 3840)
     68    4  extra_crc   crc32 of those bytes
     72    4  crc32       of bytes 0..71
     76    4  ready       b"REDY" (see below)
     80  176  reserved    zero
    256  ...  extra       the kind's own header (arrays: dtype, shape; lists: layout)

Creating a block (``block.Block.create``): an unnamed file in /dev/shm
(O_TMPFILE), reserved to its full size; the header written into its last
page; the kind's initial contents written; then one ``link()`` gives it its name -
atomically, failing with EEXIST if the name is taken. Nobody can open the
block before it is complete, and a creator killed before the link leaves
nothing: the kernel frees an unnamed file with its last descriptor.

``ready`` is part of the page written in one go (shmem 0.1 wrote it last, in a
separate step, and attachers still treat a block without it as not there).
Nothing in the trailer changes afterwards, so a reader needs no lock. It is
still hostile input: another process, or another user's program, may have
written anything there. ``Header.read`` copies it once, checks the magic,
checksum, version and sizes against the real file size, and only the
returned copy is used.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Dict, NamedTuple, Optional, Tuple

from .._errors import CorruptSegment
from .._platform import ProcessIdentity

TRAILER_SIZE = 4096
_ALIGN = 4096
MAGIC = b"\x93SHMEM\r\n"
VERSION = 1

KIND_RAW = 0
KIND_LIST = 1
KIND_ARRAY = 2
KIND_LOCK = 3
KIND_EVENT = 4
KIND_CONDITION = 5
KIND_SEMAPHORE = 6
KIND_BARRIER = 7
KIND_QUEUE = 8
KIND_BROADCAST = 9
KIND_OBJECT = 10
KIND_STORE = 11
KIND_NAMES = {
    KIND_RAW: "raw",
    KIND_LIST: "list",
    KIND_ARRAY: "array",
    KIND_LOCK: "lock",
    KIND_EVENT: "event",
    KIND_CONDITION: "condition",
    KIND_SEMAPHORE: "semaphore",
    KIND_BARRIER: "barrier",
    KIND_QUEUE: "queue",
    KIND_BROADCAST: "broadcast",
    KIND_OBJECT: "object",
    KIND_STORE: "store",
}

FLAG_AUTO_REMOVE = 1
FLAG_MANAGED = 2  # created for a SharedMemoryManager

_FIXED = struct.Struct("<8sHHIQQQQQQII")  # bytes 0..71, the checksummed part
_CRC = struct.Struct("<I")  # bytes 72..75
READY_OFFSET = _FIXED.size + _CRC.size  # bytes 76..79
READY = b"REDY"
HEADER_BYTES = READY_OFFSET + len(READY)
_ALL = struct.Struct("<8sHHIQQQQQQIII4s")  # the three above in one go, for parse
EXTRA_OFFSET = 256
_PAD = bytes(EXTRA_OFFSET - HEADER_BYTES)
# The checksum, the ready mark and the padding up to the kind's header, in one pack.
_TAIL = struct.Struct(f"<I4s{len(_PAD)}x")
_EMPTY_CRC = zlib.crc32(b"")
EXTRA_MAX = TRAILER_SIZE - EXTRA_OFFSET


# Header._parse's answers for the headers read lately, by (fixed header bytes,
# file size): only valid headers are kept, and the kind's header is checked apart.
_PARSED: Dict[Tuple[bytes, int], Tuple[Header, int, int]] = {}
_PARSED_MAX = 64


def forget_parsed() -> None:
    """Forget the fixed headers parsed so far: the next read of each parses it
    again, as a new process would (benchmarks measure a first attach so)."""
    _PARSED.clear()


def total_size(size: int) -> int:
    """Bytes of file needed for ``size`` bytes of user data."""
    return -(-size // _ALIGN) * _ALIGN + TRAILER_SIZE


class Header(NamedTuple):
    kind: int
    flags: int
    size: int
    block_id: int
    creator: ProcessIdentity
    created_ns: int
    ready: bool = False
    extra: bytes = b""  # the kind's own header, checksummed but not interpreted here

    @property
    def auto_remove(self) -> bool:
        return bool(self.flags & FLAG_AUTO_REMOVE)

    @classmethod
    def new(
        cls, size: int, *, kind: int, track: bool, creator: ProcessIdentity, extra: bytes = b"", flags: int = 0
    ) -> Header:
        if len(extra) > EXTRA_MAX:
            raise ValueError(f"a kind header of {len(extra)} bytes does not fit in {EXTRA_MAX}")
        # Positional: this is on every create's path, and keywords cost a microsecond here.
        # block_id only tells apart blocks that had the same name. os.urandom costs 0.6 us
        # more than the random module, whose import cost 1.3 ms of `import shmem`, and is
        # fork-safe by itself. ready: pack() writes the mark with the rest of the header.
        flags |= FLAG_AUTO_REMOVE if track else 0
        return tuple.__new__(
            cls, (kind, flags, size, int.from_bytes(os.urandom(8), "little"), creator, time.time_ns(), True, extra)
        )

    def pack(self) -> bytes:
        """The trailer's bytes up to the end of the kind's header (the rest of
        the page stays zero), ready mark included."""
        # On every create's path: two packs and a checksum, every argument positional
        # (a star-argument call is the slow path, and cost more than the packing).
        kind, flags, size, block_id, (pid, start_time, pid_ns), created_ns, _, extra = self
        fixed = _FIXED.pack(
            MAGIC,
            VERSION,
            kind,
            flags,
            size,
            block_id,
            pid,
            start_time,
            pid_ns,
            created_ns,
            len(extra),
            zlib.crc32(extra) if extra else _EMPTY_CRC,
        )
        packed = fixed + _TAIL.pack(zlib.crc32(fixed), READY)
        return packed + extra if extra else packed

    @staticmethod
    def trailer_offset(file_size: int) -> int:
        return file_size - TRAILER_SIZE

    @classmethod
    def read(cls, fd: int, file_size: int, name: str) -> Optional[Header]:
        """The header of the open block ``fd``, or None when shmem did not make it.

        Raises CorruptSegment when the magic is there but the rest does not add up.
        """
        if file_size < TRAILER_SIZE:
            return None
        # One read for the fixed header and the kind's header: the whole trailer
        # is one page, and a copy of a page costs less than a second system call.
        raw = os.pread(fd, TRAILER_SIZE, file_size - TRAILER_SIZE)
        # A parse depends on nothing but the fixed header's bytes and the file size:
        # a block attached again (a pool's workers, unpickling) skips it.
        key = (raw[:HEADER_BYTES], file_size)
        parsed = _PARSED.get(key)
        if parsed is None:
            parsed = cls._parse(raw, file_size, name)
            if parsed is None:
                return None
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[key] = parsed
        header, extra_len, extra_crc = parsed
        if not extra_len:
            return header
        extra = raw[EXTRA_OFFSET : EXTRA_OFFSET + extra_len]
        if len(extra) != extra_len or zlib.crc32(extra) != extra_crc:
            raise CorruptSegment(f"shared memory block {name!r}: kind header checksum mismatch (overwritten?)")
        return tuple.__new__(Header, header[:-1] + (extra,))

    @classmethod
    def _parse(cls, raw: bytes, file_size: int, name: str) -> Optional[Tuple[Header, int, int]]:
        """The fixed header at the start of ``raw`` with the announced length and
        checksum of the kind's header; None when the magic is missing."""
        if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
            return None
        (_, version, kind, flags, size, block_id, pid, start, pidns, created, extra_len, extra_crc, crc, ready) = (
            _ALL.unpack_from(raw)
        )
        if zlib.crc32(raw[: _FIXED.size]) != crc:
            raise CorruptSegment(f"shared memory block {name!r}: header checksum mismatch (overwritten?)")
        if version != VERSION:
            raise CorruptSegment(
                f"shared memory block {name!r}: header version {version}, this shmem reads {VERSION}; "
                "upgrade shmem in every process that shares it"
            )
        if kind not in KIND_NAMES:
            raise CorruptSegment(f"shared memory block {name!r}: unknown kind {kind}")
        if size <= 0 or -(-size // _ALIGN) * _ALIGN + TRAILER_SIZE > file_size:  # total_size, inlined
            raise CorruptSegment(
                f"shared memory block {name!r}: header claims {size} bytes, the file holds {file_size}"
            )
        if extra_len > EXTRA_MAX:
            raise CorruptSegment(f"shared memory block {name!r}: header claims a kind header of {extra_len} bytes")
        # tuple.__new__: positional, no keyword handling - this is on every attach's path.
        creator = tuple.__new__(ProcessIdentity, (pid, start, pidns))
        header = tuple.__new__(cls, (kind, flags, size, block_id, creator, created, ready == READY, b""))
        return header, extra_len, extra_crc
