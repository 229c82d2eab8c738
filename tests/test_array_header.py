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
import random
import struct
import subprocess
import textwrap
from typing import Dict, Iterator

import pytest
from _forge import forge_kind_header
from conftest import PYTHON

import shmem
from shmem._core.block import Block
from shmem._errors import CorruptSegment
from shmem._kinds import array_layout

np = pytest.importorskip("numpy")
arrays = pytest.importorskip("shmem._kinds.array")
array_mappings = pytest.importorskip("shmem._kinds.array_mappings")
array_dtype = pytest.importorskip("shmem._kinds.array_dtype")


# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")


def _header(
    shape,
    dtype_text,
    *,
    magic=b"\x93SHMARR\n",
    version=1,
    order=b"C",
    ndim=None,
    nbytes=None,
    dtype_len=None,
    itemsize=8,
) -> bytes:
    """An array header with any field set to anything."""
    text = dtype_text if isinstance(dtype_text, bytes) else json.dumps(dtype_text).encode()
    if nbytes is None:
        nbytes = itemsize
        for n in shape:
            nbytes *= n
    fixed = struct.pack(
        "<8sHcBIQ",
        magic,
        version,
        order,
        len(shape) if ndim is None else ndim,
        len(text) if dtype_len is None else dtype_len,
        nbytes,
    )
    return fixed + b"".join(struct.pack("<q", n) for n in shape) + text


@pytest.fixture
def block():
    """A real 10 x float64 array block, made untracked; yields its name."""
    arr = shmem.zeros(10, track=False)
    name = arr.name
    del arr
    gc.collect()
    yield name
    array_mappings.drop_cached_mappings()
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
    "object-field": (
        _header(
            (10,),
            {"names": ["a"], "formats": ["|O"], "offsets": [0], "titles": [None], "itemsize": 8, "aligned": False},
        ),
        "object",
    ),
    "unknown-dtype": (_header((10,), "<q8"), "unknown dtype"),
    "comma-dtype": (_header((10,), "<f8,<i8"), "unknown dtype"),
    "dtype-not-json": (_header((10,), b"<f8"), "unreadable dtype"),
    "dtype-not-ascii": (_header((10,), b'"\xff\xfe"'), "unreadable dtype"),
    "dtype-number": (_header((10,), 8), "unknown dtype description"),
    "dtype-dict-extra-key": (_header((10,), {"base": "<f8", "shape": [1], "code": "x"}), "unknown dtype description"),
    "field-past-record": (
        _header(
            (10,),
            {"names": ["a"], "formats": ["<f8"], "offsets": [4], "titles": [None], "itemsize": 8, "aligned": False},
        ),
        "does not fit",
    ),
    "bool-as-int": (
        _header(
            (10,),
            {"names": ["a"], "formats": ["<f8"], "offsets": [False], "titles": [None], "itemsize": 8, "aligned": False},
        ),
        "bad field offset",
    ),
    "names-count": (
        _header(
            (10,),
            {
                "names": ["a", "b"],
                "formats": ["<f8"],
                "offsets": [0],
                "titles": [None],
                "itemsize": 8,
                "aligned": False,
            },
        ),
        "bad field formats",
    ),
    # json refuses this deep a nesting (RecursionError) or not (Python >= 3.13): refused either way
    "nesting-bomb": (_header((10,), ("[" * 1800 + "]" * 1800).encode()), "unreadable dtype|unknown dtype description"),
    "deep-dtype": (_header((10,), json.loads('{"base":' * 20 + '"<f8"' + ',"shape":[1]}' * 20)), "too deep"),
    # Issue 10: NumPy refused these ("array is too big", "maximum supported dimension")
    # after every check had passed; each is CorruptSegment before NumPy sees it.
    "zero-beside-huge": (_header((0, 1 << 40, 1 << 40), "<f8"), "too big"),
    "ndim-64-zero-beside-huge": (_header((0,) + (4,) * 63, "<f8"), "too big"),
    "ndim-64-plus-subarray": (_header((1,) * 64, {"base": "<f8", "shape": [2]}, itemsize=16), "65 dimensions"),
    "subarray-zero-beside-huge": (_header((1 << 40,), {"base": "<f8", "shape": [0, 1 << 40]}, itemsize=0), "too big"),
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
    """The message names the kind found and the call that opens it."""
    raw = shmem.SharedMemory(create=True, size=4096)
    try:
        with pytest.raises(shmem.CorruptSegment, match="no array header.*raw block made with shmem") as info:
            shmem.attach_array(raw.name)
        assert f"open it with shmem.SharedMemory({raw.name!r})" in str(info.value)
    finally:
        raw.close()
        raw.unlink()


def test_list_block_names_shareable_list() -> None:
    """Issue 10: this advised shmem.SharedMemory."""
    sl = shmem.ShareableList([1, "two", 3.0])
    try:
        with pytest.raises(shmem.CorruptSegment, match="no array header.*list block made with shmem") as info:
            shmem.attach_array(sl.shm.name)
        assert f"open it with shmem.ShareableList(name={sl.shm.name!r})" in str(info.value)
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_standard_library_block_has_no_array_header(shm_name) -> None:
    std = multiprocessing.shared_memory.SharedMemory(shm_name(), create=True, size=8192)
    try:
        with pytest.raises(shmem.CorruptSegment, match="no array header.*not made by shmem") as info:
            shmem.attach_array(std.name)
        assert f"open it with shmem.SharedMemory({std.name!r})" in str(info.value)
        assert "shmem.zeros" not in str(info.value)
    finally:
        std.close()
        std.unlink()


def test_forged_block_size_cannot_stretch_the_array(shm_name) -> None:
    """The block header's size is checked against the file by the core; the
    array's bytes against that size here: together nothing maps past the file."""
    arr = shmem.zeros(512, track=False, name=shm_name())  # 4096 bytes: exactly one page
    name = arr.name
    del arr
    array_mappings.drop_cached_mappings()
    gc.collect()
    forge_kind_header(name, _header((513,), "<f8"))
    with pytest.raises(shmem.CorruptSegment, match="larger than the block"):
        shmem.attach_array(name)
    shmem.SharedMemory(name, track=False).unlink()


# ================================================================ one hostile block never breaks the listing
#
# Issue 9: a checksummed array header whose dtype description is JSON null, 1,
# true or deep nesting made list_segments(), inspect_segment(), `shmem ls` and
# `shmem info` raise TypeError / RecursionError - one hostile file broke the
# listing for every user. Each such block is listed as "corrupt" instead, and
# attach_array refuses it with CorruptSegment.

# A kind header holds at most 3,840 bytes: these are the deepest nestings that fit.
# (The codec itself is tested with 10,000 levels below.)
_DEEP = 1900
HOSTILE_DTYPES = {
    "null": b"null",
    "one": b"1",
    "true": b"true",
    "float": b"1.5",
    "empty-list": b"[]",
    "empty-dict": b"{}",
    "nested-lists": b"[" * _DEEP + b"]" * _DEEP,
    "unclosed-lists": b"[" * 3800,
    "nested-dicts": b'{"a":' * 600 + b"1" + b"}" * 600,
    "nested-subarrays": b'{"base":' * 150 + b'"<f8"' + b',"shape":[1]}' * 150,
    "brackets-in-a-string": b'"[[[[{{{{"',
    "null-fields": json.dumps(
        {"names": None, "formats": None, "offsets": None, "titles": None, "itemsize": None, "aligned": None}
    ).encode(),
    "null-format": json.dumps(
        {"names": ["a"], "formats": [None], "offsets": [0], "titles": [None], "itemsize": 8, "aligned": False}
    ).encode(),
    "null-subarray": json.dumps({"base": None, "shape": None}).encode(),
    "huge-int": json.dumps({"base": "<f8", "shape": [10**300]}).encode(),
}


@pytest.fixture
def hostile_blocks() -> Iterator[Dict[str, str]]:
    """One real array block per hostile dtype description, forged; yields name -> case."""
    made = {}
    try:
        for case in HOSTILE_DTYPES:
            arr = shmem.zeros(10, track=False)
            made[arr.name] = case
            del arr
        array_mappings.drop_cached_mappings()
        gc.collect()
        for name, case in made.items():
            forge_kind_header(name, _header((10,), HOSTILE_DTYPES[case]))
        yield made
    finally:
        array_mappings.drop_cached_mappings()
        for name in made:
            shmem.SharedMemory(name, track=False).unlink()


def test_hostile_dtype_descriptions_are_listed_as_corrupt(hostile_blocks: Dict[str, str]) -> None:
    listed = {s.name: s for s in shmem.list_segments(include_foreign=True)}
    shmem.list_segments()  # the default listing (corrupt blocks are hidden there) goes on too
    for name, case in hostile_blocks.items():
        assert listed[name].kind == "corrupt", case
        assert "array header" in listed[name].detail, (case, listed[name].detail)
        inspected = shmem.inspect_segment(name)
        assert inspected.kind == "corrupt" and inspected.detail == listed[name].detail, case


def test_hostile_dtype_descriptions_are_refused_on_attach(hostile_blocks: Dict[str, str]) -> None:
    for name, case in hostile_blocks.items():
        for readonly in (False, True):
            with pytest.raises(shmem.CorruptSegment, match="corrupt array header") as info:
                shmem.attach_array(name, readonly=readonly)
            assert name in str(info.value), case


# `python -m shmem ...` with NumPy unimportable, as where it is not installed.
WITHOUT_NUMPY = (
    "import runpy, sys; sys.modules['numpy'] = None; runpy.run_module('shmem', run_name='__main__', alter_sys=True)"
)


@pytest.mark.parametrize("numpy", ["with-numpy", "without-numpy"])
def test_the_cli_lists_hostile_blocks_as_corrupt(hostile_blocks: Dict[str, str], numpy: str) -> None:
    command = [PYTHON, "-m", "shmem"] if numpy == "with-numpy" else [PYTHON, "-c", WITHOUT_NUMPY]

    def shmem_cli(*args: str) -> str:
        run = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, (args, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
        return run.stdout

    shmem_cli("ls")
    table = shmem_cli("ls", "--all")
    listed = {r["name"]: r for r in json.loads(shmem_cli("ls", "--all", "--json"))}
    for name, case in hostile_blocks.items():
        assert listed[name]["kind"] == "corrupt", case
        assert name in table
        if case in ("null", "one", "true", "nested-lists", "unclosed-lists"):  # the (info scans /proc)
            info = json.loads(shmem_cli("info", name, "--json"))
            assert info["kind"] == "corrupt" and "array header" in info["detail"], case
            assert "corrupt" in shmem_cli("info", name)


LISTING_WITHOUT_NUMPY = textwrap.dedent(
    """
    import json, sys
    sys.modules["numpy"] = None          # as if NumPy were not installed
    import shmem
    names = sys.argv[1:]
    listed = {s.name: s for s in shmem.list_segments(include_foreign=True)}
    print(json.dumps({name: [listed[name].kind, listed[name].detail, shmem.inspect_segment(name).kind]
                      for name in names}))
    assert "numpy" not in sys.modules or sys.modules["numpy"] is None
    """
)


def test_the_listing_describes_arrays_without_numpy(hostile_blocks: Dict[str, str]) -> None:
    good = shmem.zeros((3, 4), dtype="<f4", order="F")
    rec = shmem.zeros(2, dtype=[("x", "<f8"), ("y", "<i2")])
    names = [*hostile_blocks, good.name, rec.name]
    run = subprocess.run(
        [PYTHON, "-c", LISTING_WITHOUT_NUMPY, *names], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    for name in hostile_blocks:
        assert seen[name][0] == seen[name][2] == "corrupt", (hostile_blocks[name], seen[name])
    assert seen[good.name] == ["array", "<f4 (3, 4) F", "array"]
    assert seen[rec.name] == ["array", "structured (2,) C", "array"]
    good.unlink()
    rec.unlink()


# ================================================================ the codec on its own (no block, no NumPy)


def test_the_codec_refuses_10000_levels_of_nesting() -> None:
    for text in (
        b"[" * 10_000 + b"]" * 10_000,
        b"[" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"base":' * 10_000 + b'"<f8"' + b',"shape":[1]}' * 10_000,
    ):
        extra = _header((10,), text)
        with pytest.raises(CorruptSegment, match="nested"):
            array_layout.unpack(extra)
        with pytest.raises(CorruptSegment, match="corrupt array header"):
            array_layout.describe(extra)
        with pytest.raises(CorruptSegment):
            array_dtype.read_header(extra, 80)


@pytest.mark.parametrize("case", list(HOSTILE_DTYPES))
def test_describe_raises_only_corrupt_segment_on_hostile_dtypes(case: str) -> None:
    extra = _header((10,), HOSTILE_DTYPES[case])
    with pytest.raises(CorruptSegment):
        array_layout.describe(extra)
    with pytest.raises(CorruptSegment):
        array_dtype.read_header(extra, 80)


@pytest.mark.parametrize("extra, message", list(FORGERIES.values()), ids=list(FORGERIES))
def test_describe_refuses_every_forgery_attach_refuses(extra: bytes, message: str) -> None:
    """One codec: what attach_array refuses, the listing calls corrupt (with the block's size)."""
    with pytest.raises(CorruptSegment, match=message):
        array_layout.describe(extra, 80)


DESCRIBED = [
    ("<f8", (1000, 3), "C", "<f8 (1000, 3) C"),
    (">i2", (), "C", ">i2 () C"),
    ("U5", (0, 7), "F", "<U5 (0, 7) F"),
    ("M8[25s]", (4,), "C", "<M8[25s] (4,) C"),
    ([("x", "<f8"), ("grid", "<f4", (2, 3))], (5,), "C", "structured (5,) C"),
    (("<i4", (2, 2)), (3,), "C", "<i4 (3, 2, 2) C"),  # NumPy folds a subarray dtype into the shape
    (np.dtype({"names": ["a"], "formats": [("<i4", (2,))], "itemsize": 8}), (1,), "C", "structured (1,) C"),
]


@pytest.mark.parametrize("dtype, shape, order, text", DESCRIBED, ids=[d[3] for d in DESCRIBED])
def test_describe_reads_what_create_writes(dtype, shape, order, text) -> None:
    arr = shmem.zeros(shape, dtype=dtype, order=order)
    try:
        header = Block.attach(arr.name, track=False, readonly=True).header
        assert array_layout.describe(header.extra, header.size) == text
        meta = array_dtype.read_header(header.extra, header.size)
        assert np.empty(meta.shape, meta.dtype).dtype == arr.dtype
        assert shmem.inspect_segment(arr.name).detail == text
    finally:
        arr.unlink()


_FUZZ_DTYPES = [
    "<f8",
    np.dtype([("x", "<f8"), ("name", "<U4"), ("grid", "<i2", (2, 3)), ("t", "<M8[ns]")]),
    np.dtype(("<f4", (2,))),
    np.dtype([("outer", [("a", "u1"), ("b", ">c8")]), (("title", "t"), "<f4")], align=True),
]
_JUNK = [
    None,
    True,
    False,
    0,
    1,
    -1,
    1.5,
    10**30,
    "",
    "<f8",
    "|O",
    "<U0",
    "x",
    [],
    {},
    [None],
    {"a": 1},
    ["<f8"],
    [[[[[]]]]],
]


def _mutate_tree(value, rng: random.Random):
    """``value`` (a parsed dtype description) with one part replaced by junk."""
    if rng.random() < 0.3 or not isinstance(value, (list, dict)) or not value:
        return rng.choice(_JUNK)
    if isinstance(value, list):
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_tree(value[i], rng)] + value[i + 1 :]
    key = rng.choice(sorted(value))
    mutated = dict(value)
    if rng.random() < 0.1:
        del mutated[key]
    else:
        mutated[key] = _mutate_tree(value[key], rng)
    return mutated


def _mutate_text(text: bytes, rng: random.Random) -> bytes:
    data = bytearray(text)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        if rng.random() < 0.5 and where < len(data):
            data[where] = rng.choice(b'[]{}",:0123456789-eE.ntfrulasO<>|\\ ')
        elif rng.random() < 0.5 and where < len(data):
            del data[where]
        else:
            data.insert(where, rng.choice(b'[]{}",:1'))
    return bytes(data)


def test_damaged_headers_raise_only_corrupt_segment() -> None:
    """Random damage to valid headers - to the dtype description's JSON tree,
    to its text, to any byte: the codec describes them or raises CorruptSegment,
    never anything else. Whatever attach_array's reader accepts, the listing
    describes; the reader may refuse more (NumPy's own rules, e.g. the
    alignment of an aligned struct, are checked by NumPy)."""
    rng = random.Random(9)
    valid = []
    for dtype in _FUZZ_DTYPES:
        dtype, text = array_dtype.shareable(dtype)
        valid.append((dtype.itemsize, text))
    outcomes = {"described": 0, "corrupt": 0}
    for i in range(3000):
        itemsize, text = rng.choice(valid)
        if i % 3 == 0:
            extra = _header((3, 4), json.dumps(_mutate_tree(json.loads(text), rng)).encode(), itemsize=itemsize)
        elif i % 3 == 1:
            extra = _header((3, 4), _mutate_text(text, rng), itemsize=itemsize)
        else:
            extra = _mutate_text(_header((3, 4), text, itemsize=itemsize), rng)
        try:
            array_layout.describe(extra, 10_000)
        except CorruptSegment:
            described = False
        else:
            described = True
        try:
            array_dtype.read_header(extra, 10_000)
        except CorruptSegment:
            read = False
        else:
            read = True
        assert described or not read, extra
        outcomes["described" if described else "corrupt"] += 1
    assert min(outcomes.values()) > 20, outcomes  # both ways were exercised
