"""The array header's codec: a SharedArray's dtype, shape and memory order, packed and checked - without NumPy.

This is the one codec of the array header. ``array`` writes it when it creates
an array and reads it back (through ``array_dtype``, which turns the checked
dtype description into a NumPy dtype) when it attaches one; the listing
(``shmem ls``, ``list_segments()``, ``shmem info``) describes array blocks with
``describe()`` below. Nothing here imports NumPy: the listing must work where
NumPy is not installed, and must describe any block, whatever it holds.

The array header is the *kind header* (``extra``) of the block's trailer
(``_core.header``). All integers little-endian::

    off        len        field
      0          8        magic      b"\\x93SHMARR\\n"
      8          2        version    1
     10          1        order      b"C" or b"F" (memory order of the whole array)
     11          1        ndim       0 .. 64 (NumPy 1.x reads at most 32)
     12          4        dtype_len  length of the dtype description below
     16          8        nbytes     product(shape) x itemsize: a cross-check of both
     24     8 x ndim      shape      int64 each, >= 0
     24+8*ndim  dtype_len dtype      ASCII JSON, one of (D: a description, nested):
                                       "<f8"                      a plain dtype: its .str, kinds b i u f c S U V M m
                                       {"base": D, "shape": [..]} a subarray dtype, 1 .. 64 dimensions
                                       {"names": [..], "formats": [D, ..], "offsets": [..],
                                        "titles": [..], "itemsize": n, "aligned": bool}
                                                                  a structured dtype
                                     nested at most 16 deep

The header is hostile input: ``Header.read`` copied it once and checked its
checksum, which only proves that whoever wrote it meant to. Every field is
checked here against that copy before anything uses it: magic, version, order,
ndim, exact length, no negative dimension, and the dtype description against
the grammar above, *structurally* - each value's JSON type, each list's
length, each string's form, the nesting depth (measured before ``json`` parses
anything, so a nesting bomb never reaches its recursion). The itemsize follows
from a checked description without NumPy, so nbytes == product(shape) x
itemsize <= the block's size is checked here too (Python integers: no
overflow), and so are NumPy's own limits on the array the header describes -
at most 64 dimensions, the dtype's subarray dimensions included, and
itemsize x every non-zero dimension within a signed 64-bit size, which NumPy
requires even beside a zero dimension - so that NumPy never refuses an array
the header passed ("array is too big"). Object dtypes are outside the grammar: an object pointer read from
shared memory crashes NumPy. Every failure is CorruptSegment, and nothing else.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from .._core.header import EXTRA_MAX
from .._errors import CorruptSegment, UnsupportedDtype

MAGIC = b"\x93SHMARR\n"
VERSION = 1
FIXED = struct.Struct("<8sHcBIQ")  # magic, version, order, ndim, dtype_len, nbytes: 24 bytes
DIM = struct.Struct("<q")
#: The most dimensions a header may hold (NumPy 2's limit; ``array_dtype`` applies NumPy 1's 32).
MAX_DIMS = 64
# The shape field for each ndim, compiled once.
_SHAPES = [struct.Struct(f"<{n}q") for n in range(MAX_DIMS + 1)]
#: Nested structured / subarray dtypes: far beyond real use.
MAX_DTYPE_DEPTH = 16
#: Plain dtype kinds: fixed-size and pointer-free - bool, ints, floats, complex, bytes, str, void, datetimes.
PLAIN_KINDS = "biufcSUVMm"

# A plain dtype's .str: byte order, kind, item size, and a datetime unit such as [ns] or [25s].
_PLAIN_DTYPE = re.compile(r"([<>|=])([biufcSUVMm])([0-9]{1,10})(\[[0-9]{0,10}[A-Za-z]{1,10}\])?\Z")
_OBJECT_DTYPE = re.compile(r"[<>|=]?O")
# A JSON string without escapes: its text is its value.
_SIMPLE_STRING = re.compile(rb'"[^"\\\x00-\x1f]*"\Z')
# Brackets inside JSON strings (field names may hold any text) do not nest.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[][{}]")
# Each level of dtype nesting opens at most two brackets ({"formats": [...]}), the shape list one more.
_MAX_BRACKETS = 2 * (MAX_DTYPE_DEPTH + 1) + 1
_STRUCTURED_KEYS = frozenset({"names", "formats", "offsets", "titles", "itemsize", "aligned"})
_SUBARRAY_KEYS = frozenset({"base", "shape"})
_BIG = 1 << 62  # a bound for offsets, itemsizes and subarray dimensions: no real dtype comes near
#: NumPy's bound on an array: itemsize x its non-zero dimensions fits in a signed size (npy_intp).
MAX_BYTES = sys.maxsize

#: A dtype description as ``json`` gives it back: a str (plain) or a dict (subarray, structured).
Description = Union[str, Dict[str, Any]]


class ArrayHeader(NamedTuple):
    """An array header that passed every check."""

    order: str  # "C" or "F"
    shape: Tuple[int, ...]
    itemsize: int  # of the dtype, as its description gives it
    nbytes: int  # product(shape) x itemsize
    dtype: Description  # checked against the grammar; ``array_dtype.dtype_of`` makes it a NumPy dtype


def nbytes_of(shape: Tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array of ``shape`` and ``itemsize`` (a Python int: never overflows)."""
    total = itemsize
    for n in shape:
        total *= n
    return total


def numpy_bytes(shape: Tuple[int, ...], itemsize: int) -> int:
    """What NumPy checks against MAX_BYTES before it makes an array: itemsize x
    every non-zero dimension. Above it NumPy refuses the shape, even when a
    zero dimension makes the array empty."""
    total = itemsize
    for n in shape:
        total *= n or 1
    return total


def unfold(desc: Description, shape: Tuple[int, ...]) -> Tuple[Description, Tuple[int, ...]]:
    """The dtype and shape NumPy shows for an array of ``shape`` whose dtype has
    the (checked) description ``desc``: a subarray dtype's dimensions move into the shape."""
    while isinstance(desc, dict) and "base" in desc:
        sub: Dict[str, Any] = desc
        desc, shape = sub["base"], shape + tuple(sub["shape"])
    return desc, shape


# ===================================================================== writing


def pack(order: str, shape: Tuple[int, ...], dtype_text: bytes, itemsize: int) -> bytes:
    """The array header of an array of ``shape`` in memory ``order``, whose dtype
    has the description ``dtype_text`` (``array_dtype.shareable`` makes it) and
    ``itemsize``. UnsupportedDtype when dtype and shape do not fit in a header."""
    head = FIXED.pack(MAGIC, VERSION, order.encode("ascii"), len(shape), len(dtype_text), nbytes_of(shape, itemsize))
    extra = head + b"".join(DIM.pack(n) for n in shape) + dtype_text
    if len(extra) > EXTRA_MAX:
        raise UnsupportedDtype(f"this dtype and shape need a {len(extra)}-byte header; at most {EXTRA_MAX} fit")
    return extra


# ===================================================================== reading


def unpack(extra: bytes, block_size: Optional[int] = None) -> ArrayHeader:
    """The array header ``extra`` (already copied out of shared memory), every
    field checked - against the block's size too, when ``block_size`` is given.

    Raises CorruptSegment (a ValueError) saying what does not add up; nothing
    else, whatever ``extra`` holds.
    """
    if len(extra) < FIXED.size or extra[:8] != MAGIC:
        raise CorruptSegment("not an array header (wrong magic)")
    _, version, order_b, ndim, dtype_len, nbytes = FIXED.unpack_from(extra)
    if version != VERSION:
        raise CorruptSegment(f"array header version {version}, this shmem reads {VERSION}; upgrade shmem everywhere")
    if order_b not in (b"C", b"F"):
        raise CorruptSegment(f"bad memory order {order_b!r}")
    if ndim > MAX_DIMS:
        raise CorruptSegment(f"{ndim} dimensions (at most {MAX_DIMS})")
    shape_end = FIXED.size + DIM.size * ndim
    if shape_end + dtype_len != len(extra):
        raise CorruptSegment(f"array header of {len(extra)} bytes announces {shape_end + dtype_len}")
    shape: Tuple[int, ...] = _SHAPES[ndim].unpack_from(extra, FIXED.size)
    if shape and min(shape) < 0:
        raise CorruptSegment(f"negative dimension in shape {shape}")
    desc = parse_description(extra[shape_end:])
    itemsize = check_description(desc)
    if nbytes_of(shape, itemsize) != nbytes:
        raise CorruptSegment(f"shape {shape} x itemsize {itemsize} is not the announced {nbytes} bytes")
    base: Description = desc
    full_shape = shape
    if type(desc) is not str:  # a plain dtype adds no dimensions (the common case: no unfolding)
        base, full_shape = unfold(desc, shape)
        if len(full_shape) > MAX_DIMS:
            raise CorruptSegment(f"{len(full_shape)} dimensions with the dtype's own (at most {MAX_DIMS})")
    if numpy_bytes(full_shape, itemsize if base is desc else check_description(base)) > MAX_BYTES:
        raise CorruptSegment(f"shape {full_shape} is too big for any array, even an empty one")
    if block_size is not None and nbytes > block_size:
        raise CorruptSegment(
            f"shape {shape} x itemsize {itemsize} = {nbytes} bytes, larger than the block ({block_size})"
        )
    # tuple.__new__: positional, no keyword handling - this is on every first attach's path.
    return tuple.__new__(ArrayHeader, ("C" if order_b == b"C" else "F", shape, itemsize, nbytes, desc))


def parse_description(text: bytes) -> Any:
    """The JSON value in ``text``, not yet checked against the grammar.
    CorruptSegment if it is not ASCII JSON or nests deeper than any description."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptSegment("unreadable dtype (not ASCII)") from None
    if _SIMPLE_STRING.match(text):  # a plain dtype, "<f8": what json would give, without json
        return decoded[1:-1]
    # json recurses once per level: measure the nesting first (the ~1,900 levels a
    # header holds raise RecursionError in json on Python < 3.13). Few brackets in
    # all (every real dtype but the largest structs) cannot nest deep: no need to look closer.
    if text.count(b"[") + text.count(b"{") > _MAX_BRACKETS:
        depth = deepest = 0
        for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub(b'""', text)):
            depth += 1 if bracket in b"[{" else -1
            deepest = max(deepest, depth)
        if deepest > _MAX_BRACKETS:
            raise CorruptSegment(f"unreadable dtype (nested {deepest} levels deep)")
    try:
        return json.loads(decoded)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise CorruptSegment(f"unreadable dtype ({err})") from None


def check_description(desc: Any, depth: int = 0) -> int:
    """Check the parsed dtype description ``desc`` against the grammar, without
    NumPy; return its itemsize. CorruptSegment for anything outside it."""
    if depth > MAX_DTYPE_DEPTH:
        raise CorruptSegment(f"dtype nested too deep (at most {MAX_DTYPE_DEPTH} levels)")
    if type(desc) is str:
        return _plain_itemsize(desc)
    if type(desc) is dict and desc.keys() == _SUBARRAY_KEYS:
        shape = [_int(n, "subarray dimension") for n in _list(desc["shape"], "subarray shape")]
        if not 1 <= len(shape) <= MAX_DIMS:
            raise CorruptSegment(f"bad subarray shape {shape}")
        return nbytes_of(tuple(shape), check_description(desc["base"], depth + 1))
    if type(desc) is dict and desc.keys() == _STRUCTURED_KEYS:
        names = _list(desc["names"], "field names")
        count = len(names)
        sizes = [check_description(f, depth + 1) for f in _list(desc["formats"], "field formats", count)]
        offsets = [_int(o, "field offset") for o in _list(desc["offsets"], "field offsets", count)]
        titles = _list(desc["titles"], "field titles", count)
        itemsize = _int(desc["itemsize"], "itemsize")
        if not all(type(n) is str for n in names):
            raise CorruptSegment("bad field names")
        if not all(t is None or type(t) is str for t in titles):
            raise CorruptSegment("bad field titles")
        if type(desc["aligned"]) is not bool:
            raise CorruptSegment("bad aligned flag")
        for size, offset in zip(sizes, offsets):
            if offset + size > itemsize:  # a field reaching past its record would read past the block
                raise CorruptSegment(f"a field at offset {offset} does not fit in records of {itemsize} bytes")
        return itemsize
    raise CorruptSegment("unknown dtype description")


def _plain_itemsize(desc: str) -> int:
    match = _PLAIN_DTYPE.match(desc)
    if match is None:
        if _OBJECT_DTYPE.match(desc):  # outside the grammar anyway; said plainly
            raise CorruptSegment(f"object dtype {desc!r}: objects are pointers into one process's memory")
        raise CorruptSegment(f"unknown dtype {desc!r}")
    count = int(match.group(3))
    itemsize = 4 * count if match.group(2) == "U" else count  # 'U': UCS-4 characters
    if itemsize == 0:
        raise CorruptSegment(f"unknown dtype {desc!r} (no size)")
    return itemsize


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _BIG:  # bool is not an int here
        raise CorruptSegment(f"bad {what} {value!r}")
    return value


def _list(value: Any, what: str, length: Optional[int] = None) -> List[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        raise CorruptSegment(f"bad {what}")
    return value


# ===================================================================== the listing


def describe(extra: bytes, size: Optional[int] = None) -> str:
    """The listing's description of an array block's header: "<f8 (1000, 3) C".

    Every field is checked as ``unpack`` checks it (against the block's
    ``size`` too, when given); CorruptSegment when one does not add up, and
    nothing else. Needs no NumPy.
    """
    try:
        header = unpack(extra, size)
    except CorruptSegment as err:
        raise CorruptSegment(f"corrupt array header: {err}") from None
    # As attach_array shows it: NumPy moves a subarray dtype's dimensions into the shape.
    desc, shape = unfold(header.dtype, header.shape)
    return f"{desc if isinstance(desc, str) else 'structured'} {shape} {header.order}"
