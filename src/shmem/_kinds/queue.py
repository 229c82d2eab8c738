"""Queues between processes through one shared memory block: ``shmem.Queue``,
``SimpleQueue`` and ``JoinableQueue``, drop-ins for ``multiprocessing``'s.

``multiprocessing.Queue`` pickles every message through a pipe, from a
feeder thread, and a process killed while using it can leave it corrupt or
deadlocked (its documentation warns so). A shmem queue is a ring of records
in one block (``queue_layout`` draws it), written and read in place under a
robust mutex (``queue_ring``; C in ``shmem._queue``):

* ``put`` encodes the object (small builtins in the plain encoding,
  ``queue_plain``; the rest pickled) and copies it into the ring; ``get``
  copies it out and decodes it - in the calling thread: no feeder thread, nothing
  buffered in the process, so a ``put`` that returned is in the queue.
* A process killed anywhere inside ``put`` or ``get`` costs nothing: its
  half-written record was never committed, its half-taken one is still there;
  the next process to take the mutex hears that its holder died and
  recounts the ring.
* A ``get`` on an empty queue watches it for ~20 us, then sleeps in the
  kernel (a futex) until a ``put`` wakes it: an idle consumer uses no CPU.

Lifetime: as for every shmem block. ``name=None`` makes a new block under a
generated name, shared by passing the queue (it pickles by name) to
``Process``/``Pool`` or through another queue, under spawn, fork and
forkserver; ``Queue(name="jobs")`` creates the queue or opens the one that
exists, so unrelated programs share it by name. The queue lives while any
process has a handle on it; the last to close (or to exit, however) removes
it, with whatever it still holds.

Trust: ``get`` unpickles what other processes put, as ``multiprocessing``
does. Only the user who made the block can open it (mode 0600): use a queue
between your own processes, never as a channel from other users.
"""

from __future__ import annotations

import pickle
import queue as _stdlib_queue
import threading
import time
from typing import Any, Iterable, List, Optional, Tuple

from .._core import forks
from .._core.block import Block
from .._core.header import KIND_QUEUE
from .._errors import CorruptSegment
from . import named_block, queue_layout, queue_ring, queue_watch, sync_wait
from .queue_layout import (
    BATCH_HEAD,
    BATCH_ITEMS,
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    MIN_CAPACITY,
    TAG_PICKLE,
    QueueHeader,
    record_size,
)

__all__ = ["JoinableQueue", "Queue", "SimpleQueue"]

Empty = _stdlib_queue.Empty
Full = _stdlib_queue.Full

_PROTOCOL = queue_ring.PROTOCOL
_dumps = pickle.dumps


_watch_lock = threading.Lock()  # one watcher per handle, whichever thread asks first


def _reset_watch_lock() -> None:
    global _watch_lock
    _watch_lock = threading.Lock()  # another thread may have held it at the fork


forks.reset_in_child(_reset_watch_lock)


def _capacity(capacity: Optional[int]) -> int:
    if capacity is None:
        return DEFAULT_CAPACITY
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int (bytes), not {type(capacity).__name__}")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be between {MIN_CAPACITY} and {MAX_CAPACITY} bytes, not {capacity}")
    return (capacity + 7) & ~7


def _maxsize(maxsize: Any) -> int:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
    if maxsize >= 1 << 62:
        raise ValueError(f"maxsize {maxsize} is too large")
    return max(0, maxsize)  # multiprocessing: 0 or less means no limit


class Queue:
    """A process-shared FIFO queue: ``multiprocessing.Queue``'s API, in shared memory.

    Args:
        maxsize: At most this many items (0 or less: limited only by the ring's bytes).
        name: Create the queue under this name, or open the one that exists
            (its maxsize and capacity win); None: a new queue, shared by passing it.
        capacity: The ring's size in bytes (default 1 MiB). A message larger than
            the ring raises ValueError.
        ctx: Accepted for ``multiprocessing.Queue(ctx=...)`` compatibility; unused.

    Raises:
        ValueError: a capacity out of range, or a name that holds another kind of block.
        FileExistsError, PermissionError: as for any block name.
    """

    _joinable = False
    _core: Any = None  # class defaults: a half-built queue can still be closed and shown
    _block: Optional[Block] = None
    _closed = True
    _watcher: Optional[queue_watch.Watcher] = None

    def __init__(
        self, maxsize: int = 0, *, name: Optional[str] = None, capacity: Optional[int] = None, ctx: Any = None
    ) -> None:
        size = _capacity(capacity)
        limit = _maxsize(maxsize)
        self._open(name, size, limit, create=True)

    def _open(self, name: Optional[str], capacity: int, maxsize: int, create: bool) -> None:
        joinable = self._joinable

        def check_attached(block: Block) -> QueueHeader:
            header = named_block.header_of_kind(block, KIND_QUEUE, "a queue")
            parsed = queue_layout.parse_kind_header(header.extra, block.size)
            assert block.mapping is not None
            queue_layout.check_mutex(block.mapping[: queue_layout.RING], block.name)
            if parsed.joinable != joinable:
                kind = "JoinableQueue" if parsed.joinable else "Queue"
                raise CorruptSegment(
                    f"shared memory block {block.name!r} is a shmem.{kind}, not a {type(self).__name__}"
                )
            return parsed

        block, parsed = named_block.create_or_attach(
            name,
            create,
            queue_layout.data_size(capacity),
            KIND_QUEUE,
            queue_layout.kind_header(capacity, maxsize, joinable),
            [(0, queue_layout.initial())],
            check_attached,
        )
        header = parsed if parsed is not None else QueueHeader(capacity, maxsize, joinable)
        try:
            self._core = queue_ring.new_core(block.mapping, header.capacity, header.maxsize, header.joinable)
        except BaseException:
            block.release()
            raise
        self._block, self._maxsize, self._capacity, self._closed = block, header.maxsize, header.capacity, False
        # The four hot calls, bound straight to the ring's (C: no Python frame per call). The
        # methods below say the same and are what a closed or half-built queue answers with.
        core = self._core
        vars(self).update(put=core.put_obj, get=core.get_obj, send_bytes=core.send_bytes, recv_bytes=core.recv_bytes)

    @classmethod
    def _attach(cls, name: str) -> Queue:
        q = cls.__new__(cls)
        q._open(name, DEFAULT_CAPACITY, 0, create=False)
        return q

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._block is None:
            raise ValueError(f"cannot pickle a closed shmem.{type(self).__name__}")
        return (type(self)._attach, (self._block.name,))

    # ------------------------------------------------------------ state

    @property
    def name(self) -> Optional[str]:
        """The block's name (open it elsewhere with ``shmem.Queue(name=...)``); None once closed."""
        return None if self._block is None else self._block.name

    @property
    def capacity(self) -> int:
        """The ring's size in bytes."""
        return self._capacity

    @property
    def maxsize(self) -> int:
        """The most items the queue holds (0: limited by the ring's bytes only)."""
        return self._maxsize

    def _ring(self, doing: str) -> Any:
        core = self._core
        if core is None or self._closed:
            raise ValueError(f"cannot {doing}: the shmem.{type(self).__name__} is closed")
        return core

    def qsize(self) -> int:
        """The number of items in the queue (a snapshot)."""
        return int(self._ring("qsize").qsize())

    def empty(self) -> bool:
        """Whether the queue holds no item (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items (a snapshot; False without a maxsize,
        though a put may still wait for the ring's bytes)."""
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    # ------------------------------------------------------------ put and get

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` (pickled) at the end of the queue, waiting for room if
        ``block`` (at most ``timeout`` seconds). Raises ``queue.Full`` when there
        is no room in time, ValueError when the pickle is larger than the ring."""
        self._ring("put").put_obj(obj, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the first item, waiting for one if ``block`` (at most
        ``timeout`` seconds). Raises ``queue.Empty`` when none came in time.
        An item sent with ``send_bytes`` comes back as ``bytes``."""
        return self._ring("get").get_obj(block, timeout)

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def put_many(self, objs: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """Put every object of ``objs``, in order (shmem's own; faster-fifo's name).

        Up to 64 objects at a time go into one record, their list encoded once
        (in the plain encoding when it holds small builtins only, else as one
        pickle) - several times cheaper than one each - and come out one by
        one to ``get``, or together to ``get_many``; each counts as an item for
        ``qsize``, ``maxsize`` and ``task_done``. Being encoded as one, a batch
        keeps the lists and dicts its objects share: one put twice in one call,
        or held by two of them, arrives as one object to a process that gets
        both (as ``pickle.loads(pickle.dumps(objs))`` would give it).

        Raises ``queue.Full`` if the time ran out first: the objects before the
        batch that found no room were put (a batch goes in whole or not at all).
        """
        core = self._ring("put")
        ns = queue_ring.wait_ns(block, timeout)
        end = time.monotonic_ns() + ns if ns > 0 else ns
        objs = list(objs)
        step = min(BATCH_ITEMS, self._maxsize) if self._maxsize else BATCH_ITEMS
        for start in range(0, len(objs), step):
            chunk = objs[start : start + step]
            left = ns if ns <= 0 else max(0, end - time.monotonic_ns())
            if len(chunk) == 1:
                done = core.put(_dumps(chunk[0], _PROTOCOL), TAG_PICKLE, left)
                if not done:
                    raise Full
                continue
            plain = queue_ring.plain_encode(chunk)  # small builtins: no pickle either way
            data = plain if plain is not None else _dumps(chunk, _PROTOCOL)
            if record_size(BATCH_HEAD + len(data)) <= self._capacity // 2:
                done = core.put_batch(data, len(chunk), left, plain is not None)
            else:  # large objects: a record each, so that no batch needs most of the ring
                done = core.put_many([_dumps(obj, _PROTOCOL) for obj in chunk], TAG_PICKLE, left) == len(chunk)
            if not done:
                raise Full

    def get_many(self, max_items: int = 1 << 30, block: bool = True, timeout: Optional[float] = None) -> List[Any]:
        """Remove and return up to ``max_items`` items at once: waits (if
        ``block``) for the first, then takes what is there. A message of 64 KiB
        or more comes alone (it is copied out with the ring's lock free), so
        the list may stop before one. Raises ``queue.Empty`` when none came in
        time."""
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        items: List[Any] = self._ring("get").get_objs(max_items, queue_ring.wait_ns(block, timeout))
        if not items:
            raise Empty
        return items

    def send_bytes(self, data: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put the bytes of ``data`` (any bytes-like object) as one message, not pickled."""
        self._ring("put").send_bytes(data, block, timeout)

    def recv_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        """Remove and return the first message as bytes (an item put with ``put``
        comes as its pickle). Raises ``queue.Empty`` when none came in time."""
        return self._ring("get").recv_bytes(block, timeout)  # type: ignore[no-any-return]

    def fileno(self) -> int:
        """A file descriptor that is readable while the queue holds an item
        (shmem's own), for ``selectors``, ``select`` or ``loop.add_reader``.

        Readable means an item may be there: another consumer may take it
        first, so read with ``get_nowait()`` and expect ``queue.Empty``. The
        first call starts a watcher thread for this handle, asleep in the
        kernel until the queue changes between empty and not; ``close()``
        ends it and closes the descriptor (``queue_watch`` says more).
        """
        core = self._ring("watch")
        assert self._block is not None
        # Signals blocked: a handler calling fileno() while this thread holds the lock would
        # wait for itself. (The watcher thread, started in here, keeps them blocked: the kernel
        # then hands process signals to threads that run Python's handlers.)
        mask = sync_wait.block_signals()
        try:
            with _watch_lock:
                watcher = self._watcher
                if watcher is None or not watcher.usable():
                    if watcher is not None:
                        watcher.stop()
                    watcher = self._watcher = queue_watch.Watcher(core, self._block.name)
                return watcher.fileno()
        finally:
            sync_wait.restore_signals(mask)

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        """This process will put and get no more through this handle (idempotent).
        The queue lives on while other handles have it open; the last one to
        close (or to exit) removes it."""
        self._closed = True
        core, block, watcher = self._core, self._block, self._watcher
        self._core = self._block = self._watcher = None
        if watcher is not None:
            watcher.stop()  # out of the queue's memory before the mapping may go
        for bound in ("put", "get", "send_bytes", "recv_bytes"):
            vars(self).pop(bound, None)  # the class's methods then say the queue is closed
        if core is not None:
            core.release()
        if block is not None:
            block.release()
            named_block.remove_if_unused(block)

    def join_thread(self) -> None:
        """multiprocessing's: wait for the feeder thread. A shmem queue has none:
        a ``put`` that returned is in the queue already. Does nothing."""

    def cancel_join_thread(self) -> None:
        """multiprocessing's: do not wait for the feeder thread at exit. Nothing
        to cancel: no data is ever buffered in the process."""

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._block is None:
            return f"<shmem.{type(self).__name__} closed>"
        try:
            size = f" qsize={self.qsize()}"
        except Exception:
            size = ""
        return f"<shmem.{type(self).__name__} {self._block.name!r} capacity={self._capacity}{size}>"


class JoinableQueue(Queue):
    """A Queue whose consumers call ``task_done()`` for every item they got,
    so that ``join()`` can wait until all have been processed."""

    _joinable = True

    def task_done(self) -> None:
        """Mark one item got from the queue as processed. ValueError if called more
        times than items were put."""
        self._ring("task_done").task_done()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every item put has been marked done (at most ``timeout``
        seconds: then False)."""
        return bool(self._ring("join").join(queue_ring.wait_ns(True, timeout)))


class SimpleQueue(Queue):
    """``multiprocessing.SimpleQueue``: ``put``, ``get``, ``empty``, ``close``; unbounded."""

    def __init__(self, *, name: Optional[str] = None, capacity: Optional[int] = None, ctx: Any = None) -> None:
        super().__init__(0, name=name, capacity=capacity)

    def put(self, obj: Any) -> None:  # type: ignore[override]
        """Put ``obj`` at the end of the queue (waiting for room in the ring)."""
        super().put(obj)

    def get(self) -> Any:  # type: ignore[override]
        """Remove and return the first item, waiting for one."""
        return super().get()

    def _open(self, name: Optional[str], capacity: int, maxsize: int, create: bool) -> None:
        super()._open(name, capacity, maxsize, create)
        vars(self).pop("put")  # SimpleQueue's put and get take no block or timeout, as multiprocessing's
        vars(self).pop("get")
