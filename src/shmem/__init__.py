"""shmem: shared memory between Python processes that keeps its promises.

A drop-in for ``multiprocessing.shared_memory``: ``from shmem import
SharedMemory`` (or ``from shmem import shared_memory``) and the same code runs,
without the standard library's lifecycle defects. This module only re-exports.
"""

from typing import TYPE_CHECKING

from . import shared_memory
from ._core.sweep import GcReport, RemovedBlock, gc
from ._errors import (
    CorruptSegment,
    InvalidName,
    InvalidSize,
    MessagesLost,
    NoSpace,
    OwnerDiedWarning,
    SegmentExists,
    SegmentInUse,
    SegmentNotFound,
    ShmemError,
    UnsafeSegment,
    UnsupportedDtype,
    WriterStalled,
)
from ._kinds.list import ShareableList
from ._kinds.raw import SharedMemory
from ._segments import Segment, inspect_segment, list_segments, remove_segment

# Imported on first use. NumPy is optional: without it, the first use of an
# array name raises an ImportError saying how to install it. The manager pulls
# in multiprocessing.managers, which a program that does not use it need not pay;
# locks, events, semaphores, conditions, barriers, queues and broadcasts, their C extension (or ctypes).
_LAZY = {
    "Barrier": "._kinds.barrier",
    "BoundedSemaphore": "._kinds.semaphore",
    "Broadcast": "._kinds.broadcast",
    "Condition": "._kinds.condition",
    "Event": "._kinds.event",
    "JoinableQueue": "._kinds.queue",
    "Lock": "._kinds.lock",
    "ObjectRef": "._kinds.objects",
    "ObjectStore": "._kinds.objects",
    "Queue": "._kinds.queue",
    "RLock": "._kinds.lock",
    "Semaphore": "._kinds.semaphore",
    "SharedMemoryManager": "._kinds.manager",
    "SharedArray": "._kinds.array",
    "SimpleQueue": "._kinds.queue",
    "StoreStats": "._kinds.objects",
    "Subscriber": "._kinds.broadcast",
    "array": "._kinds.array",
    "attach_array": "._kinds.array",
    "delete": "._kinds.objects",
    "empty": "._kinds.array",
    "fulfil": "._kinds.objects",
    "full": "._kinds.array",
    "get": "._kinds.objects",
    "put": "._kinds.objects",
    "wait": "._kinds.objects",
    "zeros": "._kinds.array",
}

if TYPE_CHECKING:
    from ._kinds.array import SharedArray, array, attach_array, empty, full, zeros
    from ._kinds.barrier import Barrier
    from ._kinds.broadcast import Broadcast, Subscriber
    from ._kinds.condition import Condition
    from ._kinds.event import Event
    from ._kinds.lock import Lock, RLock
    from ._kinds.manager import SharedMemoryManager
    from ._kinds.objects import ObjectRef, ObjectStore, StoreStats, delete, fulfil, get, put, wait
    from ._kinds.queue import JoinableQueue, Queue, SimpleQueue
    from ._kinds.semaphore import BoundedSemaphore, Semaphore


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmem' has no attribute {name!r}")
    import importlib

    loaded = importlib.import_module(module, __name__)
    try:
        value = getattr(loaded, name)
    except AttributeError:
        # The module is half-imported: this thread is importing it already, lower on its stack -
        # a signal handler that interrupted the first use of shmem.<name> uses it too.
        raise ImportError(
            f"shmem.{name} is being imported by this thread already: a signal handler that "
            f"interrupted its first use? Use shmem.{name} once before installing the handler"
        ) from None
    globals()[name] = value  # once: later lookups do not come back here
    return value


__version__ = "0.1.0"

__all__ = [
    "Barrier",
    "BoundedSemaphore",
    "Broadcast",
    "Condition",
    "CorruptSegment",
    "Event",
    "GcReport",
    "InvalidName",
    "InvalidSize",
    "JoinableQueue",
    "Lock",
    "MessagesLost",
    "NoSpace",
    "ObjectRef",
    "ObjectStore",
    "OwnerDiedWarning",
    "Queue",
    "RLock",
    "RemovedBlock",
    "Segment",
    "SegmentExists",
    "SegmentInUse",
    "SegmentNotFound",
    "Semaphore",
    "ShareableList",
    "SharedArray",
    "SharedMemory",
    "SharedMemoryManager",
    "ShmemError",
    "SimpleQueue",
    "StoreStats",
    "Subscriber",
    "UnsafeSegment",
    "UnsupportedDtype",
    "WriterStalled",
    "array",
    "attach_array",
    "delete",
    "empty",
    "fulfil",
    "full",
    "gc",
    "get",
    "inspect_segment",
    "list_segments",
    "put",
    "remove_segment",
    "shared_memory",
    "wait",
    "zeros",
]
