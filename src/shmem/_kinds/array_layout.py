"""The array header: a SharedArray's dtype, shape and memory order, written into its block and read back.

``_array`` makes and attaches the arrays; this module writes and checks their
header. The two are the only shmem modules that import NumPy (this one only
through ``_array``, which first checks that NumPy is installed).

The array's header is the *kind header* (``extra``) of the block's trailer
(``_header``). All integers little-endian::

    off        len        field
      0          8        magic      b"\\x93SHMARR\\n"
      8          2        version    1
     10          1        order      b"C" or b"F" (memory order of the whole array)
     11          1        ndim       0 .. 64 (32 with NumPy 1.x)
     12          4        dtype_len  length of the dtype description below
     16          8        nbytes     product(shape) x itemsize: a cross-check of both
     24     8 x ndim      shape      int64 each, >= 0
     24+8*ndim  dtype_len dtype      ASCII JSON, one of:
                                       "<f8"                      a plain dtype: its .str (kinds b i u f c S U V M m)
                                       {"base": D, "shape": [..]} a subarray dtype
                                       {"names": [..], "formats": [D, ..], "offsets": [..],
                                        "titles": [..], "itemsize": n, "aligned": bool}
                                                                  a structured dtype

The header is hostile input: it was copied once by ``Header.read`` (which
checked its checksum); here every field is checked against that copy and the
block's real size before anything is mapped as an array - magic, version,
order, ndim, exact length, no negative dimension, nbytes == product(shape) x
itemsize <= the block's size (Python integers: no overflow). The dtype text is
parsed by ``json`` and rebuilt field by field (never ``eval`` or pickle);
object dtypes, and structured dtypes containing objects, are refused on
create and on attach: an object pointer read from shared memory crashes NumPy.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np

from .._errors import CorruptSegment, UnsupportedDtype
from .._core.header import EXTRA_MAX, KIND_ARRAY, KIND_NAMES
from . import raw
from .raw import SharedMemory

_MAGIC = b"\x93SHMARR\n"
_VERSION = 1
_FIXED = struct.Struct("<8sHcBIQ")  # magic, version, order, ndim, dtype_len, nbytes: 24 bytes
_DIM = struct.Struct("<q")
_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_MAX_DTYPE_DEPTH = 16  # nested structured / subarray dtypes: far beyond real use
_PLAIN_KINDS = "biufcSUVMm"  # fixed-size, pointer-free: bool, ints, floats, complex, bytes, str, void, datetime
# A plain dtype's .str: byte order, kind, item size, and a datetime unit such as [ns] or [25s].
_OBJECT_DTYPE = re.compile(r"[<>|=]?O")
_PLAIN_DTYPE = re.compile(r"[<>|=][biufcSUVMm][0-9]{1,10}(\[[0-9]{0,10}[A-Za-z]{1,10}\])?\Z")


# ===================================================================== dtypes


def _describe(dtype: np.dtype[Any], depth: int = 0) -> Any:
    """The JSON-able description of a dtype (grammar in the module docstring)."""
    if dtype.hasobject:
        raise UnsupportedDtype(
            f"dtype {dtype} holds Python objects, which cannot be shared: an object is a pointer "
            "into one process's memory (use fixed-size types: numbers, bytes 'S10', str 'U10', ...)"
        )
    if depth > _MAX_DTYPE_DEPTH:
        raise UnsupportedDtype(f"dtype nested more than {_MAX_DTYPE_DEPTH} levels deep")
    if dtype.names is not None:
        assert dtype.fields is not None
        fields = [dtype.fields[n] for n in dtype.names]
        titles = [f[2] if len(f) > 2 else None for f in fields]
        if any(t is not None and not isinstance(t, str) for t in titles):
            raise UnsupportedDtype(f"dtype {dtype}: field titles other than str cannot be stored")
        return {
            "names": list(dtype.names),
            "formats": [_describe(f[0], depth + 1) for f in fields],
            "offsets": [f[1] for f in fields],
            "titles": titles,
            "itemsize": dtype.itemsize,
            "aligned": bool(dtype.isalignedstruct),
        }
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": _describe(base, depth + 1), "shape": list(shape)}
    if dtype.kind not in _PLAIN_KINDS:
        raise UnsupportedDtype(f"dtype {dtype} is not a fixed-size dtype, so it cannot be shared")
    if dtype.itemsize == 0:
        raise UnsupportedDtype(f"dtype {dtype} has no size: give one, e.g. 'S10' or 'U10'")
    return dtype.str


class _Bad(Exception):
    """A header field that does not add up (turned into CorruptSegment naming the block)."""


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is not an int here
        raise _Bad(f"bad {what} {value!r}")
    return value


def _list(value: Any, what: str, length: Optional[int] = None) -> List[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        raise _Bad(f"bad {what}")
    return value


def _build(desc: Any, depth: int = 0) -> np.dtype[Any]:
    """The dtype a description stands for; _Bad for anything outside the grammar."""
    if depth > _MAX_DTYPE_DEPTH:
        raise _Bad("dtype nested too deep")
    if isinstance(desc, str):
        if _OBJECT_DTYPE.match(desc):
            raise _Bad(f"object dtype {desc!r}: objects are pointers into one process's memory")
        if not _PLAIN_DTYPE.match(desc):
            raise _Bad(f"unknown dtype {desc!r}")
        dtype = np.dtype(desc)
        if dtype.str != desc or dtype.kind not in _PLAIN_KINDS or dtype.itemsize == 0:
            raise _Bad(f"unknown dtype {desc!r}")
        return dtype
    if type(desc) is dict and set(desc) == {"base", "shape"}:
        shape = tuple(_int(n, "subarray dimension") for n in _list(desc["shape"], "subarray shape"))
        if not 1 <= len(shape) <= _MAX_DIMS:
            raise _Bad("bad subarray shape")
        return np.dtype((_build(desc["base"], depth + 1), shape))
    if type(desc) is dict and set(desc) == {"names", "formats", "offsets", "titles", "itemsize", "aligned"}:
        names = _list(desc["names"], "field names")
        count = len(names)
        formats = [_build(f, depth + 1) for f in _list(desc["formats"], "field formats", count)]
        offsets = [_int(o, "field offset") for o in _list(desc["offsets"], "field offsets", count)]
        titles = _list(desc["titles"], "field titles", count)
        itemsize = _int(desc["itemsize"], "itemsize")
        if not all(isinstance(n, str) for n in names) or not all(t is None or isinstance(t, str) for t in titles):
            raise _Bad("bad field names")
        if type(desc["aligned"]) is not bool:
            raise _Bad("bad aligned flag")
        for fmt, offset in zip(formats, offsets):
            if offset + fmt.itemsize > itemsize:  # a field reaching past its record would read past the block
                raise _Bad(f"a field at offset {offset} does not fit in records of {itemsize} bytes")
        spec = {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}
        if any(t is not None for t in titles):
            spec["titles"] = titles
        built: np.dtype[Any] = np.dtype(spec, align=desc["aligned"])  # type: ignore[call-overload]
        return built
    raise _Bad("unknown dtype description")


def _check_dtype(dtype: Any) -> Tuple[np.dtype[Any], bytes]:
    """``dtype`` as a NumPy dtype, with its description; UnsupportedDtype if it
    cannot be shared or would not come back the same from the header."""
    dtype = np.dtype(dtype)
    text = json.dumps(_describe(dtype), separators=(",", ":")).encode("ascii")
    try:
        same = _build(json.loads(text)) == dtype
    except (_Bad, ValueError, TypeError):
        same = False
    if not same:  # e.g. a user-defined dtype NumPy shows as plain void bytes
        raise UnsupportedDtype(f"dtype {dtype} cannot be described in an array header")
    return dtype, text


# ===================================================================== header


class _Meta(NamedTuple):
    dtype: np.dtype[Any]
    shape: Tuple[int, ...]
    order: str


def _pack(meta: _Meta, dtype_text: bytes) -> bytes:
    nbytes = _nbytes(meta.shape, meta.dtype)
    head = _FIXED.pack(_MAGIC, _VERSION, meta.order.encode(), len(meta.shape), len(dtype_text), nbytes)
    extra = head + b"".join(_DIM.pack(n) for n in meta.shape) + dtype_text
    if len(extra) > EXTRA_MAX:
        raise UnsupportedDtype(f"this dtype and shape need a {len(extra)}-byte header; at most {EXTRA_MAX} fit")
    return extra


def _unpack(extra: bytes, block_size: int) -> _Meta:
    """The array header ``extra`` (already copied out of shared memory), checked
    against the block's size; _Bad if anything does not add up."""
    if len(extra) < _FIXED.size or extra[:8] != _MAGIC:
        raise _Bad("not an array header (wrong magic)")
    _, version, order_b, ndim, dtype_len, nbytes = _FIXED.unpack_from(extra)
    if version != _VERSION:
        raise _Bad(f"array header version {version}, this shmem reads {_VERSION}; upgrade shmem everywhere")
    if order_b not in (b"C", b"F"):
        raise _Bad(f"bad memory order {order_b!r}")
    if ndim > _MAX_DIMS:
        raise _Bad(f"{ndim} dimensions (NumPy allows {_MAX_DIMS})")
    shape_end = _FIXED.size + _DIM.size * ndim
    if shape_end + dtype_len != len(extra):
        raise _Bad(f"array header of {len(extra)} bytes announces {shape_end + dtype_len}")
    shape = tuple(_DIM.unpack_from(extra, _FIXED.size + _DIM.size * i)[0] for i in range(ndim))
    if any(n < 0 for n in shape):
        raise _Bad(f"negative dimension in shape {shape}")
    try:
        desc = json.loads(extra[shape_end:].decode("ascii"))
        dtype = _build(desc)
    except (ValueError, TypeError, RecursionError, OverflowError) as err:  # json, NumPy refusing the dtype
        raise _Bad(f"unreadable dtype ({err})") from None
    if dtype.hasobject:  # not expressible in the grammar; checked anyway
        raise _Bad(f"object dtype {dtype}")
    if _nbytes(shape, dtype) != nbytes:
        raise _Bad(f"shape {shape} x itemsize {dtype.itemsize} is not the announced {nbytes} bytes")
    if nbytes > block_size:
        raise _Bad(f"shape {shape} x itemsize {dtype.itemsize} = {nbytes} bytes, larger than the block ({block_size})")
    return _Meta(dtype, shape, order_b.decode())


def _nbytes(shape: Tuple[int, ...], dtype: np.dtype[Any]) -> int:
    total = dtype.itemsize
    for n in shape:
        total *= n
    return total


def _corrupt(name: str, cause: str) -> CorruptSegment:
    return CorruptSegment(f"shared memory block {name!r}: {cause}")


def _meta_of(shm: SharedMemory, name: str) -> _Meta:
    header = raw.block_of(shm).header
    if header is None or header.kind != KIND_ARRAY:
        made_by = (
            "was not made by shmem" if header is None
            else f"is a {KIND_NAMES.get(header.kind, 'raw')} block made with shmem"
        )
        raise _corrupt(name, f"it has no array header: it {made_by}, not with shmem.zeros/empty/full/array; "
                             "attach it with shmem.SharedMemory instead")
    try:
        return _unpack(header.extra, shm.size)
    except _Bad as err:
        raise _corrupt(name, f"corrupt array header: {err}") from None


def describe(extra: bytes) -> str:
    """The listing's description of an array block's header ("float64 (1000, 3) C");
    CorruptSegment when it does not validate. Reads the fixed fields and the
    dtype's JSON without NumPy; every value is checked before it is used."""
    if len(extra) < _FIXED.size or extra[:8] != _MAGIC:
        raise CorruptSegment("not an array header (wrong magic)")
    _, version, order_b, ndim, dtype_len, _ = _FIXED.unpack_from(extra)
    if version != _VERSION or order_b not in (b"C", b"F") or ndim > _MAX_DIMS:
        raise CorruptSegment("unreadable array header (version, order or dimensions)")
    shape_end = _FIXED.size + _DIM.size * ndim
    if shape_end + dtype_len != len(extra):
        raise CorruptSegment("array header length does not add up")
    shape = tuple(_DIM.unpack_from(extra, _FIXED.size + _DIM.size * i)[0] for i in range(ndim))
    try:
        text = extra[shape_end:].decode("ascii")
        desc = json.loads(text) if len(text) < EXTRA_MAX and text.count("[") + text.count("{") <= 64 else None
    except ValueError:
        desc = None
    if isinstance(desc, str) and _PLAIN_DTYPE.match(desc):
        kind = desc
    elif isinstance(desc, dict) and "names" in desc:
        kind = "structured"
    elif isinstance(desc, dict) and "base" in desc:
        kind = "subarray"
    else:
        raise CorruptSegment("unreadable dtype in array header")
    return f"{kind} {shape} {order_b.decode('ascii')}"
