"""The array header is hostile input: every forged or foreign header is refused
with a shmem error naming the block, and nothing is mapped as an array.

A forger here rewrites the kind header of a real array block and fixes both
checksums, so the block's own header checks pass and only the array header's
checks stand between the forgery and NumPy.
"""

from __future__ import annotations

import gc
import json
import multiprocessing.shared_memory
import os
import struct
import zlib

import pytest

np = pytest.importorskip("numpy")

import shmem
from shmem._kinds import array as _array
from shmem._core.header import EXTRA_OFFSET, TRAILER_SIZE

from _forge import forge_kind_header
from conftest import SHM_DIR


# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")




def _header(shape, dtype_text, *, magic=b"\x93SHMARR\n", version=1, order=b"C", ndim=None, nbytes=None,
            dtype_len=None, itemsize=8) -> bytes:
    """An array header with any field set to anything."""
    text = dtype_text if isinstance(dtype_text, bytes) else json.dumps(dtype_text).encode()
    if nbytes is None:
        nbytes = itemsize
        for n in shape:
            nbytes *= n
    fixed = struct.pack("<8sHcBIQ", magic, version, order, len(shape) if ndim is None else ndim,
                        len(text) if dtype_len is None else dtype_len, nbytes)
    return fixed + b"".join(struct.pack("<q", n) for n in shape) + text


@pytest.fixture
def block():
    """A real 10 x float64 array block, made untracked; yields its name."""
    arr = shmem.zeros(10, track=False)
    name = arr.name
    del arr
    gc.collect()
    yield name
    _array._forget_all()
    shmem.SharedMemory(name, track=False).unlink()


def test_the_forger_makes_valid_headers(block: str) -> None:
    forge_kind_header(block, _header((2, 5), "<i8"))
    arr = shmem.attach_array(block)
    assert (arr.shape, arr.dtype) == ((2, 5), np.dtype("<i8"))


FORGERIES = {
    "wrong-magic": (_header((10,), "<f8", magic=b"\x93NUMPY\0\0"), "wrong magic"),
    "short": (b"\x93SHMARR\n\x01\x00", "wrong magic"),
    "version": (_header((10,), "<f8", version=2), "version 2"),
    "order": (_header((10,), "<f8", order=b"X"), "memory order"),
    "too-many-dims": (_header((1,) * 65, "<f8"), "65 dimensions"),
    "ndim-lies": (_header((10,), "<f8", ndim=3), "announces"),
    "dtype-len-lies": (_header((10,), "<f8", dtype_len=200), "announces"),
    "negative-dim": (_header((-10,), "<f8", nbytes=80), "negative dimension"),
    "negative-and-zero-dim": (_header((0, -1), "<f8", nbytes=0), "negative dimension"),
    "larger-than-block": (_header((1000,), "<f8"), "larger than the block"),
    "overflowing-shape": (_header((1 << 62, 1 << 62, 1 << 62), "<f8", nbytes=0), "not the announced"),
    "nbytes-lies": (_header((10,), "<f8", nbytes=8), "not the announced"),
    "huge-itemsize": (_header((1,), "|S4096", itemsize=4096), "larger than the block"),
    "object-dtype": (_header((10,), "|O", itemsize=8), "object"),
    "object-field": (_header((10,), {"names": ["a"], "formats": ["|O"], "offsets": [0], "titles": [None],
                                     "itemsize": 8, "aligned": False}), "object"),
    "unknown-dtype": (_header((10,), "<q8"), "unknown dtype"),
    "comma-dtype": (_header((10,), "<f8,<i8"), "unknown dtype"),
    "dtype-not-json": (_header((10,), b"<f8"), "unreadable dtype"),
    "dtype-not-ascii": (_header((10,), b'"\xff\xfe"'), "unreadable dtype"),
    "dtype-number": (_header((10,), 8), "unknown dtype description"),
    "dtype-dict-extra-key": (_header((10,), {"base": "<f8", "shape": [1], "code": "x"}), "unknown dtype description"),
    "field-past-record": (_header((10,), {"names": ["a"], "formats": ["<f8"], "offsets": [4], "titles": [None],
                                          "itemsize": 8, "aligned": False}), "does not fit"),
    "bool-as-int": (_header((10,), {"names": ["a"], "formats": ["<f8"], "offsets": [False], "titles": [None],
                                    "itemsize": 8, "aligned": False}), "bad field offset"),
    "names-count": (_header((10,), {"names": ["a", "b"], "formats": ["<f8"], "offsets": [0], "titles": [None],
                                    "itemsize": 8, "aligned": False}), "bad field formats"),
    # json refuses this deep a nesting (RecursionError) or not (Python >= 3.13): refused either way
    "nesting-bomb": (_header((10,), ("[" * 1800 + "]" * 1800).encode()), "unreadable dtype|unknown dtype description"),
    "deep-dtype": (_header((10,), json.loads('{"base":' * 20 + '"<f8"' + ',"shape":[1]}' * 20)), "too deep"),
}


@pytest.mark.parametrize("extra, message", list(FORGERIES.values()), ids=list(FORGERIES))
def test_forged_array_header_raises_corrupt_segment_naming_the_block(block: str, extra: bytes, message: str) -> None:
    forge_kind_header(block, extra)
    for readonly in (False, True):
        with pytest.raises(shmem.CorruptSegment, match=message) as info:
            shmem.attach_array(block, readonly=readonly)
        assert block in str(info.value) and isinstance(info.value, ValueError)
        assert isinstance(info.value, shmem.ShmemError)


def test_a_forged_header_leaves_nothing_mapped(block: str, shm_prefix: str) -> None:
    forge_kind_header(block, _header((1000,), "<f8"))
    with pytest.raises(shmem.CorruptSegment):
        shmem.attach_array(block)
    with open("/proc/self/maps") as f:
        assert not [line for line in f if block in line]


def test_raw_shmem_block_has_no_array_header() -> None:
    raw = shmem.SharedMemory(create=True, size=4096)
    with pytest.raises(shmem.CorruptSegment, match="no array header.*made with shmem") as info:
        shmem.attach_array(raw.name)
    assert raw.name in str(info.value)
    raw.close()
    raw.unlink()


def test_standard_library_block_has_no_array_header(shm_name) -> None:
    std = multiprocessing.shared_memory.SharedMemory(shm_name(), create=True, size=8192)
    try:
        with pytest.raises(shmem.CorruptSegment, match="no array header.*not made by shmem"):
            shmem.attach_array(std.name)
    finally:
        std.close()
        std.unlink()


def test_forged_block_size_cannot_stretch_the_array(shm_name) -> None:
    """The block header's size is checked against the file by the core; the
    array's bytes against that size here: together nothing maps past the file."""
    arr = shmem.zeros(512, track=False, name=shm_name())  # 4096 bytes: exactly one page
    name = arr.name
    del arr
    _array._forget_all()
    gc.collect()
    forge_kind_header(name, _header((513,), "<f8"))
    with pytest.raises(shmem.CorruptSegment, match="larger than the block"):
        shmem.attach_array(name)
    shmem.SharedMemory(name, track=False).unlink()
