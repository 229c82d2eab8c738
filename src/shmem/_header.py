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
     10    2  kind        0 raw block (later: list, array)
     12    4  flags       bit 0: auto-remove (created with track=True)
     16    8  size        the size the creator asked for; size + 4096 <= file size
     24    8  block_id    random: tells apart two blocks that had the same name
     32    8  pid         creator's pid            \\
     40    8  start_time  creator's start time      > who made it (platform.ProcessIdentity)
     48    8  pid_ns      creator's pid namespace  /
     56    8  created_ns  creation time, ns since the epoch
     64    4  crc32       of bytes 0..63
     68    4  ready       0 while being created; READY once complete (written last)
     72 4024  reserved    zero (kind-specific headers will live at 256)

Creating a block (``_memory.SharedMemory._create``): open the name with
O_EXCL; write the whole trailer page with ``ready = 0`` - one write that
takes the file from empty to its full size with the header in place, so no
reader ever sees a full-size file without its header; reserve the memory;
write ``ready`` last. An attacher that finds the file empty or not ready
gets FileNotFoundError: it never sees a partly created block. Bytes 0..67
never change afterwards, so a reader needs no lock. It is still hostile input: another process, or another user's
program, may have written anything there. ``parse`` copies it once, checks
the magic, checksum, version and sizes against the real file size, and only
the returned copy is used.
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from typing import NamedTuple, Optional

from ._errors import CorruptSegment
from ._platform import ProcessIdentity

TRAILER_SIZE = 4096
_ALIGN = 4096
MAGIC = b"\x93SHMEM\r\n"
VERSION = 1

KIND_RAW = 0
KIND_NAMES = {KIND_RAW: "raw"}

FLAG_AUTO_REMOVE = 1

_FIXED = struct.Struct("<8sHHIQQQQQQ")  # bytes 0..63
_CRC = struct.Struct("<I")  # bytes 64..67
READY_OFFSET = _FIXED.size + _CRC.size  # bytes 68..71
READY = b"REDY"
HEADER_BYTES = READY_OFFSET + len(READY)
_ALL = struct.Struct("<8sHHIQQQQQQI4s")  # the three above in one go, for parse


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

    @property
    def auto_remove(self) -> bool:
        return bool(self.flags & FLAG_AUTO_REMOVE)

    @classmethod
    def new(cls, size: int, *, kind: int, track: bool, creator: ProcessIdentity) -> Header:
        return cls(
            kind=kind,
            flags=FLAG_AUTO_REMOVE if track else 0,
            size=size,
            # Only tells apart blocks that had the same name: no need for a syscall's randomness.
            block_id=random.getrandbits(64),
            creator=creator,
            created_ns=time.time_ns(),
        )

    def pack_page(self) -> bytes:
        """The whole trailer page, not ready yet."""
        fixed = _FIXED.pack(
            MAGIC, VERSION, self.kind, self.flags, self.size, self.block_id, *self.creator, self.created_ns
        )
        return (fixed + _CRC.pack(zlib.crc32(fixed))).ljust(TRAILER_SIZE, b"\0")

    @staticmethod
    def trailer_offset(file_size: int) -> int:
        return file_size - TRAILER_SIZE

    @classmethod
    def read(cls, fd: int, file_size: int, name: str) -> Optional[Header]:
        """The header of the open block ``fd``, or None if shmem did not make it."""
        if file_size < TRAILER_SIZE:
            return None
        return cls.parse(os.pread(fd, HEADER_BYTES, file_size - TRAILER_SIZE), file_size, name)

    @classmethod
    def parse(cls, raw: bytes, file_size: int, name: str) -> Optional[Header]:
        """The header in ``raw`` (the first HEADER_BYTES of the trailer of a file of
        ``file_size`` bytes), or None when the block is not one shmem made.

        Raises CorruptSegment when the magic is there but the rest does not add up.
        """
        if file_size < TRAILER_SIZE or len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
            return None
        _, version, kind, flags, size, block_id, pid, start, pidns, created, crc, ready = _ALL.unpack_from(raw)
        if zlib.crc32(raw[: _FIXED.size]) != crc:
            raise CorruptSegment(f"shared memory block {name!r}: header checksum mismatch (overwritten?)")
        if version != VERSION:
            raise CorruptSegment(
                f"shared memory block {name!r}: header version {version}, this shmem reads {VERSION}; "
                "upgrade shmem in every process that shares it"
            )
        if kind not in KIND_NAMES:
            raise CorruptSegment(f"shared memory block {name!r}: unknown kind {kind}")
        if size <= 0 or total_size(size) > file_size:
            raise CorruptSegment(
                f"shared memory block {name!r}: header claims {size} bytes, the file holds {file_size}"
            )
        return cls(kind, flags, size, block_id, ProcessIdentity(pid, start, pidns), created, ready == READY)
