"""NumPy's side of the array header: dtypes into descriptions, checked descriptions back into dtypes.

``array_layout`` packs and checks the array header without NumPy, the dtype
description included (its grammar is drawn there). This module is the part
that needs NumPy, used by ``array`` only:

* creating: ``shareable(dtype)`` - the dtype and its description, refused
  (UnsupportedDtype) unless the description comes back as the same dtype;
* attaching: ``read_header(extra, size)`` - the header checked by
  ``array_layout.unpack``, its description made a NumPy dtype field by field
  (never ``eval`` or pickle), cross-checked against NumPy's own view of it.
"""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple, Tuple

import numpy as np

from .._errors import CorruptSegment, UnsupportedDtype
from . import array_layout as layout
from .array_layout import Description

#: The most dimensions this NumPy allows an array.
MAX_DIMS = min(layout.MAX_DIMS, 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32)


class ArrayMeta(NamedTuple):
    """What an array block's header says: its array's dtype, shape and memory order."""

    dtype: np.dtype[Any]
    shape: Tuple[int, ...]
    order: str  # "C" or "F"

    @property
    def nbytes(self) -> int:
        return layout.nbytes_of(self.shape, self.dtype.itemsize)


# ===================================================================== creating


def shareable(dtype: Any) -> Tuple[np.dtype[Any], bytes]:
    """``dtype`` as a NumPy dtype, with its description for the header.

    Raises UnsupportedDtype (a TypeError) for dtypes that cannot be shared
    (objects, no fixed size) or would not come back the same from the header.
    """
    dtype = np.dtype(dtype)
    text = json.dumps(description(dtype), separators=(",", ":")).encode("ascii")
    try:
        same = dtype_of(layout.parse_description(text)) == dtype
    except CorruptSegment:
        same = False
    if not same:  # e.g. a user-defined dtype NumPy shows as plain void bytes
        raise UnsupportedDtype(f"dtype {dtype} cannot be described in an array header")
    return dtype, text


def description(dtype: np.dtype[Any], depth: int = 0) -> Description:
    """The JSON-able description of ``dtype`` (grammar: ``array_layout``)."""
    if dtype.hasobject:
        raise UnsupportedDtype(
            f"dtype {dtype} holds Python objects, which cannot be shared: an object is a pointer "
            "into one process's memory (use fixed-size types: numbers, bytes 'S10', str 'U10', ...)"
        )
    if depth > layout.MAX_DTYPE_DEPTH:
        raise UnsupportedDtype(f"dtype nested more than {layout.MAX_DTYPE_DEPTH} levels deep")
    if dtype.names is not None:
        assert dtype.fields is not None
        fields = [dtype.fields[n] for n in dtype.names]
        titles = [f[2] if len(f) > 2 else None for f in fields]
        if any(t is not None and not isinstance(t, str) for t in titles):
            raise UnsupportedDtype(f"dtype {dtype}: field titles other than str cannot be stored")
        return {
            "names": list(dtype.names),
            "formats": [description(f[0], depth + 1) for f in fields],
            "offsets": [f[1] for f in fields],
            "titles": titles,
            "itemsize": dtype.itemsize,
            "aligned": bool(dtype.isalignedstruct),
        }
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": description(base, depth + 1), "shape": list(shape)}
    if dtype.kind not in layout.PLAIN_KINDS:
        raise UnsupportedDtype(f"dtype {dtype} is not a fixed-size dtype, so it cannot be shared")
    if dtype.itemsize == 0:
        raise UnsupportedDtype(f"dtype {dtype} has no size: give one, e.g. 'S10' or 'U10'")
    return dtype.str


# ===================================================================== attaching


@functools.lru_cache(maxsize=64)
def read_header(extra: bytes, block_size: int) -> ArrayMeta:
    """The array header ``extra`` (copied out of the block), checked against the
    block's size. CorruptSegment (without the block's name) when it does not add up.

    A function of its arguments alone (bytes and an int; the result is
    immutable): the last few headers read are remembered, so that a worker
    attaching many arrays of one dtype and shape decodes that header once.
    Refused headers are not remembered (an exception is never cached)."""
    header = layout.unpack(extra, block_size)
    dtype = _build(header.dtype)  # unpack checked the description
    if dtype.itemsize != header.itemsize:  # pragma: no cover - the grammar fixes each itemsize
        raise CorruptSegment(f"dtype {dtype} has {dtype.itemsize}-byte items, the header {header.itemsize}")
    ndim = len(header.shape) + len(dtype.shape)  # NumPy moves a subarray dtype's dimensions into the shape
    if ndim > MAX_DIMS:
        raise CorruptSegment(f"{ndim} dimensions with the dtype's own (NumPy {np.__version__} allows {MAX_DIMS})")
    return ArrayMeta(dtype, header.shape, header.order)


def dtype_of(desc: Any) -> np.dtype[Any]:
    """The NumPy dtype a dtype description stands for. The description is
    checked against the grammar first; CorruptSegment for anything outside it,
    and for anything NumPy would not make into that very dtype."""
    layout.check_description(desc)
    return _build(desc)


def _build(desc: Description) -> np.dtype[Any]:
    # ``desc`` passed layout.check_description: every value has its JSON type and range.
    if isinstance(desc, str):
        dtype = _numpy_dtype(desc, f"dtype {desc!r}")
        if dtype.str != desc or dtype.kind not in layout.PLAIN_KINDS or dtype.itemsize == 0:
            raise CorruptSegment(f"unknown dtype {desc!r}")
        return dtype
    if "base" in desc:
        return _numpy_dtype((_build(desc["base"]), tuple(desc["shape"])), "subarray dtype")
    spec = {
        "names": desc["names"],
        "formats": [_build(f) for f in desc["formats"]],
        "offsets": desc["offsets"],
        "itemsize": desc["itemsize"],
    }
    if any(t is not None for t in desc["titles"]):
        spec["titles"] = desc["titles"]
    built = _numpy_dtype(spec, "structured dtype", align=desc["aligned"])
    if built.hasobject:  # not expressible in the grammar; checked anyway
        raise CorruptSegment(f"object dtype {built}")
    return built


def _numpy_dtype(spec: Any, what: str, align: bool = False) -> np.dtype[Any]:
    try:
        built: np.dtype[Any] = np.dtype(spec, align=align)
    except (TypeError, ValueError, OverflowError) as err:  # e.g. '<i3', or fields that overlap their titles
        raise CorruptSegment(f"unknown dtype: NumPy refuses the {what} ({err})") from None
    return built
