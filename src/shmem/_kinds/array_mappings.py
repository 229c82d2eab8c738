"""This process's mappings of array blocks: one per block and access mode, shared by all its arrays.

``array`` makes SharedArrays; this module maps the blocks under them and
decides how long each mapping lives::

    SharedArray (or any view of one)
      .base ... -> SharedArray made on the block (attach, unpickle, create)
                     .base -> Use: a uint8 ndarray over the whole mapping, one per mapping and track
                                .lease:   a UsersLease (tracked, in a process that did not create
                                          the block), or None
                                .mapping: BlockMapping, one per block and access mode
                                            .block: the untracked Block whose mmap the arrays view
                                            .meta:  dtype, shape, order, from the checked header

Every array on a block ends its ``.base`` chain in that block's ``Use``
(NumPy keeps a view's base alive, and never collapses the chain past an
array of another type), so the mapping lives as long as any array or view of
it, plain ndarray views included: nothing is ever unmapped under an array,
and no array method needs to do anything for it (no ``__array_finalize__``).
There is no ``close()``: dropping the last array of a block releases its
Use, and with a tracked Use its lease - the users lock that counts this
process as a user.

What a process holds for a block, however many arrays of it it has (a
thousand slices received are one of each, not a thousand): one mapping of
the data per access mode, and for ``track=True`` arrays the lease's one
descriptor, which holds the users lock and maps nothing. On Python < 3.13
the mapping also keeps a duplicate descriptor of its own (``mmap`` always
does there; 3.13 lets shmem ask it not to), so such a process holds two
descriptors. The data mapping and the lease are two because the mapping
stays cached after the arrays are gone (below), and a cached mapping must
not count as a user: a lock on the mapping's own descriptor would.

An attached mapping stays cached after its arrays are gone, for the
``WARM_BLOCKS`` most recently used blocks, so a worker that receives the same
array again finds its pages already mapped: the hand-off then costs no page
fault, whatever the size. A cached mapping never keeps a block from being
removed. It does keep the memory of a block whose name was removed until this
process next attaches or creates an array (every cached name is checked then)
or exits. Reusing a cached mapping first checks, in O(1), that the block is
still whole and unchanged (``Block.unchanged``: the same file, the same size,
the same header); if not, the block is attached afresh, with the errors a
process that never mapped it would get - never an array over a truncated file
(touching one is a SIGBUS).
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .._core import forks
from .._core.block import Block, UsersLease
from .._core.header import KIND_ARRAY, KIND_LIST, KIND_NAMES, Header, forget_parsed
from .._errors import CorruptSegment, SegmentNotFound
from . import array_dtype
from .array_dtype import ArrayMeta

#: Attached blocks whose mapping this process keeps after their arrays are gone.
WARM_BLOCKS = 4

REUSED = "the block this array was on is gone: the name now belongs to another block"


def corrupt(name: str, cause: str) -> CorruptSegment:
    """The error for block ``name`` whose array header (or handle) does not add up."""
    return CorruptSegment(f"shared memory block {name!r}: {cause}")


def use_of(arr: Any) -> Optional[Use]:
    """The Use of the block ``arr`` is on, or None if its memory is its own.

    Walks ``arr``'s ``.base`` chain to the block's Use. An array that owns its
    memory ends the walk: fancy indexing, copies and (with NumPy's writeback
    copies) even arrays whose base is on the block have memory of their own.
    """
    while isinstance(arr, np.ndarray):
        if type(arr) is Use:
            return arr
        if arr.flags.owndata:
            return None
        arr = arr.base
    return None


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
        self.uses: Dict[bool, weakref.ref[Use]] = {}

    def current(self) -> bool:
        """Whether the name still refers to this very block (one stat)."""
        return self.block.still_published()

    def reuse(self, track: bool) -> Optional[Use]:
        """The Use arrays of this block share (one per ``track``), made if needed -
        if the block is still whole and unchanged (O(1): ``Block.unchanged``),
        else None. A lease a new tracked Use needs is taken first, and the block
        checked through its descriptor."""
        ref = self.uses.get(track)
        use = ref() if ref is not None else None
        if use is not None or not track or (self.owned and self.block.tracked):
            if not self.block.unchanged():
                return None
            return use if use is not None else self._new_use(None, track)
        try:
            lease = UsersLease(self.name)
        except OSError:  # gone, or no longer a block: attaching afresh says which
            return None
        if not self.block.unchanged(lease):
            lease.release()
            return None
        return self._new_use(lease, track)

    def _new_use(self, lease: Optional[UsersLease], track: bool) -> Use:
        use: Use = np.ndarray.__new__(Use, (self.size,), np.uint8, buffer=self.buf)
        use.mapping, use.lease, use.track = self, lease, track
        self.uses[track] = weakref.ref(use)
        return use


class Use(np.ndarray[Any, np.dtype[Any]]):
    """What every array of a block has at the end of its ``.base`` chain: a
    uint8 array over the whole mapping (NumPy takes the memory of the arrays
    made on the block from it), holding the mapping and, for ``track=True``
    in a process that did not create the block, the lease that counts this
    process as a user. It goes - and the lease with it - with the last array."""

    __slots__ = ("lease", "mapping", "track")
    mapping: BlockMapping
    lease: Optional[UsersLease]  # its users lock goes with the last array
    track: bool

    def __reduce_ex__(self, protocol: Any) -> Any:  # reached as some array's .base: it is just bytes elsewhere
        return self.view(np.ndarray).__reduce_ex__(protocol)


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


def _sweep(but: Optional[Tuple[str, bool]] = None) -> None:
    """Drop cached mappings of blocks whose name was removed or reused (one stat
    each; ``but``, the one about to be checked more closely, is left out)."""
    for key, mapping in list(_warm.items()):
        if key != but and not mapping.current():
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
    benchmarks use this to start cold; it forgets the headers decoded too)."""
    with _lock:
        _warm.clear()
        _mapped.clear()
        array_dtype.read_header.cache_clear()
        forget_parsed()


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
        return mapping._new_use(None, track)  # the creator's handle holds the users lock (track=True)


def acquire(name: str, readonly: bool, track: bool, block_id: Optional[int] = None) -> Use:
    """A Use of block ``name`` in this process: this process's mapping when the
    name still refers to the block mapped there, whole and unchanged, else a
    new one. ``block_id``: the block a pickled handle refers to
    (SegmentNotFound if the name now leads to another). CorruptSegment if its
    array header does not add up."""
    key = (name, readonly)
    with _lock:
        _sweep(but=key)
        cached = _mapped.get(key)
        # Checked in O(1) (the same file, size and header): a truncated file or a
        # rewritten header is attached afresh below, and refused as a new process would.
        use = cached.reuse(track) if cached is not None else None
        if use is None:
            if cached is not None:
                _forget(key, cached)
            use = _attach(name, readonly, track, block_id)
            _mapped[key] = use.mapping
        elif block_id is not None and use.mapping.block_id != block_id:
            raise SegmentNotFound(name, REUSED)
        mapping = use.mapping
        if not mapping.owned:
            _warm[key] = mapping
            _warm.move_to_end(key)
            while len(_warm) > WARM_BLOCKS:
                _warm.popitem(last=False)
        return use


def _attach(name: str, readonly: bool, track: bool, block_id: Optional[int]) -> Use:
    # Tracked: take the lease first, so the block cannot be removed while we map it.
    # Two opens: a lock on the description the mapping is made from would last as long
    # as the mapping, and the mapping stays cached after the arrays (and the lease) are gone.
    lease = UsersLease(name) if track else None
    data: Optional[Block] = None
    try:
        data = Block.attach(name, track=False, readonly=readonly, descriptor=False)
        meta = _meta_of(data)
        if (block_id is not None and _block_id(data) != block_id) or (lease is not None and lease.inode != data.inode):
            raise SegmentNotFound(name, REUSED)
        mapping = BlockMapping(data, meta, owned=False, readonly=readonly)
    except BaseException:
        if data is not None:
            data.release()  # never unlink: the block is not ours
        if lease is not None:
            lease.release()
        raise
    return mapping._new_use(lease, track)


def _block_id(block: Block) -> Optional[int]:
    return None if block.header is None else block.header.block_id


def _meta_of(block: Block) -> ArrayMeta:
    """The array header of an attached block, checked against its size."""
    header = block.header
    if header is None or header.kind != KIND_ARRAY:
        raise corrupt(block.name, f"it has no array header: {_what_else(block.name, header)}")
    try:
        return array_dtype.read_header(header.extra, block.size)
    except CorruptSegment as err:
        raise corrupt(block.name, f"corrupt array header: {err}") from None


def _what_else(name: str, header: Optional[Header]) -> str:
    """What block ``name`` is instead of an array, and the call that opens it."""
    if header is None:
        return (
            "it was not made by shmem (the standard library or another program made it, "
            f"with no shmem header); open it with shmem.SharedMemory({name!r})"
        )
    if header.kind == KIND_LIST:
        return f"it is a list block made with shmem; open it with shmem.ShareableList(name={name!r})"
    kind = KIND_NAMES.get(header.kind, "raw")
    return f"it is a {kind} block made with shmem.SharedMemory; open it with shmem.SharedMemory({name!r})"
