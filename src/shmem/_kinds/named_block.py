"""The life of a synchronisation primitive's block: created or attached by
name, race-free, and removed by the last handle to let go of it.

``Lock``/``RLock`` (``lock``) and ``Event``, ``Condition``, ``Semaphore``,
``Barrier`` (``sync_block``) share these rules:

* ``name=None`` makes a new block under a generated name (shared by passing
  the object, which pickles by name); a name creates the block or attaches
  to it, whoever comes first: create-exclusive, and on EEXIST attach - and if
  the block is removed between the two, create it again.
* The last handle to close (or process to exit) removes the block: the
  lifecycle rule's own test - nobody holds the users lock - applied at close,
  so a program that makes and drops many primitives leaves none of them in
  /dev/shm while it runs. (Without it a closed primitive would stay until its
  creator exits, like any tracked block.)
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple, TypeVar

from .. import _platform
from .._core.block import Block, Piece
from .._core.header import KIND_NAMES, Header
from .._core.lifecycle import USERS_LOCK
from .._errors import CorruptSegment, SegmentExists, SegmentNotFound

T = TypeVar("T")

# A named block removed between our failed create and our attach is created
# again; this many rounds of that race in a row means something else is wrong.
RACE_ROUNDS = 1000


def create_or_attach(
    name: Optional[str],
    create: bool,
    size: int,
    kind: int,
    extra: bytes,
    initial: Sequence[Piece],
    check: Callable[[Block], T],
) -> Tuple[Block, Optional[T]]:
    """The block ``name``: a new one (``name=None``), created if there is none
    and ``create``, else attached. An attached block is passed to ``check``
    (which raises if it is not what the caller wants; the block is released
    then) and its result returned beside it; a created one comes with None."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"a name must be a str or None, not {type(name).__name__}")
    for _ in range(RACE_ROUNDS):
        if name is None or create:
            try:
                return Block.create(name, size, kind=kind, extra=extra, initial=initial), None
            except SegmentExists:
                assert name is not None
        assert name is not None
        try:
            block = Block.attach(name)
        except SegmentNotFound:
            if create:
                continue  # removed after our create failed: create it ourselves
            raise
        try:
            checked = check(block)
        except BaseException:
            block.release()
            raise
        return block, checked
    raise SegmentNotFound(str(name), "the block kept vanishing between create and attach")


def header_of_kind(block: Block, kind: int, what: str) -> Header:
    """The header of ``block``, attached by a class that opens blocks of ``kind``
    only (``what`` names them: "a queue"); CorruptSegment naming what it holds
    instead, and how to find out which class made it."""
    header = block.header
    if header is None or header.kind != kind:
        found = "a block made without shmem" if header is None else f"a {KIND_NAMES[header.kind]} block"
        raise CorruptSegment(
            f"shared memory block {block.name!r} holds {found}, not {what}: "
            "open it with the class that made it (shmem.list_segments() says which kind it is)"
        )
    return header


def remove_if_unused(block: Block) -> None:
    """Remove ``block`` (a handle this process just released) if no handle
    anywhere has it open any more. An attacher that arrives meanwhile waits
    for our exclusive lock, then finds the name gone (and a named primitive is
    created afresh)."""
    try:
        opened = _platform.open_existing(block.name)  # writable: a write lock needs it
    except OSError:
        return  # removed already (or replaced by something we cannot open): not ours to judge
    try:
        if opened.inode == block.inode and _platform.try_lock_exclusive(opened.fd, USERS_LOCK):
            try:
                block.unlink()  # only while the name still leads to this block; the reaper forgets it
            except OSError:
                pass
    finally:
        os.close(opened.fd)
