"""NumPy arrays by name: create, attach by name alone, hand to workers without copying.

``shmem.zeros / empty / full / array`` create a block holding one array and
return a :class:`SharedArray` (an ``ndarray`` subclass) on it; any process
attaches it with ``shmem.attach_array(name)``. Pickling a SharedArray, or a
slice or view of one, sends a handle of a few hundred bytes, never the data.
This module, ``array_mappings`` (this process's mappings of array blocks)
and ``array_dtype`` (dtypes into the array header and back) are the only
shmem modules that import NumPy; the header's codec itself, ``array_layout``,
does not, so that ``shmem ls`` describes arrays without it.

The block
---------
The data starts at offset 0 of the block (page-aligned, so aligned for any
dtype) and fills ``max(nbytes, 1)`` bytes: a block has at least one byte, so
a zero-size array still has a block and a name. The array's own header is the
*kind header* (``extra``) of the block's trailer (``_core.header``), written
with the contents before the block is published (``_core.block``): an
attacher sees no block, or a block with its whole header and contents, never
a half-built array. Its layout, and how it is checked before anything is
mapped: ``array_layout``.

Handing arrays to other processes
---------------------------------
``SharedArray.__reduce_ex__`` pickles (name, block_id, byte offset of the
view's first element, shape, strides, dtype, readonly, track): negative
strides, non-contiguous views and field views round-trip. Unpickling attaches
by name, checks that the name still holds the same block (``block_id``: a
name reused by another block is FileNotFoundError, as is a removed one), and
counts as a user of the block while the arrays live (``track=True``); a
process that only attached never removes the block.

Sizes
-----
Every shape is checked on Python ints before anything is made: one no array
can have (NumPy's limits: 64 dimensions, itemsize x non-zero dimensions within
a signed 64-bit size) is ValueError at once; one that does not fit in
/dev/shm is NoSpace, from the block's reservation, before any of its contents
exists. ``full`` writes one piece of at most 1 MiB of its value over and over
(``Block.create(repeat=...)``): the contents are never built whole in memory.

Lifetime of the mapping, the mapping cache, and what an array costs
-------------------------------------------------------------------
Every array and view keeps its block mapped - through its ``.base`` chain,
with no per-view bookkeeping; there is no ``close()``. Within one process a
block is mapped at most once per access mode, checked again in O(1) before
each reuse, and the last few attached blocks stay mapped for the next
hand-off: ``array_mappings``. No shmem code runs when an array is indexed,
sliced or computed with (``SharedArray``).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

try:
    import numpy as np
except ImportError as err:  # pragma: no cover - exercised without NumPy
    raise ImportError("shmem's NumPy arrays need NumPy: pip install numpy") from err

from .._core.block import Block, Repeat
from .._core.header import KIND_ARRAY
from .._errors import UnsupportedDtype
from . import array_dtype, array_layout, array_mappings
from .array_dtype import ArrayMeta
from .array_mappings import Use

__all__ = ["SharedArray", "UnsupportedDtype", "array", "attach_array", "empty", "full", "zeros"]

ShapeLike = Union[int, Sequence[int]]

# ===================================================================== the class

# NumPy's functions that call an argument's ``__array_wrap__`` from Python (``numpy.linalg``:
# ``wrap = getattr(a, "__array_wrap__", ...)``) get plain views of SharedArrays instead.
_CALL_WRAP = frozenset(
    f for f in vars(np.linalg).values() if callable(f) and getattr(f, "__module__", None) == "numpy.linalg"
)


def _plain(result: Any) -> Any:
    """``result`` as a plain ndarray when it is a SharedArray that is not on a block."""
    if type(result) is SharedArray and array_mappings.use_of(result) is None:
        return result.view(np.ndarray)
    return result


class SharedArray(np.ndarray[Any, np.dtype[Any]]):
    """A NumPy array in a shared memory block: usable anywhere an ndarray is.

    Made by ``shmem.zeros``, ``empty``, ``full``, ``array`` or
    ``attach_array``. Slices and views are SharedArrays on the same
    block; results of arithmetic, ufuncs, reductions, copies and NumPy
    functions are plain ndarrays (private memory). Fancy indexing
    (``x[[0, 2]]``, ``x[x > 0]``) and ndarray's own methods called past this
    class make a SharedArray with memory of its own: it is not shared, its
    ``name`` is None and it pickles as data. (NumPy gives an indexing result
    the type of the array indexed, and a Python ``__getitem__`` would cost
    every ``x[i]`` ten times what NumPy's does.) Pickling a SharedArray sends
    a small handle, not the data: the receiving process attaches the same memory.

    The mapping lives as long as any array or view of it (plain ndarray views
    included: every one has the block at the end of its ``.base`` chain);
    there is no ``close()``. ``unlink()`` removes the block's name, as
    ``SharedMemory.unlink()`` does.

    No Python code runs when an array is indexed, sliced, viewed, or given to
    a ufunc or a reduction (``x[i]``, ``x[a:b]``, ``x + 1``, ``x.sum()``,
    ``np.add(x, 1, out=x)``): that costs what NumPy's own subclass machinery
    costs (``benchmarks/bench_arrays.py`` measures it against a plain ndarray).
    ``__array_wrap__`` is None - NumPy's C code then wraps nothing and a
    ufunc's result is a plain ndarray, an ``out=`` array itself - so
    Python code that calls ``arr.__array_wrap__(...)`` itself cannot on a
    SharedArray; NumPy's own such code, ``numpy.linalg``, gets plain views
    from ``__array_function__``, the one hook here (NumPy functions, not
    methods or ufuncs, pass through it).
    """

    __slots__ = ()
    # Any callable here would cost every ufunc call a Python-level call and a context
    # tuple (+25 to 40% on 1,000 float64); None is NumPy's "nothing to wrap".
    __array_wrap__ = None  # type: ignore[assignment]
    # ndarray's own value; a plain class attribute is quicker for NumPy to read than ndarray's property.
    __array_priority__ = 0.0

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func in _CALL_WRAP:  # numpy.linalg calls __array_wrap__ itself
            args = tuple(a.view(np.ndarray) if isinstance(a, SharedArray) else a for a in args)
            kwargs = {k: v.view(np.ndarray) if isinstance(v, SharedArray) else v for k, v in kwargs.items()}
        return super().__array_function__(func, types, args, kwargs)

    def __new__(cls, *args: Any, **kwargs: Any) -> SharedArray:
        raise TypeError("make a SharedArray with shmem.zeros, empty, full, array or attach_array")

    @property
    def name(self) -> Optional[str]:
        """The block's name (None for an array that is not on a block)."""
        use = array_mappings.use_of(self)
        return use.mapping.name if use is not None else None

    def unlink(self) -> None:
        """Remove the block's name; call it once, from any one process.

        Arrays already mapped (here and elsewhere) keep working; attaching or
        unpickling it afterwards raises FileNotFoundError. A second call
        raises FileNotFoundError, as ``SharedMemory.unlink()`` does.
        """
        use = array_mappings.use_of(self)
        if use is None:
            raise ValueError("this array is not on a shared memory block (it is a copy)")
        use.mapping.block.unlink()
        array_mappings.forget(use.mapping.name)

    # ---- methods that make new memory, or a view when they can: new memory is a plain
    # ndarray, a view stays a SharedArray (ufuncs and reductions need nothing:
    # with no __array_wrap__, their results are plain)

    def copy(self, order: Any = "C") -> Any:
        return self.view(np.ndarray).copy(order)

    def __copy__(self) -> Any:
        return self.view(np.ndarray).copy()

    def __deepcopy__(self, memo: Any, /) -> Any:
        return self.view(np.ndarray).copy()

    def flatten(self, *args: Any, **kwargs: Any) -> Any:
        return self.view(np.ndarray).flatten(*args, **kwargs)

    def astype(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().astype(*args, **kwargs))

    def reshape(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().reshape(*args, **kwargs))

    def ravel(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().ravel(*args, **kwargs))

    def dot(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().dot(*args, **kwargs))

    def take(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().take(*args, **kwargs))

    def repeat(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().repeat(*args, **kwargs))

    def compress(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().compress(*args, **kwargs))

    def argsort(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().argsort(*args, **kwargs))

    def argmax(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().argmax(*args, **kwargs))

    def argmin(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().argmin(*args, **kwargs))

    def searchsorted(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().searchsorted(*args, **kwargs))

    def byteswap(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(super().byteswap(*args, **kwargs))

    # ---- pickling: a handle, not the data

    def __reduce_ex__(self, protocol: Any) -> Any:
        use = array_mappings.use_of(self)
        if use is None:  # private memory: pickles as the plain ndarray it is
            return self.view(np.ndarray).__reduce_ex__(protocol)
        mapping = use.mapping
        offset = self.__array_interface__["data"][0] - use.__array_interface__["data"][0]
        if self.size == 0:
            offset = 0  # nothing is read: any place in the block will do
        low, high = _extent(offset, self.shape, self.strides, self.itemsize)
        if not 0 <= low <= high <= mapping.size:  # pragma: no cover - a view always lies in its block
            raise ValueError(f"array is not inside its block {mapping.name!r}")
        readonly = mapping.readonly or not self.flags.writeable
        handle = (mapping.name, mapping.block_id, offset, self.shape, self.strides, self.dtype, readonly, use.track)
        return (_rebuild, handle)

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


SharedArray.__module__ = "shmem"


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
    name: str,
    block_id: int,
    offset: int,
    shape: Tuple[int, ...],
    strides: Tuple[int, ...],
    dtype: np.dtype[Any],
    readonly: bool,
    track: bool,
) -> SharedArray:
    """Unpickle a SharedArray: attach its block by name (or reuse this process's mapping)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise UnsupportedDtype(f"refusing to map objects ({dtype}) from shared memory block {name!r}")
    use = array_mappings.acquire(name, readonly, track, block_id)
    mapping = use.mapping
    low, high = _extent(offset, tuple(shape), tuple(strides), dtype.itemsize)
    if not 0 <= low <= high <= mapping.size:
        raise array_mappings.corrupt(
            name, f"the array handle reaches bytes {low}..{high}, outside the block ({mapping.size})"
        )
    try:
        arr: SharedArray = np.ndarray.__new__(SharedArray, shape, dtype, buffer=use, offset=offset, strides=strides)
    except (ValueError, TypeError) as err:  # e.g. a zero dimension beside huge ones: "array is too big"
        raise array_mappings.corrupt(name, f"NumPy refuses the array handle ({err})") from None
    return arr


def _root(use: Use) -> SharedArray:
    """The whole array of the block ``use`` is on."""
    mapping = use.mapping
    dtype, shape, order = mapping.meta
    try:
        arr: SharedArray = np.ndarray.__new__(SharedArray, shape, dtype, buffer=use, order="F" if order == "F" else "C")
    except (ValueError, TypeError) as err:  # pragma: no cover - the header's checks are NumPy's
        raise array_mappings.corrupt(mapping.name, f"NumPy refuses the array header ({err})") from None
    return arr


# ===================================================================== the API


def _shape(shape: ShapeLike) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints; never iterates further than a shape can reach."""
    if not isinstance(shape, Iterable):
        dims: Tuple[int, ...] = (operator.index(shape),)
    else:
        dims = tuple(operator.index(n) for n in itertools.islice(shape, array_dtype.MAX_DIMS + 1))
    if len(dims) > array_dtype.MAX_DIMS:
        raise ValueError(f"more than {array_dtype.MAX_DIMS} dimensions; NumPy allows {array_dtype.MAX_DIMS}")
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    return dims


def _check_size(dims: Tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """The bytes an array of ``dims`` and ``dtype`` needs. ValueError, as NumPy
    would raise it, for one no computer can hold: checked on Python ints before
    anything is made (a block of that size fails with NoSpace when it is made)."""
    full = dims + dtype.shape  # NumPy moves a subarray dtype's dimensions into the shape
    if len(full) > array_dtype.MAX_DIMS:
        raise ValueError(f"{len(full)} dimensions with the dtype's own; NumPy allows {array_dtype.MAX_DIMS}")
    if any(n > array_layout.MAX_BYTES for n in dims):
        raise ValueError(f"maximum allowed dimension exceeded: shape {dims}")
    if array_layout.numpy_bytes(full, dtype.base.itemsize) > array_layout.MAX_BYTES:
        # NumPy refuses this even when a zero dimension makes the array empty
        raise ValueError(f"array is too big: shape {dims} of {dtype} needs more than {array_layout.MAX_BYTES} bytes")
    return array_layout.nbytes_of(dims, dtype.itemsize)


#: What ``create_array`` writes into a new block before it is published: (offset,
#: buffer) pieces, or one pattern repeated over the whole array.
Fill = Callable[[ArrayMeta], Union[List[Tuple[int, Any]], Repeat]]


def create_array(
    shape: ShapeLike,
    dtype: Any,
    order: str,
    name: Optional[str],
    track: bool,
    fill: Optional[Fill] = None,
    flags: int = 0,
) -> SharedArray:
    """A new block holding an array; ``fill(meta)`` gives its contents (pieces, or
    a pattern repeated), written before the block is published. ``flags`` go into
    the block's header (``FLAG_MANAGED`` for a manager's arrays).

    Every argument is checked before anything is made: ValueError for a shape
    no array can have, NoSpace (an OSError) when /dev/shm cannot hold it -
    before any of its contents is made."""
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    dims = _shape(shape)
    dt, text = array_dtype.shareable(dtype)
    nbytes = _check_size(dims, dt)
    meta = ArrayMeta(dt, dims, order if len(dims) > 1 else "C")
    extra = array_layout.pack(meta.order, dims, text, dt.itemsize)
    contents = fill(meta) if fill is not None and nbytes else []
    block = Block.create(
        name,
        max(nbytes, 1),  # a block has at least one byte
        track=track,
        kind=KIND_ARRAY,
        extra=extra,
        initial=contents if isinstance(contents, list) else (),
        repeat=contents if isinstance(contents, Repeat) else None,
        flags=flags,
    )
    return _root(array_mappings.add_created(block, meta, track))


# full() writes its value in copies of at most this size: one buffer, repeated.
_FILL_CHUNK = 1 << 20


def _bytes_of(data: Any) -> Any:
    """A contiguous array's memory as a flat uint8 buffer, in memory order."""
    return data.reshape(-1, order="A").view(np.uint8)


def _fill_with(value: Any) -> Fill:
    def pattern(meta: ArrayMeta) -> Repeat:
        # Whole items, at most _FILL_CHUNK bytes of them (one if an item is larger):
        # the block is written one copy at a time, never built whole in memory.
        itemsize = meta.dtype.itemsize
        count = min(meta.nbytes // itemsize, max(1, _FILL_CHUNK // itemsize))
        return Repeat(_bytes_of(np.full(count, value, dtype=meta.dtype)), meta.nbytes)  # numpy.full's casting

    return pattern


def _copy_of(source: Any) -> Fill:
    def pieces(meta: ArrayMeta) -> List[Tuple[int, Any]]:
        data = np.asfortranarray(source) if meta.order == "F" else np.ascontiguousarray(source)
        return [(0, _bytes_of(data))]

    return pieces


def empty(
    shape: ShapeLike, dtype: Any = float, *, order: str = "C", name: Optional[str] = None, track: bool = True
) -> SharedArray:
    """A new shared array of ``shape`` and ``dtype`` in a new block.

    Like ``numpy.empty``, but the memory is a new shared memory block, which
    the kernel hands out zeroed.

    Args:
        shape: An int or a sequence of ints, as for NumPy.
        dtype: Any fixed-size NumPy dtype (numbers, datetimes, bytes/str,
            structured).
        order: 'C' (row-major) or 'F' (column-major) memory order.
        name: The block's name; None picks a new one.
        track: ``SharedMemory``'s: True removes the block once its creator
            and every process using it are gone; False leaves it until
            ``unlink()``.

    Raises:
        FileExistsError: ``shmem.SegmentExists``: ``name`` is taken.
        TypeError: ``shmem.UnsupportedDtype`` for object and other
            dtypes that are not fixed-size.
        ValueError: A shape no array can have, or ``shmem.InvalidName``;
            raised before anything is made.
        OSError: ``shmem.NoSpace`` (errno ENOSPC): /dev/shm cannot hold the
            array; nothing is left behind.
    """
    return create_array(shape, dtype, order, name, track)


def zeros(
    shape: ShapeLike, dtype: Any = float, *, order: str = "C", name: Optional[str] = None, track: bool = True
) -> SharedArray:
    """A new shared array of zeros: ``empty``'s arguments and errors (a new block reads as zeros)."""
    return create_array(shape, dtype, order, name, track)


def full(
    shape: ShapeLike,
    fill_value: Any,
    dtype: Any = None,
    *,
    order: str = "C",
    name: Optional[str] = None,
    track: bool = True,
) -> SharedArray:
    """A new shared array filled with ``fill_value``: ``empty``'s arguments and
    errors; ``dtype`` defaults to ``fill_value``'s, as in ``numpy.full``. The
    contents are written into the block directly, never built in private memory."""
    return create_full(shape, fill_value, dtype, order, name, track)


def create_full(
    shape: ShapeLike, fill_value: Any, dtype: Any, order: str, name: Optional[str], track: bool, flags: int = 0
) -> SharedArray:
    """``full`` with the block's header ``flags`` (``SharedMemoryManager.full``)."""
    if dtype is None:
        fill_value = np.asarray(fill_value)
        dtype = fill_value.dtype
    # The contents go in before the block is marked ready: no attacher sees it half filled.
    return create_array(shape, dtype, order, name, track, _fill_with(fill_value), flags)


def array(
    obj: Any, dtype: Any = None, *, order: str = "K", name: Optional[str] = None, track: bool = True
) -> SharedArray:
    """A new shared array holding a copy of ``obj`` (an array or anything
    ``numpy.asarray`` takes). ``order`` 'K'/'A' keeps a Fortran-ordered
    source's order, 'C'/'F' choose it; the other arguments and the errors are
    ``empty``'s."""
    return create_copy(obj, dtype, order, name, track)


def create_copy(obj: Any, dtype: Any, order: str, name: Optional[str], track: bool, flags: int = 0) -> SharedArray:
    """``array`` with the block's header ``flags`` (``SharedMemoryManager.array``)."""
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
    block; attaching never removes the block.

    Args:
        name: The block's name (``SharedArray.name`` in the creating process).
        readonly: Map the block read-only.
        track: Count this process as a user of the block while it has arrays
            of it (False: the cheapest attach).

    Raises:
        FileNotFoundError: ``shmem.SegmentNotFound``: there is no such block.
        ValueError: ``shmem.CorruptSegment`` when the block's array header is
            damaged or missing (a block made with ``SharedMemory``);
            ``shmem.InvalidName`` for a bad name.
        PermissionError: ``shmem.UnsafeSegment`` when the name is a symlink,
            FIFO or other special file.
    """
    return _root(array_mappings.acquire(name, bool(readonly), bool(track)))
