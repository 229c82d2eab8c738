"""The Lock kind's codec, and the mutex it holds: C (``shmem._sync``) or its pure-Python twin.

``lock`` (the ``Lock`` and ``RLock`` classes) builds and checks lock blocks
through this module's names; ``describe`` speaks for a lock block's kind
header in listings. ``ACCELERATED`` says whether ``shmem._sync`` is in use
(``SHMEM_PURE_PYTHON=1`` turns it off, for testing the pure-Python path;
``SHMEM_REQUIRE_SPEEDUPS=1`` makes its absence an ImportError, for CI);
``RobustMutex`` is the class the public ones derive from, either way;
``lock_state`` reads a block's holder, waiters and owner-died flag for
``shmem info`` (from a copy of its bytes, never through a lock call).

A lock block's data (``LOCK_SIZE`` bytes, one cache line)::

    0     MUTEX_SIZE  a glibc pthread_mutex_t: robust, process-shared, normal
                      (Lock) or recursive (RLock); 40 bytes on x86-64
    ...   zero        reserved

Its kind header, in the block's trailer (``_core.header`` draws the trailer)::

    off  len  field
      0    8  magic        b"shmlock\\0"
      8    2  version      1
     10    2  type         1 Lock, 2 RLock
     12    4  mutex_size   sizeof(pthread_mutex_t) of the creator's C library
     16    4  mutex_off    0: where the mutex lies in the data
     20   16  libc         b"glibc", NUL-padded: the C library whose mutex it is

A process whose C library differs (musl in another container sharing
/dev/shm, a 32-bit build) refuses the block: it could not take part in the
mutex's protocol. The mutex's own ``__kind`` word (robust, shared, type) is
checked on attach too, so a block whose data was overwritten is refused
before any lock call reads it. Everything read from a block is hostile input.

The mutex is initialised with ``pthread_mutex_init`` in a local buffer and
those bytes become the block's initial contents, before the block has a
name: an unlocked glibc mutex holds no pointers (its robust-list links are
NULL until a thread locks it), so it works at any address, in any process.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import struct
import threading
import time
import warnings
from typing import Any, Dict, List, NamedTuple, Optional

from .. import _platform
from .._errors import CorruptSegment, OwnerDiedWarning

LOCK_SIZE = 64
TYPE_LOCK, TYPE_RLOCK = 1, 2
TYPE_NAMES = {TYPE_LOCK: "Lock", TYPE_RLOCK: "RLock"}

_KIND_HEADER = struct.Struct("<8sHHII16s")
_KIND_MAGIC = b"shmlock\0"
_KIND_VERSION = 1
LIBC = b"glibc"

SLICE_NS = 50_000_000  # the longest wait between two looks for signals (the C side's SLICE_NS)
_FUTEX_TID_MASK = 0x3FFFFFFF  # the holder's thread id in glibc's futex word


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


PURE_REQUESTED = _flag("SHMEM_PURE_PYTHON")  # for testing the fallback: the same behaviour, slower
SPEEDUPS_REQUIRED = _flag("SHMEM_REQUIRE_SPEEDUPS") and not PURE_REQUESTED  # for CI: a missing build fails


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc ")
    except (ValueError, OSError):
        return False


# ================================================================ the pure-Python twin
#
# The same calls on the same memory, through ctypes: libc's pthread_mutex_* on the
# mapping's address (ctypes releases the GIL for the call). ABI facts the C side
# reads from glibc's headers are written down here per machine.

_PURE_ABI = {"x86_64": (40, 8, 16), "aarch64": (48, 8, 16)}  # (sizeof, alignof, offsetof __kind)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Libc:
    """The pthread functions, looked up once (glibc 2.34+: libc; before: libpthread)."""

    def __init__(self) -> None:
        libs = [ctypes.CDLL(None)]
        from ctypes.util import find_library  # here: it imports subprocess, a tenth of `import shmem`

        found = find_library("pthread")
        if found:
            libs.append(ctypes.CDLL(found))

        def function(name: str, *argtypes: Any) -> Any:
            for lib in libs:
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
                    return fn
            return None

        p, i, ts = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)
        self.trylock = function("pthread_mutex_trylock", p)
        self.unlock = function("pthread_mutex_unlock", p)
        self.consistent = function("pthread_mutex_consistent", p)
        self.clocklock = function("pthread_mutex_clocklock", p, i, ts)  # glibc 2.30+
        self.timedlock = function("pthread_mutex_timedlock", p, ts)
        self.mutex_init = function("pthread_mutex_init", p, p)
        self.attr_init = function("pthread_mutexattr_init", p)
        self.attr_destroy = function("pthread_mutexattr_destroy", p)
        self.setpshared = function("pthread_mutexattr_setpshared", p, i)
        self.setrobust = function("pthread_mutexattr_setrobust", p, i)
        self.settype = function("pthread_mutexattr_settype", p, i)
        self.sigmask = function("pthread_sigmask", i, p, p)
        missing = [k for k, v in vars(self).items() if v is None and k != "clocklock"]
        if missing:
            raise ImportError(f"this C library lacks robust process-shared mutexes ({', '.join(missing)})")


def _check_rc(rc: int) -> None:
    if rc:
        raise OSError(rc, os.strerror(rc))


def new_mutex_py(recursive: object) -> bytes:
    """An initialised robust, process-shared mutex, as bytes (``_sync.new_mutex``'s twin)."""
    libc = _libc()
    attr = ctypes.create_string_buffer(64)  # sizeof(pthread_mutexattr_t) is 4 on glibc: room to spare
    mutex = ctypes.create_string_buffer(MUTEX_SIZE)
    _check_rc(libc.attr_init(attr))
    try:
        _check_rc(libc.setpshared(attr, 1))  # PTHREAD_PROCESS_SHARED
        _check_rc(libc.setrobust(attr, 1))  # PTHREAD_MUTEX_ROBUST
        _check_rc(libc.settype(attr, 1 if recursive else 0))  # PTHREAD_MUTEX_RECURSIVE / NORMAL
        _check_rc(libc.mutex_init(mutex, attr))
    finally:
        libc.attr_destroy(attr)
    return mutex.raw


_libc_loaded: Optional[_Libc] = None


def _libc() -> _Libc:
    global _libc_loaded
    if _libc_loaded is None:
        _libc_loaded = _Libc()
    return _libc_loaded


# Held locks whose object went away: kept mapped for the life of the process.
_KEPT: List[Any] = []


_UNSET: Any = object()


class PyRobustMutex:
    """The pure-Python twin of ``_sync.RobustMutex``: same methods, same answers."""

    owner_died = False
    _word: Any = None  # a ctypes int over the mutex's first word: the buffer export
    _depth = 0
    _closing = False  # unbound while threads of ours wait in acquire: they keep _word until out
    _waiting: Any = ()  # one entry per thread asleep in acquire through this object (a list once bound)

    def _bind(self, buf: Any, recursive: bool) -> None:
        if self._word is not None:
            raise ValueError("the lock is already bound")
        # glibc's __lock and __count; the object keeps the mapping from being closed under us.
        word = (ctypes.c_int * 2).from_buffer(buf)
        if len(memoryview(buf)) < MUTEX_SIZE or ctypes.addressof(word) % MUTEX_ALIGN:
            raise ValueError("the buffer cannot hold an aligned pthread_mutex_t")
        self._libc = _libc()
        self._address = ctypes.c_void_p(ctypes.addressof(word))
        self._word, self._recursive, self.owner_died, self._depth = word, recursive, False, 0
        self._closing, self._waiting = False, []

    def _held_here(self) -> bool:
        return self._depth > 0 and _platform.thread_of_this_process(self._word[0] & _FUTEX_TID_MASK)

    def _unbind(self) -> bool:
        if self._word is not None and not self._closing:
            if self._held_here():
                return False
            self._closing = True
            self._let_go()
        return True

    def _let_go(self) -> None:
        """Drop the export once closing and no thread of ours waits in acquire through it (C's
        let_go_view; list.append/pop are single steps under the GIL, so no count is lost)."""
        if self._closing and not self._waiting:
            self._word = None

    def __del__(self) -> None:
        if self._word is not None and self._held_here():
            _KEPT.append(self._word)  # a thread of ours holds it through this mapping: never unmap it

    def _mutex(self) -> Any:
        if self._word is None or self._closing:
            raise ValueError("the lock is closed (not bound to a shared memory block)")
        return self._address

    def _took(self, rc: int, stacklevel: int) -> bool:
        if rc == 0:
            # The first acquisition by this holder resets what earlier (dead, forked) holders left.
            if not self._recursive or self._word[1] == 1:
                self._depth, self.owner_died = 1, False
            else:
                self._depth += 1
            return True
        crc = self._libc.consistent(self._address)  # EOWNERDEAD: we hold it; the holder died
        if crc:
            self._libc.unlock(self._address)
            raise OSError(crc, os.strerror(crc))
        self.owner_died = True
        self._depth = 1
        try:
            warnings.warn(OWNER_DIED_MESSAGE, OwnerDiedWarning, stacklevel=stacklevel + 1)
        except BaseException:
            self._depth = 0  # the warning is an error here: release (consistent again), let it say so
            self.owner_died = False
            self._libc.unlock(self._address)
            raise
        return True

    def acquire(self, block: Any = _UNSET, timeout: Any = None, *, blocking: Any = _UNSET) -> bool:
        if blocking is not _UNSET:
            if block is not _UNSET:
                raise TypeError("acquire() got 'block' (or 'blocking') twice")
            block = blocking
        wait = True if block is _UNSET else bool(block)
        return self._acquire(wait, wait_ns(wait, timeout), 2)

    def _acquire(self, block: bool, wait_ns: int, stacklevel: int) -> bool:
        mutex, libc = self._mutex(), self._libc
        rc = libc.trylock(mutex)
        if rc == 0 or rc == errno.EOWNERDEAD:
            return self._took(rc, stacklevel + 1)
        if rc != errno.EBUSY:
            raise _lock_error(rc)
        if not block or wait_ns == 0:
            return False
        self._waiting.append(None)
        try:
            return self._wait_for(mutex, wait_ns, stacklevel + 1)
        finally:
            self._waiting.pop()
            self._let_go()

    def _wait_for(self, mutex: Any, wait_ns: int, stacklevel: int) -> bool:
        """_acquire's wait in slices; ValueError if another thread closed the handle meanwhile."""
        libc = self._libc
        deadline = -1 if wait_ns < 0 else time.monotonic_ns() + wait_ns
        ts = _Timespec()
        while True:
            now = time.monotonic_ns()
            end = now + SLICE_NS if deadline < 0 else min(deadline, now + SLICE_NS)
            if libc.clocklock is not None:
                ts.tv_sec, ts.tv_nsec = divmod(end, 1_000_000_000)
                rc = libc.clocklock(mutex, time.CLOCK_MONOTONIC, ctypes.byref(ts))
            else:  # before glibc 2.30: the same slice on the realtime clock
                ts.tv_sec, ts.tv_nsec = divmod(time.time_ns() + end - now, 1_000_000_000)
                rc = libc.timedlock(mutex, ctypes.byref(ts))
            if self._closing:
                if rc == 0 or rc == errno.EOWNERDEAD:
                    if rc == errno.EOWNERDEAD:
                        libc.consistent(mutex)
                    libc.unlock(mutex)
                raise ValueError("the lock was closed while this acquire waited")
            if rc == 0 or rc == errno.EOWNERDEAD:
                return self._took(rc, stacklevel + 1)
            if rc != errno.ETIMEDOUT and rc != errno.EINTR:
                raise _lock_error(rc)
            # Returning to the interpreter between slices runs signal handlers (Ctrl-C) here.
            if deadline >= 0 and time.monotonic_ns() >= deadline:
                return False

    def release(self) -> None:
        mutex = self._mutex()
        last = not self._recursive or self._word[1] <= 1  # read while (if the unlock succeeds) we own it
        rc = self._libc.unlock(mutex)
        if rc == 0:
            if last:
                self._depth, self.owner_died = 0, False
            elif self._depth > 0:
                self._depth -= 1
            return
        if rc == errno.EPERM:
            tid = self._word[0] & _FUTEX_TID_MASK
            if tid == 0:
                raise RuntimeError("release unlocked lock")
            raise RuntimeError(f"cannot release a shmem lock held by another thread (tid {tid}): only its owner can")
        raise _lock_error(rc)

    def __enter__(self) -> bool:
        return self._acquire(True, -1, 2)

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        self._mutex()
        return bool(self._word[0] & _FUTEX_TID_MASK)

    def _holder(self) -> int:
        self._mutex()
        return int(self._word[0] & _FUTEX_TID_MASK)

    def _is_owned(self) -> bool:
        return self._holder() == threading.get_native_id()


OWNER_DIED_MESSAGE = (
    "the previous owner of this shmem lock died holding it: the state it protects "
    "may be inconsistent (lock.owner_died is True until the next release)"
)


def wait_ns(block: bool, timeout: Any) -> int:
    """How long to wait: -1 forever, else nanoseconds (the C side's rules)."""
    if timeout is None:
        return -1
    if not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: forever, or a negative one below
        seconds = math.inf if timeout > 0 else -math.inf
    if seconds != seconds:
        raise ValueError("timeout must not be NaN")
    if not block or seconds == -1:
        return -1
    if seconds < 0:
        raise ValueError("timeout must be a non-negative number of seconds (or None)")
    return -1 if seconds * 1e9 >= 2**62 else int(seconds * 1e9)


def _lock_error(rc: int) -> Exception:
    if rc == errno.ENOTRECOVERABLE:
        return RuntimeError(
            "the shmem lock is not recoverable: a holder died and the next owner released it "
            "without marking it consistent (not shmem); remove and recreate the lock"
        )
    if rc == errno.EAGAIN:
        return OverflowError("the RLock's maximum recursion depth is exceeded")
    if rc == errno.EDEADLK:
        return RuntimeError("this thread already holds the lock: acquiring it would deadlock")
    if rc == errno.EINVAL:
        return ValueError("the shared memory holds no valid robust mutex (overwritten?)")
    return OSError(rc, os.strerror(rc))


# ================================================================ which one is in use

RobustMutex: Any
try:
    if PURE_REQUESTED:
        raise ImportError("pure Python requested (SHMEM_PURE_PYTHON)")
    from .. import _sync

    if getattr(_sync, "LAYOUT_VERSION", None) != _KIND_VERSION:  # a stale build of another layout
        raise ImportError(f"shmem._sync was built for another lock layout; this shmem writes {_KIND_VERSION}")
    _sync._set_warning(OwnerDiedWarning)
    RobustMutex, new_mutex = _sync.RobustMutex, _sync.new_mutex
    MUTEX_SIZE, MUTEX_ALIGN, KIND_OFFSET = _sync.MUTEX_SIZE, _sync.MUTEX_ALIGN, _sync.KIND_OFFSET
    ACCELERATED = True
except ImportError as err:  # built without a C compiler: the same behaviour through ctypes
    if SPEEDUPS_REQUIRED:
        raise ImportError(
            f"SHMEM_REQUIRE_SPEEDUPS is set, but shmem's C extension for locks is not usable ({err}); "
            "reinstall shmem where a C compiler is present, or unset the variable"
        ) from err
    abi = _PURE_ABI.get(os.uname().machine)
    if abi is None or not _glibc():
        raise ImportError(
            f"shmem locks need glibc's robust process-shared mutexes on a known machine "
            f"(this is {os.uname().machine or 'an unknown machine'}, C library "
            f"{'glibc' if _glibc() else 'not glibc'}), and shmem._sync is not built"
        ) from err
    MUTEX_SIZE, MUTEX_ALIGN, KIND_OFFSET = abi
    RobustMutex, new_mutex = PyRobustMutex, new_mutex_py
    ACCELERATED = False


# ================================================================ the kind header


class LockHeader(NamedTuple):
    type: int  # TYPE_LOCK or TYPE_RLOCK
    mutex_size: int
    libc: bytes


def kind_header(recursive: bool) -> bytes:
    """The kind header of a new Lock (``recursive``: RLock) made by this process."""
    return _KIND_HEADER.pack(_KIND_MAGIC, _KIND_VERSION, TYPE_RLOCK if recursive else TYPE_LOCK, MUTEX_SIZE, 0, LIBC)


def parse_kind_header(extra: bytes) -> LockHeader:
    """The fields of a lock's kind header, each checked; CorruptSegment (without
    the block's name: the caller adds it) when they do not describe a lock this
    process can use."""
    if len(extra) != _KIND_HEADER.size:
        raise CorruptSegment(f"lock header of {len(extra)} bytes, expected {_KIND_HEADER.size}")
    magic, version, kind, mutex_size, mutex_off, libc = _KIND_HEADER.unpack(extra)
    if magic != _KIND_MAGIC:
        raise CorruptSegment("not a lock header (wrong magic)")
    if version != _KIND_VERSION:
        raise CorruptSegment(
            f"lock layout version {version}, this shmem reads {_KIND_VERSION}; "
            "use one shmem version in every process that shares it"
        )
    if kind not in TYPE_NAMES:
        raise CorruptSegment(f"unknown lock type {kind}")
    libc = libc.rstrip(b"\0")
    if libc != LIBC or mutex_size != MUTEX_SIZE or mutex_off != 0:
        shown = libc.decode("ascii", "replace")
        raise CorruptSegment(
            f"made for another C library ({shown!r}, a {mutex_size}-byte mutex at offset {mutex_off}); "
            f"this process uses {LIBC.decode()}'s {MUTEX_SIZE}-byte mutex and cannot take part in it"
        )
    return LockHeader(kind, mutex_size, libc)


def check_lock(extra: Optional[bytes], data: bytes, size: int, name: str, recursive: bool) -> None:
    """Check a lock block before its mutex is used: its kind header (None: not
    made by shmem), its size, and the mutex's own kind word in ``data`` (a copy
    of the block's first LOCK_SIZE bytes, or fewer: never the mapping, which an
    exception's traceback would keep mapped). CorruptSegment (a ValueError)
    naming the block otherwise."""
    wanted = "shmem.RLock" if recursive else "shmem.Lock"
    if extra is None:
        raise CorruptSegment(f"shared memory block {name!r} was not made by shmem: it holds no {wanted}")
    try:
        header = parse_kind_header(extra)
    except CorruptSegment as err:
        raise CorruptSegment(f"shmem lock {name!r}: {err}") from None
    if header.type != (TYPE_RLOCK if recursive else TYPE_LOCK):
        raise CorruptSegment(f"shared memory block {name!r} holds a shmem.{TYPE_NAMES[header.type]}, not a {wanted}")
    if size < LOCK_SIZE or len(data) < LOCK_SIZE:
        raise CorruptSegment(f"shmem lock {name!r}: its block holds {size} bytes, a lock takes {LOCK_SIZE}")
    if data[KIND_OFFSET : KIND_OFFSET + 4] != _mutex_kind(recursive):
        raise CorruptSegment(f"shmem lock {name!r}: its mutex is not a robust process-shared {wanted}'s (overwritten?)")


_KINDS: Dict[bool, bytes] = {}


def _mutex_kind(recursive: bool) -> bytes:
    """The ``__kind`` word of a mutex this process initialises."""
    kind = _KINDS.get(recursive)
    if kind is None:
        kind = _KINDS[recursive] = new_mutex(recursive)[KIND_OFFSET : KIND_OFFSET + 4]
    return kind


# The futex word's flag bits (linux/futex.h); the rest is the holder's thread id.
FUTEX_WAITERS = 0x80000000
FUTEX_OWNER_DIED = 0x40000000
# glibc's __owner while a robust mutex cannot be used any more (its holder died and
# the next owner unlocked it without pthread_mutex_consistent); __owner is at byte 8.
_OWNER_OFFSET = 8
_NOT_RECOVERABLE = 0x7FFFFFFE
_WORD = struct.Struct("<i")


class LockState(NamedTuple):
    """What a lock's mutex says of its holder, read from a copy of its bytes (``lock_state``)."""

    holder_tid: int  # the holder's thread id, as the holder's pid namespace numbers it; 0: not held
    waiters: bool  # the kernel's FUTEX_WAITERS bit: some thread has waited since the holder took it
    owner_died: bool  # its holder died holding it and nobody has acquired it since
    recoverable: bool  # False: unusable for ever (a holder died and the next owner gave it up unrepaired)


def lock_state(extra: bytes, data: bytes) -> Optional[LockState]:
    """The state of a lock block's mutex: ``extra`` is its kind header, ``data`` a
    copy of (at least) the first LOCK_SIZE bytes of its data - never the mapping.

    Both are hostile input: CorruptSegment when the kind header does not
    validate; None when ``data`` is short or holds no robust process-shared
    mutex of the header's type (overwritten), whose words would mean nothing.
    The answer is a snapshot: the holder may change as soon as it is read.
    """
    header = parse_kind_header(extra)
    if header.type not in (TYPE_LOCK, TYPE_RLOCK) or len(data) < LOCK_SIZE:
        return None
    if data[KIND_OFFSET : KIND_OFFSET + 4] != _mutex_kind(header.type == TYPE_RLOCK):
        return None
    word = _WORD.unpack_from(data, 0)[0] & 0xFFFFFFFF
    owner = _WORD.unpack_from(data, _OWNER_OFFSET)[0]
    return LockState(
        holder_tid=word & _FUTEX_TID_MASK,
        waiters=bool(word & FUTEX_WAITERS),
        owner_died=bool(word & FUTEX_OWNER_DIED),
        recoverable=owner != _NOT_RECOVERABLE,
    )


def describe(extra: bytes) -> str:
    """The lock's type, "Lock" or "RLock", for listings. CorruptSegment when the header does not validate."""
    return TYPE_NAMES[parse_kind_header(extra).type]
