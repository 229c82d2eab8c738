"""The kinds of block, each built on ``_core.block`` with a codec of its own.

=========  =======================  ========================================
kind       modules                  its own header (codec, drawn there)
=========  =======================  ========================================
raw        ``raw``                  none: ``SharedMemory``, the stdlib's class
list       ``list``                 ``list_layout``: the stdlib's layout + ours
array      ``array``,               ``array_layout`` (no NumPy): dtype, shape,
           ``array_dtype`` (NumPy),  order; ``array_dtype`` turns it into a
           ``array_mappings``       NumPy dtype; ``array_mappings`` caches maps
managed    ``manager``,             a header flag on any of the above
           ``manager_server``
=========  =======================  ========================================

``describe(header)`` is how the listing (``shmem ls``, ``list_segments``)
talks about a block: each kind's codec describes its own header, without
NumPy, and validates every field it reads.
"""

from __future__ import annotations

from .._core.header import KIND_ARRAY, KIND_LIST, Header


def describe(header: Header) -> str:
    """A short description of a typed block's own header ("" for raw blocks).

    Raises CorruptSegment (a ValueError) when the kind's header does not
    validate; nothing else, whatever the block holds.
    """
    if header.kind == KIND_LIST:
        from .list_layout import describe as describe_list

        return describe_list(header.extra)
    if header.kind == KIND_ARRAY:
        from .array_layout import describe as describe_array

        return describe_array(header.extra, header.size)
    return ""
