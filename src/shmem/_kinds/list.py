"""ShareableList: the standard library's, exact, fast, and able to share lists with it.

Binary layout and value encoding: ``_list_layout`` - the standard library's
layout at offset 0 of the block, so either library attaches, reads and writes
lists the other made, plus an extension of shmem's own (exact str and bytes,
per-item sequence numbers) that the standard library never looks at.

The concurrency guarantee:

* **No torn reads.** Each item has a sequence lock: a shmem writer makes the
  item's sequence number odd, writes, and makes it even again; a shmem reader
  retries until it read the same even number before and after. A reader in
  another process therefore never sees a mixture of two values, nor an
  exception, while a shmem writer changes the item - one writer per item at a
  time (concurrent writers of one item need a lock of their own), on CPUs that
  keep stores in order (x86-64; Python exposes no memory fences for weaker ones).

Everything read from the block is hostile input: the header is checked in O(1)
against the block's size when attaching, and each item's offsets, format and
code when it is read; nothing proportional to what the header claims is
allocated.
"""

from __future__ import annotations

import array
import itertools
import operator
import os
import struct
import sys
import time
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from .._errors import CorruptSegment
from .._core.header import KIND_LIST, KIND_NAMES
from .list_layout import (
    BOOL,
    BYTES,
    FLOAT,
    INT,
    STR,
    _BOOL_TRUE,
    _CODE,
    _EXACT_MARK,
    _EXT,
    _EXT_MAGIC,
    _EXT_VERSION,
    _FIXED_BY_WORD,
    _FIXED_FORMAT,
    _FLOAT_WORD,
    _INT_MAX,
    _INT_MIN,
    _INT_WORD,
    _LEN_MASK,
    _LEN_SHIFT,
    _MAX_CAPACITY,
    _TAG_SHIFT,
    _WORD,
    _capacity,
    _ext_word_for,
    _fixed_offsets_py,
    _normalize,
    _pack_mixed,
    _pack_numbers_py,
    _parse_text_format,
    _settled,
    _tag,
    _text_format,
    _word_of,
)
from . import raw
from .._core.block import Block
from .raw import SharedMemory

# How long a reader waits for a writer that is in the middle of an item.
_STUCK_WRITER_SECONDS = 1.0


try:
    if os.environ.get("SHMEM_PURE_PYTHON"):  # for testing the fallback: the same behaviour, slower
        raise ImportError("pure Python requested")
    from .._speedups import ListCore as _Core
    from .._speedups import fixed_offsets as _fixed_offsets
    from .._speedups import pack_numbers as _pack_numbers

    ACCELERATED = True
except ImportError:  # built without a C compiler: the same behaviour in pure Python
    _Core = object  # type: ignore[misc,assignment]
    _pack_numbers, _fixed_offsets = _pack_numbers_py, _fixed_offsets_py
    ACCELERATED = False


class ShareableList(_Core):
    """A list of fixed length in a shared memory block, the standard library's
    ``ShareableList`` with exact values and fast access.

    ``ShareableList(sequence)`` creates a block holding the items (int, float,
    bool, str, bytes, None); ``ShareableList(name=...)`` attaches to an
    existing one - made by shmem or by the standard library. Items can be
    replaced (a str or bytes only by one that fits the space its slot was
    given), the length cannot change. ``track`` is SharedMemory's.
    """

    shm: SharedMemory
    # Class-level defaults so a half-built instance can be collected.
    _n = 0
    _ext = -1
    _closed = False

    def __init__(self, sequence: Optional[Iterable[Any]] = None, *, name: Optional[str] = None,
                 track: bool = True) -> None:
        if name is None or sequence is not None:
            self._create(sequence if sequence is not None else (), name, track, 0)
        else:
            self.shm = raw.wrap(Block.attach(name, track=track))
            try:
                self._attach()
            except BaseException:
                self.shm.close()
                raise

    # ------------------------------------------------------------ creating

    @classmethod
    def _make(cls, sequence: Iterable[Any], *, name: Optional[str], track: bool, flags: int) -> ShareableList:
        """A new list whose block header carries ``flags`` (``_header.FLAG_MANAGED``)."""
        self = cls.__new__(cls)
        self._create(sequence, name, track, flags)
        return self

    def _create(self, sequence: Iterable[Any], name: Optional[str], track: bool, flags: int) -> None:
        where = f"ShareableList({name!r})" if name else "ShareableList"
        if not isinstance(sequence, (list, tuple, range)):
            sequence = list(sequence)
        # Everything is validated and encoded before the block exists.
        packed = _pack_numbers(sequence)
        if packed is not None:  # all ints or all floats: the common case, packed in one go
            data, typecode = packed
            n = len(data) // _WORD
            fmt_words = _FIXED_FORMAT[INT if typecode == "q" else FLOAT].ljust(_WORD, b"\0") * n
            codes = bytes(n)
            lengths = b""  # numbers have no length: the words stay zero
            offsets = _fixed_offsets(n)
            data_len = _WORD * n
        else:
            normalized = [_normalize(v, f"{where}[{i}]") for i, v in enumerate(sequence)]
            n = len(normalized)
            for i, (kind, payload) in enumerate(normalized):
                if kind in (STR, BYTES) and _capacity(len(payload)) > _MAX_CAPACITY:
                    raise ValueError(
                        f"{where}[{i}]: {len(payload)} bytes is more than a ShareableList slot can hold "
                        f"({_MAX_CAPACITY - _WORD} bytes: its format must fit in 8 characters)"
                    )
            data, fmt_words = _pack_mixed(normalized)
            codes = bytes(_CODE[k] for k, _ in normalized)
            lengths = array.array("q", (_ext_word_for(p, _capacity(len(p))) if k in (STR, BYTES) else 0
                                        for k, p in normalized)).tobytes()
            capacities = (_capacity(len(p)) if k in (STR, BYTES) else _WORD for k, p in normalized)
            offset_list = array.array("q", itertools.accumulate(itertools.chain((0,), capacities)))
            offsets = offset_list.tobytes()
            data_len = offset_list[-1]
        data_start = (n + 2) * _WORD
        fmt_start = data_start + data_len
        codes_start = fmt_start + n * _WORD
        ext = -(-(codes_start + n) // _WORD) * _WORD
        total = ext + _WORD * n

        extra = _EXT.pack(_EXT_MAGIC, _EXT_VERSION, n, ext)
        # Written into the block before it is marked ready: nobody sees a half-built list.
        initial = [
            (0, n.to_bytes(_WORD, sys.byteorder, signed=True)),
            (_WORD, offsets),
            (data_start, data),
            (fmt_start, fmt_words),
            (codes_start, codes),
            (ext, lengths),
        ]
        self.shm = raw.wrap(Block.create(
            name, max(total, 2 * _WORD), track=track, kind=KIND_LIST, extra=extra,
            initial=[(offset, piece) for offset, piece in initial if piece], flags=flags,
        ))
        self._bind(n, data_len, ext)

    # ------------------------------------------------------------ attaching

    def _attach(self) -> None:
        shm, buf = self.shm, self.shm.buf
        assert buf is not None
        name, size = shm.name, shm.size
        header = raw.block_of(shm).header
        if header is not None and header.kind != KIND_LIST:
            raise CorruptSegment(
                f"shared memory block {name!r} holds a {KIND_NAMES[header.kind]} block, not a ShareableList"
            )
        if size < 2 * _WORD:
            raise CorruptSegment(f"shared memory block {name!r} ({size} bytes) is too small for a ShareableList")
        n, first = struct.unpack_from("qq", buf, 0)
        # O(1) checks of what the header claims against the real size, before any use.
        if n < 0 or (n + 2) * _WORD + 9 * n > size:
            raise CorruptSegment(f"ShareableList {name!r} claims {n} items; its block holds {size} bytes")
        (data_len,) = struct.unpack_from("q", buf, (n + 1) * _WORD)
        if first != 0 or data_len < 0 or (n + 2) * _WORD + data_len + 9 * n > size:
            raise CorruptSegment(f"ShareableList {name!r}: item offsets point outside its {size}-byte block")
        ext = -1
        if header is not None:
            try:
                magic, version, ext_n, ext = _EXT.unpack(header.extra)
            except struct.error:
                magic, version, ext_n = b"", 0, -1
            codes_end = (n + 2) * _WORD + data_len + 9 * n
            if magic != _EXT_MAGIC or version != _EXT_VERSION or ext_n != n or ext % _WORD \
                    or ext < codes_end or ext + _WORD * n > size:
                raise CorruptSegment(f"ShareableList {name!r}: its shmem header does not match its layout")
        self._bind(n, data_len, ext)

    def _bind(self, n: int, data_len: int, ext: int) -> None:
        buf = self.shm.buf
        assert buf is not None
        self._n = n
        self._data_len = data_len
        self._data = (n + 2) * _WORD
        self._data_word = n + 2
        self._fixed_max = data_len - _WORD  # the last offset an 8-byte item may have
        self._fmts = self._data + data_len  # byte offset of the formats
        self._fmt_word = self._fmts // _WORD  # ... as a word index
        self._codes = self._fmts + n * _WORD
        self._ext = ext
        self._ext_word = ext // _WORD if ext >= 0 else -1
        words = len(buf) // _WORD * _WORD
        self._b = buf
        self._q = buf[:words].cast("q")
        self._d = buf[:words].cast("d")
        if ACCELERATED:
            self._bind_core(buf, n, data_len, ext)

    # ------------------------------------------------------------ reading

    def _read(self, i: int) -> Any:
        """Item ``i`` (0 <= i < n) as stored now, checked against the layout.

        The format decides numbers, bool and None (as when the standard library
        unpacks them); the type code decides between str and bytes.
        """
        q = self._q
        word = q[self._fmt_word + i]
        off = q[1 + i]
        kind = _FIXED_BY_WORD.get(word)
        if kind is None:
            return self._read_text(i, off, word)
        if off & 7 or not 0 <= off <= self._fixed_max:
            raise self._corrupt(i, "its slot lies outside the data area")
        if self._b[self._codes + i] != _CODE[kind]:
            raise self._corrupt(i, "its format and type code disagree")
        if kind == INT:
            return q[self._data_word + (off >> 3)]
        if kind == FLOAT:
            return self._d[self._data_word + (off >> 3)]
        if kind == BOOL:
            return bool(self._b[self._data + off + 7])
        return None

    def _read_text(self, i: int, off: int, word: int) -> Union[str, bytes]:
        end = self._q[2 + i]
        if not 0 <= off <= end <= self._data_len:
            raise self._corrupt(i, "its slot lies outside the data area")
        capacity, exact = _parse_text_format(word)
        if capacity < 0 or capacity > end - off:
            raise self._corrupt(i, f"unknown or oversized format {word.to_bytes(8, 'little', signed=True)!r}")
        code = self._b[self._codes + i]
        if code not in (1, 2):
            raise self._corrupt(i, "its format and type code disagree")
        start = self._data + off
        raw = self._exact_text(i, start, capacity, exact)
        if raw is None:  # written by the standard library: its rule, trailing NULs dropped
            raw = bytes(self._b[start:start + capacity]).rstrip(b"\0")
        if code == 2:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self._corrupt(i, f"its text is not valid UTF-8 ({err.reason})") from None

    def _exact_text(self, i: int, start: int, capacity: int, marked: bool) -> Optional[bytes]:
        """The value shmem wrote, with its exact length; None if shmem's record does
        not apply (a list without one, or a standard-library write since)."""
        if self._ext < 0:
            return None
        word = self._q[self._ext_word + i]
        length = (word >> _LEN_SHIFT) & _LEN_MASK
        if length > capacity:
            return None
        if marked:  # the format says shmem wrote it (see _text_format)
            return bytes(self._b[start:start + length])
        tag = word >> _TAG_SHIFT
        if not tag:
            return None
        raw = bytes(self._b[start:start + length])
        if _tag(raw) != tag or bytes(self._b[start + length:start + capacity]).strip(b"\0"):
            return None
        return raw

    def _read_consistent(self, i: int) -> Any:
        """Item ``i`` read under its sequence lock, when the list has one."""
        if self._ext < 0:
            return self._read(i)
        q = self._q
        seq = self._ext_word + i
        deadline = 0.0
        while True:
            before = q[seq]
            if not before & 1:
                try:
                    value = self._read(i)
                except CorruptSegment:
                    # A damaged item stays damaged; one a writer changed meanwhile
                    # was only read half-written: read it again.
                    if q[seq] == before:
                        raise
                    continue
                if q[seq] == before:
                    return value
            elif not deadline:
                deadline = time.monotonic() + _STUCK_WRITER_SECONDS
            elif time.monotonic() > deadline:
                raise self._corrupt(i, "a writer started changing it and never finished (killed?)")
            else:
                time.sleep(0)

    def _getitem_slow(self, index: Any) -> Any:
        """``self[index]``; the C core (when built) answers ints and floats itself
        and calls this for everything else."""
        if self._closed:
            raise self._closed_error()
        if index.__class__ is int:
            n = self._n
            i = index + n if index < 0 else index
            if 0 <= i < n:
                return self._read_consistent(i)
            raise IndexError(f"ShareableList index {index} out of range")
        if isinstance(index, slice):
            return [self._read_consistent(i) for i in range(*index.indices(self._n))]
        return self[int(operator.index(index))]  # int(): on 3.9, index() may return a subclass

    def __iter__(self) -> Iterator[Any]:
        return iter(self._snapshot())

    def _snapshot(self) -> List[Any]:
        """Every item, read in bulk; items a writer touched meanwhile are re-read one by one."""
        if self._closed:
            raise self._closed_error()
        if ACCELERATED:
            return self._snapshot_core()
        n = self._n
        if self._ext < 0:
            return [self._read(i) for i in range(n)]
        seqs = slice(self._ext_word, self._ext_word + n)
        before = self._q[seqs].tolist()
        try:
            values = [self._read(i) for i in range(n)]
        except CorruptSegment:  # damaged, or half-written meanwhile: item by item decides
            return [self._read_consistent(i) for i in range(n)]
        after = self._q[seqs].tolist()
        if before != after or any(s & 1 for s in before):
            for i in range(n):
                if before[i] != after[i] or before[i] & 1:
                    values[i] = self._read_consistent(i)
        return values

    def __reversed__(self) -> Iterator[Any]:
        return iter(self._snapshot()[::-1])

    def __contains__(self, value: Any) -> bool:
        return value in self._snapshot()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShareableList):
            return self._snapshot() == other._snapshot()
        if isinstance(other, list):
            return self._snapshot() == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]  # mutable, like list

    def count(self, value: Any) -> int:
        """L.count(value) -> integer -- return number of occurrences of value."""
        return self._snapshot().count(value)

    def index(self, value: Any, start: int = 0, stop: int = 2**63 - 1) -> int:
        """L.index(value, [start, [stop]]) -> integer -- return first index of value.
        Raises ValueError if the value is not present."""
        try:
            return self._snapshot().index(value, start, stop)
        except ValueError:
            raise ValueError(f"{value!r} not in this container") from None

    @property
    def format(self) -> str:
        """The struct packing format of all the items, as the standard library reports it."""
        if self._closed:
            raise self._closed_error()
        return "".join(self._format_of(i) for i in range(self._n))

    def _format_of(self, i: int) -> str:
        raw = self._q[self._fmt_word + i].to_bytes(_WORD, "little", signed=True)
        return raw.rstrip(b"\0").rstrip(_EXACT_MARK).decode("ascii", "replace")

    # ------------------------------------------------------------ writing

    def _setitem_slow(self, index: Any, value: Any) -> None:
        """``self[index] = value``; the C core (when built) writes ints and floats
        itself and calls this for everything else."""
        if self._closed:
            raise self._closed_error()
        n = self._n
        i = index if index.__class__ is int else int(operator.index(index))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"ShareableList assignment index {index} out of range")
        t = value.__class__
        if t is int and _INT_MIN <= value <= _INT_MAX:
            kind, payload = INT, value
        elif t is float:
            kind, payload = FLOAT, value
        else:
            kind, payload = _normalize(value, f"ShareableList {self.shm.name!r}[{index}]")
        q = self._q
        off = q[1 + i]
        # Checked before anything is written: a value that does not fit leaves the list unchanged.
        if kind in (STR, BYTES):
            end = q[2 + i]
            if not 0 <= off <= end <= self._data_len:
                raise self._corrupt(i, "its slot lies outside the data area")
            capacity = end - off
            if len(payload) > capacity:
                raise ValueError(
                    f"ShareableList {self.shm.name!r}[{index}]: bytes/str item exceeds available storage "
                    f"({len(payload)} bytes, the slot holds {capacity}: a slot keeps the size of the "
                    "value it was created with)"
                )
            self._write_text(i, kind, payload, self._data + off, capacity)
            return
        if off & 7 or not 0 <= off <= self._fixed_max:
            raise self._corrupt(i, "its slot lies outside the data area")
        at = self._data_word + (off >> 3)
        seq = self._ext_word + i if self._ext >= 0 else -1
        if seq >= 0:
            writing = q[seq] | 1
            q[seq] = writing  # odd: readers wait
        if kind == INT:
            q[at] = payload
            q[self._fmt_word + i] = _INT_WORD
        elif kind == FLOAT:
            self._d[at] = payload
            q[self._fmt_word + i] = _FLOAT_WORD
        else:
            q[at] = _BOOL_TRUE if payload else 0  # None's slot is all zero too
            q[self._fmt_word + i] = _word_of(_FIXED_FORMAT[kind])
        self._b[self._codes + i] = _CODE[kind]
        if seq >= 0:
            q[seq] = _settled(writing)  # even again: the item is whole

    def _write_text(self, i: int, kind: int, payload: bytes, start: int, capacity: int) -> None:
        q = self._q
        seq = self._ext_word + i if self._ext >= 0 else -1
        if seq >= 0:
            writing = q[seq] | 1
            q[seq] = writing
        self._b[start:start + capacity] = payload.ljust(capacity, b"\0")
        q[self._fmt_word + i] = _word_of(_text_format(capacity, exact=seq >= 0))
        self._b[self._codes + i] = _CODE[kind]
        if seq >= 0:
            q[seq] = _settled(writing) | _ext_word_for(payload, capacity)

    # ------------------------------------------------------------ the rest

    def _closed_error(self) -> ValueError:
        return ValueError(f"ShareableList {self.shm.name!r} is closed")

    def _corrupt(self, i: int, why: str) -> CorruptSegment:
        return CorruptSegment(f"ShareableList {self.shm.name!r}, item {i}: {why}")

    def close(self) -> None:
        """Close this process's access to the list (the block stays). Idempotent;
        using the list afterwards raises ValueError, like a closed file."""
        self._closed = True
        if ACCELERATED:
            self._release_core()
        for view in ("_q", "_d"):
            mv = self.__dict__.pop(view, None)
            if mv is not None:
                mv.release()
        self.__dict__.pop("_b", None)
        self.shm.close()

    def unlink(self) -> None:
        """Remove the list's block; call it once, from any one process."""
        self.shm.unlink()

    def __enter__(self) -> ShareableList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_reattach, (type(self), self.shm.name, self.shm._track))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._snapshot()}, name={self.shm.name!r})"

    def __class_getitem__(cls, item: Any) -> Any:
        import types

        return types.GenericAlias(cls, item)

    if not ACCELERATED:
        __getitem__ = _getitem_slow
        __setitem__ = _setitem_slow

        def __len__(self) -> int:
            return self._n


def _reattach(cls: type, name: str, track: bool) -> ShareableList:
    return cls(name=name, track=track)  # type: ignore[no-any-return]


ShareableList.__module__ = "shmem"
