"""The block header is hostile input: every inconsistency is refused cleanly."""

from __future__ import annotations

import os
import struct

import pytest
from _forge import poke, refix_header_crc, trailer_offset
from conftest import SHM_DIR

import shmem
from shmem._core.block import Block
from shmem._core.header import EXTRA_OFFSET, KIND_ARRAY
from shmem._kinds.raw import block_of


@pytest.fixture
def block(shm_name):
    shm = shmem.SharedMemory(shm_name(), create=True, size=100, track=False)
    yield shm.name
    shm.close()
    shm.unlink()


def test_typed_block_round_trips_its_kind_header(shm_name) -> None:
    made = Block.create(shm_name(), 64, kind=KIND_ARRAY, extra=b"dtype=<f8;shape=8")
    seen = Block.attach(made.name, readonly=True)
    assert seen.header is not None
    assert (seen.header.kind, seen.header.extra, seen.size) == (KIND_ARRAY, b"dtype=<f8;shape=8", 64)
    with pytest.raises(TypeError):
        seen.mapping[0] = 1  # read-only mapping
    seen.release()
    made.release()
    made.unlink()


@pytest.mark.parametrize(
    "offset,data,refix,message",
    [
        (12, b"\xff", False, "checksum"),  # a flipped flag byte
        (8, struct.pack("<H", 99), True, "version 99"),
        (10, struct.pack("<H", 77), True, "unknown kind"),
        (16, struct.pack("<Q", 1 << 40), True, "claims"),  # size larger than the file
        (16, struct.pack("<Q", 0), True, "claims"),
        (64, struct.pack("<I", 10_000), True, "kind header"),  # extra longer than the trailer
    ],
    ids=["crc", "version", "kind", "size-too-big", "size-zero", "extra-too-long"],
)
def test_corrupted_header_raises_corrupt_segment(
    block: str, offset: int, data: bytes, refix: bool, message: str
) -> None:
    poke(block, trailer_offset(block) + offset, data)
    if refix:
        refix_header_crc(block)
    with pytest.raises(shmem.CorruptSegment, match=message) as info:
        shmem.SharedMemory(block)
    assert block in str(info.value) and isinstance(info.value, ValueError)


def test_corrupted_kind_header_raises_corrupt_segment(shm_name) -> None:
    made = Block.create(shm_name(), 64, track=False, kind=KIND_ARRAY, extra=b"abc")
    poke(made.name, trailer_offset(made.name) + EXTRA_OFFSET, b"x")
    with pytest.raises(shmem.CorruptSegment, match="kind header"):
        shmem.SharedMemory(made.name)
    made.release()
    made.unlink()


def test_block_not_marked_ready_is_not_found(block: str) -> None:
    poke(block, trailer_offset(block) + 76, b"\0\0\0\0")
    with pytest.raises(FileNotFoundError, match="being created"):
        shmem.SharedMemory(block)


def test_foreign_block_is_all_data(shm_name) -> None:
    name = shm_name()
    with open(f"{SHM_DIR}/{name}", "wb") as f:
        f.write(b"x" * 5000)
    shm = shmem.SharedMemory(name)
    assert shm.size == 5000 and block_of(shm).header is None
    shm.close()
    os.unlink(f"{SHM_DIR}/{name}")
