"""What is in /dev/shm: typed records of every block, for ``shmem ls`` and friends.

Everything here only reads, except ``remove_segment``. A block's header is
hostile input like anywhere else: a block whose header does not parse is
reported as ``corrupt``, never trusted.

State of a block shmem made:

* ``alive``: its creator lives, or a process holds it open (the users lock);
* ``dead``: its creator is gone and nobody holds it open - abandoned, and
  ``gc()`` removes it unless it was created with ``track=False``;
* ``unknown``: we cannot tell - a block another program made (no header, no
  locks), or a creator in another pid namespace.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Dict, List, NamedTuple, Optional

from . import _platform
from ._errors import CorruptSegment, SegmentInUse
from ._core.header import FLAG_MANAGED, KIND_ARRAY, KIND_LIST, KIND_NAMES, Header
from ._core.lifecycle import USERS_LOCK


class Segment(NamedTuple):
    """One entry of the shared memory directory, as ``list_segments()`` reports it."""

    name: str
    size: int  # bytes of data (the header's size; the file's size for foreign blocks)
    file_size: int
    kind: str  # "raw", "list", "array", "foreign" or "corrupt"
    detail: str  # e.g. "2000 items", "float64 (1000, 3) C"; "" when there is nothing to add
    state: str  # "alive", "dead" or "unknown"
    managed: bool  # created through a SharedMemoryManager
    track: Optional[bool]  # removed automatically once abandoned (None: foreign)
    ready: bool  # complete (False: being created, or its creator died while creating it)
    in_use: Optional[bool]  # some process holds the users lock (None: cannot tell)
    creator_pid: Optional[int]
    created: Optional[float]  # seconds since the epoch (foreign: last modification)
    uid: int
    mode: int

    @property
    def age(self) -> Optional[float]:
        return None if self.created is None else max(0.0, time.time() - self.created)

    @property
    def foreign(self) -> bool:
        return self.kind in ("foreign", "corrupt")


def _describe(header: Header) -> str:
    """A short, numpy-free description of a typed block's own header."""
    extra = header.extra
    try:
        if header.kind == KIND_LIST:
            (n,) = struct.unpack_from("<q", extra, 16)
            return f"{n} items"
        if header.kind == KIND_ARRAY:
            return _describe_array(extra)
    except (struct.error, ValueError):
        return "unreadable kind header"
    return ""


# The start of an array's own header (drawn in _array_header's docstring), read here
# without NumPy: magic, version, order, ndim, dtype length, nbytes, then the
# shape (int64 each) and the dtype as ASCII JSON.
_ARRAY_HEAD = struct.Struct("<8sHcBIq")
_ARRAY_MAGIC = b"\x93SHMARR\n"


def _describe_array(extra: bytes) -> str:
    magic, _, order, ndim, dtype_len, _ = _ARRAY_HEAD.unpack_from(extra, 0)
    if magic != _ARRAY_MAGIC or ndim > 64:
        raise ValueError("not an array header")
    shape = struct.unpack_from(f"<{ndim}q", extra, _ARRAY_HEAD.size)
    start = _ARRAY_HEAD.size + 8 * ndim
    dtype = json.loads(extra[start:start + dtype_len].decode("ascii"))
    dtype_text = dtype if isinstance(dtype, str) else "structured" if "names" in dtype else "subarray"
    return f"{dtype_text} {tuple(shape)} {order.decode('ascii', 'replace')}"


def inspect_segment(name: str) -> Segment:
    """Everything known about block ``name``; FileNotFoundError if there is none."""
    opened = _platform.open_existing(name, writable=False)
    uid, mode = opened.uid, opened.mode
    try:
        try:
            header = Header.read(opened.fd, opened.size, name)
        except CorruptSegment as err:
            return Segment(name, opened.size, opened.size, "corrupt", str(err), "unknown", False, None,
                           False, None, None, opened.mtime, uid, mode)
        if header is None:
            return Segment(name, opened.size, opened.size, "foreign", "", "unknown", False, None,
                           True, None, None, opened.mtime, uid, mode)
        in_use = _platform.is_locked(opened.fd, USERS_LOCK)
        creator_alive = _platform.process_alive(header.creator)
        if creator_alive or in_use:
            state = "alive"
        elif creator_alive is None:
            state = "unknown"
        else:
            state = "dead"
        return Segment(
            name, header.size, opened.size, KIND_NAMES[header.kind], _describe(header), state,
            bool(header.flags & FLAG_MANAGED), header.auto_remove, header.ready, in_use,
            header.creator.pid, header.created_ns / 1e9, uid, mode,
        )
    finally:
        os.close(opened.fd)


def list_segments(*, include_foreign: bool = False) -> List[Segment]:
    """Every block in the shared memory directory this user can open, sorted by
    name; blocks other programs made only with ``include_foreign``."""
    found = []
    for name in sorted(_platform.entries()):
        try:
            segment = inspect_segment(name)
        except OSError:  # vanished meanwhile, not a regular file, or not ours to open
            continue
        if include_foreign or not segment.foreign:
            found.append(segment)
    return found


def first_bytes(name: str, count: int) -> bytes:
    """The first ``count`` bytes of block ``name``, read without mapping it
    (symlinks and special files refused, as everywhere)."""
    opened = _platform.open_existing(name, writable=False)
    try:
        return os.pread(opened.fd, max(0, count), 0)
    finally:
        os.close(opened.fd)


def users_of(names: List[str]) -> Dict[str, List[int]]:
    """The pids that have each block mapped or open (a scan of /proc)."""
    return _platform.processes_using(names)


def remove_segment(name: str, *, force: bool = False) -> None:
    """Unlink block ``name`` (any block, foreign ones included: the caller named it).

    Refuses with SegmentInUse (a PermissionError) a block that some process has
    mapped or open, or whose users lock is held, unless ``force``.
    FileNotFoundError when there is no such block.
    """
    segment = inspect_segment(name)
    if not force:
        pids = users_of([name])[name]
        if segment.in_use or pids:
            who = f"processes {', '.join(map(str, pids))}" if pids else "a process"
            raise SegmentInUse(name, f"in use by {who}")
    _platform.unlink(name)
