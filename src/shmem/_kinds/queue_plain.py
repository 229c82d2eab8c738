"""The plain codec: the small builtin objects most messages are made of, without pickle.

A queue's ``put`` encodes an object this way when it is made only of these
types (exact types, not subclasses), and pickles it otherwise; the record's
tag says which (``queue_layout``). Encoding and decoding take a few hundred
nanoseconds less than pickle each for a small tuple or dict, and decoding
makes nothing but these builtins, whatever the bytes. All lengths are u32, all
numbers in the machine's byte order (little-endian where shmem builds)::

    0  None        1  False       2  True
    3  int         i64 (an int outside it: pickled)
    4  float       f64
    5  str         u32 length, UTF-8 (a str with lone surrogates: pickled)
    6  bytes       u32 length, the bytes
    7  tuple       u32 count, the items
    8  list        u32 count, the items
    9  dict        u32 count, then key and value of each, in order

Containers nest at most 16 deep. A list or dict met twice in one object (shared,
or a cycle) makes the object pickled instead, as do more than 64 lists and dicts
in all: pickle keeps sharing, this codec would not. (Tuples, strs and numbers
that an object holds twice come out as two equal objects: nothing can tell,
but ``is``.)

This is the twin of ``src/shmem/_plain.h`` (C): the same bytes for the same
object, the same object - or CorruptSegment - for the same bytes.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, List, Optional, Tuple

from .. import _platform
from .._errors import CorruptSegment

VERSION = 1  # the format above: the C twin's PLAIN_VERSION must match

MAX_DEPTH = 16
MAX_CONTAINERS = 64
NONE, FALSE, TRUE, INT, FLOAT, STR, BYTES, TUPLE, LIST, DICT = range(10)

_I64 = struct.Struct("=q")
_F64 = struct.Struct("=d")
_U32 = struct.Struct("=I")
_HEAD = struct.Struct("=BI")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_U32_MAX = 0xFFFFFFFF


class _Outside(Exception):
    """The object is not made of the codec's types alone: pickle it."""


def encode(obj: Any) -> Optional[bytes]:
    """``obj``'s plain encoding, or None when it must be pickled instead."""
    out: List[bytes] = []
    try:
        _encode(obj, out, [], 0)
    except _Outside:
        return None
    return b"".join(out)


def _encode(obj: Any, out: List[bytes], seen: List[Any], depth: int) -> None:
    kind = type(obj)
    if obj is None or obj is False or obj is True:
        out.append(bytes((NONE if obj is None else FALSE if obj is False else TRUE,)))
    elif kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise _Outside
        out += (b"\x03", _I64.pack(obj))
    elif kind is float:
        out += (b"\x04", _F64.pack(obj))
    elif kind is str:
        try:
            data = obj.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raise _Outside from None
        _sized(STR, data, out)
    elif kind is bytes:
        _sized(BYTES, obj, out)
    elif depth >= MAX_DEPTH:
        raise _Outside
    elif kind is tuple:
        _count(TUPLE, len(obj), out)
        for item in obj:
            _encode(item, out, seen, depth + 1)
    elif kind is list or kind is dict:
        if any(obj is other for other in seen) or len(seen) == MAX_CONTAINERS:
            raise _Outside
        seen.append(obj)
        if kind is list:
            _count(LIST, len(obj), out)
            for item in obj:
                _encode(item, out, seen, depth + 1)
        else:
            _count(DICT, len(obj), out)
            for key, value in obj.items():
                _encode(key, out, seen, depth + 1)
                _encode(value, out, seen, depth + 1)
    else:
        raise _Outside


def _count(kind: int, n: int, out: List[bytes]) -> None:
    if n > _U32_MAX:
        raise _Outside
    out.append(_HEAD.pack(kind, n))


def _sized(kind: int, data: bytes, out: List[bytes]) -> None:
    _count(kind, len(data), out)
    out.append(data)


def decode(data: Any) -> Any:
    """The object the plain encoding ``data`` holds. CorruptSegment (a ValueError)
    when the bytes do not add up; nothing but builtins is ever made."""
    view = memoryview(data).cast("B")
    obj, at = _decode(view, 0, 0)
    if at != len(view):
        raise _bad("has bytes past its end")
    return obj


def _bad(what: str) -> CorruptSegment:
    return CorruptSegment(f"queue ring is damaged: a plain record {what}")


def _decode(view: memoryview, at: int, depth: int) -> Tuple[Any, int]:
    if at >= len(view):
        raise _bad("is cut short")
    kind = view[at]
    at += 1
    if kind <= TRUE:
        return (None, False, True)[kind], at
    if kind in (INT, FLOAT):
        if len(view) - at < 8:
            raise _bad("is cut short")
        return (_I64 if kind == INT else _F64).unpack_from(view, at)[0], at + 8
    if kind in (STR, BYTES):
        n, at = _length(view, at, 1, "has a length past its end")
        raw = bytes(view[at : at + n])
        if kind == BYTES:
            return raw, at + n
        try:
            return raw.decode("utf-8"), at + n
        except UnicodeDecodeError:
            raise _bad("has a string that is not UTF-8") from None
    if kind in (TUPLE, LIST, DICT):
        if depth >= MAX_DEPTH:
            raise _bad("nests too deep")
        n, at = _length(view, at, 2 if kind == DICT else 1, "has a count past its end")
        if kind == DICT:
            out: dict[Any, Any] = {}
            for _ in range(n):
                key, at = _decode(view, at, depth + 1)
                value, at = _decode(view, at, depth + 1)
                try:
                    out[key] = value
                except TypeError:
                    raise _bad("has an unhashable dict key") from None
            return out, at
        items = []
        for _ in range(n):
            item, at = _decode(view, at, depth + 1)
            items.append(item)
        return (tuple(items) if kind == TUPLE else items), at
    raise _bad("holds an unknown type")


def _length(view: memoryview, at: int, least_each: int, what: str) -> Tuple[int, int]:
    if len(view) - at < 4:
        raise _bad(what)
    n: int = _U32.unpack_from(view, at)[0]
    at += 4
    if n * least_each > len(view) - at:
        raise _bad(what)
    return n, at


__all__ = ["MAX_CONTAINERS", "MAX_DEPTH", "VERSION", "decode", "encode", "fast_decode", "fast_encode"]


#: ``encode``/``decode`` in C (``shmem._queue``) when it is built, else the functions above:
#: what the queue and the object store call. Chosen here rather than in ``queue_ring``, so
#: that ``shmem.put`` does not import the queue (a third of a fresh process's first put).
fast_encode: Callable[[Any], Optional[bytes]] = encode
fast_decode: Callable[[Any], Any] = decode
if not _platform.PURE_REQUESTED:
    try:
        from .. import _queue
    except ImportError:  # queue_ring says so, and fails under SHMEM_REQUIRE_SPEEDUPS
        pass
    else:
        if getattr(_queue, "PLAIN_VERSION", None) == VERSION:
            _queue._set_corrupt(CorruptSegment)  # what its decode raises for damaged bytes
            fast_encode, fast_decode = _queue.plain_encode, _queue.plain_decode
