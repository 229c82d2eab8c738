"""What is in /dev/shm: typed records of every block, for ``shmem ls`` and friends.

Everything here only reads, except ``remove_segment``. A block's header is
hostile input like anywhere else: a block whose header does not parse is
reported as ``corrupt``, never trusted.

State of a block (the lifecycle rule of ``_core.lifecycle``, read without acting):

* ``alive``: its creator lives, or a process holds it open (the users lock);
  it is removed once neither is true;
* ``dead``: abandoned - its creator is gone and nobody holds it open; the
  reaper or ``gc()`` removes it;
* ``untracked``: created with ``track=False`` (and complete): nobody removes
  it automatically, whoever lives or dies; ``remove_segment`` or ``unlink()``
  does, when someone decides to;
* ``unknown``: we cannot tell - a block another program made (no header, no
  locks), a corrupt one, or a creator in another pid namespace.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

from . import _platform
from ._core import names
from ._core.header import (
    FLAG_MANAGED,
    KIND_BARRIER,
    KIND_BROADCAST,
    KIND_CONDITION,
    KIND_EVENT,
    KIND_LOCK,
    KIND_NAMES,
    KIND_QUEUE,
    KIND_SEMAPHORE,
    KIND_STORE,
    Header,
)
from ._core.lifecycle import USERS_LOCK
from ._errors import CorruptSegment, SegmentInUse, SegmentNotFound
from ._kinds import Described, Fields, described

# Each kind's layout module is imported where its live fields are read (`shmem ls`, `info`),
# not here: `import shmem` loads this module, and they were a quarter of its import time.
if TYPE_CHECKING:
    from ._kinds.sync_layout import SyncState

_SYNC_KINDS = (KIND_EVENT, KIND_CONDITION, KIND_SEMAPHORE, KIND_BARRIER)


class Segment(NamedTuple):
    """One entry of the shared memory directory, as ``list_segments()`` reports it.

    ``shmem ls --json`` prints these fields (``kind_fields`` flattened into the
    record); the command's guide describes each one.

    Attributes:
        name: The block's name, without a leading slash.
        size: Bytes of data: the size it was created with (a foreign block's file size).
        file_size: Bytes of the file in /dev/shm, shmem's header page included.
        kind: ``"raw"``, ``"list"``, ``"array"``, ``"foreign"`` (not made by shmem)
            or ``"corrupt"`` (a header that does not validate).
        detail: The kind's short description (``"7 items"``, ``"<f8 (1000, 3) C"``),
            a corrupt block's fault, or ``""``.
        state: ``"alive"`` (its creator or a process holding it open lives),
            ``"dead"`` (abandoned: the reaper or ``gc()`` removes it), ``"untracked"``
            (made with ``track=False``: nobody removes it automatically) or
            ``"unknown"`` (foreign, corrupt, or a creator in another pid namespace).
        managed: Created through a ``SharedMemoryManager``.
        track: Removed automatically once abandoned; None for foreign and corrupt blocks.
        ready: Complete; False while being created, or if its creator died meanwhile.
        in_use: A tracked handle holds it open; None when that cannot be told.
        creator_pid: The creator's pid; None for foreign and corrupt blocks.
        created: Seconds since the epoch (foreign and corrupt blocks: last modification).
        uid: The file owner's user id.
        mode: The file's permission bits.
        kind_fields: What the kind's own header says, as (field, value) pairs: a
            list's ``length``; an array's ``dtype``, ``shape``, ``order``, ``ndim``,
            ``itemsize``, ``nbytes`` and ``fields``; a lock's ``type`` and, read
            from its mutex at that moment, ``holder_pid``, ``holder_tid``,
            ``waiters``, ``owner_died`` and ``recoverable`` (see ``lock_fields``);
            an event's, a condition's, a semaphore's or a barrier's ``type``, its
            header's ``value`` or ``parties`` and, read from its words at that
            moment, ``is_set``, ``n_waiting``, ``available``, ``held``,
            ``held_by_dead``, ``holders``, ``broken``, ``waiting_pids`` (see
            ``sync_fields``). Empty for other kinds; ``dict(segment.kind_fields)``
            makes it a mapping.
    """

    name: str
    size: int  # bytes of data (the header's size; the file's size for foreign blocks)
    file_size: int
    kind: str  # "raw", "list", "array", "foreign" or "corrupt"
    detail: str  # e.g. "2000 items", "<f8 (1000, 3) C"; "" when there is nothing to add
    state: str  # "alive", "dead", "untracked" or "unknown" (see the module's docstring)
    managed: bool  # created through a SharedMemoryManager
    track: Optional[bool]  # removed automatically once abandoned (None: foreign)
    ready: bool  # complete (False: being created, or its creator died while creating it)
    in_use: Optional[bool]  # some process holds the users lock (None: cannot tell)
    creator_pid: Optional[int]
    created: Optional[float]  # seconds since the epoch (foreign: last modification)
    uid: int
    mode: int
    kind_fields: Fields = ()  # (``shmem._kinds.described``): a tuple of pairs keeps a Segment hashable

    @property
    def age(self) -> Optional[float]:
        return None if self.created is None else max(0.0, time.time() - self.created)

    @property
    def foreign(self) -> bool:
        return self.kind in ("foreign", "corrupt")


def inspect_segment(name: str) -> Segment:
    """Everything known about block ``name``; FileNotFoundError if there is none,
    InvalidName (a ValueError) for a name that is not one entry of /dev/shm.

    Never raises because of what is *in* the block: a header or kind header that
    does not validate makes the block ``corrupt``, with the reason as detail.
    """
    name = names.validate(name)
    opened = _platform.open_existing(name, writable=False)
    try:
        return _inspect(name, opened)
    finally:
        os.close(opened.fd)


def _inspect(name: str, opened: _platform.Opened) -> Segment:
    uid, mode = opened.uid, opened.mode
    try:
        header = Header.read(opened.fd, opened.size, name)
        description = Described("", ()) if header is None else described(header)
    except CorruptSegment as err:
        return _corrupt(name, opened, str(err))
    if header is None:
        return Segment(
            name,
            opened.size,
            opened.size,
            "foreign",
            "",
            "unknown",
            False,
            None,
            True,
            None,
            None,
            opened.mtime,
            uid,
            mode,
        )
    if header.kind == KIND_LOCK:
        description = Described(description.text, description.fields + lock_fields(opened, header))
    elif header.kind in _SYNC_KINDS:
        description = Described(description.text, description.fields + sync_fields(name, opened, header))
    elif header.kind == KIND_QUEUE:
        description = Described(description.text, description.fields + queue_fields(opened, header))
    elif header.kind == KIND_BROADCAST:
        description = Described(description.text, description.fields + broadcast_fields(opened, header))
    elif header.kind == KIND_STORE:
        description = Described(description.text, description.fields + store_fields(opened, header))
    in_use = _platform.is_locked(opened.fd, USERS_LOCK)
    if not header.auto_remove and header.ready:
        state = "untracked"  # as remove_if_abandoned keeps it: its creator's life says nothing
    else:  # tracked, or never finished (then removed like a tracked one once its creator is gone)
        creator_alive = _platform.process_alive(header.creator)
        if creator_alive or in_use:
            state = "alive"
        elif creator_alive is None:
            state = "unknown"
        else:
            state = "dead"
    return Segment(
        name,
        header.size,
        opened.size,
        KIND_NAMES[header.kind],
        description.text,
        state,
        bool(header.flags & FLAG_MANAGED),
        header.auto_remove,
        header.ready,
        in_use,
        header.creator.pid,
        header.created_ns / 1e9,
        uid,
        mode,
        description.fields,
    )


def lock_fields(opened: _platform.Opened, header: Header) -> Fields:
    """A lock block's state, read from its mutex: a snapshot, as (field, value) pairs.

    * ``holder_tid``: the thread holding it, as the holder's pid namespace
      numbers it (None: nobody holds it);
    * ``holder_pid``: that thread's process, when a process of this pid
      namespace that we may inspect has the block mapped and has that
      thread (None otherwise: not held, or a holder we cannot see);
    * ``waiters``: the kernel's FUTEX_WAITERS bit - some thread has waited
      for it since its holder took it (whether, not how many);
    * ``owner_died``: its holder died holding it and nobody has acquired it
      since (the next acquirer gets ``owner_died``);
    * ``recoverable``: False once a lock is unusable for ever (a holder died
      and the next owner released it without repairing: not shmem).

    The block's bytes are hostile input: a short block or one whose mutex
    was overwritten gives None for every field, never an exception.
    """
    from ._kinds.lock_layout import LOCK_SIZE, lock_state

    keys = ("holder_tid", "holder_pid", "waiters", "owner_died", "recoverable")
    state = None
    if header.size >= LOCK_SIZE:
        try:
            state = lock_state(header.extra, os.pread(opened.fd, LOCK_SIZE, 0))
        except (OSError, ValueError):  # a file cut short meanwhile; a kind header described() accepted
            state = None
    if state is None:
        return tuple((key, None) for key in keys)
    tid = state.holder_tid or None
    pid = None
    if tid is not None:
        try:
            device = os.fstat(opened.fd).st_dev
        except OSError:
            device = None
        if device is not None:
            pid = _platform.process_of_thread_mapping(tid, device, opened.inode)
    return tuple(zip(keys, (tid, pid, state.waiters, state.owner_died, state.recoverable)))


def queue_fields(opened: _platform.Opened, header: Header) -> Fields:
    """A queue's fill level, read from its control words without its mutex (a snapshot):

    * ``items``: messages in the queue; ``used_bytes``: ring bytes they take;
    * ``unfinished``: a JoinableQueue's items not yet ``task_done()``;
    * ``getters_waiting`` / ``putters_waiting``: processes asleep in ``get`` /
      ``put`` (a hint: one that died asleep stays counted until the next wake-up).

    Hostile input: words that cannot be a live queue's give None for every field.
    """
    from ._kinds.queue_layout import RING, queue_state

    keys = ("items", "used_bytes", "unfinished", "getters_waiting", "putters_waiting")
    try:
        state = queue_state(header.extra, os.pread(opened.fd, RING, 0))
    except (OSError, ValueError):
        state = None
    if state is None:
        return tuple((key, None) for key in keys)
    values = (state.items, state.used_bytes, state.unfinished, state.getters_waiting, state.putters_waiting)
    return tuple(zip(keys, values))


def store_fields(opened: _platform.Opened, header: Header) -> Fields:
    """An object store's fill level, read from its counters without its mutex (a snapshot):
    ``objects`` and ``used_bytes`` (heap bytes they take). None for both when the counters
    cannot be a live store's."""
    from ._kinds.store_layout import COUNTERS, store_state

    try:
        state = store_state(header.extra, header.size, os.pread(opened.fd, 16, COUNTERS))
    except (OSError, ValueError):
        state = None
    return (("objects", None if state is None else state[0]), ("used_bytes", None if state is None else state[1]))


def broadcast_fields(opened: _platform.Opened, header: Header) -> Fields:
    """A broadcast's state, read from its control words without its mutex (a snapshot):
    ``published`` (messages ever published), ``held`` (messages still in the ring: what a
    subscriber that fell behind can still read), ``used_bytes``, and ``subscribers_waiting``
    (asleep in ``get``; a hint). None for every field when the words are damaged."""
    from ._kinds.broadcast_layout import broadcast_state
    from ._kinds.queue_layout import RING

    keys = ("published", "held", "used_bytes", "subscribers_waiting")
    try:
        state = broadcast_state(header.extra, os.pread(opened.fd, RING, 0))
    except (OSError, ValueError):
        state = None
    if state is None:
        return tuple((key, None) for key in keys)
    return tuple(zip(keys, (state.published, state.held, state.used_bytes, state.sleepers)))


class SlotHolder(NamedTuple):
    """A live process slot of a semaphore holding permits (``holders`` in ``sync_fields``)."""

    slot: int
    permits: int
    pids: Tuple[int, ...]  # the processes whose open descriptor holds the slot's lock (a forked child shares it)


def sync_fields(name: str, opened: _platform.Opened, header: Header) -> Fields:
    """An Event's, Condition's, Semaphore's or Barrier's live state, as (field, value) pairs.

    * Event: ``is_set``;
    * Condition: ``n_waiting``, the registered waiters (one that died stays
      counted until a notify's token goes to it);
    * Semaphore, BoundedSemaphore: ``available`` (permits free now),
      ``held`` (permits held by live processes), ``held_by_dead`` (held
      through slots whose process died: given back at the next acquire that
      finds none free, or ``get_value()``), ``holders`` (one ``SlotHolder``
      per live slot holding permits, with the pids that hold its descriptor
      when this user may see them);
    * Barrier: ``n_waiting``, ``broken``, ``waiting_pids`` (the processes of
      the slots with parties waiting now, as far as this user may see them).

    Read from a copy of the block's data, without its mutex (a snapshot), and
    checked as hostile input: a short block or words that cannot be a live
    primitive's give None for every field, never an exception. Which slots
    are alive comes from their OFD locks; whose they are, from the locks
    listed in /proc/PID/fdinfo of the processes that have the block open.
    """
    from ._kinds.sync_layout import (
        BarrierState,
        ConditionState,
        EventState,
        SemaphoreState,
        data_size,
        parse_kind_header,
        sync_state,
    )

    state: Optional[SyncState]
    try:
        type_ = parse_kind_header(header.extra).type
        state = sync_state(header.extra, os.pread(opened.fd, data_size(type_), 0))
    except (OSError, ValueError):  # a file cut short meanwhile; a kind header described() accepted
        state = None
    if header.kind == KIND_EVENT:
        return (("is_set", None if not isinstance(state, EventState) else state.is_set),)
    if header.kind == KIND_CONDITION:
        return (("n_waiting", None if not isinstance(state, ConditionState) else state.waiters),)
    if header.kind == KIND_SEMAPHORE:
        keys = ("available", "held", "held_by_dead", "holders")
        if not isinstance(state, SemaphoreState):
            return tuple((key, None) for key in keys)
        try:
            live = [(slot, permits) for slot, permits in state.held if _slot_alive(opened.fd, slot)]
        except OSError:
            return tuple((key, None) for key in keys)
        held = sum(permits for _, permits in live)
        dead = sum(permits for _, permits in state.held) - held
        owners = _slot_owners(name, opened.inode) if live else {}
        holders = tuple(SlotHolder(slot, permits, tuple(owners.get(slot, ()))) for slot, permits in live)
        return tuple(zip(keys, (state.available, held, dead, holders)))
    barrier_keys = ("n_waiting", "broken", "waiting_pids")
    if not isinstance(state, BarrierState):
        return tuple((key, None) for key in barrier_keys)
    owners = _slot_owners(name, opened.inode) if state.waiting else {}
    pids = sorted({pid for slot, _ in state.waiting for pid in owners.get(slot, ())})
    return tuple(zip(barrier_keys, (state.n_waiting, state.broken, tuple(pids))))


def _slot_alive(fd: int, slot: int) -> bool:
    """Whether some open file description holds process slot ``slot``'s lock (its process lives)."""
    from ._kinds.sync_wait import SLOT_LOCK_BASE

    return bool(_platform.is_locked(fd, SLOT_LOCK_BASE + slot))


def _slot_owners(name: str, inode: int) -> Dict[int, List[int]]:
    """For each process slot of block ``name`` (``inode``) whose lock is held, the
    pids whose open descriptors hold it, among the processes this user may inspect."""
    from ._kinds.sync_layout import SLOTS
    from ._kinds.sync_wait import SLOT_LOCK_BASE

    holders = _platform.ofd_lock_holders(name, inode, SLOT_LOCK_BASE, SLOTS)
    return {offset - SLOT_LOCK_BASE: pids for offset, pids in holders.items()}


def _corrupt(name: str, opened: _platform.Opened, why: str) -> Segment:
    return Segment(
        name,
        opened.size,
        opened.size,
        "corrupt",
        why,
        "unknown",
        False,
        None,
        False,
        None,
        None,
        opened.mtime,
        opened.uid,
        opened.mode,
    )


def list_segments(*, include_foreign: bool = False) -> List[Segment]:
    """Every block in the shared memory directory this user can open, sorted by
    name; blocks other programs made only with ``include_foreign``.

    One block never breaks the listing: a block that vanishes meanwhile, or
    cannot be opened, is left out; one whose contents do not validate is
    listed as ``corrupt``.
    """
    found = []
    for name in sorted(_platform.entries()):
        try:
            segment = inspect_segment(name)
        except (OSError, ValueError):  # vanished meanwhile, not a regular file, not ours, odd name
            continue
        if include_foreign or not segment.foreign:
            found.append(segment)
    return found


# `shmem info` shows at most this much of a block.
MAX_FIRST_BYTES = 1 << 20


def first_bytes(name: str, count: int) -> bytes:
    """The first ``count`` bytes of block ``name`` (at most ``MAX_FIRST_BYTES``),
    read without mapping it (symlinks and special files refused, as everywhere)."""
    name = names.validate(name)
    if not 0 <= count <= MAX_FIRST_BYTES:
        raise ValueError(f"can show 0 to {MAX_FIRST_BYTES} bytes of a block, not {count}")
    opened = _platform.open_existing(name, writable=False)
    try:
        return os.pread(opened.fd, min(count, opened.size), 0)
    finally:
        os.close(opened.fd)


def users_of(names_: List[str]) -> Dict[str, List[int]]:
    """The pids that have each block mapped or open (a scan of /proc)."""
    return _platform.processes_using([names.validate(name) for name in names_])


def remove_segment(name: str, *, force: bool = False) -> None:
    """Unlink block ``name`` (any block, foreign ones included: the caller named it).

    Refuses with SegmentInUse (a PermissionError) a block that a process has
    mapped or open, or whose users lock is held, unless ``force``.
    FileNotFoundError when there is no such block; InvalidName (a ValueError)
    for a name that is not one entry of /dev/shm - checked before anything.

    The same protocol as the reaper's: the exclusive users lock is held from
    the check to the unlink, so a process that attaches meanwhile either
    counts as a user (and the block stays) or waits, then finds it gone.
    """
    name = names.validate(name)
    if force:
        _platform.unlink(name)
        return
    pids = users_of([name])[name]  # processes without the lock: untracked or other programs
    if pids:
        raise SegmentInUse(name, f"in use by processes {', '.join(map(str, pids))}")
    opened = _platform.open_existing(name, writable=True)  # a write lock needs a writable descriptor
    try:
        if not _platform.try_lock_exclusive(opened.fd, USERS_LOCK):
            raise SegmentInUse(name, "held open by a process (its users lock is taken)")
        if not _platform.still_published(name, opened.inode):
            raise SegmentNotFound(name, "removed by another process meanwhile")
        _platform.unlink(name)
    finally:
        os.close(opened.fd)  # also drops the exclusive lock
