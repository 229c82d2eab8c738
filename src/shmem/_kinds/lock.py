"""Lock and RLock: process-shared locks that the kernel releases when their holder dies.

API: ``threading.Lock`` / ``multiprocessing.Lock`` (and their ``RLock``) -
``acquire(block=True, timeout=None)`` (``blocking=`` too, as in threading),
``release()``, use as a context manager, ``locked()`` - plus:

* ``name=None`` (``Lock("jobs")`` or ``Lock(name="jobs")``): without it, a new lock under a generated name,
  shared with other processes by passing the object to them
  (``multiprocessing.Process``, ``Pool``, any pickle: it travels by name);
  with it, every program that asks for that name gets the same lock,
  whoever comes first (create-exclusive, else attach; race-free).
* Holder death: a lock whose holder dies holding it - SIGKILL, a crash, a
  thread that ends without releasing - goes to the next acquirer, whose
  ``acquire()`` returns True with ``owner_died`` set (until its release) and
  a ``shmem.OwnerDiedWarning``: repair what the lock protects first.
  ``multiprocessing.Lock`` stays locked forever instead.
* Lifetime: a lock is a tracked block (kind ``lock``): it exists while any
  process has it open, and nothing is left in /dev/shm once all are gone,
  SIGKILL included. ``close()`` lets go of this handle early.

What differs from ``multiprocessing.Lock``: only the thread that acquired a
lock can release it (``RuntimeError`` otherwise; a POSIX semaphore, which
``multiprocessing.Lock`` is, lets any process release it). A thread that
ends holding a lock releases it - as if it had died - and the next acquirer
sees ``owner_died``. ``acquire(timeout=-1)`` waits forever (threading's
convention); another negative timeout is a ValueError; a timeout given with
``block=False`` is ignored (multiprocessing's convention).

Underneath is a glibc robust, process-shared ``pthread_mutex_t``
(``lock_layout`` draws the block): C (``shmem._sync``) when built, the same
calls through ctypes otherwise. Blocking waits run in slices of at most 50 ms
on the monotonic clock, between which Ctrl-C and signal handlers run.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Type, TypeVar

from .._core.block import Block
from .._core.header import KIND_LOCK, KIND_NAMES
from .._errors import CorruptSegment
from . import named_block, sync_async
from .lock_layout import LOCK_SIZE, RobustMutex, check_lock, kind_header, new_mutex

_L = TypeVar("_L", bound="Lock")


def _open(name: Optional[str], recursive: bool, create: bool) -> Block:
    """The lock block ``name``: a new one (``name=None``), or created if there
    is none and ``create``, else attached and checked (``named_block``)."""
    pieces = [(0, new_mutex(recursive))] if name is None or create else []
    extra = kind_header(recursive)
    block, _ = named_block.create_or_attach(
        name, create, LOCK_SIZE, KIND_LOCK, extra, pieces, lambda attached: _check(attached, recursive)
    )
    return block


def _check(block: Block, recursive: bool) -> None:
    header = block.header
    wanted = "RLock" if recursive else "Lock"
    if header is not None and header.kind != KIND_LOCK:
        raise CorruptSegment(
            f"shared memory block {block.name!r} holds a {KIND_NAMES[header.kind]} block, not a shmem.{wanted}"
        )
    assert block.mapping is not None
    data = block.mapping[:LOCK_SIZE]  # a copy: a traceback must not keep the mapping alive
    check_lock(None if header is None else header.extra, data, block.size, block.name, recursive)


class Lock(RobustMutex):  # type: ignore[misc]
    """A lock between processes (and threads) that survives the death of its holder.

    ``threading.Lock``'s and ``multiprocessing.Lock``'s methods; see the
    module's documentation for what differs.

    Args:
        name: The lock's name: every process that asks for it gets the same
            lock (created by whichever comes first). None: a new lock, shared
            by passing the object to other processes.

    Raises:
        ValueError: ``shmem.InvalidName`` for a bad name;
            ``shmem.CorruptSegment`` when ``name`` is a block that is not
            this kind of lock, or whose lock header is damaged or made for
            another C library.
        OSError: ``shmem.NoSpace`` when /dev/shm is full.
    """

    _recursive = False
    _block: Optional[Block] = None  # class default: a half-built lock can still be shown and collected

    def __init__(self, name: Optional[str] = None) -> None:
        self._set(_open(name, self._recursive, create=True))

    @classmethod
    def _attach(cls: Type[_L], name: str) -> _L:
        """The existing lock ``name`` (SegmentNotFound if it is gone): how unpickling opens it."""
        lock = cls.__new__(cls)
        lock._set(_open(name, cls._recursive, create=False))
        return lock

    def _set(self, block: Block) -> None:
        try:
            self._bind(block.mapping, self._recursive)
        except BaseException:
            block.release()
            raise
        self._block = block

    @property
    def name(self) -> Optional[str]:
        """The lock's name (its block's), None once closed."""
        return None if self._block is None else self._block.name

    def close(self) -> None:
        """Let go of this handle (idempotent). The lock lives on while other
        handles, here or in other processes, have it open; the last one to
        close (or to exit, however) removes it.

        Raises RuntimeError if a thread of this process holds the lock
        through this handle: release it first (its memory must stay mapped
        while it is held).
        """
        if self._block is None:
            return
        if not self._unbind():
            raise RuntimeError(f"cannot close {self!r}: a thread of this process holds it; release it first")
        block, self._block = self._block, None
        block.release()
        named_block.remove_if_unused(block)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # held by a thread of ours: the mutex's mapping stays for the life of the process
        finalize = getattr(RobustMutex, "__del__", None)  # the pure-Python twin's
        if finalize is not None:
            finalize(self)

    async def __aenter__(self) -> None:
        """``async with lock``: acquire it waiting in the event loop (``shmem.aio``)."""
        await sync_async.poll(lambda: bool(self.acquire(False)), None, f"acquiring {self!r}")

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> Tuple[Any, ...]:
        # By name: the receiving process attaches to the same lock.
        if self._block is None:
            raise ValueError(f"cannot pickle a closed {type(self).__name__}")
        return (type(self)._attach, (self._block.name,))

    def __repr__(self) -> str:
        if self._block is None:
            return f"<shmem.{type(self).__name__} closed>"
        state = "locked" if self.locked() else "unlocked"
        died = ", owner_died" if self.owner_died else ""
        return f"<shmem.{type(self).__name__} {self._block.name!r} {state}{died}>"


class RLock(Lock):
    """A reentrant lock between processes that survives the death of its holder.

    ``threading.RLock``'s and ``multiprocessing.RLock``'s methods: the owner
    thread may acquire it again, and must release it as many times.
    ``owner_died`` stays True until this handle's last release. Arguments and
    errors as ``shmem.Lock``.
    """

    _recursive = True

    async def __aenter__(self) -> None:
        raise TypeError(
            "async with needs a shmem.Lock, not an RLock: an RLock belongs to a thread, "
            "and every coroutine of an event loop runs in the same one"
        )


Lock.__module__ = RLock.__module__ = "shmem"
