"""The shmem exception hierarchy.

Every error shmem raises on purpose derives from :class:`ShmemError` *and* from
the built-in exception the standard library raises for the same mistake, so
code written against ``multiprocessing.shared_memory`` keeps catching what it
caught before (``except FileNotFoundError`` still works).

The ``OSError`` subclasses are built the standard way, ``(errno, strerror,
filename)``, so they print as ``[Errno 2] <cause>: '<name>'``, keep ``.errno``
and ``.filename``, and pickle across processes.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, Tuple


class ShmemError(Exception):
    """Root of every error shmem raises on purpose."""


class _NamedOSError(OSError):
    """Base of the OSError subclasses below: built from (name, cause), stored
    and pickled as the standard (errno, strerror, filename)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild, (type(self), self.filename, self.strerror))


def _rebuild(cls: type, name: str, cause: str) -> BaseException:
    return cls(name, cause)  # type: ignore[no-any-return]


class SegmentNotFound(ShmemError, FileNotFoundError, _NamedOSError):
    """No shared memory block has this name (any more)."""

    def __init__(self, name: str, cause: str = "no shared memory block with this name") -> None:
        super().__init__(_errno.ENOENT, cause, name)


class SegmentExists(ShmemError, FileExistsError, _NamedOSError):
    """A shared memory block with this name already exists."""

    def __init__(self, name: str, cause: str = "a shared memory block with this name already exists") -> None:
        super().__init__(_errno.EEXIST, cause, name)


class NoSpace(ShmemError, _NamedOSError):
    """The block does not fit in the shared memory file system (/dev/shm)."""

    def __init__(self, name: str, cause: str) -> None:
        super().__init__(_errno.ENOSPC, cause, name)


class UnsafeSegment(ShmemError, PermissionError, _NamedOSError):
    """The name refers to something that is not a plain shared memory block
    (a symlink, FIFO, directory...), so shmem refuses to open it."""

    def __init__(self, name: str, cause: str) -> None:
        super().__init__(_errno.EPERM, cause, name)


class SegmentInUse(ShmemError, PermissionError, _NamedOSError):
    """Refusing to remove a block that processes still have open."""

    def __init__(self, name: str, cause: str = "in use by another process") -> None:
        super().__init__(_errno.EBUSY, cause, name)


class InvalidName(ShmemError, ValueError):
    """The name cannot be a shared memory block's name."""


class InvalidSize(ShmemError, ValueError):
    """The requested size cannot be a shared memory block's size."""


class UnsupportedDtype(ShmemError, TypeError):
    """This dtype cannot live in shared memory: it holds Python objects, or
    is not fixed-size (its items point into one process's memory)."""


class CorruptSegment(ShmemError, ValueError):
    """A header read from shared memory is inconsistent: someone wrote garbage
    into it, or it was made by a program that is not shmem."""


class WriterStalled(ShmemError, TimeoutError, _NamedOSError):
    """A reader waited longer than it does for a write in progress: a writer
    started changing the item and has not finished - it is stopped, starved
    of CPU, or was killed mid-write. Nothing is known to be damaged: read
    again later; the next write of the item makes it whole again."""

    def __init__(self, name: str, cause: str) -> None:
        super().__init__(_errno.ETIMEDOUT, cause, name)


class MessagesLost(ShmemError, LookupError):
    """A subscriber fell further behind than the broadcast's ring holds: ``count``
    messages were dropped before it read them. Its position has moved on to the
    oldest message still there; the next ``get`` returns that one."""

    def __init__(self, count: int, continues_at: int = 0) -> None:
        super().__init__(
            f"{count} message{'s' if count != 1 else ''} lost: this subscriber fell behind by more than "
            "the broadcast's ring holds (make it with a larger capacity=, or read faster); "
            "the next get() continues with the oldest message still there"
        )
        self.count = count
        self.continues_at = continues_at

    def __reduce__(self) -> Tuple[Any, ...]:  # keeps count and continues_at across processes
        return (type(self), (self.count, self.continues_at))


class OwnerDiedWarning(RuntimeWarning):
    """Issued by an acquire of a ``shmem.Lock`` or ``shmem.RLock`` whose
    previous owner died holding it (SIGKILL, a crash, a thread that ended
    without releasing). The acquire still succeeds - the kernel handed the
    lock over - and the lock's ``owner_died`` is True until its next release:
    the state the lock protects may be half-updated; repair it first."""
