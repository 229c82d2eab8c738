"""How a ShareableList lies in its block, and how its values are encoded.

Binary layout - the standard library's (Python 3.9 and later) at offset 0 of
the block, so either library attaches, reads and writes lists the other made;
then shmem's own extension, which the standard library never looks at::

    word = 8 bytes, little-endian on the machines we support

    0                    q       N, the number of items
    8                    q*(N+1) offsets of the items' slots from the data start; offsets[0] = 0
    (N+2)*8              ...     data: one slot per item, a multiple of 8 bytes each:
                                   int 'q', float 'd', bool 'xxxxxxx?', None 'xxxxxx?x' (8 bytes),
                                   str / bytes: UTF-8 / raw bytes, NUL-padded, capacity 8*(len//8+1)
    data + offsets[N]    8s*N    each item's struct format, NUL-padded
    ... + 8*N            b*N     each item's type code: 0 number/bool, 1 str, 2 bytes, 3 None
    ---- shmem only, in lists shmem created ----
    ext (8-aligned)      q*N     per item: sequence number, exact byte length of a str/bytes,
                                 and a check of large values (bits drawn at _SEQ_MASK below)

``ext`` is given by the kind header in the block's trailer (``_header``):
magic, version, N and ext. Lists the standard library made have none; shmem
then follows the standard library's rules for them.

What the extension fixes:

* **Exact str and bytes.** The standard library strips trailing NUL bytes on
  read (gh-96779) because it does not know a value's length. shmem records the
  exact length and marks such slots with a trailing space in their format
  (``"16s "``; struct ignores it). The standard library reads that slot as
  before, and writing one resets the format to ``"16s"``, telling shmem that
  the exact length no longer applies. Slots of 1,000,000 bytes or more leave
  no room for the mark in 8 format characters; there a checksum of the value
  beside its length tells whether shmem's record still applies.
"""

from __future__ import annotations

import array
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple

from .._errors import CorruptSegment

_WORD = 8
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1

# Item kinds and the standard library's type codes ("back transforms").
INT, FLOAT, BOOL, NONE, STR, BYTES = range(6)
_CODE = {INT: 0, FLOAT: 0, BOOL: 0, NONE: 3, STR: 1, BYTES: 2}
_FIXED_FORMAT = {INT: b"q", FLOAT: b"d", BOOL: b"xxxxxxx?", NONE: b"xxxxxx?x"}


def _word_of(fmt: bytes) -> int:
    """An 8-byte format field as the int64 the list's word view reads."""
    return int.from_bytes(fmt.ljust(_WORD, b"\0"), "little", signed=True)


_FIXED_BY_WORD = {_word_of(fmt): kind for kind, fmt in _FIXED_FORMAT.items()}
_INT_WORD = _word_of(_FIXED_FORMAT[INT])
_FLOAT_WORD = _word_of(_FIXED_FORMAT[FLOAT])
_BOOL_TRUE = int.from_bytes(b"\0" * 7 + b"\1", "little")  # 'xxxxxxx?' holding True, as a word
_EXACT_MARK = b" "  # "16s " = shmem wrote it and recorded the exact length
_EXACT_MAX_CAPACITY = 999_999  # "999999s " is the longest marked format that fits in 8 bytes
_MAX_CAPACITY = 9_999_999  # "9999999s": the largest slot any format can describe

# The kind header in the block's trailer (see _header): magic, version, N, ext offset.
_EXT = struct.Struct("<8sHxxxxxxqq")
_EXT_MAGIC = b"shmlist\0"
_EXT_VERSION = 1

# Each item's extension word (int64, kept positive):
#   bits  0..15  sequence number, odd while a writer is at work
#   bits 16..39  exact byte length of a str/bytes
#   bits 40..62  for slots too large for the format mark: a check of the value
#                (crc32-based, never 0), so a later standard-library write -
#                which leaves this word alone - is recognised as such
_SEQ_MASK = 0xFFFF
_LEN_SHIFT, _LEN_MASK = 16, (1 << 24) - 1
_TAG_SHIFT = 40


def _settled(writing: int) -> int:
    """The sequence part of the word that ends a write: the next, even, number."""
    return ((writing & _SEQ_MASK) + 1) & _SEQ_MASK


def _tag(value: bytes) -> int:
    return (zlib.crc32(value) & 0x3FFFFF) + 1  # 22 bits + 1: never 0, below 2**23


def _ext_word_for(payload: bytes, capacity: int) -> int:
    """The length (and, for slots the format cannot mark, the check) of a new value."""
    tag = _tag(payload) if capacity > _EXACT_MAX_CAPACITY else 0
    return (tag << _TAG_SHIFT) | (len(payload) << _LEN_SHIFT)


def _capacity(nbytes: int) -> int:
    """Slot size for a str/bytes of ``nbytes`` bytes: the standard library's rule."""
    return _WORD * (nbytes // _WORD + 1)


def _text_format(capacity: int, exact: bool) -> bytes:
    fmt = b"%ds" % capacity
    return fmt + _EXACT_MARK if exact and capacity <= _EXACT_MAX_CAPACITY else fmt


def _normalize(value: Any, where: str) -> Tuple[int, Any]:
    """(kind, what to store) for ``value``; TypeError or OverflowError if it
    cannot be stored. Subclasses and NumPy scalars are stored as their base type."""
    t = type(value)
    if t is int:
        kind, value = INT, value
    elif t is float:
        return FLOAT, value
    elif t is str:
        return STR, value.encode("utf-8")
    elif t is bytes:
        return BYTES, value
    elif value is None:
        return NONE, None
    elif t is bool or isinstance(value, bool):
        return BOOL, bool(value)
    elif isinstance(value, int):
        kind, value = INT, int(value)
    elif isinstance(value, float):
        return FLOAT, float(value)
    elif isinstance(value, str):
        return STR, str.__str__(value).encode("utf-8")
    elif isinstance(value, bytes):
        return BYTES, bytes(value)
    else:
        kind, value = _numpy_scalar(value, where)
        if kind != INT:
            return kind, value
    if not _INT_MIN <= value <= _INT_MAX:
        raise OverflowError(f"{where}: {value} does not fit in a signed 64-bit integer")
    return kind, value


def _numpy_scalar(value: Any, where: str) -> Tuple[int, Any]:
    # Recognised without importing NumPy: a numpy scalar has a dtype with a kind letter.
    dtype_kind = getattr(getattr(value, "dtype", None), "kind", None)
    if type(value).__module__ == "numpy" and dtype_kind is not None:
        if dtype_kind == "b":
            return BOOL, bool(value)
        if dtype_kind in "iu":
            return INT, int(value)
        if dtype_kind == "f":
            return FLOAT, float(value)
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__}; "
        "a ShareableList holds int, float, bool, str, bytes and None"
    )


def _pack_numbers_py(seq: Any) -> Optional[Tuple[bytes, str]]:
    """(data, typecode) if every item is exactly an int fitting int64 or exactly a float."""
    kinds = set(map(type, seq))
    try:
        if kinds == {int}:
            return array.array("q", seq).tobytes(), "q"
        if kinds == {float}:
            return array.array("d", seq).tobytes(), "d"
    except OverflowError:
        pass  # the item-by-item path names the item that does not fit
    return None


def _fixed_offsets_py(n: int) -> bytes:
    return array.array("q", range(0, _WORD * (n + 1), _WORD)).tobytes()


_TEXT_FORMATS: Dict[int, Tuple[int, bool]] = {}


def _parse_text_format(word: int) -> Tuple[int, bool]:
    """(capacity, exact-length mark) of a "<n>s" format word; (-1, False) if it is not one."""
    try:
        return _TEXT_FORMATS[word]
    except KeyError:
        pass
    raw = word.to_bytes(_WORD, "little", signed=True).rstrip(b"\0")
    exact = raw.endswith(_EXACT_MARK)
    digits = raw[:-2] if exact else raw[:-1]
    if raw[len(digits):len(digits) + 1] != b"s" or not digits.isdigit():
        parsed = (-1, False)
    else:
        parsed = (int(digits), exact)
    if len(_TEXT_FORMATS) < 4096:  # bounded: formats come from other processes
        _TEXT_FORMATS[word] = parsed
    return parsed


def _pack_mixed(normalized: List[Tuple[int, Any]]) -> Tuple[bytes, bytes]:
    """The data area and the formats area for items of mixed kinds."""
    data = bytearray()
    fmts = bytearray()
    for kind, payload in normalized:
        if kind in (STR, BYTES):
            capacity = _capacity(len(payload))
            data += payload.ljust(capacity, b"\0")
            fmts += _text_format(capacity, exact=True).ljust(_WORD, b"\0")
            continue
        if kind == INT:
            data += struct.pack("q", payload)
        elif kind == FLOAT:
            data += struct.pack("d", payload)
        elif kind == BOOL:
            data += b"\0" * 7 + (b"\1" if payload else b"\0")
        else:
            data += bytes(_WORD)
        fmts += _FIXED_FORMAT[kind].ljust(_WORD, b"\0")
    return bytes(data), bytes(fmts)


def describe(extra: bytes) -> str:
    """The listing's description of a list block's kind header ("7 items");
    CorruptSegment when it does not validate."""
    if len(extra) != _EXT.size:
        raise CorruptSegment(f"list header of {len(extra)} bytes, expected {_EXT.size}")
    magic, version, n, ext = _EXT.unpack(extra)
    if magic != _EXT_MAGIC or version != _EXT_VERSION or n < 0 or ext < 0:
        raise CorruptSegment("not a ShareableList header (wrong magic, version or counts)")
    return f"{n} items"
