"""The engine of ``shmem.ObjectStore``: objects sharing one block, held by processes.

``store_layout`` draws the block. This module keeps its rules; ``objects``
(``ObjectStore``, ``ObjectRef``) builds the public API on ``Arena``, this
process's attachment to one store.

Who holds what. Each attached process claims a **slot**: an OFD lock on one
byte of the block's file (``sync_wait.SLOT_LOCK_BASE + i``) that the kernel
drops when the process dies, and a record of who it is (pid, start time). A
process sets its slot's bit of entry ``j`` while it holds object ``j`` -
through an ``ObjectRef``, or through the views a ``get`` returned - and the
entry counts its holders' bits. The last holder to let go frees the entry
and its heap units. A slot whose lock is free *and* whose process is gone
is dead: its bits are cleared as if it had let go (``_reap``). Both tests,
not one: ``os.closerange`` can drop a live process's lock, and a pid can be
reused; a dead slot whose pid was reused is only reaped once that process
is gone too.

Writing. ``put`` takes an entry and units under the mutex, held by the
writer alone, and copies the object in without the mutex. No other process
can reach the entry before ``put`` returns its reference (the id is random);
a writer killed while copying leaves an entry only it held: its slot is
reaped and the entry freed - no process ever reads half an object.
``fulfil`` writes the same way (state WRITING), then moves the object into
the promised entry under the mutex.

The mutex. Every table changes under the internal mutex, with signals
blocked (``sync_wait.Memory``), and never while user code runs (pickle runs
outside). A holder that died inside leaves tables that ``_repair`` rebuilds
from the entries and the slots' bitmaps, which are the truth.

Holding from anywhere. ``ObjectRef.__del__`` and the views' finalizers run
wherever the garbage collector or a ``del`` happens to be - inside this
module's critical sections too - and so does a signal handler that another
thread's catch of a signal runs in the main thread. Those changes of this
process's counts only queue a delta (``Arena.ops``); the queue is drained in
order under the mutex, at the end of the current critical section, or at
once when none is running in the thread. ``get`` of an object held here
takes no mutex at all: a held object's entry does not move, and its views'
hold is one more queued delta (+1, queued before the -1 of the reference it
was made through).

Fork. A child inherits its parent's references and views, but not its
slot's bits (the parent lets go of its own when it drops them). Before a
fork, the parent claims a slot for the child, gives it a copy of its bits,
and keeps the mutex across the fork so that nothing changes in between; the
child adopts that slot. A child made without the hooks (or when every slot
is taken) re-takes its holds on its first call, where the objects still
exist.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import struct
import threading
import weakref
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from .. import _platform
from .._core.block import Block
from .._core.header import KIND_STORE
from .._errors import CorruptSegment, NoSpace, SegmentNotFound
from . import named_block, object_layout
from . import store_layout as L
from .sync_wait import KIND_OFFSET as MUTEX_KIND_OFFSET
from .sync_wait import SLICE_NS, Deadline, Memory, lock_slot, mutex_kind, slot_locked, unlock_slot


class NotReady(SegmentNotFound):
    """(internal) a promised object that is not stored yet: ``get`` waits for it."""


_GONE = "the object was deleted, or every process holding a reference to it let go"
_tls = threading.local()  # .depth: critical sections of any store running in this thread


def inside() -> bool:
    """Whether this thread is inside a store's critical section (a finalizer or handler run there)."""
    return getattr(_tls, "depth", 0) > 0


class Arena:
    """This process's attachment to one store block: its mapping, its slot, its holds."""

    def __init__(self, block: Block, shape: L.StoreLayout) -> None:
        assert block.mapping is not None
        self.block, self.shape = block, shape
        self.name, self.inode = block.name, block.inode
        self.mapping: Any = block.mapping
        self.mem = Memory(block.mapping, 1, "the shmem.ObjectStore")
        self.view = memoryview(block.mapping)
        self.counters = self.view[L.COUNTERS : L.COUNTERS + 32].cast("Q")
        self.fd = -1
        self.slot = -1
        self.pid = os.getpid()
        self.counts: Dict[int, List[int]] = {}  # entry -> [object id, holds here]
        self.ops: Deque[Tuple[int, int, int]] = collections.deque()  # (entry, object id, +1/-1)
        self.handles = 0  # open ObjectStore handles in this process
        self.pins: Dict[int, Any] = {}  # weakrefs to the views' exporters
        self.freed = False  # an entry was freed in this critical section: wake waiting puts
        self.child: Optional[Tuple[int, int]] = None  # (fd, slot) prepared for a forked child
        self.closing = False  # being detached: no new object or hold may come in

    # ------------------------------------------------------------ critical sections

    def enter(self, last: bool = False) -> None:
        """Take the mutex (repairing after a holder that died); ``last``: detach's own call."""
        if self.closing and not last:
            raise ValueError("the shmem.ObjectStore is closed")
        # Counted from before the mutex is ours to after it is not: a handler run anywhere in
        # between (see "Holding from anywhere") only queues.
        _tls.depth = getattr(_tls, "depth", 0) + 1
        try:
            if self.mem.lock():
                self._repair()
        except BaseException:
            _tls.depth -= 1
            raise

    def leave(self) -> None:
        try:
            self._drain()
        finally:
            freed, self.freed = self.freed, False
            if freed:
                self.mem.bump()  # a put waiting for room looks again
            try:
                self.mem.unlock()
            finally:
                _tls.depth -= 1
            if freed:
                self.mem.wake()
        if self.ops and not inside():  # queued by a handler run as the mutex was let go
            self.enter()
            self.leave()

    def _drain(self) -> None:
        while self.ops:
            index, object_id, delta = self.ops.popleft()
            held = self.counts.get(index)
            if held is None or held[0] != object_id:
                continue
            held[1] += delta
            if held[1] <= 0:
                del self.counts[index]
                self._unhold(index, object_id)

    def release(self, index: int, object_id: int) -> None:
        """One hold on an entry is gone (a reference or a view; callable from __del__)."""
        self.ops.append((index, object_id, -1))
        if not inside() and self.pid == os.getpid():
            try:
                self.enter()
                self.leave()
            except Exception:
                pass  # closed, or the store is gone: the holds went with it

    # ------------------------------------------------------------ raw tables

    def _entry(self, index: int) -> L.Entry:
        at = self.shape.table + index * L.ENTRY.size
        try:
            return L.entry(self.shape, bytes(self.view[at : at + L.ENTRY.size]))
        except CorruptSegment as err:
            raise CorruptSegment(f"object store {self.name!r}: {err}") from None

    def _set_entry(self, index: int, *fields: int) -> None:
        L.ENTRY.pack_into(self.mapping, self.shape.table + index * L.ENTRY.size, *fields, 0)

    def _set_holders(self, index: int, holders: int) -> None:
        struct.pack_into("<I", self.mapping, self.shape.table + index * L.ENTRY.size + 36, holders)

    def _bit(self, slot: int, index: int) -> Tuple[int, int]:
        return self.shape.holds + slot * self.shape.bitmap + index // 8, 1 << (index % 8)

    def _taken(self, index: int) -> bool:
        return bool(self.mapping[self.shape.emap + index])

    def _free(self, index: int) -> None:
        """Free entry ``index`` and its units (under the mutex)."""
        try:
            found = self._entry(index)
        except CorruptSegment:
            found = None
        self.mapping[self.shape.emap + index] = 0
        self._set_entry(index, 0, 0, 0, 0, 0, 0)
        if found is not None and found.extent:
            first = self.shape.umap + found.offset // L.UNIT
            self.mapping[first : first + found.extent // L.UNIT] = bytes(found.extent // L.UNIT)
            self.counters[L.C_UNITS] = max(0, self.counters[L.C_UNITS] - found.extent // L.UNIT)
        self.counters[L.C_OBJECTS] = max(0, self.counters[L.C_OBJECTS] - 1)
        self.freed = True

    def _unhold(self, index: int, object_id: int) -> None:
        """Clear our bit of entry ``index`` (still that object), freeing it if no one else holds it."""
        if self.slot < 0 or not self._taken(index):
            return
        at, bit = self._bit(self.slot, index)
        if not self.mapping[at] & bit:
            return
        self.mapping[at] &= ~bit & 0xFF
        found = self._entry(index)
        if found.id != object_id:
            return
        if found.holders <= 1:
            self._free(index)
        else:
            self._set_holders(index, found.holders - 1)

    # ------------------------------------------------------------ slots

    def _slot_alive(self, i: int) -> bool:
        pid_state = L.SLOT.unpack_from(self.mapping, L.SLOT_TABLE + i * L.SLOT.size)
        used, pid, start, namespace = pid_state[:4]
        if not used:
            return False
        if i == self.slot:
            return True
        if slot_locked(self.fd, i):
            return True
        # The lock is gone; so is the process, unless os.closerange dropped its lock.
        return _platform.process_alive(_platform.ProcessIdentity(pid, start, namespace)) is True

    def _reap(self, i: int) -> None:
        """Slot ``i``'s process is gone: let go of everything it held, free the slot."""
        held = self._held_by(i)
        start = self.shape.holds + i * self.shape.bitmap
        self.mapping[start : start + self.shape.bitmap] = bytes(self.shape.bitmap)
        for index in held:
            if index >= self.shape.entries or not self._taken(index):
                continue
            try:
                found = self._entry(index)
            except CorruptSegment:
                self._free(index)
                continue
            if found.holders <= 1:
                self._free(index)
            else:
                self._set_holders(index, found.holders - 1)
        L.SLOT.pack_into(self.mapping, L.SLOT_TABLE + i * L.SLOT.size, 0, 0, 0, 0, 0)

    def _held_by(self, i: int) -> List[int]:
        """The entries whose bit is set in slot ``i``'s bitmap (read once, a snapshot)."""
        start = self.shape.holds + i * self.shape.bitmap
        bits = int.from_bytes(self.mapping[start : start + self.shape.bitmap], "little")
        found = []
        while bits:
            low = bits & -bits
            bits ^= low
            found.append(low.bit_length() - 1)
        return found

    def sweep(self) -> None:
        """Reap every dead slot (under the mutex)."""
        for i in range(self.shape.slots):
            if i != self.slot and struct.unpack_from("<I", self.mapping, L.SLOT_TABLE + i * L.SLOT.size)[0]:
                if not self._slot_alive(i):
                    self._reap(i)

    def _open_fd(self) -> int:
        opened = _platform.open_existing(self.name)
        if opened.inode != self.inode:
            os.close(opened.fd)
            raise SegmentNotFound(self.name, "the object store's block was removed and replaced")
        return opened.fd

    def _lock_free_slot(self, fd: int) -> int:
        """Take the OFD lock of a slot no live process has (reaping a dead one); -1 if none."""
        start = os.getpid() % self.shape.slots
        for k in range(self.shape.slots):
            i = (start + k) % self.shape.slots
            if i == self.slot or (self.child is not None and i == self.child[1]):
                continue
            if not lock_slot(fd, i):
                continue
            used, pid, began, namespace = L.SLOT.unpack_from(self.mapping, L.SLOT_TABLE + i * L.SLOT.size)[:4]
            if used and _platform.process_alive(_platform.ProcessIdentity(pid, began, namespace)) is True:
                # Alive without its lock (os.closerange): its holds must stand.
                unlock_slot(fd, i)
                continue
            if used:
                self._reap(i)
            me = _platform.current_process()
            L.SLOT.pack_into(
                self.mapping, L.SLOT_TABLE + i * L.SLOT.size, 1, me.pid, me.start_time, me.pid_namespace, 0
            )
            return i
        return -1

    def own_slot(self) -> None:
        """Make sure this process has a slot and its holds are set in it (under the mutex)."""
        if self.pid != os.getpid():
            self._forked_without_hooks()
        if self.slot >= 0 and _platform.still_open(self.fd, self.inode):
            return
        if self.slot >= 0:  # closed behind our back: never close the number, it may be another file now
            me = _platform.current_process()
            used, pid = struct.unpack_from("<II", self.mapping, L.SLOT_TABLE + self.slot * L.SLOT.size)
            if used and pid == me.pid:  # still ours (no one reaped it: we are alive): keep it, relock
                self.fd = self._open_fd()
                if not lock_slot(self.fd, self.slot):
                    raise OSError(errno.EAGAIN, "another process took this process's slot", self.name)
                return
            self.slot = -1
        if self.fd < 0 or not _platform.still_open(self.fd, self.inode):
            self.fd = self._open_fd()
        slot = self._lock_free_slot(self.fd)
        if slot < 0:
            self.sweep()
            slot = self._lock_free_slot(self.fd)
        if slot < 0:
            raise OSError(
                errno.EAGAIN, f"all {self.shape.slots} process slots of the object store are taken", self.name
            )
        self.slot = slot
        self._retake()

    def _retake(self) -> None:
        """Set our bit again for every object held here that still exists (a new slot)."""
        for index, (object_id, _) in list(self.counts.items()):
            if self._taken(index) and self._entry(index).id == object_id:
                at, bit = self._bit(self.slot, index)
                if not self.mapping[at] & bit:
                    self.mapping[at] |= bit
                    self._set_holders(index, self._entry(index).holders + 1)
            else:
                del self.counts[index]

    def _forked_without_hooks(self) -> None:
        """A child of a fork the hooks did not see: the slot (and descriptor) are the parent's."""
        self.pid = os.getpid()
        self.fd, self.slot = -1, -1

    # ------------------------------------------------------------ repair

    def _repair(self) -> None:
        """The mutex's holder died in a change: rebuild counts and maps from entries and bitmaps."""
        shape = self.shape
        self.mapping[shape.umap : shape.umap + shape.units] = bytes(shape.units)
        holders = [0] * shape.entries
        units = objects = 0
        for index in range(shape.entries):
            if not self._taken(index):
                continue
            try:
                found = self._entry(index)
                first = shape.umap + found.offset // L.UNIT
                count = found.extent // L.UNIT
                if found.id == 0 or self.mapping.find(b"\x01", first, first + count) >= 0:
                    raise CorruptSegment("overlapping")
            except CorruptSegment:
                self.mapping[shape.emap + index] = 0
                self._set_entry(index, 0, 0, 0, 0, 0, 0)
                continue
            self.mapping[first : first + count] = b"\x01" * count
            units += count
            objects += 1
        for i in range(shape.slots):
            for index in self._held_by(i):
                if self._taken(index):
                    holders[index] += 1
        self.counters[L.C_UNITS], self.counters[L.C_OBJECTS] = units, objects
        for index in range(shape.entries):
            if self._taken(index):
                if holders[index] == 0:
                    self._free(index)
                else:
                    self._set_holders(index, holders[index])

    # ------------------------------------------------------------ allocation

    def _allocate(self, count: int) -> Optional[Tuple[int, int]]:
        """An entry and ``count`` free units (marked taken), or None. First fit, from the
        start of the heap: memory freed is reused first, and its pages are mapped already
        (a fresh page costs about as much to map as to fill)."""
        shape = self.shape
        index = self.mapping.find(b"\x00", shape.emap, shape.emap + shape.entries)
        if index < 0:
            return None
        index -= shape.emap
        unit = self.mapping.find(b"\x00" * count, shape.umap, shape.umap + shape.units)
        if unit < 0:
            return None
        self.mapping[unit : unit + count] = b"\x01" * count
        unit -= shape.umap
        self.mapping[shape.emap + index] = 1
        self.counters[L.C_UNITS] += count
        self.counters[L.C_OBJECTS] += 1
        return index, unit * L.UNIT

    def _free_room(self) -> Tuple[int, int]:
        """(free units, free entries): what a put could find after waiting."""
        units = self.shape.units - self.counters[L.C_UNITS]
        return units, self.shape.entries - self.counters[L.C_OBJECTS]

    # ------------------------------------------------------------ the operations

    def put(
        self, data: bytes, raws: List[Any], timeout_ns: int, into: Optional[Tuple[int, int]] = None
    ) -> Tuple[int, int]:
        """Store a pickle and its buffers; (entry, object id), held by this process.
        ``into``: the (entry, object id) of a promised object to store it as instead."""
        planned = object_layout.plan(len(data), [raw.nbytes for raw in raws])
        header = object_layout.kind_header(planned)
        head = -(-(L.EXTENT_HEAD.size + len(header)) // L.UNIT) * L.UNIT
        size = head + planned.size
        count = -(-size // L.UNIT)
        if count > self.shape.units:
            raise ValueError(
                f"an object of {size} bytes does not fit in object store {self.name!r} "
                f"of {self.shape.capacity} bytes: make it with a larger capacity="
            )
        deadline = Deadline(timeout_ns)
        while True:
            self.enter()
            try:
                self.own_slot()
                found = self._allocate(count)
                if found is None:
                    self.sweep()
                    found = self._allocate(count)
                if found is not None:
                    index, offset = found
                    object_id = int.from_bytes(os.urandom(8), "little") | 1
                    at, bit = self._bit(self.slot, index)
                    self.mapping[at] |= bit
                    # Ready at once for a put: no other process can know the id before put
                    # returns, and a writer killed in the copy held the entry alone. A promise's
                    # object stays "being written" until it is moved into the promised entry.
                    state = L.STATE_WRITING if into is not None else L.STATE_READY
                    self._set_entry(index, object_id, offset, count * L.UNIT, size, state, 1)
                    self.counts[index] = [object_id, 1]
                    break
                seen = self.mem.words[0]
                units, entries = self._free_room()
            finally:
                self.leave()
            left = deadline.left()
            if left == 0:
                why = f"{units * L.UNIT} bytes free" if entries else f"all {self.shape.entries} entries taken"
                raise NoSpace(self.name, f"the object store is full ({why}; {size} bytes needed)")
            self.mem.wait(seen, SLICE_NS if left < 0 else min(left, SLICE_NS))
        try:
            base = self.shape.heap + offset
            self.view[base : base + L.EXTENT_HEAD.size] = L.EXTENT_HEAD.pack(len(header), 0)
            self.view[base + L.EXTENT_HEAD.size : base + L.EXTENT_HEAD.size + len(header)] = header
            base += head
            _platform.copy_into(self.mapping, base, data)
            for (at, _), raw in zip(planned.buffers, raws):
                _platform.copy_into(self.mapping, base + at, raw)  # large ones split across CPUs
            if into is not None:
                self.enter()
                try:
                    found_entry = self._entry(index)
                    if found_entry.id != object_id or found_entry.state != L.STATE_WRITING:
                        raise CorruptSegment(
                            f"object store {self.name!r}: an entry being written was changed by another process"
                        )
                    self._keep_promise(into, index, found_entry)
                    return into
                finally:
                    self.leave()
        except BaseException:
            self.release(index, object_id)
            raise
        return index, object_id

    def promise(self) -> Tuple[int, int]:
        """A promised object: an entry with no memory yet, held here; (entry, object id)."""
        self.enter()
        try:
            self.own_slot()
            found = self.mapping.find(b"\x00", self.shape.emap, self.shape.emap + self.shape.entries)
            if found < 0:
                raise NoSpace(self.name, f"the object store is full (all {self.shape.entries} entries taken)")
            index = found - self.shape.emap
            object_id = int.from_bytes(os.urandom(8), "little") | 1
            self.mapping[found] = 1
            self.counters[L.C_OBJECTS] += 1
            at, bit = self._bit(self.slot, index)
            self.mapping[at] |= bit
            self._set_entry(index, object_id, 0, 0, 0, L.STATE_PROMISED, 1)
            self.counts[index] = [object_id, 1]
            return index, object_id
        finally:
            self.leave()

    def _keep_promise(self, into: Tuple[int, int], index: int, written: L.Entry) -> None:
        """Move the object just written in entry ``index`` into the promised entry (under the
        mutex); the writing entry goes, its memory now the promised one's."""
        target, target_id = into
        promised = self._entry(target) if self._taken(target) else None
        if promised is None or promised.id != target_id:
            raise SegmentNotFound(self.name, _GONE)
        if promised.state != L.STATE_PROMISED:
            raise ValueError(f"object store {self.name!r}: not a promise waiting to be kept (stored already)")
        self._set_entry(
            target, target_id, written.offset, written.extent, written.size, L.STATE_READY, promised.holders
        )
        at, bit = self._bit(self.slot, index)
        self.mapping[at] &= ~bit & 0xFF
        self.mapping[self.shape.emap + index] = 0
        self._set_entry(index, 0, 0, 0, 0, 0, 0)
        self.counters[L.C_OBJECTS] -= 1
        self.counts.pop(index, None)
        self.mem.bump()
        self.freed = True  # wakes the waiters of shmem.wait (and puts waiting for room: harmless)

    def ready(self, index: int, object_id: int) -> Tuple[bool, int]:
        """(whether the object is there to get - stored, or gone: get says so -, the sequence
        word read before looking), without the mutex."""
        seen = self.mem.words[0]
        if not 0 <= index < self.shape.entries or not self._taken(index):
            return True, seen
        try:
            found = self._entry(index)
        except CorruptSegment:
            return True, seen
        return found.id != object_id or found.state != L.STATE_PROMISED, seen

    def sleep(self, seen: int, timeout_ns: int) -> None:
        """Wait until the sequence word moves from ``seen`` (or the time is up)."""
        self.mem.wait(seen, timeout_ns)

    def hold(self, index: int, object_id: int) -> bool:
        """Hold the object (an unpickled reference); False if it is gone."""
        if not 0 <= index < self.shape.entries:
            return False
        self.enter()
        try:
            self.own_slot()
            held = self.counts.get(index)
            if held is not None and held[0] == object_id:
                held[1] += 1
                return True
            if not self._taken(index):
                return False
            found = self._entry(index)
            if found.id != object_id or found.state not in (L.STATE_READY, L.STATE_PROMISED):
                return False
            at, bit = self._bit(self.slot, index)
            if not self.mapping[at] & bit:
                self.mapping[at] |= bit
                self._set_holders(index, found.holders + 1)
            self.counts[index] = [object_id, 1]
            return True
        finally:
            self.leave()

    def get(self, index: int, object_id: int, copy: bool) -> Tuple[bytes, List[Any]]:
        """The pickle and its buffers (views held until they die, or copies) of an object
        held here through a reference, which holds it while this runs: no mutex (above)."""
        if self.closing:
            raise ValueError("the shmem.ObjectStore is closed")
        if self.pid != os.getpid():  # a fork the hooks did not see: take our holds first
            self.enter()
            try:
                self.own_slot()
            finally:
                self.leave()
        held = self.counts.get(index)
        found = self._entry(index) if self._taken(index) else None
        if held is None or held[0] != object_id or found is None or found.id != object_id:
            raise SegmentNotFound(self.name, _GONE)
        if found.state == L.STATE_PROMISED:
            raise NotReady(self.name, "the object was promised, and is not stored yet (shmem.wait)")
        if found.state != L.STATE_READY:
            raise SegmentNotFound(self.name, _GONE if found.state == L.STATE_DELETED else "the object is being written")
        pinned = False
        try:
            base = self.shape.heap + found.offset
            length, zero = L.EXTENT_HEAD.unpack_from(self.view, base)
            head = -(-(L.EXTENT_HEAD.size + length) // L.UNIT) * L.UNIT
            if zero or head > found.extent:
                raise CorruptSegment(f"object store {self.name!r}: an object header of {length} bytes")
            start = base + L.EXTENT_HEAD.size
            try:
                planned = object_layout.parse(bytes(self.view[start : start + length]), found.extent - head)
            except CorruptSegment as err:
                raise CorruptSegment(f"object store {self.name!r}: {err}") from None
            base += head
            data = bytes(self.view[base : base + planned.pickle_length])
            if copy or not planned.buffers:
                return data, [bytearray(self.view[base + at : base + at + n]) for at, n in planned.buffers]
            end = max(at + n for at, n in planned.buffers)
            self.ops.append((index, object_id, +1))  # the views' hold, before the reference can go
            pinned = True
            whole = self._pin(base, end, index, object_id)
            return data, [whole[at : at + n] for at, n in planned.buffers]
        except BaseException:
            if pinned:
                self.release(index, object_id)
            raise

    def _pin(self, offset: int, length: int, index: int, object_id: int) -> memoryview:
        """A read-only view of ``length`` bytes at ``offset`` whose exporter, when the last
        view of it dies, lets go of one hold on the object."""
        exporter = _array_type(length, len(self.mapping) - offset).from_buffer(self.mapping, offset)
        key = id(exporter)
        pins = self.pins

        def gone(_: Any, key: int = key) -> None:
            pins.pop(key, None)
            let_go(self, index, object_id)

        pins[key] = weakref.ref(exporter, gone)
        return memoryview(exporter).cast("B")[:length].toreadonly()

    def delete(self, index: int, object_id: int) -> None:
        """No process can get the object any more; its memory goes with the last holder."""
        self.enter()
        try:
            if self._taken(index):
                found = self._entry(index)
                if found.id == object_id and found.state == L.STATE_READY:
                    self._set_entry(
                        index, object_id, found.offset, found.extent, found.size, L.STATE_DELETED, found.holders
                    )
        finally:
            self.leave()

    def stats(self) -> Tuple[int, int, int, int, int]:
        """(objects, bytes used, largest free run, processes attached, bytes held by this process)."""
        self.enter()
        try:
            if self.fd >= 0 or self.slot >= 0 or self.counts:
                self.own_slot()
            else:
                self.fd = self._open_fd()
            self.sweep()
            shape = self.shape
            units = bytes(self.mapping[shape.umap : shape.umap + shape.units])
            largest = max((len(run) for run in units.split(b"\x01")), default=0)
            processes = sum(
                1
                for i in range(shape.slots)
                if struct.unpack_from("<I", self.mapping, L.SLOT_TABLE + i * L.SLOT.size)[0]
            )
            return (
                self.counters[L.C_OBJECTS],
                self.counters[L.C_UNITS] * L.UNIT,
                largest * L.UNIT,
                processes,
                len(self.counts),
            )
        finally:
            self.leave()

    # ------------------------------------------------------------ fork

    def before_fork(self) -> None:
        """Give the child-to-be a slot holding what we hold; keep the mutex across the fork."""
        self.child = None
        if not self.counts or self.pid != os.getpid():
            return
        self.enter()
        try:
            self.own_slot()
            fd = self._open_fd()
            slot = self._lock_free_slot(fd)
            if slot < 0:
                os.close(fd)
                raise OSError(errno.EAGAIN, "no slot for the child")
            # Nobody's yet: pid 0 until the child writes its own, so a child killed before it
            # could is dead as soon as its lock (its copy of our description) goes.
            L.SLOT.pack_into(self.mapping, L.SLOT_TABLE + slot * L.SLOT.size, 1, 0, 0, 0, 0)
            mine = self.shape.holds + self.slot * self.shape.bitmap
            theirs = self.shape.holds + slot * self.shape.bitmap
            self.mapping[theirs : theirs + self.shape.bitmap] = self.mapping[mine : mine + self.shape.bitmap]
            for index in self.counts:
                self._set_holders(index, self._entry(index).holders + 1)
            self.child = (fd, slot)
        except BaseException:
            self.leave()
            raise
        # Held across the fork: leave() in the parent; the child inherits it held by our thread.

    def after_fork_parent(self) -> None:
        if self.child is not None:
            os.close(self.child[0])  # the child's copy of the description keeps its slot's lock
            self.child = None
            self.leave()

    def after_fork_child(self) -> None:
        child, self.child = self.child, None
        self.pid = os.getpid()
        if child is None:
            self.fd, self.slot = -1, -1  # claimed (and our holds re-taken) at our first call
            return
        if self.fd >= 0:
            os.close(self.fd)  # the parent's slot: its lock is the parent's business
        self.fd, self.slot = child
        me = _platform.current_process()
        L.SLOT.pack_into(
            self.mapping, L.SLOT_TABLE + self.slot * L.SLOT.size, 1, me.pid, me.start_time, me.pid_namespace, 0
        )
        _tls.depth = 0
        self.mem.forget_lock()  # the parent lets go of it; signals come back here

    # ------------------------------------------------------------ detaching

    def detach(self) -> None:
        """Let go of the slot and the mapping (nothing held here any more)."""
        if self.pid == os.getpid() and self.slot >= 0:
            try:
                self.enter(last=True)
                try:
                    if _platform.still_open(self.fd, self.inode):
                        start = self.shape.holds + self.slot * self.shape.bitmap
                        self.mapping[start : start + self.shape.bitmap] = bytes(self.shape.bitmap)
                        L.SLOT.pack_into(self.mapping, L.SLOT_TABLE + self.slot * L.SLOT.size, 0, 0, 0, 0, 0)
                finally:
                    self.leave()
            except Exception:
                pass
        if self.fd >= 0 and _platform.still_open(self.fd, self.inode):
            os.close(self.fd)
        self.fd, self.slot = -1, -1
        self.counters.release()
        self.view.release()
        # Unmapped - and our users lock let go - with the last reference to the mapping, which a
        # view's exporter may still hold (its finalizer runs before it lets go): remove the
        # store if it is unused once the mapping is gone, not before.
        mapping, self.mapping = self.mapping, None
        block = self.block
        _unmapping.add(weakref.ref(mapping, lambda ref: _unmapped(ref, block)))
        del mapping
        block.release()
        self.mem.release()


_unmapping: Set[Any] = set()  # weak references to detached stores' mappings, until they go


def _unmapped(ref: Any, block: Block) -> None:
    _unmapping.discard(ref)
    try:
        named_block.remove_if_unused(block)
    except Exception:
        pass


_ARRAY_TYPES: Dict[int, Any] = {}


def _array_type(length: int, room: int) -> Any:
    """A ctypes char array type of at least ``length`` bytes, at most ``room``: a power of
    two when it fits (ctypes keeps every array type it makes; these are few)."""
    size = 1 << max(length - 1, 0).bit_length()
    if size > room:
        size = length
    found = _ARRAY_TYPES.get(size)
    if found is None:
        found = _ARRAY_TYPES[size] = ctypes.c_char * size
    return found


# ===================================================================== attaching


_arenas: Dict[Tuple[str, int], Arena] = {}
arenas_lock = threading.RLock()


def _check(block: Block) -> L.StoreLayout:
    header = named_block.header_of_kind(block, KIND_STORE, "an object store")
    try:
        shape = L.parse(header.extra, block.size)
    except CorruptSegment as err:
        raise CorruptSegment(f"object store {block.name!r}: {err}") from None
    assert block.mapping is not None
    if block.mapping[MUTEX_KIND_OFFSET : MUTEX_KIND_OFFSET + 4] != mutex_kind():
        raise CorruptSegment(f"object store {block.name!r}: its internal mutex is not one shmem made (overwritten?)")
    return shape


def open_arena(name: Optional[str], capacity: int, entries: int, create: bool) -> Arena:
    """This process's arena of store ``name`` (made if ``create`` and absent), one more handle on it."""
    from .sync_wait import new_sync_mutex

    shape = L.plan(capacity, entries)
    with arenas_lock:
        block, checked = named_block.create_or_attach(
            name, create, shape.size, KIND_STORE, L.kind_header(shape), [(0, new_sync_mutex())], _check
        )
        key = (block.name, block.inode)
        arena = _arenas.get(key)
        if arena is not None and arena.pid == os.getpid():
            block.release()
        else:
            arena = _arenas[key] = Arena(block, checked if checked is not None else shape)
        arena.handles += 1
        return arena


def arena_for(name: str, inode: int) -> Optional[Arena]:
    """The arena of store ``name`` if it still is the block ``inode`` (attached if need be), else None."""
    with arenas_lock:
        arena = _arenas.get((name, inode))
        if arena is not None:
            return arena
        try:
            block = Block.attach(name)
        except (OSError, ValueError):
            return None
        try:
            if block.inode != inode:
                raise SegmentNotFound(name)
            shape = _check(block)
        except (OSError, ValueError):
            block.release()
            return None
        arena = _arenas[(name, inode)] = Arena(block, shape)
        return arena


def close_handle(arena: Arena) -> None:
    with arenas_lock:
        arena.handles -= 1
        _maybe_detach(arena)


def _maybe_detach(arena: Arena) -> None:
    """Detach ``arena`` if nothing here uses it any more (under ``arenas_lock``)."""
    if arena.handles <= 0 and not arena.counts and not arena.pins and not arena.ops and not arena.closing:
        if arena.pid == os.getpid():
            arena.release(-1, 0)  # runs the releases a finalizer queued: they may hold it still
            if arena.counts or arena.pins or arena.closing:  # closing: by a handler run meanwhile
                return
        arena.closing = True  # from here on, a signal handler or finalizer cannot use it
        if _arenas.get((arena.name, arena.inode)) is arena:
            del _arenas[(arena.name, arena.inode)]
        arena.detach()


class attaching:
    """Around code that picks an arena and puts into it or holds through it: no arena is
    detached meanwhile by a finalizer or a signal handler that runs in this thread (they
    leave it to ``settle``)."""

    def __enter__(self) -> None:
        _tls.attaching = getattr(_tls, "attaching", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _tls.attaching -= 1


def settle(arenas: List[Arena]) -> None:
    """Detach those of ``arenas`` nothing here uses any more (a let-go left them attached)."""
    if getattr(_tls, "attaching", 0) or inside():
        return
    with arenas_lock:
        for arena in arenas:
            if not arena.closing:
                _maybe_detach(arena)


def let_go(arena: Arena, index: int, object_id: int) -> None:
    """A reference is gone (from ``ObjectRef.__del__``): release it, and detach a store
    no longer used here - unless another call of this thread is inside."""
    if index >= 0:
        arena.release(index, object_id)
    if not inside() and not getattr(_tls, "attaching", 0) and arenas_lock.acquire(blocking=False):
        try:
            _maybe_detach(arena)
        except Exception:
            pass
        finally:
            arenas_lock.release()


_forking: List[Arena] = []  # the arenas _before_fork saw, in its order
# One fork at a time, from the before hook to the after hooks: an arena's slot prepared for
# a child, and its mutex held across the fork, are the forking thread's alone (two threads
# forking at once would each take the other's for its own and one mutex would stay held).
_fork_lock = threading.RLock()


def _before_fork() -> None:
    _fork_lock.acquire()
    _forking[:] = list(_arenas.values())
    for arena in _forking:
        try:
            arena.before_fork()
        except Exception:
            arena.child = None


# Last in, first out: each arena held across the fork blocked signals on top of the one
# before it, and its mask is the one before it; restored the other way round, the thread
# would keep every signal blocked. (An arena made during the fork by another thread is not
# in the list: its first call in the child sees the new pid and takes a slot then.)
def _after_fork_parent() -> None:
    try:
        for arena in reversed(_forking):
            arena.after_fork_parent()
        _forking.clear()
    finally:
        _fork_lock.release()


def _after_fork_child() -> None:
    global _fork_lock
    _fork_lock = threading.RLock()  # the parent's, copied held: this process's own from now on
    for arena in reversed(_forking):
        arena.after_fork_child()
    _forking.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)
