"""What Event, Condition, Semaphore and Barrier share: their block's life.

The rules are ``shmem.Lock``'s (``lock``): ``name=None`` makes a new block
under a generated name, shared by passing the object (pickled by name); a
name creates the block or attaches to it, race-free, whoever comes first;
the last handle to close (or process to exit) removes it - ``named_block``
draws these rules, for both.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

from .._core.block import Block
from . import named_block
from .sync_layout import SLOTS, TYPE_KINDS, SyncHeader, check, data_size, initial, kind_header, words
from .sync_wait import Memory, Slots

_CHECKERS = threading.Lock()  # one Slots per handle, whichever thread makes it


def open_block(
    name: Optional[str], type_: int, value: int, create: bool, types: Dict[int, str]
) -> Tuple[Block, SyncHeader]:
    """The block ``name``: a new one (``name=None``), or created if there is none
    and ``create``, else attached and checked to be one of ``types`` (``named_block``)."""
    pieces = [(0, initial(type_, value))]

    def check_attached(block: Block) -> SyncHeader:
        assert block.mapping is not None
        return check(block.header, block.mapping[:64], block.size, block.name, types)

    block, parsed = named_block.create_or_attach(
        name, create, data_size(type_), TYPE_KINDS[type_], kind_header(type_, value), pieces, check_attached
    )
    return block, parsed if parsed is not None else SyncHeader(type_, 0, value)


class Primitive:
    """A primitive's handle: its block, its words, its internal mutex, its slot."""

    _TYPES: Dict[int, str] = {}
    _block: Optional[Block] = None  # class default: a half-built object can still be shown and collected
    _mem: Optional[Memory] = None
    _slots: Optional[Slots] = None

    def _set(self, block: Block, type_: int) -> None:
        try:
            self._mem = Memory(block.mapping, words(type_), f"the shmem.{type(self).__name__}")
        except BaseException:
            block.release()
            raise
        self._block, self._type = block, type_

    def _open(self, name: Optional[str], type_: int, value: int, create: bool) -> SyncHeader:
        block, parsed = open_block(name, type_, value, create, self._TYPES)
        self._set(block, parsed.type)
        return parsed

    @property
    def name(self) -> Optional[str]:
        """The block's name, None once closed."""
        return None if self._block is None else self._block.name

    def _memory(self) -> Memory:
        mem = self._mem
        if mem is None:
            raise ValueError(f"the shmem.{type(self).__name__} is closed")
        return mem

    def _enter(self) -> Memory:
        """Take the internal mutex (repairing after a holder that died in a state change)."""
        mem = self._memory()
        if mem.lock():
            self._repair(mem)
        return mem

    def _leave(self) -> None:
        self._memory().unlock()

    def _repair(self, mem: Memory) -> None:
        """Make the state whole after a process died in a state change (the mutex is held)."""

    def _checker(self) -> Slots:
        """This handle's slots (a descriptor that tests others' liveness; a slot once claimed)."""
        slots = self._slots
        if slots is None:
            with _CHECKERS:
                if self._block is None:
                    raise ValueError(f"the shmem.{type(self).__name__} is closed")
                if self._slots is None:
                    self._slots = Slots(self._block, SLOTS)
                slots = self._slots
        return slots

    def _slot(self, claimed: Callable[[int], None]) -> int:
        """This handle's process slot, claimed on first use (``claimed(i)`` clears a dead owner's leftovers)."""
        return self._checker().claim(self._enter, self._leave, claimed)

    def close(self) -> None:
        """Let go of this handle (idempotent). The primitive lives on while other
        handles, here or in other processes, have it open; the last one to
        close (or to exit, however) removes it."""
        block, mem, slots = self._block, self._mem, self._slots
        if block is None:
            return
        self._block = self._mem = self._slots = None
        if slots is not None:
            slots.close()
        block.release()
        if mem is not None:  # another thread inside a call keeps the mapping until it is out
            mem.release(then=lambda: named_block.remove_if_unused(block))
        else:
            named_block.remove_if_unused(block)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _state(self) -> str:
        return ""

    def __repr__(self) -> str:
        if self._block is None:
            return f"<shmem.{type(self).__name__} closed>"
        state = self._state()
        return f"<shmem.{type(self).__name__} {self._block.name!r}{' ' + state if state else ''}>"
