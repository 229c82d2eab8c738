"""This process's mappings of array blocks: one per block and access mode, shared by all its arrays.

``array`` makes SharedArrays; this module maps the blocks under them and
decides how long each mapping lives::

    SharedArray ._use --> Use (one per mapping and track)   .lease: a tracked Block, or None
                            \\--> BlockMapping (one per block and access mode)
                                     .block: the untracked Block whose mmap the arrays view
                                     .meta:  dtype, shape, order, from the checked header

Every SharedArray, and every view or slice of one, references its ``Use``
(copied to views by ``__array_finalize__``) and the memory (through
``.base``), so the mapping lives as long as any of them: nothing is ever
unmapped under an array. There is no ``close()``: dropping the last array (and
view) of a block releases it, and with a ``track=True`` Use its lease, the
users lock that counts this process as a user.

Within one process a block is mapped at most once per access mode: every
array attached or unpickled from it shares that mapping (a thousand slices
received are one mapping and one file descriptor, not a thousand). An
attached mapping stays cached after its arrays are gone, for the
``WARM_BLOCKS`` most recently used blocks, so a worker that receives the same
array again finds its pages already mapped: the hand-off then costs no page
fault, whatever the size. A cached mapping does not count as a user (it is
untracked; users hold a separate tracked lease while they have arrays), so
it never keeps a block from being removed. It does keep the memory of a block
whose name was removed until this process next attaches or creates an array
(every cached name is checked then) or exits.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .._core import forks
from .._core.block import Block
from .._core.header import KIND_ARRAY, KIND_NAMES
from .._errors import CorruptSegment, SegmentNotFound
from . import array_dtype
from .array_dtype import ArrayMeta

#: Attached blocks whose mapping this process keeps after their arrays are gone.
WARM_BLOCKS = 4

REUSED = "the block this array was on is gone: the name now belongs to another block"


def corrupt(name: str, cause: str) -> CorruptSegment:
    """The error for block ``name`` whose array header (or handle) does not add up."""
    return CorruptSegment(f"shared memory block {name!r}: {cause}")


def owner_of(arr: Any) -> Any:
    """The object at the end of an array's .base chain: what owns its memory."""
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base


class BlockMapping:
    """This process's one mapping of a block, in one access mode. Every array
    on it refers to it through a Use; the caches below refer to it too."""

    def __init__(self, block: Block, meta: ArrayMeta, *, owned: bool, readonly: bool) -> None:
        assert block.header is not None and block.mapping is not None
        self.block = block
        self.name = block.name
        self.block_id = block.header.block_id
        self.size = block.size
        self.meta = meta
        self.owned = owned  # created by this process: ``block`` is the creator's handle
        self.readonly = readonly
        self.buf = memoryview(block.mapping)
        # Built as the arrays are: NumPy makes the buffer's owner (the mmap) their .base.
        probe = np.ndarray((self.size,), np.uint8, buffer=self.buf)
        self.address: int = probe.__array_interface__["data"][0]
        self.memory = owner_of(probe)  # what every array on this mapping ends its .base chain with
        self.uses: Dict[bool, weakref.ref[Use]] = {}

    def current(self) -> bool:
        """Whether the name still refers to this very block."""
        return self.block.still_published()

    def use(self, track: bool) -> Use:
        """The Use arrays of this block share (one per ``track``), made if needed.
        _Stale if the name no longer leads to this block."""
        ref = self.uses.get(track)
        use = ref() if ref is not None else None
        if use is not None:
            return use
        lease = None
        if track and not (self.owned and self.block.tracked):
            lease = _lease(self.name)
            if _block_id(lease) != self.block_id:
                lease.release()
                raise _Stale
        use = Use(self, lease, track)
        self.uses[track] = weakref.ref(use)
        return use


class Use:
    """What a SharedArray holds: its mapping and, for ``track=True`` in a process
    that did not create the block, a tracked lease counting this process as a user."""

    __slots__ = ("__weakref__", "lease", "mapping", "track")

    def __init__(self, mapping: BlockMapping, lease: Optional[Block], track: bool) -> None:
        self.mapping = mapping
        self.lease = lease  # its users lock goes with the last array (with the Block and its mmap)
        self.track = track


class _Stale(Exception):
    """The cached block is no longer the one behind its name."""


def _lease(name: str) -> Block:
    # Read-only and never touched: only its users lock matters (the mapping costs no page).
    return Block.attach(name, track=True, readonly=True)


def _block_id(block: Block) -> Optional[int]:
    return None if block.header is None else block.header.block_id


# ===================================================================== the caches

_lock = threading.RLock()
_mapped: weakref.WeakValueDictionary[Tuple[str, bool], BlockMapping] = weakref.WeakValueDictionary()
_warm: collections.OrderedDict[Tuple[str, bool], BlockMapping] = collections.OrderedDict()


def _reset_lock() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork


forks.reset_in_child(_reset_lock)


def _forget(key: Tuple[str, bool], mapping: Optional[BlockMapping] = None) -> None:
    if mapping is None or _warm.get(key) is mapping:
        _warm.pop(key, None)
    if mapping is None or _mapped.get(key) is mapping:
        _mapped.pop(key, None)


def _sweep() -> None:
    """Drop cached mappings of blocks whose name was removed or reused."""
    for key, mapping in list(_warm.items()):
        if not mapping.current():
            _forget(key, mapping)


def forget(name: str) -> None:
    """Drop this process's mappings of block ``name`` from the caches (it was
    unlinked); arrays still on them keep them."""
    with _lock:
        for readonly in (False, True):
            _forget((name, readonly))


def drop_cached_mappings() -> None:
    """Forget every mapping this process keeps for reuse: the next attach or
    unpickle maps its block anew. Arrays still alive keep theirs (tests and
    benchmarks use this to start cold)."""
    with _lock:
        _warm.clear()
        _mapped.clear()


# ===================================================================== mapping blocks


def add_created(block: Block, meta: ArrayMeta, track: bool) -> Use:
    """The Use of a block this process just created (``block``, the creator's
    handle): its mapping becomes the one this process's arrays of it share."""
    try:
        mapping = BlockMapping(block, meta, owned=True, readonly=False)
    except BaseException:
        block.release()
        block.unlink()  # ours: we created it
        raise
    with _lock:
        _sweep()
        _mapped[(mapping.name, False)] = mapping
        return mapping.use(track)


def acquire(name: str, readonly: bool, track: bool, block_id: Optional[int] = None) -> Use:
    """A Use of block ``name`` in this process: this process's mapping when the
    name still refers to the block mapped there, else a new one. ``block_id``:
    the block a pickled handle refers to (SegmentNotFound if the name now
    leads to another). CorruptSegment if its array header does not add up."""
    key = (name, readonly)
    with _lock:
        _sweep()
        use: Optional[Use] = None
        cached = _mapped.get(key)
        if cached is not None and cached.current():
            if block_id is not None and cached.block_id != block_id:
                raise SegmentNotFound(name, REUSED)
            try:
                use = cached.use(track)
            except _Stale:  # replaced between the check and the lease
                pass
        if use is not None:
            mapping = use.mapping
        else:
            if cached is not None:
                _forget(key, cached)
            mapping, use = _attach(name, readonly, track, block_id)
            _mapped[key] = mapping
        if not mapping.owned:
            _warm[key] = mapping
            _warm.move_to_end(key)
            while len(_warm) > WARM_BLOCKS:
                _warm.popitem(last=False)
        return use


def _attach(name: str, readonly: bool, track: bool, block_id: Optional[int]) -> Tuple[BlockMapping, Use]:
    # Tracked: take the lease first, so the block cannot be removed while we map it.
    lease = _lease(name) if track else None
    data: Optional[Block] = None
    try:
        data = Block.attach(name, track=False, readonly=readonly)
        meta = _meta_of(data)
        found = _block_id(data)
        if (block_id is not None and found != block_id) or (lease is not None and _block_id(lease) != found):
            raise SegmentNotFound(name, REUSED)
        mapping = BlockMapping(data, meta, owned=False, readonly=readonly)
    except BaseException:
        for block in (data, lease):
            if block is not None:
                block.release()  # never unlink: the block is not ours
        raise
    use = Use(mapping, lease, track)
    mapping.uses[track] = weakref.ref(use)
    return mapping, use


def _meta_of(block: Block) -> ArrayMeta:
    """The array header of an attached block, checked against its size."""
    header = block.header
    if header is None or header.kind != KIND_ARRAY:
        made_by = (
            "was not made by shmem"
            if header is None
            else f"is a {KIND_NAMES.get(header.kind, 'raw')} block made with shmem"
        )
        raise corrupt(
            block.name,
            f"it has no array header: it {made_by}, not with shmem.zeros/empty/full/array; "
            "attach it with shmem.SharedMemory instead",
        )
    try:
        return array_dtype.read_header(header.extra, block.size)
    except CorruptSegment as err:
        raise corrupt(block.name, f"corrupt array header: {err}") from None
