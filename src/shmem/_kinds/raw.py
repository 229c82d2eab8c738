"""SharedMemory: the standard library's class, with the promises kept.

API: exactly ``multiprocessing.shared_memory.SharedMemory`` of Python 3.13 -
``SharedMemory(name=None, create=False, size=0, *, track=True)``, ``buf``,
``name``, ``size``, ``close()``, ``unlink()``, pickling by name - plus use as a
context manager (``with`` closes, never unlinks).

Lifecycle (``_core.lifecycle`` draws how it is kept):

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
  zero-size or partly created one, and a creator killed at any instant leaves
  no empty file that blocks the name: blocks are built unnamed and published
  with one ``link()`` (``_core.block``).
* ``close()`` with NumPy arrays or memoryviews still using ``buf`` does not
  raise BufferError: the mapping lives until the last of them is gone.
* A failed attach never unlinks (gh-153279); a failed create leaves nothing.
* ``unlink()`` on a handle whose block was already removed raises
  FileNotFoundError even when a newer block took the name: that one stays.
* Bad names raise ValueError before anything happens; blocks are created
  0600 whatever the umask; symlinks, FIFOs and directories are refused.
* One file descriptor per open block (the standard library holds two); none
  for a handle that attached with ``track=False``, on Python >= 3.13 (mmap's
  ``trackfd``: with no users lock to hold, the mapping needs no descriptor).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Type, TypeVar

from .._core.block import Block, checked_size

_S = TypeVar("_S", bound="SharedMemory")


class SharedMemory:
    """Creates a new shared memory block or attaches to an existing one.

    The standard library's class and signature (Python 3.13's, on every
    Python); ``with`` closes the handle, never unlinks the block.

    Args:
        name: The block's unique name. None with ``create=True`` picks a new
            one (``shmem_`` and 8 hex digits, or ``SHMEM_NAME_PREFIX``).
        create: True creates a new block, False attaches to an existing one.
        size: The number of bytes to create; ignored when attaching.
        track: Whether shmem removes the block once its creator and every
            process that has it open are gone (see the lifecycle contract).
            False: only ``unlink()`` removes it, and an untracked attach does
            not count the process as a user.

    Raises:
        FileExistsError: ``shmem.SegmentExists``: creating under a taken name.
        FileNotFoundError: ``shmem.SegmentNotFound``: attaching to a name no
            block has.
        ValueError: ``shmem.InvalidName`` for a bad name, ``shmem.InvalidSize``
            for a bad size, or ``name=None`` without ``create=True``.
        OSError: ``shmem.NoSpace`` (errno ENOSPC): /dev/shm cannot hold the
            block; nothing is left behind.
        PermissionError: ``shmem.UnsafeSegment`` when the name is a symlink,
            FIFO, directory or other special file; a plain PermissionError
            when the block's permissions refuse this user.
        shmem.CorruptSegment: A ``ValueError``: the block's shmem header is
            damaged.
    """

    # Class-level defaults: a half-built instance (its __init__ raised) can
    # still be closed and garbage-collected without AttributeError.
    _block: Optional[Block] = None
    _buf: Optional[memoryview] = None
    _track = True

    def __init__(self, name: Optional[str] = None, create: bool = False, size: int = 0, *, track: bool = True) -> None:
        # Everything is checked before anything is touched: bad input has no side effect.
        if create or size or type(size) is not int:  # (attaching with the default size: nothing to check)
            size = checked_size(size, create=create)
        if name is None and not create:
            raise ValueError("'name' can only be None if create=True")
        self._track = bool(track)
        if create:
            self._set(Block.create(name, size, track=self._track))
        else:
            # Untracked, the mapping needs no descriptor of its own (no users lock to hold).
            self._set(Block.attach(name, track=self._track, descriptor=self._track))  # type: ignore[arg-type]

    def _set(self, block: Block) -> None:
        assert block.mapping is not None
        self._block = block
        self._track = block.tracked
        self._buf = memoryview(block.mapping)

    # ------------------------------------------------------------ the API

    @property
    def buf(self) -> Optional[memoryview]:
        """A memoryview of the block's contents (None once closed)."""
        return self._buf

    @property
    def name(self) -> Optional[str]:
        """Unique name that identifies the shared memory block."""
        return None if self._block is None else self._block.name

    @property
    def size(self) -> int:
        """Size in bytes."""
        return 0 if self._block is None else self._block.size

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
                pass  # views exported from buf hold the mapping: it goes with the last of them
        if self._block is not None:
            self._block.release()

    def unlink(self) -> None:
        """Remove the block's name; call it once, from any one process.

        Processes that have the block mapped keep using it until they close.
        A second call raises FileNotFoundError, as in the standard library -
        also when a newer block was created under the same name meanwhile,
        which is left alone.

        Raises:
            FileNotFoundError: ``shmem.SegmentNotFound``: the block was
                already removed.
            ValueError: The handle was never created or attached.
        """
        if self._block is None:
            raise ValueError("this SharedMemory was never created or attached")
        self._block.unlink()

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


def wrap(block: Block) -> SharedMemory:
    """A ``SharedMemory`` handle on a block a kind created or attached (a
    ``ShareableList``'s ``shm``, say); closing it releases the block."""
    shm = SharedMemory.__new__(SharedMemory)
    shm._set(block)
    return shm


def block_of(shm: SharedMemory) -> Block:
    """The block under a ``SharedMemory`` handle."""
    if shm._block is None:
        raise ValueError("this SharedMemory was never created or attached")
    return shm._block


SharedMemory.__module__ = "shmem"
