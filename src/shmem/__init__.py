"""shmem: shared memory between Python processes that keeps its promises.

A drop-in for ``multiprocessing.shared_memory``: ``from shmem import
SharedMemory`` (or ``from shmem import shared_memory``) and the same code runs,
without the standard library's lifecycle defects. This module only re-exports.
"""

from ._errors import (
    CorruptSegment,
    InvalidName,
    InvalidSize,
    NoSpace,
    SegmentExists,
    SegmentInUse,
    SegmentNotFound,
    ShmemError,
    UnsafeSegment,
)
from ._lifecycle import GcReport, RemovedBlock, gc
from ._list import ShareableList
from ._memory import SharedMemory
from ._segments import Segment, inspect_segment, list_segments, remove_segment
from . import shared_memory

__version__ = "0.1.0"

__all__ = [
    "CorruptSegment",
    "GcReport",
    "InvalidName",
    "InvalidSize",
    "NoSpace",
    "RemovedBlock",
    "Segment",
    "SegmentExists",
    "SegmentInUse",
    "SegmentNotFound",
    "ShareableList",
    "SharedMemory",
    "ShmemError",
    "UnsafeSegment",
    "gc",
    "inspect_segment",
    "list_segments",
    "remove_segment",
    "shared_memory",
]
