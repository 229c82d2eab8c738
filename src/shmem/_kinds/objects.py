"""Any picklable object, by reference: ``shmem.put``, ``shmem.get``, ``shmem.delete``.

``ref = shmem.put(obj)`` pickles ``obj`` once (protocol 5) and returns an
``ObjectRef``: a few dozen bytes that pickle to any process on the machine
(``Pool``/``Process`` arguments, queues) or travel as ``str(ref)`` to an
unrelated program. ``shmem.get(ref)`` gives the object back; its out-of-band
buffers - NumPy arrays, and anything else pickle protocol 5 hands out - are
read-only views into shared memory, not copies (``copy=True``: private,
writable copies). There is no daemon: an object is a block, and blocks live by
shmem's lifecycle rules.

Where objects live:

* **Small objects** (a pickle of at most ``INLINE_MAX`` bytes, no buffers)
  travel inside the reference itself: no block, no file, no descriptor - a
  million small puts cost a million small refs and nothing in /dev/shm. Made
  of small builtins only, they go in the queue's plain encoding
  (``queue_plain``), which decoding cannot make run any code.
* **The rest** are one block each (``object_layout`` draws it), written whole
  before it has a name, so no process ever sees half an object, and a ``put``
  killed at any instant leaves nothing behind.

Lifetime: an object lives while some process holds an ``ObjectRef`` to it (the
one ``put`` returned, or one unpickled or parsed from text), or until
``delete(ref)``. Views that ``get`` returned keep the object's memory for as
long as they live, even after that, and are never invalidated under their
holder. When the last process lets go of its last reference to an object -
dropping it, exiting or being killed - the object's name is removed and its
memory goes with the last view: a process that drops a reference removes the
object if no other holds one; if another still did, and dies instead of
letting go, the process looks again at its next ``put`` or let-go, and the
creator's reaper removes it when the creator is gone too. A reference only
counts while it is an ``ObjectRef`` in a process: one in flight (pickled in a
queue, or a ``str`` in a file) does not keep its object - keep yours until the
receiver has made its own.

Trust: ``get`` unpickles an object only when the caller asks for it by its
reference, and only if the block under that name is the very block the
reference names (its inode and random id). Blocks are mode 0600: only your
user's processes can read them. Do not ``get`` references from other users.
"""

from __future__ import annotations

import base64
import collections
import os
import pickle
from typing import Any, Deque, Iterable, List, NamedTuple, Optional, Tuple, Union, cast

from .. import _platform
from .._core.block import Block, UsersLease
from .._core.header import KIND_NAMES, KIND_OBJECT
from .._core.lifecycle import USERS_LOCK
from .._errors import CorruptSegment, NoSpace, SegmentNotFound
from . import object_layout, store, store_layout
from .queue_plain import fast_decode as plain_decode
from .queue_plain import fast_encode as plain_encode
from .sync_wait import SLICE_NS, Deadline, forever_or_ns

#: A pickle of at most this many bytes (and no out-of-band buffer) travels inside its reference.
INLINE_MAX = 512
#: ``put`` of an object of at most this many bytes (pickle and buffers) shares a default store.
STORE_MAX = 64 << 10
_PREFIX_BLOCK = "shmem-object:"
_PREFIX_INLINE = "shmem-object-inline:"
_PREFIX_STORED = "shmem-stored:"
_GONE = "the object was deleted, or every process holding a reference to it let go"


class ObjectRef:
    """A reference to an object ``shmem.put`` stored: pass it to any process
    (it pickles to a few dozen bytes), ``shmem.get`` it there. Compares equal
    to every other reference to the same object. ``str(ref)`` is a text form
    that ``shmem.get`` also takes."""

    __slots__ = ("_name", "_block_id", "_inode", "_inline", "_hold", "_index", "__weakref__")
    _name: Optional[str]  # the object's block, or its store's; None: inline
    _block_id: int  # the block's (or in a store, the object's) random id and the block's inode:
    _inode: int  # the very object, not a later one of that name
    _inline: Optional[bytes]  # the pickle itself, for a small object
    _hold: Any  # the creator's Block, this process's UsersLease, or the store's Arena; None: let go
    _index: int  # the object's entry in its store; -1: not in a store

    def __init__(self) -> None:
        raise TypeError("an ObjectRef comes from shmem.put(), or from shmem.get()'s text form")

    @classmethod
    def _make(
        cls, name: Optional[str], block_id: int, inode: int, inline: Optional[bytes], hold: Any, index: int = -1
    ) -> ObjectRef:
        ref = object.__new__(cls)
        ref._name, ref._block_id, ref._inode, ref._inline, ref._hold = name, block_id, inode, inline, hold
        ref._index = index
        return ref

    @property
    def name(self) -> Optional[str]:
        """The object's block, or its ``ObjectStore``'s (None: the object travels inside the reference)."""
        return self._name

    def __reduce__(self) -> Tuple[Any, ...]:
        if self._index >= 0:
            return (_received_stored, (self._name, self._index, self._block_id, self._inode))
        return (_received, (self._name, self._block_id, self._inode, self._inline))

    def __str__(self) -> str:
        if self._inline is not None:
            return _PREFIX_INLINE + base64.b64encode(self._inline).decode("ascii")
        if self._index >= 0:
            return f"{_PREFIX_STORED}{self._name}:{self._index}:{self._block_id:x}:{self._inode}"
        return f"{_PREFIX_BLOCK}{self._name}:{self._block_id:x}:{self._inode}"

    def __repr__(self) -> str:
        if self._inline is not None:
            return f"<shmem.ObjectRef inline, {len(self._inline)} bytes>"
        return f"<shmem.ObjectRef {self._name!r}{'' if self._hold is not None else ' (gone)'}>"

    def _key(self) -> Tuple[Any, ...]:
        return (self._name, self._block_id, self._inode, self._inline, self._index)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __del__(self) -> None:
        hold = getattr(self, "_hold", None)
        if hold is not None and os is not None:  # os: None late at shutdown
            if self._index >= 0:
                self._hold = None
                store.let_go(hold, self._index, self._block_id)
            else:
                _let_go(self)


def put(obj: Any) -> ObjectRef:
    """Store ``obj`` for any process on this machine; its reference.

    Raises:
        pickle.PicklingError, TypeError, ...: what pickling ``obj`` raises -
            before anything is made.
        NoSpace: /dev/shm cannot hold it (nothing is left behind).
    """
    _look_again()  # every put, inline ones too: one check when nothing is pending
    pickled = _pickled(obj)
    if isinstance(pickled, ObjectRef):
        return pickled
    data, raws = pickled
    if len(data) + sum(raw.nbytes for raw in raws) <= STORE_MAX:
        ref = _put_in_a_default_store(data, raws)
        if ref is not None:
            return ref
    layout = object_layout.plan(len(data), [raw.nbytes for raw in raws])
    # The buffers go as memoryviews (os.pwrite takes any buffer): copied once, into the block.
    pieces = cast(List[Tuple[int, bytes]], [(0, data)] + [(o, raw) for (o, _), raw in zip(layout.buffers, raws)])
    block = Block.create(
        None, layout.size, kind=KIND_OBJECT, extra=object_layout.kind_header(layout), initial=pieces, track=True
    )
    assert block.header is not None
    return ObjectRef._make(block.name, block.header.block_id, block.inode, None, block)


# This process's default stores, oldest first: objects of up to STORE_MAX bytes share them
# instead of a block each. Each new one is twice the last (DEFAULT_CAPACITY at first, at most
# 64 MiB), up to DEFAULT_STORES; when all are full, an object gets a block of its own. The
# first stays while the process runs (making a store costs ~1 ms: a put and drop of one
# object at a time must not pay it each time); the others go (from here, and from /dev/shm
# if no other process holds one of their objects) with the last of their objects held here.
_defaults: List[store.Arena] = []
DEFAULT_CAPACITY = 4 << 20
DEFAULT_STORES = 16


def _put_in_a_default_store(data: bytes, raws: List[Any]) -> Optional[ObjectRef]:
    if store.inside():
        # A signal handler run in the middle of a store's change (another thread caught the
        # signal: see sync_wait): the store's mutex is this thread's. A block of its own.
        return None
    # Under the lock a store is detached with, and with no detaching from this thread (a
    # finalizer, a signal handler) until we are out: no store is detached under our put.
    with store.arenas_lock:
        with store.attaching():
            ref = _put_in_a_default_store_locked(data, raws)
        store.settle(_defaults)
        _defaults[:] = [arena for arena in _defaults if not arena.closing]
        return ref


def _put_in_a_default_store_locked(data: bytes, raws: List[Any]) -> Optional[ObjectRef]:
    for arena in reversed(_defaults):
        if not arena.closing:
            ref = _put_into(arena, data, raws)
            if ref is not None:
                return ref
    if len(_defaults) >= DEFAULT_STORES:
        return None
    capacity = min(DEFAULT_CAPACITY << len(_defaults), 64 << 20)
    try:
        arena = store.open_arena(None, capacity, store_layout.default_entries(capacity), True)
    except NoSpace:
        return None
    if _defaults:
        arena.handles -= 1  # held through its objects only
    _defaults.append(arena)
    return _put_into(arena, data, raws)  # None (no room for it): settle detaches the store


def _drop_default_stores() -> None:
    """Let go of the default store this process keeps (tests: nothing left behind)."""
    with store.arenas_lock:
        kept = [arena for arena in _defaults[:1] if arena.handles > 0 and not arena.closing]
        for arena in kept:
            store.close_handle(arena)
        _defaults[:] = [arena for arena in _defaults if not arena.closing]


def _put_into(arena: store.Arena, data: bytes, raws: List[Any]) -> Optional[ObjectRef]:
    """The object in ``arena`` (without waiting), or None when it has no room."""
    try:
        index, object_id = arena.put(data, raws, 0)
    except NoSpace:
        return None
    return ObjectRef._make(arena.name, object_id, arena.inode, None, arena, index)


def _pickled(obj: Any, inline: bool = True) -> Union[ObjectRef, Tuple[bytes, List[Any]]]:
    """An inline reference for a small object (``inline``); else its pickle and its out-of-band buffers."""
    plain = plain_encode(obj)  # builtins only: no pickle either way, and get runs no code
    if plain is not None:
        if inline and len(plain) <= INLINE_MAX:
            return ObjectRef._make(None, 0, 0, plain, None)
        return plain, []  # stored as it is: get tells it from a pickle by its first byte
    buffers: List[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, 5, buffer_callback=buffers.append)
    try:
        raws = [buffer.raw() for buffer in buffers]  # BufferError: not contiguous
    except BufferError:
        raws, data = [], pickle.dumps(obj, 5)
    if len(raws) > object_layout.MAX_BUFFERS:
        raws, data = [], pickle.dumps(obj, 5)
    if inline and not raws and len(data) <= INLINE_MAX:
        return ObjectRef._make(None, 0, 0, data, None)
    return data, raws


def get(
    ref: Union[ObjectRef, str, Iterable[Union[ObjectRef, str]]], *, copy: bool = False, timeout: Optional[float] = None
) -> Any:
    """The object ``ref`` refers to (a list of them for a list of references).

    Args:
        ref: An ``ObjectRef``, its ``str()``, or a list (any iterable) of those.
        copy: False (default): out-of-band buffers (NumPy arrays...) are
            read-only views into shared memory, valid while you hold them.
            True: private, writable copies.
        timeout: For a promised object (``ObjectStore.promise``) not stored
            yet: seconds to wait for it (None: as long as it takes).

    Raises:
        SegmentNotFound: the object is gone (deleted, or everyone let go of it).
        TimeoutError: a promised object was not stored within ``timeout``.
        CorruptSegment: the block under that name is damaged.
        TypeError, ValueError: ``ref`` is not a reference.
    """
    deadline = Deadline(forever_or_ns(timeout))
    if isinstance(ref, (ObjectRef, str)):
        return _get_one(_as_ref(ref), copy, deadline)
    try:
        refs = [_as_ref(r) for r in ref]
    except TypeError:
        kind = type(ref).__name__
        raise TypeError(f"shmem.get takes an ObjectRef, its str() or a list of them, not {kind}") from None
    return [_get_one(r, copy, deadline) for r in refs]


def fulfil(ref: Union[ObjectRef, str], obj: Any, *, timeout: Optional[float] = 0.0) -> None:
    """Store ``obj`` as the object ``ref`` promised (``ObjectStore.promise``), in any process
    that holds the reference: ``get`` and ``wait`` in every process see it from then on.

    Raises:
        TypeError: ``ref`` is not a promise's reference.
        ValueError: the promise was kept already; the object is larger than the store.
        SegmentNotFound: every process let go of the reference (or it was deleted).
        NoSpace: the store has no room (``timeout`` as for ``ObjectStore.put``).
    """
    ref = _as_ref(ref)
    if ref._index < 0:
        raise TypeError("shmem.fulfil takes the reference of a promise (ObjectStore.promise()), not of a stored object")
    arena = ref._hold
    if arena is None:
        raise SegmentNotFound(str(ref._name), _GONE)
    pickled = _pickled(obj, inline=False)
    assert not isinstance(pickled, ObjectRef)
    data, raws = pickled
    arena.put(data, raws, forever_or_ns(timeout), into=(ref._index, ref._block_id))


def wait(
    refs: Iterable[Union[ObjectRef, str]], *, num_returns: Optional[int] = None, timeout: Optional[float] = None
) -> Tuple[List[ObjectRef], List[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` (default: all) can be got - a promised object
    stored by some process; any other reference is ready at once (a gone object too: get
    says so). Returns (ready, not ready), each in the order given; after ``timeout``
    seconds, whatever is ready then.
    """
    given = [_as_ref(r) for r in refs]
    want = len(given) if num_returns is None else num_returns
    if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want <= len(given):
        raise ValueError(f"num_returns must be between 0 and {len(given)}, not {num_returns!r}")
    deadline = Deadline(forever_or_ns(timeout))
    while True:
        ready: List[ObjectRef] = []
        pending: List[ObjectRef] = []
        sleeper: Any = None
        for r in given:
            if r._index < 0 or r._hold is None:
                ready.append(r)
                continue
            done, seen = r._hold.ready(r._index, r._block_id)
            if done:
                ready.append(r)
            else:
                pending.append(r)
                if sleeper is None:
                    sleeper = (r._hold, seen)
        left = deadline.left()
        if len(ready) >= want or left == 0 or sleeper is None:
            return ready, pending
        sleeper[0].sleep(sleeper[1], SLICE_NS if left < 0 else min(left, SLICE_NS))


def delete(ref: Union[ObjectRef, str]) -> None:
    """Remove the object now: no process can ``get`` it afterwards (views
    already made stay valid). Deleting an object twice, or one that is gone,
    does nothing; an object that travels inside its reference has nothing to free."""
    ref = _as_ref(ref)
    if ref._name is None:
        return
    if ref._index >= 0:
        if ref._hold is not None:
            ref._hold.delete(ref._index, ref._block_id)
        return
    try:
        _platform.unlink_same(ref._name, ref._inode)  # only if the name still is that block
    except OSError:
        pass


# ===================================================================== stores


class StoreStats(NamedTuple):
    """What ``ObjectStore.stats()`` counts (bytes are heap bytes, in 64-byte units)."""

    capacity: int
    used: int
    free: int
    largest_free: int  # the largest object that fits right now (its header included)
    objects: int
    max_objects: int
    processes: int  # processes attached to the store now
    held_here: int  # objects this process holds (references or views)


class ObjectStore:
    """A bounded store of objects that share one block of ``capacity`` bytes.

    ``shmem.put`` gives each large object a block of its own; a store keeps
    many objects in one block, reusing its memory from one object to the
    next: no file per object, and pages already mapped. ``name=`` shares the
    store with unrelated programs (created, or opened if it exists: its
    capacity wins); the store also pickles by name. Objects live as with
    ``shmem.put``: while some process holds a reference or a view, or until
    ``delete``. The store lives while some process has it open or holds one
    of its objects.

    Args:
        capacity: Bytes of objects the store holds (reserved in /dev/shm when
            it is made). Each object takes its pickle and buffers plus a
            header, in 64-byte units.
        name: The block's name; None makes a new store under a random name.
        max_objects: Entries in its table (default: one per KiB of capacity,
            1,024 to 262,144).
        create: False: open an existing store only (SegmentNotFound if none).
    """

    def __init__(
        self,
        capacity: int = 64 << 20,
        name: Optional[str] = None,
        *,
        max_objects: Optional[int] = None,
        create: bool = True,
    ) -> None:
        self._arena: Optional[store.Arena] = None
        store_layout.plan(capacity, 64)  # TypeError/ValueError for a bad capacity, before anything
        entries = store_layout.default_entries(capacity) if max_objects is None else max_objects
        self._arena = store.open_arena(name, capacity, entries, create)

    def _open(self) -> store.Arena:
        arena = self._arena
        if arena is None:
            raise ValueError("the shmem.ObjectStore is closed")
        return arena

    @property
    def name(self) -> Optional[str]:
        """The store's block name (None once closed)."""
        return None if self._arena is None else self._arena.name

    @property
    def capacity(self) -> int:
        return self._open().shape.capacity

    def put(self, obj: Any, *, timeout: Optional[float] = 0.0) -> ObjectRef:
        """Store ``obj``; its reference (``shmem.get`` takes it in any process).

        Args:
            timeout: When the store is full: 0 (default) raises NoSpace at
                once; None waits for room as long as it takes; a number of
                seconds waits that long, then raises NoSpace.

        Raises:
            pickle.PicklingError, TypeError, ...: what pickling ``obj`` raises.
            ValueError: the object is larger than the whole store.
            NoSpace: no room (nothing is left behind).
        """
        arena = self._open()
        wait = forever_or_ns(timeout)
        pickled = _pickled(obj)
        if isinstance(pickled, ObjectRef):
            return pickled
        data, raws = pickled
        index, object_id = arena.put(data, raws, wait)
        return ObjectRef._make(arena.name, object_id, arena.inode, None, arena, index)

    def get(
        self,
        ref: Union[ObjectRef, str, Iterable[Union[ObjectRef, str]]],
        *,
        copy: bool = False,
        timeout: Optional[float] = None,
    ) -> Any:
        """``shmem.get``: the object (a list for a list of references)."""
        self._open()
        return get(ref, copy=copy, timeout=timeout)

    def delete(self, ref: Union[ObjectRef, str]) -> None:
        """``shmem.delete``: no process can get the object afterwards; views stay valid."""
        self._open()
        delete(ref)

    def promise(self) -> ObjectRef:
        """A reference to an object that is not stored yet: hand it to the process that will
        make the object, which stores it with ``shmem.fulfil(ref, obj)``; ``shmem.wait`` and
        ``shmem.get`` wait for it. It lives (and takes an entry, no memory) like any other.

        Raises:
            NoSpace: every entry of the store is taken."""
        arena = self._open()
        index, object_id = arena.promise()
        return ObjectRef._make(arena.name, object_id, arena.inode, None, arena, index)

    def stats(self) -> StoreStats:
        """How full the store is (processes found dead are let go of first)."""
        arena = self._open()
        objects, used, largest, processes, held = arena.stats()
        shape = arena.shape
        return StoreStats(shape.capacity, used, shape.capacity - used, largest, objects, shape.entries, processes, held)

    def close(self) -> None:
        """Let go of this handle (idempotent). Objects this process still holds keep
        the store open here until they are dropped."""
        arena, self._arena = self._arena, None
        if arena is not None:
            store.close_handle(arena)

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_open_store, (self._open().name,))

    def __repr__(self) -> str:
        if self._arena is None:
            return "<shmem.ObjectStore closed>"
        return f"<shmem.ObjectStore {self._arena.name!r} capacity={self._arena.shape.capacity}>"

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _open_store(name: str) -> ObjectStore:
    return ObjectStore(name=name, create=False)


# ===================================================================== references


def _received(name: Optional[str], block_id: int, inode: int, inline: Optional[bytes]) -> ObjectRef:
    """An unpickled (or parsed) reference: it counts this process as a holder of the
    object, with a users lease. Never raises for an object that is gone: ``get`` says so."""
    if name is None:
        return ObjectRef._make(None, 0, 0, inline, None)
    try:
        lease: Optional[UsersLease] = UsersLease(name)
    except (OSError, ValueError):
        lease = None
    if lease is not None and lease.inode != inode:  # the name went to another block since
        lease.release()
        lease = None
    return ObjectRef._make(name, block_id, inode, None, lease)


def _received_stored(name: str, index: int, object_id: int, inode: int) -> ObjectRef:
    """An unpickled (or parsed) reference to an object in a store: this process holds it
    (attaching the store if need be). Never raises for an object that is gone."""
    arena = store.arena_for(name, inode)
    try:
        held = arena is not None and arena.hold(index, object_id)
    except (OSError, ValueError):
        held = False
    if not held:
        if arena is not None:
            store.let_go(arena, -1, 0)  # detaches a store attached for nothing
        arena = None
    return ObjectRef._make(name, object_id, inode, None, arena, index)


def _as_ref(ref: Any) -> ObjectRef:
    if isinstance(ref, ObjectRef):
        return ref
    if not isinstance(ref, str):
        raise TypeError(f"expected an ObjectRef or its str(), not {type(ref).__name__}")
    if ref.startswith(_PREFIX_INLINE):
        try:
            inline = base64.b64decode(ref[len(_PREFIX_INLINE) :], validate=True)
        except ValueError:
            raise ValueError(f"not a shmem object reference: {ref[:80]!r}") from None
        return _received(None, 0, 0, inline)
    if ref.startswith(_PREFIX_STORED):
        parts = ref[len(_PREFIX_STORED) :].split(":")
        try:
            name, index, object_id, inode = parts[0], int(parts[1]), int(parts[2], 16), int(parts[3])
        except (IndexError, ValueError):
            raise ValueError(f"not a shmem object reference: {ref[:80]!r}") from None
        if len(parts) != 4 or min(index, object_id, inode) < 0:
            raise ValueError(f"not a shmem object reference: {ref[:80]!r}")
        return _received_stored(name, index, object_id, inode)
    parts = ref[len(_PREFIX_BLOCK) :].split(":") if ref.startswith(_PREFIX_BLOCK) else []
    try:
        name, block_id, inode = parts[0], int(parts[1], 16), int(parts[2])
    except (IndexError, ValueError):
        raise ValueError(f"not a shmem object reference: {ref[:80]!r}") from None
    if len(parts) != 3 or block_id < 0 or inode < 0:
        raise ValueError(f"not a shmem object reference: {ref[:80]!r}")
    return _received(name, block_id, inode, None)


# Objects this process let go of while another process still held them: if those
# die instead of letting go, nobody else would remove the object before this
# process exits (then its reaper does). A few are looked at again at every put
# and let-go. Never shared with a forked child (it starts with its own list).
_pending: Deque[Tuple[str, int]] = collections.deque()  # threads share it: popleft/append only
_pending_pid = os.getpid()
PENDING_LOOKS = 8


def _let_go(ref: ObjectRef) -> None:
    """This reference is gone: release what it held, and remove the object if no
    process holds it any more (an exclusive users lock says so)."""
    hold, ref._hold = ref._hold, None
    name, inode = ref._name, ref._inode
    hold.release()
    if name is not None and _remove_if_unused(name, inode) is False:
        _remember(name, inode)
    _look_again()


def _remove_if_unused(name: str, inode: int) -> Optional[bool]:
    """True: removed; False: still held by some process; None: gone already (or
    not that block any more: not ours to judge)."""
    try:
        opened = _platform.open_existing(name)
    except OSError:
        return None
    try:
        if opened.inode != inode:
            return None
        if not _platform.try_lock_exclusive(opened.fd, USERS_LOCK):
            return False
        try:
            _platform.unlink_same(name, inode)  # under the lock: an attacher waits, then finds it gone
        except OSError:
            return None
        return True
    finally:
        os.close(opened.fd)


def _remember(name: str, inode: int) -> None:
    global _pending_pid
    if _pending_pid != os.getpid():
        _pending.clear()
        _pending_pid = os.getpid()
    _pending.append((name, inode))


def _look_again() -> None:
    """Try the oldest few objects let go of while held elsewhere again."""
    if not _pending or _pending_pid != os.getpid():
        return
    for _ in range(min(PENDING_LOOKS, len(_pending))):
        try:
            name, inode = _pending.popleft()
        except IndexError:  # another thread took the last one
            return
        if _remove_if_unused(name, inode) is False:
            _pending.append((name, inode))


# ===================================================================== getting


def _loads(data: Any, buffers: List[Any]) -> Any:
    """An object from its stored form: a pickle starts with its PROTO opcode (0x80), the
    plain encoding with a type code below 10."""
    return pickle.loads(data, buffers=buffers) if data[:1] == b"\x80" else plain_decode(data)


def _get_one(ref: ObjectRef, copy: bool, deadline: Deadline) -> Any:
    inline = ref._inline
    if inline is not None:
        return _loads(inline, [])
    name = ref._name
    assert name is not None
    if ref._hold is None:
        raise SegmentNotFound(name, _GONE)
    if ref._index >= 0:
        arena = ref._hold
        while True:
            done, seen = arena.ready(ref._index, ref._block_id)
            left = deadline.left()
            if done or left == 0:
                break
            arena.sleep(seen, SLICE_NS if left < 0 else min(left, SLICE_NS))
        try:
            stored, pieces = arena.get(ref._index, ref._block_id, copy)
        except store.NotReady:
            raise TimeoutError(f"the promised object {ref!r} was not stored in time") from None
        return _loads(stored, pieces)
    try:
        block = Block.attach(name, readonly=True, track=False)  # the reference holds the lease
    except SegmentNotFound:
        raise SegmentNotFound(name, _GONE) from None
    try:
        header = block.header
        if block.inode != ref._inode or header is None or header.block_id != ref._block_id:
            raise SegmentNotFound(name, _GONE + " (the name leads to another block now)")
        if header.kind != KIND_OBJECT:
            raise CorruptSegment(f"shared memory block {name!r} holds a {KIND_NAMES[header.kind]} block, not an object")
        try:
            layout = object_layout.parse(header.extra, block.size)
        except CorruptSegment as err:
            raise CorruptSegment(f"shared memory block {name!r}: {err}") from None
        assert block.mapping is not None
        view = memoryview(block.mapping)
        data = view[: layout.pickle_length]
        buffers: List[Any] = [view[offset : offset + length] for offset, length in layout.buffers]
        if copy:
            buffers = [bytearray(b) for b in buffers]
        try:
            return _loads(data, buffers)
        finally:
            data.release()
            view.release()
    finally:
        block.release()  # the mapping stays while views of it live


__all__ = ["INLINE_MAX", "ObjectRef", "ObjectStore", "StoreStats", "delete", "fulfil", "get", "put", "wait"]
