"""The ShareableList kind's codec: where a list lies in its block, how its values are encoded.

``list`` (the ``ShareableList`` class) builds, checks and reads lists through
this module's names; ``_kinds.describe`` (``shmem ls``, ``list_segments()``)
reads a list block's kind header through ``describe``. Nothing else knows the
layout, except its C twin: ``_speedups.c`` reads and writes int and float
items the same way. ``ACCELERATED`` says whether the C twin is in use
(``SHMEM_PURE_PYTHON=1`` turns it off, for testing the pure-Python path;
``SHMEM_REQUIRE_SPEEDUPS=1`` makes its absence an ImportError, for CI).

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
                                   (len: a str's characters, as the standard library counts, or more to hold its bytes)
    data + offsets[N]    8s*N    each item's struct format, NUL-padded          (Layout.formats)
    ... + 8*N            b*N     each item's type code: 0 number/bool, 1 str,   (Layout.codes)
                                 2 bytes, 3 None
    ---- shmem only, in lists shmem created ----
    ext (8-aligned)      q*N     per item: its sequence number, 63 bits,        (Layout.ext)
                                 odd while a writer is at work
    ext + 8*N            q*N     per item: its record, for a str/bytes shmem    (Layout.records)
                                 wrote: exact byte length (bits 0-23) and, for
                                 slots too large for the format mark, a check
                                 of the value (bits 24-56, crc32 + 1, never 0)

``ext`` is given by the kind header in the block's trailer (``_core.header``
draws the trailer; ``kind_header`` packs this part)::

    off  len  field
      0    8  magic     b"shmlist\\0"
      8    2  version   2 (1: shmem 0.1's one-word extension, 16-bit sequence numbers)
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
  no room for the mark in 8 format characters; there the check of the value
  beside its length tells whether shmem's record still applies.
  The mark cannot be hidden from the standard library: its ``format`` shows
  every byte of the 8-byte field but trailing NULs, and the field, the type
  code and the data are all a standard-library write changes - a mark
  anywhere else could only be checked against the data (a checksum: exact
  only up to a collision). So the standard library's ``format`` of a list
  shmem made shows the marks (``"8s 8s dq"`` where shmem says ``"8s8sdq"``);
  ``struct.calcsize`` gives the same size for both.
* **No torn reads.** The sequence number is odd while a shmem writer is at
  work (``WRITING``); readers retry until they read the same even number
  before and after an item (``list`` draws the protocol). It is 63 bits wide
  and a write adds 2, so a reader can be fooled - the same even number
  before and after, with writes in between - only if exactly a multiple of
  2**62 writes to that one item fall within its read: at one write every
  10 ns (faster than any writer: shmem's C path takes about 25 ns), that is
  a reader preempted for 1,400 years. (Version 1's 16 bits wrapped after
  32,768 writes, about a millisecond.) This needs a writer's stores to
  become visible in order and a reader's loads to happen in order: x86-64
  keeps that order itself (``STORES_IN_ORDER``); elsewhere the C extension
  adds real fences (``FENCE``), and without it there is no such guarantee
  (``TORN_READS_PREVENTED``; ``list`` warns once).

Everything read from a block is hostile input: ``read_layout`` checks the
counts against the block's real size in O(1) and allocates nothing
proportional to what they claim; ``describe`` checks every field it reads.
Sizes are checked before anything proportional to them is allocated or
iterated: ``encode`` asks its caller for room first (``least_size``), and
builds the data of a range in steps, between which Ctrl-C is heard.
"""

from __future__ import annotations

import array
import itertools
import operator
import os
import struct
import sys
import zlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from .._errors import CorruptSegment

WORD = 8
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1

# Item kinds, and the standard library's type codes for them ("back transforms").
INT, FLOAT, BOOL, NONE, STR, BYTES = range(6)
TYPE_CODE = {INT: 0, FLOAT: 0, BOOL: 0, NONE: 3, STR: 1, BYTES: 2}
STR_CODE, BYTES_CODE = TYPE_CODE[STR], TYPE_CODE[BYTES]
_FIXED_FORMAT = {INT: b"q", FLOAT: b"d", BOOL: b"xxxxxxx?", NONE: b"xxxxxx?x"}

# The same, as the standard library's ShareableList spells them in its private
# helpers (``_types_mapping``, ``_back_transforms_mapping``, ``_extract_recreation_code``),
# which code written against it calls: ``ShareableList`` has them too.
STDLIB_FORMATS = {int: "q", float: "d", bool: "xxxxxxx?", str: "%ds", bytes: "%ds", type(None): "xxxxxx?x"}
STDLIB_BACK_TRANSFORMS: Dict[int, Callable[[Any], Any]] = {
    0: lambda value: value,  # int, float, bool
    1: lambda value: value.rstrip(b"\0").decode("utf-8"),  # str
    2: lambda value: value.rstrip(b"\0"),  # bytes
    3: lambda _value: None,  # None
}


def stdlib_type_code(value: Any) -> int:
    """The standard library's type code for ``value``: 1 str, 2 bytes, 3 None, else 0."""
    return 1 if isinstance(value, str) else 2 if isinstance(value, bytes) else 3 if value is None else 0


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
_KIND_VERSION = 2

# An item's record (drawn above): exact length, and the check of a value in a large slot.
_LEN_MASK = (1 << 24) - 1  # lengths up to 16 MiB: more than _MAX_CAPACITY
_TAG_SHIFT = 24
# The sequence number: 63 bits (the word stays a non-negative int64), +2 per write.
SEQ_MASK = (1 << 63) - 1
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

    @property
    def records(self) -> int:
        """The items' records: the second half of the extension."""
        return self.ext + WORD * self.n

    @property
    def end(self) -> int:
        """The end of everything the list uses (its block may be larger)."""
        return self.codes_end if self.ext < 0 else self.ext + 2 * WORD * self.n


def _with_extension(layout: Layout) -> Layout:
    return layout._replace(ext=-(-layout.codes_end // WORD) * WORD)


def least_size(n: int) -> int:
    """Bytes of block a new list of ``n`` items needs at the least (each item 8 bytes).

    Pure arithmetic: what ``encode`` asks its caller to make room for before
    it looks at a single item."""
    return max(_with_extension(Layout(n, WORD * n, -1)).end, 2 * WORD)


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
            f"ShareableList layout version {version}, this shmem reads {_KIND_VERSION}; "
            "use one shmem version in every process that shares it"
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
    layout = layout._replace(ext=ext)
    if header_n != n or ext < layout.codes_end or layout.end > size:
        raise CorruptSegment(f"ShareableList {name!r}: its shmem header does not match its layout")
    return layout


def length(extra: bytes) -> int:
    """The number of items a list block's kind header announces.

    Raises CorruptSegment when it does not validate, and nothing else.
    """
    n, _ = _parse_kind_header(extra)
    return n


def describe(extra: bytes) -> str:
    """The listing's description of a list block's kind header ("7 items").

    Raises CorruptSegment when it does not validate, and nothing else.
    """
    n = length(extra)
    return f"{n} item" if n == 1 else f"{n} items"


# ================================================================ values


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


# ================================================================ the C twin, or its pure-Python versions

# Items packed per step when a range is packed: Python hears Ctrl-C between steps.
# (A list or tuple is packed in one go: it is in memory already, and one pass over
# memory that exists ends soon.)
_STEP = 1 << 16


def _words(n: int) -> bytearray:
    """Room for ``n`` words: OverflowError or MemoryError, as the C twin raises them."""
    if n > sys.maxsize // WORD:
        raise OverflowError(f"{n} items: more than this machine can address")
    return bytearray(WORD * n)


def pack_numbers_py(seq: Any) -> Optional[Tuple[bytes, str]]:
    """(data, typecode) if ``seq`` - exactly a list, tuple or range - is not empty and
    every item is exactly an int fitting int64 ("q") or exactly a float ("d"); None
    otherwise (the item-by-item path decides). The C twin's pure-Python version."""
    t = type(seq)
    if t is range:
        n = len(seq)  # OverflowError beyond sys.maxsize items, as in C
        if not n or not (INT_MIN <= seq[0] <= INT_MAX and INT_MIN <= seq[-1] <= INT_MAX):
            return None
        out = _words(n)
        view = memoryview(out).cast("q")
        for start in range(0, n, _STEP):
            view[start : start + _STEP] = array.array("q", seq[start : start + _STEP])
        view.release()
        return bytes(out), "q"
    if (t is not list and t is not tuple) or not seq:
        return None
    kinds = set(map(type, seq))
    typecode = "q" if kinds == {int} else "d" if kinds == {float} else ""
    if not typecode:
        return None
    try:
        return array.array(typecode, seq).tobytes(), typecode
    except OverflowError:  # an int beyond int64: the item-by-item path names it
        return None


def fixed_offsets_py(n: int) -> bytes:
    """The offsets area of ``n`` 8-byte items, 0, 8, ..., 8n. The C twin's pure-Python version."""
    n = operator.index(n)
    if n < 0:
        raise ValueError("negative count")
    if n >= sys.maxsize // WORD:
        raise OverflowError(f"{n} items: more than this machine can address")
    out = _words(n + 1)
    view = memoryview(out).cast("q")
    for start in range(0, n + 1, _STEP):
        stop = min(start + _STEP, n + 1)
        view[start:stop] = array.array("q", range(WORD * start, WORD * stop, WORD))
    view.release()
    return bytes(out)


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


PURE_REQUESTED = _flag("SHMEM_PURE_PYTHON")  # for testing the fallback: the same behaviour, slower
SPEEDUPS_REQUIRED = _flag("SHMEM_REQUIRE_SPEEDUPS") and not PURE_REQUESTED  # for CI: a missing build fails

_pack_numbers: Callable[[Any], Optional[Tuple[bytes, str]]]
_fixed_offsets: Callable[[int], bytes]
_fence: Optional[Callable[[], None]]
try:
    if PURE_REQUESTED:
        raise ImportError("pure Python requested (SHMEM_PURE_PYTHON)")
    from .. import _speedups

    if getattr(_speedups, "LAYOUT_VERSION", None) != _KIND_VERSION:  # a stale build of an older layout
        raise ImportError(f"shmem._speedups was built for another list layout; this shmem writes {_KIND_VERSION}")
    _pack_numbers, _fixed_offsets, _fence = _speedups.pack_numbers, _speedups.fixed_offsets, _speedups.fence
    ACCELERATED = True
except ImportError as err:  # built without a C compiler: the same behaviour in pure Python
    if SPEEDUPS_REQUIRED:
        raise ImportError(
            f"SHMEM_REQUIRE_SPEEDUPS is set, but shmem's C extension is not usable ({err}); "
            "reinstall shmem where a C compiler is present, or unset the variable"
        ) from err
    _pack_numbers, _fixed_offsets, _fence = pack_numbers_py, fixed_offsets_py, None
    ACCELERATED = False

# Machines whose CPU keeps a core's stores in order for other cores, and its loads
# in order (total store order): there the protocol needs no fences.
STORES_IN_ORDER = os.uname().machine.lower() in {"x86_64", "amd64", "x86", "i386", "i486", "i586", "i686"}
FENCE = None if STORES_IN_ORDER else _fence  # a full memory barrier, where one is needed and available
TORN_READS_PREVENTED = STORES_IN_ORDER or FENCE is not None
UNORDERED_WARNING = (
    f"shmem.ShareableList on {os.uname().machine or 'this machine'} without its C extension: this CPU may "
    "reorder memory accesses and pure Python has no fences, so a reader in another process may see an "
    "item half-written while a shmem writer changes it. Install shmem where a C compiler is present."
)


# ================================================================ encoding a new list


def _capacity(kind: int, payload: bytes) -> int:
    """The slot size of a new str/bytes item: the standard library's rule, 8 * (len // 8 + 1),
    where a str's len counts characters (gh-88336) - so that both make the same format for
    every value the standard library stores whole - but never less than the value's bytes,
    rounded up to a word: that is all shmem needs, as it records the exact length."""
    nbytes = len(payload)
    if kind == BYTES or payload.isascii():
        return WORD * (nbytes // WORD + 1)
    chars = len(payload.decode("utf-8"))
    return max(WORD * (chars // WORD + 1), -(-nbytes // WORD) * WORD)


def _pack_mixed(normalized: List[Tuple[int, Any]], capacities: List[int]) -> Tuple[bytes, bytes]:
    """The data area and the formats area for items of mixed kinds."""
    data = bytearray()
    fmts = bytearray()
    for (kind, payload), capacity in zip(normalized, capacities):
        if kind in (STR, BYTES):
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


def encode(sequence: Any, where: str, room: Callable[[int], None]) -> NewList:
    """Everything a new block holding ``sequence`` (a list, tuple or range) needs,
    checked and encoded before the block exists: TypeError, OverflowError or
    ValueError, naming ``where`` and the item, for a value it cannot hold.

    ``room(size)`` is called with the size of block the list will need before
    anything that large is allocated: first the least (from the count alone),
    then, for items of mixed kinds, the exact size. It raises (InvalidSize,
    NoSpace) when that cannot be.
    """
    try:
        n = len(sequence)
    except OverflowError:
        raise OverflowError(f"{where}: more items than a list can have") from None
    room(least_size(n))
    packed = _pack_numbers(sequence)
    if packed is not None:  # all ints or all floats: the common case, packed in one go
        data, typecode = packed
        fmts = _FIXED_FORMAT[INT if typecode == "q" else FLOAT].ljust(WORD, b"\0") * n
        codes = records = b""  # a new block is all zero: type code 0 (a number), no record
        offsets = _fixed_offsets(n)
        data_len = WORD * n
    else:
        normalized = [normalize(v, f"{where}[{i}]") for i, v in enumerate(sequence)]
        n = len(normalized)
        capacities = [_capacity(k, p) if k in (STR, BYTES) else WORD for k, p in normalized]
        for i, (capacity, (_, payload)) in enumerate(zip(capacities, normalized)):
            if capacity > _MAX_CAPACITY:
                raise ValueError(
                    f"{where}[{i}]: {len(payload)} bytes is more than a ShareableList slot can hold "
                    f"({_MAX_CAPACITY - WORD} bytes: its format must fit in 8 characters)"
                )
        offset_list = array.array("q", itertools.accumulate(itertools.chain((0,), capacities)))
        data_len = offset_list[-1]
        room(_with_extension(Layout(n, data_len, -1)).end)
        data, fmts = _pack_mixed(normalized, capacities)
        codes = bytes(TYPE_CODE[k] for k, _ in normalized)
        records = array.array(
            "q", (text_record(p, c) if k in (STR, BYTES) else 0 for (k, p), c in zip(normalized, capacities))
        ).tobytes()
        offsets = offset_list.tobytes()
    layout = _with_extension(Layout(n, data_len, -1))
    pieces = [
        (0, n.to_bytes(WORD, sys.byteorder, signed=True)),
        (WORD, offsets),
        (layout.data, data),
        (layout.formats, fmts),
        (layout.codes, codes),
        (layout.records, records),
    ]
    return NewList(
        layout=layout,
        size=max(layout.end, 2 * WORD),
        kind_header=kind_header(n, layout.ext),
        pieces=[(offset, piece) for offset, piece in pieces if piece],
    )


# ================================================================ str and bytes items


def _text_format(capacity: int, exact: bool) -> bytes:
    fmt = b"%ds" % capacity
    return fmt + _EXACT_MARK if exact and capacity <= _EXACT_MAX_CAPACITY else fmt


_FORMAT_WORDS: Dict[Tuple[int, bool], int] = {}
_TEXT_FORMATS: Dict[int, Tuple[int, bool]] = {}


def text_format_word(capacity: int, exact: bool) -> int:
    """The format word of a str/bytes slot of ``capacity`` bytes; ``exact``: shmem
    records the value's length in the extension (the format carries the mark)."""
    try:
        return _FORMAT_WORDS[capacity, exact]
    except KeyError:
        word = _word_of(_text_format(capacity, exact))
    if len(_FORMAT_WORDS) < 4096:  # bounded: slot sizes come from other processes
        _FORMAT_WORDS[capacity, exact] = word
    return word


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
    return zlib.crc32(value) + 1  # 33 bits: never 0


def text_record(payload: bytes, capacity: int) -> int:
    """The record of a new str/bytes value in a slot of ``capacity`` bytes: its
    length and, for slots the format cannot mark, its check."""
    tag = _tag(payload) if capacity > _EXACT_MAX_CAPACITY else 0
    return (tag << _TAG_SHIFT) | len(payload)


def recorded_text(record: int, slot: memoryview, marked: bool) -> Optional[bytes]:
    """The value shmem wrote into ``slot`` (the whole slot), with its exact length,
    from the item's ``record``; None if shmem's record does not apply (a
    standard-library write since): the standard library's rule then."""
    length = record & _LEN_MASK
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
    """The sequence number that ends a write begun with ``writing`` (odd): the
    next, even, number (63 bits: after 2**63 - 1 comes 0)."""
    return (writing + 1) & SEQ_MASK
