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
     68 4028  reserved    zero (kind-specific headers will live at 256)

The header is written before the block gets its name (see
``_platform.create_published``) and never changed afterwards, so a reader
needs no lock. It is still hostile input: another process, or another user's
program, may have written anything there. ``parse`` copies it once, checks
the magic, checksum, version and sizes against the real file size, and only
the returned copy is used.
"""

from __future__ import annotations

import os
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
HEADER_BYTES = _FIXED.size + _CRC.size


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

    @property
    def auto_remove(self) -> bool:
        return bool(self.flags & FLAG_AUTO_REMOVE)

    @classmethod
    def new(cls, size: int, *, kind: int, track: bool, creator: ProcessIdentity) -> Header:
        return cls(
            kind=kind,
            flags=FLAG_AUTO_REMOVE if track else 0,
            size=size,
            block_id=int.from_bytes(os.urandom(8), "little"),
            creator=creator,
            created_ns=time.time_ns(),
        )

    def pack(self) -> bytes:
        fixed = _FIXED.pack(
            MAGIC, VERSION, self.kind, self.flags, self.size, self.block_id, *self.creator, self.created_ns
        )
        return fixed + _CRC.pack(zlib.crc32(fixed))

    @staticmethod
    def trailer_offset(file_size: int) -> int:
        return file_size - TRAILER_SIZE

    @classmethod
    def parse(cls, raw: bytes, file_size: int, name: str) -> Optional[Header]:
        """The header in ``raw`` (the first HEADER_BYTES of the trailer of a file of
        ``file_size`` bytes), or None when the block is not one shmem made.

        Raises CorruptSegment when the magic is there but the rest does not add up.
        """
        if file_size < TRAILER_SIZE or len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
            return None
        fixed = raw[: _FIXED.size]
        (crc,) = _CRC.unpack_from(raw, _FIXED.size)
        if zlib.crc32(fixed) != crc:
            raise CorruptSegment(f"shared memory block {name!r}: header checksum mismatch (overwritten?)")
        _, version, kind, flags, size, block_id, pid, start, pidns, created = _FIXED.unpack(fixed)
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
        return cls(kind, flags, size, block_id, ProcessIdentity(pid, start, pidns), created)
