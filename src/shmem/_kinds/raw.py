"""SharedMemory: the standard library's class, with the promises kept.

API: exactly ``multiprocessing.shared_memory.SharedMemory`` of Python 3.13 -
``SharedMemory(name=None, create=False, size=0, *, track=True)``, ``buf``,
``name``, ``size``, ``close()``, ``unlink()``, pickling by name - plus use as a
context manager (``with`` closes, never unlinks).

Lifecycle (see ``_lifecycle`` for how it is kept):

* ``track=True`` (default): the block stays while its creator or any process
  that has it open lives, and is removed automatically - silently, within
  about a second - once all of them are gone, however they died. A process
  that only attached never removes it (the standard library does: gh-82300).
  A tracked handle counts as a user until ``close()``.
* ``track=False``: never removed automatically; the block stays until
  ``unlink()``. An untracked attach does not count as a user.
* ``unlink()`` removes the name at once, as in the standard library; mappings
  stay valid until closed.

What else differs from the standard library, each a defect it has:

* Creation reserves the memory (``posix_fallocate``): a block that does not
  fit raises ``OSError(ENOSPC)`` at creation instead of a later SIGBUS
  (gh-114390), and leaves nothing behind.
* An attacher sees no block (FileNotFoundError) or the whole block, never a
  zero-size or partly created one: a "ready" mark is written last.
* ``close()`` with NumPy arrays or memoryviews still using ``buf`` does not
  raise BufferError: the mapping lives until the last of them is gone.
* A failed attach never unlinks (gh-153279); a failed create removes only the
  file it made itself.
* Bad names raise ValueError before anything happens; blocks are created
  0600 whatever the umask; symlinks, FIFOs and directories are refused.
* One file descriptor per open block (the standard library holds two).
"""

from __future__ import annotations

import mmap
import operator
import os
import sys
from typing import Any, Optional, Sequence, Tuple, Type, TypeVar

from .._core import lifecycle
from .._core import names
from .. import _platform
from .._errors import InvalidSize, SegmentExists, SegmentNotFound
from .._core.header import KIND_RAW, READY, READY_OFFSET, Header, total_size

_S = TypeVar("_S", bound="SharedMemory")


class SharedMemory:
    """Creates a new shared memory block or attaches to an existing one.

    ``name`` is the block's unique name (None with ``create=True`` picks a new
    one); ``create`` chooses between creating (True) and attaching (False);
    ``size`` is the number of bytes to create and is ignored when attaching.
    ``track`` decides whether shmem removes the block once every process using
    it is gone (see the module documentation).
    """

    # Class-level defaults: a half-built instance (its __init__ raised) can
    # still be closed and garbage-collected without AttributeError.
    _name: Optional[str] = None
    _mmap: Optional[mmap.mmap] = None
    _buf: Optional[memoryview] = None
    _size = 0
    _track = True
    _header: Optional[Header] = None
    _inode: Optional[int] = None  # the file this handle mapped: tells it from a later block of the same name

    def __init__(self, name: Optional[str] = None, create: bool = False, size: int = 0, *, track: bool = True) -> None:
        self._setup(name, create, size, track, KIND_RAW, b"", (), 0, False)

    @classmethod
    def _typed(
        cls: Type[_S], name: Optional[str], create: bool, size: int = 0, *,
        track: bool = True, kind: int = KIND_RAW, extra: bytes = b"",
        initial: Sequence[Tuple[int, bytes]] = (), flags: int = 0, readonly: bool = False,
    ) -> _S:
        """For shmem's own typed blocks (lists, arrays): create one whose header
        carries ``kind`` and the kind's own header ``extra``, filled with the
        ``initial`` (offset, bytes) pieces - all written before the ready mark,
        so no attacher ever sees it half built - with extra header ``flags``
        (``_header.FLAG_MANAGED``); or attach one, read-only if asked. The
        caller checks the attached block's ``_header``."""
        self = cls.__new__(cls)
        self._setup(name, create, size, track, kind, extra, initial, flags, readonly)
        return self

    def _setup(
        self, name: Optional[str], create: bool, size: int, track: bool, kind: int, extra: bytes,
        initial: Sequence[Tuple[int, bytes]], flags: int, readonly: bool,
    ) -> None:
        # Everything is checked before anything is touched: bad input has no side effect.
        size = operator.index(size)
        if size < 0:
            raise InvalidSize("'size' must be a positive integer")
        if create and size == 0:
            raise InvalidSize("'size' must be a positive number different from zero")
        if name is None and not create:
            raise ValueError("'name' can only be None if create=True")
        if name is not None:
            name = names.validate(name)
        self._track = bool(track)
        if create:
            if any(offset < 0 or offset + len(data) > size for offset, data in initial):
                raise InvalidSize(f"initial contents do not fit in {size} bytes")
            self._create(name, size, kind, extra, initial, flags)
        else:
            self._attach(name, readonly)  # type: ignore[arg-type]

    # ------------------------------------------------------------ creating

    def _create(
        self, name: Optional[str], size: int, kind: int, extra: bytes, initial: Sequence[Tuple[int, bytes]],
        flags: int,
    ) -> None:
        header = Header.new(
            size, kind=kind, track=self._track, creator=_platform.current_process(), extra=extra, flags=flags
        )
        total = total_size(size)
        while True:
            candidate = name if name is not None else names.generate()
            if self._track:
                # Registered before the block exists, so a creator killed right after
                # creating it still has it removed.
                lifecycle.track_created(candidate, header.block_id)
            try:
                opened = _platform.create_exclusive(candidate)
            except BaseException as err:
                if self._track:
                    lifecycle.untrack(candidate, header.block_id)
                if name is None and isinstance(err, SegmentExists):
                    continue  # a generated name collided: draw another
                raise
            break
        try:
            if self._track:
                _platform.lock_shared(opened.fd, lifecycle.USERS_LOCK)
            # The steps and their order are drawn in _header: header page first (the file
            # goes from empty to full size with it), then the reservation, then "ready".
            trailer = Header.trailer_offset(total)
            _platform.write_at(opened.fd, header.pack_page(), trailer, candidate)
            _platform.reserve(opened.fd, total, candidate)
            for offset, data in initial:  # through the file: no page faults, unlike the mapping
                _platform.write_at(opened.fd, data, offset, candidate)
            _platform.write_at(opened.fd, READY, trailer + READY_OFFSET, candidate)
            self._map(opened.fd, size)  # the data only: the header stays out of reach of buf
        except BaseException:
            # We made this block and cannot finish it: remove it - ours, and only ours.
            _platform.remove_own(candidate, opened.inode)
            if self._track:
                lifecycle.untrack(candidate, header.block_id)
            raise
        finally:
            os.close(opened.fd)  # mmap holds its own duplicate (and with it the users lock)
        self._name = candidate
        self._size = size
        self._inode = opened.inode
        self._header = header._replace(ready=True)
        self._buf = memoryview(self._mmap)  # type: ignore[arg-type]

    # ------------------------------------------------------------ attaching

    def _attach(self, name: str, readonly: bool) -> None:
        opened = _platform.open_existing(name, writable=not readonly)
        try:
            if self._track:
                # Waits while a reaper or gc() holds the exclusive lock to remove it;
                # then the name is gone, and we say so rather than map a removed block.
                _platform.lock_shared(opened.fd, lifecycle.USERS_LOCK)
                if not _platform.still_published(name, opened.inode):
                    raise SegmentNotFound(name, "the shared memory block was removed while attaching")
            if opened.size == 0:
                raise SegmentNotFound(name, "the shared memory block is empty: still being created")
            header = Header.read(opened.fd, opened.size, name)
            if header is not None and not header.ready:
                raise SegmentNotFound(name, "the shared memory block is still being created")
            # A block another program made (the standard library's, say) is all data.
            size = header.size if header is not None else opened.size
            self._map(opened.fd, size, readonly)
        except BaseException:
            # Never unlink here: the block is not ours (gh-153279).
            self._close_mapping()
            raise
        finally:
            os.close(opened.fd)
        self._name = name
        self._size = size
        self._inode = opened.inode
        self._header = header
        self._buf = memoryview(self._mmap)  # type: ignore[arg-type]

    def _map(self, fd: int, length: int, readonly: bool = False) -> None:
        self._mmap = mmap.mmap(fd, length, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)

    # ------------------------------------------------------------ the API

    @property
    def buf(self) -> Optional[memoryview]:
        """A memoryview of the block's contents (None once closed)."""
        return self._buf

    @property
    def name(self) -> Optional[str]:
        """Unique name that identifies the shared memory block."""
        return self._name

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._size

    def close(self) -> None:
        """Close this handle's access to the block; the block itself stays.

        Idempotent. Arrays or memoryviews still made from ``buf`` keep working:
        the mapping (and this process's claim as a user) is released with the
        last of them instead of raising BufferError.
        """
        buf, self._buf = self._buf, None
        if buf is not None:
            try:
                buf.release()
            except BufferError:
                # Views exported from buf (np.frombuffer, memoryview(buf)) hold it,
                # and it holds the mapping: let the last of them unmap it.
                self._mmap = None
                return
            del buf
        self._close_mapping()

    def _close_mapping(self) -> None:
        mm, self._mmap = self._mmap, None
        # Unmap only if nothing else holds the mmap object: np.ndarray(buffer=shm.buf)
        # keeps a reference to the mmap itself (its .base), without an export, and
        # would segfault on the next access (numpy#18294). 2 = `mm` + the argument.
        if mm is not None and sys.getrefcount(mm) <= 2:
            try:
                mm.close()
            except BufferError:
                pass  # slices of buf still hold the mapping; it goes with them

    def unlink(self) -> None:
        """Remove the block's name; call it once, from any one process.

        Processes that have the block mapped keep using it until they close.
        A second call raises FileNotFoundError, as in the standard library.
        """
        if self._name is None:
            raise ValueError("this SharedMemory was never created or attached")
        _platform.unlink(self._name)
        if self._header is not None and self._header.auto_remove:
            lifecycle.untrack(self._name, self._header.block_id)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Tuple[Any, ...]:
        # Pickles by name: unpickling attaches (and keeps `track`), it never copies data.
        return (_reattach, (type(self), self.name, self._track))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.size})"


def _reattach(cls: Type[_S], name: str, track: bool) -> _S:
    return cls(name, track=track)


SharedMemory.__module__ = "shmem"
