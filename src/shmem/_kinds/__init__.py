"""The kinds of block, each built on ``_core.block`` with a codec of its own.

=========  =================  ==============================================
kind       module             its own header (codec, drawn in the module)
=========  =================  ==============================================
raw        ``raw``            none: ``SharedMemory``, the standard library's
list       ``list``           ``list_layout``: the standard library's layout
array      ``array``          ``array_layout``: dtype, shape, order
managed    ``manager``        a header flag on any of the above
=========  =================  ==============================================

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

        return describe_array(header.extra)
    return ""
