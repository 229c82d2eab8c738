"""ShareableList (issue #3): the standard library's API, its defects fixed,
hostile headers refused, and what a list does beyond it.

Parity tests run on shmem and the standard library alike (``BOTH``): both must
pass. Each defect fix runs on both with ``implementations()``: the standard
library variant is a strict xfail, so it must fail there. Every block is named
under the test's prefix (``shm_name()`` for the standard library, which ignores
the prefix variable). A standard-library handle that only *attaches* is kept
out of its resource tracker (``stdlib_untracked``), which would otherwise
unlink the block when the test run ends (gh-82300).
"""

from __future__ import annotations

import ast
import contextlib
import enum
import json
import math
import multiprocessing.shared_memory
import os
import pickle
import random
import re
import struct
import subprocess
import textwrap
import time
import tracemalloc
from multiprocessing import resource_tracker
from typing import Any, Callable, Iterator, List

import pytest
from _forge import forge_kind_header, peek, poke, trailer_offset
from conftest import PYTHON, SHM_DIR, blocks_with_prefix, implementations, run_to_completion, wait_until

import shmem
from shmem._core.header import EXTRA_OFFSET
from shmem._kinds.raw import block_of

STDLIB = multiprocessing.shared_memory
BOTH = [pytest.param(shmem.shared_memory, id="shmem"), pytest.param(STDLIB, id="stdlib")]
CREATORS = [pytest.param(shmem.shared_memory, id="made-by-shmem"), pytest.param(STDLIB, id="made-by-stdlib")]
W = 8  # the layout's word


# ================================================================ helpers


def tagged(value: Any) -> Any:
    """A value with its exact type (True == 1 == 1.0, but they are different values)."""
    return (type(value), value)


def tagged_list(values: Any) -> List[Any]:
    return [tagged(v) for v in values]


@contextlib.contextmanager
def stdlib_untracked() -> Iterator[None]:
    """Standard-library attaches in here are not registered with its resource
    tracker (gh-82300) - even those that fail after opening the block, which
    ``resource_tracker.unregister`` after the fact could not reach."""
    real = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None  # type: ignore[assignment]
    try:
        yield
    finally:
        resource_tracker.register = real  # type: ignore[assignment]


def attach(impl: Any, name: str) -> Any:
    """``impl.ShareableList(name=name)``, a standard-library one kept untracked."""
    if impl is STDLIB:
        with stdlib_untracked():
            return impl.ShareableList(name=name)
    return impl.ShareableList(name=name)


def close(sl: Any) -> None:
    """shmem lists have close(); the standard library's only through .shm."""
    getattr(sl, "close", sl.shm.close)()


@pytest.fixture(name="lists")
def lists_fixture(shm_name: Callable[[], str]) -> Iterator[Callable[..., Any]]:
    """``lists``: ``make(impl, sequence)``, a list created under the test's prefix;
    every one is closed and unlinked (through its creator) after the test. Other
    test modules import ``lists_fixture`` to use it."""
    made: List[Any] = []

    def make(impl: Any, sequence: Any) -> Any:
        name = shm_name()
        try:
            sl = impl.ShareableList(sequence, name=name)
        except BaseException:
            if impl is STDLIB and os.path.exists(f"{SHM_DIR}/{name}"):
                # The standard library leaves the block it made before failing
                # (the test reports that); remove it now, not after the leak guard's wait.
                os.unlink(f"{SHM_DIR}/{name}")
                resource_tracker.unregister(f"/{name}", "shared_memory")
            raise
        made.append(sl)
        return sl

    yield make
    for sl in made:
        close(sl)
        with contextlib.suppress(FileNotFoundError):
            sl.shm.unlink()


def raw(sl: Any) -> bytes:
    return bytes(sl.shm.buf)


# ---------------------------------------------------------------- the layout, drawn in list_layout.py


def n_items(buf: Any) -> int:
    return struct.unpack_from("q", buf, 0)[0]


def data_start(buf: Any) -> int:
    return (n_items(buf) + 2) * W


def data_len(buf: Any) -> int:
    n = n_items(buf)
    return struct.unpack_from("q", buf, (n + 1) * W)[0]


def offset_of(buf: Any, i: int) -> int:
    return struct.unpack_from("q", buf, (1 + i) * W)[0]


def format_at(buf: Any, i: int) -> int:
    return data_start(buf) + data_len(buf) + i * W


def code_at(buf: Any, i: int) -> int:
    return data_start(buf) + data_len(buf) + n_items(buf) * W + i


#: The list's kind header in the trailer (at EXTRA_OFFSET): magic, version, N, ext offset.
#: The tests' own reading of the drawing, so that the codec cannot drift from it unseen.
KIND_HEADER = struct.Struct("<8sH6xqq")


def kind_header(name: str) -> tuple:
    return KIND_HEADER.unpack(peek(name, trailer_offset(name) + EXTRA_OFFSET, KIND_HEADER.size))


def ext_offset(name: str) -> int:
    """Byte offset of the per-item (sequence, exact length) words of a shmem-made list."""
    return kind_header(name)[3]


# ================================================================ API parity


def test_importable_from_both_places() -> None:
    assert shmem.ShareableList is shmem.shared_memory.ShareableList
    assert repr(shmem.ShareableList).startswith("<class 'shmem.ShareableList'")
    assert "ShareableList" in shmem.__all__ and "ShareableList" in shmem.shared_memory.__all__


@pytest.mark.parametrize("impl", BOTH)
def test_seed_uses_range_and_a_string(impl: Any, lists: Any) -> None:
    numbers = lists(impl, range(4))
    assert list(numbers) == [0, 1, 2, 3] and len(numbers) == 4 and numbers.format == "qqqq"
    letters = lists(impl, "alpha")
    assert list(letters) == ["a", "l", "p", "h", "a"] and letters.format == "8s" * 5


def test_seed_two_workers_fill_halves_then_sum(mp_context: Any) -> None:
    """ShareableList(range(2000)); one worker attaches by name, the other gets
    the list itself (pickled under spawn and forkserver); the parent sums."""
    from _list_workers import fill

    sl = shmem.ShareableList(range(2000))
    workers = [
        mp_context.Process(target=fill, args=(sl.shm.name, 0, 1000)),
        mp_context.Process(target=fill, args=(sl, 1000, 2000)),
    ]
    run_to_completion(workers)
    assert sum(sl) == sum(i * i for i in range(2000))
    assert sl[1999] == 1999 * 1999 and sl[0] == 0
    sl.close()
    sl.unlink()


FORMAT_CASES = {
    "empty": [],
    "ints": [0, -1, 2**63 - 1, -(2**63)],
    "floats": [1.5, -0.0, math.inf],
    "bools": [True, False],
    "none": [None, None],
    "bytes": [b"", b"x", b"1234567", b"12345678", b"x" * 17],
    "ascii": ["", "a", "abcdefg", "abcdefgh", "x" * 15, "x" * 16],
    "mixed": [1, "abc", 2.5, None, True, b"xy", "a" * 9],
}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_format_is_the_standard_librarys(case: str, lists: Any) -> None:
    values = FORMAT_CASES[case]
    mine, theirs = lists(shmem, values), lists(STDLIB, values)
    assert mine.format == theirs.format
    struct.calcsize(mine.format)  # a valid struct format
    assert " " not in mine.format  # shmem's exact-length mark stays internal


@pytest.mark.parametrize("impl", BOTH)
def test_values_round_trip_with_their_types(impl: Any, lists: Any) -> None:
    """Every kind of value either library represents, read back with its exact type;
    empty str and bytes and the int64 extremes are right in both libraries."""
    values = [
        0,
        1,
        -1,
        2**63 - 1,
        -(2**63),
        1.5,
        -0.0,
        math.inf,
        -math.inf,
        1e308,
        True,
        False,
        None,
        "",
        "abc",
        "abcdefgh",
        "h\u00e9llo",
        "\u20ac",
        b"",
        b"\xff\x00\x01",
        b"12345678",
    ]
    sl = lists(impl, values)
    assert tagged_list(sl) == tagged_list(values)
    assert tagged_list(sl[i] for i in range(len(values))) == tagged_list(values)
    assert math.copysign(1.0, sl[6]) == -1.0
    nan = lists(impl, [math.nan])
    assert math.isnan(nan[0])


@pytest.mark.parametrize("impl", BOTH)
def test_len_iteration_and_negative_indices(impl: Any, lists: Any) -> None:
    sl = lists(impl, [10, "b", 2.5, None])
    assert len(sl) == 4
    assert [x for x in sl] == [10, "b", 2.5, None]
    assert (sl[-1], sl[-2], sl[-4]) == (None, 2.5, 10)
    sl[-1] = 7
    sl[-4] = "z"
    assert list(sl) == ["z", "b", 2.5, 7]
    empty = lists(impl, [])
    assert len(empty) == 0 and list(empty) == [] and empty.format == ""


@pytest.mark.parametrize("impl", BOTH)
def test_index_past_the_end_raises_index_error(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "a", None])
    before = raw(sl)
    for index in (3, 4, 10**6):
        with pytest.raises(IndexError):
            sl[index]
        with pytest.raises(IndexError):
            sl[index] = 0
    assert raw(sl) == before


@pytest.mark.parametrize("impl", implementations("a negative index below -len reads and writes next to the items"))
def test_negative_index_below_minus_len_raises_index_error(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "a", None])
    before = raw(sl)
    for index in (-4, -5):
        with pytest.raises(IndexError):
            sl[index]
        with pytest.raises(IndexError):
            sl[index] = 0
    assert raw(sl) == before


def test_index_error_names_the_index_asked_for(lists: Any) -> None:
    """As list does ("list index out of range"), the message may omit the index,
    but one it gives must be the one the caller used."""
    sl = lists(shmem, [1, 2, 3])
    for index in (3, 7, -4, -9):
        for access in ("get", "set"):
            with pytest.raises(IndexError) as info:
                if access == "get":
                    sl[index]
                else:
                    sl[index] = 0
            numbers = [int(x) for x in re.findall(r"-?\d+", str(info.value))]
            assert numbers in ([], [index]), f"{access} {index}: {info.value}"


@pytest.mark.parametrize("impl", BOTH)
def test_count_and_index(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "a", True, 1.0, None, "a", b"a"])
    assert sl.count(1) == 3  # 1 == True == 1.0, as in a list
    assert (sl.count("a"), sl.count(b"a"), sl.count(None), sl.count("zz")) == (2, 1, 1, 0)
    assert (sl.index("a"), sl.index(None), sl.index(b"a"), sl.index(True)) == (1, 4, 6, 0)
    with pytest.raises(ValueError):
        sl.index("zz")


@pytest.mark.parametrize("impl", BOTH)
def test_assignment_changes_type_within_the_slot(impl: Any, lists: Any) -> None:
    """What the standard library allows: any number/bool/None into any slot,
    and a str or bytes into any slot it fits (8 bytes in a number's slot)."""
    sl = lists(impl, [1, "abcdefghijk", None, 2.5, b"xyz", True])
    assert sl.format == "q16sxxxxxx?xd8sxxxxxxx?"
    sl[0] = "abcdefgh"
    sl[1] = 5
    sl[2] = b"12345678"
    sl[3] = True
    sl[4] = None
    sl[5] = 2.5
    assert tagged_list(sl) == tagged_list(["abcdefgh", 5, b"12345678", True, None, 2.5])
    assert sl.format == "8sq8sxxxxxxx?xxxxxx?xd"
    sl[1] = "x" * 16  # a number in a str's slot leaves the slot its size
    sl[0] = 7
    sl[2] = "\u00e9\u00e9\u00e9\u00e9"  # 8 bytes of UTF-8
    sl[3] = b""
    assert tagged_list(sl) == tagged_list([7, "x" * 16, "\u00e9\u00e9\u00e9\u00e9", b"", None, 2.5])
    assert sl.format == "q16s8s8sxxxxxx?xd"


@pytest.mark.parametrize("impl", BOTH)
def test_value_larger_than_its_slot_raises_value_error_and_changes_nothing(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "abc", b"x" * 9, None])
    before = raw(sl)
    for index, value in [(0, "abcdefghi"), (1, "x" * 9), (1, "\u00e9" * 5), (2, b"y" * 17), (3, b"123456789")]:
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[index] = value
    assert raw(sl) == before
    assert list(sl) == [1, "abc", b"x" * 9, None]


@pytest.mark.parametrize("impl", BOTH)
def test_repr(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "a", None, b"x", 2.5, True])
    assert repr(sl) == f"ShareableList([1, 'a', None, b'x', 2.5, True], name={sl.shm.name!r})"


@pytest.mark.parametrize("impl", BOTH)
def test_shm_attribute_and_attach_by_name(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "abc"])
    assert isinstance(sl.shm, impl.SharedMemory)
    other = attach(impl, sl.shm.name)
    assert other.shm.name == sl.shm.name and list(other) == [1, "abc"]
    other[1] = "xyz"
    assert sl[1] == "xyz"
    assert impl.ShareableList[int] is not None  # generic alias, as in the standard library
    close(other)


@pytest.mark.parametrize("impl", BOTH)
def test_missing_and_existing_names(impl: Any, lists: Any, shm_name: Any) -> None:
    with pytest.raises(FileNotFoundError):
        attach(impl, shm_name())
    sl = lists(impl, [1])
    with pytest.raises(FileExistsError):
        impl.ShareableList([2], name=sl.shm.name)
    assert list(sl) == [1]


@pytest.mark.parametrize("impl", BOTH)
def test_signature_sequence_then_keyword_only_name(impl: Any, shm_name: Any) -> None:
    name = shm_name()
    with pytest.raises(TypeError):
        impl.ShareableList([1], name)  # name is keyword-only
    sl = impl.ShareableList(sequence=[1, 2], name=name)
    try:
        assert list(sl) == [1, 2] and sl.shm.name == name
    finally:
        close(sl)
        sl.shm.unlink()


def test_no_arguments_creates_an_empty_list(shm_prefix: str) -> None:
    sl = shmem.ShareableList()
    assert (len(sl), list(sl), sl.format) == (0, [], "")
    assert sl.shm.name.startswith(shm_prefix)
    sl.close()
    sl.unlink()


@pytest.mark.parametrize("impl", implementations("a generator is consumed twice: struct.error, block left behind"))
def test_any_iterable_like_list(impl: Any, lists: Any) -> None:
    sl = lists(impl, (x * 2 for x in range(3)))
    assert list(sl) == [0, 2, 4]
    assert list(lists(impl, {"k": 1})) == ["k"]


# ---------------------------------------------------------------- pickling


def test_pickle_is_small_and_attaches_by_name() -> None:
    sl = shmem.ShareableList([1, "a" * 1000, None])
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(sl, protocol)
        assert len(data) < 200, "a name, not the items"
        copy = pickle.loads(data)
        assert type(copy) is shmem.ShareableList and copy.shm.name == sl.shm.name
        assert copy.equals(sl) and block_of(copy.shm).tracked is True
        copy[0] = protocol
        assert sl[0] == protocol
        copy.close()
    sl.close()
    sl.unlink()


def test_pickle_keeps_track_false() -> None:
    sl = shmem.ShareableList([1], track=False)
    copy = pickle.loads(pickle.dumps(sl))
    assert block_of(copy.shm).tracked is False and block_of(sl.shm).tracked is False
    copy.close()
    sl.close()
    sl.unlink()


# ================================================================ defects fixed


@pytest.mark.parametrize("impl", implementations("gh-96779: trailing NUL bytes are stripped on read"))
def test_str_and_bytes_ending_in_nul_round_trip(impl: Any, lists: Any) -> None:
    values = ["a\0", "\0", "\0" * 8, b"b\0\0", b"\0", b"\0" * 16, "x\0y\0"]
    sl = lists(impl, values)
    assert tagged_list(sl) == tagged_list(values)
    slot = lists(impl, ["x" * 15, b"y" * 15])
    slot[0], slot[1] = "z\0\0", b"\0w\0"  # written into a longer slot
    assert tagged_list(slot) == tagged_list(["z\0\0", b"\0w\0"])
    slot[0], slot[1] = "x" * 15, b"y" * 15  # and a longer value after a shorter one
    assert tagged_list(slot) == tagged_list(["x" * 15, b"y" * 15])


def test_large_bytes_ending_in_nul_round_trip(lists: Any) -> None:
    """Exact round-trip holds for every size (issue #3 names no limit)."""
    value = b"x" * 1_000_000 + b"\0"
    sl = lists(shmem, [value, "y" * 1_000_000 + "\0"])
    assert sl[0] == value
    assert sl[1] == "y" * 1_000_000 + "\0"


@pytest.mark.parametrize("impl", implementations("gh-88336: a str's slot is sized by its characters, not its bytes"))
def test_non_ascii_str_is_sized_by_its_encoded_bytes(impl: Any, lists: Any) -> None:
    values = ["\u20ac" * 6, "\u00e9" * 10, "\U0001f600" * 3, "a\u00e9" * 8]
    assert list(lists(impl, values)) == values


@pytest.mark.parametrize("impl", implementations("unsupported types raise a bare KeyError"))
@pytest.mark.parametrize("bad", [[1], {"a": 1}, object(), 1j, bytearray(b"x"), (1,)], ids=lambda v: type(v).__name__)
def test_unsupported_type_raises_type_error_and_changes_nothing(
    impl: Any, bad: Any, lists: Any, shm_prefix: str
) -> None:
    with pytest.raises(TypeError, match=type(bad).__name__):
        lists(impl, [1, bad])
    assert blocks_with_prefix(shm_prefix) == []  # nothing was created
    sl = lists(impl, [1, "abcdefgh", None])
    before = raw(sl)
    for index in range(3):
        with pytest.raises(TypeError, match=type(bad).__name__):
            sl[index] = bad
    assert raw(sl) == before


@pytest.mark.parametrize("impl", implementations("struct.error, after the item's format was changed"))
@pytest.mark.parametrize("big", [2**63, -(2**63) - 1, 10**30])
def test_int_outside_int64_raises_overflow_error_and_changes_nothing(
    impl: Any, big: int, lists: Any, shm_prefix: str
) -> None:
    with pytest.raises(OverflowError):
        lists(impl, [1, big])
    with pytest.raises(OverflowError):
        lists(impl, ["a", big])
    assert blocks_with_prefix(shm_prefix) == []  # nothing was created, nothing left behind
    sl = lists(impl, ["abcdefgh", 1, None])
    before = raw(sl)
    for index in range(3):
        with pytest.raises(OverflowError):
            sl[index] = big
    assert raw(sl) == before
    assert list(sl) == ["abcdefgh", 1, None]


class Color(enum.IntEnum):
    RED = 1
    BLUE = -(2**63)


class Strange(str):
    def __str__(self) -> str:
        return "not the value"


class MyBytes(bytes):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


SUBCLASSES = [
    (Color.RED, 1),
    (Color.BLUE, -(2**63)),
    (Strange("h\u00e9"), "h\u00e9"),
    (MyBytes(b"a\0"), b"a\0"),
    (MyInt(5), 5),
    (MyFloat(0.5), 0.5),
    (enum.IntFlag("F", "A B").B, 2),
]


@pytest.mark.parametrize("impl", implementations("subclasses raise KeyError"))
def test_subclasses_are_stored_as_their_base_type(impl: Any, lists: Any) -> None:
    values = [v for v, _ in SUBCLASSES]
    expected = tagged_list(e for _, e in SUBCLASSES)
    sl = lists(impl, values)
    assert tagged_list(sl) == expected
    sl2 = lists(impl, [0, "xxxxxxx", b"xxx", 0, 0.0, 0])
    for i, (value, _) in enumerate(SUBCLASSES[1:]):  # assignment too
        sl2[i] = value
    assert tagged_list(sl2) == expected[1:]


@pytest.mark.parametrize("impl", implementations("NumPy scalars raise KeyError"))
def test_numpy_scalars_are_stored_as_their_base_type(impl: Any, lists: Any) -> None:
    np = pytest.importorskip("numpy")
    pairs = [
        (np.int8(-5), -5),
        (np.int64(-(2**63)), -(2**63)),
        (np.uint8(200), 200),
        (np.uint64(2**63 - 1), 2**63 - 1),
        (np.int32(7), 7),
        (np.float32(1.5), 1.5),
        (np.float64(-0.25), -0.25),
        (np.bool_(True), True),
        (np.bool_(False), False),
        (np.str_("h\u00e9"), "h\u00e9"),
        (np.bytes_(b"ab"), b"ab"),
    ]
    sl = lists(impl, [v for v, _ in pairs])
    assert tagged_list(sl) == tagged_list(e for _, e in pairs)
    for i, (value, _) in enumerate(pairs[:9]):  # assignment too, into a float's slot
        sl[5] = value
        assert tagged(sl[5]) == tagged(pairs[i][1])
    assert tagged_list(lists(impl, np.arange(3))) == tagged_list([0, 1, 2])
    with pytest.raises(OverflowError):
        sl[0] = np.uint64(2**64 - 1)
    with pytest.raises(TypeError):
        sl[0] = np.complex128(1j)


def test_slot_too_large_for_a_format_raises_value_error_or_round_trips(lists: Any, shm_prefix: str) -> None:
    """A str/bytes whose slot needs a format longer than 8 characters ("100000008s"):
    the standard library asserts; shmem must store it, or refuse it with a
    ValueError before creating anything - never create a list it cannot read."""
    value = b"x" * 100_000_001
    try:
        sl = lists(shmem, [value, 7])
    except ValueError:
        assert blocks_with_prefix(shm_prefix) == []
        return
    assert sl[1] == 7 and sl[0] == value


# ================================================================ hostile headers


def _check_corrupt(impl: Any, name: str, action: Callable[[], Any]) -> BaseException:
    """``action`` raises a ValueError naming the block; shmem's is CorruptSegment."""
    with pytest.raises(ValueError) as info:
        action()
    assert name in str(info.value), f"the error does not name the block: {info.value!r}"
    if impl is not STDLIB:
        assert isinstance(info.value, shmem.CorruptSegment)
    return info.value


SAMPLE = ["abcdefghijk", 12345, 2.5, None, b"xy", True]


def _sample_with_header_claim(lists: Any, creator: Any, offset_of_word: Callable[[Any], int], value: int) -> str:
    sl = lists(creator, SAMPLE)
    struct.pack_into("q", sl.shm.buf, offset_of_word(sl.shm.buf), value)
    return sl.shm.name


COUNT_CLAIMS = {
    "count-1e7": 10**7,
    "count-negative": -1,
    "count-int64-max": 2**63 - 1,
    "count-int64-min": -(2**63),
    "count-2**61": 2**61,
}


@pytest.mark.parametrize("impl", implementations("header claims are not checked"))
@pytest.mark.parametrize("creator", CREATORS)
@pytest.mark.parametrize("claim", COUNT_CLAIMS)
def test_corrupt_item_count_is_refused_on_attach(impl: Any, creator: Any, claim: str, lists: Any) -> None:
    name = _sample_with_header_claim(lists, creator, lambda buf: 0, COUNT_CLAIMS[claim])
    _check_corrupt(impl, name, lambda: attach(impl, name))


@pytest.mark.parametrize("impl", implementations("a count of 10**7 builds a 10**7-item struct format"))
@pytest.mark.parametrize("creator", CREATORS)
def test_huge_count_is_refused_in_o1_without_allocating(impl: Any, creator: Any, lists: Any) -> None:
    name = _sample_with_header_claim(lists, creator, lambda buf: 0, 10**7)
    attach(shmem, lists(shmem, [1]).shm.name).close()  # warm up: imports, caches
    error: Any = None
    tracemalloc.start()
    try:
        try:
            close(attach(impl, name))
        except Exception as err:  # noqa: BLE001 - judged below
            error = err
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, ValueError) and name in str(error), repr(error)
    assert peak < 1_000_000, f"refusing the header allocated {peak} bytes"


DATA_LEN_CLAIMS = {"past-the-end": 1 << 20, "huge": 2**62, "int64-max": 2**63 - 1, "negative": -8}


@pytest.mark.parametrize("impl", implementations("header claims are not checked"))
@pytest.mark.parametrize("creator", CREATORS)
@pytest.mark.parametrize("claim", DATA_LEN_CLAIMS)
def test_corrupt_data_length_is_refused_on_attach(impl: Any, creator: Any, claim: str, lists: Any) -> None:
    """offsets[N], the end of the data area, points outside the block."""
    name = _sample_with_header_claim(lists, creator, lambda buf: (n_items(buf) + 1) * W, DATA_LEN_CLAIMS[claim])
    _check_corrupt(impl, name, lambda: attach(impl, name))


@pytest.mark.parametrize("impl", implementations("header claims are not checked"))
@pytest.mark.parametrize("creator", CREATORS)
def test_first_offset_not_zero_is_refused_on_attach(impl: Any, creator: Any, lists: Any) -> None:
    name = _sample_with_header_claim(lists, creator, lambda buf: W, 8)
    _check_corrupt(impl, name, lambda: attach(impl, name))


@pytest.mark.parametrize("impl", implementations("a short block raises struct.error"))
def test_block_too_small_for_a_list_is_refused(impl: Any, shm_name: Any) -> None:
    name = shm_name()
    fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"\x01\0\0\0")  # another program's 4-byte block
    os.close(fd)
    try:
        _check_corrupt(impl, name, lambda: attach(impl, name))
    finally:
        os.unlink(f"{SHM_DIR}/{name}")


def _corrupt_item(lists: Any, creator: Any, damage: Callable[[Any], None]) -> str:
    sl = lists(creator, SAMPLE)
    damage(sl.shm.buf)
    return sl.shm.name


def _put(offset: Callable[[Any], int], fmt: str, value: Any) -> Callable[[Any], None]:
    return lambda buf: struct.pack_into(fmt, buf, offset(buf), value)


# damage -> the items it breaks (offsets[i] ends item i-1 and starts item i); the others stay readable
ITEM_DAMAGE = {
    "str-end-past-data": (_put(lambda b: 2 * W, "q", 1 << 20), (0, 1)),
    "str-end-before-start": (_put(lambda b: 2 * W, "q", -8), (0, 1)),
    "float-offset-past-data": (_put(lambda b: 3 * W, "q", 1 << 40), (2,)),
    "float-offset-negative": (_put(lambda b: 3 * W, "q", -(2**63)), (2,)),
    "float-offset-unaligned": (_put(lambda b: 3 * W, "q", 17), (2,)),
    "bool-offset-at-data-end": (_put(lambda b: 6 * W, "q", 56), (5,)),
    "format-garbage": (_put(lambda b: format_at(b, 0), "8s", b"garbage!"), (0,)),
    "format-empty": (_put(lambda b: format_at(b, 1), "8s", b""), (1,)),
    "format-unsigned": (_put(lambda b: format_at(b, 1), "8s", b"Q"), (1,)),
    "format-larger-than-slot": (_put(lambda b: format_at(b, 4), "8s", b"999s"), (4,)),
    "format-negative-size": (_put(lambda b: format_at(b, 0), "8s", b"-16s"), (0,)),
    "str-code-number": (_put(lambda b: code_at(b, 0), "b", 0), (0,)),
    "str-code-unknown": (_put(lambda b: code_at(b, 0), "b", 7), (0,)),
    "bytes-code-none": (_put(lambda b: code_at(b, 4), "b", 3), (4,)),
    "int-code-str": (_put(lambda b: code_at(b, 1), "b", 1), (1,)),
    "none-code-bytes": (_put(lambda b: code_at(b, 3), "b", 2), (3,)),
    "invalid-utf8": (_put(lambda b: data_start(b), "3s", b"\xff\xfe\xfd"), (0,)),
}


@pytest.mark.parametrize("impl", implementations("damaged items raise struct.error, KeyError, or nothing"))
@pytest.mark.parametrize("creator", CREATORS)
@pytest.mark.parametrize("damage", ITEM_DAMAGE)
def test_damaged_item_raises_corrupt_segment_on_access(impl: Any, creator: Any, damage: str, lists: Any) -> None:
    hurt, broken = ITEM_DAMAGE[damage]
    name = _corrupt_item(lists, creator, hurt)
    sl = attach(impl, name)
    try:
        for index in broken:
            err = _check_corrupt(impl, name, lambda: sl[index])
            assert f"item {index}" in str(err)
        _check_corrupt(impl, name, lambda: list(sl))
        for i in range(len(SAMPLE)):
            if i not in broken:
                assert tagged(sl[i]) == tagged(SAMPLE[i])
    finally:
        close(sl)


ANY_VALUE = (1, 2.5, None, True, "a", b"b")
# damage -> the writes it must refuse: (item, values); a slot's start is checked for
# every value, its end for str and bytes
WRITE_DAMAGE = {
    "str-end-past-data": [(0, ("a", b"b")), (1, ANY_VALUE)],
    "str-end-before-start": [(0, ("a", b"b")), (1, ANY_VALUE)],
    "float-offset-past-data": [(2, ANY_VALUE)],
    "float-offset-negative": [(2, ANY_VALUE)],
    "bool-offset-at-data-end": [(5, (1, 2.5, None, True))],
}


@pytest.mark.parametrize("creator", CREATORS)
@pytest.mark.parametrize("damage", WRITE_DAMAGE)
def test_writing_a_damaged_slot_raises_and_writes_nothing(creator: Any, damage: str, lists: Any) -> None:
    name = _corrupt_item(lists, creator, ITEM_DAMAGE[damage][0])
    sl = attach(shmem, name)
    before = raw(sl)
    for index, values in WRITE_DAMAGE[damage]:
        for value in values:
            err = _check_corrupt(shmem, name, lambda: sl.__setitem__(index, value))
            assert f"item {index}" in str(err)
    assert raw(sl) == before
    sl.close()


def _shmem_list(lists: Any) -> str:
    return lists(shmem, SAMPLE).shm.name


KIND_HEADER_DAMAGE = {
    "magic": lambda m, v, n, e: KIND_HEADER.pack(b"notalist", v, n, e),
    "version": lambda m, v, n, e: KIND_HEADER.pack(m, 3, n, e),
    "version-1": lambda m, v, n, e: KIND_HEADER.pack(m, 1, n, e),  # shmem 0.1's layout: 16-bit sequence numbers
    "count": lambda m, v, n, e: KIND_HEADER.pack(m, v, n + 1, e),
    "ext-unaligned": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, e + 4),
    "ext-inside-items": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, 0),
    "ext-negative": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, -8),
    "ext-past-end": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, 1 << 40),
    "truncated": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, e)[:12],
    "empty": lambda m, v, n, e: b"",
}


@pytest.mark.parametrize("damage", KIND_HEADER_DAMAGE)
def test_broken_kind_header_is_refused_on_attach(damage: str, lists: Any) -> None:
    name = _shmem_list(lists)
    forge_kind_header(name, KIND_HEADER_DAMAGE[damage](*kind_header(name)))
    _check_corrupt(shmem, name, lambda: attach(shmem, name))


def test_kind_header_with_a_bad_checksum_is_refused(lists: Any) -> None:
    name = _shmem_list(lists)
    poke(name, trailer_offset(name) + EXTRA_OFFSET + 16, struct.pack("<q", 99))
    _check_corrupt(shmem, name, lambda: attach(shmem, name))


@pytest.mark.parametrize("kind", ["raw", "array"])
def test_a_block_of_another_kind_is_not_a_list(kind: str) -> None:
    from shmem._core.header import KIND_ARRAY

    if kind == "raw":
        block = shmem.SharedMemory(create=True, size=64)
    else:
        from shmem._core.block import Block
        from shmem._kinds.raw import wrap

        block = wrap(Block.create(None, 64, kind=KIND_ARRAY, extra=b"dtype=<f8;shape=8"))
    try:
        err = _check_corrupt(shmem, block.name, lambda: shmem.ShareableList(name=block.name))
        assert kind in str(err)
    finally:
        block.close()
        block.unlink()


# The listing (list_segments, inspect_segment, shmem ls) reads a list's kind header through
# list_layout.describe: a header it cannot read makes the block "corrupt", never an error.
# (A count or extension that only the block's real layout contradicts is caught on attach.)
LISTING_FORGERIES = {
    **{
        damage: KIND_HEADER_DAMAGE[damage]
        for damage in (
            "magic",
            "version",
            "version-1",
            "ext-unaligned",
            "ext-inside-items",
            "ext-negative",
            "truncated",
            "empty",
        )
    },
    "count-negative": lambda m, v, n, e: KIND_HEADER.pack(m, v, -1, e),
    "count-int64-min": lambda m, v, n, e: KIND_HEADER.pack(m, v, -(2**63), e),
    "count-past-ext": lambda m, v, n, e: KIND_HEADER.pack(m, v, 2**62, e),
    "ext-int64-min": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, -(2**63)),
    "longer": lambda m, v, n, e: KIND_HEADER.pack(m, v, n, e) + bytes(8),
    "garbage": lambda m, v, n, e: bytes(range(256)) * 15,  # as long as a kind header can be
    "array-header": lambda m, v, n, e: b"\x93SHMARR\n" + bytes(24),
}


@pytest.mark.parametrize("damage", LISTING_FORGERIES)
def test_a_forged_list_header_is_listed_as_corrupt(damage: str, lists: Any) -> None:
    name = _shmem_list(lists)
    forge_kind_header(name, LISTING_FORGERIES[damage](*kind_header(name)))
    segment = shmem.inspect_segment(name)
    assert segment.kind == "corrupt" and segment.detail, segment
    assert [s.kind for s in shmem.list_segments(include_foreign=True) if s.name == name] == ["corrupt"]
    _check_corrupt(shmem, name, lambda: attach(shmem, name))


def test_shmem_ls_lists_forged_list_headers_as_corrupt(lists: Any) -> None:
    """One run of the command over several forged lists: exit 0, each one corrupt."""
    forged = []
    for damage in ("magic", "empty", "garbage", "count-negative"):
        name = _shmem_list(lists)
        forge_kind_header(name, LISTING_FORGERIES[damage](*kind_header(name)))
        forged.append(name)
    good = _shmem_list(lists)
    for args in (["ls"], ["ls", "--all"]):
        done = subprocess.run([PYTHON, "-m", "shmem", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([PYTHON, "-m", "shmem", "ls", "--all", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = {r["name"]: (r["kind"], r["detail"]) for r in json.loads(done.stdout)}
    assert all(kinds[name][0] == "corrupt" for name in forged), kinds
    assert kinds[good] == ("list", f"{len(SAMPLE)} items")
    for name in (forged[0], good):
        done = subprocess.run([PYTHON, "-m", "shmem", "info", name], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_describe_reads_the_drawn_header_and_raises_only_corrupt_segment() -> None:
    """``list_layout.describe`` on every one-byte change and every truncation of a
    real header, and on random bytes: a description or CorruptSegment, nothing else."""
    from shmem._kinds.list_layout import describe
    from shmem._kinds.list_layout import kind_header as packed

    header = packed(7, 192)  # 7 ints: the extension right after the type codes
    assert header == KIND_HEADER.pack(b"shmlist\0", 2, 7, 192)  # the codec is the drawing
    assert describe(header) == "7 items" and describe(packed(1, 48)) == "1 item"
    rng = random.Random(9)
    candidates = [header[:cut] for cut in range(len(header))]
    candidates += [
        header[:at] + bytes([value]) + header[at + 1 :]
        for at in range(len(header))
        for value in (0, 1, 0x7F, 0x80, 0xFF, header[at] ^ 0x10)
    ]
    candidates += [rng.randbytes(rng.randrange(64)) for _ in range(500)]
    candidates += [header[:10] + rng.randbytes(22) for _ in range(500)]  # any padding, N and ext
    int64 = (-(2**63), 2**63 - 1)
    candidates += [KIND_HEADER.pack(b"shmlist\0", 2, rng.randint(*int64), rng.randint(*int64)) for _ in range(500)]
    for extra in candidates:
        try:
            assert describe(extra).endswith(("item", "items"))
        except shmem.CorruptSegment:
            pass


# ================================================================ beyond the standard library


def test_slices_return_lists() -> None:
    values = [0, "a", 2.5, None, b"x", True, -7]
    with shmem.ShareableList(values) as sl:
        for s in (
            slice(1, 3),
            slice(None),
            slice(None, None, -1),
            slice(1, None, 2),
            slice(-3, -1),
            slice(10, 20),
            slice(5, 1),
            slice(-100, 100),
            slice(None, None, -3),
        ):
            got = sl[s]
            assert type(got) is list and tagged_list(got) == tagged_list(values[s]), s
        with pytest.raises(ValueError):
            sl[::0]
        with pytest.raises(TypeError):
            sl["1"]
        sl.unlink()


def test_any_integer_like_index_as_list_allows() -> None:
    """Anything with __index__: bool, int subclasses, IntEnum, NumPy integers."""
    indices = [True, MyInt(1), Color.RED]
    np = None
    with contextlib.suppress(ImportError):
        import numpy as np  # type: ignore[no-redef]

        indices += [np.int64(1), np.uint8(1)]
    with shmem.ShareableList([0, "a", 2.5]) as sl:
        for index in indices:
            assert sl[index] == "a", repr(index)
            sl[index] = "b"
            assert sl[1] == "b"
            sl[1] = "a"
        sl.unlink()


def test_equals_containment_and_reversed_follow_list() -> None:
    """Value comparison is ``equals`` (``==`` is identity, as in the standard library:
    test_list_parity.py)."""
    with shmem.ShareableList([1, "a", None]) as a, shmem.ShareableList([1, "a", None]) as b:
        assert a.equals([1, "a", None]) and a.equals((1, "a", None)) and a.equals(iter([1, "a", None]))
        assert a.equals(b) and b.equals(a)
        assert not a.equals([1, "a"]) and not a.equals([1, "a", None, 4]) and not a.equals(["1", "a", None])
        assert "a" in a and None in a and 2 not in a and b"a" not in a
        b[0] = 2
        assert not a.equals(b)
        assert list(reversed(a)) == [None, "a", 1]
        assert a.index("a", 1) == 1 and a.index(1, 0, 1) == 0
        with pytest.raises(ValueError):
            a.index(1, 1)
        a.unlink()
        b.unlink()


def test_context_manager_close_and_unlink(shm_name: Any) -> None:
    name = shm_name()
    with shmem.ShareableList([1, "a"], name=name) as sl:
        assert sl.shm.name == name
    assert sl.shm.buf is None  # closed ...
    assert os.path.exists(f"{SHM_DIR}/{name}")  # ... not removed
    again = shmem.ShareableList(name=name)
    assert list(again) == [1, "a"]
    again.close()
    again.close()  # idempotent
    again.unlink()
    assert not os.path.exists(f"{SHM_DIR}/{name}")
    with pytest.raises(FileNotFoundError):
        shmem.ShareableList(name=name)


def test_a_closed_list_raises_value_error() -> None:
    """Like a closed file; in a child, so that a crash shows as a returncode."""
    code = textwrap.dedent(
        """
        import shmem
        sl = shmem.ShareableList([1, 2.5, "abc", None])
        other = shmem.ShareableList(name=sl.shm.name)
        other.close()
        results = []
        for action in (lambda: other[0], lambda: other[1], lambda: other[2], lambda: other[-1],
                       lambda: other[0:2], lambda: list(other), lambda: other.__setitem__(0, 5),
                       lambda: other.__setitem__(1, 1.5), lambda: other.__setitem__(2, "x"),
                       lambda: 1 in other, lambda: other.count(1), lambda: other.equals([1])):
            try:
                action()
                results.append("no error")
            except ValueError:
                results.append("ValueError")
            except Exception as err:
                results.append(type(err).__name__)
        print(results)
        assert sl[0] == 1
        sl.close()
        sl.unlink()
        """
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(["ValueError"] * 12)


def test_a_closed_or_half_built_list_can_still_be_shown_and_closed() -> None:
    sl = shmem.ShareableList([1, "a"])
    name = sl.shm.name
    sl.close()
    assert repr(sl) == f"ShareableList(<closed>, name={name!r})"
    sl.unlink()
    half = shmem.ShareableList.__new__(shmem.ShareableList)  # as left by an __init__ that raised
    assert repr(half) == "ShareableList(<closed>, name=None)"
    half.close()
    half.close()


def test_create_list_puts_its_flags_in_the_block_header() -> None:
    """The manager's way in: a list like any other, marked as the manager's."""
    from shmem._core.header import FLAG_MANAGED
    from shmem._kinds.list import create_list

    with create_list([1, "two", None], flags=FLAG_MANAGED) as sl:
        segment = shmem.inspect_segment(sl.shm.name)
        assert (segment.kind, segment.detail, segment.managed) == ("list", "3 items", True)
        assert list(shmem.ShareableList(name=sl.shm.name)) == [1, "two", None]
        sl.unlink()


@pytest.mark.parametrize("module", ["list", "list_layout"])
def test_the_list_kind_uses_only_public_names_of_other_modules(module: str) -> None:
    """Issue 9: a module's API is its names without underscores; the list kind
    takes nothing else from the layers below it (nor its two modules from each other)."""
    import importlib

    path = importlib.import_module(f"shmem._kinds.{module}").__file__
    assert path is not None
    with open(path) as f:
        tree = ast.parse(f.read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private = [
                alias.name
                for alias in node.names
                if alias.name.startswith("_") and not (node.level and node.module is None)
            ]  # `from .. import _speedups`: a module
            assert not private, f"{module}.py imports {private} from {node.module}"
            modules.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            assert not node.attr.startswith("_") or node.attr.startswith("__"), (
                f"{module}.py uses {node.value.id}.{node.attr}"
            )
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            assert not (node.attr.startswith("_") and not node.attr.startswith("__")), (
                f"{module}.py reaches into another object's private {node.attr}"
            )


# ================================================================ lifecycle


def test_a_list_is_removed_when_its_creator_exits() -> None:
    code = "import shmem; sl = shmem.ShareableList(range(5)); print(sl.shm.name)"
    name = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert name
    assert wait_until(lambda: not os.path.exists(f"{SHM_DIR}/{name}")), "the list outlived its creator"


def test_a_process_that_attached_never_removes_the_list() -> None:
    sl = shmem.ShareableList([1, 2, 3])
    code = f"import shmem; sl = shmem.ShareableList(name={sl.shm.name!r}); sl[0] = sum(sl); sl.close()"
    subprocess.run([PYTHON, "-c", code], check=True, timeout=60)
    code = f"import shmem; sl = shmem.ShareableList(name={sl.shm.name!r}); sl[1] = 20"  # exits without close()
    subprocess.run([PYTHON, "-c", code], check=True, timeout=60)
    time.sleep(0.5)  # time for any reaper to (wrongly) act
    assert os.path.exists(f"{SHM_DIR}/{sl.shm.name}")
    assert list(sl) == [6, 20, 3]
    sl.close()
    sl.unlink()
