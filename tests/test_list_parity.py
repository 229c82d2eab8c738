"""ShareableList parity with the standard library (issue 10): what code written
against ``multiprocessing.shared_memory`` relies on beyond the documented API.

* A ShareableList is hashable and ``==`` is identity, as in the standard
  library (value comparison is ``equals``).
* ``repr()`` never raises: closed, half-built, damaged or unlinked.
* ``del sl[i]`` raises AttributeError, as there (no ``__delitem__``), on the
  C path too.
* The standard library's private helpers (``_get_packing_format`` - which
  CPython's own tests call - ``_get_back_transform``, ``_allocated_offsets``,
  the ``_offset_*`` and ``_format_*`` properties, ...) answer as its own do,
  from the same block.
* The standard library reading a list shmem made sees shmem's exact-length
  marks in ``format``; that cannot be hidden, and the README says so.

Parity tests run on both libraries (``BOTH``); both must pass.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from test_list import BOTH, CREATORS, STDLIB, attach, close, code_at, lists_fixture  # noqa: F401 - the fixture

import shmem

VALUES = ["howdy", b"HoWdY", -273.154, 100, None, True, 42, "h\u00e9llo w\u00f6rld", b""]


@pytest.mark.parametrize("impl", BOTH)
def test_hashable_and_equal_only_to_itself(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, "a", None])
    other = attach(impl, sl.shm.name)  # the same block, another object
    try:
        assert {sl: 1}[sl] == 1 and hash(sl) == hash(sl)
        assert sl == sl and not sl != sl
        assert sl != other and not sl == other
        assert sl != [1, "a", None] and [1, "a", None] != sl
        assert len({sl, other, sl}) == 2
    finally:
        close(other)


def test_equals_compares_values() -> None:
    with shmem.ShareableList([1, "a", None]) as a, shmem.ShareableList([1, "a", None]) as b:
        assert a != b and a.equals(b) and a.equals([1, "a", None]) and not a.equals([1, "a"])
        a.unlink()
        b.unlink()


@pytest.mark.parametrize("impl", BOTH)
def test_del_item_raises_attribute_error(impl: Any, lists: Any) -> None:
    sl = lists(impl, [1, 2.5, "a"])
    for index in (0, 1, 2, -1, 5, slice(0, 1)):
        with pytest.raises(AttributeError):
            del sl[index]
    assert list(sl) == [1, 2.5, "a"]


@pytest.mark.parametrize("how", ["close", "shm.close", "unlinked", "half-built", "half-attached", "damaged"])
def test_repr_never_raises(how: str, lists: Any) -> None:
    if how == "half-built":  # as left by an __init__ that raised
        sl = shmem.ShareableList.__new__(shmem.ShareableList)
        assert repr(sl) == "ShareableList(<closed>, name=None)"
        return
    sl = lists(shmem, [1, "a"])
    name = sl.shm.name
    if how == "half-attached":  # as left by an attach that raised after opening the block
        half = shmem.ShareableList.__new__(shmem.ShareableList)
        half.shm = shmem.SharedMemory(name)
        assert repr(half) == f"ShareableList(<closed>, name={name!r})"
        half.shm.close()
        return
    expected = f"ShareableList([1, 'a'], name={name!r})"
    if how == "close":
        sl.close()
        expected = f"ShareableList(<closed>, name={name!r})"
    elif how == "shm.close":  # what the standard library's users do; its own repr raises then
        sl.shm.close()
    elif how == "unlinked":
        sl.shm.unlink()
    else:
        sl.shm.buf[code_at(sl.shm.buf, 1)] = 9  # an unknown type code
        expected = f"ShareableList(<unreadable: CorruptSegment>, name={name!r})"
    assert repr(sl) == expected
    if how == "unlinked":
        sl.shm.close()
        sl.shm.unlink = lambda: None  # the fixture's unlink: it is gone already


# ---------------------------------------------------------------- the standard library's private helpers


def test_cpython_basics_test_calls_get_packing_format(lists: Any) -> None:
    """What test_shared_memory_ShareableList_basics does (CPython's own test)."""
    sl = lists(shmem, ["howdy", b"HoWdY", -273.154, 100, None, True, 42])
    current_format = sl._get_packing_format(0)
    sl[0] = "howdy"
    assert current_format == sl._get_packing_format(0) == "8s"
    assert sl.format == "8s8sdqxxxxxx?xxxxxxxx?q"


def _helpers(sl: Any, i: int) -> Any:
    return (
        sl._get_packing_format(i),
        sl._get_packing_format(i - len(VALUES)),
        sl._get_back_transform(i)(b"ab\0\0"),
    )


def _properties(sl: Any) -> Any:
    return (
        sl._list_len,
        sl._allocated_offsets,
        sl._format_size_metainfo,
        sl._format_packing_metainfo,
        sl._format_back_transform_codes,
        sl._offset_data_start,
        sl._offset_packing_formats,
        sl._offset_back_transform_codes,
        sl._alignment,
        sl._types_mapping,
        sorted(sl._back_transforms_mapping),
        [sl._extract_recreation_code(v) for v in ("a", b"a", None, 1, 2.5, True)],
    )


@pytest.mark.parametrize("creator", CREATORS)
def test_private_helpers_answer_as_the_standard_librarys(creator: Any, lists: Any) -> None:
    made = lists(creator, VALUES)
    mine, theirs = attach(shmem, made.shm.name), attach(STDLIB, made.shm.name)
    try:
        assert _properties(mine) == _properties(theirs)
        for i in range(len(VALUES)):
            expected = _helpers(theirs, i)
            if creator is not STDLIB:  # the standard library shows shmem's exact-length mark ("8s ")
                expected = (expected[0].rstrip(" "), expected[1].rstrip(" "), expected[2])
            assert _helpers(mine, i) == expected, i
        for bad in (len(VALUES), -len(VALUES) - 1):
            with pytest.raises(IndexError):
                mine._get_packing_format(bad)
            with pytest.raises(IndexError):
                mine._get_back_transform(bad)
        # Writing through the helper: both read the item by the standard library's rules.
        mine._set_packing_format_and_transform(3, "8s", "text")
        assert theirs._get_packing_format(3) == mine._get_packing_format(3) == "8s"
        mine[3] = 100
        theirs._set_packing_format_and_transform(0, "8s", b"bytes")
        assert mine[0] == theirs[0] == b"howdy"
    finally:
        close(mine)
        close(theirs)


def test_helpers_of_a_closed_list_raise_value_error() -> None:
    sl = shmem.ShareableList([1, "a"])
    sl.close()
    for helper in (sl._get_packing_format, sl._get_back_transform):
        with pytest.raises(ValueError, match="closed"):
            helper(0)
    with pytest.raises(ValueError, match="closed"):
        sl._set_packing_format_and_transform(0, "q", 1)
    sl.unlink()


# ---------------------------------------------------------------- the standard library's view of shmem's format


def test_the_standard_library_sees_the_exact_length_marks_and_the_docs_say_so(lists: Any) -> None:
    """The 8-byte format field is all the standard library shows, and a mark of
    shmem's can live nowhere else without losing exactness (list_layout says
    why): its ``format`` of a list shmem made shows the marks, the size stays."""
    made = lists(shmem, ["howdy", b"HoWdY", -273.154, 100])
    theirs = attach(STDLIB, made.shm.name)
    try:
        assert made.format == "8s8sdq"
        assert theirs.format == "8s 8s dq"
        assert struct.calcsize(theirs.format) == struct.calcsize(made.format)
    finally:
        close(theirs)
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guides" / "shareablelist.md").read_text()
    assert "'8s 8s dq'" in guide, "the ShareableList guide must say it"


# ---------------------------------------------------------------- the same format as the standard library's


def test_a_non_ascii_str_gets_the_standard_librarys_slot_when_it_fits_there(lists: Any) -> None:
    """The standard library sizes a str's slot by its characters (gh-88336): 'encodés'
    (7 characters, 8 bytes) gets "8s", and CPython's own test copies such a list and
    expects the same format. shmem sizes by characters too - only never smaller than
    the UTF-8 bytes, where the standard library would corrupt the text."""
    sl = lists(shmem, ["howdy", "encodés", "\u20ac" * 6, "\U0001f600" * 2])
    assert sl.format == "8s8s24s8s"  # "€" * 6: 18 bytes in 6 characters
    sl[0] = "encodés"  # exactly 8 bytes of UTF-8, as in CPython's test
    copy = lists(shmem, sl)
    assert copy.format == sl.format and list(copy) == ["encodés", "encodés", "\u20ac" * 6, "\U0001f600" * 2]


def test_the_format_is_the_standard_librarys_for_every_value_it_stores_whole(shm_name: Any) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    def whole_in_the_standard_library(value: Any) -> bool:
        size = len(value.encode()) if isinstance(value, str) else len(value)
        return size <= 8 * (len(value) // 8 + 1)  # its slot, sized by characters

    items = st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers(-(2**63), 2**63 - 1), st.none())

    @settings(max_examples=200, deadline=None)
    @given(st.lists(items.filter(lambda v: not isinstance(v, (str, bytes)) or whole_in_the_standard_library(v))))
    def check(values: Any) -> None:
        theirs, mine = STDLIB.ShareableList(values, name=shm_name()), shmem.ShareableList(values)
        try:
            assert mine.format == theirs.format
        finally:
            for sl in (theirs, mine):
                sl.shm.close()
                sl.shm.unlink()

    check()
