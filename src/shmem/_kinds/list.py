"""ShareableList: the standard library's, exact, fast, and able to share lists with it.

This module is the list kind's class: its API (the standard library's, plus
``close``, slices and context management), creating and attaching its block
(``_core.block``), and reading and writing items under their sequence locks.
``create_list`` is the way in for the manager (a header flag more).

Where everything lies and how values are encoded is ``list_layout``, the
kind's one codec, with the drawing: the standard library's layout at offset 0
of the block, so either library attaches, reads and writes lists the other
made, plus an extension of shmem's own (exact str and bytes, per-item
sequence numbers) that the standard library never looks at. When the C
extension is built, ``_speedups.ListCore`` is the class's base and reads and
writes int and float items itself; everything else comes here
(``_getitem_slow``, ``_setitem_slow``).

The concurrency guarantee:

* **No torn reads.** Each item has a sequence lock: a shmem writer makes the
  item's sequence number odd, writes, and makes it even again; a shmem reader
  retries until it read the same even number before and after (63 bits: they
  cannot come round within one read; ``list_layout`` says why and on which
  CPUs). A reader in another process never sees a mixture of two values, nor
  an exception, while a shmem writer changes the item - one writer per item
  at a time (concurrent writers of one item need a lock of their own).
* **A stalled writer is not corruption.** A reader waits up to a second for a
  write in progress, then raises ``shmem.WriterStalled`` (a TimeoutError): the
  writer is stopped, starved, or was killed mid-write; the next write of the
  item makes it whole. ``CorruptSegment`` means damage that stays.

Everything read from the block is hostile input: the header is checked in O(1)
against the block's size when attaching (``list_layout.read_layout``), and
each item's offsets, format and code when it is read; nothing proportional to
what the header claims is allocated.
"""

from __future__ import annotations

import operator
import os
import time
import types
import warnings
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .. import _platform
from .._core.block import MAX_SIZE, Block
from .._core.header import KIND_LIST, KIND_NAMES, total_size
from .._errors import CorruptSegment, InvalidSize, NoSpace, WriterStalled
from . import raw
from .list_layout import (
    ACCELERATED,
    BOOL,
    BOOL_TRUE,
    BYTES,
    BYTES_CODE,
    FENCE,
    FLOAT,
    FORMAT_WORD,
    INT,
    INT_MAX,
    INT_MIN,
    KIND_OF_FORMAT,
    STDLIB_BACK_TRANSFORMS,
    STDLIB_FORMATS,
    STR,
    STR_CODE,
    TORN_READS_PREVENTED,
    TYPE_CODE,
    UNORDERED_WARNING,
    WORD,
    WRITING,
    Layout,
    encode,
    format_text,
    normalize,
    parse_text_format,
    read_layout,
    recorded_text,
    settled,
    stdlib_type_code,
    text_format_word,
    text_record,
)
from .raw import SharedMemory

# How long a reader waits for a writer that is in the middle of an item.
_STUCK_WRITER_SECONDS = 1.0
# From this size on, a new list's room in /dev/shm is checked before it is encoded
# (below it, encoding is quick and creating the block fails as fast).
_ROOM_CHECKED_FROM = 1 << 20
_unordered_warned = False

if ACCELERATED:  # list_layout decides, once, whether the C twin is in use
    from .._speedups import ListCore as _Core
else:
    _Core = object  # type: ignore[misc,assignment]


class ShareableList(_Core):
    """A list of fixed length in a shared memory block, the standard library's
    ``ShareableList`` with exact values and fast access.

    ``ShareableList(sequence)`` creates a block holding the items (int, float,
    bool, str, bytes, None); ``ShareableList(name=...)`` attaches to an
    existing one - made by shmem or by the standard library. Items can be
    replaced (a str or bytes only by one that fits the space its slot was
    given), the length cannot change. ``track`` is SharedMemory's.

    As in the standard library, ``==`` and ``hash()`` are those of the object
    (two handles on one block are different objects); ``equals`` compares items.

    Args:
        sequence: The items of a new list. None (or leaving it out) with a
            ``name`` attaches to that list instead.
        name: The block's name: None picks a new one when creating; the
            list to attach to when ``sequence`` is None.
        track: ``SharedMemory``'s: whether shmem removes the block once its
            creator and every process that has it open are gone.

    Raises:
        FileExistsError: ``shmem.SegmentExists``: creating under a taken name.
        FileNotFoundError: ``shmem.SegmentNotFound``: attaching to a name no
            block has.
        OSError: ``shmem.NoSpace`` (errno ENOSPC): /dev/shm cannot hold the
            list; raised before any item is encoded.
        TypeError: An item of a type it cannot store.
        OverflowError: An int beyond 64 bits, or more than ``sys.maxsize``
            items.
        ValueError: ``shmem.InvalidSize`` for more items than any block can
            hold; ``shmem.CorruptSegment`` for a block that holds no valid
            list (damaged, or not a list); ``shmem.InvalidName`` for a bad name.

    Reading an item can raise ``shmem.WriterStalled`` (a TimeoutError) when a
    writer stopped in the middle of writing it, and ``shmem.CorruptSegment``
    when the item is damaged; writing one raises TypeError, OverflowError or
    ValueError for a value that cannot be stored or does not fit its slot,
    and leaves the list unchanged. A closed list raises ValueError.
    """

    # Class-level defaults: a half-built instance (its __init__ raised) can
    # still be closed, shown and collected.
    shm: SharedMemory = None  # type: ignore[assignment]  # None only while half-built
    _n = 0
    _ext = -1
    _closed = False

    def __init__(
        self, sequence: Optional[Iterable[Any]] = None, *, name: Optional[str] = None, track: bool = True
    ) -> None:
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

    def _create(self, sequence: Iterable[Any], name: Optional[str], track: bool, flags: int) -> None:
        where = f"ShareableList({name!r})" if name else "ShareableList"
        if not isinstance(sequence, (list, tuple, range)):
            sequence = list(sequence)
        # Everything is validated and encoded before the block exists, and
        # written into it before it is published: nobody sees a half-built list.
        new = encode(sequence, where, _room_checker(where, name))
        block = Block.create(
            name, new.size, track=track, kind=KIND_LIST, extra=new.kind_header, initial=new.pieces, flags=flags
        )
        self.shm = raw.wrap(block)
        self._bind(new.layout)

    # ------------------------------------------------------------ attaching

    def _attach(self) -> None:
        buf, block = self.shm.buf, raw.block_of(self.shm)
        assert buf is not None
        header = block.header
        if header is not None and header.kind != KIND_LIST:
            raise CorruptSegment(
                f"shared memory block {block.name!r} holds a {KIND_NAMES[header.kind]} block, not a ShareableList"
            )
        self._bind(read_layout(buf, block.name, None if header is None else header.extra))

    def _bind(self, layout: Layout) -> None:
        """Keep the validated ``layout``'s offsets at hand, and views of the block."""
        if not TORN_READS_PREVENTED:
            _warn_unordered()
        buf = self.shm.buf
        assert buf is not None
        n, data_len, ext = layout
        self._n = n
        self._data_len = data_len
        self._data = layout.data
        self._data_word = layout.data // WORD
        self._fixed_max = data_len - WORD  # the last offset an 8-byte item may have
        self._fmts = layout.formats
        self._fmt_word = layout.formats // WORD
        self._codes = layout.codes
        self._ext = ext
        self._ext_word = ext // WORD if ext >= 0 else -1  # item i's sequence number: word _ext_word + i
        self._rec_word = layout.records // WORD if ext >= 0 else -1  # its record: word _rec_word + i
        words = len(buf) // WORD * WORD
        # Views of their own (a slice is one), as the C core holds its own buffer: the list
        # keeps working if its user calls shm.close() - the mapping lives as long as they do.
        self._b = buf[:]
        self._q = buf[:words].cast("q")  # item i's slot offset is word 1 + i, its end word 2 + i
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
        kind = KIND_OF_FORMAT.get(word)
        if kind is None:
            return self._read_text(i, off, word)
        if off & 7 or not 0 <= off <= self._fixed_max:
            raise self._corrupt(i, "its slot lies outside the data area")
        if self._b[self._codes + i] != TYPE_CODE[kind]:
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
        capacity, marked = parse_text_format(word)
        if capacity < 0 or capacity > end - off:
            raise self._corrupt(i, f"unknown or oversized format {word.to_bytes(WORD, 'little', signed=True)!r}")
        code = self._b[self._codes + i]
        if code != STR_CODE and code != BYTES_CODE:
            raise self._corrupt(i, "its format and type code disagree")
        slot = self._b[self._data + off : self._data + off + capacity]
        value = recorded_text(self._q[self._rec_word + i], slot, marked) if self._ext >= 0 else None
        if value is None:  # written by the standard library: its rule, trailing NULs dropped
            value = bytes(slot).rstrip(b"\0")
        if code == BYTES_CODE:
            return value
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self._corrupt(i, f"its text is not valid UTF-8 ({err.reason})") from None

    def _read_consistent(self, i: int) -> Any:
        """Item ``i`` read under its sequence lock, when the list has one."""
        if self._ext < 0:
            return self._read(i)
        q = self._q
        seq = self._ext_word + i
        deadline = 0.0
        while True:
            before = q[seq]
            if not before & WRITING:
                if FENCE:  # the item's loads after the first look at its number ...
                    FENCE()
                try:
                    value = self._read(i)
                except CorruptSegment:
                    # A damaged item stays damaged; one a writer changed meanwhile
                    # was only read half-written: read it again.
                    if FENCE:
                        FENCE()
                    if q[seq] == before:
                        raise
                    continue
                if FENCE:  # ... and before the second
                    FENCE()
                if q[seq] == before:
                    return value
            elif not deadline:
                deadline = time.monotonic() + _STUCK_WRITER_SECONDS
            elif time.monotonic() > deadline:
                raise WriterStalled(
                    str(self.shm.name),
                    f"ShareableList item {i}: a writer started changing it over {_STUCK_WRITER_SECONDS:g} s "
                    "ago and has not finished (stopped, or killed mid-write); read it again later - "
                    "the next write of the item makes it whole",
                )
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
        if FENCE:
            FENCE()
        try:
            values = [self._read(i) for i in range(n)]
        except CorruptSegment:  # damaged, or half-written meanwhile: item by item decides
            return [self._read_consistent(i) for i in range(n)]
        if FENCE:
            FENCE()
        after = self._q[seqs].tolist()
        if before != after or any(s & WRITING for s in before):
            for i in range(n):
                if before[i] != after[i] or before[i] & WRITING:
                    values[i] = self._read_consistent(i)
        return values

    def __reversed__(self) -> Iterator[Any]:
        return iter(self._snapshot()[::-1])

    def __contains__(self, value: Any) -> bool:
        return value in self._snapshot()

    def equals(self, other: Iterable[Any]) -> bool:
        """Whether ``other`` (another ShareableList, a list, any iterable) holds
        equal items in the same order. ``==`` compares identity, as in the
        standard library, where a ShareableList is hashable."""
        items = other._snapshot() if isinstance(other, ShareableList) else list(other)
        return self._snapshot() == items

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
        return format_text(self._q[self._fmt_word + i])

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
        if t is int and INT_MIN <= value <= INT_MAX:
            kind, payload = INT, value
        elif t is float:
            kind, payload = FLOAT, value
        elif t is str:
            kind, payload = STR, value.encode("utf-8")
        elif t is bytes:
            kind, payload = BYTES, value
        else:
            kind, payload = normalize(value, f"ShareableList {self.shm.name!r}[{index}]")
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
        seq = self._ext_word + i if self._ext_word >= 0 else -1
        if seq >= 0:  # written out here, not through _begin_write: this is the pure path's hot one
            writing = q[seq] | WRITING
            q[seq] = writing  # odd: readers wait
            if FENCE:
                FENCE()
        if kind == INT:
            q[at] = payload
            q[self._fmt_word + i] = FORMAT_WORD[INT]
        elif kind == FLOAT:
            self._d[at] = payload
            q[self._fmt_word + i] = FORMAT_WORD[FLOAT]
        else:
            q[at] = BOOL_TRUE if payload else 0  # None's slot is all zero too
            q[self._fmt_word + i] = FORMAT_WORD[kind]
        self._b[self._codes + i] = TYPE_CODE[kind]
        if seq >= 0:  # a number leaves the record alone: only a marked or checked str/bytes reads it
            if FENCE:
                FENCE()
            q[seq] = settled(writing)  # even again: the item is whole

    def _write_text(self, i: int, kind: int, payload: bytes, start: int, capacity: int) -> None:
        q = self._q
        seq = self._ext_word + i if self._ext_word >= 0 else -1
        if seq >= 0:
            writing = q[seq] | WRITING
            q[seq] = writing
            if FENCE:
                FENCE()
        self._b[start : start + capacity] = payload.ljust(capacity, b"\0")
        q[self._fmt_word + i] = text_format_word(capacity, seq >= 0)
        self._b[self._codes + i] = TYPE_CODE[kind]
        if seq >= 0:
            q[self._rec_word + i] = text_record(payload, capacity)
            if FENCE:
                FENCE()
            q[seq] = settled(writing)

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
        for view in ("_q", "_d", "_b"):
            mv = self.__dict__.pop(view, None)
            if mv is not None:
                mv.release()
        if self.shm is not None:
            self.shm.close()

    def unlink(self) -> None:
        """Remove the list's block; call it once, from any one process.

        Raises:
            FileNotFoundError: ``shmem.SegmentNotFound``: the block was
                already removed.
        """
        self.shm.unlink()

    def __enter__(self) -> ShareableList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_reattach, (type(self), self.shm.name, raw.block_of(self.shm).tracked))

    def __repr__(self) -> str:
        """The standard library's ``ShareableList([items], name='...')``; never raises:
        ``<closed>`` for a closed or half-built list, ``<unreadable: ...>`` for one
        whose items cannot be read now."""
        name = None if self.shm is None else self.shm.name
        if self._closed or "_q" not in self.__dict__:
            items = "<closed>"
        else:
            try:
                items = str(self._snapshot())
            except Exception as err:  # noqa: BLE001 - repr is for showing, in tracebacks too
                items = f"<unreadable: {type(err).__name__}>"
        return f"{type(self).__name__}({items}, name={name!r})"

    def __class_getitem__(cls, item: Any) -> Any:
        return types.GenericAlias(cls, item)

    if not ACCELERATED:
        __getitem__ = _getitem_slow
        __setitem__ = _setitem_slow

        def __len__(self) -> int:
            return self._n

    # ------------------------------------------------------------ the standard library's helpers
    # Private there, but called by code written against it (CPython's own tests call
    # _get_packing_format): the same names, answering from the same layout.

    _alignment: ClassVar[int] = WORD
    _types_mapping: ClassVar[Dict[type, str]] = STDLIB_FORMATS
    _back_transforms_mapping: ClassVar[Dict[int, Callable[[Any], Any]]] = STDLIB_BACK_TRANSFORMS
    _extract_recreation_code = staticmethod(stdlib_type_code)

    def _position(self, position: int) -> int:
        if self._closed:
            raise self._closed_error()
        i = position + self._n if position < 0 else position
        if not 0 <= i < self._n:
            raise IndexError("Requested position out of range.")
        return i

    def _get_packing_format(self, position: int) -> str:
        "Gets the packing format for a single value stored in the list."
        return self._format_of(self._position(position))

    def _get_back_transform(self, position: int) -> Callable[[Any], Any]:
        "Gets the back transformation function for a single value."
        i = self._position(position)
        try:
            return self._back_transforms_mapping[self._b[self._codes + i]]
        except KeyError:
            raise self._corrupt(i, f"unknown type code {self._b[self._codes + i]}") from None

    def _set_packing_format_and_transform(self, position: int, fmt_as_str: str, value: Any) -> None:
        """Sets the packing format and back transformation code for a
        single value in the list at the specified position."""
        i = self._position(position)
        # struct "8s", as the standard library packs it; never shmem's exact-length mark (a
        # format copied from the standard library's view of a shmem list may carry it).
        fmt = fmt_as_str.encode("utf-8")[:WORD].rstrip(b" ").ljust(WORD, b"\0")
        q, seq = self._q, self._ext_word + i if self._ext_word >= 0 else -1
        if seq >= 0:
            writing = q[seq] | WRITING
            q[seq] = writing
            if FENCE:
                FENCE()
        self._b[self._fmts + WORD * i : self._fmts + WORD * (i + 1)] = fmt
        self._b[self._codes + i] = self._extract_recreation_code(value)
        if seq >= 0:
            q[self._rec_word + i] = 0  # shmem's record no longer applies: the standard library's rules
            if FENCE:
                FENCE()
            q[seq] = settled(writing)

    @property
    def _list_len(self) -> int:
        return self._n

    @property
    def _allocated_offsets(self) -> List[int]:
        return self._q[1 : self._n + 2].tolist() if "_q" in self.__dict__ else [0]

    @property
    def _format_size_metainfo(self) -> str:
        return "q" * (self._n + 1)

    @property
    def _format_packing_metainfo(self) -> str:
        return "8s" * self._n

    @property
    def _format_back_transform_codes(self) -> str:
        return "b" * self._n

    @property
    def _offset_data_start(self) -> int:
        return (self._n + 2) * WORD

    @property
    def _offset_packing_formats(self) -> int:
        return self._offset_data_start + getattr(self, "_data_len", 0)

    @property
    def _offset_back_transform_codes(self) -> int:
        return self._offset_packing_formats + self._n * WORD


def create_list(
    sequence: Iterable[Any], *, name: Optional[str] = None, track: bool = True, flags: int = 0
) -> ShareableList:
    """A new ``ShareableList`` (see the class) whose block header also carries
    ``flags`` - ``_core.header.FLAG_MANAGED`` for a manager's lists."""
    made = ShareableList.__new__(ShareableList)
    made._create(sequence, name, track, flags)
    return made


def _reattach(cls: type, name: str, track: bool) -> ShareableList:
    return cls(name=name, track=track)  # type: ignore[no-any-return]


def _room_checker(where: str, name: Optional[str]) -> Callable[[int], None]:
    """``encode``'s ``room``: InvalidSize for a list larger than any block can be,
    NoSpace for one /dev/shm cannot hold now - before it is encoded."""

    def room(size: int) -> None:
        if size > MAX_SIZE:
            raise InvalidSize(
                f"{where}: {size} bytes needed, more than any shared memory block can be ({MAX_SIZE} bytes)"
            )
        if size >= _ROOM_CHECKED_FROM:
            st = os.statvfs(os.path.dirname(_platform.path_of("shmem")))
            free, total = st.f_bavail * st.f_frsize, total_size(size)
            if total > free:
                raise NoSpace(name or "(new block)", f"{where}: {total} bytes needed, {free} free")

    return room


def _warn_unordered() -> None:
    global _unordered_warned
    if not _unordered_warned:
        _unordered_warned = True
        warnings.warn(UNORDERED_WARNING, RuntimeWarning, stacklevel=5)


ShareableList.__module__ = "shmem"
