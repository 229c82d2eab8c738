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
NumPy, and validates every field it reads. ``described(header)`` gives the
same text and, beside it, the header's fields one by one (``shmem ls --json``):

=========  ==============================================================
kind       fields
=========  ==============================================================
raw        none
list       ``length``: the number of items
array      ``dtype`` (NumPy's type string of an element, ``"<f8"``;
           ``"|V<itemsize>"`` for a structured dtype), ``shape``,
           ``order`` (``"C"`` or ``"F"``), ``ndim``, ``itemsize``,
           ``nbytes``, ``fields`` (a structured dtype's field names,
           else None) - the array as ``attach_array`` returns it
lock       ``type``: ``"Lock"`` or ``"RLock"`` (``_segments`` adds the holder,
           read from the block's data, not its header)
event      ``type``: ``"Event"``
condition  ``type``: ``"Condition"``
semaphore  ``type``: ``"Semaphore"`` or ``"BoundedSemaphore"``; ``value``:
           its initial value (a BoundedSemaphore's bound)
barrier    ``type``: ``"Barrier"``; ``parties``
queue      ``type``: ``"Queue"`` or ``"JoinableQueue"``; ``capacity`` (the
           ring's bytes); ``maxsize`` (items, 0: no limit) - ``_segments``
           adds the fill level, read from the block's data
broadcast  ``type``: ``"Broadcast"``; ``capacity`` (the ring's bytes) -
           ``_segments`` adds ``published``, ``held``, ``used_bytes``
object     ``pickle_bytes``, ``buffers`` (how many out-of-band buffers),
           ``buffer_bytes`` (their bytes) - ``shmem.put``'s
=========  ==============================================================
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

from .._core.header import (
    KIND_ARRAY,
    KIND_BARRIER,
    KIND_BROADCAST,
    KIND_CONDITION,
    KIND_EVENT,
    KIND_LIST,
    KIND_LOCK,
    KIND_OBJECT,
    KIND_QUEUE,
    KIND_SEMAPHORE,
    KIND_STORE,
    Header,
)

#: (field, value) pairs, in a fixed order per kind; every value is a str, an int,
#: None or a tuple of those, so a record holding them stays hashable.
Fields = Tuple[Tuple[str, Any], ...]


class Described(NamedTuple):
    """A typed block's own header, as the listing shows it."""

    text: str  # "7 items", "<f8 (1000, 3) C"; "" for raw blocks
    fields: Fields  # what the text says, field by field (see the table above)


def describe(header: Header) -> str:
    """A short description of a typed block's own header ("" for raw blocks).

    Raises CorruptSegment (a ValueError) when the kind's header does not
    validate; nothing else, whatever the block holds.
    """
    return described(header).text


def described(header: Header) -> Described:
    """``describe(header)`` and the fields it is made of.

    Raises CorruptSegment (a ValueError) when the kind's header does not
    validate; nothing else, whatever the block holds.
    """
    if header.kind == KIND_LIST:
        from .list_layout import describe as describe_list
        from .list_layout import length

        return Described(describe_list(header.extra), (("length", length(header.extra)),))  # both validate
    if header.kind == KIND_ARRAY:
        from .array_layout import check_description, unfold, unpack
        from .array_layout import describe as describe_array

        text = describe_array(header.extra, header.size)  # validates the header (CorruptSegment says so)
        array = unpack(header.extra, header.size)
        # As attach_array shows it: NumPy moves a subarray dtype's dimensions into the shape.
        element, shape = unfold(array.dtype, array.shape)
        itemsize = array.itemsize if element is array.dtype else check_description(element)
        if isinstance(element, str):
            dtype, names = element, None
        else:  # structured: NumPy's type string says only "so many bytes of void"
            dtype, names = f"|V{itemsize}", tuple(element["names"])
        fields: Fields = (
            ("dtype", dtype),
            ("shape", shape),
            ("order", array.order),
            ("ndim", len(shape)),
            ("itemsize", itemsize),
            ("nbytes", array.nbytes),
            ("fields", names),
        )
        return Described(text, fields)
    if header.kind == KIND_LOCK:
        from .lock_layout import describe as describe_lock

        text = describe_lock(header.extra)  # validates the header: "Lock", "RLock"
        return Described(text, (("type", text),))
    if header.kind in (KIND_EVENT, KIND_CONDITION, KIND_SEMAPHORE, KIND_BARRIER):
        from .sync_layout import TYPE_BARRIER, TYPE_BOUNDED, TYPE_KINDS, TYPE_NAMES, TYPE_SEMAPHORE, parse_kind_header
        from .sync_layout import describe as describe_sync

        text = describe_sync(header.extra)  # validates the header
        parsed = parse_kind_header(header.extra)
        if TYPE_KINDS[parsed.type] != header.kind:
            from .._errors import CorruptSegment

            raise CorruptSegment(f"a {TYPE_NAMES[parsed.type]} header in a block of another kind")
        sync_fields: Fields = (("type", TYPE_NAMES[parsed.type]),)
        if parsed.type in (TYPE_SEMAPHORE, TYPE_BOUNDED):
            sync_fields += (("value", parsed.value),)
        elif parsed.type == TYPE_BARRIER:
            sync_fields += (("parties", parsed.value),)
        return Described(text, sync_fields)
    if header.kind == KIND_QUEUE:
        from .queue_layout import describe as describe_queue
        from .queue_layout import parse_kind_header as parse_queue

        text = describe_queue(header.extra)  # validates the header
        q = parse_queue(header.extra, header.size)
        kind = "JoinableQueue" if q.joinable else "Queue"
        return Described(text, (("type", kind), ("capacity", q.capacity), ("maxsize", q.maxsize)))
    if header.kind == KIND_BROADCAST:
        from .broadcast_layout import describe as describe_broadcast
        from .broadcast_layout import parse_kind_header as parse_broadcast

        text = describe_broadcast(header.extra)  # validates the header
        bc = parse_broadcast(header.extra, header.size)
        return Described(text, (("type", "Broadcast"), ("capacity", bc.capacity)))
    if header.kind == KIND_OBJECT:
        from .object_layout import describe as describe_object
        from .object_layout import parse as parse_object

        text = describe_object(header.extra, header.size)  # validates the header
        layout = parse_object(header.extra, header.size)
        return Described(
            text,
            (
                ("pickle_bytes", layout.pickle_length),
                ("buffers", len(layout.buffers)),
                ("buffer_bytes", sum(length for _, length in layout.buffers)),
            ),
        )
    if header.kind == KIND_STORE:
        from .store_layout import describe as describe_store
        from .store_layout import parse as parse_store

        text = describe_store(header.extra, header.size)  # validates the header
        shape = parse_store(header.extra, header.size)
        return Described(text, (("capacity", shape.capacity), ("max_objects", shape.entries)))
    return Described("", ())
