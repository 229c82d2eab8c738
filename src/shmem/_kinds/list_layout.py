"""The ShareableList kind's codec: where a list lies in its block, how its values are encoded.

``list`` (the ``ShareableList`` class) builds, checks and reads lists through
this module's names; ``_kinds.describe`` (``shmem ls``, ``list_segments()``)
reads a list block's kind header through ``describe``. Nothing else knows the
layout, except its C twin: ``_speedups.c`` reads and writes int and float
items the same way. ``ACCELERATED`` says whether the C twin is in use
(``SHMEM_PURE_PYTHON=1`` turns it off, for testing the pure-Python path).

Binary layout - the standard library's (Python 3.9 and later) at offset 0 of
the block, so either library attaches, reads and writes lists the other made;
then shmem's own extension, which the standard library never looks at::

    word = 8 bytes (WORD), little-endian on the machines we support

    0                    q       N, the number of items
    8                    q*(N+1) offsets of the items' slots from the data start; offsets[0] = 0,
                                 offsets[i+1] ends item i (so item i's offset is word 1 + i)
    (N+2)*8              ...     data: one slot per item, a multiple of 8 bytes each:    (Layout.data)
                                   int 'q', float 'd', bool 'xxxxxxx?', None 'xxxxxx?x' (8 bytes),
                                   str / bytes: UTF-8 / raw bytes, NUL-padded, capacity 8*(len//8+1)
    data + offsets[N]    8s*N    each item's struct format, NUL-padded          (Layout.formats)
    ... + 8*N            b*N     each item's type code: 0 number/bool, 1 str,   (Layout.codes)
                                 2 bytes, 3 None
    ---- shmem only, in lists shmem created ----
    ext (8-aligned)      q*N     per item: sequence number, exact byte length   (Layout.ext)
                                 of a str/bytes, and a check of large values
                                 (bits drawn at _SEQ_MASK below)

``ext`` is given by the kind header in the block's trailer (``_core.header``
draws the trailer; ``kind_header`` packs this part)::

    off  len  field
      0    8  magic     b"shmlist\\0"
      8    2  version   1
     10    6  zero
     16    8  N         the number of items, as at offset 0 of the block
     24    8  ext       offset of the extension: 8-aligned, past the type codes

Lists the standard library made have no kind header and no extension; shmem
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
* **No torn reads.** The sequence number is odd while a shmem writer is at
  work (``WRITING``); readers retry until they read the same even number
  before and after an item (``list`` draws the protocol).

Everything read from a block is hostile input: ``read_layout`` checks the
counts against the block's real size in O(1) and allocates nothing
proportional to what they claim; ``describe`` checks every field it reads.
"""

from __future__ import annotations

import array
import itertools
import os
import struct
import sys
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .._errors import CorruptSegment

WORD = 8
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1

# Item kinds, and the standard library's type codes for them ("back transforms").
INT, FLOAT, BOOL, NONE, STR, BYTES = range(6)
TYPE_CODE = {INT: 0, FLOAT: 0, BOOL: 0, NONE: 3, STR: 1, BYTES: 2}
STR_CODE, BYTES_CODE = TYPE_CODE[STR], TYPE_CODE[BYTES]
_FIXED_FORMAT = {INT: b"q", FLOAT: b"d", BOOL: b"xxxxxxx?", NONE: b"xxxxxx?x"}


def _word_of(fmt: bytes) -> int:
    """An 8-byte format field as the int64 the list's word view reads."""
    return int.from_bytes(fmt.ljust(WORD, b"\0"), "little", signed=True)


# The format field of an 8-byte item as a word, and back.
FORMAT_WORD = {kind: _word_of(fmt) for kind, fmt in _FIXED_FORMAT.items()}
KIND_OF_FORMAT = {word: kind for kind, word in FORMAT_WORD.items()}
BOOL_TRUE = int.from_bytes(b"\0" * 7 + b"\1", "little")  # 'xxxxxxx?' holding True, as a word

_EXACT_MARK = b" "  # "16s " = shmem wrote it and recorded the exact length
_EXACT_MAX_CAPACITY = 999_999  # "999999s " is the longest marked format that fits in 8 bytes
_MAX_CAPACITY = 9_999_999  # "9999999s": the largest slot any format can describe

# The kind header in the block's trailer (drawn above): magic, version, N, ext.
_KIND_HEADER = struct.Struct("<8sH6xqq")
_KIND_MAGIC = b"shmlist\0"
_KIND_VERSION = 1

# Each item's extension word (int64, kept positive):
#   bits  0..15  sequence number, odd while a writer is at work
#   bits 16..39  exact byte length of a str/bytes
#   bits 40..62  for slots too large for the format mark: a check of the value
#                (crc32-based, never 0), so a later standard-library write -
#                which leaves this word alone - is recognised as such
_SEQ_MASK = 0xFFFF
_LEN_SHIFT, _LEN_MASK = 16, (1 << 24) - 1
_TAG_SHIFT = 40
WRITING = 1  # the sequence bit a writer sets first: readers wait (``settled`` clears it)


# ================================================================ where a list lies


class Layout(NamedTuple):
    """Where a list's parts lie in its block, from its counts (byte offsets)."""

    n: int  # items
    data_len: int  # bytes of the data area (offsets[N])
    ext: int  # offset of shmem's extension; -1: none (the standard library made the list)

    @property
    def data(self) -> int:
        return (self.n + 2) * WORD

    @property
    def formats(self) -> int:
        return self.data + self.data_len

    @property
    def codes(self) -> int:
        return self.formats + WORD * self.n

    @property
    def codes_end(self) -> int:
        """The end of the standard library's part."""
        return self.codes + self.n


class NewList(NamedTuple):
    """A list encoded before its block exists (``encode``)."""

    layout: Layout
    size: int  # bytes of block it needs
    kind_header: bytes  # for the block's trailer
    pieces: List[Tuple[int, bytes]]  # (offset, bytes) to write into the new block


def kind_header(n: int, ext: int) -> bytes:
    """The kind header of a list of ``n`` items with its extension at ``ext``."""
    return _KIND_HEADER.pack(_KIND_MAGIC, _KIND_VERSION, n, ext)


def _parse_kind_header(extra: bytes) -> Tuple[int, int]:
    """(N, ext) of a kind header, each checked on its own; CorruptSegment (without
    the block's name: the caller adds it) when it is not a list's header."""
    if len(extra) != _KIND_HEADER.size:
        raise CorruptSegment(f"list header of {len(extra)} bytes, expected {_KIND_HEADER.size}")
    magic, version, n, ext = _KIND_HEADER.unpack(extra)
    if magic != _KIND_MAGIC:
        raise CorruptSegment("not a ShareableList header (wrong magic)")
    if version != _KIND_VERSION:
        raise CorruptSegment(
            f"ShareableList header version {version}, this shmem reads {_KIND_VERSION}; "
            "upgrade shmem in every process that shares it"
        )
    # The least room N items take: 8 bytes of data, offset and format each, a code.
    if n < 0 or ext % WORD or ext < Layout(n, WORD * n, 0).codes_end:
        raise CorruptSegment(f"ShareableList header claims {n} items with their extension at {ext}")
    return n, ext


def read_layout(buf: memoryview, name: str, extra: Optional[bytes]) -> Layout:
    """The layout of the list in ``buf``, block ``name``; ``extra`` is its kind
    header, None for a block shmem did not make.

    O(1): the counts at offset 0 are read once and checked against the block's
    real size before anything else uses them. Raises CorruptSegment (a
    ValueError naming the block) when they do not add up.
    """
    size = len(buf)
    if size < 2 * WORD:
        raise CorruptSegment(f"shared memory block {name!r} ({size} bytes) is too small for a ShareableList")
    n, first = struct.unpack_from("qq", buf, 0)
    if n < 0 or Layout(n, 0, -1).codes_end > size:
        raise CorruptSegment(f"ShareableList {name!r} claims {n} items; its block holds {size} bytes")
    (data_len,) = struct.unpack_from("q", buf, (n + 1) * WORD)
    layout = Layout(n, data_len, -1)
    if first != 0 or data_len < 0 or layout.codes_end > size:
        raise CorruptSegment(f"ShareableList {name!r}: item offsets point outside its {size}-byte block")
    if extra is None:
        return layout
    try:
        header_n, ext = _parse_kind_header(extra)
    except CorruptSegment as err:
        raise CorruptSegment(f"ShareableList {name!r}: {err}") from None
    if header_n != n or ext < layout.codes_end or ext + WORD * n > size:
        raise CorruptSegment(f"ShareableList {name!r}: its shmem header does not match its layout")
    return layout._replace(ext=ext)


def describe(extra: bytes) -> str:
    """The listing's description of a list block's kind header ("7 items").

    Raises CorruptSegment when it does not validate, and nothing else.
    """
    n, _ = _parse_kind_header(extra)
    return f"{n} item" if n == 1 else f"{n} items"


# ================================================================ encoding a new list


def normalize(value: Any, where: str) -> Tuple[int, Any]:
    """(kind, what to store) for ``value``; TypeError or OverflowError, naming
    ``where``, if it cannot be stored. Subclasses and NumPy scalars are stored
    as their base type."""
    t = type(value)
    if t is int:
        kind = INT
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
    if not INT_MIN <= value <= INT_MAX:
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
        f"{where}: cannot store a {type(value).__name__}; a ShareableList holds int, float, bool, str, bytes and None"
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
    return array.array("q", range(0, WORD * (n + 1), WORD)).tobytes()


# The C twin's versions when it is built (and not turned off): the same results, faster.
try:
    if os.environ.get("SHMEM_PURE_PYTHON"):  # for testing the fallback: the same behaviour, slower
        raise ImportError("pure Python requested")
    from .._speedups import fixed_offsets as _fixed_offsets
    from .._speedups import pack_numbers as _pack_numbers

    ACCELERATED = True
except ImportError:  # built without a C compiler: the same behaviour in pure Python
    _pack_numbers, _fixed_offsets = _pack_numbers_py, _fixed_offsets_py
    ACCELERATED = False


def _capacity(nbytes: int) -> int:
    """Slot size for a str/bytes of ``nbytes`` bytes: the standard library's rule."""
    return WORD * (nbytes // WORD + 1)


def _pack_mixed(normalized: List[Tuple[int, Any]]) -> Tuple[bytes, bytes]:
    """The data area and the formats area for items of mixed kinds."""
    data = bytearray()
    fmts = bytearray()
    for kind, payload in normalized:
        if kind in (STR, BYTES):
            capacity = _capacity(len(payload))
            data += payload.ljust(capacity, b"\0")
            fmts += _text_format(capacity, exact=True).ljust(WORD, b"\0")
            continue
        if kind == INT:
            data += struct.pack("q", payload)
        elif kind == FLOAT:
            data += struct.pack("d", payload)
        elif kind == BOOL:
            data += b"\0" * 7 + (b"\1" if payload else b"\0")
        else:
            data += bytes(WORD)
        fmts += _FIXED_FORMAT[kind].ljust(WORD, b"\0")
    return bytes(data), bytes(fmts)


def encode(sequence: Any, where: str) -> NewList:
    """Everything a new block holding ``sequence`` (a list, tuple or range) needs,
    checked and encoded before the block exists: TypeError, OverflowError or
    ValueError, naming ``where`` and the item, for a value it cannot hold."""
    packed = _pack_numbers(sequence)
    if packed is not None:  # all ints or all floats: the common case, packed in one go
        data, typecode = packed
        n = len(data) // WORD
        fmts = _FIXED_FORMAT[INT if typecode == "q" else FLOAT].ljust(WORD, b"\0") * n
        codes = bytes(n)
        records = b""  # numbers have no length: the words stay zero
        offsets = _fixed_offsets(n)
        data_len = WORD * n
    else:
        normalized = [normalize(v, f"{where}[{i}]") for i, v in enumerate(sequence)]
        n = len(normalized)
        for i, (kind, payload) in enumerate(normalized):
            if kind in (STR, BYTES) and _capacity(len(payload)) > _MAX_CAPACITY:
                raise ValueError(
                    f"{where}[{i}]: {len(payload)} bytes is more than a ShareableList slot can hold "
                    f"({_MAX_CAPACITY - WORD} bytes: its format must fit in 8 characters)"
                )
        data, fmts = _pack_mixed(normalized)
        codes = bytes(TYPE_CODE[k] for k, _ in normalized)
        records = array.array(
            "q", (text_record(p, _capacity(len(p))) if k in (STR, BYTES) else 0 for k, p in normalized)
        ).tobytes()
        capacities = (_capacity(len(p)) if k in (STR, BYTES) else WORD for k, p in normalized)
        offset_list = array.array("q", itertools.accumulate(itertools.chain((0,), capacities)))
        offsets = offset_list.tobytes()
        data_len = offset_list[-1]
    layout = Layout(n, data_len, -1)
    layout = layout._replace(ext=-(-layout.codes_end // WORD) * WORD)
    pieces = [
        (0, n.to_bytes(WORD, sys.byteorder, signed=True)),
        (WORD, offsets),
        (layout.data, data),
        (layout.formats, fmts),
        (layout.codes, codes),
        (layout.ext, records),
    ]
    return NewList(
        layout=layout,
        size=max(layout.ext + WORD * n, 2 * WORD),
        kind_header=kind_header(n, layout.ext),
        pieces=[(offset, piece) for offset, piece in pieces if piece],
    )


# ================================================================ str and bytes items


def _text_format(capacity: int, exact: bool) -> bytes:
    fmt = b"%ds" % capacity
    return fmt + _EXACT_MARK if exact and capacity <= _EXACT_MAX_CAPACITY else fmt


def text_format_word(capacity: int, exact: bool) -> int:
    """The format word of a str/bytes slot of ``capacity`` bytes; ``exact``: shmem
    records the value's length in the extension (the format carries the mark)."""
    return _word_of(_text_format(capacity, exact))


_TEXT_FORMATS: Dict[int, Tuple[int, bool]] = {}


def parse_text_format(word: int) -> Tuple[int, bool]:
    """(capacity, exact-length mark) of a "<n>s" format word; (-1, False) if it is not one."""
    try:
        return _TEXT_FORMATS[word]
    except KeyError:
        pass
    raw = word.to_bytes(WORD, "little", signed=True).rstrip(b"\0")
    exact = raw.endswith(_EXACT_MARK)
    digits = raw[:-2] if exact else raw[:-1]
    if raw[len(digits) : len(digits) + 1] != b"s" or not digits.isdigit():
        parsed = (-1, False)
    else:
        parsed = (int(digits), exact)
    if len(_TEXT_FORMATS) < 4096:  # bounded: formats come from other processes
        _TEXT_FORMATS[word] = parsed
    return parsed


def format_text(word: int) -> str:
    """An item's format as the standard library reports it ("q", "16s"; no mark)."""
    raw = word.to_bytes(WORD, "little", signed=True)
    return raw.rstrip(b"\0").rstrip(_EXACT_MARK).decode("ascii", "replace")


def _tag(value: bytes) -> int:
    return (zlib.crc32(value) & 0x3FFFFF) + 1  # 22 bits + 1: never 0, below 2**23


def text_record(payload: bytes, capacity: int) -> int:
    """The extension bits that record a new str/bytes value: its length and, for
    slots the format cannot mark, its check (the sequence bits are zero)."""
    tag = _tag(payload) if capacity > _EXACT_MAX_CAPACITY else 0
    return (tag << _TAG_SHIFT) | (len(payload) << _LEN_SHIFT)


def recorded_text(record: int, slot: memoryview, marked: bool) -> Optional[bytes]:
    """The value shmem wrote into ``slot`` (the whole slot), with its exact length,
    from the item's extension word ``record``; None if shmem's record does not
    apply (a standard-library write since): the standard library's rule then."""
    length = (record >> _LEN_SHIFT) & _LEN_MASK
    if length > len(slot):
        return None
    if marked:  # the format says shmem wrote it (see _text_format)
        return bytes(slot[:length])
    tag = record >> _TAG_SHIFT
    if not tag:
        return None
    value = bytes(slot[:length])
    if _tag(value) != tag or bytes(slot[length:]).strip(b"\0"):
        return None
    return value


# ================================================================ writing


def settled(writing: int) -> int:
    """The sequence part of the extension word that ends a write begun with
    ``writing`` (odd): the next, even, number."""
    return ((writing & _SEQ_MASK) + 1) & _SEQ_MASK
