"""The queue's plain codec (small builtins without pickle): C and twin agree byte for byte,
a round trip gives back exactly what pickle would, hostile bytes give CorruptSegment (never a
crash, never anything but builtins), and what the codec cannot keep is pickled instead."""

from __future__ import annotations

import collections
import enum
import math
import pickle
import struct
from typing import Any, Callable, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmem
from shmem._kinds import queue_layout, queue_plain, queue_ring

C = queue_ring.ACCELERATED
if C:
    from shmem import _queue


def codecs() -> List[Any]:
    """(encode, decode) of each implementation in this build: the twin, and C when built."""
    found = [(queue_plain.encode, queue_plain.decode)]
    if C:
        found.append((_queue.plain_encode, _queue.plain_decode))
    return found


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (a NaN equal to a NaN, -0.0 not to 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:  # in order (a NaN key is found by identity alone: compare pairwise)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a.items(), b.items()))
    return bool(a == b)


scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=True) | st.text() | st.binary()
hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.lists(inner).map(tuple), max_leaves=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner) | st.lists(inner).map(tuple) | st.dictionaries(hashable, inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_both_codecs_give_the_same_bytes_and_back_what_pickle_gives(obj: Any) -> None:
    encodings = [encode(obj) for encode, _ in codecs()]
    assert all(e == encodings[0] for e in encodings), "C and the twin disagree"
    data = encodings[0]
    if data is None:  # outside the codec: an int beyond 64 bits, a lone surrogate, too deep
        return
    for _, decode in codecs():
        assert same(decode(data), pickle.loads(pickle.dumps(obj)))


def _outcome(decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return ("ok", decode(data))
    except shmem.CorruptSegment as err:
        return ("corrupt", str(err))


def _damaged(data: bytes) -> Any:
    """Strategies for ``data`` with one byte changed, cut short, or grown."""
    if not data:
        return st.just(data)
    return st.one_of(
        st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
            lambda change: data[: change[0]] + bytes([change[1]]) + data[change[0] + 1 :]
        ),
        st.integers(0, len(data) - 1).map(lambda n: data[:n]),
        st.binary(min_size=1, max_size=4).map(lambda extra: data + extra),
    )


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | values.map(lambda v: queue_plain.encode(v) or b"").flatmap(_damaged))
def test_hostile_bytes_give_the_same_object_or_corrupt_segment_from_both(data: bytes) -> None:
    outcomes = [_outcome(decode, data) for _, decode in codecs()]
    assert all(same(o, outcomes[0]) for o in outcomes), outcomes


@pytest.mark.parametrize(
    "data, cause",
    [
        (bytes([queue_plain.LIST]) + struct.pack("=I", 0xFFFFFFFF), "count past its end"),  # no 4 G allocation
        (bytes([queue_plain.DICT]) + struct.pack("=I", 3) + b"\0" * 5, "count past its end"),
        (bytes([queue_plain.STR]) + struct.pack("=I", 2) + b"\xff\xfe", "not UTF-8"),
        (bytes([queue_plain.TUPLE, 1, 0, 0, 0]) * 17 + b"\0", "nests too deep"),
        (bytes([queue_plain.DICT, 1, 0, 0, 0, queue_plain.LIST, 0, 0, 0, 0, 0]), "unhashable"),
        (bytes([42]), "unknown type"),
        (b"\0\0", "past its end"),
        (b"", "cut short"),
    ],
)
def test_each_kind_of_damage_is_named(data: bytes, cause: str) -> None:
    for _, decode in codecs():
        with pytest.raises(shmem.CorruptSegment, match=cause):
            decode(data)


class Colour(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


def test_what_the_codec_cannot_keep_is_pickled_and_arrives_as_pickle_gives_it() -> None:
    shared: List[int] = [1]
    cycle: List[Any] = []
    cycle.append(cycle)
    deep: Any = 0
    for _ in range(20):
        deep = (deep,)
    q = shmem.Queue()
    for obj in (
        Colour.RED,
        Point(1, 2),
        collections.OrderedDict(a=1),
        collections.defaultdict(int, a=1),
        2**70,
        "\ud800",
        deep,
        1 + 2j,
        bytearray(b"ab"),
    ):
        q.put(obj)
        got = q.get(timeout=10)
        assert type(got) is type(obj) and (got == obj or got != got), obj
    q.put([shared, shared])
    two = q.get(timeout=10)
    assert two[0] is two[1], "sharing within one object is kept (pickled)"
    q.put(cycle)
    back = q.get(timeout=10)
    assert back[0] is back
    q.put({"id": 7, "v": [1.5, math.inf], "s": "é"})
    raw = q._core.get(0)  # a dict of builtins: no pickle
    assert raw is not None and raw[0] == queue_layout.TAG_PLAIN
    assert same(queue_plain.decode(raw[1]), {"id": 7, "v": [1.5, math.inf], "s": "é"})
    q.close()


def test_a_small_object_goes_as_a_plain_record_and_comes_back_by_recv_bytes_as_its_pickle() -> None:
    q = shmem.Queue()
    q.put((1, 2.0, "abc"))
    raw: Optional[Any] = q._core.get(0)
    assert raw is not None and raw[0] == queue_layout.TAG_PLAIN
    assert queue_plain.decode(raw[1]) == (1, 2.0, "abc")
    q.put({"k": None})
    assert pickle.loads(q.recv_bytes()) == {"k": None}
    q.close()


def test_a_damaged_plain_record_in_the_ring_is_corrupt_segment_and_the_queue_goes_on() -> None:
    q = shmem.Queue(capacity=1024)
    q.put((1, 2))
    q.put("after")
    other = shmem.SharedMemory(q.name)
    assert other.buf is not None
    other.buf[queue_layout.RING + queue_layout.REC] = 77  # the first record's type byte
    with pytest.raises(shmem.CorruptSegment, match="unknown type"):
        q.get(timeout=10)
    assert q.get(timeout=10) == "after"
    other.close()
    q.close()
