"""Writing into a block's trailer behind shmem's back, as a damaged or hostile
writer would: the tests' tools for feeding shmem forged headers."""

from __future__ import annotations

import os
import struct
import zlib

from shmem._core.header import EXTRA_OFFSET, TRAILER_SIZE

SHM_DIR = "/dev/shm"


def trailer_offset(name: str) -> int:
    return os.stat(f"{SHM_DIR}/{name}").st_size - TRAILER_SIZE


def poke(name: str, offset: int, data: bytes) -> None:
    fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(name: str, offset: int, size: int) -> bytes:
    fd = os.open(f"{SHM_DIR}/{name}", os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def refix_header_crc(name: str) -> None:
    """Recompute the header checksum after a poke, as a deliberate forger would."""
    base = trailer_offset(name)
    poke(name, base + 72, struct.pack("<I", zlib.crc32(peek(name, base, 72))))


def forge_kind_header(name: str, extra: bytes) -> None:
    """Replace the block's kind header with ``extra``, both checksums fixed."""
    assert len(extra) <= TRAILER_SIZE - EXTRA_OFFSET
    base = trailer_offset(name)
    poke(name, base + EXTRA_OFFSET, extra.ljust(TRAILER_SIZE - EXTRA_OFFSET, b"\0"))
    poke(name, base + 64, struct.pack("<II", len(extra), zlib.crc32(extra)))
    refix_header_crc(name)
