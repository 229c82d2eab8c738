"""NumPy arrays by name: create, attach by name alone, hand to workers without copying.

``shmem.zeros / empty / full / array`` create a block holding one array and
return a :class:`SharedArray` (an ``ndarray`` subclass) on it; any process
attaches it with ``shmem.attach_array(name)``. Pickling a SharedArray, or a
slice or view of one, sends a handle of a few hundred bytes, never the data.
This module and ``_array_header`` (the array header's codec) are the only shmem
modules that import NumPy.

The block
---------
The data starts at offset 0 of the block (page-aligned, so aligned for any
dtype) and fills ``max(nbytes, 1)`` bytes: a block has at least one byte, so
a zero-size array still has a block and a name. The array's own header is the
*kind header* (``extra``) of the block's trailer (``_header``), which shmem
checksums and writes before the block's "ready" mark: an attacher sees no
block, or a block with its whole header, never a half-built array.
Its layout, and how it is checked before anything is mapped: ``_array_header``.

Handing arrays to other processes
---------------------------------
``SharedArray.__reduce_ex__`` pickles (name, block_id, byte offset of the
view's first element, shape, strides, dtype, readonly, track): negative
strides, non-contiguous views and field views round-trip. Unpickling attaches
by name, checks that the name still holds the same block (``block_id``: a
name reused by another block is FileNotFoundError, as is a removed one), and
counts as a user of the block while the arrays live (``track=True``); a
process that only attached never removes the block.

Lifetime of the mapping, and the mapping cache
----------------------------------------------
Every SharedArray, and every view or slice of one, references its block's
handle (``_use``, copied to views by ``__array_finalize__``) and the memory
(through ``.base``), so the mapping lives as long as any of them: nothing is
ever unmapped under an array. There is no ``close()``: dropping the last
array (and view) of a block releases it.

Within one process a block is mapped at most once per access mode: every
array attached or unpickled from it shares that mapping (a thousand slices
received are one mapping and one file descriptor, not a thousand). An
attached mapping stays cached after its arrays are gone, for the
``WARM_BLOCKS`` most recently used blocks, so a worker that receives the same
array again finds its pages already mapped: the hand-off then costs no page
fault, whatever the size. A cached mapping does not count as a user (it is
untracked; users hold a separate tracked handle while they have arrays), so
it never keeps a block from being removed. It does keep the memory of a block
whose name was removed until this process next attaches or creates an array
(every cached name is checked then) or exits.
"""

from __future__ import annotations

import collections
import operator
import os
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

try:
    import numpy as np
except ImportError as err:  # pragma: no cover - exercised without NumPy
    raise ImportError("shmem's NumPy arrays need NumPy: pip install 'shmem[numpy]'") from err

from .. import _platform
from .array_layout import _MAX_DIMS, _check_dtype, _corrupt, _Meta, _meta_of, _nbytes, _pack
from .._errors import SegmentNotFound, UnsupportedDtype
from .._core.header import KIND_ARRAY
from . import raw
from .._core.block import Block
from .raw import SharedMemory

__all__ = ["SharedArray", "UnsupportedDtype", "array", "attach_array", "empty", "full", "zeros"]

ShapeLike = Union[int, Sequence[int]]

#: Attached blocks whose mapping this process keeps after their arrays are gone.
WARM_BLOCKS = 4


# ===================================================================== mappings


class _Block:
    """This process's one mapping of a block, in one access mode. Every array
    on it refers to it through a _Use; the caches below refer to it too."""

    def __init__(self, shm: SharedMemory, meta: _Meta, inode: Optional[int], owned: bool, readonly: bool) -> None:
        assert raw.block_of(shm).header is not None and shm.buf is not None and shm.name is not None
        self.shm = shm
        self.name: str = shm.name
        self.block_id = raw.block_of(shm).header.block_id  # type: ignore[union-attr]
        self.size = shm.size
        self.meta = meta
        self.inode = inode  # None: unknown, never trusted for a cache hit
        self.owned = owned  # created by this process: shm is the creator's handle
        self.readonly = readonly
        # Built as the arrays are: NumPy makes the buffer's owner (the mmap) their .base.
        probe = np.ndarray((self.size,), np.uint8, buffer=shm.buf)
        self.address: int = probe.__array_interface__["data"][0]
        self.memory = _owner(probe)  # what every array on this mapping ends its .base chain with
        self.uses: Dict[bool, "weakref.ref[_Use]"] = {}

    def current(self) -> bool:
        """Whether the name still refers to this very block."""
        return self.inode is not None and _platform.still_published(self.name, self.inode)

    def use(self, track: bool) -> _Use:
        """The _Use arrays of this block share (one per ``track``), made if needed."""
        ref = self.uses.get(track)
        use = ref() if ref is not None else None
        if use is not None:
            return use
        lease = None
        if track and not (self.owned and self.shm._track):
            lease = _lease(self.name)
            if raw.block_of(lease).header is None or raw.block_of(lease).header.block_id != self.block_id:  # type: ignore[union-attr]
                lease.close()
                raise _Stale
        use = _Use(self, lease, track)
        self.uses[track] = weakref.ref(use)
        return use

    def root(self, use: _Use) -> SharedArray:
        dtype, shape, order = self.meta
        arr = np.ndarray.__new__(SharedArray, shape, dtype, buffer=self.shm.buf, order="F" if order == "F" else "C")
        arr._use = use
        return arr


class _Use:
    """What a SharedArray holds: its block and, for ``track=True`` in a process
    that did not create it, a tracked handle counting this process as a user."""

    __slots__ = ("block", "lease", "track", "__weakref__")

    def __init__(self, block: _Block, lease: Optional[SharedMemory], track: bool) -> None:
        self.block = block
        self.lease = lease  # released (closed by its __del__) with the last array
        self.track = track


class _Stale(Exception):
    """The cached block is no longer the one behind its name."""


def _lease(name: str) -> SharedMemory:
    # Read-only and never touched: only its users lock matters (the mapping costs no page).
    return raw.wrap(Block.attach(name, track=True, readonly=True))


_lock = threading.RLock()
_mapped: "weakref.WeakValueDictionary[Tuple[str, bool], _Block]" = weakref.WeakValueDictionary()
_warm: "collections.OrderedDict[Tuple[str, bool], _Block]" = collections.OrderedDict()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _forget(key: Tuple[str, bool], block: Optional[_Block] = None) -> None:
    if block is None or _warm.get(key) is block:
        _warm.pop(key, None)
    if block is None or _mapped.get(key) is block:
        _mapped.pop(key, None)


def _sweep() -> None:
    """Drop cached mappings of blocks whose name was removed or reused."""
    for key, block in list(_warm.items()):
        if not block.current():
            _forget(key, block)


def _forget_all() -> None:
    """Drop every cached mapping (tests; arrays still alive keep theirs)."""
    with _lock:
        _warm.clear()
        _mapped.clear()


def _attach_block(name: str, readonly: bool, track: bool, block_id: Optional[int]) -> Tuple[_Block, _Use]:
    # Tracked: take the lease first, so the block cannot be removed while we map it.
    lease = _lease(name) if track else None
    data: Optional[SharedMemory] = None
    try:
        data = raw.wrap(Block.attach(name, track=False, readonly=readonly))
        meta = _meta_of(data, name)
        found = raw.block_of(data).header.block_id  # type: ignore[union-attr]
        if (block_id is not None and found != block_id) or (
            lease is not None and (raw.block_of(lease).header is None or raw.block_of(lease).header.block_id != found)  # type: ignore[union-attr]
        ):
            raise SegmentNotFound(name, _REUSED)
        block = _Block(data, meta, raw.block_of(data).inode, owned=False, readonly=readonly)
    except BaseException:
        for shm in (data, lease):
            if shm is not None:
                shm.close()  # never unlink: the block is not ours
        raise
    use = _Use(block, lease, track)
    block.uses[track] = weakref.ref(use)
    return block, use


_REUSED = "the block this array was on is gone: the name now belongs to another block"


def _acquire(name: str, readonly: bool, track: bool, block_id: Optional[int] = None) -> _Use:
    """A _Use of block ``name`` in this process: this process's mapping when the
    name still refers to the block mapped there, else a new one."""
    key = (name, readonly)
    with _lock:
        _sweep()
        use: Optional[_Use] = None
        cached = _mapped.get(key)
        if cached is not None and cached.current():
            if block_id is not None and cached.block_id != block_id:
                raise SegmentNotFound(name, _REUSED)
            try:
                use = cached.use(track)
            except _Stale:  # replaced between the check and the lease
                pass
        if use is not None:
            block = use.block
        else:
            if cached is not None:
                _forget(key, cached)
            block, use = _attach_block(name, readonly, track, block_id)
            if block.inode is not None:
                _mapped[key] = block
        if not block.owned and block.inode is not None:
            _warm[key] = block
            _warm.move_to_end(key)
            while len(_warm) > WARM_BLOCKS:
                _warm.popitem(last=False)
        return use


# ===================================================================== the class


def _owner(arr: Any) -> Any:
    """The object at the end of an array's .base chain: what owns its memory."""
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def _plain(result: Any) -> Any:
    """``result`` with every SharedArray that is not on a block as a plain ndarray."""
    if type(result) is SharedArray and result._use is None:
        return result.view(np.ndarray)
    if type(result) in (tuple, list):
        return type(result)(_plain(r) for r in result)
    return result


class SharedArray(np.ndarray[Any, np.dtype[Any]]):
    """A NumPy array in a shared memory block: usable anywhere an ndarray is.

    Made by :func:`zeros`, :func:`empty`, :func:`full`, :func:`array` or
    :func:`attach_array`. Slices and views are SharedArrays on the same
    block; results of arithmetic, reductions, copies and every other new
    array are plain ndarrays (private memory). Should a NumPy path still
    return a SharedArray with memory of its own, it is not shared: its
    ``name`` is None and it pickles as data. Pickling a SharedArray sends a
    small handle, not the data: the receiving process attaches the same memory.

    The mapping lives as long as any array or view of it; there is no
    ``close()``. ``unlink()`` removes the block's name, as
    ``SharedMemory.unlink()`` does.
    """

    _use: Optional[_Use] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> SharedArray:
        raise TypeError("make a SharedArray with shmem.zeros, empty, full, array or attach_array")

    def __array_finalize__(self, obj: Any) -> None:
        # A view keeps its parent's block; an array with memory of its own (a copy, the
        # result of fancy indexing, even when NumPy returns it as a view of a temporary) has none.
        use = getattr(obj, "_use", None)
        self._use = use if use is not None and _owner(self) is use.block.memory else None

    @property
    def name(self) -> Optional[str]:
        """The block's name (None for an array that is not on a block)."""
        return self._use.block.name if self._use is not None else None

    def unlink(self) -> None:
        """Remove the block's name; call it once, from any one process.

        Arrays already mapped (here and elsewhere) keep working; attaching or
        unpickling it afterwards raises FileNotFoundError. A second call
        raises FileNotFoundError, as ``SharedMemory.unlink()`` does.
        """
        if self._use is None:
            raise ValueError("this array is not on a shared memory block (it is a copy)")
        block = self._use.block
        block.shm.unlink()
        with _lock:
            for readonly in (False, True):
                _forget((block.name, readonly))

    # ---- results that are not on the block are plain ndarrays

    def __array_ufunc__(self, ufunc: Any, method: Any, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(x.view(np.ndarray) if isinstance(x, SharedArray) else x for x in inputs)
        if isinstance(kwargs.get("where"), SharedArray):
            kwargs["where"] = kwargs["where"].view(np.ndarray)
        outputs = kwargs.get("out")
        if outputs:
            kwargs["out"] = tuple(x.view(np.ndarray) if isinstance(x, SharedArray) else x for x in outputs)
        results = super().__array_ufunc__(ufunc, method, *inputs, **kwargs)
        if results is NotImplemented or method == "at" or not outputs:
            return results
        # In place (a += 1, out=...): give back the caller's own output arrays.
        if ufunc.nout == 1:
            return outputs[0] if outputs[0] is not None else results
        return tuple(o if o is not None else r for o, r in zip(outputs, results))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _plain(super().__array_function__(func, types, args, kwargs))

    def __array_wrap__(self, obj: Any, context: Any = None, return_scalar: bool = False) -> Any:
        if isinstance(obj, SharedArray) and obj._use is not None:
            return obj
        if return_scalar and obj.ndim == 0:
            return obj[()]
        return obj.view(np.ndarray) if type(obj) is not np.ndarray else obj

    def __getitem__(self, key: Any) -> Any:
        return _plain(super().__getitem__(key))

    def copy(self, order: Any = "C") -> Any:
        return self.view(np.ndarray).copy(order)

    def __copy__(self) -> Any:
        return self.view(np.ndarray).copy()

    def __deepcopy__(self, memo: Any, /) -> Any:
        return self.view(np.ndarray).copy()

    def flatten(self, *args: Any, **kwargs: Any) -> Any:
        return self.view(np.ndarray).flatten(*args, **kwargs)

    # ---- pickling: a handle, not the data

    def __reduce_ex__(self, protocol: Any) -> Any:
        use = self._use
        if use is None:  # private memory: pickles as the plain ndarray it is
            return self.view(np.ndarray).__reduce_ex__(protocol)
        block = use.block
        offset = self.__array_interface__["data"][0] - block.address
        if self.size == 0:
            offset = 0  # nothing is read: any place in the block will do
        low, high = _extent(offset, self.shape, self.strides, self.itemsize)
        if not 0 <= low <= high <= block.size:  # pragma: no cover - a view always lies in its block
            raise ValueError(f"array is not inside its block {block.name!r}")
        readonly = block.readonly or not self.flags.writeable
        return (_rebuild, (block.name, block.block_id, offset, self.shape, self.strides, self.dtype, readonly, use.track))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


SharedArray.__module__ = "shmem"


def _returning_plain(name: str) -> Callable[..., Any]:
    method = getattr(np.ndarray, name)

    def wrapper(self: SharedArray, *args: Any, **kwargs: Any) -> Any:
        return _plain(method(self, *args, **kwargs))

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


# Methods that return a view when they can and new memory otherwise (ufuncs and
# NumPy functions are covered by __array_ufunc__ / __array_function__): a view
# stays a SharedArray, new memory is a plain ndarray.
for _name in ("astype", "reshape", "ravel", "dot", "take", "repeat", "compress",
              "argsort", "argmax", "argmin", "searchsorted"):
    setattr(SharedArray, _name, _returning_plain(_name))
del _name


def _extent(offset: int, shape: Tuple[int, ...], strides: Tuple[int, ...], itemsize: int) -> Tuple[int, int]:
    """First and one-past-last byte an array with this layout touches."""
    if 0 in shape:
        return offset, offset
    low = high = offset
    for n, s in zip(shape, strides):
        if s < 0:
            low += s * (n - 1)
        else:
            high += s * (n - 1)
    return low, high + itemsize


def _rebuild(
    name: str, block_id: int, offset: int, shape: Tuple[int, ...], strides: Tuple[int, ...],
    dtype: np.dtype[Any], readonly: bool, track: bool,
) -> SharedArray:
    """Unpickle a SharedArray: attach its block by name (or reuse this process's mapping)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise UnsupportedDtype(f"refusing to map objects ({dtype}) from shared memory block {name!r}")
    use = _acquire(name, readonly, track, block_id)
    block = use.block
    low, high = _extent(offset, tuple(shape), tuple(strides), dtype.itemsize)
    if not 0 <= low <= high <= block.size:
        raise _corrupt(name, f"the array handle reaches bytes {low}..{high}, outside the block ({block.size})")
    arr = np.ndarray.__new__(SharedArray, shape, dtype, buffer=block.shm.buf, offset=offset, strides=strides)
    arr._use = use
    return arr


# ===================================================================== the API


def _shape(shape: ShapeLike) -> Tuple[int, ...]:
    dims = (operator.index(shape),) if not isinstance(shape, Iterable) else tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    if len(dims) > _MAX_DIMS:
        raise ValueError(f"{len(dims)} dimensions; NumPy allows {_MAX_DIMS}")
    return dims


def create_array(shape: ShapeLike, dtype: Any, order: str, name: Optional[str], track: bool,
            fill: Optional[Callable[[_Meta, int], List[Tuple[int, Any]]]] = None, flags: int = 0) -> SharedArray:
    """A new block holding an array; ``fill(meta, nbytes)`` gives the (offset, buffer)
    pieces of its contents, written before the block's ready mark. ``flags`` go
    into the block's header (``_header.FLAG_MANAGED`` for a manager's arrays)."""
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    dims = _shape(shape)
    dt, text = _check_dtype(dtype)
    meta = _Meta(dt, dims, order if len(dims) > 1 else "C")
    extra = _pack(meta, text)
    nbytes = _nbytes(dims, dt)
    size = max(nbytes, 1)  # a block has at least one byte
    initial = fill(meta, nbytes) if fill is not None and nbytes else []
    shm = raw.wrap(Block.create(name, size, track=track, kind=KIND_ARRAY, extra=extra, initial=initial,
                                flags=flags))
    assert shm.name is not None
    try:
        block = _Block(shm, meta, raw.block_of(shm).inode, owned=True, readonly=False)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    with _lock:
        _sweep()
        if block.inode is not None:
            _mapped[(block.name, False)] = block
        use = block.use(track)
    return block.root(use)


# full() writes its value in pieces of this size: one buffer, repeated.
_FILL_CHUNK = 1 << 20


def _bytes_of(data: Any) -> Any:
    """A contiguous array's memory as a flat uint8 buffer, in memory order."""
    return data.reshape(-1, order="A").view(np.uint8)


def _fill_with(value: Any) -> Callable[[_Meta, int], List[Tuple[int, Any]]]:
    def pieces(meta: _Meta, nbytes: int) -> List[Tuple[int, Any]]:
        count = max(1, _FILL_CHUNK // meta.dtype.itemsize) if meta.dtype.itemsize else 1
        chunk = _bytes_of(np.full(count, value, dtype=meta.dtype))  # numpy.full's (unsafe) casting
        step = len(chunk)
        return [(offset, chunk[:min(step, nbytes - offset)]) for offset in range(0, nbytes, step)]
    return pieces


def _copy_of(source: Any) -> Callable[[_Meta, int], List[Tuple[int, Any]]]:
    def pieces(meta: _Meta, nbytes: int) -> List[Tuple[int, Any]]:
        data = np.asfortranarray(source) if meta.order == "F" else np.ascontiguousarray(source)
        return [(0, _bytes_of(data))]
    return pieces


def empty(shape: ShapeLike, dtype: Any = float, *, order: str = "C", name: Optional[str] = None,
          track: bool = True) -> SharedArray:
    """A new shared array of ``shape`` and ``dtype`` in a new block.

    Like ``numpy.empty``, but the memory is a new shared memory block, which
    the kernel hands out zeroed. ``name=None`` picks a new name; ``track``
    is ``SharedMemory``'s (True: removed once its creator and every process
    using it are gone). Raises FileExistsError if ``name`` is taken, and
    UnsupportedDtype (a TypeError) for object or other non-fixed-size dtypes.
    """
    return create_array(shape, dtype, order, name, track)


def zeros(shape: ShapeLike, dtype: Any = float, *, order: str = "C", name: Optional[str] = None,
          track: bool = True) -> SharedArray:
    """A new shared array of zeros (see :func:`empty`; a new block reads as zeros)."""
    return create_array(shape, dtype, order, name, track)


def full(shape: ShapeLike, fill_value: Any, dtype: Any = None, *, order: str = "C", name: Optional[str] = None,
         track: bool = True) -> SharedArray:
    """A new shared array filled with ``fill_value`` (see :func:`empty`; ``dtype``
    defaults to ``fill_value``'s, as in ``numpy.full``)."""
    return create_full(shape, fill_value, dtype, order, name, track)


def create_full(shape: ShapeLike, fill_value: Any, dtype: Any, order: str, name: Optional[str], track: bool,
          flags: int = 0) -> SharedArray:
    if dtype is None:
        fill_value = np.asarray(fill_value)
        dtype = fill_value.dtype
    # The contents go in before the block is marked ready: no attacher sees it half filled.
    return create_array(shape, dtype, order, name, track, _fill_with(fill_value), flags)


def array(obj: Any, dtype: Any = None, *, order: str = "K", name: Optional[str] = None,
          track: bool = True) -> SharedArray:
    """A new shared array holding a copy of ``obj`` (an array or anything
    ``numpy.asarray`` takes). ``order`` 'K'/'A' keeps a Fortran-ordered
    source's order, 'C'/'F' choose it; see :func:`empty` for the rest."""
    return create_copy(obj, dtype, order, name, track)


def create_copy(obj: Any, dtype: Any, order: str, name: Optional[str], track: bool, flags: int = 0) -> SharedArray:
    source = np.asarray(obj, dtype=dtype)
    if order in ("K", "A"):
        order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
    # The contents go in before the block is marked ready: no attacher sees it half filled.
    return create_array(source.shape, source.dtype, order, name, track, _copy_of(source), flags)


def attach_array(name: str, *, readonly: bool = False, track: bool = True) -> SharedArray:
    """The shared array in block ``name``, made by another process (or this one).

    dtype, shape and memory order come from the block's header. With
    ``readonly=True`` the block is mapped read-only: writes raise ValueError.
    ``track=True`` counts this process as a user while it has arrays of the
    block; attaching never removes the block. Raises FileNotFoundError if
    there is no such block, CorruptSegment (a ValueError) if its array header
    is damaged or missing (a block made with ``SharedMemory``).
    """
    use = _acquire(name, bool(readonly), bool(track))
    return use.block.root(use)
